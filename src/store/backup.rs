//! Online, consistent copies of the history: `carpulse backup DEST`, the daemon's scheduled
//! backups (`[backup]`), and the snapshot a store takes of itself before a schema migration.
//!
//! Why SQLite's backup API inside a read transaction: `cp` of a WAL database can copy the main
//! file and the WAL at different moments (a torn copy), while a read transaction is one
//! snapshot. The rows are counted in that same transaction and the pages copied from it in one
//! step, so the copy holds exactly what was committed when the backup began, and its counts
//! are checked against the source's. The source is a connection of its own (read-only), so a
//! backup never waits for, or blocks, the daemon's writer: WAL readers and the writer do not
//! block each other.
//!
//! A copy is written to a temporary file beside its destination, checked (`PRAGMA
//! integrity_check`, row counts), switched to a rollback journal (one self-contained file that
//! `cp` may copy safely), synced, and only then renamed into place. Tokens are never in it:
//! they live in the token store, which is not backed up (see the README's "Backups").

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

/// The tables a backup's row counts are checked on.
pub const COUNTED: &[&str] = &[
    "connections",
    "vehicles",
    "readings",
    "reading_lags",
    "poll_log",
    "vehicle_blocks",
    "battery_rollup_hourly",
    "odometer_rollup_daily",
    "charge_session_log",
    "poll_rollup_daily",
    "poll_rollup_days",
    "poll_outcome_shapes",
];

/// What a backup copied and found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub path: PathBuf,
    pub bytes: u64,
    /// Rows per table in the source when the backup began, equal to the copy's.
    pub counts: Vec<(String, i64)>,
    pub schema_version: i64,
}

/// Opens the history at `path` read-only (no token store, no migration): a backup reads the
/// history as any reader in carpulse's group may.
pub fn open_source(path: &Path) -> anyhow::Result<Connection> {
    if !path.exists() {
        bail!("no store at {} (store.path)", path.display());
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(c)
}

fn counts(c: &Connection, tables: &[&str]) -> anyhow::Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for t in tables {
        let exists: i64 = c.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [t],
            |r| r.get(0),
        )?;
        if exists == 0 {
            continue; // an older schema: checked on the tables it has
        }
        let n: i64 = c
            .query_row(&format!("SELECT count(*) FROM main.\"{t}\""), [], |r| {
                r.get(0)
            })
            .with_context(|| format!("counting the rows of {t}"))?;
        out.push(((*t).to_owned(), n));
    }
    Ok(out)
}

/// `dest` plus a suffix, for the file a copy is written to before it is checked.
fn partial(dest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial-{}", dest.display(), std::process::id()))
}

