//! v3 as Smartcar documents it in late 2026, through the real binary: `carpulse simulator
//! --v3-auth app` (it refuses per-user tokens on /v3, requires sc-user-id and counts every
//! departure), two accounts connected with `carpulse connect` and API credentials, `carpulse run`
//! on per-second crons with transient faults (asleep, unreachable: try next tick), a SIGKILL and a restart, one owner revoking
//! access, then SIGTERM. Checked against the simulator's own counters and what it served:
//! no v2.0 request, no request without or with a wrong `sc-user-id`, no user token on /v3,
//! application tokens fetched about once per half-life (plus starts) and never used expired,
//! every served reading stored, and the revoked user's vehicles no longer polled and shown as
//! revoked within a minute.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use common::*;

const API_ID: &str = "test-api-client";
const API_SECRET: &str = "test-api-secret-5e1f";
const APP_TOKEN_LIFETIME_S: u64 = 20;

/// Waits for `cond` with a deadline, checking every 200 ms.
async fn until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn db_i64(db: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Battery `recorded_at`s stored per vehicle.
fn stored_battery(db: &std::path::Path) -> HashMap<String, HashSet<i64>> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT vehicle_id, recorded_at FROM battery_history")
        .unwrap();
    let mut out: HashMap<String, HashSet<i64>> = HashMap::new();
    for row in stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
    {
        let (v, at) = row.unwrap();
        out.entry(v).or_default().insert(at);
    }
    out
}

/// Battery `recorded_at`s the simulator served per vehicle.
async fn served_battery(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
) -> HashMap<String, HashSet<i64>> {
    let mut out = HashMap::new();
    for id in ids {
        let v = get_json(http, &format!("{base}/_simulator/served?vehicle_id={id}")).await;
        let set: HashSet<i64> = v["battery"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["recorded_at"].as_i64()).collect())
            .unwrap_or_default();
        out.insert(id.clone(), set);
    }
    out
}

fn missing(
    served: &HashMap<String, HashSet<i64>>,
    stored: &HashMap<String, HashSet<i64>>,
) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (id, set) in served {
        for at in set {
            if !stored.get(id).is_some_and(|s| s.contains(at)) {
                out.push((id.clone(), *at));
            }
        }
    }
    out
}

