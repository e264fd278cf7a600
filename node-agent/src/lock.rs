//! One writer per node: the `run` loop holds an exclusive `flock` on
//! [`LOCK_FILE`] for its whole life, and `apply` and `revert` take the same
//! lock before they touch a file.
//!
//! Why: `helm uninstall` deletes the agent DaemonSet and then starts the
//! revert hook, but the old agent pod may still be in its grace period. Its
//! loop sees the proxy go away, closes the health gate and re-applies, which
//! would undo a revert that ran in between. With the lock the revert waits
//! until that process is gone. The kernel drops the lock when the process
//! dies (even on SIGKILL), so a crash never leaves a stale lock behind, and
//! the lock crosses containers because every pod opens the same host inode.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::fsio::{FsError, Root};

/// Host path of the lock; `/run` is a tmpfs on a host, cleared at boot.
pub const LOCK_FILE: &str = "/run/pullthrough-agent.lock";

const POLL: Duration = Duration::from_millis(100);

/// The node's writer lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "another pullthrough-agent still runs on this node (it holds {path}) after waiting {waited:?}; its loop would re-apply the config: stop it first (delete its DaemonSet or stop its service), or wait longer with --wait-for-agent"
    )]
    Held { path: String, waited: Duration },
}

/// The held lock; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct NodeLock {
    /// Holds the flock: it is released when this closes.
    _file: File,
    path: PathBuf,
}

impl NodeLock {
    /// Takes the lock, polling for up to `wait` while another process holds
    /// it; `on_wait` is called once, when the first try finds it held.
    pub fn acquire(root: &Root, wait: Duration, on_wait: impl FnOnce()) -> Result<Self, LockError> {
        let start = Instant::now();
        let mut on_wait = Some(on_wait);
        loop {
            if let Some(lock) = Self::try_acquire(root)? {
                return Ok(lock);
            }
            if let Some(f) = on_wait.take() {
                f();
            }
            if start.elapsed() >= wait {
                return Err(LockError::Held {
                    path: LOCK_FILE.to_string(),
                    waited: wait,
                });
            }
            std::thread::sleep(POLL.min(wait.saturating_sub(start.elapsed())));
        }
    }

    /// One try: `None` while another process holds the lock.
    pub fn try_acquire(root: &Root) -> Result<Option<Self>, LockError> {
        let fs_err = |what| {
            move |source| FsError {
                path: LOCK_FILE.to_string(),
                what,
                source,
            }
        };
        // A host always has /run; a test root may not.
        root.create_dirs(crate::fsio::parent(LOCK_FILE).as_str())?;
        let path = root.resolve(LOCK_FILE)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(fs_err("opening the node lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(fs_err("locking")(e).into()),
        }
        // The holder unlinks the file before it lets go: a lock won on an inode
        // that is no longer at the path excludes nobody, so try again.
        let held = file.metadata().map_err(fs_err("reading the node lock"))?;
        match fs::metadata(&path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => {
                Ok(Some(NodeLock { _file: file, path }))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(fs_err("reading the node lock")(e).into()),
        }
    }
}

/// Unlinks the file before the lock is released (the file closes after
/// this body): the lock file exists only while held, so no command leaves
/// anything behind on the node. A process killed with SIGKILL leaves it,
/// unlocked, and the next one takes it over.
impl Drop for NodeLock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(lock = LOCK_FILE, "removing the node lock: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::new(tmp.path());
        (tmp, root)
    }

    #[test]
    fn a_second_holder_waits_then_names_the_lock() {
        let (_tmp, root) = root();
        let first = NodeLock::acquire(&root, Duration::ZERO, || {}).unwrap();
        let mut waited = false;
        let err = NodeLock::acquire(&root, Duration::from_millis(250), || waited = true)
            .unwrap_err()
            .to_string();
        assert!(waited);
        assert!(err.contains(LOCK_FILE), "{err}");
        assert!(err.contains("--wait-for-agent"), "{err}");
        drop(first);
        NodeLock::acquire(&root, Duration::ZERO, || {}).unwrap();
    }

    #[test]
    fn a_waiter_gets_the_lock_once_the_holder_lets_go() {
        let (_tmp, root) = root();
        let first = NodeLock::acquire(&root, Duration::ZERO, || {}).unwrap();
        let r = root.clone();
        let waiter =
            std::thread::spawn(move || NodeLock::acquire(&r, Duration::from_secs(30), || {}));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the waiter must wait while held");
        drop(first);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn releasing_removes_the_file_and_never_lets_two_hold_it() {
        let (_tmp, root) = root();
        let first = NodeLock::acquire(&root, Duration::ZERO, || {}).unwrap();
        // Opened the old inode before it was unlinked, as a waiter would.
        let stale = File::open(root.resolve(LOCK_FILE).unwrap()).unwrap();
        drop(first);
        assert!(!root.exists(LOCK_FILE));
        let second = NodeLock::acquire(&root, Duration::ZERO, || {}).unwrap();
        // The old inode is free, yet the lock at the path is held.
        stale.try_lock().unwrap();
        assert!(NodeLock::acquire(&root, Duration::ZERO, || {}).is_err());
        drop(second);
    }
}
