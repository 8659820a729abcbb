//! Retention: what `[retention]` lets go of, in small steps on the store's owner thread.
//!
//! Each step is one short transaction about one vehicle (a few days of its readings, or a
//! few thousand of its poll events), so the writer's batches, queued meanwhile on the same
//! thread, wait milliseconds at most: pruning never blocks a poll. The daemon runs the steps
//! one `Store::call` at a time ([`crate::daemon::maintenance`]); [`run_all`] runs them in a row.
//!
//! Raw readings older than `retention.readings` are first summarised into the rollup tables
//! (hourly battery, daily odometer, charging sessions) in the same transaction that deletes
//! them, and `retention_cutoffs` moves to where the vehicle's raw readings now begin. The
//! rollup views read the summaries below the cutoff and the raw readings above it, so every
//! reading counts exactly once and a dashboard over years sees the same numbers before and
//! after pruning. Cutoffs fall on UTC midnights outside any charging session, so no hour, day
//! or session is ever split between the two. The summaries use the same expressions as the
//! views' raw arms (schema 3); the store tests check that they agree.
//!
//! Poll events are let go only below the poll rollup's watermark ([`crate::store::rollup`],
//! [`within_watermark`]): their days' counts are in the rollup (`poll_rollup_days`) first, so
//! `poll_outcomes_daily` keeps every day whatever `poll_events` keeps.
//!
//! Freed pages go back to the file system with `PRAGMA incremental_vacuum`, a few megabytes
//! per step.

use std::time::Duration;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::domain::UnixMillis;

pub const DAY_MS: i64 = 86_400_000;

/// What is kept; `None` is forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Raw readings (battery, charge, odometer); summaries are kept forever.
    pub readings: Option<Duration>,
    /// `poll_events` rows whose outcome is `ok`.
    pub ok_poll_events: Option<Duration>,
    /// Every other `poll_events` row (errors, skips, no data).
    pub other_poll_events: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            readings: None,
            ok_poll_events: Some(Duration::from_secs(90 * 86_400)),
            other_poll_events: None,
        }
    }
}

/// Poll events deleted per step.
pub const EVENTS_PER_STEP: i64 = 2_000;
/// Days of one vehicle's readings summarised and deleted per step (more when a charging
/// session spans them).
pub const DAYS_PER_STEP: i64 = 7;
/// Pages given back per vacuum step (4 MiB at the default page size).
pub const VACUUM_PAGES_PER_STEP: i64 = 1_024;

fn day_floor(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

fn horizon(now: UnixMillis, keep: Duration) -> UnixMillis {
    now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
}

/// The vehicles (integer key, Smartcar id), for the per-vehicle steps.
pub fn vehicles(c: &Connection) -> anyhow::Result<Vec<(i64, String)>> {
    let mut stmt = c.prepare("SELECT id, vehicle_id FROM vehicles ORDER BY id")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .context("listing vehicles for retention")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle row")
}

/// Deletes up to [`EVENTS_PER_STEP`] of a vehicle's poll events older than `before`, the `ok`
/// ones or the others. Returns how many rows went (fewer than the step: none left).
pub fn prune_events_step(
    c: &Connection,
    vehicle: i64,
    before: UnixMillis,
    ok: bool,
) -> anyhow::Result<usize> {
    let outcome = if ok {
        "outcome = 'ok'"
    } else {
        "outcome <> 'ok'"
    };
    c.execute(
        &format!(
            "DELETE FROM poll_log WHERE (vehicle, at, endpoints) IN (
                 SELECT vehicle, at, endpoints FROM poll_log
                 WHERE vehicle = ?1 AND at < ?2 AND {outcome}
                 ORDER BY at LIMIT ?3)"
        ),
        params![vehicle, before, EVENTS_PER_STEP],
    )
    .with_context(|| format!("pruning the poll events of vehicle key {vehicle}"))
}

