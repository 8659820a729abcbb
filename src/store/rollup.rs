//! The daily rollup of poll outcomes (schemas 5 and 6): one packed `poll_rollup_days` row per
//! vehicle-day (plain `poll_rollup_daily` rows for what does not pack), read through the
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

/// The most facts one `poll_rollup_days` row holds (its columns `a`..`d`); a day's further
/// facts go to `poll_rollup_daily` as plain rows.
pub const FACTS_PER_DAY_ROW: usize = 4;

/// One day's count of polls of one endpoint set and outcome, as the rollup keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub endpoints: i64,
    pub outcome: String,
    pub polls: i64,
    /// Their billed calls; `None` where every poll's was NULL.
    pub calls: Option<i64>,
}

/// How a fact's calls relate to its polls, as `poll_outcome_shapes.calls` keeps it (0: calls =
/// polls, 1: NULL, 2: 0), or `None` for any other sum (the fact stays a plain row).
pub fn calls_kind(polls: i64, calls: Option<i64>) -> Option<i64> {
    match calls {
        None => Some(1),
        Some(c) if c == polls => Some(0),
        Some(0) => Some(2),
        Some(_) => None,
    }
}

/// A fact packed into one integer of `poll_rollup_days` (schema 6): `shape + 64 * polls`, its
/// shape (endpoint set, outcome and calls kind) a code below 64 in `poll_outcome_shapes`; `None`
/// where it does not fit (it is then kept as a plain `poll_rollup_daily` row). The view
/// `poll_outcomes_daily` decodes it with a mask and a shift: a day's 96 listings take 2 bytes
/// where a plain row took about 26.
pub fn pack(shape: i64, polls: i64) -> Option<i64> {
    if !(0..64).contains(&shape) || !(0..1 << 40).contains(&polls) {
        return None;
    }
    Some(shape + 64 * polls)
}

/// The shape code of a fact in `poll_outcome_shapes`, added the first time it is met; `None`
/// where its calls have no kind.
fn shape(tx: &rusqlite::Transaction<'_>, fact: &Fact) -> anyhow::Result<Option<i64>> {
    let Some(kind) = calls_kind(fact.polls, fact.calls) else {
        return Ok(None);
    };
    let known: Option<i64> = tx
        .prepare_cached(
            "SELECT shape FROM poll_outcome_shapes
             WHERE endpoints = ?1 AND outcome = ?2 AND calls = ?3",
        )?
        .query_row(params![fact.endpoints, fact.outcome, kind], |r| r.get(0))
        .optional()
        .context("looking up a poll outcome's shape")?;
    if known.is_some() {
        return Ok(known);
    }
    tx.prepare_cached(
        "INSERT INTO poll_outcome_shapes (endpoints, outcome, calls) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![fact.endpoints, fact.outcome, kind])
    .context("adding a poll outcome's shape")?;
    Ok(Some(tx.last_insert_rowid()))
}

/// The facts of `vehicle`'s days in `[from, until)` from its events, per day (ascending), the
/// largest counts of a day first (they are the ones a day row keeps).
fn facts(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    until: UnixMillis,
) -> anyhow::Result<Vec<(i64, Fact)>> {
    let mut stmt = tx.prepare_cached(
        "SELECT day, endpoints, outcome, sum(polls), sum(calls) FROM (
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
         GROUP BY day, endpoints, outcome
         ORDER BY day, sum(polls) DESC, endpoints, outcome",
    )?;
    let rows = stmt
        .query_map(params![vehicle, from, until, KEEP_LAG_MS], |r| {
            Ok((
                r.get(0)?,
                Fact {
                    endpoints: r.get(1)?,
                    outcome: r.get(2)?,
                    polls: r.get(3)?,
                    calls: r.get(4)?,
                },
            ))
        })
        .context("summarising poll outcomes by day")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a day's poll outcomes")
}

/// Rewrites `vehicle`'s rollup for the days in `[from, until)` (UTC midnights, `from` at or
/// after the watermark) from its events: per day, endpoint set and outcome, the polls and the
/// sum of their billed calls, which the view spreads over the endpoints as `poll_events` does
/// (the calls on the first, 0 on the others). A day's facts that pack go into its one
/// `poll_rollup_days` row (up to [`FACTS_PER_DAY_ROW`]), the others into plain
/// `poll_rollup_daily` rows. Returns the facts written.
fn summarise(
    tx: &rusqlite::Transaction<'_>,
    vehicle: i64,
    from: UnixMillis,
    until: UnixMillis,
) -> anyhow::Result<usize> {
    for table in ["poll_rollup_days", "poll_rollup_daily"] {
        tx.prepare_cached(&format!(
            "DELETE FROM {table} WHERE vehicle = ?1 AND day >= ?2 AND day < ?3"
        ))?
        .execute(params![vehicle, from, until])
        .context("clearing the days to summarise")?;
    }
    let facts = facts(tx, vehicle, from, until)?;
    let mut i = 0;
    while i < facts.len() {
        let day = facts[i].0;
        let mut packed: Vec<i64> = Vec::with_capacity(FACTS_PER_DAY_ROW);
        while let Some((_, fact)) = facts.get(i).filter(|(d, _)| *d == day) {
            i += 1;
            match shape(tx, fact)?.and_then(|shape| pack(shape, fact.polls)) {
                Some(p) if packed.len() < FACTS_PER_DAY_ROW => packed.push(p),
                _ => {
                    tx.prepare_cached(
                        "INSERT INTO poll_rollup_daily (vehicle, day, endpoints, outcome, polls,
                             calls) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        vehicle,
                        day,
                        fact.endpoints,
                        fact.outcome,
                        fact.polls,
                        fact.calls
                    ])
                    .context("keeping a day's poll outcome as a plain row")?;
                }
            }
        }
        if !packed.is_empty() {
            tx.prepare_cached(
                "INSERT INTO poll_rollup_days (vehicle, day, a, b, c, d)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                vehicle,
                day,
                packed.first(),
                packed.get(1),
                packed.get(2),
                packed.get(3)
            ])
            .context("keeping a day's poll outcomes")?;
        }
    }
    Ok(facts.len())
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
