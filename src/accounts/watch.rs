//! The accounts file, live: watches its directory (editors replace files by rename) and, when
//! the file is a symlink, the directory of the file it points to (an edit of the target in place,
//! the link re-pointed); debounces, and calls the reload path, which keeps the last good set
//! when a version is invalid.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the file must be quiet before it is read (editors write in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches the accounts file; must be kept alive. Call [`AccountsWatcher::follow_target`]
/// after each burst, before the file is read, so that a re-pointed symlink is followed.
pub struct AccountsWatcher {
    watcher: notify::RecommendedWatcher,
    file: PathBuf,
    /// The file names whose changes count (the file's own, and its target's).
    names: Arc<Mutex<Vec<OsString>>>,
    /// The target's directory, when it is watched besides the file's own.
    target_dir: Option<PathBuf>,
}

fn parent_of(file: &Path) -> PathBuf {
    file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// Watches `file`'s directory (and its symlink target's); sends `()` on `tx` after each change
/// to the file or its target.
pub fn watch(file: &Path, tx: mpsc::UnboundedSender<()>) -> Result<AccountsWatcher, notify::Error> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let own_name = file.file_name().map(OsString::from).unwrap_or_default();
    let names = Arc::new(Mutex::new(vec![own_name]));
    let seen = names.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        let names = seen.lock().unwrap_or_else(|e| e.into_inner());
        if ev.paths.iter().any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n))) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&parent_of(file), RecursiveMode::NonRecursive)?;
    let mut w = AccountsWatcher { watcher, file: file.to_path_buf(), names, target_dir: None };
    w.follow_target();
    Ok(w)
}

impl AccountsWatcher {
    /// Resolves the file's symlinks again and watches where they lead now (a regular file in
    /// another directory, or under another name). Nothing to do for a plain file.
    pub fn follow_target(&mut self) {
        use notify::{RecursiveMode, Watcher};
        let own_dir = std::fs::canonicalize(parent_of(&self.file)).ok();
        let target = std::fs::canonicalize(&self.file)
            .ok()
            .filter(|t| std::fs::metadata(t).is_ok_and(|m| m.is_file()))
            .and_then(|t| Some((t.parent()?.to_path_buf(), t.file_name()?.to_os_string())));
        {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.truncate(1);
            if let Some((_, name)) = &target {
                if names[0] != *name {
                    names.push(name.clone());
                }
            }
        }
        let dir = target.map(|(d, _)| d).filter(|d| Some(d) != own_dir.as_ref());
        if dir == self.target_dir {
            return;
        }
        if let Some(old) = self.target_dir.take() {
            let _ = self.watcher.unwatch(&old);
        }
        if let Some(d) = dir {
            match self.watcher.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => self.target_dir = Some(d),
                Err(e) => tracing::warn!(
                    dir = %d.display(),
                    error = %e,
                    "cannot watch the accounts file's symlink target; reload with SIGHUP or amqctl reload"
                ),
            }
        }
    }
}

/// Collapses bursts: waits for a first signal, then until the channel is quiet for [`DEBOUNCE`].
/// Returns false when the channel is closed.
pub async fn next_burst(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