/// Adds the summaries of a vehicle's raw readings in `[from, to)` to the rollup tables (an
/// hour or day already summarised is merged with). The expressions are those of the views'
/// raw arms (`raw_battery_hourly`, `raw_odometer_daily`).
fn summarise(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    to: UnixMillis,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO battery_rollup_hourly (vehicle, hour, readings, soc_sum_cp, soc_min_cp,
             soc_max_cp, range_readings, range_sum_m, range_min_m, range_max_m)
         SELECT ?1, recorded_at / 3600000 * 3600000, count(*), sum(soc_cp), min(soc_cp),
                max(soc_cp), count(range_m), sum(range_m), min(range_m), max(range_m)
         FROM readings
         WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3 AND soc_cp IS NOT NULL
         GROUP BY recorded_at / 3600000
         ON CONFLICT (vehicle, hour) DO UPDATE SET
             readings = readings + excluded.readings,
             soc_sum_cp = soc_sum_cp + excluded.soc_sum_cp,
             soc_min_cp = min(soc_min_cp, excluded.soc_min_cp),
             soc_max_cp = max(soc_max_cp, excluded.soc_max_cp),
             range_readings = range_readings + excluded.range_readings,
             range_sum_m = CASE WHEN range_sum_m IS NULL THEN excluded.range_sum_m
                                WHEN excluded.range_sum_m IS NULL THEN range_sum_m
                                ELSE range_sum_m + excluded.range_sum_m END,
             range_min_m = coalesce(min(range_min_m, excluded.range_min_m), range_min_m,
                                    excluded.range_min_m),
             range_max_m = coalesce(max(range_max_m, excluded.range_max_m), range_max_m,
                                    excluded.range_max_m)",
        params![vehicle, from, to],
    )
    .context("summarising battery readings by hour")?;
    tx.execute(
        "INSERT INTO odometer_rollup_daily (vehicle, day, readings, odometer_min_m,
             odometer_max_m)
         SELECT ?1, recorded_at / 86400000 * 86400000, count(*), min(odometer_m),
                max(odometer_m)
         FROM readings
         WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3
           AND odometer_m IS NOT NULL
         GROUP BY recorded_at / 86400000
         ON CONFLICT (vehicle, day) DO UPDATE SET
             readings = readings + excluded.readings,
             odometer_min_m = min(odometer_min_m, excluded.odometer_min_m),
             odometer_max_m = max(odometer_max_m, excluded.odometer_max_m)",
        params![vehicle, from, to],
    )
    .context("summarising odometer readings by day")?;
    Ok(())
}

/// Keeps the charging sessions of a vehicle's raw readings in `[from, to)`, where neither end
/// is inside a session. The same windows as the `raw_charge_sessions` view.
fn keep_sessions(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    to: UnixMillis,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO charge_session_log (vehicle, started_at, ended_at, readings, soc_start_cp,
             soc_end_cp, end_state)
         WITH c AS (
             SELECT recorded_at AS at, charge_state AS state, soc_cp AS soc,
                    coalesce(lag(charge_state) OVER w, -1) AS prev_state,
                    lead(charge_state) OVER w              AS next_state,
                    lead(recorded_at) OVER w               AS next_at,
                    lead(soc_cp) OVER w                    AS next_soc,
                    sum(charge_state = 1) OVER w           AS charging_so_far
             FROM readings
             WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3
               AND charge_state IS NOT NULL
             WINDOW w AS (ORDER BY recorded_at)
         ),
         edges AS (
             SELECT at, soc, next_at, next_state, next_soc, charging_so_far,
                    prev_state <> 1 AS starts, coalesce(next_state, -1) <> 1 AS ends
             FROM c
             WHERE state = 1 AND (prev_state <> 1 OR coalesce(next_state, -1) <> 1)
         ),
         paired AS (
             SELECT *,
                    lead(next_at) OVER e         AS last_next_at,
                    lead(next_state) OVER e      AS last_next_state,
                    lead(next_soc) OVER e        AS last_next_soc,
                    lead(soc) OVER e             AS last_soc,
                    lead(charging_so_far) OVER e AS last_charging_so_far
             FROM edges
             WINDOW e AS (ORDER BY at)
         )
         SELECT ?1, at,
                CASE WHEN ends THEN next_at ELSE last_next_at END,
                CASE WHEN ends THEN 1 ELSE last_charging_so_far - charging_so_far + 1 END,
                soc,
                CASE WHEN ends THEN coalesce(next_soc, soc)
                     ELSE coalesce(last_next_soc, last_soc) END,
                CASE WHEN ends THEN next_state ELSE last_next_state END
         FROM paired
         WHERE starts
         ON CONFLICT (vehicle, started_at) DO NOTHING",
        params![vehicle, from, to],
    )
    .context("keeping charging sessions")?;
    Ok(())
}

