//! The batch writer: turns queued [`WriteItem`]s into one transaction and reports, per table,
//! what was written, what was a duplicate and what was dropped.
//!
//! It runs on the store's owner thread only (so its vehicle-key cache needs no lock). One
//! transaction per batch is what makes thousands of polls per second cheap: the cost of a
//! commit (and its fsync at checkpoints) is paid once per batch, not once per row. A reading
//! that was fetched is either committed or counted as dropped, never lost silently (DESIGN §2.4).
//!
//! Shapes for size (schemas 3 and 4): the readings of one instant share a row of `readings` (a
//! v3 listing's battery, charge and odometer), written by one INSERT; the `ok` events of the
//! poll that created that row are kept in it (`poll_endpoints`, `poll_calls`: its time is the
//! row's fetched_at), and only the other events (failures, polls whose readings were already
//! stored) become `poll_log` rows, a poll's events with the same outcome sharing one row whose
//! `endpoints` is a bitmask. The views show them as before. That keeps what a poll leaves on
//! disk near 40 bytes, and the store thread's work per poll to one row insert.

use anyhow::Context;
use rusqlite::{params, CachedStatement, Connection, OptionalExtension};

use crate::domain::{PollEvent, Reading, Stamp, UnixMillis, VehicleId, VehicleInfo};
use crate::hash::FxHashMap;

/// One row (or vehicle update) bound for the store.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteItem {
    /// A battery, charge or odometer reading of a vehicle.
    Reading(VehicleId, Reading),
    /// The outcome of one poll, for `poll_events`.
    Event(PollEvent),
    /// Updates make/model/year.
    Info(VehicleId, VehicleInfo),
    /// Updates the VIN.
    Vin(VehicleId, String),
    /// An answer said the endpoint (or the whole vehicle) cannot be asked for until the
    /// owner reconnects or re-enables the vehicle; kept so a restart does not ask again.
    Block {
        vehicle_id: VehicleId,
        scope: crate::domain::BlockScope,
        reason: String,
        at: UnixMillis,
    },
    /// No call to the vehicle before `until` (a retry-after, a backoff); kept so a restart
    /// does not call early. A later wait replaces an earlier one.
    Wait {
        vehicle_id: VehicleId,
        until: UnixMillis,
        reason: String,
        at: UnixMillis,
    },
}

impl WriteItem {
    /// The table label this item is counted under.
    fn label(&self) -> Label {
        match self {
            WriteItem::Reading(_, Reading::Battery(_)) => Label::Battery,
            WriteItem::Reading(_, Reading::Charge(_)) => Label::Charge,
            WriteItem::Reading(_, Reading::Odometer(_)) => Label::Odometer,
            WriteItem::Event(_) => Label::PollEvents,
            WriteItem::Info(..)
            | WriteItem::Vin(..)
            | WriteItem::Block { .. }
            | WriteItem::Wait { .. } => Label::Vehicles,
        }
    }
}

