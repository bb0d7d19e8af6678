//! The `amq2api` command line through the real binary: its man page (`amq2api man`, hidden) is
//! roff generated from the clap definitions; and packaging/build-deb.sh generates, and the deb
//! and rpm asset lists in Cargo.toml install, both binaries' man pages.

use std::process::Command;

#[test]
fn man_page_is_roff_naming_the_subcommands_and_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_amq2api")).arg("man").output().expect("run amq2api man");
    let stdout = String::from_utf8(out.stdout).expect("the man page is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    // roff: a title line and the usual sections.
    assert!(stdout.contains("\n.TH amq2api 1 "), "{stdout}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH OPTIONS", ".SH SUBCOMMANDS"] {
        assert!(stdout.contains(section), "no {section}: {stdout}");
    }
    // roff escapes a hyphen as `\-`.
    let text = stdout.replace("\\-", "-");
    for sub in ["demo", "check-config", "eventstream", "emulator", "run"] {
        assert!(text.contains(&format!("\namq2api-{sub}(1)\n")), "no subcommand {sub}: {stdout}");
    }
    assert!(text.contains("--config"), "{stdout}");
    assert!(text.contains("/etc/amq2api/amq2api.toml"), "{stdout}");
    assert!(text.contains("Manage a running daemon with amqctl"), "{stdout}");
    // The packaging helper itself is hidden.
    assert!(!text.contains("amq2api-man(1)"), "{stdout}");
}

#[test]
fn man_is_hidden_from_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_amq2api")).arg("--help").output().expect("run amq2api --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(help.contains("check-config") && !help.contains("\n  man "), "{help}");
}

/// The deb and the rpm install both man pages, and every generated file they name is one that
/// packaging/build-deb.sh writes into target/packaging/.
#[test]
fn packages_install_the_generated_man_pages() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let script = std::fs::read_to_string(root.join("packaging/build-deb.sh")).unwrap();
    let metadata = &manifest["package"]["metadata"];
    let deb: Vec<(String, String)> = metadata["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_str().unwrap().to_string(), a[1].as_str().unwrap().to_string()))
        .collect();
    let rpm: Vec<(String, String)> = metadata["generate-rpm"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["source"].as_str().unwrap().to_string(), a["dest"].as_str().unwrap().to_string()))
        .collect();
    for (kind, assets) in [("deb", &deb), ("rpm", &rpm)] {
        for page in ["amq2api.1", "amqctl.1"] {
            let source = format!("target/packaging/{page}");
            assert!(
                assets.iter().any(|(s, d)| *s == source
                    && d.trim_start_matches('/') == format!("usr/share/man/man1/{page}")),
                "the {kind} does not install {source} as /usr/share/man/man1/{page}: {assets:?}"
            );
        }
        for (source, _) in assets.iter().filter(|(s, _)| s.starts_with("target/packaging/")) {
            let name = source.trim_start_matches("target/packaging/");
            assert!(
                script.contains(&format!(">\"$generated/{name}\"")),
                "the {kind} installs {source}, which packaging/build-deb.sh does not generate"
            );
        }
    }
    assert!(script.contains("\"$amq2api\" man >\"$generated/amq2api.1\""), "{script}");
}
