//! Issue 11, the API side: what a hostile Smartcar look-alike (a careless proxy, a broken
//! deployment, an attacker in the path) did to carpulse, each made harmless. Every test runs
//! the real `carpulse run` against the simulator over loopback, with the simulator's hostile
//! fault kinds (`echo_error`, `html_error`, `huge`, `slow_drip`, `retry_after_date`, `absurd`,
//! `endless_paging`, `invalid_request`, `odd_expires_in`), and asserts on what a user sees: the
//! store, `/metrics`, the log.
//!
//! Modules of this file, one per item of the issue: waits (item 2), secrets (item 3), typed
//! errors (item 5), token endpoint refusals (item 6), body limits (item 7), decoding (items 8
//! and 9), paging and token lifetimes (the "lower" items).

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{connect, get_json, metric, spawn, start_simulator, wait_for, write_config, Proc};
use serde_json::{json, Value};

/// A simulator, a connected store and the car ids, for one test.
struct World {
    sim: Proc,
    base: String,
    http: reqwest::Client,
    setup: common::Setup,
    cars: Vec<String>,
}

impl World {
    /// `cars` vehicles of one user, connected through `carpulse connect`; battery polled every
    /// second, info once a day; `poll.timeout` as given.
    async fn start(api: &str, cars: usize, sim_extra: &[&str], timeout: &str) -> World {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let n = cars.to_string();
        let mut args = vec![
            "--users",
            "1",
            "--vehicles-per-user",
            &n,
            "--report-interval",
            "1",
        ];
        args.extend_from_slice(sim_extra);
        let (sim, base) = start_simulator(&args).await;
        let setup = write_config(
            &base,
            api,
            "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
        );
        let text = std::fs::read_to_string(&setup.config)
            .unwrap()
            .replace("timeout = \"10s\"", &format!("timeout = \"{timeout}\""));
        std::fs::write(&setup.config, text).unwrap();
        connect(&setup.config, &http).await;
        let f = get_json(&http, &format!("{base}/_simulator/vehicles")).await;
        let cars = f["users"][0]["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        World {
            sim,
            base,
            http,
            setup,
            cars,
        }
    }

    async fn fault(&self, body: Value) {
        let r = self
            .http
            .post(format!("{}/_simulator/faults", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "setting fault {body}");
    }

    fn run(&self) -> Proc {
        let cfg = self.setup.config.to_str().unwrap();
        spawn("run", &["--config", cfg, "run"], &[])
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.setup.db).unwrap()
    }

