//! Every fault the simulator can inject, through the real binary: one `carpulse simulator` with
//! six accounts of three cars, `carpulse connect` for each, one `carpulse run` with a per-second
//! battery cron per API version. Each car gets a different fault (README "Errors": the table of
//! what carpulse does), one account's connection is revoked, three cars stay healthy. The test
//! checks what the daemon stored (`battery_history`, `poll_events`), counted (`/metrics`), told
//! (`/healthz`, its per-vehicle "not polled" log), and when it called again (the simulator's
//! `/_simulator/stats` and `/_simulator/served`), and that the other cars kept their cadence.
//!
//! Timeline of a run (T0 = the daemon's metrics listener answers):
//! - before T0: faults set (v3 through `POST /_simulator/faults` after connect; v2 mostly with
//!   `--fault KIND@VEHICLE` at the simulator's start), the sixth account revoked;
//! - T0 .. T0+10 s, phase 1: per-vehicle faults; healthy cars must be polled every second;
//! - then phase 2: one 429 RATE_LIMIT:SMARTCAR_API throttles the whole app: no car is called
//!   any more, until `/healthz` (recomputed every 15 s) names the revoked connection.
//!
//! A smaller run checks that a reconnect (and SIGHUP) lifts what PERMISSION, COMPATIBILITY and
//! BILLING stopped. Two tests pin down fixed bugs this file found: a reconnect forgot
//! `retry-after`, and a broken stderr pipe made the daemon ignore SIGTERM.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const USERS: usize = 6;
const VEHICLES_PER_USER: usize = 3;
/// The revoked account (0-based index; `/_simulator/revoke` takes it 1-based).
const REVOKED_USER: usize = 5;
/// How long every per-vehicle fault plays before the app-wide limit stops everything.
const PHASE1: Duration = Duration::from_secs(10);
/// `retry-after` of the RATE_LIMIT:VEHICLE fault, in seconds.
const RETRY_AFTER_S: i64 = 4;
/// `poll.timeout` of the daemon, and how late the `slow` fault answers (longer).
const POLL_TIMEOUT_S: u64 = 2;
const SLOW_DELAY_S: f64 = 5.0;
/// The shortest stretch of the app-wide throttle that is watched for calls.
const THROTTLE_WATCH: Duration = Duration::from_secs(3);

/// What one car is made to suffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Healthy,
    /// Healthy in phase 1; its 429 RATE_LIMIT:SMARTCAR_API starts phase 2.
    AppLimit,
    RateLimit,
    Asleep,
    Unreachable,
    Server,
    Upstream,
    Permission,
    Compatibility,
    Billing,
    Slow,
    Malformed,
    Drop,
    /// A car of the revoked account.
    Revoked,
}

/// Roles of the cars of the five live accounts, car `i` belonging to account `i % 5`: every
/// account mixes healthy and faulty cars, so a connection-wide reaction would show.
const ROLES: [Role; 15] = [
    Role::Healthy,
    Role::Healthy,
    Role::Healthy,
    Role::AppLimit,
    Role::RateLimit,
    Role::Asleep,
    Role::Unreachable,
    Role::Server,
    Role::Upstream,
    Role::Permission,
    Role::Compatibility,
    Role::Billing,
    Role::Slow,
    Role::Malformed,
    Role::Drop,
];

impl Role {
    /// The simulator's fault kind (`FaultKind::name`).
    fn kind(self) -> Option<&'static str> {
        Some(match self {
            Role::AppLimit => "app_rate_limit",
            Role::RateLimit => "rate_limit",
            Role::Asleep => "asleep",
            Role::Unreachable => "unreachable",
            Role::Server => "server",
            Role::Upstream => "upstream",
            Role::Permission => "permission",
            Role::Compatibility => "compatibility",
            Role::Billing => "billing",
            Role::Slow => "slow",
            Role::Malformed => "malformed",
            Role::Drop => "drop",
            Role::Healthy | Role::Revoked => return None,
        })
    }

    /// What the daemon must record for a poll the fault answered: `poll_events` outcome,
    /// http_status, error_type, error_code (smartcar-api.md §4.2, README "Errors").
    fn expected_event(
        self,
    ) -> (
        &'static str,
        Option<i64>,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        match self {
            Role::AppLimit => (
                "app_rate_limited",
                Some(429),
                Some("RATE_LIMIT"),
                Some("SMARTCAR_API"),
            ),
            Role::RateLimit => (
                "rate_limited",
                Some(429),
                Some("RATE_LIMIT"),
                Some("VEHICLE"),
            ),
            Role::Asleep => (
                "vehicle_state",
                Some(409),
                Some("VEHICLE_STATE"),
                Some("ASLEEP"),
            ),
            Role::Unreachable => (
                "vehicle_state",
                Some(409),
                Some("VEHICLE_STATE"),
                Some("UNREACHABLE"),
            ),
            Role::Server => ("server", Some(500), Some("SERVER"), Some("INTERNAL")),
            Role::Upstream => ("upstream", Some(502), Some("UPSTREAM"), Some("NO_RESPONSE")),
            Role::Permission => ("permission", Some(403), Some("PERMISSION"), None),
            Role::Compatibility => (
                "compatibility",
                Some(501),
                Some("COMPATIBILITY"),
                Some("VEHICLE_NOT_CAPABLE"),
            ),
            Role::Billing => (
                "billing",
                Some(430),
                Some("BILLING"),
                Some("VEHICLE_REQUEST_LIMIT"),
            ),
            // Past poll.timeout; a 200 whose body is cut short; a connection dropped mid-answer.
            Role::Slow => ("timeout", None, None, None),
            Role::Malformed => ("decode", Some(200), None, None),
            Role::Drop => ("network", None, None, None),
            Role::Healthy | Role::Revoked => ("ok", None, None, None),
        }
    }

    /// Faults that only pass through the control endpoint: they need parameters the `--fault`
    /// flag cannot give (`retry_after`, `delay`), or must start mid-run.
    fn needs_endpoint(self) -> bool {
        matches!(self, Role::RateLimit | Role::Slow | Role::AppLimit)
    }
}

