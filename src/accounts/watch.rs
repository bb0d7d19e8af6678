//! The accounts file, live: watches its directory (editors replace files by rename) and, when
//! the file is a symlink, the directory of the file it points to (an edit of the target in place,
//! the link re-pointed, that directory itself replaced at the same path); debounces, and calls
//! the reload path, which keeps the last good set when a version is invalid.

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
    /// The target's directory, when it is watched besides the file's own, and its identity
    /// (device, inode): a directory replaced at the same path is watched again.
    target_dir: Option<(PathBuf, (u64, u64))>,
    /// The watched target directory's path, for the event callback: the directory itself moved
    /// or deleted (replaced) counts as a change of the file.
    dir_seen: Arc<Mutex<Option<PathBuf>>>,
    /// Where the file's path led when last followed, and the identity of the directory the
    /// own watch was set on: a symlink among the path's directories re-pointed (a release
    /// directory switched under `/etc/amq2api`) sends no event where anything is watched, and
    /// is found by [`AccountsWatcher::moved`].
    resolved: Option<PathBuf>,
    own_dir_id: Option<(u64, u64)>,
}

/// A path's (device, inode), following symlinks.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
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
    let dir_seen = Arc::new(Mutex::new(None::<PathBuf>));
    let (seen, dir) = (names.clone(), dir_seen.clone());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        let names = seen.lock().unwrap_or_else(|e| e.into_inner());
        let dir = dir.lock().unwrap_or_else(|e| e.into_inner());
        if ev.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| names.iter().any(|m| m == n))
                || dir.as_ref().is_some_and(|d| p == d)
        }) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&parent_of(file), RecursiveMode::NonRecursive)?;
    let mut w = AccountsWatcher {
        watcher,
        file: file.to_path_buf(),
        names,
        target_dir: None,
        dir_seen,
        resolved: None,
        own_dir_id: identity(&parent_of(file)),
    };
    w.follow_target();
    Ok(w)
}

impl AccountsWatcher {
    /// The file's path leads somewhere else than when last followed (a symlink re-pointed
    /// anywhere along it, the target appearing or going, its directory replaced): call
    /// [`AccountsWatcher::follow_target`], then read the file. Cheap enough to ask every second.
    pub fn moved(&self) -> bool {
        std::fs::canonicalize(&self.file).ok() != self.resolved
            || identity(&parent_of(&self.file)).is_some_and(|id| Some(id) != self.own_dir_id)
    }

    /// The file can be read now (not missing, not a symlink that leads nowhere).
    pub fn present(&self) -> bool {
        std::fs::metadata(&self.file).is_ok_and(|m| m.is_file())
    }

    /// Resolves the file's symlinks again and watches where they lead now (a regular file in
    /// another directory, or under another name, its directory itself reached through a
    /// re-pointed symlink). Nothing to do for a plain file.
    pub fn follow_target(&mut self) {
        use notify::{RecursiveMode, Watcher};
        self.resolved = std::fs::canonicalize(&self.file).ok();
        // The own directory's watch was set on the directory its path led to then.
        let own = parent_of(&self.file);
        let own_id = identity(&own);
        if own_id.is_some() && own_id != self.own_dir_id {
            let _ = self.watcher.unwatch(&own);
            match self.watcher.watch(&own, RecursiveMode::NonRecursive) {
                Ok(()) => self.own_dir_id = own_id,
                Err(e) => tracing::warn!(
                    dir = %own.display(),
                    error = %e,
                    "cannot watch the accounts file's directory; reload with SIGHUP or amqctl reload"
                ),
            }
        }
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
        use std::os::unix::fs::MetadataExt;
        let dir = target
            .map(|(d, _)| d)
            .filter(|d| Some(d) != own_dir.as_ref())
            .and_then(|d| std::fs::metadata(&d).ok().map(|m| (d, (m.dev(), m.ino()))));
        if dir == self.target_dir {
            return;
        }
        if let Some((old, _)) = self.target_dir.take() {
            // Gone already when the directory was replaced (the kernel dropped its watch).
            let _ = self.watcher.unwatch(&old);
        }
        if let Some((d, id)) = dir {
            match self.watcher.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => self.target_dir = Some((d, id)),
                Err(e) => tracing::warn!(
                    dir = %d.display(),
                    error = %e,
                    "cannot watch the accounts file's symlink target; reload with SIGHUP or amqctl reload"
                ),
            }
        }
        *self.dir_seen.lock().unwrap_or_else(|e| e.into_inner()) =
            self.target_dir.as_ref().map(|(d, _)| d.clone());
    }
}

