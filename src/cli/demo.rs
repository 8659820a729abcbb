//! `carpulse demo`: the whole product in one process with no Smartcar account. It starts the
//! built-in simulator on loopback, runs the Connect flow against it for every simulated user
//! (following the authorize URL itself instead of a browser), then runs the daemon on a local
//! SQLite file with a fast schedule, until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{
    Config, MetricsConfig, Mode, PollConfig, ScheduleConfig, SmartcarConfig, StoreConfig,
    DEFAULT_SCOPE,
};
use crate::daemon::Daemon;
use crate::domain::{ApiVersion, Secret, UnitSystem};
use crate::simulator::{self, SimulatorConfig};
use crate::store::Store;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The SQLite file the demo writes (kept between runs; delete it to start over).
    #[arg(long, default_value = "carpulse-demo.db")]
    pub db: PathBuf,
    /// Vehicle API to speak: v3 (signals) or v2.
    #[arg(long, default_value = "v3", value_parser = ["v2", "v3"])]
    pub api: String,
    /// Simulated Smartcar accounts (each is one Connect).
    #[arg(long, default_value_t = 2)]
    pub users: usize,
    /// Simulated vehicles per account.
    #[arg(long, default_value_t = 2)]
    pub vehicles_per_user: usize,
    /// Metrics address; when it is taken, a free port is used instead.
    #[arg(long, default_value = "127.0.0.1:9841")]
    pub metrics: SocketAddr,
    /// Battery + charge schedule (cron with seconds).
    #[arg(long, default_value = "*/10 * * * * *")]
    pub battery_cron: String,
    /// Info schedule (cron with seconds).
    #[arg(long, default_value = "0 * * * * *")]
    pub info_cron: String,
    /// Access-token lifetime the simulator grants, in seconds (short, to show refreshes); the
    /// application token of API Authentication lives this long too.
    #[arg(long, default_value_t = 120)]
    pub token_lifetime: u64,
    /// v3 authentication: `app` (API Authentication: one application token plus sc-user-id,
    /// no refresh token stored, no v2.0 call; the simulator refuses per-user tokens on /v3) or
    /// `user` (per-user Connect tokens). Ignored with `--api v2`.
    #[arg(long, default_value = "app", value_parser = ["app", "user"])]
    pub auth: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    crate::daemon::signals::spawn_handler(shutdown.clone())
        .context("installing signal handlers")?;

    let app_auth = args.api == "v3" && args.auth == "app";
    let sim_cfg = SimulatorConfig {
        users: args.users.max(1),
        vehicles_per_user: args.vehicles_per_user.max(1),
        access_token_lifetime: Duration::from_secs(args.token_lifetime.max(10)),
        app_token_lifetime: Duration::from_secs(args.token_lifetime.max(10)),
        // As Smartcar documents v3 now: the simulator refuses what API Authentication does not
        // send, so the demo shows the real thing.
        v3_auth: if app_auth {
            simulator::V3Auth::App
        } else {
            simulator::V3Auth::Both
        },
        ..SimulatorConfig::default()
    };
    let sim_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the simulator")?;
    let sim_addr = sim_listener.local_addr()?;
    let sim_stop = shutdown.child_token();
    let sim_task = tokio::spawn(simulator::serve(sim_listener, sim_cfg.clone(), sim_stop));
    info!(simulator = %format!("http://{sim_addr}"), "simulator started");

    let metrics_listen = match std::net::TcpListener::bind(args.metrics) {
        Ok(l) => l.local_addr()?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let callback = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the Connect callback")?;
    let base = format!("http://{sim_addr}");
    let cron = |key: &str, expr: &str| {
        crate::config::Cron::parse(expr).map_err(|e| anyhow::anyhow!("{key} {expr:?}: {e}"))
    };
    let config = Config {
        source: None,
        smartcar: SmartcarConfig {
            client_id: sim_cfg.client_id.clone(),
            client_secret: Secret::new(sim_cfg.client_secret.clone()),
            redirect_uri: format!("http://{}/exchange", callback.local_addr()?),
            mode: Mode::Simulated,
            api: if args.api == "v2" {
                ApiVersion::V2
            } else {
                ApiVersion::V3
            },
            scope: DEFAULT_SCOPE.iter().map(|s| s.to_string()).collect(),
            unit_system: UnitSystem::Metric,
            connect_url: format!("{base}/oauth/authorize"),
            token_url: format!("{base}/oauth/token"),
            api_v2_url: format!("{base}/v2.0"),
            api_v3_url: format!("{base}/v3"),
            v3_page_size: None,
            api_credentials: app_auth.then(|| crate::smartcar::iam::AppCredentials {
                client_id: sim_cfg.api_client_id.clone(),
                client_secret: Secret::new(sim_cfg.api_client_secret.clone()),
                iam_url: format!("{base}/oauth2/token"),
            }),
        },
        store: StoreConfig {
            path: args.db.clone(),
        },
        metrics: MetricsConfig {
            listen: metrics_listen,
            per_vehicle_max: crate::config::DEFAULT_PER_VEHICLE_MAX,
            stale_after: Duration::from_secs(120),
            web_config_file: None,
        },
        schedule: ScheduleConfig {
            battery: cron("--battery-cron", &args.battery_cron)?,
            battery_charging: None,
            info: cron("--info-cron", &args.info_cron)?,
            refresh_margin: Duration::from_secs(600),
            discover_every: crate::config::DEFAULT_DISCOVER_EVERY,
            no_data_every: crate::config::DEFAULT_NO_DATA_EVERY,
            spread: None,
            poll_at_start: true,
        },
        poll: PollConfig {
            concurrency: 8,
            max_in_flight: crate::config::DEFAULT_MAX_IN_FLIGHT,
            timeout: Duration::from_secs(30),
        },
        budget: Default::default(),
        retention: Default::default(),
        backup: crate::config::BackupConfig {
            schedule: None,
            keep: crate::config::DEFAULT_BACKUP_KEEP,
            dir: args
                .db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .join("backups"),
        },
    };

    connect_all(&config, callback, sim_cfg.users).await?;

    let daemon = Daemon::build(config).await?;
    let addr = daemon.metrics_addr()?;
    println!(
        "carpulse demo: {} simulated vehicle(s), API {}{}",
        sim_cfg.users * sim_cfg.vehicles_per_user,
        args.api,
        if app_auth {
            " with API Authentication"
        } else {
            ""
        }
    );
    println!("metrics: http://{addr}/metrics");
    println!(
        "history: carpulse history --db {0}   (or: sqlite3 {0} \"SELECT vehicle_id, datetime(time, 'unixepoch'), soc_percent, range_km FROM battery_history ORDER BY recorded_at DESC LIMIT 10\")",
        args.db.display()
    );
    println!("stop with Ctrl-C");
    let result = daemon.run_until_stopped(shutdown.clone()).await;
    shutdown.cancel();
    let _ = sim_task.await;
    result
}

