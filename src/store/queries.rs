//! Plain synchronous queries on a `rusqlite::Connection`: connections (tokens), vehicles and the
//! summaries the CLI shows.
//!
//! They take the connection as an argument so they can be unit-tested on an in-memory database
//! and run by the daemon and the CLI through [`super::Store::call`] on the owner thread (STYLE
//! habit 9). Token writes get `synchronous=FULL` for their own transaction: in WAL mode NORMAL
//! can lose the last commit on power loss, and a lost rotated refresh token loses the car
//! (DESIGN §2.1).

use anyhow::{bail, Context};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, ConnectionId, ConnectionStatus, OdometerReading,
    PollEvent, Secret, Stamp, TokenPair, UnixMillis, VehicleId, VehicleInfo,
};

/// One row of `connections`, tokens included (never printed: they are `Secret`s).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionRecord {
    pub id: ConnectionId,
    pub user_id: String,
    pub status: ConnectionStatus,
    pub tokens: TokenPair,
}

/// One row of `vehicles`.
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

/// A vehicle with its connection's status and its latest stored readings (`vehicles list`).
#[derive(Clone, Debug, PartialEq)]
pub struct VehicleSummary {
    pub vehicle: VehicleRecord,
    pub connection_status: ConnectionStatus,
    pub last_battery: Option<BatteryReading>,
    pub last_charge: Option<ChargeReading>,
    pub last_odometer: Option<OdometerReading>,
    pub last_poll: Option<PollEvent>,
}

/// Runs `f` in an IMMEDIATE transaction committed with `synchronous=FULL` (the token store
/// always is; the history is for this transaction), then puts the history back to NORMAL
/// whatever happened (the writer's batches stay cheap).
fn durably<R>(
    c: &mut Connection,
    what: &str,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    c.pragma_update(Some("main"), "synchronous", "FULL")
        .with_context(|| format!("{what}: setting synchronous=FULL"))?;
    let result: anyhow::Result<R> = (|| {
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .with_context(|| format!("{what}: starting the transaction"))?;
        let r = f(&tx)?;
        tx.commit().with_context(|| format!("{what}: committing"))?;
        Ok(r)
    })();
    let restore = c
        .pragma_update(Some("main"), "synchronous", "NORMAL")
        .with_context(|| format!("{what}: restoring synchronous=NORMAL"));
    let r = result?;
    restore?;
    Ok(r)
}

/// A transaction on the token store only (always `synchronous=FULL`). Deferred, so that its
/// first statement (a write to `tokens.*`) locks the token store alone: `BEGIN IMMEDIATE`
/// would take the write lock of every attached file, and a user's `sqlite3` holding the
/// history's write lock would then keep a rotated pair from being saved.
fn durably_tokens<R>(
    c: &mut Connection,
    what: &str,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .with_context(|| format!("{what}: starting the transaction"))?;
    let r = f(&tx)?;
    tx.commit().with_context(|| format!("{what}: committing"))?;
    Ok(r)
}

/// The token store's half of a connection upsert: the pair, keyed by connection and user.
/// A row another user left under this id (a restored history reused it) is replaced.
fn put_tokens(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    user_id: &str,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO tokens.connection_tokens (connection_id, user_id, access_token,
             refresh_token, access_expires_at, refresh_expires_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (connection_id) DO UPDATE SET
             user_id = excluded.user_id,
             access_token = excluded.access_token,
             refresh_token = excluded.refresh_token,
             access_expires_at = excluded.access_expires_at,
             refresh_expires_at = excluded.refresh_expires_at,
             updated_at = excluded.updated_at",
        params![
            id,
            user_id,
            tokens.access_token.expose(),
            tokens.refresh_token.expose(),
            tokens.access_expires_at,
            tokens.refresh_expires_at,
            now
        ],
    )
    .context("storing the tokens in the token store")?;
    Ok(())
}

/// Upsert by user_id: a reconnect replaces the tokens and sets status active. One
/// transaction over the history (who, status, expiry) and the token store (the pair), with
/// synchronous=FULL for both.
pub fn upsert_connection(
    c: &mut Connection,
    user_id: &str,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<ConnectionId> {
    durably(c, "saving the connection", |tx| {
        let id: i64 = tx
            .query_row(
                "INSERT INTO connections (user_id, status, access_expires_at,
                     refresh_expires_at, created_at, updated_at)
                 VALUES (?1, 'active', ?2, ?3, ?4, ?4)
                 ON CONFLICT (user_id) DO UPDATE SET
                     status = 'active',
                     access_expires_at = excluded.access_expires_at,
                     refresh_expires_at = excluded.refresh_expires_at,
                     updated_at = excluded.updated_at
                 RETURNING id",
                params![
                    user_id,
                    tokens.access_expires_at,
                    tokens.refresh_expires_at,
                    now
                ],
                |r| r.get(0),
            )
            .context("inserting or updating the connection row")?;
        put_tokens(tx, id, user_id, tokens, now)?;
        Ok(ConnectionId(id))
    })
}

/// Stores a connection made with API Authentication (smartcar-api.md §10.2): keyed by the user
/// id Smartcar gave, with no token (the application token lives in memory only). A connection
/// the user made earlier with per-user tokens keeps its pair; its status becomes active.
pub fn upsert_app_connection(
    c: &mut Connection,
    user_id: &str,
    now: UnixMillis,
) -> anyhow::Result<ConnectionId> {
    durably(c, "saving the connection", |tx| {
        let id: i64 = tx
            .query_row(
                "INSERT INTO connections (user_id, status, access_expires_at,
                     refresh_expires_at, created_at, updated_at)
                 VALUES (?1, 'active', 0, 0, ?2, ?2)
                 ON CONFLICT (user_id) DO UPDATE SET
                     status = 'active',
                     updated_at = excluded.updated_at
                 RETURNING id",
                params![user_id, now],
                |r| r.get(0),
            )
            .context("inserting or updating the connection row")?;
        // A pair another user left under this id is not this user's.
        tx.execute(
            "DELETE FROM tokens.connection_tokens WHERE connection_id = ?1 AND user_id <> ?2",
            params![id, user_id],
        )
        .context("clearing a stale pair from the token store")?;
        Ok(ConnectionId(id))
    })
}