/// Whether `at` falls inside a charging session of the vehicle: its last charge reading
/// before `at` (and at or after `from`) says CHARGING.
fn inside_session(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    at: UnixMillis,
) -> anyhow::Result<bool> {
    let state: Option<i64> = tx
        .query_row(
            "SELECT charge_state FROM readings
             WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3
               AND charge_state IS NOT NULL
             ORDER BY recorded_at DESC LIMIT 1",
            params![vehicle, from, at],
            |r| r.get(0),
        )
        .optional()
        .context("looking for a charging session")?;
    Ok(state == Some(1))
}

/// One step of readings retention for one vehicle: raw readings below `before` (rounded down
/// to a UTC midnight) are summarised and deleted, a few days at a time. Returns the rows
/// deleted and whether the vehicle is done (nothing more to prune before `before` now).
pub fn prune_readings_step(
    c: &mut Connection,
    vehicle: i64,
    before: UnixMillis,
) -> anyhow::Result<(usize, bool)> {
    let target = day_floor(before);
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("retention: starting the transaction")?;
    let cutoff: i64 = tx
        .query_row(
            "SELECT readings_before FROM retention_cutoffs WHERE vehicle = ?1",
            [vehicle],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(i64::MIN);
    // Readings that arrived after their days were summarised (a car that reported very old
    // data late) join their summaries; their sessions are not rebuilt.
    let mut deleted = 0;
    if cutoff > i64::MIN {
        summarise(&tx, vehicle, i64::MIN, cutoff)?;
        deleted += drop_readings(&tx, vehicle, i64::MIN, cutoff).context("late readings")?;
    }
    let oldest: Option<i64> = tx
        .query_row(
            "SELECT min(recorded_at) FROM readings WHERE vehicle = ?1 AND recorded_at >= ?2",
            params![vehicle, cutoff],
            |r| r.get(0),
        )
        .context("finding the oldest raw reading")?;
    let Some(oldest) = oldest.filter(|o| *o < target) else {
        tx.commit().context("retention: committing")?;
        return Ok((deleted, true));
    };
    // The furthest midnight within DAYS_PER_STEP that is outside a session, else the nearest
    // one after it; none before `target` means a session still runs there.
    let first = day_floor(oldest) + DAY_MS;
    let limit = target.min(day_floor(oldest) + DAYS_PER_STEP * DAY_MS);
    let mut until = None;
    let mut b = limit;
    while b >= first {
        if !inside_session(&tx, vehicle, cutoff, b)? {
            until = Some(b);
            break;
        }
        b -= DAY_MS;
    }
    if until.is_none() {
        let mut b = limit + DAY_MS;
        while b <= target {
            if !inside_session(&tx, vehicle, cutoff, b)? {
                until = Some(b);
                break;
            }
            b += DAY_MS;
        }
    }
    let Some(until) = until else {
        tx.commit().context("retention: committing")?;
        return Ok((deleted, true));
    };
    let from = cutoff;
    summarise(&tx, vehicle, from, until)?;
    keep_sessions(&tx, vehicle, from, until)?;
    deleted += drop_readings(&tx, vehicle, from, until).context("summarised readings")?;
    tx.execute(
        "INSERT INTO retention_cutoffs (vehicle, readings_before) VALUES (?1, ?2)
         ON CONFLICT (vehicle) DO UPDATE SET readings_before = excluded.readings_before",
        params![vehicle, until],
    )
    .context("moving the retention cutoff")?;
    tx.commit().context("retention: committing")?;
    Ok((deleted, until >= target))
}

/// Deletes a vehicle's raw readings recorded in `[from, until)` and their own fetch lags. The
/// `ok` polls kept in those rows (schema 4) are poll events, which `retention.poll_events_ok`
/// keeps, not readings: the ones `poll_events` still shows move to `poll_log` first, so the
/// view and the month's billed calls are the same before and after. Returns the readings
/// deleted.
fn drop_readings(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    until: UnixMillis,
) -> anyhow::Result<usize> {
    tx.execute(
        "INSERT INTO poll_log (vehicle, at, endpoints, outcome, calls)
         SELECT vehicle, recorded_at + fetch_lag_ms, poll_endpoints, 'ok', poll_calls
         FROM readings
         WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3
           AND poll_endpoints IS NOT NULL
           AND recorded_at + fetch_lag_ms >= (SELECT ok_events_since FROM store_state WHERE id = 1)
         ON CONFLICT (vehicle, at, endpoints) DO NOTHING",
        params![vehicle, from, until],
    )
    .context("keeping the poll events of the readings let go")?;
    tx.execute(
        "DELETE FROM reading_lags WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3",
        params![vehicle, from, until],
    )
    .context("deleting the readings' own fetch lags")?;
    tx.execute(
        "DELETE FROM readings WHERE vehicle = ?1 AND recorded_at >= ?2 AND recorded_at < ?3",
        params![vehicle, from, until],
    )
    .context("deleting readings")
}

/// Gives up to [`VACUUM_PAGES_PER_STEP`] free pages back to the file system (a store created
/// before schema 3 and never migrated has no incremental vacuum: nothing happens). Returns
/// the free pages left.
pub fn vacuum_step(c: &Connection) -> anyhow::Result<i64> {
    let mode: i64 = c.pragma_query_value(Some("main"), "auto_vacuum", |r| r.get(0))?;
    if mode != 2 {
        return Ok(0);
    }
    c.execute_batch(&format!(
        "PRAGMA main.incremental_vacuum({VACUUM_PAGES_PER_STEP})"
    ))
    .context("PRAGMA incremental_vacuum")?;
    c.pragma_query_value(Some("main"), "freelist_count", |r| r.get(0))
        .context("reading freelist_count")
}

/// What one retention run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub readings_deleted: usize,
    pub events_deleted: usize,
    pub steps: usize,
    /// Steps of the poll rollup's pass that ran first ([`crate::store::rollup`]).
    pub rollup_steps: usize,
}

