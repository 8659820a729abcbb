//! The daemon's housekeeping of its store: retention (`[retention]`, hourly) and scheduled
//! backups (`[backup]`). One task, started by `app` beside the others and stopped by the same
//! shutdown token.
//!
//! Retention runs as many small steps, each one `Store::call` on the owner thread
//! ([`crate::store::retention`]): the writer's batches queued meanwhile go between two steps,
//! so pruning never holds up a poll. A backup reads the history through a connection of its
//! own on a blocking thread; WAL lets it copy a consistent snapshot while the writer goes on.
//! A failure of either is logged and tried again at the next run; it never stops the daemon.
//!
//! Each retention run starts with the poll rollup's pass ([`crate::store::rollup`]): the
//! closed days' poll outcomes are summarised, a vehicle at a time, and only then may retention
//! let those days' events go (never past the rollup's watermark), so the daily counts
//! outlive the events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BackupConfig, Config};
use crate::store::retention::{self, Policy};
use crate::store::rollup;
use crate::store::Store;

/// The first retention run waits this long after start (the daemon settles first), then runs
/// every [`RETENTION_EVERY`].
const RETENTION_FIRST: Duration = Duration::from_secs(60);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Vehicles probed for work per owner-thread call: an index seek each, so a call stays at a
/// millisecond or two and the writer's batches go between two of them.
const PROBE_CHUNK: usize = 512;

/// Retention and scheduled backups until `shutdown`.
pub async fn run(store: Store, config: Config, shutdown: CancellationToken) {
    let retention = retention_loop(&store, config.retention, &shutdown);
    let backups = backup_loop(&config.store.path, &config.backup, &shutdown);
    tokio::join!(retention, backups);
}

async fn retention_loop(store: &Store, policy: Policy, shutdown: &CancellationToken) {
    let mut wait = RETENTION_FIRST;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = RETENTION_EVERY;
        match retention_once(store, &policy, shutdown).await {
            Ok(s) if s.readings_deleted + s.events_deleted > 0 => info!(
                readings = s.readings_deleted,
                poll_events = s.events_deleted,
                steps = s.steps,
                rollup_steps = s.rollup_steps,
                "retention: pruned what [retention] no longer keeps (readings summarised first)"
            ),
            Ok(s) if s.rollup_steps > 0 => info!(
                rollup_steps = s.rollup_steps,
                "poll outcomes of the closed days summarised (poll_outcomes_daily)"
            ),
            Ok(_) => {}
            Err(e) => warn!(
                error = format!("{e:#}"),
                "retention failed; trying again at the next run"
            ),
        }
    }
}

/// The poll rollup's pass through the owner thread up to the days closed at `now`, a step at
/// a time; stops early on shutdown, leaving the watermark where it was (the next pass redoes
/// the steps, which rewrite their days whole). Returns the steps run and the watermark after.
pub async fn rollup_once(
    store: &Store,
    now: crate::domain::UnixMillis,
    shutdown: &CancellationToken,
) -> anyhow::Result<rollup::Pass> {
    let target = rollup::closed_before(now);
    let from = store.call(|c| rollup::watermark(c)).await?;
    let mut pass = rollup::Pass {
        steps: 0,
        watermark: from,
    };
    if from >= target {
        return Ok(pass);
    }
    let vehicles = vehicle_keys(store).await?;
    for chunk in vehicles.chunks(PROBE_CHUNK) {
        let chunk = chunk.to_vec();
        let due = store
            .call(move |c| rollup::due(c, &chunk, from, target))
            .await?;
        for vehicle in due {
            let mut cursor = from;
            while cursor < target {
                if shutdown.is_cancelled() {
                    return Ok(pass);
                }
                cursor = store
                    .call(move |c| rollup::step(c, vehicle, cursor, target))
                    .await?;
                pass.steps += 1;
            }
        }
    }
    // Vehicles added during the pass have no event before `target`: their first poll came
    // after the pass began, and so after every day it summarises had closed.
    store.call(move |c| rollup::advance(c, target)).await?;
    pass.watermark = target;
    Ok(pass)
}

/// The stored vehicles' integer keys, for the per-vehicle steps of the rollup and retention.
async fn vehicle_keys(store: &Store) -> anyhow::Result<Vec<i64>> {
    Ok(store
        .call(|c| retention::vehicles(c))
        .await?
        .into_iter()
        .map(|(key, _)| key)
        .collect())
}