/// The history's copy of a pair's expiry times (`connections.access_expires_at`, ...), which
/// `carpulse status` and readers of the history show. Not the pair itself, and not critical:
/// the token store is the truth, so a failure here is logged and the pair stays saved.
fn copy_expiry(c: &Connection, id: ConnectionId, tokens: &TokenPair, now: UnixMillis) {
    let result = c.execute(
        "UPDATE connections SET access_expires_at = ?2, refresh_expires_at = ?3, updated_at = ?4
         WHERE id = ?1",
        params![
            id.0,
            tokens.access_expires_at,
            tokens.refresh_expires_at,
            now
        ],
    );
    if let Err(e) = result {
        tracing::warn!(connection = %id, error = %e, "the token pair is saved, but the history's copy of its expiry could not be updated");
    }
}

/// Persists a rotated pair durably: its own transaction in the token store (always
/// `synchronous=FULL`). Fails if the connection has no pair stored (a rotated token must never
/// vanish).
pub fn save_tokens(
    c: &mut Connection,
    id: ConnectionId,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<()> {
    durably_tokens(c, "saving rotated tokens", |tx| {
        let n = tx
            .execute(
                "UPDATE tokens.connection_tokens SET access_token = ?2, refresh_token = ?3,
                     access_expires_at = ?4, refresh_expires_at = ?5, updated_at = ?6
                 WHERE connection_id = ?1",
                params![
                    id.0,
                    tokens.access_token.expose(),
                    tokens.refresh_token.expose(),
                    tokens.access_expires_at,
                    tokens.refresh_expires_at,
                    now
                ],
            )
            .with_context(|| format!("updating the tokens of connection {id}"))?;
        if n == 0 {
            bail!("connection {id} is not in the token store; its rotated tokens were not saved");
        }
        Ok(())
    })?;
    copy_expiry(c, id, tokens, now);
    Ok(())
}

/// What became of a rotated pair.
#[derive(Debug)]
pub enum Rotation {
    Saved,
    /// The stored pair is no longer the one that was refreshed: `carpulse connect` stored a
    /// new grant meanwhile. That record is returned for the daemon to adopt.
    Superseded(ConnectionRecord),
}

/// Saves a rotated pair only while the token store still holds the refresh token it came
/// from, so a refresher never overwrites a reconnect's newer grant. Durable, like
/// [`save_tokens`]; the history's copy of the expiry is updated after the pair is committed.
pub fn save_rotated(
    c: &mut Connection,
    id: ConnectionId,
    refreshed: &Secret,
    tokens: &TokenPair,
    now: UnixMillis,
) -> anyhow::Result<Rotation> {
    let saved = durably_tokens(c, "saving rotated tokens", |tx| {
        let n = tx
            .execute(
                "UPDATE tokens.connection_tokens SET access_token = ?2, refresh_token = ?3,
                     access_expires_at = ?4, refresh_expires_at = ?5, updated_at = ?6
                 WHERE connection_id = ?1 AND refresh_token = ?7",
                params![
                    id.0,
                    tokens.access_token.expose(),
                    tokens.refresh_token.expose(),
                    tokens.access_expires_at,
                    tokens.refresh_expires_at,
                    now,
                    refreshed.expose()
                ],
            )
            .with_context(|| format!("updating the tokens of connection {id}"))?;
        Ok(n == 1)
    })?;
    if saved {
        copy_expiry(c, id, tokens, now);
        return Ok(Rotation::Saved);
    }
    match load_connections(c)?.into_iter().find(|r| r.id == id) {
        Some(r) => Ok(Rotation::Superseded(r)),
        None => bail!("connection {id} is not in the store; its rotated tokens were not saved"),
    }
}

/// Sets `connections.status` (e.g. `needs_reauth` after `invalid_grant`).
pub fn set_connection_status(
    c: &Connection,
    id: ConnectionId,
    status: ConnectionStatus,
    now: UnixMillis,
) -> anyhow::Result<()> {
    let n = c
        .execute(
            "UPDATE connections SET status = ?2, updated_at = ?3 WHERE id = ?1",
            params![id.0, status.as_str(), now],
        )
        .with_context(|| format!("setting the status of connection {id}"))?;
    if n == 0 {
        bail!("connection {id} is not in the store");
    }
    Ok(())
}

/// Maps a stored status; one a user typed by hand is treated as needing re-auth (not polled)
/// rather than making the whole store unreadable.
fn parse_status(id: i64, s: &str) -> ConnectionStatus {
    ConnectionStatus::parse(s).unwrap_or_else(|| {
        tracing::warn!(
            connection = id,
            status = s,
            "unknown connection status in the store; treating it as needs_reauth"
        );
        ConnectionStatus::NeedsReauth
    })
}

/// Every connection with its tokens, by id. The pairs come from the token store when it is
/// attached (the daemon, `connect`): a per-user connection whose pair is missing there (a
/// history restored without its token store) is reported `needs_reauth`. Without the token
/// store (a read-only reader of the history) the tokens are empty and the expiry times are the
/// history's copy.
pub fn load_connections(c: &Connection) -> anyhow::Result<Vec<ConnectionRecord>> {
    let with_tokens = super::token_store::attached(c);
    let sql = if with_tokens {
        "SELECT c.id, c.user_id, c.status, t.access_token, t.refresh_token,
                coalesce(t.access_expires_at, c.access_expires_at),
                coalesce(t.refresh_expires_at, c.refresh_expires_at),
                t.connection_id IS NULL AND c.refresh_expires_at > 0
         FROM connections c
         LEFT JOIN tokens.connection_tokens t
                ON t.connection_id = c.id AND t.user_id = c.user_id
         ORDER BY c.id"
    } else {
        "SELECT id, user_id, status, NULL, NULL, access_expires_at, refresh_expires_at, 0
         FROM connections ORDER BY id"
    };
    let mut stmt = c.prepare(sql).context("preparing the connections query")?;
    let rows = stmt
        .query_map([], |r| {
            let id: i64 = r.get(0)?;
            let status: String = r.get(2)?;
            let lost: bool = r.get(7)?;
            let status = match parse_status(id, &status) {
                ConnectionStatus::Active if lost => ConnectionStatus::NeedsReauth,
                s => s,
            };
            Ok(ConnectionRecord {
                id: ConnectionId(id),
                user_id: r.get(1)?,
                status,
                tokens: TokenPair {
                    access_token: Secret::new(r.get::<_, Option<String>>(3)?.unwrap_or_default()),
                    refresh_token: Secret::new(r.get::<_, Option<String>>(4)?.unwrap_or_default()),
                    access_expires_at: r.get(5)?,
                    refresh_expires_at: r.get(6)?,
                },
            })
        })
        .context("loading connections")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a connection row")
}

/// Insert or move to `connection_id`; keeps `enabled` and any VIN already known; info updates
/// make/model/year when Some.
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
         ON CONFLICT (vehicle_id) DO UPDATE SET
             connection_id = excluded.connection_id,
             make = coalesce(excluded.make, make),
             model = coalesce(excluded.model, model),
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
    .with_context(|| format!("storing vehicle {vehicle_id} of connection {connection_id}"))?;
    Ok(())
}

