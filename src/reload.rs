//! The one owner of configuration changes. SIGHUP, `amqctl reload` and the accounts-file and
//! keys-file watchers all come here: files are read off the async runtime, an invalid file never replaces
//! a good one (the last good set keeps serving and the error is kept for `amqctl status` and
//! `STATUS=`), and a good one is applied as a typed diff.

use crate::config::{self, AccountId, AccountSet, Env, KeySet};
use crate::server::{App, tls};
use crate::shutdown::Shutdown;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    /// What changed ("added a, removed b", "no changes").
    pub changes: String,
    /// Every problem when the new files were refused (the old set keeps serving).
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// The configuration in use and how the last reload went.
#[derive(Debug, Clone)]
pub struct ReloadInfo {
    /// The set in use (the last good one).
    pub accounts: AccountSet,
    /// The named keys in use (the last good keys file).
    pub keys: KeySet,
    pub loaded_at: SystemTime,
    /// Every file refused now (the accounts file, the keys file, amq2api.toml), joined.
    pub last_error: Option<String>,
    pub last_attempt: Option<SystemTime>,
    /// Each file's own refusal, by [`Source`]: one file read well does not hide another's.
    errors: [Option<String>; 3],
}

/// Which file a reload read.
#[derive(Debug, Clone, Copy)]
enum Source {
    Accounts = 0,
    Keys = 1,
    Config = 2,
}

/// Applies configuration changes to the running daemon, one at a time.
pub struct Reloader {
    app: Arc<App>,
    config_path: PathBuf,
    env: Env,
    tls_cert: Option<Arc<tls::ReloadableCert>>,
    info: RwLock<ReloadInfo>,
    /// One reload at a time (a watcher burst and an `amqctl reload` may meet).
    lock: tokio::sync::Mutex<()>,
    /// The addresses the daemon listens on (fixed until a restart).
    listening: Vec<std::net::SocketAddr>,
    /// The last accounts reload left accounts out or changes waiting for the store: the
    /// accounts watcher tries again every [`RETRY_WAITING`] by itself.
    waiting: std::sync::atomic::AtomicBool,
}

/// How often accounts that could not join, or changes that waited for the store, are tried
/// again while some are left.
pub const RETRY_WAITING: std::time::Duration = std::time::Duration::from_secs(10);

