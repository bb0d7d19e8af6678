//! Process hardening of the daemon binary: its memory holds tokens and client secrets, so it
//! leaves no core dump even when the core limit allows one and the process is killed by a
//! signal whose default action dumps core.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

fn wait_within(child: &mut Child, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: no exit within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn quit(child: &Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGQUIT)
        .unwrap();
}

/// The files a dump may have left in `dir` (core_pattern `core`, perhaps with `.PID`).
fn cores_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core"))
        .collect()
}

/// `sh -c 'ulimit -c unlimited && exec PROGRAM ARGS…'` in `cwd`.
fn with_core_limit(cwd: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -c unlimited && exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

#[test]
fn the_daemon_leaves_no_core_dump() {
    // The control: an ordinary process, in the same setup, does dump core here. Without that
    // the check below would prove nothing, so a machine that cannot dump fails this test.
    let control_dir = tempfile::tempdir().unwrap();
    let mut control = with_core_limit(control_dir.path(), "sleep", &["60"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    quit(&control);
    let st = wait_within(&mut control, "sleep");
    assert!(
        st.core_dumped() && !cores_in(control_dir.path()).is_empty(),
        "this machine does not write core dumps into the working directory (core_pattern {:?}, \
         status {st:?}); the test needs /proc/sys/kernel/core_pattern = core",
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default()
    );

    // The daemon, started and serving, killed the same way.
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("accounts.toml"), "").unwrap();
    let config = conf.path().join("amq2api.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\nallow_anonymous = true\n\
         [accounts]\nfile = \"accounts.toml\"\n[state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n",
    )
    .unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let mut daemon =
        with_core_limit(cwd.path(), env!("CARGO_BIN_EXE_amq2api"), &["--config", config.to_str().unwrap()])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .spawn()
            .unwrap();
    let socket = conf.path().join("control.sock");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if t0.elapsed() > LIMIT || daemon.try_wait().unwrap().is_some() {
            let _ = daemon.kill();
            panic!("the daemon never opened its control socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    quit(&daemon);
    let st = wait_within(&mut daemon, "the daemon after SIGQUIT");
    assert_eq!(st.signal(), Some(nix::sys::signal::Signal::SIGQUIT as i32), "{st:?}");
    assert!(!st.core_dumped(), "the daemon dumped core: {st:?}");
    assert_eq!(cores_in(cwd.path()), Vec::<String>::new(), "a core file appeared");
}