const VEHICLE_COLUMNS: &str =
    "v.vehicle_id, v.connection_id, v.make, v.model, v.year, v.vin, v.enabled";

fn vehicle_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VehicleRecord> {
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

/// Every vehicle, in the order they were added.
pub fn load_vehicles(c: &Connection) -> anyhow::Result<Vec<VehicleRecord>> {
    let mut stmt = c
        .prepare(&format!(
            "SELECT {VEHICLE_COLUMNS} FROM vehicles v ORDER BY v.id"
        ))
        .context("preparing the vehicles query")?;
    let rows = stmt
        .query_map([], vehicle_from_row)
        .context("loading vehicles")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle row")
}

/// Enables or disables polling of a vehicle; false if the vehicle is unknown.
pub fn set_vehicle_enabled(
    c: &Connection,
    vehicle_id: &VehicleId,
    enabled: bool,
) -> anyhow::Result<bool> {
    let n = c
        .execute(
            "UPDATE vehicles SET enabled = ?2 WHERE vehicle_id = ?1",
            params![vehicle_id.0, enabled as i64],
        )
        .with_context(|| format!("setting enabled={enabled} on vehicle {vehicle_id}"))?;
    Ok(n > 0)
}

/// Deletes the vehicle and its history (`vehicles remove --purge`); false if unknown. The
/// history goes with it through the `vehicles_after_delete` trigger, which also tells the
/// writer to drop its cached key.
pub fn remove_vehicle(c: &mut Connection, vehicle_id: &VehicleId) -> anyhow::Result<bool> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .with_context(|| format!("removing vehicle {vehicle_id}: starting the transaction"))?;
    let n = tx
        .execute(
            "DELETE FROM vehicles WHERE vehicle_id = ?1",
            params![vehicle_id.0],
        )
        .with_context(|| format!("removing vehicle {vehicle_id}"))?;
    tx.commit()
        .with_context(|| format!("removing vehicle {vehicle_id}: committing"))?;
    Ok(n > 0)
}

/// What a purge of one vehicle would delete, for the question `vehicles remove --purge` asks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryCounts {
    pub battery: i64,
    pub charge: i64,
    pub odometer: i64,
    pub poll_events: i64,
    /// Hours, days and sessions summarised by retention.
    pub rollups: i64,
}

/// The history rows of one vehicle; None if the vehicle is unknown.
pub fn history_counts(
    c: &Connection,
    vehicle_id: &VehicleId,
) -> anyhow::Result<Option<HistoryCounts>> {
    let key: Option<i64> = c
        .query_row(
            "SELECT id FROM vehicles WHERE vehicle_id = ?1",
            [&vehicle_id.0],
            |r| r.get(0),
        )
        .optional()
        .with_context(|| format!("looking up vehicle {vehicle_id}"))?;
    let Some(key) = key else {
        return Ok(None);
    };
    let (battery, charge, odometer) = c
        .query_row(
            "SELECT count(soc_cp), count(charge_state), count(odometer_m) FROM readings
             WHERE vehicle = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .with_context(|| format!("counting the readings of {vehicle_id}"))?;
    let poll_events = c
        .query_row(
            "SELECT (SELECT count(*) FROM poll_log e
                     JOIN poll_endpoints p ON (e.endpoints & p.bit) <> 0
                     WHERE e.vehicle = ?1)
                  + (SELECT count(*) FROM readings r
                     JOIN poll_endpoints p ON (r.poll_endpoints & p.bit) <> 0
                     WHERE r.vehicle = ?1 AND r.poll_endpoints IS NOT NULL
                       AND r.recorded_at + r.fetch_lag_ms
                           >= (SELECT ok_events_since FROM store_state WHERE id = 1))",
            [key],
            |r| r.get(0),
        )
        .with_context(|| format!("counting the poll events of {vehicle_id}"))?;
    let rollups = c
        .query_row(
            "SELECT (SELECT count(*) FROM battery_rollup_hourly WHERE vehicle = ?1)
                  + (SELECT count(*) FROM odometer_rollup_daily WHERE vehicle = ?1)
                  + (SELECT count(*) FROM charge_session_log WHERE vehicle = ?1)",
            [key],
            |r| r.get(0),
        )
        .with_context(|| format!("counting the rollups of {vehicle_id}"))?;
    Ok(Some(HistoryCounts {
        battery,
        charge,
        odometer,
        poll_events,
        rollups,
    }))
}

/// Stored ms + lag back to a [`Stamp`].
fn stamp(recorded_at: i64, lag: i64) -> Stamp {
    Stamp {
        recorded_at,
        fetched_at: recorded_at.saturating_add(lag),
    }
}

/// How far back from a vehicle's newest reading its latest reading of each kind is looked for.
const LATEST_WINDOW_MS: i64 = 31 * 86_400_000;

/// Fails with what to do when the history has an older schema than this carpulse reads (a
/// read-only command run after an upgrade, before the daemon restarted and migrated it).
pub fn require_current_schema(c: &Connection) -> anyhow::Result<()> {
    let version = super::migrate::current_version(c)?;
    let latest = super::migrate::latest_version();
    if version < latest {
        bail!(
            "the store has schema version {version} and this carpulse reads version {latest}: \
             restart the daemon (systemctl restart carpulse) or run `carpulse migrate` to \
             migrate it (a snapshot is kept)"
        );
    }
    Ok(())
}

