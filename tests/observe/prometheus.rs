//! The real Prometheus server (Debian's `prometheus`, from PATH) scrapes the real daemon over
//! TLS with basic auth (metrics.web_config_file), two of them: one on per-user tokens, one on
//! API Authentication, both against the simulator on loopback, with the alert rules loaded.
//! Then every PromQL expression of the fleet dashboard and of the rules goes through
//! Prometheus' HTTP API: each parses, the dashboard's return data, the rules evaluate without
//! error. Skipped (with a line saying so) where Prometheus is not installed; CI installs it.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::dashboards::queries;
use super::{repo, tool, write};
use crate::common::{connect, free_port, spawn, start_simulator, write_config_with, Proc};

const USER: &str = "prometheus";
const PASSWORD: &str = "scrape-secret";

fn fixture(p: &str) -> String {
    repo().join("tests/fixtures").join(p).display().to_string()
}

/// A client that trusts the test CA (the daemons' certificate).
fn tls_client() -> reqwest::Client {
    let ca = std::fs::read(fixture("tls/ca.crt")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Starts a daemon on `setup` with TLS and basic auth; returns it with its scrape address.
async fn daemon(setup: &crate::common::Setup) -> (Proc, String) {
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let listen = format!("listen = \"127.0.0.1:{}\"", setup.metrics_port);
    let text = text.replace(
        &listen,
        &format!(
            "{listen}\nweb_config_file = \"{}\"",
            fixture("web-config.yml")
        ),
    ) + "\n[budget]\ncalls_per_vehicle_month = 100000\n";
    std::fs::write(&setup.config, text).unwrap();
    let cfg = setup.config.display().to_string();
    let p = spawn("daemon", &["--config", &cfg, "run"], &[]);
    (p, format!("127.0.0.1:{}", setup.metrics_port))
}

/// Polls `check` every 200 ms until it returns Some, or panics with `what` after `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn query(http: &reqwest::Client, prom: &str, expr: &str) -> Value {
    http.get(format!("http://{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap_or_else(|e| panic!("querying {expr}: {e}"))
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn prometheus_scrapes_the_daemon_and_every_expression_works() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let started = Instant::now();
    let (_sim, base) = start_simulator(&[
        "--users",
        "2",
        "--vehicles-per-user",
        "2",
        "--report-interval",
        "1",
    ])
    .await;
    let schedule = "battery = \"*/2 * * * * *\"\ninfo = \"*/5 * * * * *\"";
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Per-user tokens (v3).
    let per_user = write_config_with(&base, "v3", schedule, "");
    let out = connect(&per_user.config, &http).await;
    assert!(out[0].starts_with("stored connection"), "{out:?}");
    // API Authentication (v3), the simulator's second user.
    let app = write_config_with(
        &base,
        "v3",
        schedule,
        &format!("api_client_id = \"carpulse-demo-api\"\napi_client_secret = \"carpulse-demo-api-secret\"\niam_url = \"{base}/oauth2/token\""),
    );
    let out = connect(&app.config, &http).await;
    assert!(out[0].starts_with("stored connection"), "{out:?}");
    // One vehicle of the per-user account is disabled: it keeps its series, with state
    // disabled and vehicle_up 0.
    let list = super::carpulse(
        &[
            "vehicles",
            "list",
            "--db",
            &per_user.db.display().to_string(),
        ],
        &[],
    )
    .1;
    let disabled = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();

    let (mut a, target_a) = daemon(&per_user).await;
    let (mut b, target_b) = daemon(&app).await;

    // The listener asks for TLS and the password.
    let tls = tls_client();
    let metrics_a = until(Duration::from_secs(60), "daemon A's first readings", || {
        let (tls, url) = (tls.clone(), format!("https://{target_a}/metrics"));
        async move {
            let r = tls
                .get(&url)
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
                .ok()?;
            let text = r.text().await.ok()?;
            text.contains("carpulse_battery_state_of_charge_ratio{")
                .then_some(text)
        }
    })
    .await;
    assert!(metrics_a.contains("process_resident_memory_bytes "));
    let denied = tls
        .get(format!("https://{target_a}/metrics"))
        .basic_auth(USER, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(
        denied.headers()["www-authenticate"],
        "Basic realm=\"carpulse\""
    );
    assert_eq!(
        tls.get(format!("https://{target_a}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(
        http.get(format!("http://{target_a}/metrics"))
            .send()
            .await
            .is_err(),
        "plain HTTP is refused"
    );

    // Disable one vehicle and tell daemon A at once (SIGHUP re-reads the store).
    let (code, _, err) = super::carpulse(
        &[
            "--config",
            &per_user.config.display().to_string(),
            "vehicles",
            "disable",
            &disabled,
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    a.signal("-HUP");

    // Prometheus, scraping both every second over TLS with basic auth, with the rules loaded.
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let prom = format!("127.0.0.1:{prom_port}");
    let cfg = write(
        dir.path(),
        "prometheus.yml",
        &format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: carpulse
    scheme: https
    tls_config:
      ca_file: {ca}
      server_name: localhost
    basic_auth:
      username: {USER}
      password: {PASSWORD}
    static_configs:
      - targets: ["{target_a}", "{target_b}"]
"#,
            rules = repo().join("config/prometheus/alerts.yml").display(),
            ca = fixture("tls/ca.crt"),
        ),
    );
    let mut server = tokio::process::Command::new(prometheus)
        .args([
            format!("--config.file={}", cfg.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={prom}"),
            "--log.level=warn".to_owned(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting prometheus");
    until(Duration::from_secs(60), "Prometheus to be ready", || {
        let (http, url) = (http.clone(), format!("http://{prom}/-/ready"));
        async move {
            http.get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        }
    })
    .await;

    // Both targets up, and every per-vehicle family through (reading ages and billed calls
    // come with the daemon's 15-second health pass).
    until(
        Duration::from_secs(90),
        "both targets up with their vehicles' series",
        || {
            let (http, prom) = (http.clone(), prom.clone());
            async move {
                for (expr, n) in [
                    ("up{job=\"carpulse\"} == 1", 2),
                    ("count(carpulse_reading_age_seconds{signal=\"battery\"})", 1),
                    ("count(carpulse_smartcar_calls_billed)", 1),
                    ("count(carpulse_app_token_expiry_timestamp_seconds > 0)", 1),
                    ("count(carpulse_vehicle_state{state=\"disabled\"} == 1)", 1),
                    ("count(carpulse_odometer_meters)", 1),
                    // rate() over the dashboards' window needs a few scrapes
                    ("count_over_time(up{job=\"carpulse\"}[10s]) >= 5", 2),
                ] {
                    let r = query(&http, &prom, expr).await;
                    let got = r["data"]["result"].as_array().map_or(0, |a| a.len());
                    if got < n {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;

    // The disabled vehicle: series kept, vehicle_up 0, state disabled.
    let r = query(
        &http,
        &prom,
        &format!("carpulse_vehicle_up{{vehicle_id=\"{disabled}\"}}"),
    )
    .await;
    assert_eq!(r["data"]["result"][0]["value"][1], "0", "{r}");
    let r = query(
        &http,
        &prom,
        &format!("carpulse_battery_state_of_charge_ratio{{vehicle_id=\"{disabled}\"}}"),
    )
    .await;
    assert_eq!(r["data"]["result"].as_array().map(Vec::len), Some(1), "{r}");

    // Every dashboard expression parses and returns data, for all vehicles and for one.
    let dashboard: Vec<_> = queries()
        .into_iter()
        .filter(|q| q.ds_type == "prometheus")
        .collect();
    assert!(dashboard.len() >= 20, "{}", dashboard.len());
    for q in &dashboard {
        for vehicle in [".*".to_owned(), disabled.clone()] {
            let expr = q
                .text
                .replace("$__rate_interval", "10s")
                .replace("$__interval", "1s")
                .replace("$__range", "1m")
                .replace("$vehicle", &vehicle);
            let r = query(&http, &prom, &expr).await;
            assert_eq!(r["status"], "success", "{}: {expr}\n{r}", q.at);
            let n = r["data"]["result"].as_array().map_or(0, |a| a.len());
            let per_vehicle = expr.contains(&format!("vehicle_id=~\"{vehicle}\""));
            // A vehicle that cannot be polled has no request latency or token of its own to
            // show; the fleet-wide panels must return data either way.
            if vehicle == ".*" || per_vehicle && !q.text.contains("carpulse_charge_state") {
                assert!(n > 0, "{}: no data for {expr}\n{r}", q.at);
            }
        }
    }
    // The $vehicle variable shows make and model: what its regex reads.
    let var = dashboard
        .iter()
        .find(|q| q.at.contains("variable $vehicle"))
        .unwrap();
    let r = query(&http, &prom, &var.text).await;
    let displays: Vec<String> = r["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"]["display"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(displays.len(), 4, "{r}");
    assert!(
        displays.iter().any(|d| d.starts_with("TESLA Model 3 (")
            && d.ends_with(')')
            && d.len() == "TESLA Model 3 (12345678)".len()),
        "{displays:?}"
    );

    // Every rule expression parses, and Prometheus evaluates every rule without error.
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("config/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut n_rules = 0;
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        let r = query(&http, &prom, expr).await;
        assert_eq!(r["status"], "success", "{:?}: {expr}\n{r}", rule["alert"]);
        n_rules += 1;
    }
    let health = until(Duration::from_secs(30), "every rule evaluated", || {
        let (http, url) = (http.clone(), format!("http://{prom}/api/v1/rules"));
        async move {
            let r: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let rules = r["data"]["groups"][0]["rules"].as_array()?.clone();
            rules
                .iter()
                .all(|r| r["health"] != "unknown")
                .then_some(rules)
        }
    })
    .await;
    assert_eq!(health.len(), n_rules);
    for r in &health {
        assert_eq!(r["health"], "ok", "{r}");
    }
    // Nothing is wrong here, so nothing that pages fires (CarpulseVehicleNotPolled is for an
    // hour; the disabled vehicle is the user's choice and not an alert).
    let firing = query(
        &http,
        &prom,
        "ALERTS{alertstate=\"firing\", severity=\"critical\"}",
    )
    .await;
    assert_eq!(
        firing["data"]["result"].as_array().map(Vec::len),
        Some(0),
        "{firing}"
    );

    let _ = server.start_kill();
    let _ = server.wait().await;
    assert_eq!(a.terminate(Duration::from_secs(30)).await, Some(0));
    assert_eq!(b.terminate(Duration::from_secs(30)).await, Some(0));
    eprintln!("real Prometheus test took {:?}", started.elapsed());
}
