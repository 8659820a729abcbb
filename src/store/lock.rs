//! One daemon per store: `carpulse run` holds an exclusive `flock` on `<store>.lock` beside
//! the history for as long as it runs, and writes its pid there.
//!
//! Why a lock file with `flock` and not SQLite's own locking: SQLite's locks are what the
//! readers (Grafana, a user's `sqlite3`, `carpulse status`) share with the daemon, and an
//! exclusive SQLite lock held for the daemon's lifetime would lock them out (and WAL readers
//! never take one a writer could see). `flock` locks are separate from SQLite's POSIX record
//! locks on Linux, live on a file no reader opens, are released by the kernel when the process
//! dies in any way (`kill -9`, OOM: no stale lock), and let the second daemon read the first
//! one's pid from the file it could not lock. Commands other than `run` (`connect`, `vehicles`,
//! `backup`...) do not take it: they are meant to run beside the daemon.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where the daemon lock of the history at `history` lives (`carpulse.db` → `carpulse.db.lock`).
pub fn path_for(history: &Path) -> PathBuf {
    let mut name = history
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "carpulse.db".into());
    name.push(".lock");
    history.with_file_name(name)
}

/// Another daemon holds the store: exit code [`crate::exit::EX_TEMPFAIL`] (it may be gone by
/// the next try, and systemd may retry).
#[derive(Debug, thiserror::Error)]
#[error("another `carpulse run` ({}) is using the store {}; stop it first (its lock is {})", pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into()), store.display(), lock.display())]
pub struct AlreadyRunning {
    pub pid: Option<u32>,
    pub store: PathBuf,
    pub lock: PathBuf,
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
    path: PathBuf,
}

impl DaemonLock {
    /// Takes the lock of the store at `history` without waiting, or fails with
    /// [`AlreadyRunning`] naming the holder's pid.
    pub fn acquire(history: &Path) -> anyhow::Result<DaemonLock> {
        let path = path_for(history);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the directory {}", parent.display()))?;
        }
        // 0640 like the history: it holds a pid, nothing secret.
        super::create_private_file(&path, super::HISTORY_MODE)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the daemon lock {}", path.display()))?;
        // SAFETY: a valid open descriptor for the call's duration; flock touches nothing else.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(AlreadyRunning {
                    pid: text.trim().parse().ok(),
                    store: history.to_path_buf(),
                    lock: path,
                }
                .into());
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        let pid = format!("{}\n", std::process::id());
        (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(pid.as_bytes())
        })()
        .with_context(|| format!("writing the pid into {}", path.display()))?;
        Ok(DaemonLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("carpulse.db");
        let first = DaemonLock::acquire(&db).unwrap();
        assert_eq!(first.path(), dir.path().join("carpulse.db.lock"));
        // flock locks belong to the open file description: a second open is refused even in
        // the same process.
        let err = DaemonLock::acquire(&db).unwrap_err();
        let running = err
            .downcast_ref::<AlreadyRunning>()
            .expect("AlreadyRunning");
        assert_eq!(running.pid, Some(std::process::id()));
        assert!(format!("{err}").contains(&format!("pid {}", std::process::id())));
        drop(first);
        DaemonLock::acquire(&db).unwrap();
    }
}
