//! The daily rollup of poll outcomes (schema 5): `poll_rollup_daily`, read through the
//! `poll_outcomes_daily` view, filled in small steps on the store's owner thread.
//!
//! Why: `poll_events` keeps an `ok` poll inside the readings row it stored (schema 4), so its
//! time has no index, and a query on it filtered only on time reads every vehicle's readings
//! since the `ok` horizon (about 30 s for a 10,000-vehicle fleet's week, issue 8). A day's
//! counts never change once the day is over, so they are summed once per vehicle and day.
//!
//! How: a pass summarises every vehicle's closed UTC days from the watermark
//! (`store_state.polls_summarised_before`) up to a target midnight, one vehicle and up to
//! [`DAYS_PER_STEP`] days per transaction (milliseconds: the writer's batches go between two
//! steps), then moves the watermark to the target in one more. The view reads the rollup below
//! the watermark and the events from it on, so rows a cut-short pass wrote above the
//! watermark are not shown, and a step rewrites its days whole (delete, insert) so doing one
//! again counts nothing twice. A step never touches a day below the watermark: those days'
//! events may already be gone.
//!
//! Retention runs a pass first and never lets events go past the watermark
//! ([`crate::store::retention::run_all`], [`crate::daemon::maintenance`]), so a day's counts
//! are summarised before any of its events is deleted or hidden, and outlive them.

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::domain::UnixMillis;
use crate::store::retention::DAY_MS;

/// Days of one vehicle summarised per step (a daemon's daily pass needs one).
pub const DAYS_PER_STEP: i64 = 7;

/// How long after midnight a day counts as closed. A poll's event carries its answer's
/// arrival time and reaches the store through the writer's queue within seconds; this leaves
/// the last polls of a day time to land before the day is summarised.
pub const CLOSE_AFTER_MS: i64 = 15 * 60_000;

/// A kept reading is at most this far from its poll's time (writer.rs `KEEP_LAG_MAX_MS`):
/// a poll kept in readings is found by `recorded_at` within this margin of its day.
const KEEP_LAG_MS: i64 = DAY_MS;

