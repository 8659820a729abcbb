//! Plain synchronous queries on a `rusqlite::Connection`: connections, vehicles, summaries.
//! The daemon runs them on the store's owner thread through `Store::call`; the read-only CLI
//! commands run them on their own connection; tests run them in memory.

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, ConnectionId, ConnectionStatus, OdometerReading,
    PollEvent, Secret, Stamp, TokenPair, UnixMillis, VehicleId, VehicleInfo,
};

#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub id: ConnectionId,
    pub user_id: String,
    pub status: ConnectionStatus,
    pub tokens: TokenPair,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VehicleRecord {
    pub vehicle_id: VehicleId,
    pub connection_id: ConnectionId,
    pub make: Option<String>,
    pub model: Option<String>,
    pub year: Option<i32>,
    pub vin: Option<String>,
    pub enabled: bool,
}

#[derive(Clone, Debug)]
pub struct VehicleSummary {
    pub vehicle: VehicleRecord,
    pub connection_status: ConnectionStatus,
    pub last_battery: Option<BatteryReading>,
    pub last_charge: Option<ChargeReading>,
    pub last_odometer: Option<OdometerReading>,
    pub last_poll: Option<PollEvent>,
}

/// Runs `f` in a transaction committed with `synchronous=FULL`: WAL with NORMAL may lose the
/// last commit on power loss, and a lost rotated token is a lost connection.
fn durably<T>(
    c: &mut Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    c.pragma_update(None, "synchronous", "FULL")?;
    let result = (|| -> anyhow::Result<T> {
        let tx = c.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    })();
    // Back to the daemon's default even when the transaction failed.
    let restore = c.pragma_update(None, "synchronous", "NORMAL");
    let out = result?;
    restore?;
    Ok(out)
}

/// Upsert by `user_id`: a reconnect replaces the tokens and makes the connection active again.
pub fn upsert_connection(
    c: &mut Connection,
    user_id: &str,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<ConnectionId> {
    durably(c, |tx| {
        let id: i64 = tx
            .query_row(
                "INSERT INTO connections (user_id, status, access_token, refresh_token,
                     access_expires_at, refresh_expires_at, created_at, updated_at)
                 VALUES (?1, 'active', ?2, ?3, ?4, ?5, ?6, ?6)
                 ON CONFLICT (user_id) DO UPDATE SET status = 'active',
                     access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                     access_expires_at = excluded.access_expires_at,
                     refresh_expires_at = excluded.refresh_expires_at, updated_at = excluded.updated_at
                 RETURNING id",
                params![
                    user_id,
                    tokens.access_token.expose(),
                    tokens.refresh_token.expose(),
                    tokens.access_expires_at,
                    tokens.refresh_expires_at,
                    now
                ],
                |r| r.get(0),
            )
            .context("storing the connection")?;
        Ok(ConnectionId(id))
    })
}