/// Every vehicle with its connection status and latest readings, for `vehicles list` and
/// `status`. Each "latest" is a short walk back on the primary key, so this stays cheap per
/// vehicle.
pub fn vehicle_summaries(c: &Connection) -> anyhow::Result<Vec<VehicleSummary>> {
    require_current_schema(c)?;
    let mut vehicles = c
        .prepare(&format!(
            "SELECT {VEHICLE_COLUMNS}, v.id, c.id, c.status
             FROM vehicles v JOIN connections c ON c.id = v.connection_id
             ORDER BY v.id"
        ))
        .context("preparing the vehicle summary query")?;
    let rows = vehicles
        .query_map([], |r| {
            let conn_id: i64 = r.get(8)?;
            let status: String = r.get(9)?;
            Ok((vehicle_from_row(r)?, r.get::<_, i64>(7)?, conn_id, status))
        })
        .context("loading vehicles for the summary")?
        .collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle row for the summary")?;

    // Each kind's latest is the newest row holding it, looked for within a month of the
    // vehicle's newest row: a car that never reports a kind (an ICE car has no battery) costs
    // a bounded walk, not a scan of its whole history.
    let mut battery = c.prepare_cached(
        "SELECT recorded_at, coalesce((SELECT battery_lag_ms FROM reading_lags l
                                      WHERE l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at),
                                     fetch_lag_ms), soc_cp, range_m
         FROM readings r
         WHERE vehicle = ?1 AND soc_cp IS NOT NULL
           AND recorded_at >= (SELECT max(recorded_at) FROM readings WHERE vehicle = ?1) - ?2
         ORDER BY recorded_at DESC LIMIT 1",
    )?;
    let mut charge = c.prepare_cached(
        "SELECT recorded_at, coalesce((SELECT charge_lag_ms FROM reading_lags l
                                      WHERE l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at),
                                     fetch_lag_ms), plugged_in, charge_state
         FROM readings r
         WHERE vehicle = ?1 AND charge_state IS NOT NULL
           AND recorded_at >= (SELECT max(recorded_at) FROM readings WHERE vehicle = ?1) - ?2
         ORDER BY recorded_at DESC LIMIT 1",
    )?;
    let mut odometer = c.prepare_cached(
        "SELECT recorded_at, coalesce((SELECT odometer_lag_ms FROM reading_lags l
                                      WHERE l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at),
                                     fetch_lag_ms), odometer_m
         FROM readings r
         WHERE vehicle = ?1 AND odometer_m IS NOT NULL
           AND recorded_at >= (SELECT max(recorded_at) FROM readings WHERE vehicle = ?1) - ?2
         ORDER BY recorded_at DESC LIMIT 1",
    )?;
    // The newest poll; of its rows, a failure before a success, and the last endpoint. An `ok`
    // poll kept beside its readings (schema 4): the latest of the rows within a day before the
    // newest row keeping one (a kept reading is at most a day older than its poll, and the
    // newest reading is not always the newest poll's), looked for within a month of the
    // vehicle's newest reading.
    let mut poll = c.prepare_cached(
        "SELECT at, (SELECT name FROM poll_endpoints p WHERE (bits & p.bit) <> 0
                     ORDER BY p.bit DESC LIMIT 1),
                outcome, http_status, error_type, error_code
         FROM (SELECT * FROM (SELECT e.at AS at, e.endpoints AS bits, e.outcome AS outcome,
                                     e.http_status AS http_status, e.error_type AS error_type,
                                     e.error_code AS error_code
                              FROM poll_log e WHERE e.vehicle = ?1
                              ORDER BY e.at DESC, e.outcome <> 'ok' DESC, e.endpoints DESC
                              LIMIT 1)
               UNION ALL
               SELECT * FROM (SELECT r.recorded_at + r.fetch_lag_ms AS at, r.poll_endpoints,
                                     'ok', NULL, NULL, NULL
                              FROM readings r
                              WHERE r.vehicle = ?1 AND r.poll_endpoints IS NOT NULL
                                AND r.recorded_at >= (SELECT k.recorded_at FROM readings k
                                                      WHERE k.vehicle = ?1
                                                        AND k.poll_endpoints IS NOT NULL
                                                        AND k.recorded_at >= (SELECT max(recorded_at)
                                                            FROM readings WHERE vehicle = ?1) - ?2
                                                      ORDER BY k.recorded_at DESC LIMIT 1) - ?3
                              ORDER BY at DESC LIMIT 1))
         ORDER BY at DESC, outcome <> 'ok' DESC, bits DESC LIMIT 1",
    )?;

    let mut out = Vec::with_capacity(rows.len());
    for (vehicle, key, conn_id, status) in rows {
        let vid = vehicle.vehicle_id.clone();
        let last_battery = battery
            .query_row([key, LATEST_WINDOW_MS], |r| {
                Ok(BatteryReading {
                    stamp: stamp(r.get(0)?, r.get(1)?),
                    soc_percent: r.get::<_, i64>(2)? as f64 / 100.0,
                    range_km: r.get::<_, Option<i64>>(3)?.map(|m| m as f64 / 1000.0),
                })
            })
            .optional()
            .with_context(|| format!("reading the last battery reading of {vid}"))?;
        let last_charge = charge
            .query_row([key, LATEST_WINDOW_MS], |r| {
                let code: i64 = r.get(3)?;
                Ok((
                    stamp(r.get(0)?, r.get(1)?),
                    r.get::<_, i64>(2)? != 0,
                    ChargeState::ALL.into_iter().find(|s| s.code() == code),
                ))
            })
            .optional()
            .with_context(|| format!("reading the last charge reading of {vid}"))?
            // A state code this build doesn't know is shown as no reading, not as a wrong one.
            .and_then(|(stamp, plugged_in, state)| {
                state.map(|state| ChargeReading {
                    stamp,
                    plugged_in,
                    state,
                })
            });
        let last_odometer = odometer
            .query_row([key, LATEST_WINDOW_MS], |r| {
                Ok(OdometerReading {
                    stamp: stamp(r.get(0)?, r.get(1)?),
                    odometer_km: r.get::<_, i64>(2)? as f64 / 1000.0,
                })
            })
            .optional()
            .with_context(|| format!("reading the last odometer reading of {vid}"))?;
        let last_poll = poll
            .query_row(
                [key, LATEST_WINDOW_MS, super::writer::KEEP_LAG_MAX_MS],
                |r| {
                    Ok(PollEvent {
                        vehicle_id: vid.clone(),
                        at: r.get(0)?,
                        endpoint: r.get::<_, Option<String>>(1)?.unwrap_or_default().into(),
                        outcome: r.get::<_, String>(2)?.into(),
                        http_status: r
                            .get::<_, Option<i64>>(3)?
                            .and_then(|s| u16::try_from(s).ok()),
                        error_type: r.get(4)?,
                        error_code: r.get(5)?,
                        calls: None,
                    })
                },
            )
            .optional()
            .with_context(|| format!("reading the last poll event of {vid}"))?;
        out.push(VehicleSummary {
            vehicle,
            connection_status: parse_status(conn_id, &status),
            last_battery,
            last_charge,
            last_odometer,
            last_poll,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::migrate::migrate;

    pub(crate) fn memory_store() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "foreign_keys", true).unwrap();
        crate::store::token_store::attach(&c, std::path::Path::new(":memory:")).unwrap();
        migrate(&mut c).unwrap();
        c
    }

    fn pair(tag: &str, at: i64) -> TokenPair {
        TokenPair {
            access_token: Secret::new(format!("access-{tag}-5f1c")),
            refresh_token: Secret::new(format!("refresh-{tag}-9a7e")),
            access_expires_at: at + 7_200_000,
            refresh_expires_at: at + crate::domain::REFRESH_TOKEN_LIFETIME_MS,
        }
    }

    #[test]
    fn tokens_round_trip_and_reconnect_replaces_them() {
        let mut c = memory_store();
        let first = pair("one", 1_000);
        let id = upsert_connection(&mut c, "user-1", &first, 1_000).unwrap();
        let loaded = load_connections(&c).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, id);
        assert_eq!(loaded[0].user_id, "user-1");
        assert_eq!(loaded[0].status, ConnectionStatus::Active);
        assert_eq!(loaded[0].tokens, first);

        set_connection_status(&c, id, ConnectionStatus::NeedsReauth, 2_000).unwrap();
        assert_eq!(
            load_connections(&c).unwrap()[0].status,
            ConnectionStatus::NeedsReauth
        );

        // Reconnect: same user, same id, new tokens, active again.
        let second = pair("two", 3_000);
        assert_eq!(
            upsert_connection(&mut c, "user-1", &second, 3_000).unwrap(),
            id
        );
        let loaded = load_connections(&c).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].status, ConnectionStatus::Active);
        assert_eq!(loaded[0].tokens, second);

        // Rotation.
        let third = pair("three", 4_000);
        save_tokens(&mut c, id, &third, 4_000).unwrap();
        assert_eq!(load_connections(&c).unwrap()[0].tokens, third);
        let sync: i64 = c
            .pragma_query_value(Some("main"), "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "the history is back to NORMAL after a token save");
        let sync: i64 = c
            .pragma_query_value(Some("tokens"), "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "the token store is always FULL");
        // The history keeps a copy of the expiry, never the pair.
        let expiry: i64 = c
            .query_row(
                "SELECT refresh_expires_at FROM main.connections WHERE id = ?1",
                [id.0],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(expiry, third.refresh_expires_at);

        let created: (i64, i64) = c
            .query_row(
                "SELECT created_at, updated_at FROM connections WHERE id = ?1",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(created, (1_000, 4_000));

        // Saving to a connection that doesn't exist is an error, and names no token.
        let err = save_tokens(&mut c, ConnectionId(999), &third, 5_000).unwrap_err();
        let msg = format!("{err:#} {err:?}");
        assert!(msg.contains("999"), "{msg}");
        assert!(!msg.contains("access-three"), "{msg}");
        assert!(!msg.contains("refresh-three"), "{msg}");
        // Debug of a record never shows a token.
        let dbg = format!("{:?}", load_connections(&c).unwrap());
        assert!(
            !dbg.contains("access-three") && !dbg.contains("refresh-three"),
            "{dbg}"
        );
    }

    #[test]
    fn vehicles_upsert_move_enable_and_remove() {
        let mut c = memory_store();
        let a = upsert_connection(&mut c, "user-a", &pair("a", 0), 0).unwrap();
        let b = upsert_connection(&mut c, "user-b", &pair("b", 0), 0).unwrap();
        let v = VehicleId("36ab27d0-fd9d-4455-823a-ce30af709ffc".into());
        upsert_vehicle(&c, a, &v, None, 10).unwrap();
        let got = load_vehicles(&c).unwrap();
        assert_eq!(
            got,
            vec![VehicleRecord {
                vehicle_id: v.clone(),
                connection_id: a,
                make: None,
                model: None,
                year: None,
                vin: None,
                enabled: true,
            }]
        );
        let info = VehicleInfo {
            make: "TESLA".into(),
            model: "Model 3".into(),
            year: 2021,
        };
        upsert_vehicle(&c, a, &v, Some(&info), 20).unwrap();
        c.execute(
            "UPDATE vehicles SET vin = '5YJ3E1EA7KF000001' WHERE vehicle_id = ?1",
            [&v.0],
        )
        .unwrap();
        assert!(set_vehicle_enabled(&c, &v, false).unwrap());
        assert!(!set_vehicle_enabled(&c, &VehicleId("nope".into()), false).unwrap());
        // Moving to another connection without info keeps make/model/year, VIN and enabled.
        upsert_vehicle(&c, b, &v, None, 30).unwrap();
        let got = load_vehicles(&c).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].connection_id, b);
        assert_eq!(got[0].make.as_deref(), Some("TESLA"));
        assert_eq!(got[0].model.as_deref(), Some("Model 3"));
        assert_eq!(got[0].year, Some(2021));
        assert_eq!(got[0].vin.as_deref(), Some("5YJ3E1EA7KF000001"));
        assert!(!got[0].enabled);
        let added_at: i64 = c
            .query_row("SELECT added_at FROM vehicles", [], |r| r.get(0))
            .unwrap();
        assert_eq!(added_at, 10);

        // Removal takes the history with it.
        c.execute(
            "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp)
             VALUES ((SELECT id FROM vehicles), 5, 1, 5000)",
            [],
        )
        .unwrap();
        assert!(remove_vehicle(&mut c, &v).unwrap());
        assert!(!remove_vehicle(&mut c, &v).unwrap());
        assert!(load_vehicles(&c).unwrap().is_empty());
        let left: i64 = c
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        let epoch: i64 = c
            .query_row("SELECT vehicle_epoch FROM store_state", [], |r| r.get(0))
            .unwrap();
        assert_eq!(epoch, 1);
    }

    #[test]
    fn summaries_show_the_latest_of_each_kind() {
        let mut c = memory_store();
        let conn = upsert_connection(&mut c, "u", &pair("s", 0), 0).unwrap();
        let v = VehicleId("veh-1".into());
        let quiet = VehicleId("veh-2".into());
        upsert_vehicle(&c, conn, &v, None, 0).unwrap();
        upsert_vehicle(&c, conn, &quiet, None, 0).unwrap();
        let key: i64 = c
            .query_row(
                "SELECT id FROM vehicles WHERE vehicle_id='veh-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        c.execute_batch(&format!(
            "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m)
                 VALUES ({key}, 1000, 5, 5000, 100000), ({key}, 2000, 7, 6834, 312400);
             INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, plugged_in, charge_state)
                 VALUES ({key}, 1500, 3, 1, 2);
             INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, odometer_m)
                 VALUES ({key}, 1700, 0, 12345678);
             INSERT INTO poll_log (vehicle, at, endpoints, outcome, http_status, error_type, error_code)
                 VALUES ({key}, 900, 1, 'ok', 200, NULL, NULL),
                        ({key}, 2100, 1, 'ok', 200, NULL, NULL),
                        ({key}, 2100, 2, 'vehicle_state', 409, 'VEHICLE_STATE', 'ASLEEP');"
        ))
        .unwrap();
        set_connection_status(&c, conn, ConnectionStatus::NeedsReauth, 1).unwrap();
        let s = vehicle_summaries(&c).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].vehicle.vehicle_id, v);
        assert_eq!(s[0].connection_status, ConnectionStatus::NeedsReauth);
        assert_eq!(
            s[0].last_battery,
            Some(BatteryReading {
                stamp: Stamp {
                    recorded_at: 2000,
                    fetched_at: 2007
                },
                soc_percent: 68.34,
                range_km: Some(312.4),
            })
        );
        assert_eq!(
            s[0].last_charge,
            Some(ChargeReading {
                stamp: Stamp {
                    recorded_at: 1500,
                    fetched_at: 1503
                },
                plugged_in: true,
                state: ChargeState::FullyCharged,
            })
        );
        assert_eq!(
            s[0].last_odometer,
            Some(OdometerReading {
                stamp: Stamp {
                    recorded_at: 1700,
                    fetched_at: 1700
                },
                odometer_km: 12345.678,
            })
        );
        assert_eq!(
            s[0].last_poll,
            Some(PollEvent {
                vehicle_id: v.clone(),
                at: 2100,
                endpoint: "charge".into(),
                outcome: "vehicle_state".into(),
                http_status: Some(409),
                error_type: Some("VEHICLE_STATE".into()),
                error_code: Some("ASLEEP".into()),
                calls: None,
            })
        );
        assert_eq!(s[1].vehicle.vehicle_id, quiet);
        assert_eq!(s[1].last_battery, None);
        assert_eq!(s[1].last_charge, None);
        assert_eq!(s[1].last_odometer, None);
        assert_eq!(s[1].last_poll, None);
    }
}

