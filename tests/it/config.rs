//! `amq2api check-config` against the example files and every invalid fixture, through the
//! real binary; and the guarantee that no secret leaks from a loaded configuration.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check_config(config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run amq2api");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A main config on loopback that names `accounts` as its accounts file.
fn config_for_accounts(dir: &Path, accounts: &Path) -> PathBuf {
    let p = dir.join("amq2api.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\nlisten = [\"127.0.0.1:8443\"]\n[auth]\napi_keys = [\"sk-amq-test-key-0123456789\"]\n\
             [accounts]\nfile = {:?}\n",
            accounts.display().to_string()
        ),
    )
    .unwrap();
    p
}

#[test]
fn example_files_are_valid() {
    let (code, stdout, stderr) = check_config(&root().join("examples/amq2api.toml"));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // Valid, but not "OK": the example's accounts hold placeholders, and each is named.
    assert!(!stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains("configuration valid, but 3 accounts still hold placeholder credentials"),
        "{stdout}"
    );
    assert!(stdout.contains("(3 accounts, 3 enabled)"), "{stdout}");
    assert!(!stderr.contains("error"), "{stderr}");
    for (id, keys) in [
        ("team-a-1", "client_id, client_secret, refresh_token, profile_arn are the example's placeholders"),
        ("kiro-google", "refresh_token is the example's placeholder"),
        ("kiro-key", "api_key is the example's placeholder"),
    ] {
        let line = format!("warning: account {id:?}: {keys}: it cannot sign in");
        assert!(stderr.contains(&line), "no {line:?} in:\n{stderr}");
    }
}

#[test]
fn every_invalid_fixture_fails_with_its_message() {
    let dir = root().join("tests/fixtures/invalid");
    let tmp = tempfile::tempdir().unwrap();
    let mut count = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for fixture in entries {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&fixture).unwrap();
        let expects: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{name} has no `# expect:` line");
        let config = if name.starts_with("accounts-") {
            let sub = tmp.path().join(&name);
            std::fs::create_dir(&sub).unwrap();
            config_for_accounts(&sub, &fixture)
        } else {
            fixture.clone()
        };
        let (code, stdout, stderr) = check_config(&config);
        assert_eq!(code, 78, "{name}: expected exit 78\nstdout: {stdout}\nstderr: {stderr}");
        for e in &expects {
            assert!(stderr.contains(e), "{name}: missing {e:?} in:\n{stderr}");
        }
        assert!(stdout.is_empty(), "{name}: {stdout}");
        count += 1;
    }
    assert!(count >= 17, "only {count} fixtures");
}

#[test]
fn problems_in_both_files_are_listed_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let accounts = root().join("tests/fixtures/invalid/accounts-weight-zero.toml");
    let p = tmp.path().join("amq2api.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\nlisten = [\"127.0.0.1\"]\n[auth]\napi_keys = [\"sk-amq-test-key-0123456789\"]\n\
             [accounts]\nfile = {:?}\n",
            accounts.display().to_string()
        ),
    )
    .unwrap();
    let (code, _, stderr) = check_config(&p);
    assert_eq!(code, 78);
    assert!(
        stderr.contains("amq2api.toml:2:11: error: listen address \"127.0.0.1\" is not IP:PORT"),
        "{stderr}"
    );
    assert!(stderr.contains("accounts-weight-zero.toml:7:10: error:"), "{stderr}");
    assert!(stderr.contains("configuration invalid: 2 errors"), "{stderr}");
}

#[test]
fn world_readable_accounts_file_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let accounts = tmp.path().join("accounts.toml");
    std::fs::copy(root().join("examples/accounts.toml"), &accounts).unwrap();
    let config = config_for_accounts(tmp.path(), &accounts);

    std::fs::set_permissions(&accounts, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = check_config(&config);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: the accounts file is readable by every user (mode 0644)"), "{stderr}");

    std::fs::set_permissions(&accounts, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, stderr) = check_config(&config);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("readable by every user"), "{stderr}");
    // (The example's accounts still hold placeholders: those are the only warnings left.)
    assert!(stderr.lines().all(|l| l.contains("the example's placeholder")), "{stderr}");
}

