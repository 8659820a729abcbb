//! `carpulse simulator`: a Smartcar look-alike on loopback, so that carpulse (and its users,
//! CI and benchmarks) can run every path offline, as Smartcar's own Vehicle Simulator lets
//! people try the API without a car. It serves Connect (`/oauth/authorize`, auto-approving),
//! the token endpoint (`/oauth/token`) and Vehicle API v2.0 (`/v2.0`) and v3 (`/v3`) for
//! simulated users whose battery-electric cars park, drive and charge in simulated time. It
//! counts what clients did wrong (expired or unknown tokens, invalidated refresh tokens, no
//! `sc-unit-system`) and serves those counters and what it served under `/_simulator/`.

pub mod errors;
pub mod fleet;
pub mod oauth;
pub mod state;
pub mod v2;
pub mod v3;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use state::Sim;

#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    pub client_id: String,
    pub client_secret: String,
    pub users: usize,
    pub vehicles_per_user: usize,
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    /// How long a used refresh token is still accepted (Smartcar: 1 or 10 minutes; docs differ).
    pub refresh_grace: Duration,
    /// How often a simulated car reports new data.
    pub report_interval: Duration,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    pub seed: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            client_id: "carpulse-demo".into(),
            client_secret: "carpulse-demo-secret".into(),
            users: 1,
            vehicles_per_user: 2,
            access_token_lifetime: Duration::from_secs(7200),
            refresh_token_lifetime: Duration::from_secs(60 * 24 * 3600),
            refresh_grace: Duration::from_secs(60),
            report_interval: Duration::from_secs(5),
            time_scale: 60.0,
            seed: 1,
        }
    }
}

/// The simulator's routes over its state (public so tests can mount it on their own listener).
pub fn router(cfg: SimulatorConfig) -> Router {
    let sim = Arc::new(Sim::new(cfg));
    Router::new()
        .route("/oauth/authorize", get(oauth::authorize))
        .route("/oauth/token", post(oauth::token))
        .route("/v2.0/user", get(v2::user))
        .route("/v2.0/vehicles", get(v2::vehicles))
        .route("/v2.0/vehicles/{id}", get(v2::info))
        .route("/v2.0/vehicles/{id}/batch", post(v2::batch))
        .route("/v2.0/vehicles/{id}/{*rest}", get(v2::path))
        .route("/v3/vehicles/{id}", get(v3::vehicle))
        .route("/v3/vehicles/{id}/signals", get(v3::list))
        .route("/v3/vehicles/{id}/signals/{code}", get(v3::one))
        .route("/_simulator/stats", get(stats))
        .route("/_simulator/vehicles", get(vehicles))
        .route("/_simulator/served", get(served))
        .fallback(not_found)
        .with_state(sim)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    cfg: SimulatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, users = cfg.users, vehicles_per_user = cfg.vehicles_per_user, "simulator serving");
    axum::serve(listener, router(cfg))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("simulator server")
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/v3") {
        errors::v3(
            404,
            "RESOURCE_NOT_FOUND",
            Some("PATH"),
            "Not Found",
            "The requested resource does not exist.",
        )
    } else {
        errors::v2(
            404,
            "RESOURCE_NOT_FOUND",
            Some("PATH"),
            "The requested resource does not exist.",
        )
    }
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.stats.to_json()).into_response()
}

async fn vehicles(State(sim): State<Arc<Sim>>) -> Response {
    let users: Vec<serde_json::Value> = sim
        .fleet
        .users
        .iter()
        .map(|u| {
            let vs: Vec<serde_json::Value> = u
                .vehicles
                .iter()
                .map(|&v| {
                    let v = &sim.fleet.vehicles[v];
                    serde_json::json!({"id": v.id, "vin": v.vin, "make": v.make, "model": v.model, "year": v.year})
                })
                .collect();
            serde_json::json!({"id": u.id, "vehicles": vs})
        })
        .collect();
    Json(serde_json::json!({ "users": users })).into_response()
}

async fn served(State(sim): State<Arc<Sim>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(&v) = q.get("vehicle_id").and_then(|id| sim.fleet.by_id.get(id)) else {
        return (StatusCode::NOT_FOUND, "unknown vehicle_id\n").into_response();
    };
    let Ok(logs) = sim.served.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match logs.get(&v) {
        Some(log) => Json(log).into_response(),
        None => {
            Json(serde_json::json!({"battery": [], "charge": [], "odometer": []})).into_response()
        }
    }
}

/// `carpulse simulator` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulatorArgs {
    /// Address to listen on (port 0 picks a free one; the real address is printed).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The client id the token endpoint and Connect accept.
    #[arg(long, default_value = "carpulse-demo")]
    pub client_id: String,
    /// The client secret the token endpoint accepts (Basic auth).
    #[arg(long, default_value = "carpulse-demo-secret")]
    pub client_secret: String,
    /// Simulated Smartcar accounts; each Connect picks the next one (or `&user=N`).
    #[arg(long, default_value_t = 1)]
    pub users: usize,
    /// Vehicles per account.
    #[arg(long, default_value_t = 2)]
    pub vehicles_per_user: usize,
    /// Access-token lifetime in seconds (Smartcar: 7200).
    #[arg(long, default_value_t = 7200)]
    pub token_lifetime: u64,
    /// Seconds a used refresh token is still accepted (Smartcar's docs say 60 or 600).
    #[arg(long, default_value_t = 60)]
    pub refresh_grace: u64,
    /// Seconds between a simulated car's data reports (`sc-data-age` changes only then).
    #[arg(long, default_value_t = 5)]
    pub report_interval: u64,
    /// Simulated seconds per real second (60: a simulated day in 24 minutes).
    #[arg(long, default_value_t = 60.0)]
    pub time_scale: f64,
    /// Seed of the users, vehicles and their ids (the same seed gives the same fleet).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl SimulatorArgs {
    pub fn to_config(&self) -> SimulatorConfig {
        SimulatorConfig {
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            users: self.users,
            vehicles_per_user: self.vehicles_per_user,
            access_token_lifetime: Duration::from_secs(self.token_lifetime),
            refresh_token_lifetime: SimulatorConfig::default().refresh_token_lifetime,
            refresh_grace: Duration::from_secs(self.refresh_grace),
            report_interval: Duration::from_secs(self.report_interval.max(1)),
            time_scale: self.time_scale,
            seed: self.seed,
        }
    }
}

/// Binds, prints the address and the config lines to use, serves until shutdown.
pub async fn run_cli(args: SimulatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let mut out = std::io::stdout().lock();
    writeln!(out, "carpulse simulator listening on {base}")?;
    writeln!(
        out,
        "config for carpulse:\n  client_id = \"{}\"\n  client_secret = \"{}\"\n  mode = \"simulated\"\n  \
         connect_url = \"{base}/oauth/authorize\"\n  token_url = \"{base}/oauth/token\"\n  \
         api_v2_url = \"{base}/v2.0\"\n  api_v3_url = \"{base}/v3\"",
        args.client_id, args.client_secret
    )?;
    out.flush()?;
    drop(out);
    serve(listener, args.to_config(), shutdown).await
}