#[tokio::test]
async fn api_authentication_end_to_end() {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut sim, base) = start_simulator(&[
        "--users",
        "2",
        "--vehicles-per-user",
        "2",
        "--v3-auth",
        "app",
        "--api-client-id",
        API_ID,
        "--api-client-secret",
        API_SECRET,
        "--app-token-lifetime",
        &APP_TOKEN_LIFETIME_S.to_string(),
        "--report-interval",
        "1",
        "--fault",
        "asleep*2",
        "--fault",
        "unreachable*2",
    ])
    .await;
    let setup = write_config_with(
        &base,
        "v3",
        "battery = \"*/2 * * * * *\"\ninfo = \"*/5 * * * * *\"",
        &format!(
            "api_client_id = \"{API_ID}\"\napi_client_secret = \"{API_SECRET}\"\niam_url = \"{base}/oauth2/token\""
        ),
    );
    let cfg = setup.config.to_str().unwrap();

    // Two accounts through Connect: stored under the user id the redirect carried, no token.
    for _ in 0..2 {
        let out = connect(&setup.config, &http).await;
        assert!(out[0].starts_with("stored connection"), "{out:?}");
        assert!(out[0].contains("with 2 vehicle(s)"), "{out:?}");
    }
    let fleet = get_json(&http, &format!("{base}/_simulator/vehicles")).await;
    let users: Vec<(String, Vec<String>)> = fleet["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["id"].as_str().unwrap().to_owned(),
                u["vehicles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["id"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    let all_ids: Vec<String> = users.iter().flat_map(|u| u.1.clone()).collect();
    assert_eq!(all_ids.len(), 4);
    assert_eq!(
        db_i64(
            &setup.db,
            "SELECT count(*) FROM connections WHERE access_expires_at = 0 AND refresh_expires_at = 0 AND status = 'active'"
        ),
        2,
        "API Authentication stores no token"
    );
    assert_eq!(
        db_i64(
            &carpulse::store::token_store::path_for(&setup.db),
            "SELECT count(*) FROM connection_tokens"
        ),
        0,
        "nor does the token store"
    );
    for (user, _) in &users {
        assert_eq!(
            db_i64(
                &setup.db,
                &format!("SELECT count(*) FROM connections WHERE user_id = '{user}'")
            ),
            1,
            "connection keyed by Smartcar's user id {user}"
        );
    }
    assert_eq!(
        db_i64(
            &setup.db,
            "SELECT count(*) FROM vehicles WHERE make IS NOT NULL AND year > 2000"
        ),
        4,
        "make/model/year from /v3/connections"
    );

    // Run; wait for readings of every vehicle.
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let db = setup.db.clone();
    until(
        "two battery readings per vehicle",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            async move {
                let s = stored_battery(&db);
                s.len() == 4 && s.values().all(|v| v.len() >= 2)
            }
        },
    )
    .await;

    // SIGKILL: what was served and committed before it stays; the restart gets a new app token.
    let before_kill = served_battery(&http, &base, &all_ids).await;
    until(
        "the store holds what was served before the kill",
        Duration::from_secs(20),
        || {
            let (db, served) = (db.clone(), before_kill.clone());
            async move { missing(&served, &stored_battery(&db)).is_empty() }
        },
    )
    .await;
    daemon.signal("-KILL");
    daemon.wait(Duration::from_secs(10)).await;
    let at_restart = served_battery(&http, &base, &all_ids).await;
    let rows_at_restart = db_i64(&setup.db, "SELECT count(*) FROM battery_history");
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    until("polls resume after the restart", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            db_i64(&db, "SELECT count(*) FROM battery_history") >= rows_at_restart + 4
        }
    })
    .await;

    // The second owner revokes access: within a minute their connection is revoked, their
    // vehicles are not polled and the daemon says so.
    let (revoked_user, revoked_cars) = users[1].clone();
    let kept_cars = users[0].1.clone();
    let r = http
        .post(format!("{base}/_simulator/revoke"))
        .json(&serde_json::json!({ "user": revoked_user }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let revoked_at = Instant::now();
    let user = revoked_user.clone();
    until("the connection is stored as revoked", Duration::from_secs(60), || {
        let (db, user) = (db.clone(), user.clone());
        async move {
            db_i64(
                &db,
                &format!("SELECT count(*) FROM connections WHERE user_id = '{user}' AND status = 'revoked'"),
            ) == 1
        }
    })
    .await;
    let metrics_url = format!("http://127.0.0.1:{}/metrics", setup.metrics_port);
    let health_url = format!("http://127.0.0.1:{}/healthz", setup.metrics_port);
    let h = http.clone();
    until(
        "metrics count 2 revoked vehicles",
        Duration::from_secs(30),
        || {
            let (h, url) = (h.clone(), metrics_url.clone());
            async move {
                let text = h.get(&url).send().await.unwrap().text().await.unwrap();
                metric(&text, "carpulse_vehicles", &[("state", "revoked")]) == Some(2.0)
            }
        },
    )
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(60),
        "revocation shown within a minute"
    );
    let health = http.get(&health_url).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let body = health.text().await.unwrap();
    assert!(body.contains("revoked"), "{body}");

    // From here on, no request names the revoked user while the other vehicles keep going.
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    let denied_before = stats["revoked_user_requests"].as_u64().unwrap();
    let kept_rows = |db: &std::path::Path| {
        let s = stored_battery(db);
        kept_cars
            .iter()
            .map(|c| s.get(c).map_or(0, |v| v.len()))
            .sum::<usize>()
    };
    let kept_now = kept_rows(&setup.db);
    until(
        "the kept vehicles are polled on",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            let kept = kept_rows(&db);
            async move { kept >= kept_now + 4 }
        },
    )
    .await;
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(
        stats["revoked_user_requests"].as_u64().unwrap(),
        denied_before,
        "the revoked user's vehicles are no longer polled: {stats}"
    );

    let served_end = served_battery(&http, &base, &all_ids).await;
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        daemon.stderr()
    );

    // Every reading served before the kill, and every one first served after the restart, is
    // stored (the ones served in the moment of the kill may be lost with it).
    let stored = stored_battery(&setup.db);
    assert_eq!(
        missing(&before_kill, &stored),
        vec![],
        "served before the kill"
    );
    let after: HashMap<String, HashSet<i64>> = served_end
        .iter()
        .map(|(id, set)| {
            let old = &at_restart[id];
            (id.clone(), set.difference(old).copied().collect())
        })
        .collect();
    assert!(after.values().any(|s| !s.is_empty()));
    assert_eq!(missing(&after, &stored), vec![], "served after the restart");
    for car in &revoked_cars {
        assert!(stored.get(car).is_some_and(|s| !s.is_empty()), "{car}");
    }

    // `status` shows the revocation.
    let mut status = spawn("status", &["--config", cfg, "status"], &[]);
    assert_eq!(status.wait(Duration::from_secs(20)).await, Some(0));
    let out = status.rest_of_stdout().await.join("\n");
    assert!(
        out.contains(&format!("user {revoked_user}  revoked")),
        "{out}"
    );

    // What the simulator saw carpulse do wrong: nothing.
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    for counter in [
        "v2_requests",
        "missing_user_id",
        "wrong_user_id",
        "user_tokens_on_v3",
        "app_token_expired_uses",
        "expired_token_requests",
        "unknown_token_requests",
    ] {
        assert_eq!(stats[counter], 0, "{counter}: {stats}");
    }
    assert!(stats["faults_served"].as_u64().unwrap() >= 2, "{stats}");
    // One token per half-life of the run, plus one per connect and per daemon start.
    let issued = stats["app_tokens_issued"].as_u64().unwrap();
    let budget = started.elapsed().as_secs() / (APP_TOKEN_LIFETIME_S / 2) + 2 + 2 + 1;
    assert!(
        (2..=budget).contains(&issued),
        "{issued} application tokens in {:?} (at most {budget})",
        started.elapsed()
    );

    // Secrets stay out of the logs.
    let log = daemon.stderr();
    assert!(!log.contains(API_SECRET));
    assert!(!log.contains("Bearer "));

    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Wrong API credentials are carpulse's own misconfiguration: logged as such and counted in