/// The pruning a policy asks for at `now`, to run for each vehicle step by step (the daemon
/// passes each step to the owner thread; [`run_all`] runs them in place).
pub fn plan_for(policy: &Policy, now: UnixMillis) -> Vec<Task> {
    let mut tasks = Vec::new();
    if let Some(keep) = policy.ok_poll_events {
        tasks.push(Task::Events {
            ok: true,
            before: horizon(now, keep),
        });
    }
    if let Some(keep) = policy.other_poll_events {
        tasks.push(Task::Events {
            ok: false,
            before: horizon(now, keep),
        });
    }
    if let Some(keep) = policy.readings {
        tasks.push(Task::Readings {
            before: horizon(now, keep),
        });
    }
    tasks
}

/// Whether `task` may have anything to prune for `vehicle`. For poll events that is one index
/// seek on `poll_log`'s primary key (vehicle, at), against the statement compile and delete
/// of a step: an hourly pass over 10,000 vehicles with nothing old enough took ~0.35 s of the
/// owner thread in steps, the most an idle daemon spent anywhere (issue 8). Readings are
/// always worth a step (late readings under a summarised cutoff join their summaries).
pub fn has_work(c: &Connection, task: &Task, vehicle: i64) -> anyhow::Result<bool> {
    let (ok, before) = match *task {
        Task::Readings { .. } => return Ok(true),
        Task::Events { ok, before } => (ok, before),
    };
    let sql = if ok {
        "SELECT EXISTS (SELECT 1 FROM poll_log WHERE vehicle = ?1 AND at < ?2 AND outcome = 'ok')"
    } else {
        "SELECT EXISTS (SELECT 1 FROM poll_log WHERE vehicle = ?1 AND at < ?2 AND outcome <> 'ok')"
    };
    c.prepare_cached(sql)?
        .query_row(params![vehicle, before], |r| r.get(0))
        .with_context(|| format!("looking for old poll events of vehicle key {vehicle}"))
}