/// What one write batch came to; the daemon feeds `carpulse_rows_written_total` /
/// `carpulse_rows_dropped_total` from it. Only labels with a non-zero count are listed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// per table label ("battery", "charge", "odometer", "poll_events", and "vehicles" for
    /// info/VIN updates): rows inserted
    pub written: Vec<(&'static str, u64)>,
    /// same key: rows skipped because (vehicle, recorded_at) was already stored
    pub duplicates: Vec<(&'static str, u64)>,
    /// same key: rows that could not be stored (unknown vehicle, invalid value, or the
    /// transaction failed) — never silent
    pub dropped: Vec<(&'static str, u64)>,
}

impl WriteReport {
    fn get(list: &[(&'static str, u64)], table: &str) -> u64 {
        list.iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, n)| *n)
            .sum()
    }
    /// Rows written under `table`.
    pub fn written_in(&self, table: &str) -> u64 {
        Self::get(&self.written, table)
    }
    /// Duplicates under `table`.
    pub fn duplicates_in(&self, table: &str) -> u64 {
        Self::get(&self.duplicates, table)
    }
    /// Rows dropped under `table`.
    pub fn dropped_in(&self, table: &str) -> u64 {
        Self::get(&self.dropped, table)
    }
}

/// Every item of `items` counted as dropped.
pub(crate) fn dropped(items: &[WriteItem]) -> WriteReport {
    let mut counts = Counts::default();
    for item in items {
        counts.dropped[item.label() as usize] += 1;
    }
    counts.into_report()
}

/// Called on the owner thread after each write batch (committed or failed).
pub type WriteObserver = std::sync::Arc<dyn Fn(&WriteReport) + Send + Sync>;

#[derive(Clone, Copy)]
enum Label {
    Battery = 0,
    Charge = 1,
    Odometer = 2,
    PollEvents = 3,
    Vehicles = 4,
}

const LABELS: [&str; 5] = ["battery", "charge", "odometer", "poll_events", "vehicles"];

/// Counters per label; a fixed array so counting a row costs nothing.
#[derive(Default)]
struct Counts {
    written: [u64; 5],
    duplicates: [u64; 5],
    dropped: [u64; 5],
}

impl Counts {
    fn into_report(self) -> WriteReport {
        let list = |a: [u64; 5]| {
            LABELS
                .iter()
                .zip(a)
                .filter(|(_, n)| *n > 0)
                .map(|(l, n)| (*l, n))
                .collect()
        };
        WriteReport {
            written: list(self.written),
            duplicates: list(self.duplicates),
            dropped: list(self.dropped),
        }
    }
}

/// Rounds a value to an integer number of `scale`ths (centi-percent, metres), or None if it
/// can't be stored honestly (NaN, infinite, absurd).
fn scaled(x: f64, scale: f64) -> Option<i64> {
    let v = (x * scale).round();
    (v.is_finite() && v.abs() < 9.0e15).then_some(v as i64)
}

/// The writer's state on the owner thread. Its maps, and a batch's, hash with
/// [`crate::hash::FxHasher`] (a poll looks a vehicle up several times; see there why an
/// unkeyed hash is acceptable for vehicle ids).
#[derive(Default)]
pub(crate) struct Writer {
    /// vehicle_id → vehicles.id. Valid while `store_state.vehicle_epoch` equals `epoch`.
    keys: FxHashMap<String, i64>,
    epoch: Option<i64>,
    /// The VIN last written per vehicle: a v3 listing carries it on every poll, and an
    /// unchanged one is not written again (a page write per poll saved).
    vins: FxHashMap<String, String>,
    /// endpoint name → its `poll_endpoints.bit` (names are only ever added).
    bits: FxHashMap<String, i64>,
}

/// The events of one poll that share an outcome become one `poll_log` row.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct EventKey<'a> {
    vehicle: i64,
    at: UnixMillis,
    outcome: &'a str,
    http_status: Option<u16>,
    error_type: Option<&'a str>,
    error_code: Option<&'a str>,
}

struct EventRow<'a> {
    key: EventKey<'a>,
    endpoints: i64,
    calls: Option<u64>,
    /// How many events it holds (each is counted under `poll_events`).
    events: u64,
    /// Kept in a `readings` row (Written), or found already kept there (Duplicate); None:
    /// bound for `poll_log`.
    kept: Option<Outcome>,
}

impl EventRow<'_> {
    /// Only a clean `ok` poll is kept beside its readings: the `poll_events` view shows such
    /// rows with no status and no error.
    fn keepable(&self) -> bool {
        let k = &self.key;
        self.kept.is_none()
            && k.outcome == "ok"
            && k.http_status.is_none()
            && k.error_type.is_none()
            && k.error_code.is_none()
    }
}

/// How old a reading may be at its poll for the row to keep the poll's event: a poll is found
/// from its time by looking this far back in `recorded_at` ([`crate::store::queries`]). Nor
/// may it be further ahead of its poll (a car's clock that runs ahead): the poll rollup finds
/// a day's kept polls within this margin of the day ([`crate::store::rollup`]).
pub(crate) const KEEP_LAG_MAX_MS: i64 = 86_400_000;