/// One retention run through the owner thread, a step at a time; stops early on shutdown.
/// The poll rollup's pass runs first, and no poll event goes past its watermark.
pub async fn retention_once(
    store: &Store,
    policy: &Policy,
    shutdown: &CancellationToken,
) -> anyhow::Result<retention::Summary> {
    let now = crate::domain::now_ms();
    let pass = rollup_once(store, now, shutdown).await?;
    let mut summary = retention::Summary {
        rollup_steps: pass.steps,
        ..Default::default()
    };
    let tasks = retention::within_watermark(&retention::plan_for(policy, now), pass.watermark);
    if tasks.is_empty() || shutdown.is_cancelled() {
        return Ok(summary);
    }
    let all = tasks.clone();
    store
        .call(move |c| retention::hide_ok_events(c, &all))
        .await?;
    let vehicles = vehicle_keys(store).await?;
    // Most vehicles have nothing old enough: only those found to have some get steps.
    for chunk in vehicles.chunks(PROBE_CHUNK) {
        if shutdown.is_cancelled() {
            return Ok(summary);
        }
        let (chunk, all) = (chunk.to_vec(), tasks.clone());
        let due = store.call(move |c| retention::due(c, &chunk, &all)).await?;
        for (vehicle, tasks) in due {
            for task in tasks {
                loop {
                    if shutdown.is_cancelled() {
                        return Ok(summary);
                    }
                    let (n, done) = store.call(move |c| task.step(c, vehicle)).await?;
                    summary.steps += 1;
                    match task {
                        retention::Task::Events { .. } => summary.events_deleted += n,
                        retention::Task::Readings { .. } => summary.readings_deleted += n,
                    }
                    if done {
                        break;
                    }
                }
            }
        }
    }
    if summary.readings_deleted + summary.events_deleted > 0 {
        while !shutdown.is_cancelled() && store.call(|c| retention::vacuum_step(c)).await? > 0 {}
    }
    Ok(summary)
}

async fn backup_loop(history: &Path, cfg: &BackupConfig, shutdown: &CancellationToken) {
    let Some(cron) = &cfg.schedule else {
        return;
    };
    let schedule = cron.as_str();
    info!(schedule, dir = %cfg.dir.display(), keep = cfg.keep, "scheduled backups on");
    loop {
        let now = chrono::Utc::now();
        let Some(next) = cron.next_after(&now) else {
            warn!(
                schedule,
                "backup.schedule has no next time; no more scheduled backups"
            );
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let (history, cfg) = (history.to_path_buf(), cfg.clone());
        let job = tokio::task::spawn_blocking(move || backup_once(&history, &cfg));
        let result = tokio::select! {
            // The copy runs on; its partial file is cleaned up by the next scheduled backup.
            _ = shutdown.cancelled() => return,
            r = job => r,
        };
        match result {
            Ok(Ok((report, deleted))) => info!(
                path = %report.path.display(),
                bytes = report.bytes,
                rows = report.counts.iter().map(|(_, n)| n).sum::<i64>(),
                deleted_old = deleted.len(),
                "scheduled backup written and checked (integrity_check ok, row counts equal)"
            ),
            Ok(Err(e)) => warn!(
                error = format!("{e:#}"),
                "scheduled backup failed; trying again at the next scheduled time"
            ),
            Err(e) => warn!(error = %e, "scheduled backup task failed"),
        }
    }
}

/// One scheduled backup into `cfg.dir`, then the oldest beyond `cfg.keep` are deleted.
pub fn backup_once(
    history: &Path,
    cfg: &BackupConfig,
) -> anyhow::Result<(crate::store::backup::Report, Vec<PathBuf>)> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&cfg.dir)
        .with_context(|| format!("creating backup.dir {}", cfg.dir.display()))?;
    // Partial copies an interrupted backup left (a stop in the middle of one).
    if let Ok(entries) = std::fs::read_dir(&cfg.dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("carpulse-") && name.contains(".db.partial-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let dest = cfg
        .dir
        .join(crate::store::backup::scheduled_name(chrono::Utc::now()));
    let report = crate::store::backup::backup(history, &dest)?;
    let deleted = crate::store::backup::prune_scheduled(&cfg.dir, cfg.keep)?;
    Ok((report, deleted))
}
