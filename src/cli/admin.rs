//! The operator's commands that copy, migrate or delete: `carpulse backup`, `carpulse
//! migrate [--dry-run]` and `carpulse vehicles remove [--purge]`.
//!
//! They are apart from the read commands (`report`, `history`) because each can lose or
//! expose data when done carelessly, and each says plainly what it did: a backup is checked
//! and its counts printed; a migration first says what it would change; a purge asks, on a
//! terminal, with the number of rows it would delete (scripts pass `--yes`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::domain::VehicleId;
use crate::store::{backup, migrate, queries, token_store, Store};

/// `carpulse backup DEST`: an online, consistent, checked copy of the history at `store`.
pub async fn backup(store: &Path, dest: &Path) -> anyhow::Result<()> {
    let (store_path, dest_path) = (store.to_path_buf(), dest.to_path_buf());
    let report = tokio::task::spawn_blocking(move || backup::backup(&store_path, &dest_path))
        .await
        .context("the backup task failed")??;
    println!(
        "backed up {} to {} ({:.1} MB, schema {})",
        store.display(),
        report.path.display(),
        report.bytes as f64 / 1e6,
        report.schema_version
    );
    println!("  PRAGMA integrity_check: ok");
    let counts: Vec<String> = report
        .counts
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    println!(
        "  rows (as committed when the backup began, equal in the copy): {}",
        counts.join(", ")
    );
    println!(
        "  no token is in it (they live in {}): restored on this machine, the daemon goes on with them; \
         restored elsewhere, API Authentication needs nothing and each per-user connection needs `carpulse reauth VEHICLE`",
        token_store::path_for(store).display()
    );
    Ok(())
}

/// `carpulse migrate [--dry-run]`: says what a migration of the store would change, or does it
/// (snapshot first, as the daemon would at start).
pub async fn migrate(store: &Path, dry_run: bool) -> anyhow::Result<()> {
    let (from, pairs) = {
        let c = backup::open_source(store)?;
        migrate::refuse_newer(&c)?;
        (
            migrate::current_version(&c)?,
            token_store::pairs_in_history(&c)?,
        )
    };
    let latest = migrate::latest_version();
    println!(
        "store {}: schema version {from}; this carpulse writes version {latest}",
        store.display()
    );
    if from >= latest {
        println!("nothing to migrate");
        return Ok(());
    }
    for version in from + 1..=latest {
        println!("  {version}: {}", migrate::describe(version));
    }
    let snapshot = format!("{}.before-schema-{latest}.<UTC time>", store.display());
    if from > 0 {
        println!("  first, a snapshot of the store: {snapshot} (mode 0600; the way back)");
    }
    if pairs > 0 {
        println!(
            "  the OAuth tokens of {pairs} connection(s) move to {} (mode 0600)",
            token_store::path_for(store).display()
        );
    }
    if from > 0 && from < migrate::FIRST_WITHOUT_TOKENS {
        println!(
            "  then the history is VACUUMed (no page keeps a token) and made readable by carpulse's group (0640)"
        );
    }
    if dry_run {
        println!("dry run: nothing was changed");
        return Ok(());
    }
    let path = store.to_path_buf();
    let opened = Store::open(&path, None)?;
    opened.close().await?;
    println!("migrated to schema version {latest}");
    Ok(())
}

/// Asks `question` on the terminal; true on `y`/`yes`.
fn confirm(question: &str) -> anyhow::Result<bool> {
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// `carpulse vehicles remove ID [--purge] [--yes]`. Without `--purge` the vehicle is no longer
/// polled and its history stays (as `vehicles disable`; undone by `vehicles enable`). With it,
/// the vehicle and all its history are deleted, after a question on a terminal; without a
/// terminal, only with `--yes`.
pub async fn vehicles_remove(store: &Path, id: &str, purge: bool, yes: bool) -> anyhow::Result<()> {
    crate::cli::report::open_read_only(store)?; // never create a store to remove from it
    let vid = VehicleId(id.to_string());
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if !purge {
        if !yes
            && interactive
            && !confirm(&format!(
                "Stop polling vehicle {id}? Its history stays (undo: carpulse vehicles enable {id})."
            ))?
        {
            bail!("nothing changed");
        }
        let opened = Store::open(store, None)?;
        let v = vid.clone();
        let found = opened
            .call(move |c| queries::set_vehicle_enabled(c, &v, false))
            .await;
        opened.close().await?;
        if !found? {
            bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
        }
        println!(
            "vehicle {id} removed from polling; its history stays (undo: carpulse vehicles enable {id}; \
             delete it for good: carpulse vehicles remove {id} --purge). A running daemon picks this up \
             within a minute (or now: systemctl reload carpulse)"
        );
        return Ok(());
    }
    let counts = {
        let c = crate::cli::report::open_read_only(store)?;
        queries::require_current_schema(&c)?;
        queries::history_counts(&c, &vid)?
    };
    let Some(n) = counts else {
        bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
    };
    let what = format!(
        "{} battery, {} charge and {} odometer readings, {} poll events and {} summarised hours, days and sessions",
        n.battery, n.charge, n.odometer, n.poll_events, n.rollups
    );
    if !yes {
        if !interactive {
            bail!(
                "refusing to delete vehicle {id} and its history ({what}) without a terminal to ask on: \
                 pass --yes (a backup first: carpulse backup FILE)"
            );
        }
        if !confirm(&format!(
            "Delete vehicle {id} and its whole history ({what})? This cannot be undone; `carpulse backup FILE` first keeps a copy."
        ))? {
            bail!("nothing deleted");
        }
    }
    let opened = Store::open(store, None)?;
    let removed = opened.call(move |c| queries::remove_vehicle(c, &vid)).await;
    opened.close().await?;
    if !removed? {
        bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
    }
    println!("deleted vehicle {id} and its history ({what})");
    Ok(())
}
