//! `carpulse reauth VEHICLE` through the real binary against the simulator: Connect again for a
//! connection whose consent was revoked, keeping the vehicle's history; a grant from the wrong
//! account stores nothing.

mod common;

use std::time::Duration;

use common::*;

fn battery_rows(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap()
}

/// Runs `carpulse reauth`, plays the browser on the printed URL (plus `extra` query), and
/// returns (exit code, stdout, stderr).
async fn reauth(
    config: &std::path::Path,
    http: &reqwest::Client,
    vehicle: &str,
    extra: &str,
) -> (Option<i32>, String, String) {
    let cfg = config.to_str().unwrap();
    let mut p = spawn(
        "reauth",
        &["--config", cfg, "reauth", vehicle, "--wait", "60s"],
        &[],
    );
    let url = p.line(Duration::from_secs(30)).await;
    let _ = http.get(format!("{url}{extra}")).send().await;
    let code = p.wait(Duration::from_secs(30)).await;
    let mut out = String::new();
    for l in p.rest_of_stdout().await {
        out.push_str(&l);
        out.push('\n');
    }
    (code, format!("{url}\n{out}"), p.stderr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_connects_the_vehicles_account_again_and_keeps_its_history() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--users", "2", "--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let fleet = get_json(&http, &format!("{base}/_simulator/vehicles")).await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let make = fleet["users"][0]["vehicles"][0]["make"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let history = battery_rows(&setup.db);
    assert!(history > 0);

    // The owner revoked access; the daemon found the refresh refused (set here directly).
    let r = http
        .post(format!("{base}/_simulator/revoke"))
        .json(&serde_json::json!({"user": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let db = rusqlite::Connection::open(&setup.db).unwrap();
    db.execute("UPDATE connections SET status = 'needs_reauth'", [])
        .unwrap();

    // The second account's consent does not cover this car: nothing is stored.
    let (code, out, err) = reauth(&setup.config, &http, &car, "&user=2").await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("does not include vehicle {car}")),
        "{err}"
    );
    let n: i64 = db
        .query_row("SELECT count(*) FROM connections", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "the wrong account was not stored");

    // The owner's account: the connection is active again, in place, history intact.
    let (code, out, err) = reauth(&setup.config, &http, &car, "&user=1").await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("response_type=code"), "{out}");
    assert!(out.contains("approval_prompt=force"), "{out}");
    assert!(out.contains(&format!("make={make}")), "{out}");
    assert!(
        out.contains(&format!(
            "vehicle {car} is re-authorized through connection 1"
        )),
        "{out}"
    );
    let (id, status): (i64, String) = db
        .query_row("SELECT id, status FROM connections", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((id, status.as_str()), (1, "active"));
    assert_eq!(battery_rows(&setup.db), history, "history kept");

    // And polling resumes with the new grant.
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    assert!(battery_rows(&setup.db) > history);
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["expired_token_requests"], 0, "{stats}");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_of_an_unknown_vehicle_says_so() {
    let (mut sim, base) = start_simulator(&[]).await;
    let setup = write_config(&base, "v3", "battery = \"0 0 4 * * *\"");
    let http = reqwest::Client::new();
    connect(&setup.config, &http).await;
    let out = std::process::Command::new(BIN)
        .args(["--config", setup.config.to_str().unwrap(), "reauth", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no vehicle nope in the store"), "{err}");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_of_a_vehicle_paused_by_its_manufacturer_login_uses_smartcars_reauth_flow() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v2",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let fleet = get_json(&http, &format!("{base}/_simulator/vehicles")).await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The owner changed their manufacturer password: every request for the car fails.
    let r = http
        .post(format!("{base}/_simulator/faults"))
        .json(&serde_json::json!({"kind": "connected_services_account", "vehicle_id": car}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let db = rusqlite::Connection::open(&setup.db).unwrap();
    let pause: String = db
        .query_row(
            "SELECT reason FROM blocked_endpoints WHERE vehicle_id = ?1 AND endpoint = '*'",
            [&car],
            |r| r.get(0),
        )
        .unwrap();
    assert!(pause.starts_with("CONNECTED_SERVICES_ACCOUNT"), "{pause}");
    let status = std::process::Command::new(BIN)
        .args(["--config", cfg, "status"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("paused (CONNECTED_SERVICES_ACCOUNT"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // carpulse picks Smartcar's re-auth flow; the owner logs in again.
    let (code, out, err) = reauth(&setup.config, &http, &car, "").await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("/oauth/reauthenticate?response_type=vehicle_id"),
        "{out}"
    );
    assert!(out.contains("lifted 1 block(s)"), "{out}");
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["reauthentications"], 1, "{stats}");

    // The running daemon is told, and polls the car again.
    let before: i64 = db
        .query_row(
            "SELECT count(*) FROM battery_history WHERE vehicle_id = ?1",
            [&car],
            |r| r.get(0),
        )
        .unwrap();
    daemon.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let after: i64 = db
        .query_row(
            "SELECT count(*) FROM battery_history WHERE vehicle_id = ?1",
            [&car],
            |r| r.get(0),
        )
        .unwrap();
    assert!(after > before, "polled again: {before} -> {after}");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