impl Reloader {
    /// `accounts` is the set the daemon started with.
    pub fn new(
        app: Arc<App>,
        config_path: PathBuf,
        env: Env,
        tls_cert: Option<Arc<tls::ReloadableCert>>,
        accounts: AccountSet,
        keys: KeySet,
        listening: Vec<std::net::SocketAddr>,
    ) -> Reloader {
        Reloader {
            app,
            config_path,
            env,
            tls_cert,
            info: RwLock::new(ReloadInfo {
                accounts,
                keys,
                loaded_at: SystemTime::now(),
                last_error: None,
                last_attempt: None,
                errors: [None, None, None],
            }),
            lock: tokio::sync::Mutex::new(()),
            listening,
            waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Accounts left out, or changes waiting, at the last accounts reload (tried again by the
    /// accounts watcher).
    pub fn waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn info(&self) -> ReloadInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, source: Source, result: &Outcome, new_set: Option<AccountSet>) {
        let mut info = self.info.write().unwrap_or_else(|e| e.into_inner());
        info.last_attempt = Some(SystemTime::now());
        if result.ok {
            info.errors[source as usize] = None;
            if let Some(set) = new_set {
                info.accounts = set;
                info.loaded_at = SystemTime::now();
            }
        } else {
            info.errors[source as usize] = Some(result.errors.join("; "));
        }
        let refused: Vec<&str> = info.errors.iter().flatten().map(String::as_str).collect();
        info.last_error = if refused.is_empty() { None } else { Some(refused.join("; ")) };
    }

    /// Re-reads the accounts file and applies the difference; an invalid file changes nothing.
    pub async fn accounts(&self) -> Outcome {
        let _guard = self.lock.lock().await;
        self.accounts_locked().await
    }

    async fn accounts_locked(&self) -> Outcome {
        match self.read_accounts().await {
            Ok((set, warnings)) => self.apply_accounts(set, warnings).await,
            Err(r) => {
                // The file's next edit is what changes anything now.
                self.waiting.store(false, std::sync::atomic::Ordering::SeqCst);
                self.record(Source::Accounts, &r, None);
                r
            }
        }
    }

    /// The accounts file, read and checked (nothing applied): the set and its warnings, or
    /// the refusal.
    async fn read_accounts(&self) -> Result<(AccountSet, Vec<String>), Outcome> {
        let path = self.app.config.accounts.file.clone();
        let serving = !self.info().accounts.is_empty();
        let read = {
            let path = path.clone();
            off_runtime(move || config::accounts::load_sized(&path)).await
        };
        let (set, warnings, bytes) = match read {
            Ok(read) => read,
            Err(diags) => {
                for d in diags.errors() {
                    tracing::error!("accounts file not applied (the last good set keeps serving): {d}");
                }
                return Err(refusal(&diags));
            }
        };
        // Read empty while accounts serve: most likely a file being rewritten in place
        // (truncated, then written), read between the two; taking it would drop every account
        // until the write ends. Refused (the watcher sees the write that follows); decided on
        // the bytes read, not on a later look at the file. An operator who means no accounts
        // at all leaves a comment in the file.
        if serving && bytes == 0 {
            let message = format!(
                "{}: error: the accounts file is empty (being written?); the accounts loaded keep \
                 serving (to remove every account, leave a comment in the file)",
                path.display()
            );
            tracing::error!("accounts file not applied (the last good set keeps serving): {message}");
            return Err(Outcome {
                ok: false,
                changes: "no changes".into(),
                errors: vec![message],
                warnings: vec![],
            });
        }
        Ok((set, warnings.0.iter().map(|w| w.to_string()).collect()))
    }

    /// Applies an accounts set read by [`Reloader::read_accounts`] as the difference to the
    /// recorded one.
    async fn apply_accounts(&self, set: AccountSet, mut warnings: Vec<String>) -> Outcome {
        let old = self.info().accounts;
        let diff = old.diff(&set);
        let applied =
            if diff.is_empty() { Default::default() } else { self.app.pool.apply(&set, &diff).await };
        let refused = applied.refused;
        self.waiting
            .store(!refused.is_empty() || !applied.deferred.is_empty(), std::sync::atomic::Ordering::SeqCst);
        if !diff.is_empty() {
            tracing::info!(changes = %diff, "accounts file reloaded");
        }
        // An account that could not join stays out of the recorded set, so the next reload (or
        // the retry of waiting ones) tries it again.
        for (id, why) in &refused {
            warnings.push(format!("{id}: not added: {why}; tried again every {}s", RETRY_WAITING.as_secs()));
        }
        // An account the file no longer lists that stays (renamed to one that could not join,
        // or giving its credentials to another id until a restart) stays in the recorded set
        // too, so the next reload sees its removal again.
        for k in &applied.kept {
            warnings.push(format!("{}: kept under its old id for now (see the other warnings)", k.id));
        }
        let set = if refused.is_empty() && applied.kept.is_empty() {
            set
        } else {
            let out: HashSet<&AccountId> = refused.iter().map(|(id, _)| id).collect();
            AccountSet::new(
                set.iter()
                    .filter(|s| !out.contains(&s.id))
                    .cloned()
                    .chain(applied.kept.iter().cloned())
                    .collect(),
            )
        };
        // An account whose change waits keeps its current settings (the account's own, which
        // an account added back also has) in the recorded set, so the next reload sees the
        // change again.
        let set = if applied.deferred.is_empty() {
            set
        } else {
            for (id, why) in &applied.deferred {
                warnings.push(format!(
                    "{id}: not changed: {why}; tried again every {}s",
                    RETRY_WAITING.as_secs()
                ));
            }
            AccountSet::new(
                set.iter()
                    .map(|s| {
                        if applied.deferred.iter().any(|(d, _)| *d == s.id) {
                            self.app.pool.get(s.id.as_str()).map(|a| a.spec()).unwrap_or_else(|| s.clone())
                        } else {
                            s.clone()
                        }
                    })
                    .collect(),
            )
        };
        let r = Outcome { ok: true, changes: diff.to_string(), errors: vec![], warnings };
        self.record(Source::Accounts, &r, Some(set));
        r
    }

    /// Re-reads the keys file and applies it; an invalid file changes nothing (the last good
    /// keys keep serving).
    pub async fn keys(&self) -> Outcome {
        let _guard = self.lock.lock().await;
        // The keys file of the configuration in use: a reload that removed `keys_file` (or
        // named another) must not have the old file's next edit bring its keys back.
        let path = self.app.auth.read().unwrap_or_else(|e| e.into_inner()).keys_file.clone();
        let Some(path) = path else {
            return Outcome { ok: true, changes: "no changes".into(), errors: vec![], warnings: vec![] };
        };
        let read = off_runtime(move || config::keys::load_sized(&path)).await;
        let r = match read
            .map_err(|d| refusal(&d))
            .and_then(|(set, w, bytes)| self.keys_checked(set, bytes).map(|s| (s, w)))
        {
            Ok((set, warnings)) => Outcome {
                ok: true,
                changes: self.apply_keys(set).await,
                errors: vec![],
                warnings: warnings.0.iter().map(|w| w.to_string()).collect(),
            },
            Err(r) => {
                for e in &r.errors {
                    tracing::error!("keys file not applied (the last good keys keep serving): {e}");
                }
                r
            }
        };
        self.record(Source::Keys, &r, None);
        r
    }

    /// `set`, read from the keys file (`bytes` long), unless the file was read empty while keys
    /// serve: a file being rewritten in place (truncated, then written), read between the two,
    /// would refuse every key holder until the write ends. (A file of comments only is taken:
    /// every key removed on purpose.)
    fn keys_checked(&self, set: KeySet, bytes: usize) -> Result<KeySet, Outcome> {
        let path = self.app.auth.read().unwrap_or_else(|e| e.into_inner()).keys_file.clone();
        let serving = !self.info().keys.keys.is_empty();
        match path {
            Some(path) if serving && bytes == 0 => Err(Outcome {
                ok: false,
                changes: "no changes".into(),
                errors: vec![format!(
                    "{}: error: the keys file is empty (being written?); the keys loaded keep serving \
                     (to remove every key, leave a comment in the file)",
                    path.display()
                )],
                warnings: vec![],
            }),
            _ => Ok(set),
        }
    }

    async fn apply_keys(&self, set: KeySet) -> String {
        let old = self.info().keys;
        let changes = old.diff(&set);
        let keys = self.app.keys.clone();
        let applied = set.clone();
        off_runtime(move || keys.apply(&applied)).await;
        if changes != "no changes" {
            tracing::info!(changes = %changes, "keys file reloaded");
        }
        let mut info = self.info.write().unwrap_or_else(|e| e.into_inner());
        info.keys = set;
        changes
    }

    /// SIGHUP / `amqctl reload`: re-reads amq2api.toml (client keys, TLS certificate), the keys
    /// file and the accounts file. Everything that can refuse the reload is checked before any
    /// of it applies: a reload applies whole or not at all. Settings that need a restart
    /// (listeners, state dir) are reported.
    pub async fn all(&self) -> Outcome {
        let _guard = self.lock.lock().await;
        let (path, env) = (self.config_path.clone(), self.env.clone());
        let loaded = match off_runtime(move || config::load(&path, &env)).await {
            Ok(l) => l,
            Err(diags) => {
                for d in diags.errors() {
                    tracing::error!("configuration not applied (the running one stays): {d}");
                }
                let r = refusal(&diags);
                self.record_by_file(&diags);
                return r;
            }
        };
        // A running listener the new `[auth]` would open to anyone (`listen` itself applies
        // only at a restart, so the file's own check does not see these).
        if loaded.config.auth.allow_anonymous && loaded.config.auth.keys.is_empty() {
            if let Some(addr) = self.listening.iter().find(|a| !a.ip().is_loopback()) {
                let message = format!(
                    "{}: error: allow_anonymous without api_keys is only allowed on loopback listeners, and the \
                     daemon listens on {addr} (a change of listen applies only at a restart)",
                    self.config_path.display()
                );
                return self.refuse(Source::Config, message);
            }
        }
        // The keys file read again, to decide on the bytes of the read that applies.
        let keys = match &loaded.config.auth.keys_file {
            None => Ok(KeySet::default()),
            Some(file) => {
                let file = file.clone();
                match off_runtime(move || config::keys::load_sized(&file)).await {
                    Ok((set, _, bytes)) => self.keys_checked(set, bytes),
                    Err(diags) => Err(refusal(&diags)),
                }
            }
        };
        let keys = match keys {
            Ok(k) => k,
            Err(r) => {
                self.record(Source::Keys, &r, None);
                return r;
            }
        };
        let certified = match (&self.tls_cert, &loaded.config.server.tls) {
            (Some(_), Some(files)) => {
                let files = files.clone();
                let (cert, key) = (files.cert.clone(), files.key.clone());
                match off_runtime(move || tls::load_certified_key(&cert, &key)).await {
                    Ok(ck) => Some(ck),
                    Err(e) => {
                        // systemd copies a credential when the service starts, not at a reload.
                        let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
                            .is_some_and(|d| files.key.starts_with(std::path::Path::new(&d)));
                        let hint = if credential && matches!(e, tls::TlsError::Mismatch(_)) {
                            " (the key is a systemd credential, copied only when the service starts: restart \
                             amq2api to load a new key)"
                        } else {
                            ""
                        };
                        let message = format!(
                            "{}: error: the TLS certificate cannot be loaded, the old one stays in use: {e}{hint}",
                            self.config_path.display()
                        );
                        return self.refuse(Source::Config, message);
                    }
                }
            }
            _ => None,
        };
        let (accounts, mut warnings) = match self.read_accounts().await {
            Ok(read) => read,
            Err(r) => {
                self.record(Source::Accounts, &r, None);
                return r;
            }
        };
        // Every file read well: their earlier refusals are over.
        {
            let mut info = self.info.write().unwrap_or_else(|e| e.into_inner());
            info.errors[Source::Config as usize] = None;
            info.errors[Source::Keys as usize] = None;
        }
        let mut notes = Vec::new();
        *self.app.auth.write().unwrap_or_else(|e| e.into_inner()) = loaded.config.auth.clone();
        let key_changes = self.apply_keys(keys).await;
        if key_changes != "no changes" {
            notes.push(key_changes);
        }
        if loaded.config.auth.keys_file != self.app.config.auth.keys_file {
            notes.push("keys_file changed: restart to watch the new file".into());
        }
        if let (Some(cert), Some(ck)) = (&self.tls_cert, certified) {
            cert.set(ck);
            notes.push("TLS certificate reloaded".to_string());
        }
        notes.extend(restart_notes(&self.app.config, &loaded.config));
        // The keys file's warnings too (the accounts file's come with its own read).
        let keys_file = loaded.config.auth.keys_file.as_deref();
        warnings.extend(
            loaded.warnings.warnings().filter(|d| Some(d.file.as_path()) == keys_file).map(|d| d.to_string()),
        );
        let mut r = self.apply_accounts(accounts, warnings).await;
        if !notes.is_empty() {
            r.changes = format!("{}; {}", r.changes, notes.join("; "));
        }
        r
    }

    /// A refusal of the whole reload for one file's reason (`Source`): nothing applied.
    fn refuse(&self, source: Source, message: String) -> Outcome {
        tracing::error!("configuration not applied (the running one stays): {message}");
        let r = Outcome { ok: false, changes: "no changes".into(), errors: vec![message], warnings: vec![] };
        self.record(source, &r, None);
        r
    }

    /// A refused reload's errors, each kept under its own file's name: a fix of the accounts
    /// file that its watcher applies then clears the accounts file's error, which a SIGHUP
    /// found (before, it stayed in `amqctl status` and `STATUS=` until the next SIGHUP).
    fn record_by_file(&self, diags: &config::Diagnostics) {
        let keys_file = self.app.auth.read().unwrap_or_else(|e| e.into_inner()).keys_file.clone();
        // amq2api.toml read without an error of its own (the keys file then too, unless it has
        // one): their earlier refusals are over, though another file refuses this reload.
        let main_ok = !diags
            .errors()
            .any(|d| d.file != self.app.config.accounts.file && Some(&d.file) != keys_file.as_ref());
        if main_ok {
            let keys_ok = !diags.errors().any(|d| Some(&d.file) == keys_file.as_ref());
            let mut info = self.info.write().unwrap_or_else(|e| e.into_inner());
            info.errors[Source::Config as usize] = None;
            if keys_ok {
                info.errors[Source::Keys as usize] = None;
            }
        }
        let mut by: [Vec<String>; 3] = Default::default();
        for d in diags.errors() {
            let source = if d.file == self.app.config.accounts.file {
                Source::Accounts
            } else if Some(&d.file) == keys_file.as_ref() {
                Source::Keys
            } else {
                Source::Config
            };
            by[source as usize].push(d.to_string());
        }
        for (i, errors) in by.into_iter().enumerate() {
            if errors.is_empty() {
                continue;
            }
            let source = [Source::Accounts, Source::Keys, Source::Config][i];
            let r = Outcome { ok: false, changes: "no changes".into(), errors, warnings: vec![] };
            self.record(source, &r, None);
        }
    }
}

/// The outcome of a file refused for `diags`.
fn refusal(diags: &config::Diagnostics) -> Outcome {
    Outcome {
        ok: false,
        changes: "no changes".into(),
        errors: diags.errors().map(|d| d.to_string()).collect(),
        warnings: diags.warnings().map(|d| d.to_string()).collect(),
    }
}

/// What a reload read but does not apply, said so rather than dropped in silence: each a
/// "… changed: restart to apply" note.
fn restart_notes(running: &config::Config, read: &config::Config) -> Vec<String> {
    let mut notes = Vec::new();
    let mut note = |changed: bool, what: &str| {
        if changed {
            notes.push(format!("{what} changed: restart to apply"));
        }
    };
    note(read.server.listen != running.server.listen, "listen addresses");
    note(
        read.accounts.file != running.accounts.file,
        "[accounts] file (the running daemon still reads the old one)",
    );
    note(read.state.dir != running.state.dir, "[state] dir");
    let cluster = |c: &Option<config::ClusterConfig>| {
        c.as_ref().map(|c| (c.database_url.expose().to_owned(), c.node_id.clone(), c.lease))
    };
    note(cluster(&read.cluster) != cluster(&running.cluster), "[cluster]");
    // The sections read at start only (no secrets in them: their debug forms compare whole).
    note(format!("{:?}", read.upstream) != format!("{:?}", running.upstream), "[upstream]");
    note(read.models != running.models, "[models]");
    // `[server]` beyond `listen` (noted above) and the TLS files (a certificate is reloaded
    // from wherever they now are): limits, timeouts, allow_plaintext. TLS turned on or off needs
    // a restart too.
    let mut server = read.server.clone();
    server.listen.clone_from(&running.server.listen);
    if server.tls.is_some() && running.server.tls.is_some() {
        server.tls.clone_from(&running.server.tls);
    }
    note(server.tls.is_some() != running.server.tls.is_some(), "TLS (tls_cert, tls_key) turned on or off");
    server.tls.clone_from(&running.server.tls);
    note(
        format!("{server:?}") != format!("{:?}", running.server),
        "[server] limits or timeouts (max_body_bytes, *_timeout_secs, max_connections, header limits, allow_plaintext)",
    );
    let mut accounts = read.accounts.clone();
    accounts.file.clone_from(&running.accounts.file);
    note(
        format!("{accounts:?}") != format!("{:?}", running.accounts),
        "[accounts] settings (strategy, refresh_before_expiry_secs, queue_timeout_secs, catalog_refresh_secs)",
    );
    note(
        read.state.usage_retention_days != running.state.usage_retention_days,
        "[state] usage_retention_days",
    );
    note(
        read.control.socket != running.control.socket || read.control.mode != running.control.mode,
        "[control]",
    );
    notes
}

/// Runs blocking work (reading configuration files) on the blocking pool, so that no runtime
/// worker ever waits on a file; a panic there goes on in the caller.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down, and drops this task too (there is no value to
        // give, and `into_panic` on a cancellation would panic itself).
        Err(_) => std::future::pending().await,
    }
}