/// One thing a vehicle cannot be asked for: an endpoint, or the whole vehicle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub vehicle_id: VehicleId,
    pub scope: crate::domain::BlockScope,
    pub source: String,
    pub reason: String,
    /// For a [`crate::domain::BlockScope::Wait`]: no call before then.
    pub until: Option<UnixMillis>,
}

/// A [`Block`] from a row of (vehicle_id, endpoint, source, reason, until).
fn block_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Block> {
    Ok(Block {
        vehicle_id: VehicleId(r.get(0)?),
        scope: crate::domain::BlockScope::from_column(r.get_ref(1)?.as_str()?),
        source: r.get(2)?,
        reason: r.get(3)?,
        until: r.get(4)?,
    })
}

/// Every stored block, for the gates at start and at each reload.
pub fn load_blocks(c: &Connection) -> anyhow::Result<Vec<Block>> {
    let mut stmt = c
        .prepare(
            "SELECT v.vehicle_id, b.endpoint, b.source, b.reason, b.until
             FROM vehicle_blocks b JOIN vehicles v ON v.id = b.vehicle
             ORDER BY v.id, b.endpoint",
        )
        .context("preparing the blocked endpoints query")?;
    let rows = stmt
        .query_map([], block_from_row)
        .context("loading blocked endpoints")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a blocked endpoint row")
}