/// One kind's values, scaled as stored.
#[derive(Clone, Copy)]
enum Values {
    Battery { soc_cp: i64, range_m: Option<i64> },
    Charge { plugged_in: i64, state: i64 },
    Odometer { odometer_m: i64 },
}

impl Values {
    /// None when a value can't be stored honestly (NaN, infinite, absurd).
    fn of(reading: &Reading) -> Option<Values> {
        Some(match reading {
            Reading::Battery(b) => Values::Battery {
                soc_cp: scaled(b.soc_percent, 100.0)?,
                range_m: match b.range_km {
                    None => None,
                    Some(r) => Some(scaled(r, 1000.0)?),
                },
            },
            Reading::Charge(ch) => Values::Charge {
                plugged_in: ch.plugged_in as i64,
                state: ch.state.code(),
            },
            Reading::Odometer(o) => Values::Odometer {
                odometer_m: scaled(o.odometer_km, 1000.0)?,
            },
        })
    }

    /// Its index in [`LABELS`] and in a [`Group`]'s values.
    fn kind(&self) -> usize {
        match self {
            Values::Battery { .. } => Label::Battery as usize,
            Values::Charge { .. } => Label::Charge as usize,
            Values::Odometer { .. } => Label::Odometer as usize,
        }
    }
}

/// The readings of one vehicle at one instant in a batch, bound for one row.
struct Group<'a> {
    vehicle: i64,
    vid: &'a VehicleId,
    recorded_at: UnixMillis,
    /// The first kind's arrival: the row's fetch lag is from it.
    fetched_at: UnixMillis,
    /// Battery, charge, odometer (as [`Label`]), each with its own arrival.
    values: [Option<(Values, UnixMillis)>; 3],
    /// The event row of the poll that read them.
    poll: Option<usize>,
}

impl Writer {
    /// Writes `items` in one transaction; on failure nothing is written or counted and the
    /// caller decides (keep the batch for a retry, or drop it with [`dropped`]).
    pub(crate) fn try_write(
        &mut self,
        c: &mut Connection,
        items: &[WriteItem],
    ) -> anyhow::Result<WriteReport> {
        let mut counts = Counts::default();
        match self.try_batch(c, items, &mut counts) {
            Ok(()) => Ok(counts.into_report()),
            Err(error) => {
                // What `Transaction`'s drop did: nothing of a failed batch stays.
                if !c.is_autocommit() {
                    if let Err(e) = c.execute_batch("ROLLBACK") {
                        tracing::error!(
                            error = format!("{e:#}"),
                            "rolling back a failed write batch failed"
                        );
                    }
                }
                // The caches may hold what the rolled-back transaction read or wrote.
                self.keys.clear();
                self.vins.clear();
                self.epoch = None;
                self.bits.clear();
                Err(error)
            }
        }
    }