/// How the per-vehicle faults are set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inject {
    /// `POST /_simulator/faults` after connect.
    ControlEndpoint,
    /// `--fault KIND@VEHICLE_ID` when the simulator starts (connect meets them too).
    StartFlags,
}

#[derive(Clone, Debug)]
struct Car {
    id: String,
    user: usize,
    role: Role,
}

/// One `poll_events` row.
#[derive(Clone, Debug)]
struct Event {
    vehicle: String,
    at: i64,
    endpoint: String,
    outcome: String,
    http_status: Option<i64>,
    error_type: Option<String>,
    error_code: Option<String>,
}

fn sim_args() -> Vec<String> {
    [
        "--users",
        &USERS.to_string(),
        "--vehicles-per-user",
        &VEHICLES_PER_USER.to_string(),
        "--report-interval",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Users (Smartcar ids) and their vehicle ids, in the simulator's order.
async fn fleet(http: &reqwest::Client, base: &str) -> Vec<(String, Vec<String>)> {
    let f = get_json(http, &format!("{base}/_simulator/vehicles")).await;
    f["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let ids = u["vehicles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_owned())
                .collect();
            (u["id"].as_str().unwrap().to_owned(), ids)
        })
        .collect()
}

fn cast(users: &[(String, Vec<String>)]) -> Vec<Car> {
    assert_eq!(users.len(), USERS);
    let mut cars = Vec::new();
    for (i, role) in ROLES.iter().enumerate() {
        let user = i % REVOKED_USER;
        cars.push(Car {
            id: users[user].1[i / REVOKED_USER].clone(),
            user,
            role: *role,
        });
    }
    for id in &users[REVOKED_USER].1 {
        cars.push(Car {
            id: id.clone(),
            user: REVOKED_USER,
            role: Role::Revoked,
        });
    }
    assert_eq!(cars.len(), USERS * VEHICLES_PER_USER);
    cars
}

fn with_role(cars: &[Car], role: Role) -> Vec<&Car> {
    cars.iter().filter(|c| c.role == role).collect()
}

fn fault_body(car: &Car) -> Value {
    let kind = car.role.kind().unwrap();
    match car.role {
        // Once: the car must be called again right after retry-after, and succeed.
        Role::RateLimit => {
            json!({"kind": kind, "vehicle_id": car.id, "retry_after": RETRY_AFTER_S, "count": 1})
        }
        Role::Slow => json!({"kind": kind, "vehicle_id": car.id, "delay": SLOW_DELAY_S}),
        Role::AppLimit => json!({"kind": kind, "vehicle_id": car.id, "count": 1}),
        // Until cleared: the daemon alone decides whether it asks again.
        _ => json!({"kind": kind, "vehicle_id": car.id}),
    }
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    let r = http.post(url).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200, "POST {url} {body}");
    r.json().await.unwrap()
}

async fn text(http: &reqwest::Client, url: &str) -> (u16, String) {
    let r = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn stat(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

fn api_requests(stats: &Value) -> u64 {
    stat(stats, "v2_requests") + stat(stats, "v3_requests")
}

/// Every `carpulse_polls_total` series that counted something: (endpoint, outcome) → value
/// (every known label set is exported from the start at 0).
fn polls_series(metrics: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("carpulse_polls_total{") else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_matches('"').to_owned())
                .unwrap()
        };
        let value: f64 = value.parse().unwrap();
        if value > 0.0 {
            out.insert((label("endpoint"), label("outcome")), value);
        }
    }
    out
}

