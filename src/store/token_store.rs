//! The token store: the OAuth pairs of per-user connections, in a SQLite file of their own
//! (`<store>.tokens.db` beside the history, mode 0600), attached to the owner's connection as
//! schema `tokens`.
//!
//! Why a file apart and not encryption inside the history: the history is what Grafana and
//! the operator's `sqlite3` open (mode 0640, group `carpulse`), and a token must never be in a
//! file those readers open, not even encrypted (a key next to the data protects nothing, and
//! a key from a credential would make every CLI command need it). File permissions are what
//! systemd, backups and operators already understand: the history is readable by the group,
//! this file only by carpulse. A restored history backup also leaves this file alone, so
//! restoring never brings back refresh tokens that rotation has already invalidated.
//!
//! The file is always `synchronous=FULL` (it is written only when a pair rotates or an account
//! connects): a rotated refresh token is durably committed before it is used (DESIGN §2.1).
//! Rows carry the Smartcar user id too, so a pair is only ever matched to the connection it
//! was issued for, even if a restored history reuses a connection id.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rusqlite::{Connection, TransactionBehavior};

/// The schema name the token store is attached under.
pub const SCHEMA: &str = "tokens";

/// The token store's own schema version (`PRAGMA tokens.user_version`).
const TOKEN_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tokens.connection_tokens (
    connection_id      INTEGER PRIMARY KEY,
    user_id            TEXT    NOT NULL,
    access_token       TEXT    NOT NULL,
    refresh_token      TEXT    NOT NULL,
    access_expires_at  INTEGER NOT NULL,
    refresh_expires_at INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);";

/// Where the token store of the history at `history` lives: beside it, named after it
/// (`carpulse.db` → `carpulse.tokens.db`).
pub fn path_for(history: &Path) -> PathBuf {
    let stem = history
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "carpulse".into());
    let ext = history
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    history.with_file_name(format!("{stem}.tokens.{ext}"))
}

/// Attaches the token store at `path` (creating it 0600 if needed; `:memory:` for tests) as
/// schema `tokens`, WAL with `synchronous=FULL`, and creates its table.
pub fn attach(c: &Connection, path: &Path) -> anyhow::Result<()> {
    if path != Path::new(":memory:") {
        super::create_private_file(path, 0o600)
            .with_context(|| format!("creating the token store {}", path.display()))?;
        // Tokens: never readable by anyone but carpulse, whatever made the file looser.
        super::tighten_modes(path, 0o600)?;
    }
    let name = path
        .to_str()
        .with_context(|| format!("the token store path {} is not UTF-8", path.display()))?;
    c.execute("ATTACH DATABASE ?1 AS tokens", [name])
        .with_context(|| format!("opening the token store {}", path.display()))?;
    let mode: String = c
        .pragma_update_and_check(Some(SCHEMA), "journal_mode", "WAL", |r| r.get(0))
        .context("setting the token store's journal_mode=WAL")?;
    if !mode.eq_ignore_ascii_case("wal") && path != Path::new(":memory:") {
        bail!("the token store could not be switched to WAL (journal_mode is {mode})");
    }
    c.pragma_update(Some(SCHEMA), "synchronous", "FULL")
        .context("setting the token store's synchronous=FULL")?;
    c.execute_batch(TOKEN_SCHEMA)
        .context("creating the token store's table")?;
    Ok(())
}

/// Whether `c` has the token store attached (the daemon's and the CLI's read-write stores do;
/// a read-only reader of the history does not).
pub fn attached(c: &Connection) -> bool {
    c.query_row(
        "SELECT count(*) FROM pragma_database_list WHERE name = 'tokens'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .unwrap_or(false)
}

/// Whether the history's `connections` still has the token columns of schema 1 and 2.
pub fn history_holds_tokens(c: &Connection) -> anyhow::Result<bool> {
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM pragma_table_info('connections', 'main')
             WHERE name IN ('access_token', 'refresh_token')",
            [],
            |r| r.get(0),
        )
        .context("inspecting the connections table")?;
    Ok(n == 2)
}

/// Copies the pairs a schema 1 or 2 history holds into the token store, in their own
/// committed `synchronous=FULL` transaction, before the migration that drops them from the
/// history runs. A pair already in the token store wins (it is the newer one: a crash between
/// this copy and the migration leaves both). Returns how many pairs were copied.
pub fn import_from_history(c: &mut Connection) -> anyhow::Result<usize> {
    if !history_holds_tokens(c)? {
        return Ok(0);
    }
    if !attached(c) {
        bail!("the token store is not attached: refusing to migrate tokens out of the history");
    }
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("moving tokens to the token store: starting the transaction")?;
    let n = tx
        .execute(
            "INSERT OR IGNORE INTO tokens.connection_tokens
                 (connection_id, user_id, access_token, refresh_token, access_expires_at,
                  refresh_expires_at, updated_at)
             SELECT id, user_id, access_token, refresh_token, access_expires_at,
                    refresh_expires_at, updated_at
             FROM main.connections
             WHERE access_token <> '' OR refresh_token <> ''",
            [],
        )
        .context("moving tokens to the token store")?;
    tx.commit()
        .context("moving tokens to the token store: committing")?;
    Ok(n)
}

/// How many connections hold a pair in the history (for `carpulse migrate --dry-run`).
pub fn pairs_in_history(c: &Connection) -> anyhow::Result<i64> {
    if !history_holds_tokens(c)? {
        return Ok(0);
    }
    c.query_row(
        "SELECT count(*) FROM main.connections WHERE access_token <> '' OR refresh_token <> ''",
        [],
        |r| r.get(0),
    )
    .context("counting the tokens in the history")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_store_is_named_after_the_history() {
        assert_eq!(
            path_for(Path::new("/var/lib/carpulse/carpulse.db")),
            Path::new("/var/lib/carpulse/carpulse.tokens.db")
        );
        assert_eq!(
            path_for(Path::new("demo.sqlite3")),
            Path::new("demo.tokens.sqlite3")
        );
        assert_eq!(
            path_for(Path::new("/x/history")),
            Path::new("/x/history.tokens.db")
        );
    }
}
