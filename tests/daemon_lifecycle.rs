//! The daemon's life through the real binary: killed with SIGKILL right after refreshes and
//! restarted (no token lost), and told with SIGHUP about an account connected and a vehicle
//! disabled while it runs.

mod common;

use std::time::Duration;

use common::*;

fn battery_rows(db: &std::path::Path, vehicle: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT count(*) FROM battery_history WHERE vehicle_id = ?1",
        [vehicle],
        |r| r.get(0),
    )
    .unwrap()
}

/// Waits (30 s at most) until the vehicle has at least `n` battery rows.
async fn rows_reach(db: &std::path::Path, vehicle: &str, n: i64) {
    let what = format!("{vehicle}: {n} battery rows");
    wait_for(&what, Duration::from_secs(30), || async {
        battery_rows(db, vehicle) >= n
    })
    .await;
}

async fn vehicle_ids(http: &reqwest::Client, base: &str, user: usize) -> Vec<String> {
    let fleet = get_json(http, &format!("{base}/_simulator/vehicles")).await;
    fleet["users"][user]["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_refreshes_loses_no_token() {
    let http = reqwest::Client::new();
    // 6 s tokens: refreshed every 3 s, so a kill lands close to a rotation.
    let (mut sim, base) =
        start_simulator(&["--token-lifetime", "6", "--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let car = vehicle_ids(&http, &base, 0).await.remove(0);

    for round in 0..2 {
        let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        daemon.signal("-KILL");
        let _ = daemon.wait(Duration::from_secs(10)).await;
        let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
        assert!(
            stats["refreshes"].as_u64().unwrap() >= 2 * (round + 1),
            "refreshes happened before the kill: {stats}"
        );
    }
    let before = battery_rows(&setup.db, &car);
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let after = battery_rows(&setup.db, &car);
    assert!(
        after > before,
        "polling resumed after the kills: {before} -> {after}"
    );

    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["invalidated_refresh_token_uses"], 0, "{stats}");
    assert_eq!(stats["expired_token_requests"], 0, "{stats}");
    assert_eq!(stats["unknown_token_requests"], 0, "{stats}");
    let c = rusqlite::Connection::open(&setup.db).unwrap();
    let status: String = c
        .query_row("SELECT status FROM connections", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, "active");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_a_new_account_and_a_disabled_vehicle() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--users", "2", "--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v2",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let first = vehicle_ids(&http, &base, 0).await;
    let second = vehicle_ids(&http, &base, 1).await;

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    rows_reach(&setup.db, &first[0], 1).await;

    // While it runs: a second account connects, and one of the first account's cars is disabled.
    connect(&setup.config, &http).await;
    let out = std::process::Command::new(BIN)
        .args(["--config", cfg, "vehicles", "disable", &first[1]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.signal("-HUP");
    // The new account's cars are polled once the reload took; a poll of the disabled car
    // already in flight then has landed by the new account's second poll.
    rows_reach(&setup.db, &second[0], 1).await;
    let disabled_then = battery_rows(&setup.db, &first[1]);
    rows_reach(
        &setup.db,
        &second[0],
        battery_rows(&setup.db, &second[0]) + 2,
    )
    .await;
    assert_eq!(
        battery_rows(&setup.db, &first[1]),
        disabled_then,
        "the disabled vehicle is no longer polled"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    assert!(
        daemon.stderr().contains("vehicle set reloaded"),
        "{}",
        daemon.stderr()
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Per vehicle: (answered battery polls, calls billed this month), from `poll_events`.
fn polls_and_calls(db: &std::path::Path) -> Vec<(i64, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare(
            "SELECT count(*), sum(calls) FROM
               (SELECT vehicle_id, at, max(calls) AS calls FROM poll_events
                WHERE endpoint = 'battery' AND outcome = 'ok' GROUP BY vehicle_id, at)
             GROUP BY vehicle_id ORDER BY vehicle_id",
        )
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_across_a_restart() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 1 1 *\"",
    );
    // 6 calls a month per vehicle, whatever the cron says. A v3 battery poll is one signals
    // listing: one call per page.
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("\n[budget]\ncalls_per_vehicle_month = 6\n");
    std::fs::write(&setup.config, text).unwrap();
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let polls = polls_and_calls(&setup.db);
    assert!(!polls.is_empty());
    for &(n, calls) in &polls {
        let per_poll = calls / n;
        assert!(per_poll >= 1 && calls == n * per_poll, "{polls:?}");
        assert!(
            calls <= 6 && calls + per_poll > 6,
            "stopped short of 6 calls, with no room for another poll: {polls:?}"
        );
    }
    assert!(
        daemon
            .stderr()
            .contains("each vehicle's polls stop for the month")
            && daemon.stderr().contains("monthly call budget in force"),
        "{}",
        daemon.stderr()
    );

    // A restart remembers this month's calls from the store: nothing more is polled.
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", setup.metrics_port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    assert_eq!(polls_and_calls(&setup.db), polls);
    let skipped = metric(
        &metrics,
        "carpulse_polls_skipped_total",
        &[("job", "battery"), ("reason", "budget")],
    );
    assert!(
        skipped.is_some_and(|n| n >= polls.len() as f64),
        "{metrics}"
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    // Battery once a day at 04:00: nothing is polled while the test runs.
    let setup = write_config(
        &base,
        "v3",
        "battery = \"0 0 4 * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let car = vehicle_ids(&http, &base, 0).await.remove(0);
    let original = std::fs::read_to_string(&setup.config).unwrap();

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The poll at start (the car has no reading yet), then nothing until 04:00.
    let at_start = battery_rows(&setup.db, &car);
    assert_eq!(at_start, 1);

    // A broken file changes nothing.
    std::fs::write(&setup.config, original.replace("[poll]", "[poll\n")).unwrap();
    daemon.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Every second now; the store path cannot move under a running daemon.
    let faster = original
        .replace("battery = \"0 0 4 * * *\"", "battery = \"* * * * * *\"")
        .replace("carpulse.db", "elsewhere.db");
    std::fs::write(&setup.config, faster).unwrap();
    daemon.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rows = battery_rows(&setup.db, &car);
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let log = daemon.stderr();
    assert!(
        rows >= at_start + 2,
        "polled on the new schedule: {rows} rows\n{log}"
    );
    assert!(
        log.contains("the config file did not load; keeping the running config"),
        "{log}"
    );
    assert!(log.contains("schedule changed"), "{log}");
    assert!(log.contains("schedule.battery"), "{log}");
    assert!(
        log.contains("store.path") && log.contains("only after a restart"),
        "{log}"
    );
    assert!(!setup.dir.path().join("elsewhere.db").exists());
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
