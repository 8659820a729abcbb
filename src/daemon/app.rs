//! Wiring and lifecycle of `carpulse run`: build binds and loads everything (so a test or the
//! demo learns the metrics address before anything runs), `run_until_stopped` serves until the
//! shutdown token fires, then stops scheduling, drains in-flight polls within a grace period,
//! flushes the writer and returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ScheduleConfig};
use crate::daemon::cycles::Cycles;
use crate::daemon::metrics::{self, Health, Metrics};
use crate::daemon::poller::{PolledVehicle, Poller};
use crate::daemon::supervisor::Supervisor;
use crate::daemon::tokens::TokenManager;
use crate::domain::ConnectionStatus;
use crate::smartcar::{ClientConfig, SmartcarClient};
use crate::store::{queries, Store, WriteObserver, WriteReport};

/// How long in-flight polls may run on after a stop request before they are abandoned.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the token manager may take at shutdown: a refresh in flight (bounded at 25 s),
/// then one last save of the pairs the store refused and the fallback file.
const TOKENS_STOP_GRACE: Duration = Duration::from_secs(45);

pub struct Daemon {
    config: Config,
    store: Store,
    metrics: Metrics,
    health: Health,
    tokens: Arc<TokenManager>,
    poller: Arc<Poller>,
    listener: TcpListener,
    client: SmartcarClient,
    /// The application token, with v3 API Authentication.
    app: Option<Arc<crate::daemon::app_token::AppAuth>>,
    /// TLS and basic auth of the metrics listener (`metrics.web_config_file`).
    web: Option<Arc<crate::daemon::webconfig::WebConfig>>,
    /// One daemon per store: held until the store is closed.
    lock: crate::store::lock::DaemonLock,
}

/// The Smartcar client settings a config implies.
pub fn client_config(cfg: &Config) -> ClientConfig {
    let sc = &cfg.smartcar;
    ClientConfig {
        client_id: sc.client_id.clone(),
        client_secret: sc.client_secret.clone(),
        redirect_uri: sc.redirect_uri.clone(),
        token_url: sc.token_url.clone(),
        api_v2_url: sc.api_v2_url.clone(),
        api_v3_url: sc.api_v3_url.clone(),
        unit_system: sc.unit_system,
        timeout: cfg.poll.timeout,
        v3_page_size: sc.v3_page_size,
        max_in_flight: cfg.poll.max_in_flight,
    }
}

/// Feeds the row counters from the writer's reports.
fn write_observer(metrics: &Metrics) -> WriteObserver {
    let m = metrics.clone();
    Arc::new(move |r: &WriteReport| {
        for (table, n) in &r.written {
            m.rows_written.with_label_values(&[table]).inc_by(*n);
        }
        for (table, n) in &r.duplicates {
            m.rows_duplicate.with_label_values(&[table]).inc_by(*n);
        }
        for (table, n) in &r.dropped {
            m.rows_dropped.with_label_values(&[table]).inc_by(*n);
        }
    })
}

impl Daemon {
    /// Opens the store, loads connections and vehicles, binds the metrics listener.
    pub async fn build(config: Config) -> anyhow::Result<Daemon> {
        // First: a broken web config is a config error (exit 78) before anything is opened.
        let web = match &config.metrics.web_config_file {
            Some(path) => Some(Arc::new(
                crate::daemon::webconfig::WebConfig::load(path).map_err(|e| {
                    crate::config::ConfigError(format!("metrics.web_config_file: {e}"))
                })?,
            )),
            None => None,
        };
        let metrics = Metrics::new().context("creating the metrics registry")?;
        metrics.set_api(config.smartcar.api);
        // Before the store is opened (a second daemon must not migrate or write it): another
        // `carpulse run` on this store is exit 75 naming its pid; a lock file that cannot be
        // made is the store's failure (73).
        let lock = crate::store::lock::DaemonLock::acquire(&config.store.path).map_err(|e| {
            if e.is::<crate::store::lock::AlreadyRunning>() {
                e
            } else {
                e.context(crate::exit::Permanent::Store {
                    path: config.store.path.clone(),
                })
            }
        })?;
        // The error names the file itself (and carries exit code 73).
        let store = Store::open(&config.store.path, Some(write_observer(&metrics)))?;
        let client =
            SmartcarClient::new(client_config(&config)).context("creating the Smartcar client")?;
        let m = metrics.clone();
        client.observe_requests(Arc::new(move |api, outcome, seconds| {
            m.request(api, outcome, seconds)
        }));
        let m = metrics.clone();
        client.observe_decode_errors(Arc::new(move |endpoint| m.decode_error(endpoint)));
        let app = match (&config.smartcar.api_credentials, config.smartcar.app_auth()) {
            (Some(creds), true) => Some(Arc::new(crate::daemon::app_token::AppAuth::new(
                client.clone(),
                creds.clone(),
                metrics.clone(),
            ))),
            _ => None,
        };
        let tokens = match &app {
            Some(app) => TokenManager::with_app_auth(
                store.clone(),
                client.clone(),
                metrics.clone(),
                config.schedule.refresh_margin,
                app.clone(),
            ),
            None => TokenManager::new(
                store.clone(),
                client.clone(),
                metrics.clone(),
                config.schedule.refresh_margin,
            ),
        };
        let poller = Poller::new(
            config.smartcar.api,
            client.clone(),
            tokens.clone(),
            store.clone(),
            metrics.clone(),
            &config.poll,
        );
        poller.set_no_data_every(config.schedule.no_data_every);
        let listener = TcpListener::bind(config.metrics.listen).await.context(
            crate::exit::Permanent::Listener {
                addr: config.metrics.listen,
            },
        )?;
        let daemon = Daemon {
            config,
            store,
            metrics,
            health: Health::default(),
            tokens,
            poller,
            listener,
            client,
            app,
            web,
            lock,
        };
        daemon.load().await?;
        load_ledger(
            &daemon.store,
            &daemon.poller,
            daemon.config.smartcar.api,
            daemon.config.budget.calls_per_vehicle_month,
        )
        .await?;
        Ok(daemon)
    }