/// Sets `poll_events`' horizon for the `ok` polls kept beside their readings (schema 4) to the
/// `ok` events task's `before`: those rows stay in `readings` (they are readings), and the view
/// stops showing their events, as deleting them from `poll_log` does for the others. Set, not
/// only moved forward: a pass run once with a clock far ahead must not hide later polls for
/// months (the hidden rows are still there). One row, once per pass.
pub fn hide_ok_events(c: &Connection, tasks: &[Task]) -> anyhow::Result<()> {
    for task in tasks {
        if let Task::Events { ok: true, before } = *task {
            c.prepare_cached(
                "UPDATE store_state SET ok_events_since = ?1 WHERE id = 1 AND ok_events_since <> ?1",
            )?
            .execute([before])
            .context("moving the horizon of the ok poll events")?;
        }
    }
    Ok(())
}

/// `tasks` with no poll event let go past `watermark`, the poll rollup's
/// ([`crate::store::rollup`]): a day's events are deleted or hidden only once its counts are
/// in the rollup (`poll_rollup_days`), so `poll_outcomes_daily` keeps every day. Under a policy shorter
/// than a day, events wait for their day to close and be summarised (an hour or so past
/// midnight), then go.
pub fn within_watermark(tasks: &[Task], watermark: UnixMillis) -> Vec<Task> {
    tasks
        .iter()
        .map(|task| match *task {
            Task::Events { ok, before } => Task::Events {
                ok,
                before: before.min(watermark),
            },
            readings => readings,
        })
        .collect()
}

/// Of `vehicles`, those `tasks` have work for (see [`has_work`]), each with those tasks.
pub fn due(
    c: &Connection,
    vehicles: &[i64],
    tasks: &[Task],
) -> anyhow::Result<Vec<(i64, Vec<Task>)>> {
    let mut due = Vec::new();
    for &vehicle in vehicles {
        let mut work = Vec::new();
        for task in tasks {
            if has_work(c, task, vehicle)? {
                work.push(*task);
            }
        }
        if !work.is_empty() {
            due.push((vehicle, work));
        }
    }
    Ok(due)
}

/// One kind of pruning for a vehicle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Events { ok: bool, before: UnixMillis },
    Readings { before: UnixMillis },
}

impl Task {
    /// Runs one step of this task for `vehicle`: rows deleted, and whether it is done.
    pub fn step(&self, c: &mut Connection, vehicle: i64) -> anyhow::Result<(usize, bool)> {
        match *self {
            Task::Events { ok, before } => {
                let n = prune_events_step(c, vehicle, before, ok)?;
                Ok((n, (n as i64) < EVENTS_PER_STEP))
            }
            Task::Readings { before } => prune_readings_step(c, vehicle, before),
        }
    }
}

/// The whole retention of a store in place (tests, and a store no daemon is writing): the
/// poll rollup's pass first, then the pruning it allows, then the vacuum.
pub fn run_all(c: &mut Connection, policy: &Policy, now: UnixMillis) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let pass = super::rollup::run_all(c, now)?;
    summary.rollup_steps = pass.steps;
    let tasks = within_watermark(&plan_for(policy, now), pass.watermark);
    hide_ok_events(c, &tasks)?;
    for (vehicle, _) in vehicles(c)? {
        for &task in &tasks {
            loop {
                let (n, done) = task.step(c, vehicle)?;
                summary.steps += 1;
                match task {
                    Task::Events { .. } => summary.events_deleted += n,
                    Task::Readings { .. } => summary.readings_deleted += n,
                }
                if done {
                    break;
                }
            }
        }
    }
    while vacuum_step(c)? > 0 {}
    Ok(summary)
}
