//! Append-only schema migrations keyed by `PRAGMA user_version`. Each runs in its own
//! transaction on open; a store written by a newer carpulse is refused, never altered.

use anyhow::{bail, Context};
use rusqlite::Connection;

/// Migration N (1-based) brings the schema to version N. Never edit one that has shipped:
/// append a new one.
pub const MIGRATIONS: &[&str] = &[include_str!("migrations/0001_initial.sql")];

/// The schema version this build writes.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

pub fn current(c: &Connection) -> anyhow::Result<i64> {
    Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Brings the store to [`latest`]; returns the version it found.
pub fn migrate(c: &mut Connection) -> anyhow::Result<i64> {
    let found = current(c)?;
    if found > latest() {
        bail!(
            "the store has schema version {found}, written by a newer carpulse (this one knows up to {}); \
             refusing to touch it: upgrade carpulse or point store.path elsewhere",
            latest()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let tx = c.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("applying schema migration {version}"))?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_store_is_brought_to_the_latest_version() {
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut c).unwrap(), 0);
        assert_eq!(current(&c).unwrap(), latest());
        for view in [
            "battery_history",
            "charge_history",
            "odometer_history",
            "poll_events",
        ] {
            let n: i64 = c
                .query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "{view}");
        }
        // Migrating again is a no-op.
        assert_eq!(migrate(&mut c).unwrap(), latest());
    }

    #[test]
    fn every_migration_applies_in_order_on_its_predecessor() {
        let c = Connection::open_in_memory().unwrap();
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            c.execute_batch(sql)
                .unwrap_or_else(|e| panic!("migration {}: {e}", i + 1));
        }
        let tables: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'view'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 4);
    }

    #[test]
    fn a_newer_store_is_refused_and_left_alone() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", latest() + 1).unwrap();
        let e = migrate(&mut c).unwrap_err().to_string();
        assert!(e.contains("newer carpulse"), "{e}");
        assert_eq!(current(&c).unwrap(), latest() + 1);
        let objects: i64 = c
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(objects, 0);
    }
}
