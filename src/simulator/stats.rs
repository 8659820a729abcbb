//! What the simulator saw and served: counters for `GET /_simulator/stats` and a bounded per-vehicle
//! log of served values for `GET /_simulator/served`.
//!
//! Tests and users check carpulse against these: did it refresh on time, did it reuse a dead token,
//! did it store exactly what was served. Counters are atomics because every request bumps one;
//! maps sit behind `std::sync::Mutex` because their critical sections are a few instructions and
//! never span an `.await`, so a tokio mutex would only add cost.
//!
//! The served log must stay small at 10,000+ vehicles: its length per vehicle and kind is
//! configurable (`--served-log`, 0 turns it off without taking any lock), entries are 16-byte
//! fixed-size records (values are stored as the integers they were rounded to, so they read back
//! bit-identical), a vehicle's log is allocated only once it is served, and the map is sharded so
//! concurrent requests for different vehicles rarely meet on one lock.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use super::fleet::VehicleState;
use crate::domain::{ChargeState, UnixMillis};

/// Default entries kept per vehicle and kind (`--served-log`); older ones are dropped.
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
    /// Every request under `/v2.0` except the Management API's (see `management_requests`).
    pub(crate) v2_requests: AtomicU64,
    /// Every request under `/v3` except `/v3/connections` (those are not vehicle requests and
    /// are not billed; see `connections_requests`).
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
    /// Completed re-auth flows (`GET /oauth/reauthenticate` answered with its redirect).
    pub(crate) reauthentications: AtomicU64,
    /// 403 PERMISSION answers for want of a granted permission: v2 requests, v2 batch items
    /// and v3 single signals (a signal listed with an ERROR PERMISSION status is not counted).
    pub(crate) permission_denied: AtomicU64,
    /// v3 vehicle requests with an application token and no (or an empty) `sc-user-id`.
    pub(crate) missing_user_id: AtomicU64,
    /// v3 vehicle requests with an application token whose `sc-user-id` names no user of the
    /// fleet, or a user who does not own the vehicle.
    pub(crate) wrong_user_id: AtomicU64,
    /// v3 vehicle requests with an application token for a connection its owner revoked.
    pub(crate) revoked_user_requests: AtomicU64,
    /// Per-user Connect tokens presented on any `/v3` path (accepted or not).
    pub(crate) user_tokens_on_v3: AtomicU64,
    /// Application tokens issued by `POST /oauth2/token`.
    pub(crate) app_tokens_issued: AtomicU64,
    /// Application tokens presented after their expiry.
    pub(crate) app_token_expired_uses: AtomicU64,
    /// Application tokens presented on `/v2.0` (refused: they are a v3 credential).
    pub(crate) app_tokens_on_v2: AtomicU64,
    /// Requests to `/v3/connections` and `/v3/connections/{id}`.
    pub(crate) connections_requests: AtomicU64,
    /// Requests to the Management API (`/v2.0/management/connections`, GET and DELETE).
    pub(crate) management_requests: AtomicU64,
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
            "reauthentications": get(&self.reauthentications),
            "permission_denied": get(&self.permission_denied),
            "missing_user_id": get(&self.missing_user_id),
            "wrong_user_id": get(&self.wrong_user_id),
            "revoked_user_requests": get(&self.revoked_user_requests),
            "user_tokens_on_v3": get(&self.user_tokens_on_v3),
            "app_tokens_issued": get(&self.app_tokens_issued),
            "app_token_expired_uses": get(&self.app_token_expired_uses),
            "app_tokens_on_v2": get(&self.app_tokens_on_v2),
            "connections_requests": get(&self.connections_requests),
            "management_requests": get(&self.management_requests),
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

/// A served battery reading. The model rounds the state of charge to 2 decimals and the range to
/// 1 ([`super::fleet::round_to`] divides an integer by 10ⁿ), so storing those integers and dividing
/// again gives back exactly the served `f64` in 16 bytes instead of 24.
#[derive(Clone, Copy, Debug)]
struct BatteryEntry {
    at: UnixMillis,
    range_dm: u32,
    soc_centi: u16,
}