/// Persists a rotated pair durably, in its own transaction.
pub fn save_tokens(
    c: &mut Connection,
    id: ConnectionId,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<()> {
    durably(c, |tx| {
        let n = tx.execute(
            "UPDATE connections SET access_token = ?2, refresh_token = ?3, access_expires_at = ?4,
                 refresh_expires_at = ?5, updated_at = ?6 WHERE id = ?1",
            params![
                id.0,
                tokens.access_token.expose(),
                tokens.refresh_token.expose(),
                tokens.access_expires_at,
                tokens.refresh_expires_at,
                now
            ],
        )?;
        anyhow::ensure!(n == 1, "connection {id} is not in the store");
        Ok(())
    })
}

pub fn set_connection_status(
    c: &Connection,
    id: ConnectionId,
    status: ConnectionStatus,
    now: UnixMillis,
) -> anyhow::Result<()> {
    let n = c.execute(
        "UPDATE connections SET status = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.0, status.as_str(), now],
    )?;
    anyhow::ensure!(n == 1, "connection {id} is not in the store");
    Ok(())
}

pub fn load_connections(c: &Connection) -> anyhow::Result<Vec<ConnectionRecord>> {
    let mut stmt = c.prepare(
        "SELECT id, user_id, status, access_token, refresh_token, access_expires_at, refresh_expires_at
         FROM connections ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        let status: String = r.get(2)?;
        Ok(ConnectionRecord {
            id: ConnectionId(r.get(0)?),
            user_id: r.get(1)?,
            // An unknown status (written by a newer version) is not polled.
            status: ConnectionStatus::parse(&status).unwrap_or(ConnectionStatus::NeedsReauth),
            tokens: TokenPair {
                access_token: Secret::new(r.get::<_, String>(3)?),
                refresh_token: Secret::new(r.get::<_, String>(4)?),
                access_expires_at: r.get(5)?,
                refresh_expires_at: r.get(6)?,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts the vehicle or moves it to `connection_id` (a reconnect); keeps `enabled` and a known
/// VIN; make/model/year are updated when `info` is given.
pub fn upsert_vehicle(
    c: &Connection,
    connection_id: ConnectionId,
    vehicle_id: &VehicleId,
    info: Option<&VehicleInfo>,
    now: UnixMillis,
) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO vehicles (vehicle_id, connection_id, make, model, year, added_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (vehicle_id) DO UPDATE SET connection_id = excluded.connection_id,
             make = coalesce(excluded.make, make), model = coalesce(excluded.model, model),
             year = coalesce(excluded.year, year)",
        params![
            vehicle_id.0,
            connection_id.0,
            info.map(|i| i.make.as_str()),
            info.map(|i| i.model.as_str()),
            info.map(|i| i.year),
            now
        ],
    )
    .with_context(|| format!("storing vehicle {vehicle_id}"))?;
    Ok(())
}

fn vehicle_record(r: &Row<'_>) -> rusqlite::Result<VehicleRecord> {
    Ok(VehicleRecord {
        vehicle_id: VehicleId(r.get(0)?),
        connection_id: ConnectionId(r.get(1)?),
        make: r.get(2)?,
        model: r.get(3)?,
        year: r.get(4)?,
        vin: r.get(5)?,
        enabled: r.get::<_, i64>(6)? != 0,
    })
}

const VEHICLE_COLUMNS: &str = "vehicle_id, connection_id, make, model, year, vin, enabled";

pub fn load_vehicles(c: &Connection) -> anyhow::Result<Vec<VehicleRecord>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {VEHICLE_COLUMNS} FROM vehicles ORDER BY id"
    ))?;
    let rows = stmt.query_map([], vehicle_record)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Returns false when the vehicle is unknown.
pub fn set_vehicle_enabled(
    c: &Connection,
    vehicle_id: &VehicleId,
    enabled: bool,
) -> anyhow::Result<bool> {
    let n = c.execute(
        "UPDATE vehicles SET enabled = ?2 WHERE vehicle_id = ?1",
        params![vehicle_id.0, enabled as i64],
    )?;
    Ok(n == 1)
}

/// Deletes the vehicle and all its history; false when unknown.
pub fn remove_vehicle(c: &mut Connection, vehicle_id: &VehicleId) -> anyhow::Result<bool> {
    let tx = c.transaction()?;
    let key: Option<i64> = tx
        .query_row(
            "SELECT id FROM vehicles WHERE vehicle_id = ?1",
            [&vehicle_id.0],
            |r| r.get(0),
        )
        .optional()?;
    let Some(key) = key else {
        return Ok(false);
    };
    for table in [
        "battery_readings",
        "charge_readings",
        "odometer_readings",
        "poll_event_log",
    ] {
        tx.execute(&format!("DELETE FROM {table} WHERE vehicle = ?1"), [key])?;
    }
    tx.execute("DELETE FROM vehicles WHERE id = ?1", [key])?;
    tx.commit()?;
    Ok(true)
}

fn stamp(recorded_at: i64, lag: i64) -> Stamp {
    Stamp {
        recorded_at,
        fetched_at: recorded_at + lag,
    }
}

/// Every vehicle with its connection's status and its latest readings and poll outcome.
pub fn vehicle_summaries(c: &Connection) -> anyhow::Result<Vec<VehicleSummary>> {
    let mut stmt = c.prepare(
        "SELECT v.vehicle_id, v.connection_id, v.make, v.model, v.year, v.vin, v.enabled, c.status, v.id
         FROM vehicles v JOIN connections c ON c.id = v.connection_id ORDER BY v.id",
    )?;
    let rows: Vec<(VehicleRecord, String, i64)> = stmt
        .query_map([], |r| Ok((vehicle_record(r)?, r.get(7)?, r.get(8)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (vehicle, status, key) in rows {
        let last_battery = c
            .query_row(
                "SELECT recorded_at, fetch_lag_ms, soc_cp, range_m FROM battery_readings
                 WHERE vehicle = ?1 ORDER BY recorded_at DESC LIMIT 1",
                [key],
                |r| {
                    Ok(BatteryReading {
                        stamp: stamp(r.get(0)?, r.get(1)?),
                        soc_percent: r.get::<_, i64>(2)? as f64 / 100.0,
                        range_km: r.get::<_, Option<i64>>(3)?.map(|m| m as f64 / 1000.0),
                    })
                },
            )
            .optional()?;
        let last_charge = c
            .query_row(
                "SELECT recorded_at, fetch_lag_ms, plugged_in, state FROM charge_readings
                 WHERE vehicle = ?1 ORDER BY recorded_at DESC LIMIT 1",
                [key],
                |r| {
                    Ok(ChargeReading {
                        stamp: stamp(r.get(0)?, r.get(1)?),
                        plugged_in: r.get::<_, i64>(2)? != 0,
                        state: ChargeState::from_code(r.get(3)?),
                    })
                },
            )
            .optional()?;
        let last_odometer = c
            .query_row(
                "SELECT recorded_at, fetch_lag_ms, odometer_m FROM odometer_readings
                 WHERE vehicle = ?1 ORDER BY recorded_at DESC LIMIT 1",
                [key],
                |r| {
                    Ok(OdometerReading {
                        stamp: stamp(r.get(0)?, r.get(1)?),
                        odometer_km: r.get::<_, i64>(2)? as f64 / 1000.0,
                    })
                },
            )
            .optional()?;
        let last_poll = c
            .query_row(
                "SELECT at, endpoint, outcome, http_status, error_type, error_code FROM poll_event_log
                 WHERE vehicle = ?1 ORDER BY at DESC, id DESC LIMIT 1",
                [key],
                |r| {
                    Ok(PollEvent {
                        vehicle_id: vehicle.vehicle_id.clone(),
                        at: r.get(0)?,
                        endpoint: r.get(1)?,
                        outcome: r.get(2)?,
                        http_status: r.get::<_, Option<i64>>(3)?.map(|s| s as u16),
                        error_type: r.get(4)?,
                        error_code: r.get(5)?,
                    })
                },
            )
            .optional()?;
        out.push(VehicleSummary {
            connection_status: ConnectionStatus::parse(&status)
                .unwrap_or(ConnectionStatus::NeedsReauth),
            vehicle,
            last_battery,
            last_charge,
            last_odometer,
            last_poll,
        });
    }
    Ok(out)
}
