//! The `amq2api` command line through the real binary: its man page (`amq2api man`, hidden) is
//! roff generated from the clap definitions.

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