#[derive(Clone, Copy, Debug)]
struct ChargeEntry {
    at: UnixMillis,
    plugged_in: bool,
    state: ChargeState,
}

/// Odometer in tenths of a km (the model's rounding); u32 holds 429 million km.
#[derive(Clone, Copy, Debug)]
struct OdometerEntry {
    at: UnixMillis,
    odometer_dm: u32,
}

/// A value rounded to `decimals` places, as the integer it was rounded to. Values outside the
/// integer's range cannot come from the model; they saturate rather than wrap.
fn scaled<T: TryFrom<i64> + Copy>(value: f64, decimals: i32, max: T) -> T {
    let n = (value * 10f64.powi(decimals)).round();
    T::try_from(n as i64).unwrap_or(if n < 0.0 {
        T::try_from(0).unwrap_or(max)
    } else {
        max
    })
}

fn unscaled(n: impl Into<f64>, decimals: i32) -> f64 {
    n.into() / 10f64.powi(decimals)
}

/// One vehicle's logs. Empty `VecDeque`s do not allocate, so a vehicle served only through v2
/// `/battery` pays for the battery log alone.
#[derive(Default, Debug)]
struct VehicleLog {
    battery: VecDeque<BatteryEntry>,
    charge: VecDeque<ChargeEntry>,
    odometer: VecDeque<OdometerEntry>,
}

/// Appends unless an entry for the same report time is already among the newest few (values are a
/// function of the report time, so that entry is identical).
fn push_once<T>(
    log: &mut VecDeque<T>,
    limit: usize,
    recorded_at: UnixMillis,
    at: impl Fn(&T) -> UnixMillis,
    item: T,
) {
    if log.iter().rev().take(4).any(|e| at(e) == recorded_at) {
        return;
    }
    if log.len() >= limit {
        log.pop_front();
    } else if log.len() == log.capacity() {
        // Grow by doubling but never past the limit, so a full log holds no spare capacity.
        let want = (log.len() * 2).max(4).min(limit);
        log.reserve_exact(want - log.len());
    }
    log.push_back(item);
}

/// Lock shards of the served log: enough that 64 concurrent clients on different vehicles seldom
/// share one, few enough that an idle simulator's empty maps cost nothing worth noting.
const SHARDS: usize = 64;

/// One lock shard: the logs of the vehicles whose id hashes to it.
type Shard = Mutex<HashMap<Box<str>, VehicleLog>>;

/// Served values per vehicle id, metric, newest last.
#[derive(Debug)]
pub(crate) struct ServedLog {
    /// Entries per vehicle and kind; 0 records nothing.
    limit: usize,
    /// Picks a vehicle's shard.
    hasher: RandomState,
    // std Mutex: short, non-async critical sections (see the module doc).
    shards: Box<[Shard]>,
}

impl Default for ServedLog {
    fn default() -> Self {
        ServedLog::new(SERVED_LOG_LIMIT)
    }
}