/// Every secret value in the example files.
fn example_secrets() -> Vec<String> {
    let mut secrets = vec!["sk-amq-example-change-me-0123456789".to_string()];
    let text = std::fs::read_to_string(root().join("examples/accounts.toml")).unwrap();
    for line in text.lines() {
        for key in ["client_id", "client_secret", "refresh_token", "api_key"] {
            if let Some(v) = line.strip_prefix(&format!("{key} = ")) {
                secrets.push(v.trim_matches('"').to_string());
            }
        }
    }
    // The key, one OIDC seat's three credentials, a social refresh token, an API key.
    assert_eq!(secrets.len(), 6);
    secrets
}

#[test]
fn no_secret_in_debug_output_or_check_config_output() {
    let loaded =
        amq2api::config::load(&root().join("examples/amq2api.toml"), &amq2api::config::Env::default())
            .unwrap();
    let debug = format!("{loaded:?} {:#?}", loaded.accounts);
    let (_, stdout, stderr) = check_config(&root().join("examples/amq2api.toml"));

    // A broken copy of the accounts file: its errors must not echo the secrets either.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("accounts.toml");
    let text = std::fs::read_to_string(root().join("examples/accounts.toml")).unwrap();
    std::fs::write(
        &broken,
        text.replace("weight = 1", "weight = 0").replace("id = \"builder-2\"", "id = \"B 2\""),
    )
    .unwrap();
    let (code, out2, err2) = check_config(&config_for_accounts(tmp.path(), &broken));
    assert_eq!(code, 78, "{err2}");

    for s in example_secrets() {
        for (what, text) in [("Debug", &debug), ("stdout", &stdout), ("stderr", &stderr), ("broken", &err2)] {
            assert!(!text.contains(&s), "secret {s:?} appears in {what}: {text}");
        }
        assert!(!out2.contains(&s));
    }
    assert!(debug.contains("***"));
}

#[test]
fn the_example_keys_file_parses() {
    let (set, _) = amq2api::config::keys::load(&root().join("examples/keys.toml"))
        .unwrap_or_else(|d| panic!("examples/keys.toml: {d}"));
    assert_eq!(set.names(), ["alice", "intern.bob", "ci"]);
    let alice = &set.keys[0];
    assert_eq!(alice.rpm.map(|n| n.get()), Some(60));
    assert!(alice.allows_model("claude-haiku-4-5") && !alice.allows_model("claude-opus-4-5"));
    // Every limit of the first entry is set, so that the example shows each one.
    assert!(alice.max_concurrency.is_some() && alice.tokens_per_day.is_some());
    assert!(alice.credits_per_month.is_some() && alice.expires.is_some());
}

/// `check-config` agrees with what the daemon accepts at start-up: a certificate or key file
/// that reads but holds no PEM fails it (78), as it fails the start; a certificate whose key
/// comes as the service's credential (`LoadCredential=tls.key`, README's recommended set-up) is
/// a warning when checked outside the service, not an error.
#[test]
fn check_config_parses_the_tls_files_and_allows_the_key_credential() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
    std::fs::write(&accounts, "").unwrap();
    let config = config_for_accounts(dir.path(), &accounts);
    let base = std::fs::read_to_string(&config).unwrap();
    let with = |server: &str| {
        std::fs::write(&config, base.replace("[server]\n", &format!("[server]\n{server}\n"))).unwrap();
        check_config(&config)
    };
    // Readable, not PEM.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate\n").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key\n").unwrap();
    let (code, _, stderr) = with("tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"");
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("TLS") && stderr.contains("cert.pem"), "{stderr}");
    // A real pair passes.
    let ca = crate::common::certs::ca();
    crate::common::certs::write_server_cert(&ca, dir.path(), "localhost");
    let (code, _, stderr) = with("tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"");
    assert_eq!(code, 0, "{stderr}");
    // The key as the service's credential: a warning here...
    let (code, _, stderr) = with("tls_cert = \"cert.pem\"");
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning") && stderr.contains("CREDENTIALS_DIRECTORY/tls.key"), "{stderr}");
    // ...and an error to the daemon itself, which has no such credential here.
    let out = Command::new(env!("CARGO_BIN_EXE_amq2api"))
        .arg("--config")
        .arg(&config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("error: `tls_cert` is set without `tls_key`"), "{stderr}");
    // A CA file that is no PEM.
    std::fs::write(&config, format!("{base}[upstream]\nca_file = \"key.pem\"\n")).unwrap();
    let (code, _, stderr) = check_config(&config);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("[upstream]"), "{stderr}");
}
