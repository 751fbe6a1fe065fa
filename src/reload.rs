//! Live configuration: where a reload reads the config from ([`Source`]), and the `--watch`
//! that triggers one ([`watch`]) by polling the files' identity (device, inode, size, mtime),
//! so that it sees the atomic renames editors and Kubernetes ConfigMaps replace files with,
//! and symlink swaps. What a reload changes is the pipeline's (`proxy::Pipeline::reload`);
//! the handle that triggers one is `server::Reloader`; this module only decides when.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file a reload reads, and the `--listen` that overrides its `server.listen`.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub path: PathBuf,
    pub listen: Option<SocketAddr>,
}

/// Polls the files `files()` names (the config file and its `keys_file`) every `every`, and
/// calls `reload()` when their identity differs from `read()` (what it was when they were
/// last read, at start or by any reload). A file that is missing for a moment (being
/// replaced) is waited for, not read. Ends when `files()` answers `None` (the gateway is gone).
pub(crate) async fn watch<Files, Read, Reload, Fut>(
    every: Duration,
    files: Files,
    read: Read,
    reload: Reload,
) where
    Files: Fn() -> Option<Vec<PathBuf>>,
    Read: Fn() -> Vec<Option<Stamp>>,
    Reload: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(files) = files() else { return };
        let now = stamps(&files).await;
        if now.iter().all(Option::is_some) && read() != now {
            tracing::info!("config file changed: reloading");
            reload().await;
        }
    }
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

/// The identity of each of `files` now (`None`: missing).
pub(crate) async fn stamps(files: &[PathBuf]) -> Vec<Option<Stamp>> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        out.push(stamp(f).await);
    }
    out
}

async fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = tokio::fs::metadata(path).await.ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}