/// `carpulse_app_token_requests_total{outcome="refused"}`, never blamed on an owner (every
/// connection stays active), and the IAM endpoint is not hammered.
#[tokio::test]
async fn wrong_api_credentials_blame_no_owner() {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut sim, base) = start_simulator(&[
        "--users",
        "1",
        "--v3-auth",
        "app",
        "--api-client-id",
        API_ID,
        "--api-client-secret",
        API_SECRET,
    ])
    .await;
    let schedule = "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"";
    let creds = |secret: &str| {
        format!(
            "api_client_id = \"{API_ID}\"\napi_client_secret = \"{secret}\"\niam_url = \"{base}/oauth2/token\""
        )
    };
    let good = write_config_with(&base, "v3", schedule, &creds(API_SECRET));
    connect(&good.config, &http).await;
    let wrong = write_config_with(&base, "v3", schedule, &creds("wrong-api-secret"));
    std::fs::copy(&good.db, &wrong.db).unwrap();
    let issued = get_json(&http, &format!("{base}/_simulator/stats")).await["app_tokens_issued"]
        .as_u64()
        .unwrap();

    let mut daemon = spawn(
        "run",
        &["--config", wrong.config.to_str().unwrap(), "run"],
        &[],
    );
    let url = format!("http://127.0.0.1:{}/metrics", wrong.metrics_port);
    let h = http.clone();
    until(
        "a refused token request is counted",
        Duration::from_secs(30),
        || {
            let (h, url) = (h.clone(), url.clone());
            async move {
                let Ok(r) = h.get(&url).send().await else {
                    return false;
                };
                let text = r.text().await.unwrap_or_default();
                metric(
                    &text,
                    "carpulse_app_token_requests_total",
                    &[("outcome", "refused")],
                )
                .is_some_and(|n| n >= 1.0)
                    && metric(
                        &text,
                        "carpulse_polls_total",
                        &[("endpoint", "battery"), ("outcome", "token_error")],
                    )
                    .is_some_and(|n| n >= 2.0)
            }
        },
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)).await, Some(0));
    let log = daemon.stderr();
    assert!(
        log.contains("Smartcar refused carpulse's API credentials"),
        "{log}"
    );
    assert!(!log.contains("wrong-api-secret"));
    assert_eq!(
        db_i64(
            &wrong.db,
            "SELECT count(*) FROM connections WHERE status <> 'active'"
        ),
        0,
        "no owner is blamed"
    );
    let stats = get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["app_tokens_issued"].as_u64().unwrap(), issued);
    // One refusal is held for a minute: polls every second do not each ask again.
    assert!(
        stats["token_errors"].as_u64().unwrap_or(0) <= 3,
        "the IAM endpoint is not asked by every poll: {stats}"
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