/// Collapses bursts: waits for a first signal, then until the channel is quiet for [`DEBOUNCE`].
/// Returns false when the channel is closed.
pub async fn next_burst(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    rx.recv().await.is_some() && rest_of_burst(rx).await
}

/// After a burst's first signal: waits until the channel is quiet for [`DEBOUNCE`]. Returns
/// false when the channel is closed.
pub async fn rest_of_burst(rx: &mut mpsc::UnboundedReceiver<()>) -> bool {
    loop {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a burst arrives within `within`.
    async fn burst(rx: &mut mpsc::UnboundedReceiver<()>, within: Duration) -> bool {
        tokio::time::timeout(within, next_burst(rx)).await.unwrap_or(false)
    }

    /// The accounts file is a symlink into a directory that is then replaced at the same path
    /// (a deployment tool swapping a whole directory): the swap is seen, and so are edits in the
    /// new directory afterwards. Before, the watch stayed on the old directory's inode and no
    /// later edit was ever seen.
    #[tokio::test]
    async fn a_symlink_targets_directory_replaced_at_the_same_path_is_watched_again() {
        let root = tempfile::tempdir().unwrap();
        let (etc, real) = (root.path().join("etc"), root.path().join("srv/conf"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("accounts.toml"), "# v1\n").unwrap();
        let file = etc.join("accounts.toml");
        std::os::unix::fs::symlink(real.join("accounts.toml"), &file).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = watch(&file, tx).unwrap();
        // The directory is replaced: a new one built beside it, the old moved away, the new
        // moved in.
        let new = root.path().join("srv/conf.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("accounts.toml"), "# v2\n").unwrap();
        std::fs::rename(&real, root.path().join("srv/conf.old")).unwrap();
        std::fs::rename(&new, &real).unwrap();
        assert!(burst(&mut rx, Duration::from_secs(5)).await, "the replaced directory was not seen");
        w.follow_target();
        // An edit in place in the new directory.
        std::fs::write(real.join("accounts.toml"), "# v3\n").unwrap();
        assert!(burst(&mut rx, Duration::from_secs(5)).await, "an edit in the new directory was not seen");
    }

    /// The accounts file's directory is a symlink into a release directory, switched to the
    /// next release (`/etc/amq2api -> /opt/app/current/etc`, `current` re-pointed): nothing
    /// watched sees the switch, `moved` does, and after following it edits in the new
    /// release are seen. Before, the watch stayed on the old release's directory.
    #[tokio::test]
    async fn a_symlinked_directory_re_pointed_to_another_release_is_followed() {
        let root = tempfile::tempdir().unwrap();
        for r in ["r1", "r2"] {
            std::fs::create_dir_all(root.path().join("srv").join(r)).unwrap();
            std::fs::write(root.path().join("srv").join(r).join("accounts.toml"), format!("# {r}\n"))
                .unwrap();
        }
        let etc = root.path().join("etc");
        std::os::unix::fs::symlink(root.path().join("srv/r1"), &etc).unwrap();
        let file = etc.join("accounts.toml");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = watch(&file, tx).unwrap();
        assert!(!w.moved());
        // The switch: a new link renamed over the old one.
        std::os::unix::fs::symlink(root.path().join("srv/r2"), root.path().join("etc.new")).unwrap();
        std::fs::rename(root.path().join("etc.new"), &etc).unwrap();
        assert!(w.moved(), "the switch was not noticed");
        w.follow_target();
        assert!(!w.moved());
        while burst(&mut rx, Duration::from_millis(300)).await {}
        std::fs::write(root.path().join("srv/r2/accounts.toml"), "# r2, edited\n").unwrap();
        assert!(burst(&mut rx, Duration::from_secs(5)).await, "an edit in the new release was not seen");
    }

    /// A plain file's directory replaced at the same path (no symlink anywhere): `moved` sees
    /// it, and edits in the new directory are seen once followed.
    #[tokio::test]
    async fn a_plain_files_directory_replaced_at_the_same_path_is_followed() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let file = etc.join("accounts.toml");
        std::fs::write(&file, "# v1\n").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = watch(&file, tx).unwrap();
        let new = root.path().join("etc.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("accounts.toml"), "# v2\n").unwrap();
        std::fs::rename(&etc, root.path().join("etc.old")).unwrap();
        std::fs::rename(&new, &etc).unwrap();
        assert!(w.moved(), "the replaced directory was not noticed");
        w.follow_target();
        assert!(!w.moved());
        while burst(&mut rx, Duration::from_millis(300)).await {}
        std::fs::write(&file, "# v3\n").unwrap();
        assert!(burst(&mut rx, Duration::from_secs(5)).await, "an edit in the new directory was not seen");
    }
}