fn skipped(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        "carpulse_polls_skipped_total",
        &[("job", "battery"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Per vehicle, in order, why the battery job did not call it: the daemon's debug lines
/// `poll{vehicle=ID job="battery"}: … not polled reason="…"` and "still busy" ("busy").
fn skip_log(log: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for line in log.lines() {
        if !line.contains("job=\"battery\"") {
            continue;
        }
        let reason = if line.contains("still busy") {
            "busy".to_owned()
        } else if let Some((_, r)) = line.split_once("not polled reason=\"") {
            r.split('"').next().unwrap().to_owned()
        } else {
            continue;
        };
        let Some((_, v)) = line.split_once("vehicle=") else {
            continue;
        };
        let id = v.split([' ', '}']).next().unwrap().to_owned();
        out.entry(id).or_default().push(reason);
    }
    out
}

fn read_events(db: &rusqlite::Connection) -> Vec<Event> {
    let mut stmt = db
        .prepare(
            "SELECT vehicle_id, at, endpoint, outcome, http_status, error_type, error_code
             FROM poll_events ORDER BY at, endpoint",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Event {
            vehicle: r.get(0)?,
            at: r.get(1)?,
            endpoint: r.get(2)?,
            outcome: r.get(3)?,
            http_status: r.get(4)?,
            error_type: r.get(5)?,
            error_code: r.get(6)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// (recorded_at, fetched_at, soc_percent) of a car's stored battery readings.
fn battery_rows(db: &rusqlite::Connection, vehicle: &str) -> Vec<(i64, i64, f64)> {
    let mut stmt = db
        .prepare(
            "SELECT recorded_at, fetched_at, soc_percent FROM battery_history
             WHERE vehicle_id = ?1 ORDER BY recorded_at",
        )
        .unwrap();
    stmt.query_map([vehicle], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn faults_through_the_daemon(api: &str, inject: Inject) {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let args = sim_args();

    // The simulator. With start flags, the vehicle ids come from a first start with the same
    // seed (the fleet is a function of it), then the simulator starts again with the faults.
    let (mut sim, base, users, cars) = match inject {
        Inject::ControlEndpoint => {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (sim, base) = start_simulator(&refs).await;
            let users = fleet(&http, &base).await;
            let cars = cast(&users);
            (sim, base, users, cars)
        }
        Inject::StartFlags => {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (mut probe, probe_base) = start_simulator(&refs).await;
            let users = fleet(&http, &probe_base).await;
            let _ = probe.terminate(Duration::from_secs(10)).await;
            let cars = cast(&users);
            let mut with_faults = args.clone();
            for car in cars.iter().filter(|c| c.role.kind().is_some()) {
                if !car.role.needs_endpoint() {
                    with_faults.push("--fault".into());
                    with_faults.push(format!("{}@{}", car.role.kind().unwrap(), car.id));
                }
            }
            let refs: Vec<&str> = with_faults.iter().map(String::as_str).collect();
            let (sim, base) = start_simulator(&refs).await;
            assert_eq!(
                fleet(&http, &base).await,
                users,
                "the same seed, the same fleet"
            );
            let table = get_json(&http, &format!("{base}/_simulator/faults")).await;
            for car in cars.iter().filter(|c| c.role.kind().is_some()) {
                let set = &table["vehicles"][&car.id]["kind"];
                if car.role.needs_endpoint() {
                    assert!(set.is_null(), "{car:?}: {table}");
                } else {
                    assert_eq!(set, car.role.kind().unwrap(), "--fault took: {table}");
                }
            }
            (sim, base, users, cars)
        }
    };
    let by_role = |role: Role| -> Vec<&Car> { with_role(&cars, role) };
    let one = |role: Role| -> &Car { with_role(&cars, role)[0] };

    let setup = write_config(
        &base,
        api,
        // No poll at start: the faults are set for the first ticks of the battery cron.
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"\npoll_at_start = false",
    );
    // A short poll.timeout, so the slow car's answer comes too late.
    let config_text = std::fs::read_to_string(&setup.config).unwrap();
    let shorter = config_text.replace(
        "timeout = \"10s\"",
        &format!("timeout = \"{POLL_TIMEOUT_S}s\""),
    );
    assert_ne!(
        shorter, config_text,
        "the helper's config has a poll.timeout"
    );
    std::fs::write(&setup.config, shorter).unwrap();
    let cfg = setup.config.to_str().unwrap();

    // Each Connect takes the next simulated account in turn.
    for _ in 0..USERS {
        connect(&setup.config, &http).await;
    }
    let faults_url = format!("{base}/_simulator/faults");
    for car in cars.iter().filter(|c| c.role.kind().is_some()) {
        let via_endpoint = inject == Inject::ControlEndpoint || car.role.needs_endpoint();
        if via_endpoint && car.role != Role::AppLimit {
            let table = post_json(&http, &faults_url, &fault_body(car)).await;
            assert_eq!(table["vehicles"][&car.id]["kind"], car.role.kind().unwrap());
        }
    }
    let revoked = post_json(
        &http,
        &format!("{base}/_simulator/revoke"),
        &json!({"user": REVOKED_USER + 1}),
    )
    .await;
    assert_eq!(revoked["revoked"], users[REVOKED_USER].0.as_str());
    let stats_url = format!("{base}/_simulator/stats");
    let s0 = get_json(&http, &stats_url).await;
    // What connect itself was served (its capability reading lists the signals).
    let mut served0: HashMap<String, Value> = HashMap::new();
    for car in &cars {
        let url = format!("{base}/_simulator/served?vehicle_id={}", car.id);
        served0.insert(car.id.clone(), get_json(&http, &url).await);
    }

    // The daemon.
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let metrics_url = format!("http://127.0.0.1:{}/metrics", setup.metrics_port);
    let healthz_url = format!("http://127.0.0.1:{}/healthz", setup.metrics_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(&metrics_url).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no /metrics: {}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    // Nothing polled yet: healthy. The revocation is discovered by the first poll.
    assert_eq!(text(&http, &healthz_url).await, (200, "ok\n".to_owned()));

    // Phase 1: the per-vehicle faults.
    tokio::time::sleep(PHASE1).await;
    let s1 = get_json(&http, &stats_url).await;
    let (_, m1) = text(&http, &metrics_url).await;
    let t1 = now_ms();

    // Phase 2: the app-wide limit, once, through one car.
    let app_car = one(Role::AppLimit);
    post_json(&http, &faults_url, &fault_body(app_car)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = text(&http, &metrics_url).await;
        let n = metric(
            &m,
            "carpulse_polls_total",
            &[("endpoint", "battery"), ("outcome", "app_rate_limited")],
        );
        // The series exists from the start at 0 (every outcome is pre-initialised).
        if n.is_some_and(|n| n > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app-wide 429 was never met: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Requests already on their way when the 429 came back may still land.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s2 = get_json(&http, &stats_url).await;
    let (_, m2) = text(&http, &metrics_url).await;
    let t2 = Instant::now();

    // /healthz is recomputed every 15 s: wait for it to name the revoked connection.
    let revoked_user = users[REVOKED_USER].0.clone();
    let deadline = t0 + Duration::from_secs(25);
    let health = loop {
        let (status, body) = text(&http, &healthz_url).await;
        if status == 503 && body.contains(&revoked_user) && t2.elapsed() >= THROTTLE_WATCH {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never named the revoked connection: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let s3 = get_json(&http, &stats_url).await;
    let (_, m3) = text(&http, &metrics_url).await;
    let watched = t2.elapsed();
    let mut served: HashMap<String, Value> = HashMap::new();
    for car in &cars {
        let url = format!("{base}/_simulator/served?vehicle_id={}", car.id);
        served.insert(car.id.clone(), get_json(&http, &url).await);
    }
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        daemon.stderr()
    );
    // Let the stderr reader drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = daemon.stderr();
    let skips = skip_log(&log);

    let db = rusqlite::Connection::open(&setup.db).unwrap();
    let events = read_events(&db);
    // A poll of a car is its battery event (a failed request is recorded for battery and charge
    // alike, with the same `at`).
    let polls = |car: &Car| -> Vec<&Event> {
        events
            .iter()
            .filter(|e| e.vehicle == car.id && e.endpoint == "battery")
            .collect()
    };
    // What each car went through, printed first so a failure shows it.
    for car in &cars {
        let outcomes: Vec<&str> = polls(car).iter().map(|e| e.outcome.as_str()).collect();
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for r in skips.get(&car.id).into_iter().flatten() {
            *reasons.entry(r.as_str()).or_default() += 1;
        }
        eprintln!(
            "{api} {:?} {} user {}: {} rows, polls {outcomes:?}, skipped {reasons:?}",
            car.role,
            car.id,
            car.user,
            battery_rows(&db, &car.id).len()
        );
    }
    let first_at = events.iter().map(|e| e.at).min().expect("no poll at all");
    // Battery ticks from the first poll to the end of phase 1.
    let ticks = ((t1 - first_at) / 1000 + 1) as usize;
    assert!(ticks >= 7, "phase 1 lasted {ticks} ticks");
    let at_least = |n: usize| (n as f64 * 0.6).floor() as usize;
    let phase1 =
        |car: &Car| -> Vec<&Event> { polls(car).into_iter().filter(|e| e.at <= t1).collect() };

    // Every failed poll is recorded for both endpoints of the job, as the fault answered.
    for car in cars.iter().filter(|c| c.role != Role::Revoked) {
        for p in polls(car).into_iter().filter(|e| e.outcome != "ok") {
            assert_eq!(
                (
                    p.outcome.as_str(),
                    p.http_status,
                    p.error_type.as_deref(),
                    p.error_code.as_deref()
                ),
                car.role.expected_event(),
                "{car:?}: {p:?}"
            );
            let charge = events
                .iter()
                .find(|e| e.vehicle == car.id && e.endpoint == "charge" && e.at == p.at)
                .unwrap_or_else(|| panic!("{car:?}: no charge event beside {p:?}"));
            assert_eq!(charge.outcome, p.outcome, "{car:?}");
        }
    }

    // Healthy cars (and the app-limit car in phase 1) keep a per-second cadence, store what
    // was served, and are never skipped before the app-wide limit.
    for car in by_role(Role::Healthy)
        .into_iter()
        .chain(by_role(Role::AppLimit))
    {
        let p = phase1(car);
        assert!(
            p.len() >= at_least(ticks) && p.len() <= ticks + 1,
            "{car:?}: {} polls in {ticks} ticks",
            p.len()
        );
        assert!(p.iter().all(|e| e.outcome == "ok"), "{car:?}: {p:?}");
        let rows = battery_rows(&db, &car.id);
        assert!(
            rows.len() >= at_least(ticks) / 2,
            "{car:?}: {} rows",
            rows.len()
        );
        let served_battery = served[&car.id]["battery"].as_array().unwrap();
        for (recorded_at, fetched_at, soc) in rows {
            assert!(recorded_at <= fetched_at);
            assert!(
                served_battery
                    .iter()
                    .any(|s| s["recorded_at"] == recorded_at
                        && (s["soc_percent"].as_f64().unwrap() - soc).abs() < 1e-9),
                "{car:?}: stored {recorded_at}/{soc} was never served"
            );
        }
        // ("busy": a poll still running at the next tick on a loaded machine, no reaction.)
        let reasons = skips.get(&car.id).cloned().unwrap_or_default();
        assert!(
            reasons.iter().all(|r| r == "app_throttled" || r == "busy"),
            "{car:?} skipped: {reasons:?}"
        );
    }

    // Asleep and unreachable: asked again at every tick, never skipped, nothing stored.
    for car in by_role(Role::Asleep)
        .into_iter()
        .chain(by_role(Role::Unreachable))
    {
        let p = phase1(car);
        assert!(
            p.len() >= at_least(ticks),
            "{car:?}: {} polls in {ticks} ticks",
            p.len()
        );
        assert!(battery_rows(&db, &car.id).is_empty(), "{car:?}");
        // ("busy": a poll still running at the next tick on a loaded machine, no reaction.)
        let reasons = skips.get(&car.id).cloned().unwrap_or_default();
        assert!(
            reasons.iter().all(|r| r == "app_throttled" || r == "busy"),
            "{car:?} skipped: {reasons:?}"
        );
    }

    // RATE_LIMIT:VEHICLE once, retry-after 4 s: no call inside the window, the first call after
    // it succeeds, and the car is back on its cadence.
    let limited = one(Role::RateLimit);
    let p = phase1(limited);
    assert_eq!(p[0].outcome, "rate_limited", "{p:?}");
    assert_eq!(
        p.iter().filter(|e| e.outcome == "rate_limited").count(),
        1,
        "{p:?}"
    );
    let at_429 = p[0].at;
    let window_end = at_429 + RETRY_AFTER_S * 1000;
    let next = p.get(1).expect("called again after retry-after");
    assert!(
        next.at >= window_end,
        "called {} ms after a retry-after of {RETRY_AFTER_S} s",
        next.at - at_429
    );
    assert!(
        next.at <= window_end + 3_000,
        "called only {} ms after a retry-after of {RETRY_AFTER_S} s",
        next.at - at_429
    );
    assert!(p[1..].iter().all(|e| e.outcome == "ok"), "{p:?}");
    // As many calls after the window as a healthy car got in the same stretch, ±1.
    let after: usize = p.iter().filter(|e| e.at >= window_end).count();
    let healthy_after: Vec<usize> = by_role(Role::Healthy)
        .iter()
        .map(|c| {
            phase1(c)
                .iter()
                .filter(|e| e.at >= window_end && e.at <= t1)
                .count()
        })
        .collect();
    let (lo, hi) = (
        *healthy_after.iter().min().unwrap(),
        *healthy_after.iter().max().unwrap(),
    );
    assert!(
        after + 1 >= lo && after <= hi + 1,
        "after retry-after: {after} calls, healthy cars {healthy_after:?}"
    );
    let waits = skips.get(&limited.id).cloned().unwrap_or_default();
    let waiting = waits.iter().filter(|r| *r == "waiting").count();
    assert!(
        (1..=RETRY_AFTER_S as usize + 1).contains(&waiting),
        "ticks skipped inside retry-after: {waits:?}"
    );
    // The simulator served it nothing inside the window, and was never asked inside it.
    let before = served0[&limited.id]["battery"].as_array().unwrap();
    for s in served[&limited.id]["battery"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !before.contains(s))
    {
        let recorded_at = s["recorded_at"].as_i64().unwrap();
        assert!(
            recorded_at > window_end - 1000,
            "served {s} inside the retry-after window ({at_429}..{window_end})"
        );
    }
    assert!(!battery_rows(&db, &limited.id).is_empty());
    assert!(battery_rows(&db, &limited.id)
        .iter()
        .all(|(_, fetched_at, _)| *fetched_at >= window_end));
    assert_eq!(stat(&s3, "retry_after_violations"), 0, "{s3}");

    // Server, upstream, timeout, malformed, dropped: one call, then backoff (at least a minute)
    // for that car alone: skipped as "waiting" at every later tick, nothing stored.
    for role in [
        Role::Server,
        Role::Upstream,
        Role::Slow,
        Role::Malformed,
        Role::Drop,
    ] {
        let car = one(role);
        let p = polls(car);
        assert_eq!(p.len(), 1, "{car:?}: one call, then backoff: {p:?}");
        assert!(battery_rows(&db, &car.id).is_empty(), "{car:?}");
        let reasons: Vec<String> = skips
            .get(&car.id)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r != "app_throttled")
            .collect();
        let waiting = reasons.iter().filter(|r| *r == "waiting").count();
        assert!(
            reasons.iter().all(|r| r == "waiting" || r == "busy"),
            "{car:?}: {reasons:?}"
        );
        // The slow car is still in its first call (until poll.timeout) at the next tick: skipped,
        // not asked twice.
        if role == Role::Slow {
            assert_eq!(
                reasons.first().map(String::as_str),
                Some("busy"),
                "{reasons:?}"
            );
        }
        assert!(
            waiting + 2 >= at_least(ticks),
            "{car:?}: waiting at {waiting} of {ticks} ticks"
        );
    }
    // A cut-off body or a dropped connection: the simulator did serve a reading, carpulse
    // stored none of it.
    for role in [Role::Malformed, Role::Drop] {
        let car = one(role);
        assert!(
            !served[&car.id]["battery"].as_array().unwrap().is_empty(),
            "{car:?}: {}",
            served[&car.id]
        );
    }

    // Permission and compatibility: both endpoints disabled for that car after one call; the
    // connection is not an auth failure and stays active.
    for (role, reason) in [
        (Role::Permission, "disabled"),
        (Role::Compatibility, "disabled"),
        (Role::Billing, "paused"),
    ] {
        let car = one(role);
        let p = polls(car);
        assert_eq!(p.len(), 1, "{car:?}: {p:?}");
        assert!(battery_rows(&db, &car.id).is_empty());
        let reasons: Vec<String> = skips
            .get(&car.id)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r != "app_throttled")
            .collect();
        assert!(reasons.iter().all(|r| r == reason), "{car:?}: {reasons:?}");
        assert!(
            reasons.len() + 2 >= at_least(ticks),
            "{car:?}: {reason} at {} of {ticks} ticks",
            reasons.len()
        );
    }

    // Per-vehicle liveness at the end of phase 1.
    for car in &cars {
        let up = metric(&m1, "carpulse_vehicle_up", &[("vehicle_id", &car.id)]);
        let want = match car.role {
            Role::Healthy | Role::AppLimit | Role::RateLimit => 1.0,
            _ => 0.0,
        };
        assert_eq!(up, Some(want), "{car:?} carpulse_vehicle_up");
    }

    // The revoked account: needs_reauth, its cars no longer reach Smartcar, nothing stored,
    // every other connection active and polled (above).
    let statuses: HashMap<String, (i64, String)> = db
        .prepare("SELECT user_id, id, status FROM connections")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(statuses.len(), USERS);
    for (i, (user, _)) in users.iter().enumerate() {
        let want = if i == REVOKED_USER {
            "needs_reauth"
        } else {
            "active"
        };
        assert_eq!(statuses[user].1, want, "connection of user {i}");
    }
    // A refused permission, an incapable car, a billing stop: reactions for that car, never
    // the connection's status.
    for car in cars.iter().filter(|c| c.role != Role::Revoked) {
        assert_eq!(statuses[&users[car.user].0].1, "active", "{car:?}");
    }
    let revoked_connection = statuses[&revoked_user].0;
    assert!(
        health.contains(&format!("connection {revoked_connection} ")),
        "{health}"
    );
    for (user, _) in users.iter().filter(|(u, _)| *u != revoked_user) {
        assert!(!health.contains(user.as_str()), "{health}");
    }
    assert_eq!(
        metric(&m3, "carpulse_connections", &[("status", "needs_reauth")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&m3, "carpulse_connections", &[("status", "active")]),
        Some((USERS - 1) as f64)
    );
    assert_eq!(
        metric(
            &m3,
            "carpulse_token_refreshes_total",
            &[("outcome", "rejected")]
        ),
        Some(1.0),
        "one refused refresh, for the revoked account only"
    );
    for car in by_role(Role::Revoked) {
        assert!(battery_rows(&db, &car.id).is_empty());
        // At most the poll that met the refusal is recorded (token_error); every tick after
        // it is a skip, not a poll.
        let p = polls(car);
        assert!(
            p.len() <= 1 && p.iter().all(|e| e.outcome == "token_error"),
            "{car:?}: {p:?}"
        );
        // (Phase 2's app-wide throttle comes first once it is on.)
        let reasons = skips.get(&car.id).cloned().unwrap_or_default();
        let before_throttle: Vec<&String> = reasons
            .iter()
            .take_while(|r| r.as_str() != "app_throttled")
            .collect();
        assert!(
            before_throttle.len() >= 3 && before_throttle.iter().all(|r| *r == "needs_reauth"),
            "{car:?}: {reasons:?}"
        );
    }
    // Each of its cars presented the revoked access token at most once, plus one refresh, all
    // during the first tick.
    let revoked_uses = stat(&s1, "revoked_token_uses");
    assert!(
        (2..=VEHICLES_PER_USER as u64 + 1).contains(&revoked_uses),
        "{s1}"
    );
    assert_eq!(stat(&s3, "revoked_token_uses"), revoked_uses, "{s3}");
    assert_eq!(stat(&s3, "refreshes"), stat(&s0, "refreshes"), "{s3}");

    // The app-wide limit: one 429, then nobody is called.
    let p = polls(app_car);
    let app_limited: Vec<&&Event> = p
        .iter()
        .filter(|e| e.outcome == "app_rate_limited")
        .collect();
    assert_eq!(app_limited.len(), 1, "{p:?}");
    let at_app = app_limited[0].at;
    assert!(at_app > t1);
    let late: Vec<&Event> = events.iter().filter(|e| e.at > at_app + 2_000).collect();
    assert!(
        late.is_empty(),
        "polled under the app-wide throttle: {late:?}"
    );
    assert_eq!(
        api_requests(&s3),
        api_requests(&s2),
        "Smartcar was called during {watched:?} of app-wide throttle"
    );
    // Every car, whatever its own state (paused, disabled, backing off, of the revoked
    // account), is held by the app-wide throttle, which is checked first; once per tick.
    let throttled = skipped(&m3, "app_throttled") - skipped(&m2, "app_throttled");
    let fleet_size = cars.len() as f64;
    let secs = watched.as_secs_f64().ceil();
    eprintln!("{api}: {throttled} app_throttled skips in {watched:?}");
    assert!(
        throttled >= fleet_size && throttled <= fleet_size * (secs + 2.0),
        "{throttled} app_throttled skips in {watched:?} for {fleet_size} cars (m2 {}, m3 {})",
        skipped(&m2, "app_throttled"),
        skipped(&m3, "app_throttled")
    );
    for car in &cars {
        let reasons = skips.get(&car.id).cloned().unwrap_or_default();
        let first = reasons.iter().position(|r| r == "app_throttled");
        assert!(
            first.is_some_and(|i| reasons[i..].iter().all(|r| r == "app_throttled")),
            "{car:?}: after the app-wide 429, only app_throttled: {reasons:?}"
        );
    }

    // Every fault the simulator served is one poll the daemon recorded, and no other.
    let faulted_polls: usize = cars
        .iter()
        .filter(|c| c.role.kind().is_some())
        .map(|c| polls(c).iter().filter(|e| e.outcome != "ok").count())
        .sum();
    assert_eq!(
        stat(&s3, "faults_served") - stat(&s0, "faults_served"),
        faulted_polls as u64,
        "{s3}"
    );

    // /metrics agrees with the store: every carpulse_polls_total series is its poll_events
    // count (nothing was polled after m3), and the skip counters are the "not polled" lines.
    let mut counted: BTreeMap<(String, String), f64> = BTreeMap::new();
    for e in &events {
        *counted
            .entry((e.endpoint.clone(), e.outcome.clone()))
            .or_default() += 1.0;
    }
    assert_eq!(polls_series(&m3), counted);
    let mut logged: HashMap<&str, f64> = HashMap::new();
    for r in skips.values().flatten() {
        *logged.entry(r.as_str()).or_default() += 1.0;
    }
    for reason in ["paused", "disabled", "waiting"] {
        assert_eq!(
            skipped(&m3, reason),
            logged.get(reason).copied().unwrap_or(0.0),
            "polls_skipped reason={reason}"
        );
        assert!(skipped(&m1, reason) > 0.0, "reason={reason} in phase 1");
    }
    assert!(skipped(&m3, "app_throttled") <= logged["app_throttled"]);
    assert_eq!(skipped(&m3, "budget"), 0.0);

    let _ = sim.terminate(Duration::from_secs(10)).await;
    eprintln!(
        "faults_through_the_daemon({api}): {:?}, {ticks} ticks in phase 1",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_every_fault_through_the_control_endpoint() {
    faults_through_the_daemon("v3", Inject::ControlEndpoint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_every_fault_with_start_flags_and_the_control_endpoint() {
    faults_through_the_daemon("v2", Inject::StartFlags).await;
}

/// One run of the reconnect scenario: one account whose cars get `faults` (a car per entry),
/// the daemon meets them, the faults are cleared (the owner re-consents, settles the bill),
/// the account connects again and the daemon is told with SIGHUP.
struct Reconnected {
    cars: Vec<(String, Value)>,
    events: Vec<Event>,
    /// When each fault was cleared, and when SIGHUP was sent (unix ms).
    cleared_at: i64,
    hup_at: i64,
    /// Simulator counters right before SIGHUP (after the second connect) and at the end.
    before_hup: Value,
    at_end: Value,
    log: String,
    db: rusqlite::Connection,
    _dir: tempfile::TempDir,
}

/// `faults`: the fault of each car of the account (`null`: healthy); `keep`: faults not cleared
/// before the reconnect (a `retry-after` window is the car's, not the consent's).
async fn reconnect_scenario(faults: &[Value], keep: &[usize]) -> Reconnected {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut sim, base) = start_simulator(&[
        "--users",
        "1",
        "--vehicles-per-user",
        &faults.len().to_string(),
        "--report-interval",
        "1",
    ])
    .await;
    let setup = write_config(
        &base,
        "v3",
        // No poll at start: the faults are set for the first ticks of the battery cron.
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"\npoll_at_start = false",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let ids = fleet(&http, &base).await.remove(0).1;
    let faults_url = format!("{base}/_simulator/faults");
    let mut cars = Vec::new();
    for (id, fault) in ids.iter().zip(faults) {
        if !fault.is_null() {
            let mut body = fault.clone();
            body["vehicle_id"] = json!(id);
            post_json(&http, &faults_url, &body).await;
        }
        cars.push((id.clone(), fault.clone()));
    }
    let stats_url = format!("{base}/_simulator/stats");

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    // Three ticks: every faulty car has failed once and been held back since.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    for (i, (id, fault)) in cars.iter().enumerate() {
        if !fault.is_null() && !keep.contains(&i) {
            let r = http
                .delete(format!("{faults_url}?vehicle_id={id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let cleared_at = now_ms();
    // The cars would answer now; the daemon must not know it yet.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    connect(&setup.config, &http).await;
    let before_hup = get_json(&http, &stats_url).await;
    let hup_at = now_ms();
    daemon.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let at_end = get_json(&http, &stats_url).await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        daemon.stderr()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = daemon.stderr();
    let db = rusqlite::Connection::open(&setup.db).unwrap();
    let events = read_events(&db);
    let _ = sim.terminate(Duration::from_secs(10)).await;
    Reconnected {
        cars,
        events,
        cleared_at,
        hup_at,
        before_hup,
        at_end,
        log,
        db,
        _dir: setup.dir,
    }
}

impl Reconnected {
    fn polls(&self, id: &str) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.vehicle == id && e.endpoint == "battery")
            .collect()
    }
}

/// PERMISSION and COMPATIBILITY disable the car's endpoints and BILLING pauses it until the
/// owner connects again: not when the car would answer again, but at once when the daemon
/// adopts the new consent (SIGHUP here; within a minute otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_lifts_disabled_endpoints_and_a_pause() {
    let started = Instant::now();
    let r = reconnect_scenario(
        &[
            Value::Null,
            json!({"kind": "permission"}),
            json!({"kind": "compatibility"}),
            json!({"kind": "billing"}),
        ],
        &[],
    )
    .await;
    let skips = skip_log(&r.log);
    let first_at = r.events.iter().map(|e| e.at).min().expect("no poll at all");
    // Battery ticks before the reload.
    let ticks = ((r.hup_at - first_at) / 1000 + 1) as usize;
    let at_least = (ticks as f64 * 0.6).floor() as usize;
    for (id, fault) in &r.cars {
        let polls = r.polls(id);
        let before: Vec<&&Event> = polls.iter().filter(|e| e.at < r.hup_at).collect();
        let after: Vec<&&Event> = polls.iter().filter(|e| e.at > r.hup_at).collect();
        eprintln!(
            "{fault}: {} polls before SIGHUP, {} after, skipped {:?}",
            before.len(),
            after.len(),
            skips.get(id)
        );
        assert!(
            after.len() >= 2 && after.iter().all(|e| e.outcome == "ok"),
            "{fault}: polled again after the reconnect: {after:?}"
        );
        let stored_after: i64 =
            r.db.query_row(
                "SELECT count(*) FROM battery_history WHERE vehicle_id = ?1 AND fetched_at > ?2",
                rusqlite::params![id, r.hup_at],
                |row| row.get(0),
            )
            .unwrap();
        assert!(stored_after >= 1, "{fault}: stored after the reconnect");
        if fault.is_null() {
            assert!(
                before.len() >= at_least,
                "the healthy car kept its cadence: {} polls in {ticks} ticks",
                before.len()
            );
            continue;
        }
        // One failed call, then nothing until the reconnect, though the car would have
        // answered since the fault was cleared.
        assert_eq!(before.len(), 1, "{fault}: {before:?}");
        assert_ne!(before[0].outcome, "ok");
        assert!(before[0].at < r.cleared_at);
        let reason = if fault["kind"] == "billing" {
            "paused"
        } else {
            "disabled"
        };
        let reasons = skips.get(id).cloned().unwrap_or_default();
        assert!(
            reasons.len() + 1 >= at_least && reasons.iter().all(|x| x == reason),
            "{fault}: {reasons:?}"
        );
    }
    assert!(
        r.log.contains("vehicle set reloaded")
            && r.log.contains("connections_added_or_reauthorized=1"),
        "{}",
        r.log
    );
    let status: String =
        r.db.query_row("SELECT status FROM connections", [], |row| row.get(0))
            .unwrap();
    assert_eq!(status, "active");
    assert_eq!(stat(&r.at_end, "retry_after_violations"), 0);
    eprintln!(
        "a_reconnect_lifts_disabled_endpoints_and_a_pause: {:?}",
        started.elapsed()
    );
}

/// A reconnect lifts disabled endpoints and pauses, but not a car's `retry-after`: the daemon
/// must not call a rate-limited car before it (smartcar-api.md §2.4) just because its owner
/// consented again. (Found by this file: `Gates::reset` used to drop the whole gate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_keeps_an_unexpired_retry_after() {
    const LONG_RETRY_AFTER_S: i64 = 30;
    let r = reconnect_scenario(
        &[
            json!({"kind": "rate_limit", "retry_after": LONG_RETRY_AFTER_S, "count": 1}),
            json!({"kind": "permission"}),
        ],
        &[0],
    )
    .await;
    let limited = &r.cars[0].0;
    let polls = r.polls(limited);
    eprintln!(
        "retry_after_violations: {} before SIGHUP (by `carpulse connect`), {} at the end",
        stat(&r.before_hup, "retry_after_violations"),
        stat(&r.at_end, "retry_after_violations")
    );
    assert_eq!(polls[0].outcome, "rate_limited", "{polls:?}");
    let window_end = polls[0].at + LONG_RETRY_AFTER_S * 1000;
    assert!(
        r.hup_at + 3_000 < window_end,
        "the reload came inside the window"
    );
    // The reconnect itself worked: the car whose permission was missing is polled again.
    assert!(
        r.polls(&r.cars[1].0)
            .iter()
            .any(|e| e.at > r.hup_at && e.outcome == "ok"),
        "the re-consented car is polled again"
    );
    // `carpulse connect` itself asks every car for its make once, inside the window (counted
    // in before_hup); after SIGHUP the daemon must not call the car until retry-after.
    let early: Vec<&&Event> = polls[1..].iter().filter(|e| e.at < window_end).collect();
    assert!(
        early.is_empty(),
        "called {} ms after a 429 with retry-after {LONG_RETRY_AFTER_S} s: {early:?}",
        early.first().map(|e| e.at - polls[0].at).unwrap_or(0)
    );
    assert_eq!(
        stat(&r.at_end, "retry_after_violations"),
        stat(&r.before_hup, "retry_after_violations"),
        "the daemon called inside retry-after after the reload"
    );
}

/// SIGTERM stops the daemon even when its stderr is a broken pipe (its reader gone: a
/// `carpulse run 2>&1 | tee` whose tee died). (Found by this file: tracing-subscriber reported
/// the failed write with `eprintln!`, which panicked the task that logged, and the SIGTERM
/// task logged before it cancelled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_even_when_its_log_pipe_is_broken() {
    use tokio::io::AsyncBufReadExt;
    // Nothing to poll: the daemon only serves /metrics and logs its ticks.
    let setup = write_config(
        "http://127.0.0.1:9",
        "v3",
        // No poll at start: the faults are set for the first ticks of the battery cron.
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"\npoll_at_start = false",
    );
    let mut child = tokio::process::Command::new(BIN)
        .args(["--config", setup.config.to_str().unwrap(), "run"])
        .env_remove("CARPULSE_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .expect("stderr open");
        // Running steadily: the schedule has fired once.
        if line.contains("poll cycle done") {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never ran");
    }
    // The log reader goes away; the daemon logs a line per tick.
    drop(lines);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let pid = child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let exited = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    // kill_on_drop ends it (SIGKILL) if SIGTERM did not.
    let status = exited
        .expect("SIGTERM did not stop the daemon within 15 s (its stderr is a broken pipe)")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