/// Records a capability discovery: its blocks replace the vehicle's earlier discovery blocks
/// (a block an answer caused stays), and `capabilities_at` is set. False if the vehicle is
/// unknown.
pub fn save_discovery(
    c: &mut Connection,
    vehicle_id: &VehicleId,
    blocked: &[(String, String)],
    now: UnixMillis,
) -> anyhow::Result<bool> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .with_context(|| format!("saving the capabilities of {vehicle_id}: starting"))?;
    let key: Option<i64> = tx
        .query_row(
            "SELECT id FROM vehicles WHERE vehicle_id = ?1",
            [&vehicle_id.0],
            |r| r.get(0),
        )
        .optional()
        .with_context(|| format!("looking up vehicle {vehicle_id}"))?;
    let Some(key) = key else {
        return Ok(false);
    };
    tx.execute(
        "DELETE FROM vehicle_blocks WHERE vehicle = ?1 AND source = 'discovery'",
        [key],
    )
    .with_context(|| format!("clearing the old capabilities of {vehicle_id}"))?;
    for (endpoint, reason) in blocked {
        tx.execute(
            "INSERT OR IGNORE INTO vehicle_blocks (vehicle, endpoint, source, reason, since)
             VALUES (?1, ?2, 'discovery', ?3, ?4)",
            params![key, endpoint, reason, now],
        )
        .with_context(|| format!("blocking {endpoint} of {vehicle_id}"))?;
    }
    tx.execute(
        "UPDATE vehicles SET capabilities_at = ?2 WHERE id = ?1",
        params![key, now],
    )
    .with_context(|| format!("dating the capabilities of {vehicle_id}"))?;
    tx.commit()
        .with_context(|| format!("saving the capabilities of {vehicle_id}: committing"))?;
    Ok(true)
}

