//! `carpulse poll` and the poll at start of `carpulse run`, through the real binary against the
//! simulator: without a daemon the poll runs in-process on the store; with one it is asked of
//! the daemon (`POST /poll`), so the daemon's gates and counters see it; an unknown vehicle is
//! an error that lists the known ones; a failed or refused poll exits non-zero. With a daily
//! cron, `run` polls at once a vehicle whose last reading is older than a day.

use std::time::{Duration, Instant};

use super::common::{self, connect, metric, spawn, start_simulator, wait_for, write_config};
use super::{carpulse, write};

/// A schedule that never runs while a test does (03:00 and 04:00 UTC on 1 January).
const NEVER: &str = "battery = \"0 0 3 1 1 *\"\ninfo = \"0 0 4 1 1 *\"";

fn vehicles(db: &std::path::Path) -> Vec<String> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT vehicle_id FROM vehicles ORDER BY rowid")
        .unwrap();
    let ids = s.query_map([], |r| r.get(0)).unwrap();
    ids.map(Result::unwrap).collect()
}

fn count(db: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

async fn metrics_text(http: &reqwest::Client, port: u16) -> Option<String> {
    let r = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_runs_in_process_without_a_daemon_and_through_the_daemon_with_one() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v2", NEVER);
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let ids = vehicles(&setup.db);
    assert_eq!(ids.len(), 2, "{ids:?}");

    // An unknown vehicle is an error that lists the known ones.
    let (code, out, err) = carpulse(&["--config", cfg, "poll", "--vehicle", "typo"], &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("no vehicle matches \"typo\"")
            && err.contains(&ids[0])
            && err.contains(&ids[1]),
        "{err}"
    );

    // No daemon: polled in-process, both jobs (v2: two batches), each vehicle's battery and
    // odometer reading stored and printed under the job that read it.
    let (code, out, err) = carpulse(&["--config", cfg, "poll"], &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.starts_with("no daemon answers on 127.0.0.1:"), "{out}");
    let blocks: Vec<&str> = out
        .split("\n")
        .filter(|l| !l.starts_with("  ") && !l.trim().is_empty())
        .skip(1)
        .collect();
    assert_eq!(blocks.len(), 4, "two vehicles, two jobs:\n{out}");
    for (i, job) in out
        .split("\n")
        .filter(|l| !l.starts_with("  "))
        .skip(1)
        .take(4)
        .enumerate()
    {
        let want = if i % 2 == 0 {
            "battery: ok"
        } else {
            "info: ok"
        };
        assert!(job.ends_with(want), "{job}\n{out}");
    }
    let sections: Vec<&str> = out.split(": ok\n").collect();
    for (i, section) in sections.iter().enumerate().skip(1) {
        let (battery, info) = (
            section.contains("stored: battery"),
            section.contains("stored: odometer"),
        );
        let battery_job = i % 2 == 1;
        assert_eq!(
            (battery, info),
            (battery_job, !battery_job),
            "each job shows its own rows:\n{out}"
        );
    }
    assert_eq!(
        out.matches("answers: battery ok, charge ok").count(),
        2,
        "{out}"
    );
    assert_eq!(count(&setup.db, "SELECT count(*) FROM battery_history"), 2);
    assert_eq!(
        count(
            &setup.db,
            "SELECT count(*) FROM poll_events WHERE endpoint = 'battery' AND outcome = 'ok'"
        ),
        2
    );
    // What the simulator served is what was stored.
    let served = sim_soc(&http, &base, &ids[0]).await;
    let stored: f64 = rusqlite::Connection::open(&setup.db)
        .unwrap()
        .query_row(
            "SELECT soc_percent FROM battery_history WHERE vehicle_id = ?1",
            [&ids[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        (served - stored).abs() < 0.01,
        "served {served}, stored {stored}"
    );

    // A daemon runs: the poll is asked of it, through its gates and counters.
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let port = setup.metrics_port;
    wait_for(
        "the daemon serves /metrics",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            async move { metrics_text(&http, port).await.is_some() }
        },
    )
    .await;
    let prefix = &ids[0][..8];
    let (code, out, err) = carpulse(
        &[
            "--config",
            cfg,
            "poll",
            "--vehicle",
            prefix,
            "--job",
            "battery",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}\n{err}\ndaemon:\n{}", daemon.stderr());
    assert!(
        out.starts_with(&format!(
            "polled through the daemon at http://127.0.0.1:{port}/poll"
        )),
        "{out}"
    );
    assert_eq!(
        out.matches(": ok").count(),
        1,
        "one vehicle, one job:\n{out}"
    );
    let m = metrics_text(&http, port).await.unwrap();
    // The daily cron has not run: the daemon's only battery poll is the one asked for, and
    // its two calls (battery and charge in one batch) are on the vehicle's bill.
    assert_eq!(
        metric(
            &m,
            "carpulse_polls_total",
            &[("endpoint", "battery"), ("outcome", "ok")]
        ),
        Some(1.0),
        "{m}"
    );
    let billed = metric(
        &m,
        "carpulse_smartcar_calls_billed",
        &[("vehicle_id", &ids[0])],
    );
    assert!(billed.is_some_and(|n| n >= 2.0), "{billed:?}");
    assert!(daemon.stderr().contains("poll now requested"));

    // A refusal is the daemon's: a 429 makes the vehicle wait, and the next poll asked of it
    // is skipped by the daemon's gate. Both exit non-zero and say why.
    let set = http
        .post(format!("{base}/_simulator/faults"))
        .json(&serde_json::json!({"vehicle_id": ids[0], "kind": "rate_limit", "count": 1, "retry_after": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let (code, out, _) = carpulse(
        &[
            "--config",
            cfg,
            "poll",
            "--vehicle",
            &ids[0],
            "--job",
            "battery",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("battery: failed") && out.contains("rate_limited"),
        "{out}"
    );
    let (code, out, err) = carpulse(
        &[
            "--config",
            cfg,
            "poll",
            "--vehicle",
            &ids[0],
            "--job",
            "battery",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("battery: skipped") && out.contains("retry-after"),
        "{out}"
    );
    assert!(err.contains("1 of 1 poll(s) did not succeed"), "{err}");

    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// The state of charge the simulator last served a vehicle (its ground truth).
async fn sim_soc(http: &reqwest::Client, base: &str, vehicle: &str) -> f64 {
    let served = common::get_json(
        http,
        &format!("{base}/_simulator/served?vehicle_id={vehicle}"),
    )
    .await;
    served["battery"]
        .as_array()
        .and_then(|b| b.last())
        .and_then(|b| b["soc_percent"].as_f64())
        .unwrap_or_else(|| panic!("no battery served to {vehicle}: {served}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_polls_at_start_a_vehicle_whose_last_reading_is_older_than_a_period() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[]).await;
    // Daily crons: without the poll at start, the first reading would come at 03:00 UTC.
    let setup = write_config(
        &base,
        "v2",
        "battery = \"0 0 3 * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    assert_eq!(count(&setup.db, "SELECT count(*) FROM battery_history"), 0);

    let started = Instant::now();
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let db = setup.db.clone();
    wait_for(
        "a battery and an odometer reading of each vehicle",
        Duration::from_secs(30),
        || {
            let db = db.clone();
            async move {
                count(
                    &db,
                    "SELECT count(DISTINCT vehicle_id) FROM battery_history",
                ) == 2
                    && count(
                        &db,
                        "SELECT count(DISTINCT vehicle_id) FROM odometer_history",
                    ) == 2
            }
        },
    )
    .await;
    eprintln!(
        "MEASURED: both vehicles' first readings stored {} ms after the daemon was spawned",
        started.elapsed().as_millis()
    );
    assert!(
        daemon
            .stderr()
            .contains("polling now the vehicles whose last reading is older than one period"),
        "{}",
        daemon.stderr()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));

    // Started again with every reading fresh, nothing is due: the per-vehicle gauges come
    // from the store, seeded by the catch-up from the summaries it reads (the daemon's load
    // leaves the seed to it), and no poll is made.
    let polls = count(&setup.db, "SELECT count(*) FROM poll_events");
    let mut daemon = spawn("run again", &["--config", cfg, "run"], &[]);
    let port = setup.metrics_port;
    let text = wait_for_text(&http, port, "both vehicles' state of charge", |m| {
        m.matches("carpulse_battery_state_of_charge_ratio{vehicle_id=")
            .count()
            == 2
    })
    .await;
    for id in vehicles(&setup.db) {
        assert!(
            text.contains(&format!("carpulse_vehicle_up{{vehicle_id=\"{id}\"}} 1")),
            "{id}: the stored last poll was answered\n{text}"
        );
    }
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    assert_eq!(
        count(&setup.db, "SELECT count(*) FROM poll_events"),
        polls,
        "nothing was due, nothing was polled"
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Waits for the daemon's `/metrics` to satisfy `ok`, and returns that text.
async fn wait_for_text(
    http: &reqwest::Client,
    port: u16,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(text) = metrics_text(http, port).await {
            if ok(&text) {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_reaches_a_daemon_behind_tls_and_basic_auth_and_names_what_it_cannot_poll() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v2", NEVER);
    // The test web config: TLS with the fixture certificate, user prometheus / scrape-secret.
    let web = super::repo().join("tests/fixtures/web-config.yml");
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "[metrics]\n",
        &format!("[metrics]\nweb_config_file = \"{}\"\n", web.display()),
    );
    std::fs::write(&setup.config, text).unwrap();
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let ids = vehicles(&setup.db);

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let port = setup.metrics_port;
    wait_for(
        "the daemon listens",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    let poll = |envs: &'static [(&'static str, &'static str)], vehicle: String| {
        let cfg = cfg.to_owned();
        async move {
            carpulse(
                &[
                    "--config",
                    &cfg,
                    "poll",
                    "--vehicle",
                    &vehicle,
                    "--job",
                    "battery",
                ],
                envs,
            )
        }
    };

    // No credentials, or wrong ones: the daemon asks for them, and the error says how.
    for envs in [
        &[][..],
        &[
            ("CARPULSE_METRICS_USER", "prometheus"),
            ("CARPULSE_METRICS_PASSWORD", "wrong"),
        ][..],
    ] {
        let (code, out, err) = poll(envs, ids[0].clone()).await;
        assert_eq!(code, Some(1), "{out}\n{err}");
        assert!(
            err.contains("asks for basic auth") && err.contains("CARPULSE_METRICS_PASSWORD"),
            "{err}"
        );
    }
    const RIGHT: &[(&str, &str)] = &[
        ("CARPULSE_METRICS_USER", "prometheus"),
        ("CARPULSE_METRICS_PASSWORD", "scrape-secret"),
    ];
    let (code, out, err) = poll(RIGHT, ids[0].clone()).await;
    assert_eq!(code, Some(0), "{out}\n{err}\ndaemon:\n{}", daemon.stderr());
    assert!(
        out.starts_with(&format!(
            "polled through the daemon at https://127.0.0.1:{port}/poll"
        )) && out.contains("battery: ok"),
        "{out}"
    );

    // A listener whose certificate is not the one the web config names gets no password: the
    // client pins that certificate (here the CLI's config names the CA's instead).
    let impostor = write(
        setup.dir.path(),
        "impostor-web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            super::repo().join("tests/fixtures/tls/ca.crt").display(),
            super::repo()
                .join("tests/fixtures/tls/server.key")
                .display()
        ),
    );
    let other = write(
        setup.dir.path(),
        "other.toml",
        &std::fs::read_to_string(&setup.config)
            .unwrap()
            .replace(&web.display().to_string(), &impostor.display().to_string()),
    );
    let (code, out, err) = carpulse(
        &[
            "--config",
            other.to_str().unwrap(),
            "poll",
            "--job",
            "battery",
        ],
        RIGHT,
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "asking the daemon at https://127.0.0.1:{port}/poll"
        )) && err.contains("certificate"),
        "{err}"
    );

    // A vehicle the daemon does not poll (disabled, and the daemon told on SIGHUP) is named
    // with why; the poll fails.
    let (code, _, err) = carpulse(&["--config", cfg, "vehicles", "disable", &ids[1]], &[]);
    assert_eq!(code, Some(0), "{err}");
    daemon.signal("-HUP");
    let log = daemon.stderr_log.clone();
    wait_for(
        "the daemon reloads its vehicles",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains("vehicle set reloaded"))
            }
        },
    )
    .await;
    let (code, out, _) = poll(RIGHT, ids[1].clone()).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("battery: not_polled") && out.contains("disabled"),
        "{out}"
    );

    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// A forward proxy on 127.0.0.1:0 that records every request's target and passes it on. A
/// client that came through a proxy names the whole URL in its request line (absolute form,
/// RFC 9112 §3.2.2); one that came straight names only the path.
async fn start_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::Response;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let upstream = reqwest::Client::builder().no_proxy().build().unwrap();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let upstream = upstream.clone();
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            record
                .lock()
                .unwrap()
                .push(format!("{} {}", parts.method, parts.uri));
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let mut headers = parts.headers.clone();
            headers.remove(axum::http::header::HOST);
            let answer = upstream
                .request(parts.method, parts.uri.to_string())
                .headers(headers)
                .body(body)
                .send()
                .await;
            match answer {
                Ok(a) => {
                    let mut out = Response::builder().status(a.status());
                    for (k, v) in a.headers() {
                        out = out.header(k, v);
                    }
                    out.body(Body::from(a.bytes().await.unwrap())).unwrap()
                }
                Err(e) => Response::builder()
                    .status(502)
                    .body(Body::from(e.to_string()))
                    .unwrap(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// Vehicle API requests go straight to Smartcar unless the environment names a proxy for its
/// host; then they go through it (as they did when reqwest sent every request), and the poll
/// stores what the simulator served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vehicle_api_requests_go_through_the_proxy_the_environment_names() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[]).await;
    let (proxy, seen) = start_proxy().await;
    for api in ["v2", "v3"] {
        let setup = write_config(&base, api, NEVER);
        let cfg = setup.config.to_str().unwrap().to_owned();
        connect(&setup.config, &http).await;
        let ids = vehicles(&setup.db);
        let vehicle_api = |seen: &[String]| {
            seen.iter()
                .filter(|l| l.contains("/vehicles/"))
                .cloned()
                .collect::<Vec<_>>()
        };

        // No proxy in the environment: the proxy sees nothing.
        let args = ["--config", cfg.as_str(), "poll", "--job", "battery"];
        let quiet = [("HTTP_PROXY", ""), ("http_proxy", ""), ("ALL_PROXY", "")];
        let (code, out, err) = tokio::task::spawn_blocking({
            let args = args.map(str::to_owned);
            move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                carpulse(&args, &quiet)
            }
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "{api}: {out}\n{err}");
        assert!(
            seen.lock().unwrap().is_empty(),
            "{:?}",
            seen.lock().unwrap()
        );

        // HTTP_PROXY names it: every Vehicle API request of the poll goes through it, in
        // absolute form, and the readings arrive.
        let proxied = [
            ("HTTP_PROXY", proxy.clone()),
            ("NO_PROXY", String::new()),
            ("no_proxy", String::new()),
        ];
        let (code, out, err) = tokio::task::spawn_blocking({
            let args = args.map(str::to_owned);
            move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let envs: Vec<(&str, &str)> =
                    proxied.iter().map(|(k, v)| (*k, v.as_str())).collect();
                carpulse(&args, &envs)
            }
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "{api}: {out}\n{err}");
        let through = vehicle_api(&seen.lock().unwrap());
        // (v3 follows the listing's next page through it too.)
        assert!(
            through.len() >= ids.len()
                && through.iter().all(|l| l.contains(&format!(" {base}/")))
                && ids
                    .iter()
                    .all(|id| through.iter().any(|l| l.contains(id.as_str()))),
            "{api}: every vehicle's requests, in absolute form, to the simulator: {through:?}"
        );
        assert_eq!(
            out.matches("answers: battery ok").count(),
            ids.len(),
            "{api}: every vehicle answered through the proxy:\n{out}"
        );
        assert_eq!(
            count(
                &setup.db,
                "SELECT count(DISTINCT vehicle_id) FROM battery_history"
            ),
            ids.len() as i64
        );
        seen.lock().unwrap().clear();
    }
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