    /// (Re)loads connections and enabled vehicles from the store.
    async fn load(&self) -> anyhow::Result<()> {
        let connections = self
            .store
            .call(|c| queries::load_connections(c))
            .await
            .context("loading connections")?;
        let vehicles = self
            .store
            .call(|c| queries::load_vehicles(c))
            .await
            .context("loading vehicles")?;
        let app_auth = self.tokens.app_auth();
        let holds: std::collections::HashMap<_, _> = connections
            .iter()
            .map(|c| (c.id, connection_hold(c.status, &c.user_id, app_auth)))
            .collect();
        let active = unheld(&holds);
        let n_connections = connections.len();
        let needs_reauth = holds
            .values()
            .filter(|h| **h == Some("needs_reauth"))
            .count();
        self.poller.set_held(held_vehicles(&vehicles, &holds));
        self.metrics.set_fleet(&fleet_states(&vehicles, &holds));
        let polled: Vec<PolledVehicle> = vehicles
            .iter()
            .filter(|v| v.enabled && active.contains(&v.connection_id))
            .map(|v| PolledVehicle {
                id: v.vehicle_id.clone(),
                connection: v.connection_id,
            })
            .collect();
        self.tokens.load(connections);
        // Decided before the info series are recorded: for a fleet over the limit they were
        // built for every vehicle and then reset, and the map that tracked them kept its
        // capacity (2.2 MiB at 10,000 vehicles, heaptrack: BENCHMARKS.md).
        let per_vehicle = polled.len() <= self.config.metrics.per_vehicle_max;
        if !per_vehicle {
            info!(
                vehicles = polled.len(),
                per_vehicle_max = self.config.metrics.per_vehicle_max,
                "per-vehicle metrics are off for a fleet this size (metrics.per_vehicle); totals are exported"
            );
        }
        self.metrics.set_per_vehicle(per_vehicle);
        for v in vehicles.iter() {
            if let (Some(make), Some(model), Some(year)) = (&v.make, &v.model, v.year) {
                self.metrics.record_info(
                    &v.vehicle_id,
                    &crate::domain::VehicleInfo {
                        make: make.clone(),
                        model: model.clone(),
                        year,
                    },
                );
            }
        }
        drop(vehicles);
        // With a catch-up at start, it seeds them from the summaries it reads anyway (reading
        // them twice on the one store thread put ~0.25 s before the first poll at 10,000
        // vehicles: BENCHMARKS.md).
        if per_vehicle && !self.config.schedule.poll_at_start {
            seed_metrics(&self.store, &self.metrics).await;
        }
        if needs_reauth > 0 {
            warn!(
                needs_reauth,
                "some connections need re-authorization: run `carpulse reauth VEHICLE` (or `carpulse connect`) for them"
            );
        }
        if polled.is_empty() {
            warn!("no vehicles to poll: run `carpulse connect` to add a Smartcar account");
        }
        info!(
            connections = n_connections,
            vehicles = polled.len(),
            "loaded the store"
        );
        self.poller.set_vehicles(polled);
        adopt_stored_blocks(&self.store, &self.poller).await?;
        Ok(())
    }

    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Polls now without serving (`carpulse poll` when no daemon runs), then closes the store.
    pub async fn poll_now(
        self,
        req: &crate::daemon::control::PollRequest,
    ) -> anyhow::Result<Vec<crate::daemon::control::PollResult>> {
        let api = self.config.smartcar.api;
        let Daemon { store, poller, .. } = self;
        let results =
            crate::daemon::control::poll_now(&poller, &store, api, req, CancellationToken::new())
                .await;
        drop(poller);
        store.close().await.context("flushing the store")?;
        results
    }

