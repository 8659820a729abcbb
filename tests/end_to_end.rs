//! The walking skeleton end to end, through the real binary as a user runs it: `carpulse
//! simulator` on port 0 with 20 s tokens, `carpulse connect` for two accounts (following the
//! printed URL over HTTP), `carpulse run` with second-level cron long enough for two refreshes
//! per connection, then SIGTERM. The store, the metrics and the simulator's own counters must
//! agree with what the simulator served.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const USERS: usize = 2;
const VEHICLES_PER_USER: usize = 2;
const TOKEN_LIFETIME_S: u64 = 20;

async fn walking_skeleton(api: &str) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut sim, base) = start_simulator(&[
        "--users",
        &USERS.to_string(),
        "--vehicles-per-user",
        &VEHICLES_PER_USER.to_string(),
        "--token-lifetime",
        &TOKEN_LIFETIME_S.to_string(),
        "--report-interval",
        "2",
    ])
    .await;
    let setup = write_config(
        &base,
        api,
        "battery = \"*/2 * * * * *\"\ninfo = \"*/5 * * * * *\"\nrefresh_margin = \"10m\"",
    );
    let cfg = setup.config.to_str().unwrap();

    // A request on the redirect URI with a wrong state is refused while connect waits.
    let mut first = spawn(
        "connect",
        &["--config", cfg, "connect", "--wait", "60s"],
        &[],
    );
    let url = first.line(Duration::from_secs(30)).await;
    let forged = format!(
        "http://127.0.0.1:{}/exchange?code=abc&state=forged",
        setup.redirect_port
    );
    let refused = http.get(&forged).send().await.unwrap();
    assert_eq!(refused.status(), 400, "a wrong state is rejected");
    let page = http.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(
        first.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        first.stderr()
    );
    let stored = first.line(Duration::from_secs(5)).await;
    assert!(stored.starts_with("stored connection"), "{stored}");
    assert!(
        stored.contains(&format!("with {VEHICLES_PER_USER} vehicle(s)")),
        "{stored}"
    );

    // The second account through the plain helper.
    let out = connect(&setup.config, &http).await;
    assert!(out[0].starts_with("stored connection"), "{out:?}");

    let fleet = get_json(&http, &format!("{base}/_simulator/vehicles")).await;
    let users = fleet["users"].as_array().unwrap();
    assert_eq!(users.len(), USERS);
    let vehicle_ids: Vec<String> = users
        .iter()
        .flat_map(|u| u["vehicles"].as_array().unwrap().iter())
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vehicle_ids.len(), USERS * VEHICLES_PER_USER);

    // The store as connect left it: make/model/year known for every vehicle.
    {
        let db = rusqlite::Connection::open(&setup.db).unwrap();
        let n: i64 = db
            .query_row(
                "SELECT count(*) FROM vehicles WHERE make IS NOT NULL AND year > 2000",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n as usize, vehicle_ids.len());
        let conns: i64 = db
            .query_row(
                "SELECT count(*) FROM connections WHERE status = 'active'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(conns as usize, USERS);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&setup.db),
        0o640,
        "the history is created 0640 (carpulse's group may read it)"
    );
    let tokens_path = carpulse::store::token_store::path_for(&setup.db);
    assert_eq!(mode(&tokens_path), 0o600, "the token store is created 0600");

    // As under systemd: readiness and stopping arrive on $NOTIFY_SOCKET.
    let notify_path = setup.dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut daemon = spawn(
        "run",
        &["--config", cfg, "run"],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Two refreshes per connection need a bit more than two half-lifetimes.
    let run_for = Duration::from_secs(TOKEN_LIFETIME_S + 6);
    let metrics_url = format!("http://127.0.0.1:{}/metrics", setup.metrics_port);
    tokio::time::sleep(run_for).await;
    let metrics = http
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let code = daemon.terminate(Duration::from_secs(20)).await;
    // Served values, read once the daemon has stopped, so its last poll is among them.
    let mut served: HashMap<String, serde_json::Value> = HashMap::new();
    for id in &vehicle_ids {
        served.insert(
            id.clone(),
            get_json(&http, &format!("{base}/_simulator/served?vehicle_id={id}")).await,
        );
    }
    assert_eq!(
        code,
        Some(0),
        "clean exit on SIGTERM; stderr:\n{}",
        daemon.stderr()
    );
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");

    // Metrics: the gauge of each vehicle is the last value the simulator served it.
    for id in &vehicle_ids {
        let soc = metric(
            &metrics,
            "carpulse_battery_state_of_charge_ratio",
            &[("vehicle_id", id)],
        )
        .unwrap_or_else(|| panic!("no SoC gauge for {id}:\n{metrics}"));
        let battery = served[id]["battery"].as_array().unwrap();
        let served_socs: Vec<f64> = battery
            .iter()
            .map(|b| b["soc_percent"].as_f64().unwrap() / 100.0)
            .collect();
        assert!(
            served_socs.iter().any(|s| (s - soc).abs() < 1e-9),
            "gauge {soc} for {id} is one of the served values {served_socs:?}"
        );
        assert!(metric(&metrics, "carpulse_vehicle_info", &[("vehicle_id", id)]) == Some(1.0));
    }
    let refreshed = metric(
        &metrics,
        "carpulse_token_refreshes_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0);
    assert!(refreshed >= (2 * USERS) as f64, "refreshes: {refreshed}");
    let polls_ok = metric(
        &metrics,
        "carpulse_polls_total",
        &[("endpoint", "battery"), ("outcome", "ok")],
    )
    .unwrap_or(0.0);
    assert!(
        polls_ok >= (3 * USERS * VEHICLES_PER_USER) as f64,
        "battery polls: {polls_ok}"
    );
    assert_eq!(
        metric(&metrics, "carpulse_connections", &[("status", "active")]),
        Some(USERS as f64)
    );
    assert!(
        metric(
            &metrics,
            "carpulse_rows_written_total",
            &[("table", "battery")]
        )
        .unwrap_or(0.0)
            > 0.0
    );

    // The store: every vehicle has battery rows, each equal to a value the simulator served at
    // that recorded_at, none recorded after it was fetched, none stored twice.
    let db = rusqlite::Connection::open(&setup.db).unwrap();
    for id in &vehicle_ids {
        let mut stmt = db
            .prepare("SELECT recorded_at, fetched_at, soc_percent, range_km, time FROM battery_history WHERE vehicle_id = ?1")
            .unwrap();
        let rows: Vec<(i64, i64, f64, Option<f64>, f64)> = stmt
            .query_map([id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            rows.len() >= 2,
            "{id}: at least two distinct readings stored, got {}",
            rows.len()
        );
        let served_by_time: HashMap<i64, &serde_json::Value> = served[id]["battery"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["recorded_at"].as_i64().unwrap(), b))
            .collect();
        for (recorded_at, fetched_at, soc, range, time) in rows {
            assert!(
                recorded_at <= fetched_at,
                "{id}: recorded_at {recorded_at} > fetched_at {fetched_at}"
            );
            assert!((time - recorded_at as f64 / 1000.0).abs() < 1e-6);
            let s = served_by_time.get(&recorded_at).unwrap_or_else(|| {
                panic!("{id}: stored reading at {recorded_at} was never served")
            });
            assert!(
                (s["soc_percent"].as_f64().unwrap() - soc).abs() < 1e-9,
                "{id}: soc {soc} vs {s}"
            );
            let served_range = s["range_km"].as_f64().unwrap();
            assert!(
                (served_range - range.unwrap()).abs() < 1e-9,
                "{id}: range {range:?} vs {s}"
            );
        }
        let charge: i64 = db
            .query_row(
                "SELECT count(*) FROM charge_history WHERE vehicle_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(charge >= 1, "{id}: charge rows");
        let odo: i64 = db
            .query_row(
                "SELECT count(*) FROM odometer_history WHERE vehicle_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(odo >= 1, "{id}: odometer rows");
        let vin: Option<String> = db
            .query_row(
                "SELECT vin FROM vehicles WHERE vehicle_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            vin.map(|v| v.len()),
            Some(17),
            "{id}: VIN stored by the info job"
        );
    }
    let ok_events: i64 = db
        .query_row(
            "SELECT count(*) FROM poll_events WHERE outcome = 'ok'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(ok_events > 0);
    // The polls that stored new readings are kept beside them (schema 4), not in poll_log:
    // the daemon queues a poll's events with its readings in the order the writer links.
    let (kept, fresh_rows): (i64, i64) = db
        .query_row(
            "SELECT count(poll_endpoints), count(*) FROM readings",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        kept > 0,
        "{kept} of {fresh_rows} reading rows keep their poll"
    );
    let logged_ok: i64 = db
        .query_row(
            "SELECT count(*) FROM poll_log WHERE outcome = 'ok' AND endpoints & 1 <> 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        logged_ok < kept,
        "battery polls in poll_log ({logged_ok}) should be the few whose readings were known"
    );

    // The simulator's view of what carpulse did wrong: nothing.
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["expired_token_requests"], 0, "{stats}");
    assert_eq!(stats["unknown_token_requests"], 0, "{stats}");
    assert_eq!(stats["invalidated_refresh_token_uses"], 0, "{stats}");
    assert_eq!(stats["missing_unit_system"], 0, "{stats}");
    let by_user = stats["refreshes_by_user"].as_object().unwrap();
    assert_eq!(by_user.len(), USERS, "{stats}");
    for (user, n) in by_user {
        assert!(n.as_u64().unwrap() >= 2, "user {user} refreshed {n} times");
    }

    // Secrets stay out of the log.
    let log = daemon.stderr();
    assert!(!log.contains("test-secret"));
    let token_db = rusqlite::Connection::open(&tokens_path).unwrap();
    let tokens: Vec<String> = token_db
        .prepare("SELECT access_token FROM connection_tokens")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for t in tokens {
        assert!(
            !log.contains(&t),
            "an access token appeared in the daemon's log"
        );
    }

    // The read-side commands on the store the daemon left.
    if api == "v3" {
        read_commands(cfg, &vehicle_ids).await;
    }

    let _ = sim.terminate(Duration::from_secs(10)).await;
}

async fn output(args: &[&str]) -> String {
    let mut p = spawn(args[args.len() - 1], args, &[]);
    let code = p.wait(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{args:?}: {}", p.stderr());
    let mut lines = Vec::new();
    while let Some(l) = p.stdout.recv().await {
        lines.push(l);
    }
    lines.join("\n")
}

async fn read_commands(cfg: &str, vehicle_ids: &[String]) {
    let list = output(&["--config", cfg, "vehicles", "list"]).await;
    for id in vehicle_ids {
        assert!(
            list.contains(id.as_str()),
            "vehicles list names {id}:\n{list}"
        );
    }
    assert!(list.contains("active"), "{list}");

    let status = output(&["--config", cfg, "status"]).await;
    assert!(
        status.contains(&format!("connections: {USERS}")),
        "{status}"
    );
    assert!(status.contains("last poll"), "{status}");
    // Each vehicle's line states the calls it was billed this month, as poll_events has them.
    let db = rusqlite::Connection::open(
        std::path::Path::new(cfg)
            .parent()
            .unwrap()
            .join("carpulse.db"),
    )
    .unwrap();
    for id in vehicle_ids {
        let calls: i64 = db
            .query_row(
                "SELECT coalesce(sum(c), 0) FROM
                   (SELECT max(calls) AS c FROM poll_events WHERE vehicle_id = ?1 GROUP BY at)",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(calls > 0);
        let line = status
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("{id} in {status}"));
        assert!(
            line.ends_with(&format!("; {calls} calls billed this month")),
            "{line}"
        );
    }

    let id = &vehicle_ids[0];
    let csv = output(&[
        "--config",
        cfg,
        "history",
        "--vehicle",
        id,
        "--since",
        "1h",
        "--format",
        "csv",
    ])
    .await;
    let mut rows = csv.lines();
    // The view's columns first, as before; the vehicle's name and ISO-8601 times after them.
    assert_eq!(
        rows.next(),
        Some("vehicle_id,recorded_at,fetched_at,soc_percent,range_km,vehicle,recorded_at_utc,fetched_at_utc")
    );
    let rows: Vec<&str> = rows.collect();
    assert!(rows.len() >= 2, "{csv}");
    assert!(rows.iter().all(|r| r.starts_with(id.as_str())), "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_v3() {
    walking_skeleton("v3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_v2() {
    walking_skeleton("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_78_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\n\n[schedule]\nbattery = \"*/15 * * * *\"\n",
    )
    .unwrap();
    let mut p = spawn("run", &["--config", path.to_str().unwrap(), "run"], &[]);
    assert_eq!(p.wait(Duration::from_secs(20)).await, Some(78));
    // Give the stderr reader a moment to drain.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = p.stderr();
    assert!(err.contains("bad.toml:6: schedule.battery:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_checks_the_schedule_against_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, schedule: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\napi = \"v2\"\n\n[schedule]\n{schedule}\n\n[budget]\ncalls_per_vehicle_month = 500\n"
            ),
        )
        .unwrap();
        path
    };
    let run = |path: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["--config", path.to_str().unwrap(), "plan"];
        args.extend_from_slice(extra);
        std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap()
    };
    // Twice a day: 60 runs x 2 + 30 x 3 + 5 weekly capability reads = 215 calls.
    let under = write(
        "under.toml",
        "battery = \"0 0 */12 * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let out = run(&under, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("60 runs x 2"), "{text}");
    assert!(text.contains("215 calls"), "{text}");
    assert!(text.contains("within the budget of 500"), "{text}");

    // Every 15 minutes: 2880 x 2 + 90 + 5 = 5855 calls, refused with the arithmetic.
    let over = write("over.toml", "battery = \"0 */15 * * * *\"");
    let out = run(&over, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("5855 calls per vehicle per month is over the budget of 500"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2880 runs x 2"));
    let forced = run(&over, &["--force"]);
    assert!(forced.status.success());
}
