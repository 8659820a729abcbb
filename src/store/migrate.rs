//! Schema migrations: an append-only list of SQL files, versioned through `PRAGMA user_version`.
//!
//! Users query the store directly (DESIGN §3), so its schema only ever moves forward: migration
//! N brings `user_version` from N-1 to N inside one transaction, so a crash leaves the store at
//! a version it fully has. A store whose `user_version` is newer than this build knows was
//! written by a newer carpulse; it is refused before anything touches it.

use anyhow::{bail, Context};
use rusqlite::{Connection, TransactionBehavior};

/// The migrations in order; the store's `user_version` is how many of them it has.
/// Append only: never edit or reorder a released entry.
pub const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_blocks_and_calls.sql"),
];

/// The schema version this build writes.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// The store's `PRAGMA user_version`.
pub fn current_version(c: &Connection) -> anyhow::Result<i64> {
    c.pragma_query_value(None, "user_version", |r| r.get(0))
        .context("reading the store's schema version (PRAGMA user_version)")
}

/// Fails, without touching the store, if it was written by a newer carpulse.
/// Called before any pragma that could rewrite the file header (e.g. `journal_mode=WAL`).
pub fn refuse_newer(c: &Connection) -> anyhow::Result<()> {
    let version = current_version(c)?;
    if version > latest_version() {
        bail!(
            "the store has schema version {version} but this carpulse only knows versions up to {}: \
             it was written by a newer carpulse; refusing to open it (it was not modified)",
            latest_version()
        );
    }
    if version < 0 {
        bail!("the store has an invalid schema version {version}; refusing to open it");
    }
    Ok(())
}

/// Applies every migration the store lacks, each in its own IMMEDIATE transaction. The version
/// is re-read inside the transaction so two processes opening the same store can't both apply
/// one migration. Returns the version the store ends at.
pub fn migrate(c: &mut Connection) -> anyhow::Result<i64> {
    refuse_newer(c)?;
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let target = index as i64 + 1;
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .with_context(|| format!("starting the transaction of migration {target}"))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .context("reading the schema version inside the migration transaction")?;
        if version >= target {
            continue; // already applied; the transaction rolls back on drop, having changed nothing
        }
        tx.execute_batch(sql)
            .with_context(|| format!("applying schema migration {target}"))?;
        tx.pragma_update(None, "user_version", target)
            .with_context(|| format!("recording schema version {target}"))?;
        tx.commit()
            .with_context(|| format!("committing schema migration {target}"))?;
        tracing::info!(version = target, "applied store schema migration");
    }
    current_version(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_on_an_empty_store_and_are_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "foreign_keys", true).unwrap();
        assert_eq!(current_version(&c).unwrap(), 0);
        assert_eq!(migrate(&mut c).unwrap(), latest_version());
        // A second run changes nothing and keeps the version.
        assert_eq!(migrate(&mut c).unwrap(), latest_version());
        let mut names: Vec<String> = c
            .prepare("SELECT name FROM sqlite_schema WHERE type IN ('table','view') ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        names.sort();
        for expected in [
            "battery_history",
            "battery_readings",
            "charge_history",
            "charge_readings",
            "connections",
            "odometer_history",
            "odometer_readings",
            "poll_event_log",
            "poll_events",
            "store_state",
            "vehicles",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "missing {expected}: {names:?}"
            );
        }
        // The schema is internally consistent (views reference real columns).
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        for view in [
            "battery_history",
            "charge_history",
            "odometer_history",
            "poll_events",
        ] {
            let n: i64 = c
                .query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn a_newer_schema_version_is_refused_and_left_alone() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", latest_version() + 1)
            .unwrap();
        let err = migrate(&mut c).unwrap_err();
        assert!(format!("{err:#}").contains("newer carpulse"), "{err:#}");
        assert_eq!(current_version(&c).unwrap(), latest_version() + 1);
        let tables: i64 = c
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0);
    }
}