/// The accounts-file watcher: set up when this is called (the daemon calls it before it says
/// it is ready and before its control socket answers, so that a change made as soon as it does
/// is seen), then its loop: each burst of changes (a symlink re-pointed included) is one reload.
/// Without a watcher (it could not be set up) the loop only waits for the stop.
pub fn watch_accounts(
    reloader: Arc<Reloader>,
    shutdown: Shutdown,
) -> impl Future<Output = ()> + Send + 'static {
    let file = reloader.app.config.accounts.file.clone();
    let watching = Watching::start(&file, "accounts");
    async move {
        let waiting = || reloader.waiting();
        watching.run(shutdown, || reloader.accounts(), waiting).await
    }
}

/// The keys-file watcher (as [`watch_accounts`]); nothing to do without `keys_file`.
pub fn watch_keys(reloader: Arc<Reloader>, shutdown: Shutdown) -> impl Future<Output = ()> + Send + 'static {
    let watching = reloader.app.config.auth.keys_file.clone().map(|file| Watching::start(&file, "keys"));
    async move {
        if let Some(w) = watching {
            w.run(shutdown, || reloader.keys(), || false).await;
        }
    }
}

/// A file watched for changes: the watcher and the channel its events arrive on.
struct Watching {
    watcher: Option<crate::accounts::watch::AccountsWatcher>,
    rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Watching {
    fn start(file: &std::path::Path, what: &str) -> Watching {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = match crate::accounts::watch::watch(file, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the {what} file; reload with SIGHUP or amqctl reload");
                None
            }
        };
        Watching { watcher, rx }
    }