    /// Serves until `shutdown` is cancelled; returns after the writer is flushed.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Daemon {
            config,
            store,
            metrics,
            health,
            tokens,
            poller,
            listener,
            client,
            app,
            web,
            lock,
        } = self;
        announce(&listener, web.as_deref(), &config)?;
        let s = Shared {
            live: Arc::new(std::sync::RwLock::new(config.clone())),
            store: store.clone(),
            metrics: metrics.clone(),
            tokens: tokens.clone(),
            poller: poller.clone(),
            shutdown: shutdown.clone(),
            reloaded: Arc::default(),
        };
        let (mut services, mut schedule_rx) =
            Services::start(&s, &config, listener, web, health, client, app)?;
        let (api, m) = (config.smartcar.api, metrics.clone());
        let mut cycles = Cycles::start(poller.clone(), api, m, &config.schedule).await?;
        if config.schedule.poll_at_start {
            cycles.catch_up(store.clone(), &config.schedule);
        }
        crate::daemon::sdnotify::notify("READY=1");
        let failure = tokio::select! {
            // First: every task ends once shutdown is signalled, and that end is no failure.
            biased;
            _ = shutdown.cancelled() => None,
            why = services.tasks.first_end() => Some(why),
            e = cycles.dispatch(&mut schedule_rx) => Some(format!("{e:#}")),
        };
        shutdown.cancel();
        crate::daemon::sdnotify::notify("STOPPING=1");
        info!("stopping: no new polls; waiting for in-flight ones");
        cycles.drain(SHUTDOWN_GRACE).await;
        let lost = services.stop(&tokens).await;
        // The last store handles, so that close() also stops the owner thread (WAL checkpoint).
        drop((s, poller, tokens));
        store.close().await.context("flushing the store")?;
        drop(lock); // only now may another daemon take the store
        if lost > 0 {
            anyhow::bail!("{lost} rotated token pair(s) could be saved neither in the store nor in the fallback file beside it; see the log above");
        }
        info!("stopped");
        match failure {
            Some(why) => anyhow::bail!("a daemon task failed: {why}"),
            None => Ok(()),
        }
    }
}

/// How long the background tasks get to stop after the polls have.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The daemon's long-running parts besides the polls: supervised tasks (the metrics listener,
/// store maintenance, the health check, the connections check, the reload loop, the
/// watchdog), the capability reads the reloads start, and the token manager, which is kept
/// apart because at shutdown it finishes a refresh in flight, saves what the store refused or
/// writes the fallback file, and is given longer for it.
struct Services {
    tasks: Supervisor,
    discoveries: TaskTracker,
    token_task: TaskTracker,
}

impl Services {
    /// Starts them all; returns where SIGHUP's new schedules arrive.
    fn start(
        s: &Shared,
        config: &Config,
        listener: TcpListener,
        web: Option<Arc<crate::daemon::webconfig::WebConfig>>,
        health: Health,
        client: SmartcarClient,
        app: Option<Arc<crate::daemon::app_token::AppAuth>>,
    ) -> anyhow::Result<(Services, tokio::sync::mpsc::Receiver<ScheduleConfig>)> {
        let mut tasks = Supervisor::new();
        // `POST /poll` (carpulse poll), behind the same web config as /metrics.
        let control = crate::daemon::control::router(
            s.poller.clone(),
            s.store.clone(),
            config.smartcar.api,
            web.as_ref().is_some_and(|w| w.basic_auth()),
            s.shutdown.clone(),
        );
        let (m, h, stop) = (s.metrics.clone(), health.clone(), s.shutdown.clone());
        tasks.spawn("the metrics listener", async move {
            let served = metrics::serve_with(listener, m, h, web, control, stop).await;
            served.context("serving /metrics")
        });
        let token_task = TaskTracker::new();
        token_task.spawn(s.tokens.clone().run(s.shutdown.clone()));
        token_task.close();
        let (st, cfg, stop) = (s.store.clone(), config.clone(), s.shutdown.clone());
        tasks.spawn("store maintenance", async move {
            crate::daemon::maintenance::run(st, cfg, stop).await;
            Ok(())
        });
        tasks.spawn("the health check", health_loop(s.clone(), health));
        let sync_now = Arc::new(tokio::sync::Notify::new());
        if let Some(app) = app {
            let sync = connections_loop(s.clone(), client, app, sync_now.clone());
            tasks.spawn("the connections check", sync);
        }
        let reload_now = Arc::new(tokio::sync::Notify::new());
        crate::daemon::signals::spawn_reload_handler(reload_now.clone(), s.shutdown.clone())
            .context("installing the SIGHUP handler")?;
        let (schedule_tx, schedule_rx) = tokio::sync::mpsc::channel::<ScheduleConfig>(1);
        let discoveries = TaskTracker::new();
        let reloads = reload_loop(
            s.clone(),
            reload_now,
            sync_now,
            schedule_tx,
            discoveries.clone(),
        );
        tasks.spawn("the reload loop", reloads);
        if let Some(every) = crate::daemon::sdnotify::watchdog_interval() {
            tasks.spawn("the watchdog", watchdog(every, s.shutdown.clone()));
        }
        let services = Services {
            tasks,
            discoveries,
            token_task,
        };
        Ok((services, schedule_rx))
    }