/// Copies the `main` schema of `src` to `dest` (which must not exist) in one read transaction,
/// checks the copy and renames it into place with `mode`. `tables` are counted.
fn copy_checked(
    src: &Connection,
    dest: &Path,
    mode: u32,
    tables: &[&str],
) -> anyhow::Result<Report> {
    if dest.exists() {
        bail!(
            "{} exists already; a backup never overwrites a file",
            dest.display()
        );
    }
    let tmp = partial(dest);
    let result = (|| {
        super::create_private_file(&tmp, mode)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // One read transaction: the counts and every page copied are the same snapshot.
        src.execute_batch("BEGIN")
            .context("starting the backup's read transaction")?;
        let copied = (|| {
            let schema_version = super::migrate::current_version(src)?;
            let counts = counts(src, tables)?;
            let mut out =
                Connection::open(&tmp).with_context(|| format!("opening {}", tmp.display()))?;
            {
                let backup = rusqlite::backup::Backup::new_with_names(
                    src,
                    rusqlite::MAIN_DB,
                    &mut out,
                    rusqlite::MAIN_DB,
                )
                .context("starting SQLite's backup")?;
                // All pages in one step: inside the open read transaction, never restarted.
                backup
                    .step(-1)
                    .context("copying the pages (SQLite backup)")?;
            }
            anyhow::Ok((out, counts, schema_version))
        })();
        let end = src.execute_batch("COMMIT");
        let (out, counts, schema_version) = copied?;
        end.context("ending the backup's read transaction")?;
        verify(&out, &counts).with_context(|| format!("checking the copy {}", tmp.display()))?;
        // One self-contained file: a rollback journal instead of WAL (the header says which).
        let journal: String = out
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .context("switching the copy to a rollback journal")?;
        if !journal.eq_ignore_ascii_case("delete") {
            bail!("the copy kept journal_mode {journal}");
        }
        out.close()
            .map_err(|(_, e)| e)
            .context("closing the copy")?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        Ok(Report {
            path: dest.to_path_buf(),
            bytes,
            counts,
            schema_version,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        for suffix in ["-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
        }
    }
    result
}

/// `PRAGMA integrity_check` says `ok`, and every counted table holds what the source held.
fn verify(copy: &Connection, expected: &[(String, i64)]) -> anyhow::Result<()> {
    let mut stmt = copy.prepare("PRAGMA integrity_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .context("running PRAGMA integrity_check on the copy")?;
    if problems != ["ok"] {
        bail!(
            "PRAGMA integrity_check failed on the copy: {}",
            problems.join("; ")
        );
    }
    let tables: Vec<&str> = expected.iter().map(|(t, _)| t.as_str()).collect();
    let got = counts(copy, &tables)?;
    if got != expected {
        bail!("the copy's row counts {got:?} differ from the source's {expected:?}");
    }
    Ok(())
}

/// `carpulse backup DEST` and the scheduled backups: a checked copy of the history at
/// `source`, mode 0640 (it holds no token; carpulse's group may read it as it reads the store).
pub fn backup(source: &Path, dest: &Path) -> anyhow::Result<Report> {
    let src = open_source(source)?;
    super::migrate::refuse_newer(&src)?;
    copy_checked(&src, dest, super::HISTORY_MODE, COUNTED)
}

/// The snapshot an existing store takes of itself before a migration:
/// `<store>.before-schema-<to>.<UTC time>`, mode 0600 (a schema 1 or 2 history still holds
/// tokens). Restoring it with the carpulse that wrote it is the way back.
pub fn snapshot_before_migration(
    conn: &Connection,
    store: &Path,
    from: i64,
) -> anyhow::Result<PathBuf> {
    let to = super::migrate::latest_version();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let dest = PathBuf::from(format!("{}.before-schema-{to}.{stamp}", store.display()));
    let report = copy_checked(conn, &dest, 0o600, COUNTED)?;
    debug_assert_eq!(report.schema_version, from);
    Ok(report.path)
}

/// Scheduled backups are named `carpulse-<UTC time>.db` in `backup.dir`; this says whether a
/// file name is one (only those are ever deleted by `backup.keep`).
pub fn is_scheduled_name(name: &str) -> bool {
    name.strip_prefix("carpulse-")
        .and_then(|r| r.strip_suffix(".db"))
        .is_some_and(|stamp| {
            stamp.len() == 16
                && stamp.as_bytes()[8] == b'T'
                && stamp.ends_with('Z')
                && stamp[..8].bytes().all(|b| b.is_ascii_digit())
                && stamp[9..15].bytes().all(|b| b.is_ascii_digit())
        })
}

/// The name of a scheduled backup taken at `now`.
pub fn scheduled_name(now: chrono::DateTime<chrono::Utc>) -> String {
    format!("carpulse-{}.db", now.format("%Y%m%dT%H%M%SZ"))
}

/// Deletes the oldest scheduled backups in `dir` beyond the `keep` newest; returns the deleted.
pub fn prune_scheduled(dir: &Path, keep: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_scheduled_name(n))
        .collect();
    // The names sort by time.
    names.sort();
    let excess = names.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for name in names.into_iter().take(excess) {
        let path = dir.join(name);
        std::fs::remove_file(&path).with_context(|| format!("deleting {}", path.display()))?;
        deleted.push(path);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_names_sort_by_time_and_nothing_else_matches() {
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let name = scheduled_name(at);
        assert_eq!(name, "carpulse-20260921T141320Z.db");
        assert!(is_scheduled_name(&name));
        for other in [
            "carpulse.db",
            "carpulse-latest.db",
            "carpulse-20260921T141320Z.db.partial-12",
            "carpulse-2026092XT141320Z.db",
            "mine-20260921T141320Z.db",
        ] {
            assert!(!is_scheduled_name(other), "{other}");
        }
    }

    #[test]
    fn keep_deletes_only_the_oldest_scheduled_backups() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "carpulse-20260101T000000Z.db",
            "carpulse-20260102T000000Z.db",
            "carpulse-20260103T000000Z.db",
            "my-own-copy.db",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let deleted = prune_scheduled(dir.path(), 2).unwrap();
        assert_eq!(
            deleted,
            vec![dir.path().join("carpulse-20260101T000000Z.db")]
        );
        assert!(dir.path().join("my-own-copy.db").exists());
        assert!(dir.path().join("carpulse-20260103T000000Z.db").exists());
    }
}