    /// Calls `reload` once for each burst of changes until the stop, and every
    /// [`RETRY_WAITING`] while `waiting` says the last one left something to do again.
    async fn run<F, Fut>(mut self, mut shutdown: Shutdown, mut reload: F, waiting: impl Fn() -> bool)
    where
        F: FnMut() -> Fut,
        Fut: Future,
    {
        // Where the path leads is looked at again every second: a symlink that leads nowhere
        // (its target's directory being swapped), or one re-pointed among the path's
        // directories (a release switched under /etc/amq2api), changes nothing where anything
        // is watched.
        let mut look = tokio::time::interval(std::time::Duration::from_secs(1));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at = tokio::time::Instant::now() + RETRY_WAITING;
        // Without a watcher (it could not be set up) no event comes, but the retries do.
        let mut events = self.watcher.is_some();
        loop {
            let watching = self.watcher.is_some();
            // Only cancel-safe futures here (a burst's first signal is taken by `recv`, its
            // rest waited for below): a tick must never drop an edit half seen.
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tokio::time::sleep_until(retry_at), if waiting() => {
                    tracing::info!("trying again the accounts that waited for the store");
                    reload().await;
                }
                _ = look.tick(), if watching => {
                    if let Some(w) = self.watcher.as_mut().filter(|w| w.moved()) {
                        w.follow_target();
                        if w.present() {
                            reload().await;
                        }
                    }
                }
                first = self.rx.recv(), if events => {
                    if first.is_none() || !crate::accounts::watch::rest_of_burst(&mut self.rx).await {
                        events = false;
                        continue;
                    }
                    // The symlink may have been re-pointed: watch where it leads now.
                    if let Some(w) = self.watcher.as_mut() { w.follow_target(); }
                    reload().await;
                }
            }
            // The next retry: RETRY_WAITING after the one that ran, or after the reload that
            // left something waiting (never at once).
            let now = tokio::time::Instant::now();
            if !waiting() || retry_at <= now {
                retry_at = now + RETRY_WAITING;
            }
        }
    }
}

/// SIGHUP's loop: reload everything, telling systemd (`RELOADING=1`, then `READY=1` with the
/// status line `status` gives).
pub async fn on_sighup(reloader: Arc<Reloader>, status: impl Fn() -> String, mut shutdown: Shutdown) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration and accounts");
                crate::systemd::reloading();
                let r = reloader.all().await;
                tracing::info!(ok = r.ok, changes = %r.changes, "reload finished");
                crate::systemd::ready(&status());
            }
        }
    }
}