fn day_floor(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

/// The midnight before which every day is closed at `now`.
pub fn closed_before(now: UnixMillis) -> UnixMillis {
    day_floor(now.saturating_sub(CLOSE_AFTER_MS))
}

/// The watermark: days before it are summarised.
pub fn watermark(c: &Connection) -> anyhow::Result<UnixMillis> {
    c.prepare_cached("SELECT polls_summarised_before FROM store_state WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .context("reading the poll rollup's watermark")
}

/// The earliest poll event of `vehicle` at or after `from`, or a time at most a day before it
/// (a poll kept in readings is found from its reading's `recorded_at`). `None`: no event.
pub fn first_event(c: &Connection, vehicle: i64, from: UnixMillis) -> anyhow::Result<Option<i64>> {
    let logged: Option<i64> = c
        .prepare_cached("SELECT min(at) FROM poll_log WHERE vehicle = ?1 AND at >= ?2")?
        .query_row(params![vehicle, from], |r| r.get(0))
        .with_context(|| format!("finding the first poll of vehicle key {vehicle}"))?;
    let kept: Option<i64> = c
        .prepare_cached(
            "SELECT r.recorded_at FROM readings r
             WHERE r.vehicle = ?1
               AND r.recorded_at >= max(?2, (SELECT ok_events_since FROM store_state WHERE id = 1))
                                    - ?3
               AND r.poll_endpoints IS NOT NULL
               AND r.recorded_at + r.fetch_lag_ms
                   >= max(?2, (SELECT ok_events_since FROM store_state WHERE id = 1))
             ORDER BY r.recorded_at LIMIT 1",
        )?
        .query_row(params![vehicle, from, KEEP_LAG_MS], |r| r.get(0))
        .optional()
        .with_context(|| format!("finding the first kept poll of vehicle key {vehicle}"))?;
    let kept = kept.map(|recorded| recorded.saturating_sub(KEEP_LAG_MS).max(from));
    Ok(match (logged, kept) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Rewrites `vehicle`'s rollup rows for the days in `[from, until)` (UTC midnights, `from` at
/// or after the watermark) from its events: per day, endpoint set and outcome, the polls and
/// the sum of their billed calls, which the view spreads over the endpoints as `poll_events`
/// does (the calls on the first, 0 on the others).
fn summarise(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    until: UnixMillis,
) -> anyhow::Result<usize> {
    tx.execute(
        "DELETE FROM poll_rollup_daily WHERE vehicle = ?1 AND day >= ?2 AND day < ?3",
        params![vehicle, from, until],
    )
    .context("clearing the days to summarise")?;
    tx.execute(
        "INSERT INTO poll_rollup_daily (vehicle, day, endpoints, outcome, polls, calls)
         SELECT ?1, day, endpoints, outcome, sum(polls), sum(calls) FROM (
             SELECT e.at / 86400000 * 86400000 AS day, e.endpoints AS endpoints,
                    e.outcome AS outcome, count(*) AS polls, sum(e.calls) AS calls
             FROM poll_log e
             WHERE e.vehicle = ?1 AND e.at >= ?2 AND e.at < ?3
             GROUP BY 1, 2, 3
             UNION ALL
             SELECT (r.recorded_at + r.fetch_lag_ms) / 86400000 * 86400000, r.poll_endpoints,
                    'ok', count(*), sum(r.poll_calls)
             FROM readings r
             WHERE r.vehicle = ?1 AND r.recorded_at >= ?2 - ?4 AND r.recorded_at < ?3 + ?4
               AND r.poll_endpoints IS NOT NULL
               AND r.recorded_at + r.fetch_lag_ms
                   >= max(?2, (SELECT ok_events_since FROM store_state WHERE id = 1))
               AND r.recorded_at + r.fetch_lag_ms < ?3
             GROUP BY 1, 2
         ) WHERE true
         GROUP BY day, endpoints, outcome",
        params![vehicle, from, until, KEEP_LAG_MS],
    )
    .context("summarising poll outcomes by day")
}

/// One step of a pass for `vehicle`: summarises its days from `cursor` (a midnight, where the
/// previous step stopped; the watermark at first) towards `target`, skipping days without an
/// event, up to [`DAYS_PER_STEP`] of them. Returns where the next step starts; at `target`
/// or beyond, the vehicle is done.
pub fn step(
    c: &mut Connection,
    vehicle: i64,
    cursor: UnixMillis,
    target: UnixMillis,
) -> anyhow::Result<UnixMillis> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("poll rollup: starting the transaction")?;
    // Never below the watermark: those days' events may be gone, their counts are final.
    let cursor = cursor.max(watermark(&tx)?);
    if cursor >= target {
        return Ok(target);
    }
    let Some(first) = first_event(&tx, vehicle, cursor)? else {
        return Ok(target);
    };
    let from = day_floor(first).max(cursor);
    if from >= target {
        return Ok(target);
    }
    let until = target.min(from + DAYS_PER_STEP * DAY_MS);
    summarise(&tx, vehicle, from, until)?;
    tx.commit().context("poll rollup: committing")?;
    Ok(until)
}

/// Of `vehicles`, those with an event in `[from, target)` (an index seek or two each).
pub fn due(
    c: &Connection,
    vehicles: &[i64],
    from: UnixMillis,
    target: UnixMillis,
) -> anyhow::Result<Vec<i64>> {
    let mut due = Vec::new();
    for &vehicle in vehicles {
        if first_event(c, vehicle, from)?.is_some_and(|at| at < target) {
            due.push(vehicle);
        }
    }
    Ok(due)
}

/// Moves the watermark forward to `target`, once every vehicle's days below it are summarised.
pub fn advance(c: &Connection, target: UnixMillis) -> anyhow::Result<()> {
    c.prepare_cached(
        "UPDATE store_state SET polls_summarised_before = ?1
         WHERE id = 1 AND polls_summarised_before < ?1",
    )?
    .execute([target])
    .context("moving the poll rollup's watermark")?;
    Ok(())
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub steps: usize,
    /// The watermark after the pass.
    pub watermark: UnixMillis,
}

/// A whole pass in place up to the days closed at `now` (tests, `retention::run_all`, and a
/// store no daemon is writing); the daemon runs the same steps one owner-thread call at a time.
pub fn run_all(c: &mut Connection, now: UnixMillis) -> anyhow::Result<Pass> {
    let target = closed_before(now);
    let from = watermark(c)?;
    let mut pass = Pass {
        steps: 0,
        watermark: from,
    };
    if from >= target {
        return Ok(pass);
    }
    let vehicles: Vec<i64> = crate::store::retention::vehicles(c)?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    for vehicle in due(c, &vehicles, from, target)? {
        let mut cursor = from;
        while cursor < target {
            cursor = step(c, vehicle, cursor, target)?;
            pass.steps += 1;
        }
    }
    advance(c, target)?;
    pass.watermark = target;
    Ok(pass)
}
