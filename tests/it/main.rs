//! The integration tests, one test binary (`it`) rather than one a file: each file here is a
//! module of it, and the library and the dev-dependencies are linked once instead of once a
//! file, which halves a clean build of the tests. Test names are `<file>::<test>` in binary `it`
//! (nextest filter: `binary(it) & test(/^pool::/)`).
//!
//! Not here: `tests/eventstream_alloc.rs`, which installs a counting `#[global_allocator]` for
//! its whole process and so stays a binary of its own.
//!
//! A new file in `tests/it/` needs its `mod` line below; `every_file_is_a_module` fails until it
//! has one (a file without one would silently never be built).

mod common;

mod amqctl;
mod cli;
mod cluster;
mod config;
mod config_files;
mod emulator;
mod eventstream;
mod eventstream_smithy;
mod faults;
mod fuzz_regressions;
mod hardening;
mod hostile;
mod messages;
mod pool;
mod reasoning;
mod sdk;
mod stall;
mod store;
mod systemd;
mod teams;
mod tls;
mod translate;
mod upstream;

/// Every `.rs` file and every directory with a `mod.rs` in `tests/it/` is declared as a module in
/// this file, and every module declared here is one of them.
#[test]
fn every_file_is_a_module() {
    use std::collections::BTreeSet;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            if path.join("mod.rs").is_file() {
                on_disk.insert(name);
            }
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "main" {
                on_disk.insert(stem.to_owned());
            }
        }
    }

    let declared: BTreeSet<String> = include_str!("main.rs")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect();

    assert!(on_disk.contains("pool") && on_disk.contains("common"), "read the wrong directory: {on_disk:?}");
    assert_eq!(
        on_disk.difference(&declared).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "files in tests/it/ without a `mod` line in tests/it/main.rs: they are never built"
    );
    assert_eq!(
        declared.difference(&on_disk).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "`mod` lines in tests/it/main.rs without a file"
    );
}
