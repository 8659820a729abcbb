//! Schema migrations: an append-only list of SQL files, versioned through `PRAGMA user_version`.
//!
//! Users query the store directly (DESIGN §3), so its schema only ever moves forward: migration
//! N brings `user_version` from N-1 to N inside one transaction, so a crash leaves the store at
//! a version it fully has. A store whose `user_version` is newer than this build knows was
//! written by a newer carpulse; it is refused before anything touches it. The store snapshots
//! itself before migrating (see `super::open_connection`), which is the way back.

use anyhow::{bail, Context};
use rusqlite::{Connection, TransactionBehavior};

/// The migrations in order; the store's `user_version` is how many of them it has.
/// Append only: never edit or reorder a released entry.
pub const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_blocks_and_calls.sql"),
    include_str!("migrations/0003_history_without_tokens.sql"),
    include_str!("migrations/0004_polls_beside_their_readings.sql"),
    include_str!("migrations/0005_poll_outcomes_per_day.sql"),
    include_str!("migrations/0006_poll_outcome_days_packed.sql"),
];

/// The first schema whose history holds no token (they live in the token store).
pub const FIRST_WITHOUT_TOKENS: i64 = 3;

/// What migration `version` does, from the first line of its SQL (`-- carpulse schema N: ...`).
pub fn describe(version: i64) -> &'static str {
    let Some(sql) = usize::try_from(version - 1)
        .ok()
        .and_then(|i| MIGRATIONS.get(i))
    else {
        return "";
    };
    let first = sql.lines().next().unwrap_or("");
    let text = first.trim_start_matches("--").trim();
    match text.split_once(": ") {
        Some((_, what)) => what,
        None => text,
    }
}

/// Refuses to drop the token columns while a pair in them is not yet in the token store: the
/// migration must never be the place a connection is lost.
fn check_tokens_moved(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
    if !super::token_store::history_holds_tokens(tx)? {
        return Ok(());
    }
    let held: i64 = tx
        .query_row(
            "SELECT count(*) FROM main.connections WHERE access_token <> '' OR refresh_token <> ''",
            [],
            |r| r.get(0),
        )
        .context("counting the tokens still in the history")?;
    if held == 0 {
        return Ok(());
    }
    if !super::token_store::attached(tx) {
        bail!("{held} connection(s) hold tokens in the history and no token store is attached: not migrating");
    }
    let missing: i64 = tx
        .query_row(
            "SELECT count(*) FROM main.connections c
             WHERE (c.access_token <> '' OR c.refresh_token <> '')
               AND NOT EXISTS (SELECT 1 FROM tokens.connection_tokens t WHERE t.connection_id = c.id)",
            [],
            |r| r.get(0),
        )
        .context("checking that every token is in the token store")?;
    if missing > 0 {
        bail!("{missing} connection(s) hold tokens that are not in the token store yet: not migrating");
    }
    Ok(())
}

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
        if target == FIRST_WITHOUT_TOKENS {
            check_tokens_moved(&tx)?;
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
            "battery_daily",
            "battery_history",
            "battery_hourly",
            "battery_rollup_hourly",
            "blocked_endpoints",
            "charge_history",
            "charge_session_log",
            "charge_sessions",
            "connections",
            "odometer_daily",
            "odometer_history",
            "odometer_rollup_daily",
            "poll_endpoints",
            "poll_events",
            "poll_outcome_shapes",
            "poll_log",
            "poll_outcomes_daily",
            "poll_rollup_daily",
            "poll_rollup_days",
            "readings",
            "retention_cutoffs",
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
            "battery_hourly",
            "battery_daily",
            "odometer_daily",
            "charge_sessions",
            "poll_outcomes_daily",
        ] {
            let n: i64 = c
                .query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn the_history_holds_no_token_column() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let columns: Vec<String> = c
            .prepare("SELECT name FROM pragma_table_info('connections')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!columns.iter().any(|c| c.contains("token")), "{columns:?}");
        assert!(columns.iter().any(|c| c == "refresh_expires_at"));
    }

    #[test]
    fn tokens_in_an_old_history_block_the_migration_until_they_are_moved() {
        let mut c = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 2).unwrap();
        c.execute_batch(
            "INSERT INTO connections VALUES (1, 'u', 'active', 'acc-1', 'ref-1', 5, 6, 0, 0)",
        )
        .unwrap();
        let err = migrate(&mut c).unwrap_err();
        assert!(format!("{err:#}").contains("not migrating"), "{err:#}");
        assert_eq!(current_version(&c).unwrap(), 2);
        super::super::token_store::attach(&c, std::path::Path::new(":memory:")).unwrap();
        assert_eq!(
            super::super::token_store::import_from_history(&mut c).unwrap(),
            1
        );
        assert_eq!(migrate(&mut c).unwrap(), latest_version());
        let moved: String = c
            .query_row(
                "SELECT refresh_token FROM tokens.connection_tokens WHERE connection_id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(moved, "ref-1");
        assert_eq!(
            describe(3),
            "a history a Grafana account may read, shaped to last for years."
        );
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