    /// Stops everything, each within its grace (refreshes in flight get up to 25 s, see
    /// tokens.rs; past the bounds, leave rather than be killed by systemd mid-flush). Returns
    /// how many rotated pairs could be saved nowhere.
    async fn stop(self, tokens: &TokenManager) -> usize {
        let Services {
            tasks,
            discoveries,
            token_task,
        } = self;
        discoveries.close();
        let others = async {
            let _ = tokio::time::timeout(STOP_GRACE, discoveries.wait()).await;
            tasks.stop(STOP_GRACE).await;
        };
        let token_manager = tokio::time::timeout(TOKENS_STOP_GRACE, token_task.wait());
        let ((), token_manager) = tokio::join!(others, token_manager);
        if token_manager.is_ok() {
            return tokens.lost_pairs();
        }
        let unsaved = tokens.unsaved_count();
        tracing::error!(
            unsaved,
            grace_s = TOKENS_STOP_GRACE.as_secs(),
            "the token manager did not finish its last save in time; rotated pairs only in memory are lost"
        );
        unsaved
    }
}

/// What the daemon's tasks share.
#[derive(Clone)]
struct Shared {
    /// The config as last (re)loaded: SIGHUP swaps it, the tasks read it when they run. A std
    /// lock, held only to copy a value out.
    live: Arc<std::sync::RwLock<Config>>,
    store: Store,
    metrics: Metrics,
    tokens: Arc<TokenManager>,
    poller: Arc<Poller>,
    shutdown: CancellationToken,
    /// A std lock, held to compare or set a value.
    reloaded: Arc<std::sync::Mutex<Reloads>>,
}

/// What the last whole periodic reload read, and how many reloads on demand there were.
#[derive(Debug, Default)]
struct Reloads {
    on_demand: u64,
    /// The inputs of the last whole periodic reload, with `on_demand` at its start.
    last: Option<(u64, ReloadInputs)>,
}

/// What a reload's outcome depends on, besides the blocks it always adopts: the commits other
/// processes made to the history and the token store (`PRAGMA data_version` moves only for
/// another connection's commit: `carpulse connect`, `vehicles`, `reauth`; never for the
/// daemon's own writes, which it already holds in memory), the holds of the connections (the
/// token manager's own changes, from memory) and `metrics.per_vehicle_max`. While they stand
/// still the periodic reload only adopts the blocks: at 10,000 vehicles reading and comparing
/// the vehicle set every minute was the largest thing an idle daemon did (issue 8).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReloadInputs {
    versions: (i64, i64),
    holds: Vec<(crate::domain::ConnectionId, Option<&'static str>)>,
    per_vehicle_max: usize,
}

/// `PRAGMA data_version` of the history and of the token store.
fn data_versions(c: &rusqlite::Connection) -> anyhow::Result<(i64, i64)> {
    let main = c.query_row("PRAGMA main.data_version", [], |r| r.get(0))?;
    let tokens = c
        .query_row("PRAGMA tokens.data_version", [], |r| r.get(0))
        .context("PRAGMA tokens.data_version (is the token store attached?)")?;
    Ok((main, tokens))
}