/// Notes a capability reading that told nothing (the server has no such reading): its
/// earlier findings stay, and it is due again after `schedule.discover_every`.
pub fn touch_discovery(
    c: &Connection,
    vehicle_id: &VehicleId,
    now: UnixMillis,
) -> anyhow::Result<()> {
    c.execute(
        "UPDATE vehicles SET capabilities_at = ?2 WHERE vehicle_id = ?1",
        params![vehicle_id.0, now],
    )
    .with_context(|| format!("dating the capabilities of vehicle {vehicle_id}"))?;
    Ok(())
}

/// Lifts a vehicle's blocks: all of them (a reconnect, whose consent may grant what the old
/// one did not; its capabilities are read again), or only those answers caused (`vehicles
/// enable`: the owner says the cause is fixed). Returns how many were lifted.
pub fn clear_blocks(
    c: &Connection,
    vehicle_id: &VehicleId,
    only_from_polls: bool,
) -> anyhow::Result<usize> {
    // A wait stays: the car's and Smartcar's limits do not change with a consent.
    let filter = if only_from_polls {
        " AND source = 'poll' AND endpoint <> '~'"
    } else {
        " AND endpoint <> '~'"
    };
    let n = c
        .execute(
            &format!(
                "DELETE FROM vehicle_blocks
                 WHERE vehicle = (SELECT id FROM vehicles WHERE vehicle_id = ?1){filter}"
            ),
            [&vehicle_id.0],
        )
        .with_context(|| format!("lifting the blocks of vehicle {vehicle_id}"))?;
    if !only_from_polls {
        c.execute(
            "UPDATE vehicles SET capabilities_at = NULL WHERE vehicle_id = ?1",
            [&vehicle_id.0],
        )
        .with_context(|| format!("marking vehicle {vehicle_id} for capability discovery"))?;
    }
    Ok(n)
}

/// Lifts a vehicle's wait (`~`: a `retry-after` or backoff): `carpulse vehicles enable` says
/// ask again now. Returns how many were lifted (0 or 1).
pub fn clear_wait(c: &Connection, vehicle_id: &VehicleId) -> anyhow::Result<usize> {
    c.execute(
        "DELETE FROM vehicle_blocks
         WHERE vehicle = (SELECT id FROM vehicles WHERE vehicle_id = ?1) AND endpoint = '~'",
        [&vehicle_id.0],
    )
    .with_context(|| format!("lifting the wait of vehicle {vehicle_id}"))
}

/// Corrects every stored wait that ends after `max_until` to end then (an older carpulse
/// stored an HTTP-date `retry-after` uncapped: "in 2,912,109 days"). Returns how many rows
/// were corrected.
pub fn cap_waits(c: &Connection, max_until: UnixMillis) -> anyhow::Result<usize> {
    c.execute(
        "UPDATE vehicle_blocks SET until = ?1 WHERE endpoint = '~' AND until > ?1",
        [max_until],
    )
    .context("correcting waits that end too far out")
}

/// Enabled vehicles whose capabilities were never read, or not since `before`.
pub fn vehicles_to_discover(c: &Connection, before: UnixMillis) -> anyhow::Result<Vec<VehicleId>> {
    let mut stmt = c
        .prepare(
            "SELECT vehicle_id FROM vehicles
             WHERE enabled = 1 AND (capabilities_at IS NULL OR capabilities_at < ?1)
             ORDER BY id",
        )
        .context("preparing the capability discovery query")?;
    let rows = stmt
        .query_map([before], |r| Ok(VehicleId(r.get(0)?)))
        .context("finding vehicles to discover")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle id")
}

/// How long a CONNECTED_SERVICES_ACCOUNT pause lasts before one poll checks again
/// (smartcar-api.md §4.2: the owner must act; "check occasionally (hours)").
pub const ACCOUNT_PAUSE_RECHECK_MS: i64 = 6 * 3_600_000;

/// Lifts the blocks that end by themselves, and returns them: a wait (`~`) once its `until`
/// has passed; BILLING:VEHICLE_REQUEST_LIMIT (the plan's monthly quota) at the start of the
/// next month (UTC); CONNECTED_SERVICES_ACCOUNT after [`ACCOUNT_PAUSE_RECHECK_MS`] (a poll
/// checks; still failing, it pauses again).
pub fn expire_blocks(c: &Connection, now: UnixMillis) -> anyhow::Result<Vec<Block>> {
    let month = crate::daemon::gate::month_start(now);
    let recheck = now - ACCOUNT_PAUSE_RECHECK_MS;
    let mut stmt = c
        .prepare(
            "DELETE FROM vehicle_blocks
             WHERE (endpoint = '~' AND until < ?3)
                OR (endpoint = '*' AND (
                    (reason LIKE 'BILLING:VEHICLE_REQUEST_LIMIT%' AND since < ?1)
                    OR (reason LIKE 'CONNECTED_SERVICES_ACCOUNT%' AND since < ?2)))
             RETURNING (SELECT vehicle_id FROM vehicles WHERE id = vehicle), endpoint, source,
                       reason, until",
        )
        .context("preparing the pause expiry")?;
    let rows = stmt
        .query_map(params![month, recheck, now], block_from_row)
        .context("lifting pauses that are over")?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a lifted pause")
}

/// Lifts a vehicle's pause whose reason starts with `cause` (e.g. the re-authentication flow
/// fixed CONNECTED_SERVICES_ACCOUNT); other blocks stay. Returns how many were lifted.
pub fn lift_pause(c: &Connection, vehicle_id: &VehicleId, cause: &str) -> anyhow::Result<usize> {
    c.execute(
        "DELETE FROM vehicle_blocks
         WHERE vehicle = (SELECT id FROM vehicles WHERE vehicle_id = ?1)
           AND endpoint = '*' AND substr(reason, 1, length(?2)) = ?2",
        params![vehicle_id.0, cause],
    )
    .with_context(|| format!("lifting the pause of vehicle {vehicle_id}"))
}

/// (at, outcome, error type, error code) of a `poll_events` row.
pub type LastOutcome = (UnixMillis, String, Option<String>, Option<String>);