    fn try_batch(
        &mut self,
        c: &mut Connection,
        items: &[WriteItem],
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        // IMMEDIATE: take the write lock first, so the epoch read below can't go stale
        // before our inserts. BEGIN and COMMIT are cached statements: `Connection::transaction`
        // runs them through `execute_batch`, which parses them again for every batch. On an
        // error the caller ([`Writer::try_write`]) rolls back.
        c.prepare_cached("BEGIN IMMEDIATE")?
            .execute([])
            .context("starting the write batch transaction")?;
        let tx: &Connection = c;
        let epoch: i64 = tx
            .query_row(
                "SELECT vehicle_epoch FROM store_state WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .context("reading the vehicle epoch")?;
        if self.epoch != Some(epoch) {
            self.keys.clear();
            self.vins.clear();
            self.epoch = Some(epoch);
        }
        // The key of the item before: a poll's items are queued together, so most items
        // name the vehicle of the one before them, and a string compare beats a lookup.
        let mut last_key: Option<(&str, i64)> = None;
        let mut unknown: Option<&VehicleId> = None;
        let mut unknown_count = 0u64;
        let mut invalid = 0u64;
        let mut events: Vec<EventRow<'_>> = Vec::new();
        let mut event_index: FxHashMap<EventKey<'_>, usize> = FxHashMap::default();
        // The event row of the latest `Event` item, with its vehicle key.
        let mut last_event: Option<(i64, usize)> = None;
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut group_index: FxHashMap<(i64, UnixMillis), usize> = FxHashMap::default();
        // A kind met twice at one instant: the second goes through the per-kind path.
        let mut extras: Vec<(i64, &VehicleId, Stamp, Values)> = Vec::new();
        for item in items {
            let label = item.label() as usize;
            let outcome = match item {
                WriteItem::Reading(vid, reading) => match self.key_near(tx, vid, &mut last_key)? {
                    None => Outcome::Unknown,
                    Some(key) => {
                        let Some(values) = Values::of(reading) else {
                            counts.dropped[label] += 1;
                            invalid += 1;
                            continue;
                        };
                        // Gathered here, stored after the loop: one row per instant, with
                        // the poll whose events came just before it (a poll's items are
                        // queued together, each `ok` event before the readings it brought).
                        let stamp = reading.stamp();
                        let poll = last_event.filter(|(k, _)| *k == key).map(|(_, i)| i);
                        match group_index.get(&(key, stamp.recorded_at)) {
                            Some(&g) if groups[g].values[values.kind()].is_none() => {
                                groups[g].values[values.kind()] = Some((values, stamp.fetched_at));
                            }
                            Some(_) => extras.push((key, vid, stamp, values)),
                            None => {
                                group_index.insert((key, stamp.recorded_at), groups.len());
                                let mut group = Group {
                                    vehicle: key,
                                    vid,
                                    recorded_at: stamp.recorded_at,
                                    fetched_at: stamp.fetched_at,
                                    values: [None, None, None],
                                    poll,
                                };
                                group.values[values.kind()] = Some((values, stamp.fetched_at));
                                groups.push(group);
                            }
                        }
                        continue;
                    }
                },
                WriteItem::Event(ev) => match self.key_near(tx, &ev.vehicle_id, &mut last_key)? {
                    None => Outcome::Unknown,
                    Some(key) => {
                        // Gathered here, stored after the loop: one row per poll and outcome.
                        let bit = self.bit(tx, &ev.endpoint)?;
                        let event_key = EventKey {
                            vehicle: key,
                            at: ev.at,
                            outcome: &ev.outcome,
                            http_status: ev.http_status,
                            error_type: ev.error_type.as_deref(),
                            error_code: ev.error_code.as_deref(),
                        };
                        let i = match event_index.get(&event_key) {
                            Some(&i) => {
                                let row = &mut events[i];
                                row.endpoints |= bit;
                                row.events += 1;
                                row.calls = match (row.calls, ev.calls) {
                                    (None, None) => None,
                                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                                };
                                i
                            }
                            None => {
                                let i = events.len();
                                events.push(EventRow {
                                    key: event_key,
                                    endpoints: bit,
                                    calls: ev.calls,
                                    events: 1,
                                    kept: None,
                                });
                                event_index.insert(event_key, i);
                                i
                            }
                        };
                        last_event = Some((key, i));
                        continue;
                    }
                },
                WriteItem::Info(vid, info) => {
                    let n = tx
                        .prepare_cached(
                            // Year 0 is "unknown" (missing, or refused as implausible):
                            // it never overwrites a year already known.
                            "UPDATE vehicles SET make = ?2, model = ?3,
                                 year = coalesce(nullif(?4, 0), year)
                             WHERE vehicle_id = ?1",
                        )?
                        .execute(params![vid.0, info.make, info.model, info.year])
                        .with_context(|| format!("updating the info of vehicle {vid}"))?;
                    if n == 0 {
                        Outcome::Unknown
                    } else {
                        Outcome::Written
                    }
                }
                WriteItem::Block {
                    vehicle_id,
                    scope,
                    reason,
                    at,
                } => match self.key(tx, vehicle_id)? {
                    None => Outcome::Unknown,
                    Some(key) => {
                        let n = tx
                            .prepare_cached(
                                "INSERT OR IGNORE INTO vehicle_blocks
                                     (vehicle, endpoint, source, reason, since)
                                 VALUES (?1, ?2, 'poll', ?3, ?4)",
                            )?
                            .execute(params![key, scope.column(), reason, at])
                            .with_context(|| {
                                format!("blocking {} of vehicle {vehicle_id}", scope.column())
                            })?;
                        if n == 0 {
                            Outcome::Duplicate
                        } else {
                            Outcome::Written
                        }
                    }
                },
                WriteItem::Wait {
                    vehicle_id,
                    until,
                    reason,
                    at,
                } => match self.key(tx, vehicle_id)? {
                    None => Outcome::Unknown,
                    Some(key) => {
                        tx.prepare_cached(
                            "INSERT INTO vehicle_blocks
                                 (vehicle, endpoint, source, reason, since, until)
                             VALUES (?1, ?5, 'poll', ?2, ?3, ?4)
                             ON CONFLICT (vehicle, endpoint) DO UPDATE SET
                                 reason = excluded.reason, since = excluded.since,
                                 until = max(coalesce(until, 0), excluded.until)",
                        )?
                        .execute(params![
                            key,
                            reason,
                            at,
                            until,
                            crate::domain::BlockScope::Wait.column()
                        ])
                        .with_context(|| format!("recording the wait of vehicle {vehicle_id}"))?;
                        Outcome::Written
                    }
                },
                WriteItem::Vin(vid, vin)
                    if self.vins.get(&vid.0).is_some_and(|known| known == vin) =>
                {
                    Outcome::Duplicate
                }
                WriteItem::Vin(vid, vin) => {
                    self.vins.insert(vid.0.clone(), vin.clone());
                    let n = tx
                        .prepare_cached("UPDATE vehicles SET vin = ?2 WHERE vehicle_id = ?1")?
                        .execute(params![vid.0, vin])
                        // The VIN itself stays out of the error: it identifies a car's owner.
                        .with_context(|| format!("updating the VIN of vehicle {vid}"))?;
                    if n == 0 {
                        Outcome::Unknown
                    } else {
                        Outcome::Written
                    }
                }
            };
            match outcome {
                Outcome::Written => counts.written[label] += 1,
                Outcome::Duplicate => counts.duplicates[label] += 1,
                Outcome::Unknown => {
                    counts.dropped[label] += 1;
                    unknown_count += 1;
                    if unknown.is_none() {
                        unknown = Some(match item {
                            WriteItem::Reading(v, _)
                            | WriteItem::Info(v, _)
                            | WriteItem::Vin(v, _)
                            | WriteItem::Block { vehicle_id: v, .. }
                            | WriteItem::Wait { vehicle_id: v, .. } => v,
                            WriteItem::Event(ev) => &ev.vehicle_id,
                        });
                    }
                }
            }
        }
        // Prepared once per batch, not looked up in the statement cache (keyed by its text)
        // for every row.
        let mut insert_row = tx.prepare_cached(INSERT_ROW)?;
        for group in &groups {
            store_group(tx, &mut insert_row, group, &mut events, counts).with_context(|| {
                format!(
                    "storing the readings of {} recorded at {}",
                    group.vid, group.recorded_at
                )
            })?;
        }
        for (key, vid, stamp, values) in &extras {
            let outcome = upsert_kind(tx, *key, stamp, values)
                .with_context(|| format!("storing a {} reading of {vid}", LABELS[values.kind()]))?;
            count(counts, values.kind(), outcome);
        }
        for row in &events {
            let label = Label::PollEvents as usize;
            let outcome = match row.kept {
                Some(outcome) => outcome,
                None => insert_event(tx, row).context("storing a poll event")?,
            };
            count_n(counts, label, outcome, row.events);
        }
        drop(insert_row);
        tx.prepare_cached("COMMIT")?
            .execute([])
            .context("committing the write batch")?;
        if let Some(example) = unknown {
            tracing::warn!(
                rows = unknown_count,
                example_vehicle = %example,
                "dropped rows of vehicles that are not in the store"
            );
        }
        if invalid > 0 {
            tracing::warn!(rows = invalid, "dropped readings with non-finite values");
        }
        Ok(())
    }

    /// The `poll_endpoints` bit of an endpoint name; a name met for the first time gets the
    /// next free bit.
    fn bit(&mut self, tx: &Connection, name: &str) -> anyhow::Result<i64> {
        if self.bits.is_empty() {
            let mut stmt = tx.prepare_cached("SELECT name, bit FROM poll_endpoints")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (n, b) = row.context("reading the endpoint names")?;
                self.bits.insert(n, b);
            }
        }
        if let Some(b) = self.bits.get(name) {
            return Ok(*b);
        }
        let top = self.bits.values().copied().max().unwrap_or(0);
        let bit = if top == 0 { 1 } else { top << 1 };
        if bit <= 0 || bit > (1 << 62) {
            anyhow::bail!("no bit left for the endpoint name {name:?} in poll_endpoints");
        }
        tx.prepare_cached("INSERT INTO poll_endpoints (bit, name) VALUES (?1, ?2)")?
            .execute(params![bit, name])
            .with_context(|| format!("adding the endpoint name {name:?}"))?;
        self.bits.insert(name.to_owned(), bit);
        Ok(bit)
    }