impl Shared {
    fn config(&self) -> Config {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn reloaded(&self) -> std::sync::MutexGuard<'_, Reloads> {
        self.reloaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload on demand (SIGHUP, a changed connections check): always the whole of it; the
    /// next periodic one is whole too.
    async fn reload(&self) -> anyhow::Result<()> {
        self.reloaded().on_demand += 1;
        self.reload_whole().await
    }

    async fn reload_whole(&self) -> anyhow::Result<()> {
        let per_vehicle_max = self.config().metrics.per_vehicle_max;
        reload(
            &self.store,
            &self.tokens,
            &self.poller,
            &self.metrics,
            per_vehicle_max,
        )
        .await
    }

    /// The reload every [`RELOAD_EVERY`]: whole when anything it reads may have changed since
    /// the last whole one (see [`ReloadInputs`]) or another reload ran meanwhile; otherwise
    /// only the blocks (pauses and waits expire with time).
    async fn reload_periodic(&self) -> anyhow::Result<()> {
        let epoch = self.reloaded().on_demand;
        let versions = self.store.call(|c| data_versions(c)).await?;
        let mut holds: Vec<_> = connection_holds(&self.tokens).await.into_iter().collect();
        holds.sort_unstable_by_key(|h| h.0);
        let inputs = ReloadInputs {
            versions,
            holds,
            per_vehicle_max: self.config().metrics.per_vehicle_max,
        };
        // Unchanged, and no reload on demand since the last whole one (nor while reading).
        let unchanged = {
            let r = self.reloaded();
            r.on_demand == epoch && r.last.as_ref() == Some(&(epoch, inputs.clone()))
        };
        if unchanged {
            return adopt_stored_blocks(&self.store, &self.poller).await;
        }
        self.reloaded().last = None;
        self.reload_whole().await?;
        self.reloaded().last = Some((epoch, inputs));
        Ok(())
    }
}

/// The one line that says the daemon runs, and where its metrics are.
fn announce(
    listener: &TcpListener,
    web: Option<&crate::daemon::webconfig::WebConfig>,
    config: &Config,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let scheme = if web.is_some_and(|w| w.tls()) {
        "https"
    } else {
        "http"
    };
    info!(
        metrics = %format!("{scheme}://{addr}/metrics"),
        basic_auth = web.is_some_and(|w| w.basic_auth()),
        api = ?config.smartcar.api,
        battery = %config.schedule.battery,
        info = %config.schedule.info,
        "carpulse running"
    );
    Ok(())
}

/// `/healthz` and the budget gauge, every [`HEALTH_EVERY`].
async fn health_loop(s: Shared, health: Health) -> anyhow::Result<()> {
    let mut check = crate::daemon::health::HealthCheck::new(crate::domain::now_ms());
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => return Ok(()),
            _ = every.tick() => {}
        }
        let live = s.config();
        s.metrics.set_budget(live.budget.calls_per_vehicle_month);
        let stale_after = live.metrics.stale_after;
        check
            .check(&health, &s.tokens, &s.poller, &s.metrics, stale_after)
            .await;
        // Refused writes and dropped rows (the store's own view).
        let store_problems = s.store.problems(crate::domain::now_ms());
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        h.problems.extend(store_problems);
    }
}

/// API Authentication: `/v3/connections` says who is connected (see connections_sync):
/// hourly, on SIGHUP, and after an ACCESS_DENIED.
async fn connections_loop(
    s: Shared,
    client: SmartcarClient,
    app: Arc<crate::daemon::app_token::AppAuth>,
    sync_now: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    use crate::daemon::connections_sync::{check_once, CHECK_EVERY, MIN_GAP};
    let denied = s.poller.connections_check();
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => return Ok(()),
            _ = every.tick() => {}
            _ = sync_now.notified() => {}
            _ = denied.notified() => {
                // Many vehicles of one revoked user answer together: one check, at most one
                // per MIN_GAP (deferred, never dropped).
                let wait = last.map_or(Duration::ZERO, |l| MIN_GAP.saturating_sub(l.elapsed()));
                tokio::select! {
                    _ = s.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        last = Some(tokio::time::Instant::now());
        match check_once(&client, &app, &s.store, &s.tokens).await {
            Ok(report) => {
                info!(
                    listed = report.listed,
                    revoked = report.revoked.len(),
                    restored = report.restored.len(),
                    added = report.added.len(),
                    "connections checked (GET /v3/connections)"
                );
                if report.changed() {
                    if let Err(e) = s.reload().await {
                        warn!(
                            error = format!("{e:#}"),
                            "reloading after the connections check failed"
                        );
                    }
                }
            }
            Err(e) => warn!(
                error = format!("{e:#}"),
                "checking connections failed; trying again later"
            ),
        }
    }
}

/// Re-reads the store every [`RELOAD_EVERY`] and on SIGHUP (which also re-reads the config
/// and the connections); after each, capabilities never read or due are read, the first a
/// minute after start: the first polls go out undelayed.
async fn reload_loop(
    s: Shared,
    reload_now: Arc<tokio::sync::Notify>,
    sync_now: Arc<tokio::sync::Notify>,
    schedule_tx: tokio::sync::mpsc::Sender<ScheduleConfig>,
    discoveries: TaskTracker,
) -> anyhow::Result<()> {
    let discovery = Arc::new(crate::daemon::discovery::Discovery::default());
    let mut every = tokio::time::interval(RELOAD_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    every.tick().await; // the first tick is immediate; the daemon just loaded
    loop {
        let hup = tokio::select! {
            _ = s.shutdown.cancelled() => return Ok(()),
            _ = every.tick() => false,
            _ = reload_now.notified() => true,
        };
        if hup {
            reconfigure(&s.live, &s.store, &s.tokens, &s.poller, &schedule_tx).await;
            sync_now.notify_one();
        }
        let reloaded = if hup {
            s.reload().await
        } else {
            s.reload_periodic().await
        };
        if let Err(e) = reloaded {
            warn!(
                error = format!("{e:#}"),
                "reloading the vehicle set failed; keeping the current one"
            );
        }
        let (discovery, s) = (discovery.clone(), s.clone());
        discoveries.spawn(async move {
            let every = s.config().schedule.discover_every;
            if let Err(e) = discovery
                .run_due(&s.store, &s.poller, every, &s.shutdown)
                .await
            {
                warn!(error = format!("{e:#}"), "capability discovery failed");
            }
        });
    }
}

/// systemd's watchdog (`WatchdogSec=`): alive as long as the runtime runs tasks.
async fn watchdog(every: Duration, stop: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => crate::daemon::sdnotify::notify("WATCHDOG=1"),
        }
    }
}

