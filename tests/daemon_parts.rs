//! The daemon's parts in-process against the real simulator on loopback and a real SQLite file:
//! connect through the library, one poll cycle per job, token refresh persisted before use.

use std::time::Duration;

use carpulse::config::{Config, Env};
use carpulse::domain::{ApiVersion, ConnectionStatus, Secret, TokenPair};
use carpulse::metrics::Metrics;
use carpulse::poller::{PolledVehicle, Poller};
use carpulse::simulator::{self, SimulatorConfig};
use carpulse::smartcar::{Job, SmartcarClient};
use carpulse::store::{queries, Store};
use carpulse::tokens::TokenManager;
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
    let sim_cfg = SimulatorConfig {
        client_id: "parts-client".into(),
        client_secret: "parts-secret".into(),
        users: 1,
        vehicles_per_user: 3,
        access_token_lifetime: token_lifetime,
        report_interval: Duration::from_secs(1),
        ..SimulatorConfig::default()
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
    let client = SmartcarClient::new(carpulse::app::client_config(&config)).unwrap();
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
async fn connect(w: &World) -> carpulse::connect::Connected {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = w.config.clone();
    cfg.smartcar.redirect_uri = format!("http://{}/exchange", listener.local_addr().unwrap());
    carpulse::connect::run(
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

async fn poll_cycle_stores_every_vehicle(api: &str) {
    let w = world(api, Duration::from_secs(7200)).await;
    let connected = connect(&w).await;
    assert_eq!(connected.vehicles.len(), 3);
    assert!(connected.vehicles.iter().all(|(_, info)| info.is_some()));

    let metrics = Metrics::new().unwrap();
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
        2,
        Duration::from_secs(10),
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
    let report = poller.cycle(Job::Battery, CancellationToken::new()).await;
    assert_eq!(
        (report.vehicles, report.ok, report.failed),
        (3, 3, 0),
        "{report:?}"
    );
    assert_eq!(report.readings, 6, "battery + charge per vehicle");
    let report = poller.cycle(Job::Info, CancellationToken::new()).await;
    assert_eq!((report.ok, report.failed), (3, 0), "{report:?}");
    assert_eq!(report.readings, 3, "one odometer reading per vehicle");
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
    assert!(
        text.contains("carpulse_polls_total{endpoint=\"battery\",outcome=\"ok\"} 3"),
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

    let stats: serde_json::Value = reqwest::get(format!("{}/_simulator/stats", w.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["invalidated_refresh_token_uses"], 0, "{stats}");
    w.stop.cancel();
}
