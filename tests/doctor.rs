//! `carpulse doctor` through the real binary against `carpulse simulator`, in each mode: API
//! Authentication (a working account, an empty signal store, a plan-locked group, wrong API
//! credentials), per-user v3 tokens, and v2. What it reports is checked against what the
//! simulator was set up to do, and its billed calls against the simulator's counters.

mod common;

use std::time::Duration;

use common::*;

const API_ID: &str = "doctor-api-client";
const API_SECRET: &str = "doctor-api-secret-9c2";

/// Runs `carpulse doctor` with `args`; its exit code and stdout.
async fn doctor(cfg: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["--config", cfg, "doctor"];
    all.extend_from_slice(args);
    let mut p = spawn("doctor", &all, &[]);
    let code = p.wait(Duration::from_secs(60)).await;
    let mut out = Vec::new();
    while let Some(l) = p.stdout.recv().await {
        out.push(l);
    }
    (code, out.join("\n"))
}

fn app_config(base: &str, secret: &str, extra: &str) -> Setup {
    write_config_with(
        base,
        "v3",
        "battery = \"0 0 * * * *\"",
        &format!(
            "api_client_id = \"{API_ID}\"\napi_client_secret = \"{secret}\"\niam_url = \"{base}/oauth2/token\"\n{extra}"
        ),
    )
}

async fn stats(http: &reqwest::Client, base: &str) -> serde_json::Value {
    get_json(http, &format!("{base}/_simulator/stats")).await
}

#[tokio::test]
async fn doctor_on_api_authentication_reports_each_problem_with_its_fix() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[
        "--users",
        "1",
        "--vehicles-per-user",
        "1",
        "--v3-auth",
        "app",
        "--api-client-id",
        API_ID,
        "--api-client-secret",
        API_SECRET,
        "--locked-groups",
        "charge",
    ])
    .await;
    let setup = app_config(&base, API_SECRET, "v3_page_size = 50");
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;

    // Without --yes and with no one to answer, no billed call is made.
    let before = stats(&http, &base).await["v3_requests"].as_u64().unwrap();
    let (code, out) = doctor(cfg, &[]).await;
    assert!(out.contains("skipped (no billed call made)"), "{out}");
    assert!(out.contains("issued an application token"), "{out}");
    assert!(
        out.contains("lists 1 vehicle connection(s) of 1 user(s)"),
        "{out}"
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        stats(&http, &base).await["v3_requests"].as_u64().unwrap(),
        before
    );

    // With --yes: one listing, the locked group told apart from "not capable".
    let (code, out) = doctor(cfg, &["--yes"]).await;
    assert_eq!(code, Some(1), "a locked group is a problem: {out}");
    assert!(out.contains("(API authentication works)"), "{out}");
    assert!(out.contains("pageSize 50 is honoured"), "{out}");
    assert!(
        out.contains("charge is locked by the app's Smartcar plan"),
        "{out}"
    );
    assert!(out.contains("fix: upgrade the plan"), "{out}");
    assert!(out.contains("battery reads"), "{out}");
    let s = stats(&http, &base).await;
    assert_eq!(s["v3_requests"].as_u64().unwrap(), before + 1, "{s}");
    assert_eq!(s["v2_requests"], 0, "{s}");
    assert_eq!(s["missing_user_id"], 0, "{s}");
    assert!(!out.contains(API_SECRET));

    // Wrong API credentials: said plainly, with the fix, and no connection is blamed.
    let wrong = app_config(&base, "not-the-secret", "");
    std::fs::copy(&setup.db, &wrong.db).unwrap();
    let (code, out) = doctor(wrong.config.to_str().unwrap(), &["--yes"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refused the API credentials"), "{out}");
    assert!(out.contains("API Credentials tab"), "{out}");
    assert!(!out.contains("not-the-secret"), "{out}");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn doctor_finds_an_empty_signal_store() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&[
        "--users",
        "1",
        "--vehicles-per-user",
        "1",
        "--v3-auth",
        "app",
        "--api-client-id",
        API_ID,
        "--api-client-secret",
        API_SECRET,
        "--empty-signals",
        "all",
    ])
    .await;
    let setup = app_config(&base, API_SECRET, "");
    connect(&setup.config, &http).await;
    let (code, out) = doctor(setup.config.to_str().unwrap(), &["--yes"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("Smartcar holds no signals for it"), "{out}");
    assert!(out.contains("subscribe the vehicle to a webhook"), "{out}");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn doctor_on_per_user_tokens_and_v2() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--users", "1", "--vehicles-per-user", "1"]).await;
    let setup = write_config(&base, "v3", "battery = \"0 0 * * * *\"");
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let (code, out) = doctor(cfg, &["--yes"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("per-user Connect tokens"), "{out}");
    assert!(
        out.contains("(per-user token authentication works)"),
        "{out}"
    );
    assert!(out.contains("No problem found."), "{out}");

    let v2 = write_config(&base, "v2", "battery = \"0 0 * * * *\"");
    connect(&v2.config, &http).await;
    let before = stats(&http, &base).await;
    let (code, out) = doctor(v2.config.to_str().unwrap(), &["--yes"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Smartcar is retiring"), "{out}");
    let after = stats(&http, &base).await;
    assert_eq!(
        before["v2_requests"], after["v2_requests"],
        "doctor makes no billed call in v2"
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