/// How often the store is re-read for vehicles and connections that `carpulse connect` or
/// `carpulse vehicles` changed (SIGHUP does it at once).
const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// Re-reads connections and vehicles: new accounts get a refresher, re-authorized ones are
/// adopted (and their vehicles' disabled endpoints lifted), removed or disabled vehicles stop
/// being polled.
pub async fn reload(
    store: &Store,
    tokens: &Arc<TokenManager>,
    poller: &Poller,
    metrics: &Metrics,
    per_vehicle_max: usize,
) -> anyhow::Result<()> {
    let connections = store
        .call(|c| queries::load_connections(c))
        .await
        .context("loading connections")?;
    let vehicles = store
        .call(|c| queries::load_vehicles(c))
        .await
        .context("loading vehicles")?;
    let started = tokens.merge(connections).await;
    let holds = connection_holds(tokens).await;
    let active = unheld(&holds);
    poller.set_held(held_vehicles(&vehicles, &holds));
    // Every stored vehicle keeps its series (a held or disabled one with vehicle_up 0); a
    // removed one loses them.
    metrics.set_fleet(&fleet_states(&vehicles, &holds));
    let before: std::collections::HashSet<_> =
        poller.vehicles().into_iter().map(|v| v.id).collect();
    let mut polled = Vec::new();
    for v in vehicles {
        if started.contains(&v.connection_id) {
            poller.reset_gate(&v.vehicle_id);
        }
        if v.enabled && active.contains(&v.connection_id) {
            polled.push(PolledVehicle {
                id: v.vehicle_id,
                connection: v.connection_id,
            });
        }
    }
    let now: std::collections::HashSet<_> = polled.iter().map(|v| v.id.clone()).collect();
    let (added, removed) = (
        now.difference(&before).count(),
        before.difference(&now).count(),
    );
    metrics.set_per_vehicle(polled.len() <= per_vehicle_max);
    poller.set_vehicles(polled);
    adopt_stored_blocks(store, poller).await?;
    if added + removed + started.len() > 0 {
        info!(
            added,
            removed,
            connections_added_or_reauthorized = started.len(),
            vehicles = now.len(),
            "vehicle set reloaded"
        );
    }
    Ok(())
}

/// Every connection the token manager holds, with its [`connection_hold`].
async fn connection_holds(
    tokens: &TokenManager,
) -> std::collections::HashMap<crate::domain::ConnectionId, Option<&'static str>> {
    let app_auth = tokens.app_auth();
    tokens
        .overview()
        .await
        .into_iter()
        .map(|c| (c.0, connection_hold(c.2, &c.1, app_auth)))
        .collect()
}

/// Why a connection's vehicles are not polled, if they are not: `revoked` (Smartcar no longer
/// lists it), `no_user_id` (API Authentication needs the user id Connect gave, and an old
/// connection has none), `needs_reauth` (per-user tokens refused; irrelevant to the
/// application token).
fn connection_hold(
    status: ConnectionStatus,
    user_id: &str,
    app_auth: bool,
) -> Option<&'static str> {
    match status {
        ConnectionStatus::Revoked => Some("revoked"),
        _ if app_auth && !crate::domain::is_real_user_id(user_id) => Some("no_user_id"),
        ConnectionStatus::NeedsReauth if !app_auth => Some("needs_reauth"),
        _ => None,
    }
}

/// The connections whose vehicles are polled: those with no hold.
fn unheld(
    holds: &std::collections::HashMap<crate::domain::ConnectionId, Option<&'static str>>,
) -> std::collections::HashSet<crate::domain::ConnectionId> {
    holds
        .iter()
        .filter(|(_, hold)| hold.is_none())
        .map(|(id, _)| *id)
        .collect()
}