    /// [`Writer::key`], answered from `last` when the item before named the same vehicle (a
    /// vehicle's key does not change within a batch: the epoch is read under its write lock).
    fn key_near<'i>(
        &mut self,
        tx: &Connection,
        vid: &'i VehicleId,
        last: &mut Option<(&'i str, i64)>,
    ) -> anyhow::Result<Option<i64>> {
        if let Some((id, k)) = *last {
            if id == vid.0 {
                return Ok(Some(k));
            }
        }
        let k = self.key(tx, vid)?;
        if let Some(k) = k {
            *last = Some((vid.0.as_str(), k));
        }
        Ok(k)
    }

    /// The integer key of a vehicle, cached; None if the vehicle is not in the store (not
    /// cached, so a vehicle added later is found).
    fn key(&mut self, tx: &Connection, vid: &VehicleId) -> anyhow::Result<Option<i64>> {
        if let Some(k) = self.keys.get(&vid.0) {
            return Ok(Some(*k));
        }
        let k: Option<i64> = tx
            .prepare_cached("SELECT id FROM vehicles WHERE vehicle_id = ?1")?
            .query_row([&vid.0], |r| r.get(0))
            .optional()
            .with_context(|| format!("looking up vehicle {vid}"))?;
        if let Some(k) = k {
            self.keys.insert(vid.0.clone(), k);
        }
        Ok(k)
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Written,
    Duplicate,
    Unknown,
}

fn inserted(n: usize) -> Outcome {
    if n == 0 {
        Outcome::Duplicate
    } else {
        Outcome::Written
    }
}

fn count(counts: &mut Counts, label: usize, outcome: Outcome) {
    count_n(counts, label, outcome, 1);
}

fn count_n(counts: &mut Counts, label: usize, outcome: Outcome, n: u64) {
    match outcome {
        Outcome::Written => counts.written[label] += n,
        Outcome::Duplicate => counts.duplicates[label] += n,
        Outcome::Unknown => counts.dropped[label] += n,
    }
}

/// A new instant's row, every kind in one INSERT ([`store_group`]).
const INSERT_ROW: &str =
    "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m,
         plugged_in, charge_state, odometer_m, poll_endpoints, poll_calls)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (vehicle, recorded_at) DO NOTHING";