    fn tokens_db(&self) -> rusqlite::Connection {
        let p = self.setup.db.with_file_name("carpulse.tokens.db");
        rusqlite::Connection::open(p).unwrap()
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.setup.metrics_port);
        match self.http.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// (endpoint, outcome) of a car's poll events, oldest first.
    fn events(&self, car: &str) -> Vec<(String, String)> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT endpoint, outcome FROM poll_events WHERE vehicle_id = ?1 ORDER BY at, endpoint",
            )
            .unwrap();
        stmt.query_map([car], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Whether any endpoint of the car had `outcome` (a capability read may meet a fault
    /// before the battery poll does).
    fn has_outcome(&self, car: &str, outcome: &str) -> bool {
        self.events(car).iter().any(|(_, o)| o == outcome)
    }

    fn has_event(&self, car: &str, endpoint: &str, outcome: &str) -> bool {
        self.events(car)
            .iter()
            .any(|(e, o)| e == endpoint && o == outcome)
    }

    /// Stored blocks of a car: (endpoint, reason, until).
    fn blocks(&self, car: &str) -> Vec<(String, String, Option<i64>)> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT endpoint, reason, until FROM blocked_endpoints WHERE vehicle_id = ?1 ORDER BY endpoint",
            )
            .unwrap();
        stmt.query_map([car], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    async fn stop(mut self, mut daemon: Proc) -> String {
        assert_eq!(
            daemon.terminate(Duration::from_secs(30)).await,
            Some(0),
            "{}",
            daemon.stderr()
        );
        let _ = self.sim.terminate(Duration::from_secs(10)).await;
        daemon.stderr()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const DAY_MS: i64 = 86_400_000;
const WITHIN: Duration = Duration::from_secs(60);

/// Item 2: `Retry-After: Fri, 31 Dec 9999 23:59:59 GMT` waits a day at most; a stored wait
/// from an older carpulse ("in 2,912,109 days") is corrected at the next start; `carpulse
/// vehicles enable` lifts the wait, and the daemon polls the car again after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_date_retry_after_is_capped_corrected_at_load_and_lifted_by_enable() {
    let w = World::start("v3", 1, &[], "10s").await;
    let car = w.cars[0].clone();
    w.fault(json!({"kind": "retry_after_date", "vehicle_id": car, "count": 1}))
        .await;
    let mut daemon = w.run();
    wait_for("a stored wait after the 429", WITHIN, || async {
        w.blocks(&car).iter().any(|(e, _, _)| e == "~")
    })
    .await;
    let until = w
        .blocks(&car)
        .into_iter()
        .find_map(|(e, _, u)| (e == "~").then_some(u))
        .flatten()
        .expect("a wait has an until");
    let left = until - now_ms();
    eprintln!("stored wait ends in {} s", left / 1000);
    assert!(
        left <= DAY_MS && left > DAY_MS - 120_000,
        "a far HTTP-date waits a day: {left} ms"
    );
    assert!(w.has_outcome(&car, "rate_limited"));
    assert_eq!(daemon.terminate(WITHIN).await, Some(0));

    // An older carpulse stored the date uncapped.
    w.db()
        .execute(
            "UPDATE vehicle_blocks SET until = 253402300799000 WHERE endpoint = '~'",
            [],
        )
        .unwrap();
    let daemon = w.run();
    wait_for("the absurd stored wait is corrected", WITHIN, || async {
        w.blocks(&car)
            .iter()
            .any(|(e, _, u)| e == "~" && u.is_some_and(|u| u <= now_ms() + DAY_MS))
    })
    .await;
    assert!(
        daemon.stderr().contains("corrected to a day"),
        "{}",
        daemon.stderr()
    );

    // `vehicles enable` lifts the wait; after a reload the car is polled at once.
    let cfg = w.setup.config.to_str().unwrap();
    let mut enable = spawn(
        "enable",
        &["--config", cfg, "vehicles", "enable", &car],
        &[],
    );
    assert_eq!(enable.wait(WITHIN).await, Some(0), "{}", enable.stderr());
    let said = enable.rest_of_stdout().await.join("\n");
    assert!(said.contains("lifted 1 block"), "{said}");
    assert!(w.blocks(&car).iter().all(|(e, _, _)| e != "~"));
    let before = w.events(&car).len();
    daemon.signal("-HUP");
    wait_for("a poll after vehicles enable", WITHIN, || async {
        w.events(&car)[before..]
            .iter()
            .any(|(e, o)| e == "battery" && o == "ok")
    })
    .await;
    w.stop(daemon).await;
}

/// Item 3: error pages that echo the request (a vehicle API proxy, the token endpoint) never
/// put the access token, `Bearer <token>` or the Basic header's Base64 of
/// `client_id:client_secret` in the log or the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_request_headers_are_scrubbed_from_logs_and_the_store() {
    // Six-second tokens: the daemon refreshes within seconds, into the echoing token endpoint.
    let w = World::start("v3", 1, &["--token-lifetime", "6"], "10s").await;
    let car = w.cars[0].clone();
    w.fault(json!({"kind": "echo_error", "vehicle_id": car, "status": 502}))
        .await;
    w.fault(json!({"kind": "echo_error", "target": "token", "status": 400, "count": 2}))
        .await;
    let access: String = w
        .tokens_db()
        .query_row("SELECT access_token FROM connection_tokens", [], |r| {
            r.get(0)
        })
        .unwrap();
    let daemon = w.run();
    wait_for(
        "an echoed vehicle error and an echoed token error",
        WITHIN,
        || async {
            let log = daemon.stderr();
            w.has_outcome(&car, "upstream") && log.contains("token endpoint refused")
        },
    )
    .await;
    let stored: Vec<String> = {
        let db = w.db();
        let mut stmt = db
            .prepare(
                "SELECT coalesce(error_type,'') || ' ' || coalesce(error_code,'') FROM poll_events",
            )
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let log = w.stop(daemon).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("test-client:test-secret");
    assert!(
        log.contains("[redacted]"),
        "the echo reached the log, scrubbed"
    );
    for secret in [access.as_str(), basic.as_str(), "test-secret"] {
        assert!(!log.contains(secret), "the log holds {secret}");
        assert!(
            stored.iter().all(|s| !s.contains(secret)),
            "the store holds {secret}"
        );
    }
    assert!(!log.contains("Bearer ey") && !log.contains("Basic dGVzdC"));
}

/// Item 5: an HTML 404, 400 or 403 from a proxy (no Smartcar error envelope) is transient:
/// backed off, never stored as a disabled endpoint or a pause, and the car is polled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_error_page_from_a_proxy_never_disables_or_pauses() {
    let w = World::start("v3", 3, &[], "10s").await;
    for (car, status) in w.cars.iter().zip([404, 400, 403]) {
        w.fault(json!({"kind": "html_error", "vehicle_id": car, "status": status, "count": 1}))
            .await;
    }
    let daemon = w.run();
    wait_for(
        "each car refused once, then polled again",
        Duration::from_secs(150),
        || async {
            w.cars.iter().all(|car| {
                let ev = w.events(car);
                let refused = ev.iter().position(|(_, o)| o == "rejected");
                refused.is_some_and(|i| ev[i..].iter().any(|(e, o)| e == "battery" && o == "ok"))
            })
        },
    )
    .await;
    for car in &w.cars {
        let blocks = w.blocks(car);
        assert!(
            blocks.iter().all(|(e, _, _)| e == "~"),
            "only a wait, never a block: {blocks:?}"
        );
    }
    let text = w.metrics().await;
    // Whichever job met the fault (the poll at start is the info job's listing in v3).
    let rejected: f64 = polls_with_outcome(&text, "rejected");
    assert!(rejected >= 3.0, "{text}");
    w.stop(daemon).await;
}

/// `carpulse_polls_total` of every endpoint with this outcome.
fn polls_with_outcome(text: &str, outcome: &str) -> f64 {
    let label = format!("outcome=\"{outcome}\"");
    text.lines()
        .filter(|l| l.starts_with("carpulse_polls_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Item 6: `400 invalid_request` from the token endpoint is retried with backoff before the
/// owner is blamed; three in a row mark `needs_reauth`, and `carpulse reauth --retry` tries the
/// stored grant again and makes the connection active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_is_retried_before_needs_reauth_and_reauth_retry_recovers() {
    let w = World::start("v3", 1, &["--token-lifetime", "6"], "10s").await;
    let car = w.cars[0].clone();
    let status = || -> String {
        w.db()
            .query_row("SELECT status FROM connections", [], |r| r.get(0))
            .unwrap()
    };
    // Two refusals: retried, and the third attempt succeeds.
    w.fault(json!({"kind": "invalid_request", "count": 2}))
        .await;
    let daemon = w.run();
    wait_for(
        "a refresh after two invalid_request answers",
        WITHIN,
        || async {
            metric(
                &w.metrics().await,
                "carpulse_token_refreshes_total",
                &[("outcome", "ok")],
            )
            .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    assert_eq!(status(), "active");
    assert!(daemon
        .stderr()
        .contains("invalid_request; retrying the same grant"));
    // Three in a row: now the owner is asked to reconnect.
    w.fault(json!({"kind": "invalid_request", "count": 3}))
        .await;
    wait_for(
        "needs_reauth after three invalid_request answers",
        WITHIN,
        || async { status() == "needs_reauth" },
    )
    .await;
    w.stop_daemon_only(daemon).await;
    // The grant on file is fine: `reauth --retry` brings the connection back.
    let cfg = w.setup.config.to_str().unwrap();
    let mut retry = spawn("reauth", &["--config", cfg, "reauth", &car, "--retry"], &[]);
    assert_eq!(retry.wait(WITHIN).await, Some(0), "{}", retry.stderr());
    let said = retry.rest_of_stdout().await.join("\n");
    assert!(said.contains("active again"), "{said}");
    assert_eq!(status(), "active");
}

impl World {
    async fn stop_daemon_only(&self, mut daemon: Proc) {
        assert_eq!(
            daemon.terminate(Duration::from_secs(30)).await,
            Some(0),
            "{}",
            daemon.stderr()
        );
    }
}

/// Item 7: a 50 MB answer is cut off at the 2 MB limit while streaming (counted as
/// `too_large`, backed off, memory stays small); a body that drips a byte a second ends at
/// the request's deadline (`poll.timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_is_cut_off_and_a_slow_drip_ends_at_the_deadline() {
    let w = World::start("v3", 2, &[], "3s").await;
    let (huge, drip) = (w.cars[0].clone(), w.cars[1].clone());
    w.fault(json!({"kind": "huge", "vehicle_id": huge, "bytes": 50 * 1024 * 1024}))
        .await;
    w.fault(json!({"kind": "slow_drip", "vehicle_id": drip, "delay": 1.0}))
        .await;
    let daemon = w.run();
    let pid = daemon.child.id().unwrap();
    wait_for("too_large and timeout outcomes", WITHIN, || async {
        w.has_outcome(&huge, "too_large") && w.has_outcome(&drip, "timeout")
    })
    .await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    eprintln!(
        "daemon peak RSS after a 50 MB answer: {} MiB",
        peak_kb / 1024
    );
    assert!(
        peak_kb < 120 * 1024,
        "the 50 MB body was not held: peak RSS {peak_kb} kB"
    );
    let text = w.metrics().await;
    // Whichever job met the fault (the poll at start is the info job's listing in v3).
    let too_large: f64 = polls_with_outcome(&text, "too_large");
    assert!(too_large >= 1.0, "{text}");
    assert!(w.blocks(&huge).iter().all(|(e, _, _)| e == "~"));
    let log = w.stop(daemon).await;
    assert!(log.contains("larger than the limit"), "logged");
}

/// Items 8 and 9: an absurd state of charge (250, -5, 1e308) is a decode error of that one
/// reading, counted in `carpulse_decode_errors_total`, never stored or exported, and the car
/// is polled again next tick with its other readings (charge) stored; an absurd range loses
/// only the range (the SoC is stored) and `inf` never reaches /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_values_are_decode_errors_of_one_reading_never_stored_or_exported() {
    let w = World::start("v3", 4, &[], "10s").await;
    let soc = "tractionbattery-stateofcharge";
    for (car, value) in w.cars.iter().zip([json!(250), json!(-5), json!(1e308)]) {
        w.fault(json!({"kind": "absurd", "vehicle_id": car, "field": soc, "value": value}))
            .await;
    }
    let ranged = w.cars[3].clone();
    w.fault(json!({"kind": "absurd", "vehicle_id": ranged, "field": "tractionbattery-range", "value": 1e308}))
        .await;
    let daemon = w.run();
    wait_for(
        "three decode errors per absurd car, and a stored SoC",
        WITHIN,
        || async {
            w.cars[..3].iter().all(|car| {
                w.events(car)
                    .iter()
                    .filter(|(e, o)| e == "battery" && o == "decode")
                    .count()
                    >= 3
            }) && w.has_event(&ranged, "battery", "ok")
        },
    )
    .await;
    let db = w.db();
    for car in &w.cars[..3] {
        let n: i64 = db
            .query_row(
                "SELECT count(*) FROM battery_history WHERE vehicle_id = ?1",
                [car],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "no absurd SoC stored for {car}");
        assert!(
            w.has_event(car, "charge", "ok"),
            "the other readings still count"
        );
        assert!(w.blocks(car).is_empty(), "no backoff, no block");
    }
    let (stored_soc, range): (f64, Option<f64>) = db
        .query_row(
            "SELECT soc_percent, range_km FROM battery_history WHERE vehicle_id = ?1",
            [&ranged],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!((0.0..=100.0).contains(&stored_soc));
    assert_eq!(range, None, "the absurd range is not stored");
    let text = w.metrics().await;
    let infinite: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .is_some_and(|v| v.contains("Inf") || v.contains("inf") || v == "NaN")
        })
        .collect();
    assert!(infinite.is_empty(), "no inf exported: {infinite:?}");
    assert!(
        metric(
            &text,
            "carpulse_decode_errors_total",
            &[("endpoint", "battery")]
        )
        .is_some_and(|n| n >= 9.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "carpulse_decode_errors_total",
            &[("endpoint", "odometer")]
        ),
        Some(0.0),
        "pre-initialised"
    );
    for car in &w.cars[..3] {
        assert_eq!(
            metric(
                &text,
                "carpulse_battery_state_of_charge_ratio",
                &[("vehicle_id", car)]
            ),
            None,
            "no absurd SoC exported"
        );
    }
    w.stop(daemon).await;
}

/// Lower: an endless `links.next` costs at most two pages per poll (the repeat check), not 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_paging_stops_at_the_repeat() {
    let w = World::start("v3", 1, &[], "10s").await;
    let car = w.cars[0].clone();
    w.fault(json!({"kind": "endless_paging", "vehicle_id": car}))
        .await;
    let daemon = w.run();
    wait_for("three polls", WITHIN, || async {
        w.events(&car)
            .iter()
            .filter(|(e, o)| e == "battery" && o == "ok")
            .count()
            >= 3
    })
    .await;
    let calls: Vec<i64> = {
        let db = w.db();
        let mut stmt = db
            .prepare("SELECT calls FROM poll_events WHERE vehicle_id = ?1 AND calls > 0")
            .unwrap();
        stmt.query_map([&car], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    eprintln!("billed calls per poll under endless paging: {calls:?}");
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|c| *c <= 2), "{calls:?}");
    w.stop(daemon).await;
}

/// Lower: `expires_in: 0` is not "refresh at once, for ever" (it is read as Smartcar's
/// documented 7200 s), `1e12` is capped at a day, and a refresh answer without
/// `refresh_token` keeps the old one with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_expires_in_is_bounded_and_a_missing_refresh_token_is_kept_with_a_warning() {
    let w = World::start("v3", 1, &["--token-lifetime", "6"], "10s").await;
    let expiry = || -> (i64, i64) {
        w.tokens_db()
            .query_row(
                "SELECT access_expires_at, updated_at FROM connection_tokens",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    let (_, first) = expiry();
    w.fault(json!({"kind": "odd_expires_in", "value": 0, "count": 1}))
        .await;
    let daemon = w.run();
    wait_for("a refresh answered with expires_in 0", WITHIN, || async {
        expiry().1 > first
    })
    .await;
    let (expires, updated) = expiry();
    assert!(
        (expires - updated - 7_200_000).abs() < 5_000,
        "expires_in 0 is read as 7200 s: {} s",
        (expires - updated) / 1000
    );
    let text = w.metrics().await;
    let refreshes = metric(
        &text,
        "carpulse_token_refreshes_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0);
    assert!(refreshes <= 1.0, "no refresh storm: {refreshes}");
    let log = w.stop(daemon).await;
    assert!(log.contains("no usable expires_in"), "{log}");

    // A refresh answer without refresh_token keeps the old one (with a warning); then 1e12.
    let w2 = World::start("v3", 1, &["--token-lifetime", "6"], "10s").await;
    let row = || -> (i64, i64, String) {
        w2.tokens_db()
            .query_row(
                "SELECT access_expires_at, updated_at, refresh_token FROM connection_tokens",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    let (_, start, refresh_before) = row();
    w2.fault(json!({"kind": "no_refresh_token", "count": 1}))
        .await;
    let daemon = w2.run();
    wait_for(
        "a refresh answered without refresh_token",
        WITHIN,
        || async { row().1 > start },
    )
    .await;
    let (_, kept_at, refresh_kept) = row();
    assert_eq!(
        refresh_kept, refresh_before,
        "the old refresh token is kept"
    );
    assert!(daemon.stderr().contains("carried no refresh_token"));
    w2.fault(json!({"kind": "odd_expires_in", "value": 1e12, "count": 1}))
        .await;
    wait_for(
        "a refresh answered with expires_in 1e12",
        WITHIN,
        || async { row().1 > kept_at },
    )
    .await;
    let (expires, updated, _) = row();
    assert!(
        expires - updated <= DAY_MS,
        "capped at a day: {} s",
        (expires - updated) / 1000
    );
    let log = w2.stop(daemon).await;
    assert!(log.contains("absurdly large"), "{log}");
}

/// Item 5, `/healthz`: a car whose every endpoint a typed PERMISSION error disabled is not a
/// quiet car with the 26 h "ICE" threshold but a silent one: `/healthz` answers 503 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_a_vehicle_whose_every_endpoint_is_disabled() {
    let w = World::start("v3", 2, &[], "10s").await;
    let text = std::fs::read_to_string(&w.setup.config)
        .unwrap()
        .replace("info = \"0 0 4 * * *\"", "info = \"*/2 * * * * *\"");
    std::fs::write(&w.setup.config, text).unwrap();
    let car = w.cars[0].clone();
    w.fault(json!({"kind": "permission", "vehicle_id": car}))
        .await;
    let daemon = w.run();
    let url = format!("http://127.0.0.1:{}/healthz", w.setup.metrics_port);
    wait_for("every endpoint of the car disabled", WITHIN, || async {
        let b = w.blocks(&car);
        ["battery", "charge", "info", "odometer"]
            .iter()
            .all(|e| b.iter().any(|(x, _, _)| x == e))
    })
    .await;
    let body = std::sync::Mutex::new(String::new());
    wait_for("/healthz names the car", WITHIN, || async {
        match w.http.get(&url).send().await {
            Ok(r) if r.status() == 503 => {
                let text = r.text().await.unwrap_or_default();
                let named = text.contains(&car) && text.contains("every endpoint is disabled");
                *body.lock().unwrap() = text;
                named
            }
            _ => false,
        }
    })
    .await;
    let body = body.into_inner().unwrap();
    assert!(
        !body.contains(&w.cars[1]),
        "the healthy car is not named: {body}"
    );
    w.stop(daemon).await;
}

/// Items 8 and 9 in v2: `percentRemaining` 250 and a negative odometer are decode errors of
/// that reading (never stored), and year 0 is not stored over a known year.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_absurd_values_are_refused_per_reading() {
    let w = World::start("v2", 3, &[], "10s").await;
    let text = std::fs::read_to_string(&w.setup.config)
        .unwrap()
        .replace("info = \"0 0 4 * * *\"", "info = \"* * * * * *\"");
    std::fs::write(&w.setup.config, text).unwrap();
    let (soc, odo, year) = (w.cars[0].clone(), w.cars[1].clone(), w.cars[2].clone());
    w.fault(
        json!({"kind": "absurd", "vehicle_id": soc, "field": "percentRemaining", "value": 250}),
    )
    .await;
    w.fault(json!({"kind": "absurd", "vehicle_id": odo, "field": "distance", "value": -5}))
        .await;
    w.fault(json!({"kind": "absurd", "vehicle_id": year, "field": "year", "value": 0}))
        .await;
    let known_year: Option<i64> = w
        .db()
        .query_row(
            "SELECT year FROM vehicles WHERE vehicle_id = ?1",
            [&year],
            |r| r.get(0),
        )
        .unwrap();
    let daemon = w.run();
    wait_for(
        "decode errors for SoC and odometer, info answered",
        WITHIN,
        || async {
            w.has_event(&soc, "battery", "decode")
                && w.has_event(&odo, "odometer", "decode")
                && w.has_event(&year, "info", "ok")
        },
    )
    .await;
    let db = w.db();
    let count = |table: &str, car: &str| -> i64 {
        db.query_row(
            &format!("SELECT count(*) FROM {table} WHERE vehicle_id = ?1"),
            [car],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(count("battery_history", &soc), 0);
    assert_eq!(count("odometer_history", &odo), 0);
    assert!(
        w.has_event(&soc, "charge", "ok"),
        "its other readings count"
    );
    let stored_year: Option<i64> = db
        .query_row(
            "SELECT year FROM vehicles WHERE vehicle_id = ?1",
            [&year],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored_year, known_year,
        "year 0 never overwrites the known year"
    );
    let text = w.metrics().await;
    assert!(
        metric(
            &text,
            "carpulse_decode_errors_total",
            &[("endpoint", "info")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    w.stop(daemon).await;
}

/// Item 7 at the token endpoint: a 10 MB answer is cut off at 64 KB, a transient failure
/// retried with the same refresh token; the connection stays active and the retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_token_answer_is_cut_off_and_retried() {
    let w = World::start("v3", 1, &["--token-lifetime", "6"], "10s").await;
    w.fault(json!({"kind": "huge", "target": "token", "bytes": 10 * 1024 * 1024, "count": 1}))
        .await;
    let daemon = w.run();
    wait_for("a refresh after the huge answer", WITHIN, || async {
        metric(
            &w.metrics().await,
            "carpulse_token_refreshes_total",
            &[("outcome", "ok")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    let status: String = w
        .db()
        .query_row("SELECT status FROM connections", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "active");
    let log = w.stop(daemon).await;
    assert!(log.contains("larger than 65536 bytes"), "{log}");
}