/// The enabled vehicles whose connection is held, with why.
fn held_vehicles(
    vehicles: &[queries::VehicleRecord],
    holds: &std::collections::HashMap<crate::domain::ConnectionId, Option<&'static str>>,
) -> Vec<(crate::domain::VehicleId, &'static str)> {
    vehicles
        .iter()
        .filter(|v| v.enabled)
        .filter_map(|v| {
            holds
                .get(&v.connection_id)
                .copied()
                .flatten()
                .map(|h| (v.vehicle_id.clone(), h))
        })
        .collect()
}

/// Every stored vehicle with why it is not polled (`disabled`, or its connection's hold), for
/// [`Metrics::set_fleet`].
fn fleet_states(
    vehicles: &[queries::VehicleRecord],
    holds: &std::collections::HashMap<crate::domain::ConnectionId, Option<&'static str>>,
) -> Vec<(crate::domain::VehicleId, Option<&'static str>)> {
    vehicles
        .iter()
        .map(|v| {
            let hold = if v.enabled {
                holds.get(&v.connection_id).copied().flatten()
            } else {
                Some("disabled")
            };
            (v.vehicle_id.clone(), hold)
        })
        .collect()
}

/// Gives the per-vehicle gauges what the store knows (latest readings, whether the last poll
/// was answered), so they are there from the first scrape. A failure only costs that.
async fn seed_metrics(store: &Store, metrics: &Metrics) {
    match store.call(|c| queries::vehicle_summaries(c)).await {
        Ok(summaries) => metrics.seed_from(&summaries),
        Err(e) => warn!(
            error = format!("{e:#}"),
            "cannot read the latest readings for the metrics; they appear with the next polls"
        ),
    }
}

/// Gives the poller's gates the stored blocks (disabled endpoints, pauses): what earlier runs
/// learnt is not asked again, and what a reconnect or `vehicles enable` lifted is asked again.
pub async fn adopt_stored_blocks(store: &Store, poller: &Poller) -> anyhow::Result<()> {
    // Blocks polls have set are committed first, so the snapshot has them.
    let read_at = crate::domain::now_ms();
    store
        .flush()
        .await
        .context("flushing the writer before reading blocks")?;
    let blocks = store
        .call(move |c| {
            let max_until = crate::daemon::gate::capped_until(i64::MAX, read_at);
            let corrected = queries::cap_waits(c, max_until)?;
            if corrected > 0 {
                warn!(
                    corrected,
                    "stored waits ended more than a day from now; corrected to a day"
                );
            }
            for lifted in queries::expire_blocks(c, read_at)? {
                if lifted.scope == crate::domain::BlockScope::Vehicle {
                    info!(vehicle = %lifted.vehicle_id, reason = lifted.reason, "pause over; the vehicle is polled again");
                }
            }
            queries::load_blocks(c)
        })
        .await
        .context("loading blocked endpoints")?;
    let mut by_vehicle: std::collections::HashMap<_, Vec<_>> = Default::default();
    let mut waits = std::collections::HashMap::new();
    for b in blocks {
        match b.until {
            Some(until) if b.scope == crate::domain::BlockScope::Wait => {
                waits.insert(b.vehicle_id, until);
            }
            _ => by_vehicle
                .entry(b.vehicle_id)
                .or_default()
                .push((b.scope, b.reason)),
        }
    }
    poller.adopt_blocks(&by_vehicle, &waits, read_at);
    Ok(())
}

/// Seeds the monthly call ledger from this month's `poll_events` (see
/// [`queries::calls_since`]), so a restart does not forget what was spent.
pub async fn load_ledger(
    store: &Store,
    poller: &Poller,
    api: crate::domain::ApiVersion,
    budget: Option<u64>,
) -> anyhow::Result<()> {
    // Seeded with or without a budget: `carpulse_smartcar_calls_billed` reports the month's
    // calls from the store, not only those since this process started.
    let now = crate::domain::now_ms();
    let since = crate::daemon::gate::month_start(now);
    let used = store
        .call(move |c| queries::calls_since(c, since, api))
        .await
        .context("reading this month's calls from poll_events")?;
    if let Some(budget) = budget {
        info!(
            budget,
            vehicles_with_calls = used.len(),
            most_calls = used.values().copied().max().unwrap_or(0),
            "monthly call budget in force"
        );
    }
    poller.seed_ledger(budget, used);
    Ok(())
}