/// Stores one instant's readings: a new row with every kind in one INSERT, keeping the `ok`
/// events of the poll that read them when it may; if the row is already there, each kind joins
/// it on its own (a kind already in it is a duplicate) and the poll's events go to `poll_log`,
/// unless the row already keeps this very poll (a batch written twice).
fn store_group(
    tx: &Connection,
    insert_row: &mut CachedStatement<'_>,
    g: &Group<'_>,
    events: &mut [EventRow<'_>],
    counts: &mut Counts,
) -> anyhow::Result<()> {
    // A row keeps the poll whose time is its readings' arrival (the poller stamps a poll with
    // it), so the view's `at` for it, recorded_at + fetch lag, is the poll's own, and no
    // reading's fetched_at is altered. A poll stamped otherwise (a page of a longer listing
    // that arrived earlier) goes to `poll_log`.
    let keep = g.poll.filter(|&i| {
        let row = &events[i];
        row.keepable()
            && row.key.at == g.fetched_at
            && (row.key.at - g.recorded_at).abs() <= KEEP_LAG_MAX_MS
    });
    // The row's fetch lag is its first kind's; another kind that arrived at another time keeps
    // its own in `reading_lags`.
    let row_lag = g.fetched_at.saturating_sub(g.recorded_at);
    let mut own_lags: [Option<i64>; 3] = [None; 3];
    for (lag, v) in own_lags.iter_mut().zip(&g.values) {
        if let Some((_, fetched)) = v {
            let l = fetched.saturating_sub(g.recorded_at);
            *lag = (l != row_lag).then_some(l);
        }
    }
    let (mut soc_cp, mut range_m, mut plugged_in, mut state, mut odometer_m) =
        (None, None, None, None, None);
    for (v, _) in g.values.iter().flatten() {
        match *v {
            Values::Battery {
                soc_cp: s,
                range_m: r,
            } => (soc_cp, range_m) = (Some(s), r),
            Values::Charge {
                plugged_in: p,
                state: s,
            } => (plugged_in, state) = (Some(p), Some(s)),
            Values::Odometer { odometer_m: o } => odometer_m = Some(o),
        }
    }
    let (poll_endpoints, poll_calls) = match keep {
        Some(i) => (
            Some(events[i].endpoints),
            Some(events[i].calls.unwrap_or(0) as i64),
        ),
        None => (None, None),
    };
    let n = insert_row.execute(params![
        g.vehicle,
        g.recorded_at,
        row_lag,
        soc_cp,
        range_m,
        plugged_in,
        state,
        odometer_m,
        poll_endpoints,
        poll_calls
    ])?;
    if n == 1 {
        if own_lags.iter().any(Option::is_some) {
            tx.prepare_cached(
                "INSERT INTO reading_lags (vehicle, recorded_at, battery_lag_ms, charge_lag_ms,
                     odometer_lag_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
                     battery_lag_ms = excluded.battery_lag_ms,
                     charge_lag_ms = excluded.charge_lag_ms,
                     odometer_lag_ms = excluded.odometer_lag_ms",
            )?
            .execute(params![
                g.vehicle,
                g.recorded_at,
                own_lags[0],
                own_lags[1],
                own_lags[2]
            ])?;
        }
        for (v, _) in g.values.iter().flatten() {
            count(counts, v.kind(), Outcome::Written);
        }
        if let Some(i) = keep {
            events[i].kept = Some(Outcome::Written);
        }
        return Ok(());
    }
    // The instant's row is already there (a car that did not report since): read once what it
    // holds; a kind it has is a duplicate, a kind it lacks joins it as it arrived.
    let row: Option<([bool; 3], Option<i64>, i64)> = tx
        .prepare_cached(
            "SELECT soc_cp IS NOT NULL, charge_state IS NOT NULL, odometer_m IS NOT NULL,
                    poll_endpoints, fetch_lag_ms
             FROM readings WHERE vehicle = ?1 AND recorded_at = ?2",
        )?
        .query_row(params![g.vehicle, g.recorded_at], |r| {
            Ok(([r.get(0)?, r.get(1)?, r.get(2)?], r.get(3)?, r.get(4)?))
        })
        .optional()?;
    for (v, fetched) in g.values.iter().flatten() {
        if row.is_some_and(|(has, _, _)| has[v.kind()]) {
            count(counts, v.kind(), Outcome::Duplicate);
            continue;
        }
        let stamp = Stamp {
            recorded_at: g.recorded_at,
            fetched_at: *fetched,
        };
        count(counts, v.kind(), upsert_kind(tx, g.vehicle, &stamp, v)?);
    }
    // The same poll already kept in it (a batch written twice) is a duplicate, not a new event.
    if let (Some(i), Some((_, bits, lag))) = (g.poll, row) {
        if events[i].keepable()
            && bits == Some(events[i].endpoints)
            && g.recorded_at + lag == events[i].key.at
        {
            events[i].kept = Some(Outcome::Duplicate);
        }
    }
    Ok(())
}

/// Stores one kind in its instant's row: a new row, or its columns in a row another kind
/// started (its own fetch lag in `reading_lags` where that differs from the row's). A kind
/// already in the row is a duplicate.
fn upsert_kind(
    tx: &Connection,
    key: i64,
    stamp: &Stamp,
    values: &Values,
) -> anyhow::Result<Outcome> {
    let lag = stamp.fetched_at.saturating_sub(stamp.recorded_at);
    let returned = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> anyhow::Result<Option<i64>> {
        Ok(tx
            .prepare_cached(sql)?
            .query_row(p, |r| r.get(0))
            .optional()?)
    };
    let (row_lag, column) = match *values {
        Values::Battery { soc_cp, range_m } => (
            returned(
                "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
                     soc_cp = excluded.soc_cp,
                     range_m = excluded.range_m
                 WHERE soc_cp IS NULL
                 RETURNING fetch_lag_ms",
                params![key, stamp.recorded_at, lag, soc_cp, range_m],
            )?,
            "battery_lag_ms",
        ),
        Values::Charge { plugged_in, state } => (
            returned(
                "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, plugged_in, charge_state)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
                     plugged_in = excluded.plugged_in,
                     charge_state = excluded.charge_state
                 WHERE charge_state IS NULL
                 RETURNING fetch_lag_ms",
                params![key, stamp.recorded_at, lag, plugged_in, state],
            )?,
            "charge_lag_ms",
        ),
        Values::Odometer { odometer_m } => (
            returned(
                "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, odometer_m)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
                     odometer_m = excluded.odometer_m
                 WHERE odometer_m IS NULL
                 RETURNING fetch_lag_ms",
                params![key, stamp.recorded_at, lag, odometer_m],
            )?,
            "odometer_lag_ms",
        ),
    };
    let Some(row_lag) = row_lag else {
        return Ok(Outcome::Duplicate);
    };
    if row_lag != lag {
        tx.prepare_cached(&format!(
            "INSERT INTO reading_lags (vehicle, recorded_at, {column}) VALUES (?1, ?2, ?3)
             ON CONFLICT (vehicle, recorded_at) DO UPDATE SET {column} = excluded.{column}"
        ))?
        .execute(params![key, stamp.recorded_at, lag])?;
    }
    Ok(Outcome::Written)
}

/// One `poll_log` row; a row already there for the same poll and endpoints is a duplicate.
fn insert_event(tx: &Connection, row: &EventRow<'_>) -> anyhow::Result<Outcome> {
    let k = &row.key;
    let n = tx
        .prepare_cached(
            "INSERT INTO poll_log
                 (vehicle, at, endpoints, outcome, http_status, error_type, error_code, calls)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (vehicle, at, endpoints) DO NOTHING",
        )?
        .execute(params![
            k.vehicle,
            k.at,
            row.endpoints,
            k.outcome,
            k.http_status,
            k.error_type,
            k.error_code,
            row.calls.map(|n| n as i64)
        ])?;
    Ok(inserted(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_rounds_and_rejects_non_finite() {
        assert_eq!(scaled(68.34, 100.0), Some(6834));
        assert_eq!(scaled(312.4, 1000.0), Some(312_400));
        assert_eq!(scaled(0.29 * 100.0, 100.0), Some(2900)); // 28.999999999999996 rounds up
        assert_eq!(scaled(f64::NAN, 100.0), None);
        assert_eq!(scaled(f64::INFINITY, 1000.0), None);
    }

    #[test]
    fn report_lists_only_non_zero_labels() {
        let mut c = Counts::default();
        c.written[Label::Battery as usize] = 3;
        c.dropped[Label::PollEvents as usize] = 1;
        let r = c.into_report();
        assert_eq!(r.written, vec![("battery", 3)]);
        assert!(r.duplicates.is_empty());
        assert_eq!(r.dropped, vec![("poll_events", 1)]);
        assert_eq!(r.written_in("battery"), 3);
        assert_eq!(r.dropped_in("charge"), 0);
    }
}