/// One Connect per simulated user; the demo plays the browser.
async fn connect_all(config: &Config, callback: TcpListener, users: usize) -> anyhow::Result<()> {
    let store = Store::open(&config.store.path, None)
        .with_context(|| format!("opening the store {}", config.store.path.display()))?;
    let browser = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the demo's HTTP client")?;
    let mut first = Some(callback);
    for _ in 0..users {
        // A fresh callback port per Connect, so no listener has to be re-bound while the last
        // one is still closing.
        let l = match first.take() {
            Some(l) => l,
            None => TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the Connect callback")?,
        };
        let mut config = config.clone();
        config.smartcar.redirect_uri = format!("http://{}/exchange", l.local_addr()?);
        let config = &config;
        let b = browser.clone();
        let connected = crate::cli::connect::run(
            config,
            &store,
            vec![l],
            move |url| {
                let url = url.to_string();
                // Follows the simulator's 302 to our callback, as a browser would.
                tokio::spawn(async move {
                    if let Err(e) = b.get(&url).send().await {
                        tracing::error!(error = %e, "demo browser: following the Connect URL failed");
                    }
                });
            },
            Duration::from_secs(30),
        )
        .await?;
        print!("{}", crate::cli::connect::describe(&connected));
    }
    store.close().await?;
    Ok(())
}
