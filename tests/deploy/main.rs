//! Deploying carpulse as a service, tested through its real parts: the store files and their
//! modes, the real binary run as other accounts, the simulator over loopback, backups and
//! restores, retention over a synthetic year, and the unit, package and README agreeing.
//!
//! One test binary (one link) with a module per concern:
//! - `reader`: the daemon runs as one account; a second, unprivileged account in its group
//!   reads the history with sqlite3 while it writes (and after it stopped), cannot read the
//!   token store, and no token the simulator issued is in the history or its WAL.
//! - `backup`: `carpulse backup` of a store the daemon is writing is checked and holds every
//!   row committed before it began; restored, the daemon runs on it with its connections.
//! - `exit_codes`: a port in use exits 69 and an unusable store 73, naming the address or the
//!   file; under journald every line carries its priority.
//! - `migration`: a schema 2 store with tokens migrates (snapshot first; `--dry-run` says what
//!   would change): history kept, tokens moved, not a token byte left in the history.
//! - `retention`: a year of four vehicles stays under 2 MB each; rollup views agree with raw
//!   readings before and after pruning.
//! - `files`: the unit, sysusers, tmpfiles, package assets, config and README agree.

#[path = "../common/mod.rs"]
mod common;

mod backup;
mod exit_codes;
mod files;
mod migration;
mod reader;
mod retention;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// Whether this process runs as root (tests that switch accounts need it).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Every access and refresh token the simulator at `base` issued.
pub async fn issued_tokens(http: &reqwest::Client, base: &str) -> Vec<String> {
    let v = common::get_json(http, &format!("{base}/_simulator/tokens")).await;
    ["access", "refresh", "app"]
        .iter()
        .flat_map(|k| v[k].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect()
}

/// The first of `tokens` found in the file at `path` (a missing file holds none).
pub fn token_in(path: &Path, tokens: &[String]) -> Option<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    tokens
        .iter()
        .find(|t| !t.is_empty() && bytes.windows(t.len()).any(|w| w == t.as_bytes()))
        .cloned()
}

/// The history file and its WAL and shared-memory files.
pub fn history_files(db: &Path) -> Vec<std::path::PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| std::path::PathBuf::from(format!("{}{s}", db.display())))
        .collect()
}

/// Waits for `cond` up to `within`, checking every 200 ms; panics with `what` after.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The process's stderr once it holds `needle` (its lines are read by a task that may still be
/// catching up after the process exited), or what it holds after 10 s.
pub async fn stderr_with(p: &common::Proc, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = p.stderr();
        if text.contains(needle) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything the process wrote on stdout, once its reader saw the end of it (after `wait`).
pub async fn stdout_of(p: &mut common::Proc) -> String {
    let mut out = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(10), p.stdout.recv()).await {
        out.push(l);
    }
    out.join("\n")
}

/// One integer from the history at `db` (read-only, as any reader).
pub fn db_i64(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}
