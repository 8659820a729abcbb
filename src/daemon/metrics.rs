//! The Prometheus metrics of DESIGN §3 in one explicit struct (passed around, never global, so a
//! test builds its own and reads it), and the HTTP listener serving `/metrics` and `/healthz`
//! (loopback by default; TLS and basic auth through [`crate::daemon::webconfig`]). Tokens, secrets and
//! VINs never become label values.
//!
//! Every label set that is known in advance (outcomes, endpoints, jobs, tables, states) starts at
//! 0, so `rate()`, `increase()` and alerts have a series to work on from the first scrape: an
//! alert on the first `billing` answer cannot fire on a series that appears with that answer.
//! A vehicle that cannot be polled keeps its series (last readings, reading age) with
//! `carpulse_vehicle_up 0` and its `carpulse_vehicle_state`, so alerts on either fire.
//!
//! `carpulse_reading_age_seconds` is not kept between scrapes but written at each from the
//! reading times the metrics hold (now − recorded_at): it ages with the clock at no cost
//! between scrapes. Setting ~30,000 ages every 15 s was most of an idle daemon's CPU at
//! 10,000 vehicles with per-vehicle series on (issue 8).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::daemon::vehicle_gauges::{ComputedGauges, VehicleGauges};
use crate::domain::{
    ApiVersion, BatteryReading, ChargeReading, ChargeState, OdometerReading, UnixMillis, VehicleId,
    VehicleInfo,
};
use crate::hash::{FxHashMap, FxHasher};
use crate::smartcar::{Endpoint, ErrorKind};

/// A `HashSet` with [`FxHasher`], as [`FxHashMap`].
type FxHashSet<T> = HashSet<T, std::hash::BuildHasherDefault<FxHasher>>;

/// Whether `state` replaces `current` as a vehicle's state: anything beats `ok`, otherwise
/// the earlier in [`VEHICLE_STATES`] wins (one rule for the per-vehicle series and the counts).
fn state_wins(state: &str, current: &str) -> bool {
    let rank = |s: &str| VEHICLE_STATES.iter().position(|x| *x == s).unwrap_or(0);
    current == "ok" || rank(state) < rank(current)
}

/// The states of `carpulse_vehicle_state` and `carpulse_vehicles`, one per vehicle: `ok`
/// (polled normally), then why not, in the order that wins when several apply.
pub const VEHICLE_STATES: [&str; 7] = [
    "ok",
    "disabled",
    "revoked",
    "no_user_id",
    "needs_reauth",
    "paused",
    "no_data",
];

/// The `endpoint` label: what a poll asks of a vehicle (one Smartcar request may answer several).
pub const ENDPOINTS: [&str; 6] = [
    Endpoint::Battery.as_str(),
    Endpoint::Charge.as_str(),
    Endpoint::Odometer.as_str(),
    Endpoint::Info.as_str(),
    Endpoint::Vin.as_str(),
    Endpoint::Capabilities.as_str(),
];

/// The `job` label of the skip counters.
pub const JOBS: [&str; 2] = [
    crate::smartcar::Job::Battery.label(),
    crate::smartcar::Job::Info.label(),
];

/// The `signal` label of the per-vehicle reading time and age.
pub const SIGNALS: [&str; 3] = ["battery", "charge", "odometer"];

/// The `reason` label of `carpulse_polls_skipped_total` (gate skips, then connection holds).
pub const SKIP_REASONS: [&str; 8] = [
    "paused",
    "waiting",
    "app_throttled",
    "disabled",
    "budget",
    "needs_reauth",
    "revoked",
    "no_user_id",
];

/// The `table` label of the row counters.
pub const TABLES: [&str; 5] = ["battery", "charge", "odometer", "poll_events", "vehicles"];

/// The `outcome` label of `carpulse_token_refreshes_total`.
pub const REFRESH_OUTCOMES: [&str; 4] = ["ok", "rejected", "error", "persist_failed"];

/// The `status` label of `carpulse_connections`.
pub const CONNECTION_STATUSES: [&str; 3] = ["active", "needs_reauth", "revoked"];

/// The `api` label: `v2` (Vehicle API v2.0) or `v3` (signals).
pub fn api_label(api: ApiVersion) -> &'static str {
    match api {
        ApiVersion::V2 => "v2",
        ApiVersion::V3 => "v3",
    }
}

/// The revision carpulse was built from (`build.rs`: git, or `$CARPULSE_REVISION` when
/// packaging from a tarball), `unknown` when neither said.
pub const REVISION: &str = env!("CARPULSE_REVISION");

/// Per-vehicle bookkeeping the registry cannot answer (prometheus 0.14 neither lists nor
/// removes by partial labels). One std mutex: held for map updates only, never across an await.
#[derive(Default)]
struct Known {
    /// The latest `recorded_at` of each (vehicle, signal), what `carpulse_reading_age_seconds`
    /// is written from at each scrape, for every vehicle, polled or not (held, disabled, not
    /// asked yet).
    /// One entry per vehicle, by [`SIGNALS`] position (a key per signal cloned the id thrice).
    /// Fx-hashed, as the fleet table is: looked up for every reading and, by the health
    /// check's walk, for every vehicle.
    recorded: FxHashMap<VehicleId, [Option<UnixMillis>; SIGNALS.len()]>,
    /// Every stored vehicle, with why it is not polled (`disabled`, `revoked`, ...), or `None`.
    fleet: HashMap<VehicleId, Option<&'static str>>,
    /// Whether `set_fleet` has been called (before it, the fleet is whoever a state names).
    fleet_known: bool,
    /// Vehicles with `carpulse_vehicle_state` series and the state they say: a walk writes
    /// only the vehicles whose state changed, and drops the series of a vehicle gone.
    stated: FxHashMap<VehicleId, &'static str>,
    /// Vehicles with a `carpulse_smartcar_calls_billed` series and its value, likewise.
    billed: FxHashMap<VehicleId, u64>,
    /// Bumped when `fleet` changes or per-vehicle series are switched: the health check sets
    /// the fleet's states (and their per-vehicle series) again only then.
    fleet_changes: u64,
}

/// How many per-vehicle families keep their series (see [`Metrics::vehicle_families`]).
const VEHICLE_FAMILIES: usize = 10;

/// How many parts `/metrics` is written in: the registry's families, then one per per-vehicle
/// family, the reading ages included (see [`Metrics::render_part`]).
const PARTS: usize = 1 + VEHICLE_FAMILIES + 1;

/// The part that writes `carpulse_reading_age_seconds`: after the reading times, where its
/// kept family was written before.
const AGES_PART: usize = 8;