/// SIGHUP: re-reads the config file and applies what a running daemon can take on (see
/// [`crate::daemon::reconfig`]). A file that no longer parses changes nothing.
async fn reconfigure(
    live: &std::sync::RwLock<Config>,
    store: &Store,
    tokens: &TokenManager,
    poller: &Poller,
    schedule: &tokio::sync::mpsc::Sender<ScheduleConfig>,
) {
    let current = live.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(path) = current.source.clone() else {
        return; // built in code (the demo): there is no file to re-read
    };
    let new = match Config::load(&path, &crate::config::ProcessEnv) {
        Ok(new) => new,
        Err(e) => {
            warn!(error = %e, "the config file did not load; keeping the running config");
            return;
        }
    };
    let changes = crate::daemon::reconfig::compare(&current, &new);
    if !changes.need_restart.is_empty() {
        warn!(
            keys = changes.need_restart.join(", "),
            "these changes take effect only after a restart (systemctl restart carpulse)"
        );
    }
    if changes.applied.is_empty() {
        info!("config reloaded: nothing a running daemon applies changed");
        return;
    }
    if changes.has("poll.concurrency") || changes.has("poll.timeout") {
        poller.set_limits(new.poll.timeout, new.poll.concurrency);
    }
    if changes.has("schedule.no_data_every") {
        poller.set_no_data_every(new.schedule.no_data_every);
    }
    if changes.has("schedule.refresh_margin") {
        tokens.set_margin(new.schedule.refresh_margin);
    }
    if changes.has("budget.calls_per_vehicle_month") {
        let api = current.smartcar.api;
        // Spending is counted from the start either way; the store's count adds what was
        // spent this month before this process started, and in-flight charges are kept.
        if let Err(e) = load_ledger(store, poller, api, new.budget.calls_per_vehicle_month).await {
            warn!(
                error = format!("{e:#}"),
                "the new budget could not count this month's calls; keeping the old budget"
            );
            return;
        }
    }
    if changes.schedule() && schedule.send(new.schedule.clone()).await.is_err() {
        return; // the daemon is stopping
    }
    info!(applied = changes.applied.join(", "), "config reloaded");
    // Keys that need a restart keep their running values.
    let mut next = new;
    next.smartcar = current.smartcar;
    next.store = current.store;
    next.metrics.listen = current.metrics.listen;
    next.metrics.per_vehicle_max = current.metrics.per_vehicle_max;
    *live.write().unwrap_or_else(|p| p.into_inner()) = next;
}

/// How often `/healthz` and the freshness gauges are brought up to date.
const HEALTH_EVERY: Duration = Duration::from_secs(15);

/// `carpulse run`: the daemon until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    crate::daemon::signals::spawn_handler(shutdown.clone())
        .context("installing signal handlers")?;
    if let (Some(budget), Ok((_, calls))) = (
        config.budget.calls_per_vehicle_month,
        crate::cli::plan::plan(&config, chrono::Utc::now()),
    ) {
        if calls > budget {
            warn!(
                calls_per_vehicle_month = calls,
                budget,
                "the schedule makes more calls than [budget] calls_per_vehicle_month: each vehicle's polls stop for the month when its next one would pass the budget; see `carpulse plan`"
            );
        }
    }
    let daemon = Daemon::build(config).await?;
    daemon.run_until_stopped(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The periodic reload is skipped on this: another process's commit to the history or to
    /// the token store moves `data_version`, the daemon's own writes do not.
    #[tokio::test]
    async fn data_versions_move_for_other_processes_commits_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.db");
        let store = Store::open(&path, None).unwrap();
        let versions = || store.call(|c| data_versions(c));
        let start = versions().await.unwrap();
        // The daemon's own writes (a connection, a vehicle) through its one connection.
        store
            .call(|c| {
                let tokens = crate::domain::TokenPair {
                    access_token: crate::domain::Secret::new("a"),
                    refresh_token: crate::domain::Secret::new("r"),
                    access_expires_at: 1,
                    refresh_expires_at: 1,
                };
                let conn = queries::upsert_connection(c, "user-1", &tokens, 1)?;
                queries::upsert_vehicle(c, conn, &crate::domain::VehicleId("v1".into()), None, 1)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(versions().await.unwrap(), start);
        // `carpulse vehicles disable` from another process: the history's version moves.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute("UPDATE vehicles SET enabled = 0", [])
            .unwrap();
        let after_history = versions().await.unwrap();
        assert_ne!(after_history.0, start.0);
        assert_eq!(after_history.1, start.1);
        // A pair written to the token store by another process (`carpulse reauth`).
        let tokens =
            rusqlite::Connection::open(crate::store::token_store::path_for(&path)).unwrap();
        tokens
            .execute("UPDATE connection_tokens SET access_token = 'b'", [])
            .unwrap();
        let after_tokens = versions().await.unwrap();
        assert_ne!(after_tokens.1, after_history.1);
        store.close().await.unwrap();
    }
}