impl ServedLog {
    /// A log keeping `limit` entries per vehicle and kind (0: record nothing).
    pub(crate) fn new(limit: usize) -> Self {
        ServedLog {
            limit,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, vehicle_id: &str) -> &Shard {
        let index = self.hasher.hash_one(vehicle_id) as usize % self.shards.len();
        &self.shards[index]
    }

    pub(crate) fn record(&self, vehicle_id: &str, state: &VehicleState, kinds: &[Served]) {
        if kinds.is_empty() || self.limit == 0 {
            return;
        }
        let limit = self.limit;
        let mut vehicles = self
            .shard(vehicle_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Look up before inserting: the key is allocated once per vehicle, not once per request.
        let log = match vehicles.get_mut(vehicle_id) {
            Some(log) => log,
            None => vehicles.entry(Box::from(vehicle_id)).or_default(),
        };
        let t = state.report_ms;
        for kind in kinds {
            match kind {
                Served::Battery => push_once(
                    &mut log.battery,
                    limit,
                    t,
                    |e| e.at,
                    BatteryEntry {
                        at: t,
                        soc_centi: scaled(state.soc_percent, 2, u16::MAX),
                        range_dm: scaled(state.range_km, 1, u32::MAX),
                    },
                ),
                Served::Charge => push_once(
                    &mut log.charge,
                    limit,
                    t,
                    |e| e.at,
                    ChargeEntry {
                        at: t,
                        plugged_in: state.plugged_in,
                        state: state.charge_state,
                    },
                ),
                Served::Odometer => push_once(
                    &mut log.odometer,
                    limit,
                    t,
                    |e| e.at,
                    OdometerEntry {
                        at: t,
                        odometer_dm: scaled(state.odometer_km, 1, u32::MAX),
                    },
                ),
            }
        }
    }

    pub(crate) fn to_json(&self, vehicle_id: &str) -> Value {
        let vehicles = self
            .shard(vehicle_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let empty = VehicleLog::default();
        let log = vehicles.get(vehicle_id).unwrap_or(&empty);
        json!({
            "battery": log.battery.iter()
                .map(|e| json!({
                    "recorded_at": e.at,
                    "soc_percent": unscaled(e.soc_centi, 2),
                    "range_km": unscaled(e.range_dm, 1),
                }))
                .collect::<Vec<_>>(),
            "charge": log.charge.iter()
                .map(|e| json!({"recorded_at": e.at, "plugged_in": e.plugged_in, "state": e.state.as_str()}))
                .collect::<Vec<_>>(),
            "odometer": log.odometer.iter()
                .map(|e| json!({"recorded_at": e.at, "odometer_km": unscaled(e.odometer_dm, 1)}))
                .collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fleet::{round_to, Fleet, SimClock};
    use super::*;

    fn clock() -> SimClock {
        SimClock {
            anchor_ms: 1_700_000_000_000,
            time_scale: 60.0,
            report_interval_ms: 5_000,
            sleeping: false,
        }
    }

    #[test]
    fn entries_are_16_bytes() {
        assert_eq!(std::mem::size_of::<BatteryEntry>(), 16);
        assert_eq!(std::mem::size_of::<ChargeEntry>(), 16);
        assert_eq!(std::mem::size_of::<OdometerEntry>(), 16);
    }

    #[test]
    fn values_read_back_exactly_as_served() {
        let fleet = Fleet::generate(5, 2, 5, 5_000, &[super::super::Powertrain::Bev]);
        let clock = clock();
        let log = ServedLog::new(SERVED_LOG_LIMIT);
        for v in fleet.users.iter().flat_map(|u| &u.vehicles) {
            // A simulated day in 97 steps covers parked, driving and charging values.
            let states: Vec<_> = (0..97)
                .map(|i| v.state_at(&clock, clock.anchor_ms + i * 15_000))
                .collect();
            for s in &states {
                log.record(
                    &v.id,
                    s,
                    &[Served::Battery, Served::Charge, Served::Odometer],
                );
            }
            let json = log.to_json(&v.id);
            for (i, s) in states.iter().enumerate() {
                let b = &json["battery"][i];
                assert_eq!(b["recorded_at"], s.report_ms);
                assert_eq!(b["soc_percent"].as_f64(), Some(s.soc_percent));
                assert_eq!(b["range_km"].as_f64(), Some(s.range_km));
                assert_eq!(
                    json["odometer"][i]["odometer_km"].as_f64(),
                    Some(s.odometer_km)
                );
                assert_eq!(json["charge"][i]["plugged_in"], s.plugged_in);
                assert_eq!(json["charge"][i]["state"], s.charge_state.as_str());
            }
        }
        // The exactness argument in one line: round_to is integer / 10ⁿ.
        assert_eq!(
            unscaled(scaled(round_to(61.239_9, 2), 2, u16::MAX), 2),
            61.24
        );
    }

    #[test]
    fn the_limit_bounds_each_kind_and_zero_records_nothing() {
        let fleet = Fleet::generate(1, 1, 2, 5_000, &[super::super::Powertrain::Bev]);
        let v = &fleet.users[0].vehicles[0];
        let clock = clock();
        let log = ServedLog::new(3);
        for i in 0..10 {
            let s = v.state_at(&clock, clock.anchor_ms + i * 5_000);
            log.record(&v.id, &s, &[Served::Battery]);
            // The same report time again is not a new entry.
            log.record(&v.id, &s, &[Served::Battery]);
        }
        let json = log.to_json(&v.id);
        let times: Vec<i64> = json["battery"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["recorded_at"].as_i64().unwrap())
            .collect();
        let t = |i: i64| clock.anchor_ms + i * 5_000;
        assert_eq!(times, vec![t(7), t(8), t(9)]);
        assert_eq!(json["charge"], json!([]));
        {
            let shard = log.shard(&v.id).lock().unwrap();
            assert_eq!(
                shard[v.id.as_str()].battery.capacity(),
                3,
                "no spare capacity"
            );
        }
        // Another vehicle was never served: it has no log at all.
        let other = &fleet.users[0].vehicles[1];
        assert_eq!(
            log.to_json(&other.id),
            json!({"battery": [], "charge": [], "odometer": []})
        );
        let off = ServedLog::new(0);
        off.record(
            &v.id,
            &v.state_at(&clock, clock.anchor_ms),
            &[Served::Odometer],
        );
        assert_eq!(off.to_json(&v.id)["odometer"], json!([]));
        assert!(off.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    /// `--served-log 2` end to end: the flag reaches the config, and over real HTTP the served
    /// log keeps the two newest report times while the JSON shape stays the same.
    #[tokio::test]
    async fn served_log_flag_bounds_the_log_over_http() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: super::super::SimulatorArgs,
        }
        let args = Cli::parse_from(["sim", "--served-log", "2"]).sim;
        assert_eq!(args.to_config().served_log, 2);
        assert_eq!(
            Cli::parse_from(["sim"]).sim.to_config().served_log,
            SERVED_LOG_LIMIT
        );
        let cfg = super::super::SimulatorConfig {
            // Reports every 100 ms, so a few requests span several report times.
            report_interval: std::time::Duration::from_millis(100),
            ..args.to_config()
        };
        let (client_id, secret) = (cfg.client_id.clone(), cfg.client_secret.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(super::super::serve(listener, cfg, shutdown.clone()));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let redirect = http
            .get(format!("{base}/oauth/authorize"))
            .query(&[
                ("response_type", "code"),
                ("client_id", client_id.as_str()),
                ("redirect_uri", "http://127.0.0.1:9/cb"),
            ])
            .send()
            .await
            .unwrap();
        let location = redirect.headers()["location"].to_str().unwrap().to_owned();
        // The redirect is `…?code=…&user_id=…`: the code ends at the next parameter.
        let code = location.split("code=").nth(1).unwrap();
        let code = code.split('&').next().unwrap().to_owned();
        let token: Value = http
            .post(format!("{base}/oauth/token"))
            .basic_auth(&client_id, Some(&secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", "http://127.0.0.1:9/cb"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let access = token["access_token"].as_str().unwrap().to_owned();
        let vehicles: Value = http
            .get(format!("{base}/v2.0/vehicles"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = vehicles["vehicles"][0].as_str().unwrap().to_owned();
        let mut last = Value::Null;
        for _ in 0..4 {
            let battery: Value = http
                .get(format!("{base}/v2.0/vehicles/{id}/battery"))
                .bearer_auth(&access)
                .header("sc-unit-system", "metric")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            last = battery;
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        }
        let served: Value = http
            .get(format!("{base}/_simulator/served?vehicle_id={id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let battery = served["battery"].as_array().unwrap();
        assert_eq!(battery.len(), 2, "{served}");
        assert!(battery[0]["recorded_at"].as_i64() < battery[1]["recorded_at"].as_i64());
        assert_eq!(battery[1]["range_km"], last["range"]);
        assert_eq!(
            battery[1]["soc_percent"]
                .as_f64()
                .map(|s| round_to(s / 100.0, 4)),
            last["percentRemaining"].as_f64()
        );
        assert_eq!(served["charge"], json!([]));
        assert_eq!(served["odometer"], json!([]));
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
