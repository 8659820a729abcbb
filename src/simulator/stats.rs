//! What the simulator saw and served: counters for `GET /_simulator/stats` and a bounded per-vehicle
//! log of served values for `GET /_simulator/served`.
//!
//! Tests and users check carpulse against these: did it refresh on time, did it reuse a dead token,
//! did it store exactly what was served. Counters are atomics because every request bumps one;
//! maps sit behind `std::sync::Mutex` because their critical sections are a few instructions and
//! never span an `.await`, so a tokio mutex would only add cost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use super::fleet::VehicleState;
use crate::domain::{ChargeState, UnixMillis};

/// Entries kept per vehicle and kind; older ones are dropped.
pub(crate) const SERVED_LOG_LIMIT: usize = 512;

#[derive(Default, Debug)]
pub(crate) struct Stats {
    /// Every request except the introspection endpoints.
    pub(crate) requests: AtomicU64,
    pub(crate) authorizations: AtomicU64,
    pub(crate) code_exchanges: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) token_errors: AtomicU64,
    pub(crate) expired_token_requests: AtomicU64,
    pub(crate) unknown_token_requests: AtomicU64,
    pub(crate) invalidated_refresh_token_uses: AtomicU64,
    pub(crate) grace_refresh_token_uses: AtomicU64,
    pub(crate) missing_unit_system: AtomicU64,
    pub(crate) v2_requests: AtomicU64,
    pub(crate) v3_requests: AtomicU64,
    pub(crate) batch_items: AtomicU64,
    /// Requests for a vehicle inside the `retry-after` window of a 429 it was sent.
    pub(crate) retry_after_violations: AtomicU64,
    /// Error answers produced by faults (set or random).
    pub(crate) faults_served: AtomicU64,
    /// Access or refresh tokens of a revoked connection presented again.
    pub(crate) revoked_token_uses: AtomicU64,
    /// Requests refused by the app-wide bucket (RATE_LIMIT:SMARTCAR_API).
    pub(crate) app_rate_limited: AtomicU64,
    refreshes_by_user: Mutex<HashMap<String, u64>>,
}

/// Bumps a counter. Relaxed: the counters are independent tallies, read only for reporting.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn count_refresh(&self, user_id: &str) {
        bump(&self.refreshes);
        let mut by_user = self
            .refreshes_by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *by_user.entry(user_id.to_owned()).or_default() += 1;
    }

    pub(crate) fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_user: Map<String, Value> = self
            .refreshes_by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "requests": get(&self.requests),
            "authorizations": get(&self.authorizations),
            "code_exchanges": get(&self.code_exchanges),
            "refreshes": get(&self.refreshes),
            "token_errors": get(&self.token_errors),
            "expired_token_requests": get(&self.expired_token_requests),
            "unknown_token_requests": get(&self.unknown_token_requests),
            "invalidated_refresh_token_uses": get(&self.invalidated_refresh_token_uses),
            "grace_refresh_token_uses": get(&self.grace_refresh_token_uses),
            "missing_unit_system": get(&self.missing_unit_system),
            "v2_requests": get(&self.v2_requests),
            "v3_requests": get(&self.v3_requests),
            "batch_items": get(&self.batch_items),
            "retry_after_violations": get(&self.retry_after_violations),
            "faults_served": get(&self.faults_served),
            "revoked_token_uses": get(&self.revoked_token_uses),
            "app_rate_limited": get(&self.app_rate_limited),
            "refreshes_by_user": by_user,
        })
    }
}

/// Which kind of reading a response carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    Battery,
    Charge,
    Odometer,
}

/// Entries are small plain tuples (≤ 24 bytes) because a 10,000-vehicle fleet keeps up to
/// 3 × 512 of them per vehicle.
#[derive(Default, Debug)]
struct VehicleLog {
    battery: VecDeque<(UnixMillis, f64, f64)>,
    charge: VecDeque<(UnixMillis, bool, ChargeState)>,
    odometer: VecDeque<(UnixMillis, f64)>,
}

/// Appends unless an entry for the same report time is already among the newest few (values are a
/// function of the report time, so that entry is identical).
fn push_once<T>(
    log: &mut VecDeque<T>,
    recorded_at: UnixMillis,
    at: impl Fn(&T) -> UnixMillis,
    item: T,
) {
    if log.iter().rev().take(4).any(|e| at(e) == recorded_at) {
        return;
    }
    if log.len() >= SERVED_LOG_LIMIT {
        log.pop_front();
    }
    log.push_back(item);
}

/// Served values per vehicle id, metric, newest last.
#[derive(Default, Debug)]
pub(crate) struct ServedLog {
    // std Mutex: short, non-async critical sections (see the module doc).
    vehicles: Mutex<HashMap<String, VehicleLog>>,
}

impl ServedLog {
    pub(crate) fn record(&self, vehicle_id: &str, state: &VehicleState, kinds: &[Served]) {
        if kinds.is_empty() {
            return;
        }
        let mut vehicles = self.vehicles.lock().unwrap_or_else(|p| p.into_inner());
        let log = vehicles.entry(vehicle_id.to_owned()).or_default();
        let t = state.report_ms;
        for kind in kinds {
            match kind {
                Served::Battery => push_once(
                    &mut log.battery,
                    t,
                    |e| e.0,
                    (t, state.soc_percent, state.range_km),
                ),
                Served::Charge => push_once(
                    &mut log.charge,
                    t,
                    |e| e.0,
                    (t, state.plugged_in, state.charge_state),
                ),
                Served::Odometer => {
                    push_once(&mut log.odometer, t, |e| e.0, (t, state.odometer_km))
                }
            }
        }
    }

    pub(crate) fn to_json(&self, vehicle_id: &str) -> Value {
        let vehicles = self.vehicles.lock().unwrap_or_else(|p| p.into_inner());
        let empty = VehicleLog::default();
        let log = vehicles.get(vehicle_id).unwrap_or(&empty);
        json!({
            "battery": log.battery.iter()
                .map(|(t, soc, range)| json!({"recorded_at": t, "soc_percent": soc, "range_km": range}))
                .collect::<Vec<_>>(),
            "charge": log.charge.iter()
                .map(|(t, plugged, state)| json!({"recorded_at": t, "plugged_in": plugged, "state": state.as_str()}))
                .collect::<Vec<_>>(),
            "odometer": log.odometer.iter()
                .map(|(t, km)| json!({"recorded_at": t, "odometer_km": km}))
                .collect::<Vec<_>>(),
        })
    }
}