/// Every family carpulse exports. Cloning is cheap (the families are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub soc_ratio: VehicleGauges,
    pub range_meters: VehicleGauges,
    pub plugged_in: VehicleGauges,
    pub charge_state: VehicleGauges,
    pub odometer_meters: VehicleGauges,
    pub vehicle_info: VehicleGauges,
    pub reading_timestamp: VehicleGauges,
    /// Written at each scrape from `Known::recorded` (see the module doc), never set.
    reading_age: ComputedGauges,
    pub vehicle_up: VehicleGauges,
    pub token_expiry: GaugeVec,
    /// Per endpoint of a poll, its outcome (see [`Metrics::endpoint`]).
    pub polls: IntCounterVec,
    /// Deprecated: observed once per endpoint of a request, so a v3 listing that answers
    /// battery and charge was observed twice. Kept while the poller still feeds it; its
    /// successor is `carpulse_smartcar_request_duration_seconds` ([`Metrics::request`]).
    pub poll_duration: HistogramVec,
    /// Smartcar Vehicle API requests by `api` and `outcome` ([`Metrics::request`]).
    pub requests: IntCounterVec,
    /// One sample per Smartcar Vehicle API request ([`Metrics::request`]).
    pub request_duration: HistogramVec,
    pub token_refreshes: IntCounterVec,
    pub connections: IntGaugeVec,
    pub rows_written: IntCounterVec,
    pub rows_dropped: IntCounterVec,
    pub rows_duplicate: IntCounterVec,
    pub ticks_skipped: IntCounterVec,
    pub polls_skipped: IntCounterVec,
    /// Values and endpoints of an answer that could not be decoded or were out of range (see
    /// [`Metrics::decode_error`]).
    pub decode_errors: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// v3 application token requests (API Authentication), by outcome.
    pub app_token_requests: IntCounterVec,
    pub app_token_expiry: Gauge,
    /// 1 for the vehicle's current state, 0 for the others (see [`VEHICLE_STATES`]).
    pub vehicle_state: VehicleGauges,
    /// Fleet-wide counts per state (always exported; they add up to the stored vehicles).
    pub vehicles_in_state: IntGaugeVec,
    /// Calls Smartcar billed this calendar month (UTC), per vehicle.
    pub calls_billed: VehicleGauges,
    /// The same, summed over the fleet (always exported).
    pub calls_billed_fleet: IntGauge,
    /// The most any one vehicle was billed this month (always exported; the budget is per
    /// vehicle, so this is what an alert compares with it when per-vehicle series are off).
    pub calls_billed_vehicle_max: IntGauge,
    /// `[budget] calls_per_vehicle_month`; absent when no budget is set.
    pub calls_budget: IntGaugeVec,
    known: Arc<Mutex<Known>>,
    /// Whether per-vehicle series are exported (`metrics.per_vehicle`); totals always are.
    per_vehicle: Arc<AtomicBool>,
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauges(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help)
            // Smartcar answers in 3–45 s typically and up to 300 s; the simulator in milliseconds.
            .buckets(vec![0.05, 0.25, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Creates the series of every combination of `values` (one slice per label, one or two
/// labels) at 0.
fn touch(c: &IntCounterVec, values: &[&[&str]]) {
    match values {
        [a] => a.iter().for_each(|x| {
            c.with_label_values(&[*x]);
        }),
        [a, b] => {
            for x in *a {
                for y in *b {
                    c.with_label_values(&[*x, *y]);
                }
            }
        }
        _ => debug_assert!(false, "touch takes one or two labels"),
    }
}

/// Every `outcome` a poll endpoint or request can have: `ok`, each error kind, and
/// `token_error` (no access token, so no request).
fn outcomes() -> Vec<&'static str> {
    let mut v = vec!["ok", "token_error"];
    v.extend(ErrorKind::ALL.iter().map(|k| k.label()));
    v
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        // The standard process_* families (CPU, memory, open files, start time).
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let v = &["vehicle_id"];
        let outcomes = outcomes();
        let polls = counter(
            &r,
            "carpulse_polls_total",
            "Endpoint results of vehicle polls, by endpoint (battery, charge, odometer, info, vin, capabilities) and outcome (ok, token_error or the Smartcar error class). One request can answer several endpoints (a v3 signal listing, a v2 batch): carpulse_smartcar_requests_total counts requests.",
            &["endpoint", "outcome"],
        )?;
        touch(&polls, &[&ENDPOINTS, &outcomes]);
        let requests = counter(
            &r,
            "carpulse_smartcar_requests_total",
            "Requests made to Smartcar's Vehicle API (each a billed call; a v3 listing page or a v2 batch is one request), by api (v2, v3) and outcome (ok or the Smartcar error class).",
            &["api", "outcome"],
        )?;
        let token_refreshes = counter(
            &r,
            "carpulse_token_refreshes_total",
            "Per-user access token refreshes at smartcar.token_url, by outcome (ok; rejected: the owner must reconnect; error: network or server, retried; persist_failed: the rotated pair could not be saved).",
            &["outcome"],
        )?;
        touch(&token_refreshes, &[&REFRESH_OUTCOMES]);
        let table_counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = counter(&r, name, help, &["table"])?;
            touch(&c, &[&TABLES]);
            Ok(c)
        };
        let rows_written = table_counter(
            "carpulse_rows_written_total",
            "Rows committed to the store, by table (battery, charge, odometer, poll_events; vehicles for make/model/year and VIN updates).",
        )?;
        let rows_dropped = table_counter(
            "carpulse_rows_dropped_total",
            "Fetched rows that could not be committed to the store (lost), by table.",
        )?;
        let rows_duplicate = table_counter(
            "carpulse_rows_duplicate_total",
            "Fetched readings not stored again because that vehicle's reading at that time was stored already, by table.",
        )?;
        let ticks_skipped = counter(
            &r,
            "carpulse_ticks_skipped_total",
            "Scheduled ticks skipped because the previous cycle of that job was still running.",
            &["job"],
        )?;
        touch(&ticks_skipped, &[&JOBS]);
        let polls_skipped = counter(
            &r,
            "carpulse_polls_skipped_total",
            "Vehicle polls not made, by job and reason (paused, waiting: a retry-after or backoff, app_throttled, disabled: every endpoint of the job, budget, and the connection holds needs_reauth, revoked, no_user_id).",
            &["job", "reason"],
        )?;
        touch(&polls_skipped, &[&JOBS, &SKIP_REASONS]);
        let decode_errors = counter(
            &r,
            "carpulse_decode_errors_total",
            "Readings of an answer that could not be decoded or were out of range (SoC outside 0-100 %, a negative or non-finite distance, an implausible year), by endpoint: that value is not stored or exported; the vehicle's other readings are, and it is asked again next tick.",
            &["endpoint"],
        )?;
        touch(&decode_errors, &[&ENDPOINTS]);
        let app_token_requests = counter(
            &r,
            "carpulse_app_token_requests_total",
            "Requests for the v3 application token (API Authentication), by outcome (ok; refused: carpulse's API credentials are wrong; error: network or server).",
            &["outcome"],
        )?;
        touch(&app_token_requests, &[&["ok", "refused", "error"]]);
        let connections = int_gauges(
            &r,
            "carpulse_connections",
            "Stored Smartcar connections (one per owner account), by status (active, needs_reauth, revoked).",
            &["status"],
        )?;
        for status in CONNECTION_STATUSES {
            connections.with_label_values(&[status]).set(0);
        }
        let vehicles_in_state = int_gauges(
            &r,
            "carpulse_vehicles",
            "Stored vehicles by state: ok (polled), disabled (carpulse vehicles disable), revoked (the owner disconnected carpulse), no_user_id (no Smartcar user id for API Authentication), needs_reauth (per-user tokens refused), paused (BILLING or CONNECTED_SERVICES_ACCOUNT), no_data (Smartcar holds no signals for it). Each vehicle counts once.",
            &["state"],
        )?;
        for state in VEHICLE_STATES {
            vehicles_in_state.with_label_values(&[state]).set(0);
        }
        let build_info = int_gauges(
            &r,
            "carpulse_build_info",
            "Always 1: the carpulse version, the revision it was built from and the Vehicle API it speaks (api: v2, v3; unknown before the config is read).",
            &["version", "revision", "api"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION, "unknown"])
            .set(1);
        let app_token_expiry = Gauge::with_opts(Opts::new(
            "carpulse_app_token_expiry_timestamp_seconds",
            "When the v3 application token expires (unix seconds); 0 before the first, and without API Authentication.",
        ))?;
        r.register(Box::new(app_token_expiry.clone()))?;
        let calls_budget = int_gauges(
            &r,
            "carpulse_smartcar_calls_budget",
            "[budget] calls_per_vehicle_month: the Smartcar calls each vehicle may be billed per calendar month (UTC); absent when no budget is set.",
            &[],
        )?;
        Ok(Metrics {
            polls,
            poll_duration: histogram(
                &r,
                "carpulse_poll_duration_seconds",
                "Deprecated (observed once per endpoint of a request): use carpulse_smartcar_request_duration_seconds.",
                &["endpoint"],
            )?,
            requests,
            request_duration: histogram(
                &r,
                "carpulse_smartcar_request_duration_seconds",
                "Wall time of one request to Smartcar's Vehicle API (one sample per request), by api.",
                &["api"],
            )?,
            token_refreshes,
            connections,
            rows_written,
            rows_dropped,
            rows_duplicate,
            ticks_skipped,
            polls_skipped,
            decode_errors,
            build_info,
            app_token_requests,
            app_token_expiry,
            vehicle_state: VehicleGauges::new(
                "carpulse_vehicle_state",
                "1 for the vehicle's current state, 0 for the others (ok, disabled, revoked, no_user_id, needs_reauth, paused, no_data; see carpulse_vehicles).",
                &["vehicle_id", "state"],
            ),
            vehicles_in_state,
            soc_ratio: VehicleGauges::new(
                "carpulse_battery_state_of_charge_ratio",
                "Traction battery state of charge at the vehicle's latest reading, 0–1.",
                v,
            ),
            range_meters: VehicleGauges::new(
                "carpulse_battery_range_meters",
                "Estimated electric range in metres at the vehicle's latest reading.",
                v,
            ),
            plugged_in: VehicleGauges::new(
                "carpulse_charge_plugged_in",
                "1 while a charging cable is connected, at the vehicle's latest reading.",
                v,
            ),
            charge_state: VehicleGauges::new(
                "carpulse_charge_state",
                "1 for the current charging state (CHARGING, FULLY_CHARGED, NOT_CHARGING), 0 for the others.",
                &["vehicle_id", "state"],
            ),
            odometer_meters: VehicleGauges::new(
                "carpulse_odometer_meters",
                "Odometer in metres at the vehicle's latest reading.",
                v,
            ),
            vehicle_info: VehicleGauges::new(
                "carpulse_vehicle_info",
                "Always 1; make, model and year as labels.",
                &["vehicle_id", "make", "model", "year"],
            ),
            reading_timestamp: VehicleGauges::new(
                "carpulse_reading_timestamp_seconds",
                "When the vehicle recorded its latest stored reading of the signal (unix seconds).",
                &["vehicle_id", "signal"],
            ),
            reading_age: ComputedGauges::new(
                "carpulse_reading_age_seconds",
                "Age of the vehicle's latest stored reading of the signal (now - recorded_at) at the scrape, also while the vehicle is not polled.",
                &["vehicle_id", "signal"],
            ),
            vehicle_up: VehicleGauges::new(
                "carpulse_vehicle_up",
                "1 when the vehicle's last poll got an answer; 0 when it failed or the vehicle cannot be polled (see carpulse_vehicle_state).",
                v,
            ),
            token_expiry: gauge(
                &r,
                "carpulse_token_expiry_timestamp_seconds",
                "When each connection's per-user access token expires (unix seconds).",
                &["connection"],
            )?,
            calls_billed: VehicleGauges::new(
                "carpulse_smartcar_calls_billed",
                "Smartcar calls billed for the vehicle this calendar month (UTC): every request, v2 batch item and v3 listing page, failed ones too.",
                v,
            ),
            calls_billed_fleet: int_gauge(
                &r,
                "carpulse_smartcar_calls_billed_fleet",
                "Smartcar calls billed this calendar month (UTC), summed over every vehicle.",
            )?,
            calls_billed_vehicle_max: int_gauge(
                &r,
                "carpulse_smartcar_calls_billed_vehicle_max",
                "The most Smartcar calls any one vehicle was billed this calendar month (UTC); compare with carpulse_smartcar_calls_budget.",
            )?,
            calls_budget,
            known: Arc::default(),
            per_vehicle: Arc::new(AtomicBool::new(true)),
            registry: r,
        })
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // A poisoned lock only means a panic elsewhere; the maps are still consistent.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Vehicle API in use: the `api` label of `carpulse_build_info`, and the request
    /// series of that API started at 0.
    pub fn set_api(&self, api: ApiVersion) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION, api_label(api)])
            .set(1);
        let label = api_label(api);
        for outcome in std::iter::once("ok").chain(ErrorKind::ALL.iter().map(|k| k.label())) {
            self.requests.with_label_values(&[label, outcome]);
        }
        self.request_duration.with_label_values(&[label]);
    }

    /// Counts one request to Smartcar's Vehicle API: its outcome (`ok` or
    /// [`ErrorKind::label`]) and its wall time, one sample per request. The poller calls this
    /// once per HTTP request, whatever number of endpoints the answer carries.
    pub fn request(&self, api: ApiVersion, outcome: &str, seconds: f64) {
        let label = api_label(api);
        self.requests.with_label_values(&[label, outcome]).inc();
        self.request_duration
            .with_label_values(&[label])
            .observe(seconds);
    }

    /// Counts one value or endpoint of an answer that could not be decoded or was out of range
    /// (`carpulse_decode_errors_total`).
    pub fn decode_error(&self, endpoint: Endpoint) {
        self.decode_errors
            .with_label_values(&[endpoint.as_str()])
            .inc();
    }

    /// Counts one endpoint's result of a poll (`carpulse_polls_total`): `ok`, `token_error`,
    /// or [`ErrorKind::label`]. Once per endpoint a poll asked, however many requests it took.
    pub fn endpoint(&self, endpoint: Endpoint, outcome: &str) {
        self.polls
            .with_label_values(&[endpoint.as_str(), outcome])
            .inc();
    }

    /// Notes the latest `recorded_at` of a signal; returns the newest known (a sleeping car
    /// may answer an older reading than one already seen, which must not move the time back).
    fn note_recorded(&self, id: &VehicleId, signal: &'static str, at: UnixMillis) -> UnixMillis {
        let mut k = self.known();
        let i = SIGNALS.iter().position(|s| *s == signal).unwrap_or(0);
        let times = match k.recorded.get_mut(id) {
            Some(t) => t,
            None => k.recorded.entry(id.clone()).or_default(),
        };
        let slot = times[i].get_or_insert(at);
        *slot = (*slot).max(at);
        let newest = *slot;
        drop(k);
        self.reading_timestamp
            .with_label_values(&[id.0.as_str(), signal])
            .set(newest as f64 / 1000.0);
        newest
    }

    pub fn record_battery(&self, id: &VehicleId, r: &BatteryReading) {
        if !self.per_vehicle() {
            return;
        }
        if self.note_recorded(id, "battery", r.stamp.recorded_at) > r.stamp.recorded_at {
            return;
        }
        let v = [id.0.as_str()];
        // Through centi-percent, the store's resolution: 99.9 % reads 0.999, not 0.9990000000000001.
        self.soc_ratio
            .with_label_values(&v)
            .set((r.soc_percent * 100.0).round() / 10_000.0);
        if let Some(km) = r.range_km {
            self.range_meters.with_label_values(&v).set(km * 1000.0);
        }
    }

    pub fn record_charge(&self, id: &VehicleId, r: &ChargeReading) {
        if !self.per_vehicle() {
            return;
        }
        if self.note_recorded(id, "charge", r.stamp.recorded_at) > r.stamp.recorded_at {
            return;
        }
        let v = [id.0.as_str()];
        self.plugged_in
            .with_label_values(&v)
            .set(if r.plugged_in { 1.0 } else { 0.0 });
        for s in ChargeState::ALL {
            let on = if s == r.state { 1.0 } else { 0.0 };
            self.charge_state
                .with_label_values(&[id.0.as_str(), s.as_str()])
                .set(on);
        }
    }

    pub fn record_odometer(&self, id: &VehicleId, r: &OdometerReading) {
        if !self.per_vehicle() {
            return;
        }
        if self.note_recorded(id, "odometer", r.stamp.recorded_at) > r.stamp.recorded_at {
            return;
        }
        self.odometer_meters
            .with_label_values(&[id.0.as_str()])
            .set(r.odometer_km * 1000.0);
    }

    /// Replaces the vehicle's info series (a changed label set must not leave the old one behind).
    pub fn record_info(&self, id: &VehicleId, info: &VehicleInfo) {
        if !self.per_vehicle() {
            return;
        }
        let year = info.year.to_string();
        self.vehicle_info
            .with_label_values(&[id.0.as_str(), &info.make, &info.model, &year])
            .set_alone(1.0);
    }

    /// What the store already knows of a vehicle when the daemon starts: its latest readings
    /// and whether its last poll was answered, so dashboards and alerts have its series from
    /// the first scrape rather than after its first poll (which may be hours away).
    pub fn seed_vehicle(
        &self,
        id: &VehicleId,
        battery: Option<&BatteryReading>,
        charge: Option<&ChargeReading>,
        odometer: Option<&OdometerReading>,
        last_poll_answered: Option<bool>,
    ) {
        if !self.per_vehicle() {
            return;
        }
        if let Some(r) = battery {
            self.record_battery(id, r);
        }
        if let Some(r) = charge {
            self.record_charge(id, r);
        }
        if let Some(r) = odometer {
            self.record_odometer(id, r);
        }
        if let Some(up) = last_poll_answered {
            // Not over a poll's own answer: the catch-up seeds while the schedule may poll.
            self.vehicle_up
                .with_label_values(&[id.0.as_str()])
                .set_if_absent(if up { 1.0 } else { 0.0 });
        }
    }

    /// [`Metrics::seed_vehicle`] for every vehicle of the store's summaries.
    pub fn seed_from(&self, summaries: &[crate::store::queries::VehicleSummary]) {
        if !self.per_vehicle() {
            return;
        }
        for s in summaries {
            self.seed_vehicle(
                &s.vehicle.vehicle_id,
                s.last_battery.as_ref(),
                s.last_charge.as_ref(),
                s.last_odometer.as_ref(),
                s.last_poll.as_ref().map(|p| p.outcome == "ok"),
            );
        }
    }

    /// Notes the newest `recorded_at` of a vehicle's signals as the poller's freshness has
    /// them (the health check's walk), for `carpulse_reading_age_seconds`: a time newer than
    /// the one noted is kept, so the age is of the newest reading either has seen. Only while
    /// per-vehicle series are on.
    pub fn merge_recorded(&self, id: &VehicleId, recorded: &[(&'static str, UnixMillis)]) {
        if !self.per_vehicle() || recorded.is_empty() {
            return;
        }
        let mut k = self.known();
        let times = match k.recorded.get_mut(id) {
            Some(t) => t,
            None => k.recorded.entry(id.clone()).or_default(),
        };
        for (signal, at) in recorded {
            if let Some(i) = SIGNALS.iter().position(|s| s == signal) {
                let slot = times[i].get_or_insert(*at);
                *slot = (*slot).max(*at);
            }
        }
    }

    /// Writes `carpulse_reading_age_seconds` as of `now`: every known (vehicle, signal),
    /// polled or not, so a vehicle that cannot be polled keeps ageing and an alert on the age
    /// fires. The fleet's reading times are locked while the family is written (a few
    /// milliseconds at 10,000 vehicles; a poll noting a reading waits that long at most).
    fn render_reading_ages(&self, now: UnixMillis, out: &mut String) {
        let k = self.known();
        let mut rows: Vec<([&str; 2], f64)> = Vec::with_capacity(k.recorded.len() * 2);
        for (id, times) in &k.recorded {
            for (signal, at) in SIGNALS.iter().zip(times) {
                if let Some(at) = at {
                    rows.push(([id.0.as_str(), signal], (now - at) as f64 / 1000.0));
                }
            }
        }
        self.reading_age.render(&mut rows, out);
    }

    pub fn per_vehicle(&self) -> bool {
        self.per_vehicle.load(Ordering::Relaxed)
    }

    /// Turns per-vehicle series on or off; off drops the ones already exported.
    pub fn set_per_vehicle(&self, on: bool) {
        let was = self.per_vehicle.swap(on, Ordering::Relaxed);
        if was != on {
            // The health check's last walk set (or did not set) the per-vehicle states.
            self.known().fleet_changes += 1;
        }
        if !was || on {
            return;
        }
        for g in self.vehicle_families() {
            g.reset();
        }
        // Emptied with their capacity: a fleet over the limit stays over it, and the maps of
        // 10,000 vehicles' series hold megabytes once cleared.
        let mut k = self.known();
        k.recorded = FxHashMap::default();
        k.stated = FxHashMap::default();
        k.billed = FxHashMap::default();
    }

    /// The stored vehicles, each with why it is not polled (`disabled`, `revoked`,
    /// `no_user_id`, `needs_reauth`) or `None` when it is. Every one keeps its series; the
    /// series of a vehicle no longer stored are dropped. Called at each (re)load of the store.
    pub fn set_fleet(&self, vehicles: &[(VehicleId, Option<&'static str>)]) {
        let gone: Vec<VehicleId> = {
            let mut k = self.known();
            let now: HashMap<VehicleId, Option<&'static str>> = vehicles.iter().cloned().collect();
            let gone = k
                .fleet
                .keys()
                .filter(|id| !now.contains_key(*id))
                .cloned()
                .collect();
            if !k.fleet_known || k.fleet != now {
                k.fleet_changes += 1;
            }
            k.fleet = now;
            k.fleet_known = true;
            gone
        };
        for id in &gone {
            self.forget_vehicle(id);
        }
    }

    /// A count that moves whenever the stored vehicles or their holds change (see
    /// [`Metrics::set_fleet`]).
    pub fn fleet_changes(&self) -> u64 {
        self.known().fleet_changes
    }

    /// The stored vehicles' ids (see [`Metrics::set_fleet`]).
    pub fn fleet(&self) -> Vec<VehicleId> {
        self.known().fleet.keys().cloned().collect()
    }

    /// Sets `carpulse_vehicle_state` and `carpulse_vehicles` from the fleet's holds (see
    /// [`Metrics::set_fleet`]) and `states`, the reasons of this moment (`paused`, `no_data`, and
    /// any hold); a vehicle in neither is `ok`. Where several apply, the first of
    /// [`VEHICLE_STATES`] after `ok` wins. A vehicle that cannot be polled gets
    /// `carpulse_vehicle_up 0` (its other series stay).
    ///
    /// Only the series of vehicles whose state changed since the last call are written: at
    /// 10,000 vehicles writing all 70,000 was a third of the first health check after a tick,
    /// the largest part of an idle daemon's CPU with per-vehicle series on (issue 8).
    pub fn set_vehicle_states(&self, states: &[(VehicleId, &'static str)]) {
        let mut guard = self.known();
        self.count_vehicle_states(&guard, states);
        if !self.per_vehicle() {
            return;
        }
        let Known {
            fleet,
            fleet_known,
            stated,
            ..
        } = &mut *guard;
        let mut current: FxHashMap<&VehicleId, &'static str> = FxHashMap::default();
        current.reserve(fleet.len());
        for (id, hold) in fleet.iter() {
            current.insert(id, hold.unwrap_or("ok"));
        }
        for (id, state) in states {
            // A state naming a vehicle the store no longer has (a reload raced the health pass).
            if *fleet_known && !fleet.contains_key(id) {
                continue;
            }
            let entry = current.entry(id).or_insert("ok");
            if state_wins(state, entry) {
                *entry = state;
            }
        }
        stated.retain(|id, _| {
            let keep = current.contains_key(id);
            if !keep {
                self.vehicle_state.remove_vehicle(&id.0);
            }
            keep
        });
        for (id, now) in current {
            if stated.get(id) != Some(&now) {
                for state in VEHICLE_STATES {
                    self.vehicle_state
                        .with_label_values(&[id.0.as_str(), state])
                        .set(if state == now { 1.0 } else { 0.0 });
                }
                stated.insert(id.clone(), now);
            }
            // Every time: an answered poll may have set it to 1 since.
            if !matches!(now, "ok" | "no_data") {
                self.vehicle_up.with_label_values(&[id.0.as_str()]).set(0.0);
            }
        }
    }

    /// `carpulse_vehicles` as [`Metrics::set_vehicle_states`] defines it, counted without a
    /// copy of the fleet: only the few vehicles named in `states` are looked up (at 10,000
    /// vehicles the copy was a fifth of a health check's cost, issue 8).
    fn count_vehicle_states(&self, k: &Known, states: &[(VehicleId, &'static str)]) {
        let slot = |s: &str| VEHICLE_STATES.iter().position(|x| *x == s);
        let base = |id: &VehicleId| k.fleet.get(id).copied().flatten().unwrap_or("ok");
        // The state of each vehicle a reason of this moment names, where it wins.
        let mut named: HashMap<&VehicleId, &'static str> = HashMap::new();
        for (id, state) in states {
            if k.fleet_known && !k.fleet.contains_key(id) {
                continue; // a reload raced the health pass: the store no longer has it
            }
            let now = named.get(id).copied().unwrap_or_else(|| base(id));
            if state_wins(state, now) {
                named.insert(id, state);
            }
        }
        let mut counts = [0i64; VEHICLE_STATES.len()];
        for hold in k.fleet.values() {
            if let Some(i) = slot(hold.unwrap_or("ok")) {
                counts[i] += 1;
            }
        }
        for (id, state) in &named {
            if k.fleet.contains_key(*id) {
                if let Some(i) = slot(base(id)) {
                    counts[i] -= 1;
                }
            }
            if let Some(i) = slot(state) {
                counts[i] += 1;
            }
        }
        for (state, n) in VEHICLE_STATES.iter().zip(counts) {
            self.vehicles_in_state.with_label_values(&[state]).set(n);
        }
    }

    /// Calls billed this month per vehicle (the poller's ledger), their fleet total and
    /// maximum. Vehicles not listed keep no series; only the series whose count moved since
    /// the last call are written (see [`Metrics::set_vehicle_states`]).
    pub fn set_calls_billed(&self, calls: &[(VehicleId, u64)]) {
        let total: u64 = calls.iter().map(|(_, n)| n).sum();
        let max = calls.iter().map(|(_, n)| *n).max().unwrap_or(0);
        self.calls_billed_fleet
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        self.calls_billed_vehicle_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
        if !self.per_vehicle() {
            return;
        }
        let mut k = self.known();
        let listed: FxHashSet<&VehicleId> = calls.iter().map(|(id, _)| id).collect();
        k.billed.retain(|id, _| {
            let keep = listed.contains(id);
            if !keep {
                let _ = self.calls_billed.remove_label_values(&[id.0.as_str()]);
            }
            keep
        });
        for (id, n) in calls {
            if k.billed.get(id) != Some(n) {
                self.calls_billed
                    .with_label_values(&[id.0.as_str()])
                    .set(*n as f64);
                k.billed.insert(id.clone(), *n);
            }
        }
    }

    /// `[budget] calls_per_vehicle_month` (None: no budget, no series).
    pub fn set_budget(&self, budget: Option<u64>) {
        self.calls_budget.reset();
        if let Some(b) = budget {
            self.calls_budget
                .with_label_values::<&str>(&[])
                .set(i64::try_from(b).unwrap_or(i64::MAX));
        }
    }

    /// Drops every series of a vehicle that is no longer stored.
    pub fn forget_vehicle(&self, id: &VehicleId) {
        for g in self.vehicle_families() {
            g.remove_vehicle(&id.0);
        }
        let mut k = self.known();
        k.recorded.remove(id);
        k.stated.remove(id);
        k.billed.remove(id);
        if k.fleet.remove(id).is_some() {
            k.fleet_changes += 1;
        }
    }

    /// Connections per status; a status with none is 0.
    pub fn set_connections(&self, counts: &[(&str, i64)]) {
        self.connections.reset();
        for status in CONNECTION_STATUSES {
            self.connections.with_label_values(&[status]).set(0);
        }
        for (status, n) in counts {
            self.connections.with_label_values(&[status]).set(*n);
        }
    }

    /// The text exposition format, as of now.
    pub fn render(&self) -> String {
        self.render_at(crate::domain::now_ms())
    }

    /// The text exposition format with the reading ages as of `now`.
    pub fn render_at(&self, now: UnixMillis) -> String {
        let scrape = Scrape { now, names: None };
        let mut text = String::new();
        for part in 0..PARTS {
            self.render_part(part, &scrape, &mut text);
        }
        text
    }

    /// Part `part` of [`Metrics::render`]: 0 is the registry's families, then one per-vehicle
    /// family each, so `/metrics` sends one at a time (at 10,000 vehicles with per-vehicle
    /// series on the whole text is ~18 MB; a family is 5 MB at most). Only the families
    /// `scrape` asks for.
    fn render_part(&self, part: usize, scrape: &Scrape, out: &mut String) {
        if part == 0 {
            let mut families = self.registry.gather();
            families.retain(|f| scrape.wants(f.name()));
            if families.is_empty() {
                return;
            }
            let mut buf = Vec::new();
            if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
                tracing::error!(error = %e, "cannot encode metrics");
            }
            out.push_str(&String::from_utf8(buf).unwrap_or_default());
        } else if part == AGES_PART {
            if scrape.wants(self.reading_age.name()) {
                self.render_reading_ages(scrape.now, out);
            }
        } else {
            // The kept families around the ages' part.
            let i = if part < AGES_PART { part - 1 } else { part - 2 };
            if let Some(family) = self.vehicle_families().get(i) {
                if scrape.wants(family.name()) {
                    family.render(out);
                }
            }
        }
    }

    /// The per-vehicle families, kept outside the registry (see [`VehicleGauges`]).
    fn vehicle_families(&self) -> [&VehicleGauges; VEHICLE_FAMILIES] {
        [
            &self.soc_ratio,
            &self.range_meters,
            &self.plugged_in,
            &self.charge_state,
            &self.odometer_meters,
            &self.vehicle_info,
            &self.reading_timestamp,
            &self.vehicle_up,
            &self.vehicle_state,
            &self.calls_billed,
        ]
    }
}

/// What `/healthz` reports; the daemon updates it.
pub type Health = Arc<std::sync::Mutex<HealthState>>;

#[derive(Default, Debug, Clone)]
pub struct HealthState {
    /// Human-readable problems; empty means healthy.
    pub problems: Vec<String>,
}

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    health: Health,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`, in plain HTTP.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, metrics, health, None, Router::new(), shutdown).await
}

/// [`serve`] with the TLS and basic auth of `metrics.web_config_file`, when given, and the
/// routes of `extra` (the daemon's `POST /poll`, [`crate::daemon::control`]) behind them too.
/// Handlers learn the peer's address ([`crate::daemon::control::Peer`]).
pub async fn serve_with(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    web: Option<Arc<crate::daemon::webconfig::WebConfig>>,
    extra: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use crate::daemon::control::Peer;
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(ServerState { metrics, health })
        .merge(extra);
    let stop = async move { shutdown.cancelled().await };
    let Some(web) = web else {
        let app = app.into_make_service_with_connect_info::<Peer>();
        return axum::serve(Guarded::new(listener), app)
            .with_graceful_shutdown(stop)
            .await;
    };
    app = web.layer(app);
    let app = app.into_make_service_with_connect_info::<Peer>();
    match web.listener(listener)? {
        crate::daemon::webconfig::Listener::Plain(l) => {
            axum::serve(Guarded::new(l), app)
                .with_graceful_shutdown(stop)
                .await
        }
        crate::daemon::webconfig::Listener::Tls(l) => {
            axum::serve(Guarded::new(l), app)
                .with_graceful_shutdown(stop)
                .await
        }
    }
}

/// Connections the metrics listener holds at once. A Prometheus server or two, `curl` and
/// `carpulse status` need a handful; past it a new connection is closed as soon as it is
/// accepted, so a flood of idle connections can never take the descriptors polling needs
/// (issue 11: 1,100 idle connections exhausted 1,024 descriptors).
pub const CONNECTIONS_MAX: usize = 64;
/// How long a connection has to send a complete request, counted from its accept or from the
/// last byte of the previous response: bounds slow headers and idle keep-alives alike. Reading
/// does not extend it, so a client dribbling a byte at a time cannot hold a slot.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An `axum::serve` listener that caps connections at [`CONNECTIONS_MAX`] and gives each a
/// [`Deadline`]. Accepting (and closing) past the cap, instead of leaving connections in the
/// kernel's backlog, keeps a legitimate request from queueing behind a thousand idle ones.
pub struct Guarded<L> {
    inner: L,
    slots: Arc<tokio::sync::Semaphore>,
    /// When a refusal was last logged (a flood is logged once a minute, not per connection).
    refused_logged: Option<std::time::Instant>,
}

impl<L> Guarded<L> {
    pub fn new(inner: L) -> Guarded<L> {
        Guarded {
            inner,
            slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
            refused_logged: None,
        }
    }
}

impl<L> axum::serve::Listener for Guarded<L>
where
    L: axum::serve::Listener,
{
    type Io = Deadline<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => return (Deadline::new(io, slot), addr),
                Err(_) => {
                    drop(io);
                    let now = std::time::Instant::now();
                    if self.refused_logged.is_none_or(|at| {
                        now.duration_since(at) >= std::time::Duration::from_secs(60)
                    }) {
                        tracing::warn!(
                            max = CONNECTIONS_MAX,
                            "metrics listener: too many connections; closing new ones until some end"
                        );
                        self.refused_logged = Some(now);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of the metrics listener: holds one of its slots, and fails its reads once
/// [`REQUEST_TIMEOUT`] has passed since it was accepted or last wrote (hyper then closes it).
pub struct Deadline<Io> {
    io: Io,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<Io> Deadline<Io> {
    fn new(io: Io, slot: tokio::sync::OwnedSemaphorePermit) -> Deadline<Io> {
        Deadline {
            io,
            timer: Box::pin(tokio::time::sleep(REQUEST_TIMEOUT)),
            _slot: slot,
        }
    }
}

impl<Io: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Deadline<Io> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if std::future::Future::poll(this.timer.as_mut(), cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request in time",
            )));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<Io: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Deadline<Io> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + REQUEST_TIMEOUT);
        }
        r
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + REQUEST_TIMEOUT);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What one scrape asks for: the instant the reading ages are computed at, and the families
/// named by `name[]` parameters (all when there are none).
struct Scrape {
    now: UnixMillis,
    names: Option<Vec<String>>,
}

impl Scrape {
    fn wants(&self, family: &str) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == family))
    }
}

/// `GET /metrics`, or with `?name[]=FAMILY` (repeatable) only those families, as the Python
/// client and others filter a scrape: a script that reads one counter then costs the daemon
/// that family's text, not all of it (~18 MB at 10,000 vehicles with per-vehicle series on).
/// A query that does not parse is ignored: the whole text is served, as before.
async fn metrics_handler(
    State(s): State<ServerState>,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> impl IntoResponse {
    let names: Vec<String> = match query {
        Ok(axum::extract::Query(pairs)) => pairs
            .into_iter()
            .filter(|(k, _)| k == "name[]")
            .map(|(_, v)| v)
            .collect(),
        Err(_) => Vec::new(),
    };
    let scrape = Scrape {
        now: crate::domain::now_ms(),
        names: (!names.is_empty()).then_some(names),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        axum::body::Body::new(RenderedBody {
            metrics: s.metrics,
            scrape,
            next: 0,
        }),
    )
}

/// `/metrics` written a part at a time as the client reads it (see [`Metrics::render_part`]):
/// only one family's text is held at once, not the whole exposition.
struct RenderedBody {
    metrics: Metrics,
    /// The ages of every part are as of the request, however long the client takes to read.
    scrape: Scrape,
    next: usize,
}

impl axum::body::HttpBody for RenderedBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut text = String::new();
        // Empty parts (a family without series) are skipped rather than sent as empty frames.
        while text.is_empty() && self.next < PARTS {
            let part = self.next;
            self.next += 1;
            self.metrics.render_part(part, &self.scrape, &mut text);
        }
        if text.is_empty() {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(text.into()))))
    }
}

async fn health_handler(State(s): State<ServerState>) -> impl IntoResponse {
    // A poisoned lock only means a panic elsewhere; the data is still a list of strings.
    let problems = match s.health.lock() {
        Ok(h) => h.problems.clone(),
        Err(p) => p.into_inner().problems.clone(),
    };
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join("\n")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stamp;

    #[test]
    fn readings_become_series() {
        let m = Metrics::new().unwrap();
        let id = VehicleId("v1".into());
        let stamp = Stamp {
            recorded_at: 1_700_000_000_000,
            fetched_at: 1_700_000_001_000,
        };
        m.record_battery(
            &id,
            &BatteryReading {
                stamp,
                soc_percent: 68.5,
                range_km: Some(312.4),
            },
        );
        m.record_charge(
            &id,
            &ChargeReading {
                stamp,
                plugged_in: true,
                state: ChargeState::Charging,
            },
        );
        let text = m.render();
        assert!(
            text.contains("carpulse_battery_state_of_charge_ratio{vehicle_id=\"v1\"} 0.685"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_battery_range_meters{vehicle_id=\"v1\"} 312400"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_charge_state{state=\"CHARGING\",vehicle_id=\"v1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("carpulse_charge_state{state=\"NOT_CHARGING\",vehicle_id=\"v1\"} 0"),
            "{text}"
        );
        assert!(text.contains(
            "carpulse_reading_timestamp_seconds{signal=\"battery\",vehicle_id=\"v1\"} 1700000000"
        ));
        assert!(text.contains(&format!(
            "carpulse_build_info{{api=\"unknown\",revision=\"{REVISION}\",version=\""
        )));
        m.record_info(
            &id,
            &VehicleInfo {
                make: "TESLA".into(),
                model: "Model 3".into(),
                year: 2021,
            },
        );
        m.record_info(
            &id,
            &VehicleInfo {
                make: "TESLA".into(),
                model: "Model Y".into(),
                year: 2022,
            },
        );
        let text = m.render();
        assert!(
            !text.contains("Model 3"),
            "the old info series must go: {text}"
        );
        assert!(text.contains("model=\"Model Y\""));
        m.forget_vehicle(&id);
        assert!(!m.render().contains("vehicle_id=\"v1\""));

        // Switched off, per-vehicle series go and stay away; totals remain.
        m.record_odometer(
            &id,
            &OdometerReading {
                stamp,
                odometer_km: 1.0,
            },
        );
        m.polls.with_label_values(&["battery", "ok"]).inc();
        m.set_per_vehicle(false);
        m.record_battery(
            &id,
            &BatteryReading {
                stamp,
                soc_percent: 1.0,
                range_km: None,
            },
        );
        let text = m.render();
        assert!(!text.contains("vehicle_id="), "{text}");
        assert!(text.contains("carpulse_polls_total{endpoint=\"battery\",outcome=\"ok\"} 1"));
    }

    fn stamp(at: UnixMillis) -> crate::domain::Stamp {
        crate::domain::Stamp {
            recorded_at: at,
            fetched_at: at + 1000,
        }
    }

    /// `/metrics` over real HTTP is the rendered text, sent a family at a time.
    #[tokio::test]
    async fn metrics_are_served_over_http_as_rendered() {
        let m = Metrics::new().unwrap();
        for i in 0..50 {
            let id = VehicleId(format!("v{i:02}"));
            m.record_battery(
                &id,
                &BatteryReading {
                    stamp: stamp(1_700_000_000_000 + i),
                    soc_percent: 50.0,
                    range_km: Some(100.0),
                },
            );
        }
        m.set_vehicle_states(&[(VehicleId("v07".into()), "paused")]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, m.clone(), Health::default(), stop.clone()));
        let resp = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let body = resp.text().await.unwrap();
        stop.cancel();
        let _ = server.await;
        // The process collector's figures and the reading ages (as of each render) move
        // between two renders; everything else is equal.
        let stable = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.contains("process_"))
                .map(|l| match l.rsplit_once(' ') {
                    Some((series, _)) if l.starts_with("carpulse_reading_age_seconds{") => {
                        series.to_owned()
                    }
                    _ => l.to_owned(),
                })
                .collect()
        };
        assert_eq!(stable(&body), stable(&m.render()));
        assert!(body.contains("carpulse_battery_state_of_charge_ratio{vehicle_id=\"v49\"} 0.5"));
        assert!(body.contains("carpulse_vehicle_state{state=\"paused\",vehicle_id=\"v07\"} 1"));
        assert_eq!(
            body.matches("# TYPE carpulse_battery_range_meters gauge")
                .count(),
            1
        );
    }

    #[test]
    fn known_label_sets_start_at_zero_and_process_metrics_are_there() {
        let m = Metrics::new().unwrap();
        m.set_api(ApiVersion::V3);
        let text = m.render();
        for series in [
            "carpulse_polls_total{endpoint=\"battery\",outcome=\"billing\"} 0",
            "carpulse_polls_total{endpoint=\"capabilities\",outcome=\"token_error\"} 0",
            "carpulse_smartcar_requests_total{api=\"v3\",outcome=\"ok\"} 0",
            "carpulse_smartcar_requests_total{api=\"v3\",outcome=\"rate_limited\"} 0",
            "carpulse_smartcar_request_duration_seconds_count{api=\"v3\"} 0",
            "carpulse_rows_dropped_total{table=\"battery\"} 0",
            "carpulse_token_refreshes_total{outcome=\"rejected\"} 0",
            "carpulse_polls_skipped_total{job=\"info\",reason=\"budget\"} 0",
            "carpulse_ticks_skipped_total{job=\"battery\"} 0",
            "carpulse_connections{status=\"needs_reauth\"} 0",
            "carpulse_vehicles{state=\"paused\"} 0",
            "carpulse_smartcar_calls_billed_fleet 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        assert!(
            !text.contains("api=\"v2\""),
            "only the API in use is started"
        );
        assert!(
            text.contains(&format!(
                "carpulse_build_info{{api=\"v3\",revision=\"{REVISION}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert_eq!(text.matches("carpulse_build_info{").count(), 1);
        #[cfg(target_os = "linux")]
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("\n{family} ")), "{family}:\n{text}");
        }
    }

    #[test]
    fn one_request_is_one_sample_whatever_it_answers() {
        let m = Metrics::new().unwrap();
        m.set_api(ApiVersion::V3);
        m.request(ApiVersion::V3, "ok", 0.4);
        m.endpoint(Endpoint::Battery, "ok");
        m.endpoint(Endpoint::Charge, "ok");
        let text = m.render();
        assert!(text.contains("carpulse_smartcar_requests_total{api=\"v3\",outcome=\"ok\"} 1"));
        assert!(text.contains("carpulse_smartcar_request_duration_seconds_count{api=\"v3\"} 1"));
        assert!(text.contains("carpulse_smartcar_request_duration_seconds_sum{api=\"v3\"} 0.4"));
        assert!(text.contains("carpulse_polls_total{endpoint=\"battery\",outcome=\"ok\"} 1"));
        assert!(text.contains("carpulse_polls_total{endpoint=\"charge\",outcome=\"ok\"} 1"));
    }

    #[test]
    fn a_vehicle_that_cannot_be_polled_keeps_its_series() {
        let m = Metrics::new().unwrap();
        let (a, b, c) = (
            VehicleId("a".into()),
            VehicleId("b".into()),
            VehicleId("c".into()),
        );
        let now = 1_800_000_000_000;
        for id in [&a, &b, &c] {
            m.seed_vehicle(
                id,
                Some(&BatteryReading {
                    stamp: stamp(now - 3_600_000),
                    soc_percent: 50.0,
                    range_km: Some(200.0),
                }),
                None,
                None,
                Some(true),
            );
        }
        m.set_fleet(&[
            (a.clone(), None),
            (b.clone(), Some("needs_reauth")),
            (c.clone(), Some("disabled")),
        ]);
        m.set_vehicle_states(&[(b.clone(), "needs_reauth"), (a.clone(), "paused")]);
        let text = m.render_at(now);
        let has = |s: &str| assert!(text.contains(s), "{s} missing:\n{text}");
        has("carpulse_vehicle_state{state=\"needs_reauth\",vehicle_id=\"b\"} 1");
        has("carpulse_vehicle_state{state=\"ok\",vehicle_id=\"b\"} 0");
        has("carpulse_vehicle_state{state=\"disabled\",vehicle_id=\"c\"} 1");
        has("carpulse_vehicle_state{state=\"paused\",vehicle_id=\"a\"} 1");
        has("carpulse_vehicle_up{vehicle_id=\"b\"} 0");
        has("carpulse_vehicle_up{vehicle_id=\"c\"} 0");
        has("carpulse_vehicle_up{vehicle_id=\"a\"} 0");
        has("carpulse_battery_state_of_charge_ratio{vehicle_id=\"b\"} 0.5");
        has("carpulse_reading_age_seconds{signal=\"battery\",vehicle_id=\"b\"} 3600");
        has("carpulse_vehicles{state=\"needs_reauth\"} 1");
        has("carpulse_vehicles{state=\"disabled\"} 1");
        has("carpulse_vehicles{state=\"paused\"} 1");
        has("carpulse_vehicles{state=\"ok\"} 0");

        // The same states again (the next walk writes no state series): a poll answered
        // meanwhile does not leave a held vehicle up.
        m.vehicle_up.with_label_values(&["b"]).set(1.0);
        m.set_vehicle_states(&[(b.clone(), "needs_reauth"), (a.clone(), "paused")]);
        let stable = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.contains("process_"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(stable(&m.render_at(now)), stable(&text));

        // Re-authorized, b is ok again; c is removed from the store: its series go.
        m.set_fleet(&[(a.clone(), None), (b.clone(), None)]);
        m.set_vehicle_states(&[]);
        let text = m.render();
        assert!(!text.contains("vehicle_id=\"c\""), "{text}");
        assert!(text.contains("carpulse_vehicle_state{state=\"ok\",vehicle_id=\"b\"} 1"));
        assert!(text.contains("carpulse_vehicles{state=\"ok\"} 2"));
        assert!(text.contains("carpulse_vehicles{state=\"disabled\"} 0"));
    }

    /// The ages are written as of each render from the newest reading time either the
    /// readings or the poller's freshness gave; they go with their vehicle and with
    /// per-vehicle series.
    #[test]
    fn reading_ages_are_as_of_each_render() {
        let m = Metrics::new().unwrap();
        let (a, b) = (VehicleId("a".into()), VehicleId("b".into()));
        let t = 1_800_000_000_000;
        m.record_battery(
            &a,
            &BatteryReading {
                stamp: stamp(t),
                soc_percent: 50.0,
                range_km: None,
            },
        );
        let age = |text: &str, id: &str, signal: &str| {
            let series =
                format!("carpulse_reading_age_seconds{{signal=\"{signal}\",vehicle_id=\"{id}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.parse::<f64>().unwrap())
        };
        assert_eq!(age(&m.render_at(t + 1_500), "a", "battery"), Some(1.5));
        assert_eq!(
            age(&m.render_at(t + 3_601_000), "a", "battery"),
            Some(3601.0)
        );
        // The poller's freshness: only a newer time moves the age.
        m.merge_recorded(&a, &[("battery", t - 10_000), ("odometer", t - 2_000)]);
        m.merge_recorded(&b, &[("charge", t)]);
        let text = m.render_at(t + 1_000);
        assert_eq!(age(&text, "a", "battery"), Some(1.0));
        assert_eq!(age(&text, "a", "odometer"), Some(3.0));
        assert_eq!(age(&text, "b", "charge"), Some(1.0));
        assert_eq!(age(&text, "b", "battery"), None);
        m.forget_vehicle(&b);
        assert!(!m.render_at(t).contains("vehicle_id=\"b\""));
        m.set_per_vehicle(false);
        m.merge_recorded(&a, &[("battery", t)]);
        assert!(!m.render_at(t).contains("carpulse_reading_age_seconds"));
    }

    /// `?name[]=` over real HTTP: only the families named, the whole text without it.
    #[tokio::test]
    async fn a_scrape_can_name_the_families_it_wants() {
        let m = Metrics::new().unwrap();
        let id = VehicleId("v1".into());
        m.record_battery(
            &id,
            &BatteryReading {
                stamp: stamp(1_700_000_000_000),
                soc_percent: 50.0,
                range_km: Some(100.0),
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, m.clone(), Health::default(), stop.clone()));
        let get = |q: &'static str| async move {
            reqwest::get(format!("http://{addr}/metrics{q}"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        };
        let families = |t: &str| -> Vec<String> {
            t.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .map(|l| l.split(' ').next().unwrap_or("").to_owned())
                .collect()
        };
        let one = get("?name[]=carpulse_polls_total").await;
        assert_eq!(families(&one), ["carpulse_polls_total"], "{one}");
        let two = get(
            "?name%5B%5D=carpulse_reading_age_seconds&name[]=carpulse_battery_range_meters&x=1",
        )
        .await;
        assert_eq!(
            families(&two),
            [
                "carpulse_battery_range_meters",
                "carpulse_reading_age_seconds"
            ],
            "{two}"
        );
        assert!(two.contains("carpulse_battery_range_meters{vehicle_id=\"v1\"} 100000"));
        let none = get("?name[]=no_such_family").await;
        assert_eq!(none, "");
        let all = families(&get("").await);
        let other = families(&get("?%zz&name=carpulse_polls_total").await);
        assert!(all.len() > 20, "{all:?}");
        assert_eq!(all, other, "a query without name[] asks for everything");
        stop.cancel();
        let _ = server.await;
    }

    #[test]
    fn an_older_reading_does_not_move_the_gauges_back() {
        let m = Metrics::new().unwrap();
        let id = VehicleId("v".into());
        let reading = |at, soc| BatteryReading {
            stamp: stamp(at),
            soc_percent: soc,
            range_km: None,
        };
        m.record_battery(&id, &reading(2_000_000, 60.0));
        m.record_battery(&id, &reading(1_000_000, 40.0));
        let text = m.render();
        assert!(text.contains("carpulse_battery_state_of_charge_ratio{vehicle_id=\"v\"} 0.6"));
        assert!(text.contains(
            "carpulse_reading_timestamp_seconds{signal=\"battery\",vehicle_id=\"v\"} 2000"
        ));
    }

    #[test]
    fn billed_calls_per_vehicle_fleet_and_budget() {
        let m = Metrics::new().unwrap();
        let (a, b) = (VehicleId("a".into()), VehicleId("b".into()));
        m.set_calls_billed(&[(a.clone(), 120), (b.clone(), 30)]);
        m.set_budget(Some(500));
        let text = m.render();
        assert!(text.contains("carpulse_smartcar_calls_billed{vehicle_id=\"a\"} 120"));
        assert!(text.contains("carpulse_smartcar_calls_billed_fleet 150"));
        assert!(text.contains("carpulse_smartcar_calls_billed_vehicle_max 120"));
        assert!(text.contains("carpulse_smartcar_calls_budget 500"));
        m.set_calls_billed(&[(a, 121)]);
        m.set_budget(None);
        let text = m.render();
        assert!(!text.contains("vehicle_id=\"b\""));
        assert!(text.contains("carpulse_smartcar_calls_billed{vehicle_id=\"a\"} 121"));
        assert!(!text.contains("carpulse_smartcar_calls_budget "));
    }
}
