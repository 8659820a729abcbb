//! The daemon's parts in-process against the real simulator on loopback and a real SQLite file:
//! connect through the library, one poll cycle per job, token refresh persisted before use.

use std::time::Duration;

use carpulse::config::{Config, Env};
use carpulse::daemon::metrics::Metrics;
use carpulse::daemon::poller::{PolledVehicle, Poller};
use carpulse::daemon::tokens::TokenManager;
use carpulse::domain::{ApiVersion, ConnectionStatus, Secret, TokenPair};
use carpulse::simulator::{self, SimulatorConfig};
use carpulse::smartcar::{Job, SmartcarClient};
use carpulse::store::{queries, Store};
use tokio_util::sync::CancellationToken;

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

struct World {
    base: String,
    config: Config,
    store: Store,
    client: SmartcarClient,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

async fn world(api: &str, token_lifetime: Duration) -> World {
    world_of(api, token_lifetime, 3).await
}

async fn world_of(api: &str, token_lifetime: Duration, vehicles: usize) -> World {
    world_with(
        api,
        SimulatorConfig {
            vehicles_per_user: vehicles,
            access_token_lifetime: token_lifetime,
            ..SimulatorConfig::default()
        },
    )
    .await
}

async fn world_with(api: &str, sim_cfg: SimulatorConfig) -> World {
    let sim_cfg = SimulatorConfig {
        client_id: "parts-client".into(),
        client_secret: "parts-secret".into(),
        users: 1,
        report_interval: Duration::from_secs(1),
        ..sim_cfg
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(simulator::serve(listener, sim_cfg, stop.clone()));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[smartcar]\nclient_id = \"parts-client\"\nclient_secret = \"parts-secret\"\napi = \"{api}\"\n\
         redirect_uri = \"http://127.0.0.1:1/exchange\"\n\
         connect_url = \"{base}/oauth/authorize\"\ntoken_url = \"{base}/oauth/token\"\n\
         api_v2_url = \"{base}/v2.0\"\napi_v3_url = \"{base}/v3\"\n\
         [store]\npath = \"{}\"\n[poll]\ntimeout = \"10s\"\n",
        dir.path().join("parts.db").display()
    );
    let config = Config::parse(&text, "parts.toml", &NoEnv).unwrap();
    let store = Store::open(&config.store.path, None).unwrap();
    let client = SmartcarClient::new(carpulse::daemon::client_config(&config)).unwrap();
    World {
        base,
        config,
        store,
        client,
        _dir: dir,
        stop,
    }
}

/// Connect through the library, playing the browser with a redirect-following client.
async fn connect(w: &World) -> carpulse::cli::connect::Connected {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = w.config.clone();
    cfg.smartcar.redirect_uri = format!("http://{}/exchange", listener.local_addr().unwrap());
    carpulse::cli::connect::run(
        &cfg,
        &w.store,
        vec![listener],
        |url| {
            let url = url.to_string();
            tokio::spawn(async move { reqwest::get(url).await });
        },
        Duration::from_secs(20),
    )
    .await
    .unwrap()
}

/// A token manager loaded with the store's connections, as the daemon builds it.
async fn tokens_for(w: &World, metrics: &Metrics) -> std::sync::Arc<TokenManager> {
    let tokens = TokenManager::new(
        w.store.clone(),
        w.client.clone(),
        metrics.clone(),
        Duration::from_secs(600),
    );
    tokens.load(
        w.store
            .call(|c| queries::load_connections(c))
            .await
            .unwrap(),
    );
    tokens
}

/// A poller over the connected vehicles, as the daemon builds it.
async fn poller_for(
    w: &World,
    api: &str,
    connected: &carpulse::cli::connect::Connected,
) -> (std::sync::Arc<Poller>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let tokens = tokens_for(w, &metrics).await;
    let poller = Poller::new(
        if api == "v2" {
            ApiVersion::V2
        } else {
            ApiVersion::V3
        },
        w.client.clone(),
        tokens,
        w.store.clone(),
        metrics.clone(),
        &carpulse::config::PollConfig {
            concurrency: 2,
            max_in_flight: 2,
            timeout: Duration::from_secs(10),
        },
    );
    poller.set_vehicles(
        connected
            .vehicles
            .iter()
            .map(|(id, _)| PolledVehicle {
                id: id.clone(),
                connection: connected.connection,
            })
            .collect(),
    );
    (poller, metrics)
}

async fn poll_cycle_stores_every_vehicle(api: &str) {
    let w = world(api, Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    assert_eq!(connected.vehicles.len(), 3);
    assert!(connected.vehicles.iter().all(|(_, info)| info.is_some()));

    let (poller, metrics) = poller_for(&w, api, &connected).await;
    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (report.vehicles, report.ok, report.failed),
        (3, 3, 0),
        "{report:?}"
    );
    // A v3 listing carries the odometer too, and it is stored whichever job asked.
    let per_listing = if api == "v3" { 9 } else { 6 };
    assert_eq!(report.readings, per_listing, "battery + charge per vehicle");
    let report = poller.cycle(Job::Info, CancellationToken::new()).await;
    assert_eq!((report.ok, report.failed), (3, 0), "{report:?}");
    let per_listing = if api == "v3" { 9 } else { 3 };
    assert_eq!(
        report.readings, per_listing,
        "one odometer reading per vehicle"
    );
    w.store.flush().await.unwrap();

    let served_ok = w
        .store
        .call(|c| {
            let n: i64 = c.query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))?;
            let vins: i64 = c.query_row(
                "SELECT count(*) FROM vehicles WHERE length(vin) = 17",
                [],
                |r| r.get(0),
            )?;
            let odo: i64 = c.query_row(
                "SELECT count(*) FROM odometer_history WHERE odometer_km > 0",
                [],
                |r| r.get(0),
            )?;
            Ok((n, vins, odo))
        })
        .await
        .unwrap();
    assert_eq!(served_ok, (3, 3, 3));
    let text = metrics.render();
    // v3: the info job's listing answered the battery too.
    let battery_ok = if api == "v3" { 6 } else { 3 };
    assert!(
        text.contains(&format!(
            "carpulse_polls_total{{endpoint=\"battery\",outcome=\"ok\"}} {battery_ok}"
        )),
        "{text}"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn v3_poll_cycle_stores_every_vehicle() {
    poll_cycle_stores_every_vehicle("v3").await;
}

#[tokio::test]
async fn v2_poll_cycle_stores_every_vehicle() {
    poll_cycle_stores_every_vehicle("v2").await;
}

#[tokio::test]
async fn an_expired_token_is_refreshed_and_persisted_before_use() {
    // 2 s tokens: the manager must refresh before handing one out once it is near expiry.
    let w = world("v3", Duration::from_secs(2)).await;
    let connected = connect(&w).await;
    let before = w
        .store
        .call(|c| queries::load_connections(c))
        .await
        .unwrap();
    let old_refresh = before[0].tokens.refresh_token.clone();

    let metrics = Metrics::new().unwrap();
    let tokens = TokenManager::new(
        w.store.clone(),
        w.client.clone(),
        metrics.clone(),
        Duration::from_secs(600),
    );
    tokens.load(before);
    let access = tokens.access(connected.connection).await.unwrap();
    // The token is within the safety window of its 2 s life, so this was a refresh.
    let after = w
        .store
        .call(|c| queries::load_connections(c))
        .await
        .unwrap();
    assert_ne!(
        after[0].tokens.refresh_token, old_refresh,
        "the rotated refresh token is stored"
    );
    assert_eq!(
        after[0].tokens.access_token, access.token,
        "the token handed out is the stored one"
    );
    assert_eq!(after[0].status, ConnectionStatus::Active);

    // A refresh token that Smartcar refuses marks the connection needs_reauth.
    let broken = queries::ConnectionRecord {
        id: after[0].id,
        user_id: after[0].user_id.clone(),
        status: ConnectionStatus::Active,
        tokens: TokenPair {
            access_token: Secret::new("expired-access"),
            refresh_token: Secret::new("not-a-token"),
            access_expires_at: 0,
            refresh_expires_at: after[0].tokens.refresh_expires_at,
        },
    };
    // The store holds the same dead pair (otherwise a newer stored grant would be adopted).
    let (bid, btokens) = (broken.id, broken.tokens.clone());
    w.store
        .call(move |c| queries::save_tokens(c, bid, &btokens, carpulse::domain::now_ms()))
        .await
        .unwrap();
    let tokens = TokenManager::new(
        w.store.clone(),
        w.client.clone(),
        metrics.clone(),
        Duration::from_secs(600),
    );
    tokens.load(vec![broken]);
    let err = tokens.access(connected.connection).await.unwrap_err();
    assert!(err.to_string().contains("refresh"), "{err}");
    assert!(
        !err.to_string().contains("not-a-token"),
        "no token in errors: {err}"
    );
    let status = w
        .store
        .call(|c| queries::load_connections(c))
        .await
        .unwrap()[0]
        .status;
    assert_eq!(status, ConnectionStatus::NeedsReauth);

    // A refusal while the store holds a newer grant (a reconnect) adopts that grant instead.
    let code_owner = connect(&w).await;
    assert_eq!(code_owner.connection, connected.connection);
    let stale = queries::ConnectionRecord {
        tokens: TokenPair {
            access_token: Secret::new("old-access"),
            refresh_token: Secret::new("old-grant"),
            access_expires_at: 0,
            refresh_expires_at: after[0].tokens.refresh_expires_at,
        },
        ..after[0].clone()
    };
    let tokens = TokenManager::new(
        w.store.clone(),
        w.client.clone(),
        metrics.clone(),
        Duration::from_secs(600),
    );
    tokens.load(vec![stale]);
    let adopted = tokens.access(connected.connection).await.unwrap();
    let stored = w
        .store
        .call(|c| queries::load_connections(c))
        .await
        .unwrap();
    assert_eq!(adopted.token, stored[0].tokens.access_token);
    assert_eq!(stored[0].status, ConnectionStatus::Active);

    let stats: serde_json::Value = reqwest::get(format!("{}/_simulator/stats", w.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["invalidated_refresh_token_uses"], 0, "{stats}");
    w.stop.cancel();
}

async fn set_fault(w: &World, body: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/_simulator/faults", w.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "setting {body}");
}

async fn sim_stats(w: &World) -> serde_json::Value {
    reqwest::get(format!("{}/_simulator/stats", w.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn events(w: &World, vehicle: &str) -> Vec<(String, String, Option<String>)> {
    let v = vehicle.to_owned();
    w.store
        .call(move |c| {
            let mut stmt = c.prepare(
                "SELECT endpoint, outcome, error_code FROM poll_events WHERE vehicle_id = ?1 ORDER BY at, endpoint",
            )?;
            let rows = stmt
                .query_map([v], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .unwrap()
}

/// Each fault class gets its reaction from the poller, and the other vehicles keep their cadence.
async fn reactions(api: &str) {
    let w = world(api, Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let (poller, metrics) = poller_for(&w, api, &connected).await;
    let ids: Vec<String> = connected
        .vehicles
        .iter()
        .map(|(id, _)| id.0.clone())
        .collect();
    let (limited, denied, billed) = (&ids[0], &ids[1], &ids[2]);
    set_fault(&w, serde_json::json!({"vehicle_id": limited, "kind": "rate_limit", "retry_after": 3600, "count": 1})).await;
    set_fault(
        &w,
        serde_json::json!({"vehicle_id": denied, "kind": "permission"}),
    )
    .await;
    set_fault(
        &w,
        serde_json::json!({"vehicle_id": billed, "kind": "billing"}),
    )
    .await;

    let first = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (first.ok, first.failed, first.skipped),
        (0, 3, 0),
        "{first:?}"
    );
    let served_after_first = sim_stats(&w).await["faults_served"].as_u64().unwrap();
    assert_eq!(served_after_first, 3);

    // Second tick: nobody is called: one waits out retry-after, one has nothing left it may
    // read, one is paused.
    let second = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (second.ok, second.failed, second.skipped),
        (0, 0, 3),
        "{second:?}"
    );
    let stats = sim_stats(&w).await;
    assert_eq!(
        stats["faults_served"], 3,
        "no further call reached the simulator: {stats}"
    );
    assert_eq!(stats["retry_after_violations"], 0, "{stats}");
    let (disabled, _) = poller.gate_of(&carpulse::domain::VehicleId(denied.clone()));
    assert_eq!(disabled, vec!["battery", "charge"]);
    let (_, paused) = poller.gate_of(&carpulse::domain::VehicleId(billed.clone()));
    assert_eq!(paused.as_deref(), Some("BILLING:VEHICLE_REQUEST_LIMIT"));

    // The info job of the denied vehicle is still allowed (only battery and charge were refused).
    set_fault(
        &w,
        serde_json::json!({"vehicle_id": denied, "kind": "asleep", "count": 1}),
    )
    .await;
    let info = poller.cycle(Job::Info, CancellationToken::new()).await;
    assert_eq!(info.skipped, 2, "{info:?}");
    let e = events(&w, denied).await;
    assert!(
        e.iter().any(|(ep, outcome, code)| ep == "battery"
            && outcome == "permission"
            && code.is_none()),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|(_, outcome, code)| outcome == "vehicle_state"
                && code.as_deref() == Some("ASLEEP")),
        "{e:?}"
    );
    // Asleep is "try next tick": the next info cycle calls it again and succeeds.
    let again = poller.cycle(Job::Info, CancellationToken::new()).await;
    assert_eq!(again.ok, 1, "{again:?}");

    let e = events(&w, limited).await;
    assert_eq!(
        e.iter().filter(|(_, o, _)| o == "rate_limited").count(),
        2,
        "{e:?}"
    );
    let text = metrics.render();
    assert!(
        text.contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"waiting\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"paused\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"disabled\"} 1"),
        "{text}"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn v3_fault_reactions() {
    reactions("v3").await;
}

#[tokio::test]
async fn v2_fault_reactions() {
    reactions("v2").await;
}

#[tokio::test]
async fn a_server_error_backs_the_vehicle_off_while_the_others_go_on() {
    let w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let (poller, _) = poller_for(&w, "v3", &connected).await;
    let sick = connected.vehicles[0].0 .0.clone();
    set_fault(
        &w,
        serde_json::json!({"vehicle_id": sick, "kind": "server", "count": 1}),
    )
    .await;
    let first = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((first.ok, first.failed), (2, 1), "{first:?}");
    let second = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (second.ok, second.skipped),
        (2, 1),
        "backing off, the others polled: {second:?}"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn healthz_names_stale_vehicles_and_connections_that_need_reauth() {
    use carpulse::daemon::metrics::Health;
    let w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let metrics = Metrics::new().unwrap();
    let tokens = tokens_for(&w, &metrics).await;
    let (poller, poller_metrics) = poller_for(&w, "v3", &connected).await;
    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(report.ok, 3);
    let health = Health::default();
    let now = carpulse::domain::now_ms();

    carpulse::daemon::check_health(
        &health,
        &tokens,
        &poller,
        &metrics,
        Duration::from_secs(3600),
        now,
    )
    .await;
    assert!(
        health.lock().unwrap().problems.is_empty(),
        "{:?}",
        health.lock().unwrap().problems
    );
    let text = metrics.render();
    assert!(
        text.contains("carpulse_reading_age_seconds{signal=\"battery\""),
        "{text}"
    );
    assert!(
        text.contains("carpulse_token_expiry_timestamp_seconds{connection=\"1\"}"),
        "{text}"
    );
    let polled = poller_metrics.render();
    assert_eq!(
        polled.matches("carpulse_vehicle_up{").count(),
        3,
        "{polled}"
    );

    // Nothing answered for longer than stale_after: every vehicle is named.
    tokio::time::sleep(Duration::from_millis(20)).await;
    carpulse::daemon::check_health(
        &health,
        &tokens,
        &poller,
        &metrics,
        Duration::from_millis(5),
        now,
    )
    .await;
    let problems = health.lock().unwrap().problems.clone();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems.iter().all(|p| p.contains("no answered poll")),
        "{problems:?}"
    );

    // The account revokes access: the next refresh is refused and /healthz says which connection.
    let r = reqwest::Client::new()
        .post(format!("{}/_simulator/revoke", w.base))
        .json(&serde_json::json!({"user": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stored = w
        .store
        .call(|c| queries::load_connections(c))
        .await
        .unwrap();
    let expired = queries::ConnectionRecord {
        tokens: TokenPair {
            access_expires_at: 0,
            ..stored[0].tokens.clone()
        },
        ..stored[0].clone()
    };
    tokens.load(vec![expired]);
    assert!(tokens.access(connected.connection).await.is_err());
    carpulse::daemon::check_health(
        &health,
        &tokens,
        &poller,
        &metrics,
        Duration::from_secs(3600),
        carpulse::domain::now_ms(),
    )
    .await;
    let problems = health.lock().unwrap().problems.clone();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("needs re-authorization"),
        "{problems:?}"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn the_charging_cadence_polls_only_plugged_in_vehicles() {
    let w = world_of("v3", Duration::from_secs(7200), 16).await;
    let connected = connect(&w).await;
    let (poller, _) = poller_for(&w, "v3", &connected).await;
    let all = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(all.ok, 16);
    let plugged: i64 = w
        .store
        .call(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM charge_history WHERE plugged_in = 1 OR state = 'CHARGING'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap();
    // Just answered by the base cron: within the gap, nobody is asked again.
    let none = poller
        .cycle_plugged_in(
            Job::Battery,
            Duration::from_secs(3600),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(none.vehicles, 0, "{none:?}");
    let charging = poller
        .cycle_plugged_in(Job::Battery, Duration::ZERO, CancellationToken::new())
        .await;
    assert_eq!(charging.vehicles as i64, plugged, "{charging:?}");
    assert_eq!(charging.ok as i64, plugged);
    w.stop.cancel();
}

#[tokio::test]
async fn the_monthly_budget_stops_polling_short_of_it() {
    let w = world("v2", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let (poller, metrics) = poller_for(&w, "v2", &connected).await;
    let first = connected.vehicles[0].0.clone();
    // 6 calls a month; a v2 battery poll is one batch of 2 items. The first vehicle already
    // spent 1 this month.
    let now = carpulse::domain::now_ms();
    poller.set_ledger(carpulse::daemon::gate::Ledger::new(
        Some(6),
        std::collections::HashMap::from([(first.clone(), 1)]),
        now,
    ));
    for _ in 0..2 {
        let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
        assert_eq!(r.ok, 3, "{r:?}");
    }
    let third = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (third.ok, third.skipped),
        (2, 1),
        "the first vehicle is at 1 + 2 + 2 = 5 of 6: no room for 2 more: {third:?}"
    );
    assert_eq!(poller.calls_this_month(&first), 5);
    let fourth = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        fourth.skipped, 3,
        "5 + 2 and 6 + 2 are both over 6: {fourth:?}"
    );
    assert!(metrics
        .render()
        .contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"budget\"} 4"));
    // What was skipped never reached the simulator: 2 battery polls answered for the first
    // vehicle, 3 for the others.
    w.store.flush().await.unwrap();
    let first_id = first.0.clone();
    let answered: (i64, i64) = w
        .store
        .call(move |c| {
            let q = "SELECT count(*) FROM poll_events WHERE endpoint = 'battery' AND outcome = 'ok' AND vehicle_id";
            Ok((
                c.query_row(&format!("{q} = ?1"), [&first_id], |r| r.get(0))?,
                c.query_row(&format!("{q} <> ?1"), [&first_id], |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(answered, (2, 6));
    w.stop.cancel();
}

/// A BEV and an ICE car (which is which depends on the simulator's seed), connected.
async fn bev_and_ice(api: &str) -> (World, carpulse::cli::connect::Connected) {
    let w = world_with(
        api,
        SimulatorConfig {
            vehicles_per_user: 2,
            powertrains: vec![simulator::Powertrain::Bev, simulator::Powertrain::Ice],
            ..SimulatorConfig::default()
        },
    )
    .await;
    let connected = connect(&w).await;
    (w, connected)
}

async fn requests(w: &World, api: &str) -> u64 {
    sim_stats(w).await[format!("{api}_requests")]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn v3_discovery_at_connect_keeps_the_ice_car_out_of_battery_polls() {
    let (w, connected) = bev_and_ice("v3").await;
    // The signal list of the ICE car marks its traction battery and charge signals ERROR
    // COMPATIBILITY; the BEV's blocks nothing.
    let (ice, bev): (Vec<_>, Vec<_>) = connected
        .vehicles
        .iter()
        .map(|(id, _)| id.clone())
        .partition(|id| !connected.unavailable[id].is_empty());
    assert_eq!(
        (ice.len(), bev.len()),
        (1, 1),
        "{:?}",
        connected.unavailable
    );
    let mut blocked: Vec<&str> = connected.unavailable[&ice[0]]
        .iter()
        .map(|b| b.0.as_str())
        .collect();
    blocked.sort();
    assert_eq!(
        blocked,
        ["battery", "charge"],
        "{:?}",
        connected.unavailable
    );
    assert!(carpulse::cli::connect::describe(&connected)
        .contains("not polled: battery (COMPATIBILITY:VEHICLE_NOT_CAPABLE)"));

    let (poller, metrics) = poller_for(&w, "v3", &connected).await;
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let before = requests(&w, "v3").await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.skipped, r.failed), (1, 1, 0), "{r:?}");
    let bev_only = requests(&w, "v3").await - before;
    assert!(metrics
        .render()
        .contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"disabled\"} 1"));
    // Two hours after start with a 1 h stale_after, the ICE car (never asked by the battery
    // job) is judged against the info job's daily cadence: /healthz stays quiet.
    let health = carpulse::daemon::metrics::Health::default();
    let tokens = tokens_for(&w, &metrics).await;
    let two_hours_ago = carpulse::domain::now_ms() - 2 * 3_600_000;
    carpulse::daemon::check_health(
        &health,
        &tokens,
        &poller,
        &metrics,
        Duration::from_secs(3600),
        two_hours_ago,
    )
    .await;
    let problems = health.lock().unwrap().problems.clone();
    assert!(problems.is_empty(), "{problems:?}");
    // Lifted (as a reconnect would), the ICE car is asked again: twice the requests.
    let id = ice[0].clone();
    w.store
        .call(move |c| queries::clear_blocks(c, &id, false))
        .await
        .unwrap();
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let before = requests(&w, "v3").await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.failed), (1, 1), "{r:?}");
    assert_eq!(requests(&w, "v3").await - before, 2 * bev_only);
    // The info job still polls the ICE car (its odometer).
    let r = poller.cycle(Job::Info, CancellationToken::new()).await;
    assert_eq!((r.ok, r.failed), (2, 0), "{r:?}");
    w.stop.cancel();
}

#[tokio::test]
async fn v2_blocks_learnt_from_answers_survive_a_restart_until_the_vehicle_is_enabled() {
    let (w, connected) = bev_and_ice("v2").await;
    // Every permission is granted: v2 discovery blocks nothing; the ICE car's answers will.
    assert!(connected.unavailable.values().all(Vec::is_empty));
    let (poller, _) = poller_for(&w, "v2", &connected).await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(r.failed, 1, "the ICE car answers 501 twice: {r:?}");
    w.store.flush().await.unwrap();
    let blocks = w.store.call(|c| queries::load_blocks(c)).await.unwrap();
    let mut stored: Vec<(&str, &str, &str)> = blocks
        .iter()
        .map(|b| (b.scope.column(), b.source.as_str(), b.reason.as_str()))
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            ("battery", "poll", "COMPATIBILITY:VEHICLE_NOT_CAPABLE"),
            ("charge", "poll", "COMPATIBILITY:VEHICLE_NOT_CAPABLE")
        ]
    );
    let ice = blocks[0].vehicle_id.clone();
    assert!(
        blocks.iter().all(|b| b.vehicle_id == ice),
        "one car: {blocks:?}"
    );

    // "Restart": a new poller adopts the stored blocks and never asks the ICE car again.
    let (poller, _) = poller_for(&w, "v2", &connected).await;
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let before = requests(&w, "v2").await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.skipped), (1, 1), "{r:?}");
    assert_eq!(requests(&w, "v2").await - before, 1, "the BEV's batch only");

    // `vehicles enable` lifts what answers blocked; the next reload asks again.
    let id = ice.clone();
    let lifted = w
        .store
        .call(move |c| queries::clear_blocks(c, &id, true))
        .await
        .unwrap();
    assert_eq!(lifted, 2);
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.failed, r.skipped), (1, 0), "asked again: {r:?}");
    w.stop.cancel();
}

#[tokio::test]
async fn v2_discovery_leaves_what_the_consent_did_not_grant_out_of_the_batch() {
    let mut w = world("v2", Duration::from_secs(7200)).await;
    w.config.smartcar.scope = [
        "read_vehicle_info",
        "read_vin",
        "read_battery",
        "read_odometer",
    ]
    .map(String::from)
    .to_vec();
    let connected = connect(&w).await;
    for (id, _) in &connected.vehicles {
        assert_eq!(
            connected.unavailable[id],
            vec![(
                carpulse::smartcar::Endpoint::Charge,
                "not granted: read_charge".to_string()
            )]
        );
    }
    let (poller, _) = poller_for(&w, "v2", &connected).await;
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (r.ok, r.failed, r.readings),
        (3, 0, 3),
        "battery only: {r:?}"
    );
    let stats = sim_stats(&w).await;
    assert_eq!(
        stats["permission_denied"], 0,
        "/charge was never asked: {stats}"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn a_rotated_pair_the_store_refused_is_saved_once_it_can_be() {
    let w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let metrics = Metrics::new().unwrap();
    let tokens = tokens_for(&w, &metrics).await;
    let first = tokens.access(connected.connection).await.unwrap();

    // The disk refuses every update of the token store's pair.
    let side =
        rusqlite::Connection::open(carpulse::store::token_store::path_for(&w.config.store.path))
            .unwrap();
    side.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE ON connection_tokens
         BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
    )
    .unwrap();
    let rotated = tokens
        .refresh_after_401(connected.connection, &first.token)
        .await
        .unwrap();
    assert_ne!(rotated.token, first.token, "rotated and in use");
    let stored_access = |side: &rusqlite::Connection| -> String {
        side.query_row("SELECT access_token FROM connection_tokens", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(stored_access(&side), first.token.expose());
    assert!(metrics
        .render()
        .contains("carpulse_token_refreshes_total{outcome=\"persist_failed\"} 1"));

    // The background task offers it again; once the disk takes it, it is stored.
    let stop = CancellationToken::new();
    tokio::spawn(tokens.clone().run(stop.clone()));
    side.execute_batch("DROP TRIGGER refuse").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while stored_access(&side) != rotated.token.expose() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated pair was never saved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The pair in use is still the rotated one, and Smartcar never saw a dead token.
    let now = tokens.access(connected.connection).await.unwrap();
    assert_eq!(now.token, rotated.token);
    assert_eq!(sim_stats(&w).await["invalidated_refresh_token_uses"], 0);
    stop.cancel();
    w.stop.cancel();
}

#[tokio::test]
async fn a_capability_reading_is_recorded_billed_and_gated_like_a_poll() {
    let w = world("v2", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let ids: Vec<_> = connected
        .vehicles
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    // Due again (as after a reconnect), and the first car is rate-limited for a minute.
    for id in ids.clone() {
        w.store
            .call(move |c| queries::clear_blocks(c, &id, false))
            .await
            .unwrap();
    }
    set_fault(
        &w,
        serde_json::json!({"kind": "rate_limit", "vehicle_id": ids[0].0, "retry_after": 60}),
    )
    .await;
    let (poller, metrics) = poller_for(&w, "v2", &connected).await;
    let pass = carpulse::daemon::discovery::Discovery::default()
        .run_due(
            &w.store,
            &poller,
            Duration::from_secs(7 * 86_400),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!((pass.read, pass.failed), (2, 1), "{pass:?}");
    w.store.flush().await.unwrap();
    let mut rows: Vec<(String, String, Option<i64>)> = w
        .store
        .call(|c| {
            let mut stmt = c.prepare(
                "SELECT vehicle_id, outcome, calls FROM poll_events WHERE endpoint = 'capabilities'",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .unwrap();
    rows.sort();
    let mut want = vec![
        (ids[0].0.clone(), "rate_limited".to_string(), Some(1)),
        (ids[1].0.clone(), "ok".to_string(), Some(1)),
        (ids[2].0.clone(), "ok".to_string(), Some(1)),
    ];
    want.sort();
    assert_eq!(rows, want);
    assert!(metrics
        .render()
        .contains("carpulse_polls_total{endpoint=\"capabilities\",outcome=\"ok\"} 2"));
    // The 429's retry-after holds the car's polls too, and it is not read again meanwhile.
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.skipped), (2, 1), "{r:?}");
    assert_eq!(poller.calls_this_month(&ids[0]), 1);
    assert_eq!(sim_stats(&w).await["retry_after_violations"], 0);
    w.stop.cancel();
}

#[tokio::test]
async fn a_retry_after_outlives_a_restart() {
    let w = world("v2", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let limited = connected.vehicles[0].0.clone();
    set_fault(
        &w,
        serde_json::json!({"kind": "rate_limit", "vehicle_id": limited.0, "retry_after": 60, "count": 1}),
    )
    .await;
    let (poller, _) = poller_for(&w, "v2", &connected).await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.failed), (2, 1), "{r:?}");
    w.store.flush().await.unwrap();
    let now = carpulse::domain::now_ms();
    let waits: Vec<_> = w
        .store
        .call(|c| queries::load_blocks(c))
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.scope == carpulse::domain::BlockScope::Wait)
        .collect();
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(waits[0].vehicle_id, limited);
    assert_eq!(waits[0].reason, "RATE_LIMIT:VEHICLE");
    let until = waits[0].until.unwrap();
    assert!(
        (now + 55_000..=now + 61_000).contains(&until),
        "{until} vs {now}"
    );
    // A reconnect lifts blocks, never a wait.
    let id = limited.clone();
    w.store
        .call(move |c| queries::clear_blocks(c, &id, false))
        .await
        .unwrap();

    // "Restart": a new poller adopts the stored wait and does not call the car early.
    let (poller, metrics) = poller_for(&w, "v2", &connected).await;
    carpulse::daemon::adopt_stored_blocks(&w.store, &poller)
        .await
        .unwrap();
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!((r.ok, r.skipped), (2, 1), "{r:?}");
    assert!(metrics
        .render()
        .contains("carpulse_polls_skipped_total{job=\"battery\",reason=\"waiting\"} 1"));
    assert_eq!(sim_stats(&w).await["retry_after_violations"], 0);
    w.stop.cancel();
}

#[tokio::test]
async fn a_v3_page_size_makes_a_poll_one_billed_call() {
    let mut w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    // The server's default page (10 of 18 signals) costs two calls per poll.
    let (poller, _) = poller_for(&w, "v3", &connected).await;
    let before = requests(&w, "v3").await;
    poller.cycle(Job::Battery, CancellationToken::new()).await;
    let default_pages = requests(&w, "v3").await - before;
    assert_eq!(default_pages, 2 * 3);
    let first = &connected.vehicles[0].0;
    assert_eq!(poller.calls_this_month(first), 2);

    w.config.smartcar.v3_page_size = Some(50);
    w.client = SmartcarClient::new(carpulse::daemon::client_config(&w.config)).unwrap();
    let (poller, _) = poller_for(&w, "v3", &connected).await;
    let before = requests(&w, "v3").await;
    let r = poller.cycle(Job::Battery, CancellationToken::new()).await;
    // battery, charge and the odometer the listing carries
    assert_eq!((r.ok, r.readings), (3, 9), "{r:?}");
    assert_eq!(requests(&w, "v3").await - before, 3, "one page per vehicle");
    assert_eq!(poller.calls_this_month(first), 1);
    w.stop.cancel();
}

/// Issue 8: the health loop keeps its last walk of the fleet while nothing moves, yet what
/// `/healthz` says still follows the clock (a vehicle turning stale) and every change (a
/// poll answered, a pause adopted from the store, a vehicle removed).
#[tokio::test]
async fn a_health_check_reuses_its_walk_only_while_nothing_moves() {
    use carpulse::daemon::health::HealthCheck;
    use carpulse::daemon::metrics::Health;
    let w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    let metrics = Metrics::new().unwrap();
    // Per-vehicle series age with the clock and are walked every time; a fleet too large for
    // them is what the reuse is for.
    metrics.set_per_vehicle(false);
    let tokens = tokens_for(&w, &metrics).await;
    let (poller, _) = poller_for(&w, "v3", &connected).await;
    let health = Health::default();
    let problems = || health.lock().unwrap().problems.clone();
    let stale_after = Duration::from_millis(1500);
    let mut check = HealthCheck::new(carpulse::domain::now_ms());

    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(report.ok, 3, "{report:?}");
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert!(problems().is_empty(), "{:?}", problems());
    assert_eq!(check.walks(), 1);
    // Nothing moved: the walk is reused, and the answer is the same.
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert!(problems().is_empty(), "{:?}", problems());
    assert_eq!(
        check.walks(),
        1,
        "nothing changed, yet the fleet was walked"
    );

    // Only time moves: the vehicles still turn stale, each from a walk at the moment the next
    // one does (three answers a few ms apart usually share one check; under a loaded machine
    // they may not), and no walk in between.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut checks = 0;
    while problems().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no vehicle turned stale: {:?}",
            problems()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        check
            .check(&health, &tokens, &poller, &metrics, stale_after)
            .await;
        checks += 1;
    }
    assert!(
        problems().iter().all(|p| p.contains("no answered poll")),
        "{:?}",
        problems()
    );
    let walked = check.walks() - 1;
    assert!(
        (1..=3).contains(&walked) && checks >= 10,
        "walked {walked} times in {checks} checks: only when a vehicle turned stale"
    );

    // A poll answered: walked again, healthy again.
    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(report.ok, 3, "{report:?}");
    let before = check.walks();
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert!(problems().is_empty(), "{:?}", problems());
    assert_eq!(check.walks(), before + 1);

    // A pause the store holds (what a reload adopts), without any poll: the state counts it.
    let (first, _) = &connected.vehicles[0];
    let blocks = [(
        first.clone(),
        vec![(
            carpulse::domain::BlockScope::Vehicle,
            "BILLING:VEHICLE_LIMIT".to_string(),
        )],
    )]
    .into();
    poller.adopt_blocks(&blocks, &Default::default(), carpulse::domain::now_ms());
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert_eq!(check.walks(), before + 2);
    assert!(
        metrics
            .render()
            .contains("carpulse_vehicles{state=\"paused\"} 1"),
        "{}",
        metrics.render()
    );
    // The same blocks adopted again (the next reload): nothing moved.
    poller.adopt_blocks(&blocks, &Default::default(), carpulse::domain::now_ms());
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert_eq!(check.walks(), before + 2);

    // A vehicle removed (a reload's new vehicle set): walked again.
    poller.set_vehicles(
        connected.vehicles[1..]
            .iter()
            .map(|(id, _)| PolledVehicle {
                id: id.clone(),
                connection: connected.connection,
            })
            .collect(),
    );
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert_eq!(check.walks(), before + 3);
    assert!(
        metrics
            .render()
            .contains("carpulse_vehicles{state=\"paused\"} 0"),
        "{}",
        metrics.render()
    );
    w.stop.cancel();
}

/// Issue 8: with per-vehicle series on, the health check reuses its walk too, because it sets
/// no reading age: `carpulse_reading_age_seconds` is written at each scrape from the reading
/// times, so it grows with the clock with neither a check nor a poll. Switching the series off
/// and on again walks again, and brings back what the walk sets and the poller's ages.
#[tokio::test]
async fn with_per_vehicle_series_the_walk_is_reused_and_ages_are_as_of_each_scrape() {
    use carpulse::daemon::health::HealthCheck;
    use carpulse::daemon::metrics::Health;
    let w = world("v3", Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    // The poller's metrics, as the daemon has one set for everything.
    let (poller, metrics) = poller_for(&w, "v3", &connected).await;
    assert!(metrics.per_vehicle());
    let tokens = tokens_for(&w, &metrics).await;
    let health = Health::default();
    let mut check = HealthCheck::new(carpulse::domain::now_ms());
    let stale_after = Duration::from_secs(3600);
    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(report.ok, 3, "{report:?}");
    for _ in 0..3 {
        check
            .check(&health, &tokens, &poller, &metrics, stale_after)
            .await;
    }
    assert_eq!(check.walks(), 1, "nothing moved but the clock");
    assert!(health.lock().unwrap().problems.is_empty());

    let ages = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with("carpulse_reading_age_seconds{"))
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                Some((series.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    let now = carpulse::domain::now_ms();
    let (a, b) = (
        ages(&metrics.render_at(now)),
        ages(&metrics.render_at(now + 60_000)),
    );
    assert_eq!(a.len(), 9, "battery, charge, odometer of 3 vehicles: {a:?}");
    assert_eq!(a.len(), b.len());
    for ((series, a), (same, b)) in a.iter().zip(&b) {
        assert_eq!(series, same);
        assert!((b - a - 60.0).abs() < 1e-6, "{series}: {a} -> {b}");
    }
    let billed = |m: &Metrics| {
        m.render()
            .matches("carpulse_smartcar_calls_billed{vehicle_id=")
            .count()
    };
    assert_eq!(billed(&metrics), 3);

    // Off drops every per-vehicle series; on again, the next check walks and sets its own
    // again, and the ages the poller saw are written again.
    metrics.set_per_vehicle(false);
    assert!(ages(&metrics.render()).is_empty());
    metrics.set_per_vehicle(true);
    check
        .check(&health, &tokens, &poller, &metrics, stale_after)
        .await;
    assert_eq!(check.walks(), 2);
    assert_eq!(billed(&metrics), 3);
    assert_eq!(ages(&metrics.render()).len(), 9);
    w.stop.cancel();
}
