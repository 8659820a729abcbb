//! The writer's one step: a batch of items in one transaction, with a report of what was
//! written, what was already there and what could not be stored. Runs on the owner thread.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{WriteItem, WriteReport};
use crate::domain::{Reading, VehicleId};

/// vehicle_id → the integer key readings carry. Cleared whenever a `call` may have changed
/// the vehicles table.
pub type KeyCache = HashMap<VehicleId, i64>;

fn key(c: &Connection, cache: &mut KeyCache, id: &VehicleId) -> rusqlite::Result<Option<i64>> {
    if let Some(k) = cache.get(id) {
        return Ok(Some(*k));
    }
    let k: Option<i64> = c
        .prepare_cached("SELECT id FROM vehicles WHERE vehicle_id = ?1")?
        .query_row([&id.0], |r| r.get(0))
        .optional()?;
    if let Some(k) = k {
        cache.insert(id.clone(), k);
    }
    Ok(k)
}

/// Centi-percent and metres, rounded (not truncated) so a value reads back as written.
fn centi(x: f64) -> i64 {
    (x * 100.0).round() as i64
}
fn milli(x: f64) -> i64 {
    (x * 1000.0).round() as i64
}

/// The report label of an item that stores a row, if it does.
pub fn table_of(item: &WriteItem) -> Option<&'static str> {
    match item {
        WriteItem::Reading(_, r) => Some(r.table()),
        WriteItem::Event(_) => Some("poll_events"),
        WriteItem::Info(..) | WriteItem::Vin(..) => None,
    }
}

fn bump(v: &mut Vec<(&'static str, u64)>, table: &'static str) {
    match v.iter_mut().find(|(t, _)| *t == table) {
        Some((_, n)) => *n += 1,
        None => v.push((table, 1)),
    }
}

/// Commits `items` in one transaction. On failure nothing of the batch is kept and every row
/// is reported as dropped.
pub fn apply(c: &mut Connection, cache: &mut KeyCache, items: &[WriteItem]) -> WriteReport {
    match try_apply(c, cache, items) {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, items = items.len(), "a write batch failed; its rows are dropped");
            // The transaction was rolled back; cached keys may name rows that are gone.
            cache.clear();
            let mut report = WriteReport::default();
            for t in items.iter().filter_map(table_of) {
                bump(&mut report.dropped, t);
            }
            report
        }
    }
}

fn try_apply(
    c: &mut Connection,
    cache: &mut KeyCache,
    items: &[WriteItem],
) -> rusqlite::Result<WriteReport> {
    let mut report = WriteReport::default();
    let tx = c.transaction()?;
    for item in items {
        let table = table_of(item);
        let vehicle = match item {
            WriteItem::Reading(id, _) | WriteItem::Info(id, _) | WriteItem::Vin(id, _) => id,
            WriteItem::Event(e) => &e.vehicle_id,
        };
        let Some(k) = key(&tx, cache, vehicle)? else {
            // The vehicle was removed while its poll was in flight.
            if let Some(t) = table {
                tracing::warn!(vehicle = %vehicle, table = t, "row for a vehicle not in the store; dropped");
                bump(&mut report.dropped, t);
            }
            continue;
        };
        let inserted = match item {
            WriteItem::Reading(_, r) => {
                let s = r.stamp();
                let lag = (s.fetched_at - s.recorded_at).max(0);
                match r {
                    Reading::Battery(b) => tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO battery_readings
                             (vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![k, s.recorded_at, lag, centi(b.soc_percent), b.range_km.map(milli)])?,
                    Reading::Charge(ch) => tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO charge_readings
                             (vehicle, recorded_at, fetch_lag_ms, plugged_in, state) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![k, s.recorded_at, lag, ch.plugged_in as i64, ch.state.code()])?,
                    Reading::Odometer(o) => tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO odometer_readings
                             (vehicle, recorded_at, fetch_lag_ms, odometer_m) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![k, s.recorded_at, lag, milli(o.odometer_km)])?,
                }
            }
            WriteItem::Event(e) => tx
                .prepare_cached(
                    "INSERT INTO poll_event_log (vehicle, at, endpoint, outcome, http_status, error_type, error_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![k, e.at, e.endpoint, e.outcome, e.http_status, e.error_type, e.error_code])?,
            WriteItem::Info(_, info) => {
                tx.prepare_cached("UPDATE vehicles SET make = ?2, model = ?3, year = ?4 WHERE id = ?1")?
                    .execute(params![k, info.make, info.model, info.year])?;
                continue;
            }
            WriteItem::Vin(_, vin) => {
                tx.prepare_cached("UPDATE vehicles SET vin = ?2 WHERE id = ?1")?
                    .execute(params![k, vin])?;
                continue;
            }
        };
        if let Some(t) = table {
            if inserted == 1 {
                bump(&mut report.written, t);
            } else {
                bump(&mut report.duplicates, t);
            }
        }
    }
    tx.commit()?;
    Ok(report)
}
