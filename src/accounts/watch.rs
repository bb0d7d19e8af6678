//! The accounts file, live: watches its directory (editors replace files by rename), debounces,
//! and calls the reload path, which keeps the last good set when a version is invalid.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the file must be quiet before it is read (editors write in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches `file`'s directory; sends `()` on `tx` after each burst of changes to the file.
/// Returns the watcher, which must be kept alive.
pub fn watch(
    file: &Path,
    tx: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name: PathBuf = file.file_name().map(PathBuf::from).unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev.paths.iter().any(|p| p.file_name().map(PathBuf::from).as_ref() == Some(&name)) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
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
