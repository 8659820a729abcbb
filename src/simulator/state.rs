//! The simulator's shared state: its config, the fleet, issued codes and tokens, the counters
//! of what clients did wrong, and a bounded log of what each vehicle served.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::fleet::{snapshot, Fleet, Snapshot};
use super::SimulatorConfig;
use crate::domain::UnixMillis;

pub struct Code {
    pub user: usize,
    pub redirect_uri: String,
    pub expires_at: UnixMillis,
    pub used: bool,
}

pub struct Access {
    pub user: usize,
    pub expires_at: UnixMillis,
}

pub struct Refresh {
    pub user: usize,
    pub expires_at: UnixMillis,
    /// When it was first used; it stays valid for the grace window after that.
    pub used_at: Option<UnixMillis>,
}

#[derive(Default)]
pub struct Tokens {
    pub codes: HashMap<String, Code>,
    pub access: HashMap<String, Access>,
    pub refresh: HashMap<String, Refresh>,
    /// Round-robin cursor over users for authorize requests that name none.
    pub next_user: usize,
}

/// What clients did, as `/_simulator/stats` serves it.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub code_exchanges: AtomicU64,
    pub refreshes: AtomicU64,
    pub expired_token_requests: AtomicU64,
    pub unknown_token_requests: AtomicU64,
    pub invalidated_refresh_token_uses: AtomicU64,
    pub grace_refresh_token_uses: AtomicU64,
    pub missing_unit_system: AtomicU64,
    pub refreshes_by_user: Mutex<HashMap<String, u64>>,
}

impl Stats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_user = self
            .refreshes_by_user
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        serde_json::json!({
            "requests": get(&self.requests),
            "code_exchanges": get(&self.code_exchanges),
            "refreshes": get(&self.refreshes),
            "expired_token_requests": get(&self.expired_token_requests),
            "unknown_token_requests": get(&self.unknown_token_requests),
            "invalidated_refresh_token_uses": get(&self.invalidated_refresh_token_uses),
            "grace_refresh_token_uses": get(&self.grace_refresh_token_uses),
            "missing_unit_system": get(&self.missing_unit_system),
            "refreshes_by_user": by_user,
        })
    }
}

const SERVED_KEEP: usize = 512;

#[derive(Serialize, Clone, Copy, PartialEq)]
pub struct ServedBattery {
    pub recorded_at: UnixMillis,
    pub soc_percent: f64,
    pub range_km: f64,
}

#[derive(Serialize, Clone, Copy, PartialEq)]
pub struct ServedCharge {
    pub recorded_at: UnixMillis,
    pub plugged_in: bool,
    pub state: &'static str,
}

#[derive(Serialize, Clone, Copy, PartialEq)]
pub struct ServedOdometer {
    pub recorded_at: UnixMillis,
    pub odometer_km: f64,
}

/// Metric values as served, newest last, one entry per report time.
#[derive(Serialize, Default)]
pub struct ServedLog {
    pub battery: VecDeque<ServedBattery>,
    pub charge: VecDeque<ServedCharge>,
    pub odometer: VecDeque<ServedOdometer>,
}

fn push<T: PartialEq + Copy>(q: &mut VecDeque<T>, item: T, at: impl Fn(&T) -> UnixMillis) {
    if q.back().is_some_and(|last| at(last) == at(&item)) {
        return;
    }
    if q.len() == SERVED_KEEP {
        q.pop_front();
    }
    q.push_back(item);
}

/// Which parts of a snapshot a response carried.
#[derive(Clone, Copy, Default)]
pub struct Served {
    pub battery: bool,
    pub charge: bool,
    pub odometer: bool,
}

pub struct Sim {
    pub cfg: SimulatorConfig,
    pub fleet: Fleet,
    pub tokens: Mutex<Tokens>,
    pub stats: Stats,
    pub served: Mutex<HashMap<usize, ServedLog>>,
    /// Real time (unix ms) at which simulated time is 0.
    pub epoch_ms: UnixMillis,
}

impl Sim {
    pub fn new(cfg: SimulatorConfig) -> Sim {
        let interval = cfg.report_interval.as_millis().max(1) as i64;
        let fleet = Fleet::generate(cfg.seed, cfg.users, cfg.vehicles_per_user, interval);
        Sim {
            cfg,
            fleet,
            tokens: Mutex::new(Tokens::default()),
            stats: Stats::default(),
            served: Mutex::new(HashMap::new()),
            epoch_ms: crate::domain::now_ms(),
        }
    }

    /// The latest time vehicle `v` reported at or before `now`: its data changes only then.
    pub fn report_time(&self, v: usize, now: UnixMillis) -> UnixMillis {
        let interval = self.cfg.report_interval.as_millis().max(1) as i64;
        let offset = self.fleet.vehicles[v].report_offset_ms;
        (now - offset).div_euclid(interval) * interval + offset
    }

    /// The vehicle's data as of its latest report, with that report's time.
    pub fn data(&self, v: usize, now: UnixMillis) -> (UnixMillis, Snapshot) {
        let at = self.report_time(v, now);
        let sim_s = (at - self.epoch_ms) as f64 / 1000.0 * self.cfg.time_scale;
        (at, snapshot(&self.fleet.vehicles[v], sim_s))
    }

    pub fn record_served(&self, v: usize, at: UnixMillis, s: &Snapshot, what: Served) {
        let Ok(mut logs) = self.served.lock() else {
            return;
        };
        let log = logs.entry(v).or_default();
        if what.battery {
            push(
                &mut log.battery,
                ServedBattery {
                    recorded_at: at,
                    soc_percent: s.soc_percent,
                    range_km: s.range_km,
                },
                |e| e.recorded_at,
            );
        }
        if what.charge {
            push(
                &mut log.charge,
                ServedCharge {
                    recorded_at: at,
                    plugged_in: s.plugged_in,
                    state: s.charge_state.as_str(),
                },
                |e| e.recorded_at,
            );
        }
        if what.odometer {
            push(
                &mut log.odometer,
                ServedOdometer {
                    recorded_at: at,
                    odometer_km: s.odometer_km,
                },
                |e| e.recorded_at,
            );
        }
    }
}

/// ISO-8601 with milliseconds, as Smartcar's `sc-data-age`.
pub fn iso(ms: UnixMillis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}