/// A vehicle's last outcome of `endpoint` after `since`, as `poll_events` has it: (at,
/// outcome, error type, error code). Two index searches, where the same question to the view
/// walks the vehicle's whole history of readings (the `ok` polls kept beside their readings
/// have no index on their time; their reading is at most a day older than the poll).
pub fn last_outcome(
    c: &Connection,
    vehicle_id: &str,
    endpoint: &str,
    since: UnixMillis,
) -> anyhow::Result<Option<LastOutcome>> {
    c.prepare_cached(
        "SELECT at, outcome, error_type, error_code FROM (
             SELECT * FROM (SELECT e.at AS at, e.outcome AS outcome, e.error_type AS error_type,
                                   e.error_code AS error_code, 0 AS kept
                            FROM vehicles v
                            JOIN poll_endpoints p ON p.name = ?2
                            JOIN poll_log e ON e.vehicle = v.id AND e.at > ?3
                            WHERE v.vehicle_id = ?1 AND (e.endpoints & p.bit) <> 0
                            ORDER BY e.at DESC, e.outcome <> 'ok' DESC LIMIT 1)
             UNION ALL
             SELECT * FROM (SELECT r.recorded_at + r.fetch_lag_ms AS at, 'ok', NULL, NULL, 1
                            FROM vehicles v
                            JOIN poll_endpoints p ON p.name = ?2
                            JOIN readings r ON r.vehicle = v.id AND r.recorded_at > ?3 - ?4
                            WHERE v.vehicle_id = ?1 AND (r.poll_endpoints & p.bit) <> 0
                              AND r.recorded_at + r.fetch_lag_ms > ?3
                              AND r.recorded_at + r.fetch_lag_ms
                                  >= (SELECT ok_events_since FROM store_state WHERE id = 1)
                              -- the newest poll is among the rows within a day before the
                              -- newest row keeping one (not always that row)
                              AND r.recorded_at >= (SELECT k.recorded_at FROM readings k
                                                    WHERE k.vehicle = v.id
                                                      AND (k.poll_endpoints & p.bit) <> 0
                                                      AND k.recorded_at > ?3 - ?4
                                                    ORDER BY k.recorded_at DESC LIMIT 1) - ?4
                            ORDER BY at DESC LIMIT 1))
         ORDER BY at DESC, kept LIMIT 1",
    )?
    .query_row(
        params![vehicle_id, endpoint, since, super::writer::KEEP_LAG_MAX_MS],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .optional()
    .with_context(|| format!("reading the last {endpoint} outcome of {vehicle_id}"))
}

/// The `poll_endpoints` bits of the info job's endpoints (`info`, `vin`, `odometer`), fixed
/// by schema 3.
const INFO_JOB_BITS: i64 = 4 | 8 | 16;

/// Smartcar calls billed per vehicle since `since`, from `poll_events`' tables: each poll's
/// first event row carries its billed `calls` (the others 0), in `poll_log` or, for an `ok`
/// poll kept beside its readings, in `readings.poll_calls`. Rows from before schema 2 have none:
/// their polls (events sharing an `at`) count as in v2 one call per event (a billed call or
/// batch item), in v3 the poll's plan price, and not at all when no token was at hand. Per
/// vehicle, so each query runs on the (vehicle, at) index.
pub fn calls_since(
    c: &Connection,
    since: UnixMillis,
    api: crate::domain::ApiVersion,
) -> anyhow::Result<std::collections::HashMap<VehicleId, u64>> {
    // One statement for the fleet (a start reads it for every vehicle before the first poll):
    // per vehicle, the calls `poll_log` holds, plus those of the polls kept beside their
    // readings (schema 4: a kept reading is at most a day older than its poll, so the month's
    // are found from a day before it on the primary key), and whether rows from before
    // schema 2 (no `calls`) need counting poll by poll.
    let mut vehicles = c
        .prepare(
            "SELECT v.id, v.vehicle_id,
                    (SELECT coalesce(sum(e.calls), 0) FROM poll_log e
                     WHERE e.vehicle = v.id AND e.at >= ?1 AND e.calls IS NOT NULL)
                  + (SELECT coalesce(sum(r.poll_calls), 0) FROM readings r
                     WHERE r.vehicle = v.id AND r.recorded_at >= ?1 - ?2
                       AND r.poll_endpoints IS NOT NULL AND r.recorded_at + r.fetch_lag_ms >= ?1),
                    EXISTS (SELECT 1 FROM poll_log e
                            WHERE e.vehicle = v.id AND e.at >= ?1 AND e.calls IS NULL)
             FROM vehicles v",
        )
        .context("preparing the billed calls query")?;
    let counted = vehicles
        .query_map(params![since, super::writer::KEEP_LAG_MAX_MS], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                VehicleId(r.get(1)?),
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .context("counting the calls of each vehicle")?
        .collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle's calls")?;
    let mut legacy = c
        .prepare_cached(
            "SELECT at, endpoints, outcome IN ('needs_reauth', 'token_error') FROM poll_log
             WHERE vehicle = ?1 AND at >= ?2 AND calls IS NULL
             ORDER BY at",
        )
        .context("preparing the older polls query")?;
    let mut used = std::collections::HashMap::new();
    for (key, vehicle, billed, older) in counted {
        let mut n = billed.max(0) as u64;
        if !older {
            if n > 0 {
                used.insert(vehicle, n);
            }
            continue;
        }
        let rows = legacy
            .query_map(params![key, since], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .with_context(|| format!("reading the older polls of vehicle {vehicle}"))?
            .collect::<Result<Vec<_>, _>>()
            .context("reading a poll row")?;
        // A poll is every row sharing its `at`: its events are the endpoints of all of them.
        for poll in rows.chunk_by(|a, b| a.0 == b.0) {
            let events: u64 = poll.iter().map(|p| u64::from(p.1.count_ones())).sum();
            let info = poll.iter().any(|p| p.1 & INFO_JOB_BITS != 0);
            let no_token = poll.iter().any(|p| p.2);
            n += match api {
                _ if no_token => 0,
                crate::domain::ApiVersion::V2 => events,
                crate::domain::ApiVersion::V3 => {
                    let job = if info {
                        crate::smartcar::Job::Info
                    } else {
                        crate::smartcar::Job::Battery
                    };
                    crate::cli::plan::calls_per_run(api, job).0
                }
            };
        }
        if n > 0 {
            used.insert(vehicle, n);
        }
    }
    Ok(used)
}
