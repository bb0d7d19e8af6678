//! The daemon as a child process (the real binary), its control socket through the real
//! `amqctl`, and a small private disk for its state directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const AMQ2API: &str = env!("CARGO_BIN_EXE_amq2api");
pub const AMQCTL: &str = env!("CARGO_BIN_EXE_amqctl");

/// Writes `amq2api.toml` (listening on 127.0.0.1:0; the bound address is read back from the
/// control socket) and `accounts.toml` for `ids` into `dir`, against `emulator`.
pub fn write_config(
    dir: &Path,
    emulator: &amq2api::emulator::Emulator,
    ids: &[String],
    accounts_settings: &str,
) -> PathBuf {
    std::fs::write(dir.join("accounts.toml"), super::accounts_toml(ids)).unwrap();
    let config = dir.join("amq2api.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\napi_keys = [\"{key}\"]\n[upstream]\n{endpoints}\
             [accounts]\nfile = \"accounts.toml\"\n{accounts_settings}\n\
             [state]\ndir = \"state\"\n[control]\nsocket = \"control.sock\"\n",
            key = super::API_KEY,
            endpoints = amq2api::demo::upstream_keys(emulator),
        ),
    )
    .unwrap();
    config
}

/// A daemon started from `command` (the binary, or the binary behind `nsenter`).
pub struct ChildDaemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl ChildDaemon {
    /// Starts `command` with `--config config` and waits (up to 20 s) until its control socket
    /// answers.
    pub fn start(command: Command, config: &Path, envs: &[(&str, &str)]) -> ChildDaemon {
        ChildDaemon::start_logged(command, config, envs, None)
    }

    /// [`ChildDaemon::start`], with its log (at `RUST_LOG=info`) written to `log` when given.
    pub fn start_logged(
        mut command: Command,
        config: &Path,
        envs: &[(&str, &str)],
        log: Option<&Path>,
    ) -> ChildDaemon {
        command.arg("--config").arg(config).stdout(Stdio::null());
        match log {
            Some(path) => {
                command.env("RUST_LOG", "info").stderr(std::fs::File::create(path).unwrap());
            }
            None => {
                command.env("RUST_LOG", "warn");
                if std::env::var_os("AMQ_TEST_LOG").is_none() {
                    command.stderr(Stdio::null());
                }
            }
        }
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().expect("the daemon starts");
        let socket = config.parent().unwrap().join("control.sock");
        let mut d = ChildDaemon { child, socket };
        let t0 = Instant::now();
        while d.ctl_json(&["status"]).is_none() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited during start-up: {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the control socket never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `amqctl --json ARGS` through the real binary; `None` when it fails.
    pub fn ctl_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new(AMQCTL)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `amqctl ARGS` (text output) through the real binary.
    pub fn ctl_text(&self, args: &[&str]) -> String {
        let out = Command::new(AMQCTL).arg("--socket").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The daemon's HTTP address, from its status.
    pub fn addr(&self) -> String {
        let status = self.ctl_json(&["status"]).expect("status");
        let l = status["listeners"][0].as_str().expect("a listener").to_owned();
        l.trim_start_matches("http://").to_owned()
    }

    /// `GET /health` (a plain HTTP/1.1 exchange over a fresh connection).
    pub fn health(&self) -> serde_json::Value {
        let mut s = std::net::TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("health is not JSON ({e}): {text}"))
    }

    /// Polls `/health` until `pred` holds, for up to `within`.
    pub fn wait_health(&self, within: Duration, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let h = self.health();
            if pred(&h) {
                return;
            }
            assert!(t0.elapsed() < within, "no {what} within {within:?}; /health says {h}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit code (within `within`).
    pub fn stop(mut self, within: Duration) -> i32 {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > within {
                let _ = self.child.kill();
                panic!("the daemon did not stop within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `NOTIFY_SOCKET` for a child daemon: what it tells systemd.
pub struct Notify {
    pub sock: UnixDatagram,
    pub path: PathBuf,
}

impl Notify {
    pub fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Notify { sock, path }
    }

    /// Reads notifications until one has a line starting with `want` and containing `with`;
    /// returns that line.
    pub fn wait_line(&self, want: &str, with: &str, within: Duration) -> String {
        let t0 = Instant::now();
        let mut buf = [0u8; 8192];
        let mut seen = Vec::new();
        while t0.elapsed() < within {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(line) = msg.lines().find(|l| l.starts_with(want) && l.contains(with)) {
                    return line.to_owned();
                }
                seen.push(msg);
            }
        }
        panic!("no notification starting {want:?} within {within:?}; got {seen:?}");
    }
}

/// A small tmpfs at `dir`, in a private mount namespace held open by a `sleep` process (a user
/// namespace too, so that no root is needed). Daemons started with [`SmallDisk::command`] see
/// it; the test reaches it through `/proc/<holder>/root`, fills it, frees it and remounts it.
pub struct SmallDisk {
    holder: Child,
    dir: PathBuf,
}

impl SmallDisk {
    pub fn new(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let mut holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o size=\"$1\",mode=0700 tmpfs \"$2\" && echo mounted && exec sleep 3600")
            .args(["sh", size])
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mounted", "the small disk could not be mounted");
        SmallDisk { holder, dir: dir.to_owned() }
    }

    /// `program` run inside the disk's namespaces.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &self.holder.id().to_string(),
            "--user",
            "--mount",
            "--preserve-credentials",
            "--",
        ])
        .arg(program);
        c
    }

    /// A path inside the disk as the test process reaches it.
    pub fn path(&self, rel: &str) -> PathBuf {
        let inside = self.dir.join(rel);
        PathBuf::from(format!("/proc/{}/root{}", self.holder.id(), inside.display()))
    }

    /// Fills the disk to the last byte with a filler file.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.path("filler")).unwrap();
        let block = vec![0x5au8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        let _ = f.sync_all();
    }

    /// Removes the filler.
    pub fn free(&self) {
        std::fs::remove_file(self.path("filler")).unwrap();
    }

    /// `mount -o remount,OPTS` inside the namespace; false if the kernel refused (busy).
    pub fn remount(&self, opts: &str) -> bool {
        self.command("mount")
            .arg("-o")
            .arg(format!("remount,{opts}"))
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
