//! The configuration file (DESIGN §3): `RawConfig` is the TOML as the user wrote it; [`Config`] is
//! the validated, typed form (parsed cron, `Duration`s, socket addresses, the secret resolved).
//! Everything is checked at start so that a bad file fails before anything runs, with the file,
//! the line and the key named, and a distinct exit code ([`EX_CONFIG`]) that systemd does not
//! retry.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::{ApiVersion, Secret, UnitSystem};

/// sysexits' EX_CONFIG: the unit file lists it in `RestartPreventExitStatus`.
pub const EX_CONFIG: u8 = 78;

/// Where `run` looks when neither `--config` nor `CARPULSE_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/carpulse/carpulse.toml";

/// A config problem, already phrased for the user: `file:line: key: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Smartcar Connect `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Live,
    Simulated,
    Test,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Simulated => "simulated",
            Mode::Test => "test",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, for messages (`None` when built in code, as the demo does).
    pub source: Option<PathBuf>,
    pub smartcar: SmartcarConfig,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
    pub schedule: ScheduleConfig,
    pub poll: PollConfig,
    pub budget: BudgetConfig,
    /// `[retention]`: what the daemon prunes, and when.
    pub retention: crate::store::retention::Policy,
    /// `[backup]`: the daemon's scheduled backups.
    pub backup: BackupConfig,
}

/// `[backup]`: with a `schedule`, the daemon writes a checked copy of the history to `dir`
/// (`carpulse-<UTC time>.db`) and keeps the `keep` newest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    /// None: no scheduled backups.
    pub schedule: Option<Cron>,
    pub keep: usize,
    pub dir: PathBuf,
}

/// Smartcar bills per call, each batch item counting (the free tier is about 500 calls per
/// vehicle per month); `carpulse plan` checks a schedule against this.
#[derive(Clone, Debug, Default)]
pub struct BudgetConfig {
    pub calls_per_vehicle_month: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct SmartcarConfig {
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: String,
    pub mode: Mode,
    pub api: ApiVersion,
    pub scope: Vec<String>,
    pub unit_system: UnitSystem,
    pub connect_url: String,
    pub token_url: String,
    pub api_v2_url: String,
    pub api_v3_url: String,
    /// `pageSize` asked of the v3 signal list (None: the server's default). Each page is a
    /// billed call; smartcar-api.md marks the parameter uncertain, so it is opt-in.
    pub v3_page_size: Option<u32>,
    /// v3 API Authentication (smartcar-api.md §10.1): when set, v3 polls with one application
    /// token plus `sc-user-id`, lists vehicles through `/v3/connections`, and makes no v2.0 call.
    pub api_credentials: Option<crate::smartcar::iam::AppCredentials>,
}

impl SmartcarConfig {
    /// True when v3 runs on the application token (API credentials configured, `api = "v3"`).
    pub fn app_auth(&self) -> bool {
        self.api == ApiVersion::V3 && self.api_credentials.is_some()
    }
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub path: PathBuf,
}

#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    /// Per-vehicle series are exported while the fleet has at most this many vehicles (0: never).
    /// 10,000 vehicles × 15 series is more than a Prometheus server should hold; fleet-wide
    /// totals are always exported.
    pub per_vehicle_max: usize,
    /// `/healthz` fails when a vehicle has had no answered poll for this long.
    pub stale_after: Duration,
    /// TLS and basic auth for the listener ([`crate::daemon::webconfig`]); validated at load.
    pub web_config_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ScheduleConfig {
    /// Battery + charge.
    pub battery: Cron,
    /// Make/model/year, VIN, odometer.
    pub info: Cron,
    /// A faster battery cron for vehicles that are plugged in (their state changes by the
    /// minute); parked cars keep the base cron, which spares their 12 V battery.
    pub battery_charging: Option<Cron>,
    pub refresh_margin: Duration,
    /// How often each vehicle's capabilities (granted permissions, supported signals) are
    /// read again; also read at connect and when never read.
    pub discover_every: Duration,
    /// How often a vehicle with an empty v3 signal store (smartcar-api.md §10.5) is asked
    /// again: slowly, so it does not burn the call budget.
    pub no_data_every: Duration,
    /// The window a tick's polls are spread over (each vehicle at a fixed offset in it), so a
    /// tick is not a burst at Smartcar; `None`: a quarter of the cron's period, at most a
    /// minute. `0s` polls every due vehicle at once (the fleet benchmark's ceiling).
    pub spread: Option<Duration>,
    /// At start, poll at once each vehicle whose last reading of a job is older than one
    /// period of that job's cron (instead of waiting for its next run). Default true; read at
    /// start only.
    pub poll_at_start: bool,
}

#[derive(Clone, Debug)]
pub struct PollConfig {
    /// Polls in flight at least; more when the fleet needs them to finish a tick in time.
    pub concurrency: usize,
    /// Polls in flight at most (memory and sockets are bounded by it).
    pub max_in_flight: usize,
    pub timeout: Duration,
}

pub const DEFAULT_SCOPE: [&str; 5] = [
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
];
pub const DEFAULT_REDIRECT_URI: &str = "http://localhost:8000/exchange";
pub const DEFAULT_CONNECT_URL: &str = "https://connect.smartcar.com/oauth/authorize";
pub const DEFAULT_TOKEN_URL: &str = "https://auth.smartcar.com/oauth/token";
pub const DEFAULT_API_V2_URL: &str = "https://api.smartcar.com/v2.0";
pub const DEFAULT_API_V3_URL: &str = "https://vehicle.api.smartcar.com/v3";
pub const DEFAULT_IAM_URL: &str = "https://iam.smartcar.com/oauth2/token";
pub const DEFAULT_NO_DATA_EVERY: Duration = Duration::from_secs(3600);
pub const DEFAULT_STORE_PATH: &str = "/var/lib/carpulse/carpulse.db";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9841";
pub const DEFAULT_PER_VEHICLE_MAX: usize = 1000;
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(6 * 3600);
pub const DEFAULT_BATTERY_CRON: &str = "0 */15 * * * *";
pub const DEFAULT_INFO_CRON: &str = "0 0 4 * * *";
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(600);
pub const DEFAULT_DISCOVER_EVERY: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_CONCURRENCY: usize = 8;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(310);

/// Environment variables that point carpulse at another Smartcar host (the simulator, a proxy),
/// as Smartcar's SDKs allow with their `SMARTCAR_*_ORIGIN` variables. They win over the file.
pub const ENV_URL_OVERRIDES: [(&str, &str); 4] = [
    ("CARPULSE_CONNECT_URL", "smartcar.connect_url"),
    ("CARPULSE_TOKEN_URL", "smartcar.token_url"),
    ("CARPULSE_API_V2_URL", "smartcar.api_v2_url"),
    ("CARPULSE_API_V3_URL", "smartcar.api_v3_url"),
];
pub const ENV_CLIENT_SECRET: &str = "CARPULSE_CLIENT_SECRET";
/// Set by systemd for a unit with `LoadCredential=`: the directory holding its credentials.
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// The credential names the unit loads (`LoadCredential=client_secret:...`).
pub const CREDENTIAL_CLIENT_SECRET: &str = "client_secret";
pub const CREDENTIAL_API_CLIENT_SECRET: &str = "api_client_secret";
pub const DEFAULT_BACKUP_KEEP: usize = 7;
/// Poll events must cover the current month: the call budget is counted from them.
pub const MIN_POLL_EVENTS_RETENTION: Duration = Duration::from_secs(35 * 86_400);
/// Raw readings of today and yesterday always stay.
pub const MIN_READINGS_RETENTION: Duration = Duration::from_secs(2 * 86_400);
pub const ENV_API_CLIENT_SECRET: &str = "CARPULSE_API_CLIENT_SECRET";
pub const ENV_IAM_URL: &str = "CARPULSE_IAM_URL";

type S<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    smartcar: RawSmartcar,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    schedule: RawSchedule,
    #[serde(default)]
    poll: RawPoll,
    #[serde(default)]
    budget: RawBudget,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    backup: RawBackup,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    readings: S<String>,
    poll_events_ok: S<String>,
    poll_events_other: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    schedule: S<String>,
    keep: S<i64>,
    dir: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    calls_per_vehicle_month: S<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSmartcar {
    client_id: S<String>,
    client_secret: S<String>,
    client_secret_file: S<String>,
    redirect_uri: S<String>,
    mode: S<String>,
    api: S<String>,
    scope: S<Vec<String>>,
    unit_system: S<String>,
    connect_url: S<String>,
    token_url: S<String>,
    api_v2_url: S<String>,
    api_v3_url: S<String>,
    v3_page_size: S<i64>,
    api_client_id: S<String>,
    api_client_secret: S<String>,
    api_client_secret_file: S<String>,
    iam_url: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: S<String>,
    per_vehicle: S<toml::Value>,
    stale_after: S<String>,
    web_config_file: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    battery: S<String>,
    battery_charging: S<String>,
    info: S<String>,
    refresh_margin: S<String>,
    discover_every: S<String>,
    no_data_every: S<String>,
    spread: S<String>,
    poll_at_start: S<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPoll {
    concurrency: S<i64>,
    max_in_flight: S<i64>,
    timeout: S<String>,
}

/// Where a config value came from, to name it in an error.
struct Origin<'a> {
    file: &'a str,
    text: &'a str,
}

impl Origin<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        key: &str,
        span: Option<std::ops::Range<usize>>,
        msg: String,
    ) -> Result<T, ConfigError> {
        Err(self.error(key, span, msg))
    }

    fn error(&self, key: &str, span: Option<std::ops::Range<usize>>, msg: String) -> ConfigError {
        ConfigError(match span {
            Some(span) => format!("{}:{}: {key}: {msg}", self.file, self.line_of(span.start)),
            None => format!("{}: {key}: {msg}", self.file),
        })
    }
}

/// The environment as the loader sees it; a parameter so tests need not touch the process's.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        })?;
        let mut cfg = Self::parse(&text, &path.display().to_string(), env)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::parse_as(text, file, env, Purpose::Smartcar)
    }

    /// Reads the file at `path` for a command that only reads the store (`history`, `status`,
    /// `vehicles list`, `plan`): every key is checked as usual, but no Smartcar credential is
    /// required and no secret is read (a secret file may be readable by the daemon's account
    /// only). The secrets of such a config are empty.
    pub fn load_for_reading(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        })?;
        let mut cfg = Self::parse_as(&text, &path.display().to_string(), env, Purpose::Reading)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// The config of a read command: `config` (from `--config` or `$CARPULSE_CONFIG`) or the
    /// default file, read with [`Config::load_for_reading`], and `db` (from `--db`) as the
    /// store. With `--db`, a default file that is missing or unreadable is no error: every
    /// other key takes its default.
    pub fn for_reading(
        config: Option<&Path>,
        db: Option<&Path>,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match config {
            Some(path) => Self::load_for_reading(path, env)?,
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                match Self::load_for_reading(path, env) {
                    Ok(cfg) => cfg,
                    Err(_) if db.is_some() && std::fs::File::open(path).is_err() => {
                        Self::defaults_for_reading(env)
                    }
                    Err(_) if !path.exists() => {
                        return Err(ConfigError(format!(
                            "no config file at {DEFAULT_CONFIG_PATH}: name the store with --db PATH, or the config with --config FILE (or $CARPULSE_CONFIG)"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(db) = db {
            cfg.store.path = db.to_path_buf();
        }
        Ok(cfg)
    }

    /// Every default, for a read command run with `--db` and no config file.
    pub fn defaults_for_reading(env: &dyn Env) -> Config {
        // An empty text validates in Reading mode; should it ever not, that is a bug here.
        Self::parse_as("", "(defaults)", env, Purpose::Reading)
            .unwrap_or_else(|e| unreachable!("the defaults must validate: {e}"))
    }

    fn parse_as(
        text: &str,
        file: &str,
        env: &dyn Env,
        purpose: Purpose,
    ) -> Result<Config, ConfigError> {
        let origin = Origin { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| origin.line_of(s.start));
            let msg = e.message().trim().to_string();
            ConfigError(match line {
                Some(line) => format!("{file}:{line}: {msg}"),
                None => format!("{file}: {msg}"),
            })
        })?;
        validate(raw, &origin, env, purpose)
    }
}

/// What a config is loaded for: talking to Smartcar (credentials required, secrets resolved)
/// or reading the store only.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Smartcar,
    Reading,
}

fn span<T>(v: &S<T>) -> Option<std::ops::Range<usize>> {
    v.as_ref().map(|s| s.span())
}

fn string_or(v: &S<String>, default: &str) -> String {
    v.as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_else(|| default.to_string())
}

fn validate(
    raw: RawConfig,
    o: &Origin<'_>,
    env: &dyn Env,
    purpose: Purpose,
) -> Result<Config, ConfigError> {
    let sc = &raw.smartcar;
    let reading = purpose == Purpose::Reading;

    let client_id = match &sc.client_id {
        Some(id) if !id.get_ref().trim().is_empty() => id.get_ref().trim().to_string(),
        _ if reading => String::new(),
        Some(id) => {
            return o.err(
                "smartcar.client_id",
                Some(id.span()),
                "must not be empty".into(),
            )
        }
        None => {
            return o.err(
                "smartcar.client_id",
                None,
                "missing: set it to your Smartcar application's client id".into(),
            )
        }
    };
    let client_secret = if reading {
        Some(Secret::new(String::new()))
    } else {
        resolve_secret(
            SecretKeys {
                value: &sc.client_secret,
                file: &sc.client_secret_file,
                env: ENV_CLIENT_SECRET,
                key: "smartcar.client_secret",
                credential: CREDENTIAL_CLIENT_SECRET,
            },
            o,
            env,
        )?
    }
    .ok_or_else(|| {
        o.error(
            "smartcar.client_secret",
            None,
            format!(
                "missing: set client_secret, client_secret_file or ${ENV_CLIENT_SECRET}, or give \
                 the unit the credential {CREDENTIAL_CLIENT_SECRET} (/etc/carpulse/client_secret)"
            ),
        )
    })?;

    let redirect_uri = string_or(&sc.redirect_uri, DEFAULT_REDIRECT_URI);
    check_http_url(
        &redirect_uri,
        "smartcar.redirect_uri",
        span(&sc.redirect_uri),
        o,
    )?;

    let mode = match sc.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("live") => Mode::Live,
        Some("simulated") => Mode::Simulated,
        Some("test") => Mode::Test,
        Some(other) => {
            return o.err(
                "smartcar.mode",
                span(&sc.mode),
                format!("{other:?} is not one of live, simulated, test"),
            )
        }
    };
    let api = match sc.api.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("v3") => ApiVersion::V3,
        Some("v2") | Some("v2.0") => ApiVersion::V2,
        Some(other) => {
            return o.err(
                "smartcar.api",
                span(&sc.api),
                format!("{other:?} is not one of v3, v2"),
            )
        }
    };
    let unit_system = match sc.unit_system.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("metric") => UnitSystem::Metric,
        Some("imperial") => UnitSystem::Imperial,
        Some(other) => {
            return o.err(
                "smartcar.unit_system",
                span(&sc.unit_system),
                format!("{other:?} is not one of metric, imperial"),
            )
        }
    };
    let scope = match &sc.scope {
        Some(s) if s.get_ref().is_empty() => {
            return o.err(
                "smartcar.scope",
                Some(s.span()),
                "must name at least one permission".into(),
            )
        }
        Some(s) => s.get_ref().clone(),
        None => DEFAULT_SCOPE.iter().map(|s| s.to_string()).collect(),
    };

    let mut urls = [
        (
            string_or(&sc.connect_url, DEFAULT_CONNECT_URL),
            span(&sc.connect_url),
        ),
        (
            string_or(&sc.token_url, DEFAULT_TOKEN_URL),
            span(&sc.token_url),
        ),
        (
            string_or(&sc.api_v2_url, DEFAULT_API_V2_URL),
            span(&sc.api_v2_url),
        ),
        (
            string_or(&sc.api_v3_url, DEFAULT_API_V3_URL),
            span(&sc.api_v3_url),
        ),
    ];
    for ((var, key), (url, at)) in ENV_URL_OVERRIDES.iter().zip(urls.iter_mut()) {
        if let Some(value) = env.var(var) {
            check_http_url(&value, &format!("{key} (from ${var})"), None, o)?;
            *url = value;
            *at = None;
        } else {
            check_http_url(url, key, at.clone(), o)?;
        }
    }
    let [connect_url, token_url, api_v2_url, api_v3_url] = urls.map(|(u, _)| u);

    let api_credentials = if reading {
        // Only whether API Authentication is configured matters to a reader.
        sc.api_client_id
            .as_ref()
            .filter(|id| !id.get_ref().trim().is_empty())
            .map(|id| crate::smartcar::iam::AppCredentials {
                client_id: id.get_ref().trim().to_string(),
                client_secret: Secret::new(String::new()),
                iam_url: string_or(&sc.iam_url, DEFAULT_IAM_URL),
            })
    } else {
        api_credentials(sc, o, env)?
    };

    let store_path = string_or(&raw.store.path, DEFAULT_STORE_PATH);
    if store_path.trim().is_empty() {
        return o.err(
            "store.path",
            span(&raw.store.path),
            "must not be empty".into(),
        );
    }

    let listen_text = string_or(&raw.metrics.listen, DEFAULT_METRICS_LISTEN);
    let listen: SocketAddr = match listen_text.parse() {
        Ok(a) => a,
        Err(_) => {
            return o.err(
                "metrics.listen",
                span(&raw.metrics.listen),
                format!("{listen_text:?} is not an IP:port address (e.g. 127.0.0.1:9841)"),
            )
        }
    };

    let per_vehicle_max = match raw
        .metrics
        .per_vehicle
        .as_ref()
        .map(|v| (v.get_ref(), v.span()))
    {
        None => DEFAULT_PER_VEHICLE_MAX,
        Some((toml::Value::Boolean(true), _)) => usize::MAX,
        Some((toml::Value::Boolean(false), _)) => 0,
        Some((toml::Value::Integer(n), _)) if *n >= 0 => *n as usize,
        Some((other, at)) => {
            return o.err(
                "metrics.per_vehicle",
                Some(at),
                format!("{other} is not true, false or a fleet size (a whole number)"),
            )
        }
    };

    let stale_after = duration_or(
        &raw.metrics.stale_after,
        DEFAULT_STALE_AFTER,
        "metrics.stale_after",
        o,
    )?;

    let web_config_file = match &raw.metrics.web_config_file {
        None => None,
        Some(f) if f.get_ref().trim().is_empty() => None,
        // Read by `run` before it binds (a broken file is a config error, exit 78), not here:
        // the other commands never serve metrics and may not be allowed to read its key.
        Some(f) => Some(PathBuf::from(f.get_ref())),
    };

    let battery = check_cron(
        &string_or(&raw.schedule.battery, DEFAULT_BATTERY_CRON),
        "schedule.battery",
        span(&raw.schedule.battery),
        o,
    )?;
    let battery_charging = match &raw.schedule.battery_charging {
        None => None,
        Some(c) => Some(check_cron(
            c.get_ref(),
            "schedule.battery_charging",
            Some(c.span()),
            o,
        )?),
    };
    let info = check_cron(
        &string_or(&raw.schedule.info, DEFAULT_INFO_CRON),
        "schedule.info",
        span(&raw.schedule.info),
        o,
    )?;
    let refresh_margin = duration_or(
        &raw.schedule.refresh_margin,
        DEFAULT_REFRESH_MARGIN,
        "schedule.refresh_margin",
        o,
    )?;
    let poll_at_start = match raw.schedule.poll_at_start.as_ref() {
        None => true,
        Some(v) => match v.get_ref() {
            toml::Value::Boolean(b) => *b,
            other => {
                return o.err(
                    "schedule.poll_at_start",
                    Some(v.span()),
                    format!("{other} is not true or false"),
                )
            }
        },
    };
    let discover_every = duration_or(
        &raw.schedule.discover_every,
        DEFAULT_DISCOVER_EVERY,
        "schedule.discover_every",
        o,
    )?;
    let no_data_every = duration_or(
        &raw.schedule.no_data_every,
        DEFAULT_NO_DATA_EVERY,
        "schedule.no_data_every",
        o,
    )?;
    let spread = match &raw.schedule.spread {
        None => None,
        Some(_) => Some(duration_or(
            &raw.schedule.spread,
            Duration::ZERO,
            "schedule.spread",
            o,
        )?),
    };
    if spread.is_some_and(|s| s > Duration::from_secs(3600)) {
        return o.err(
            "schedule.spread",
            span(&raw.schedule.spread),
            "must be at most 1h".into(),
        );
    }
    if no_data_every < Duration::from_secs(60) {
        return o.err(
            "schedule.no_data_every",
            span(&raw.schedule.no_data_every),
            "must be at least 1m".into(),
        );
    }
    if discover_every < Duration::from_secs(3600) {
        return o.err(
            "schedule.discover_every",
            span(&raw.schedule.discover_every),
            "must be at least 1h (each reading is a billed call per vehicle)".into(),
        );
    }

    let concurrency = match &raw.poll.concurrency {
        None => DEFAULT_CONCURRENCY,
        Some(c) if (1..=4096).contains(c.get_ref()) => *c.get_ref() as usize,
        Some(c) => {
            return o.err(
                "poll.concurrency",
                Some(c.span()),
                format!("{} is out of range 1..=4096", c.get_ref()),
            )
        }
    };
    let max_in_flight = match &raw.poll.max_in_flight {
        None => DEFAULT_MAX_IN_FLIGHT.max(concurrency),
        Some(c) if (concurrency as i64..=65_536).contains(c.get_ref()) => *c.get_ref() as usize,
        Some(c) => {
            return o.err(
                "poll.max_in_flight",
                Some(c.span()),
                format!(
                    "{} is out of range {concurrency}..=65536 (at least poll.concurrency)",
                    c.get_ref()
                ),
            )
        }
    };
    let calls_per_vehicle_month = match &raw.budget.calls_per_vehicle_month {
        None => None,
        Some(n) if *n.get_ref() > 0 => Some(*n.get_ref() as u64),
        Some(n) => {
            return o.err(
                "budget.calls_per_vehicle_month",
                Some(n.span()),
                format!("{} must be a positive number of calls", n.get_ref()),
            )
        }
    };
    let v3_page_size = match &raw.smartcar.v3_page_size {
        None => None,
        Some(n) if (1..=1000).contains(n.get_ref()) => Some(*n.get_ref() as u32),
        Some(n) => {
            return o.err(
                "smartcar.v3_page_size",
                Some(n.span()),
                format!("{} is out of range 1..=1000", n.get_ref()),
            )
        }
    };
    let timeout = duration_or(&raw.poll.timeout, DEFAULT_POLL_TIMEOUT, "poll.timeout", o)?;
    if timeout.is_zero() {
        return o.err(
            "poll.timeout",
            span(&raw.poll.timeout),
            "must be more than 0".into(),
        );
    }

    let retention = retention(&raw.retention, o)?;
    let backup = backup(&raw.backup, &store_path, o)?;

    Ok(Config {
        source: None,
        smartcar: SmartcarConfig {
            client_id,
            client_secret,
            redirect_uri,
            mode,
            api,
            scope,
            unit_system,
            connect_url,
            token_url,
            api_v2_url,
            api_v3_url,
            v3_page_size,
            api_credentials,
        },
        store: StoreConfig {
            path: PathBuf::from(store_path),
        },
        metrics: MetricsConfig {
            listen,
            per_vehicle_max,
            stale_after,
            web_config_file,
        },
        schedule: ScheduleConfig {
            battery,
            battery_charging,
            info,
            refresh_margin,
            discover_every,
            no_data_every,
            spread,
            poll_at_start,
        },
        poll: PollConfig {
            concurrency,
            max_in_flight,
            timeout,
        },
        budget: BudgetConfig {
            calls_per_vehicle_month,
        },
        retention,
        backup,
    })
}

/// A retention key: `"forever"` or a duration of at least `min`.
fn keep_for(
    v: &S<String>,
    default: Option<Duration>,
    min: Duration,
    key: &str,
    why: &str,
    o: &Origin<'_>,
) -> Result<Option<Duration>, ConfigError> {
    let Some(s) = v else {
        return Ok(default);
    };
    if s.get_ref().trim() == "forever" {
        return Ok(None);
    }
    let d = parse_duration(s.get_ref())
        .or_else(|e| o.err(key, Some(s.span()), format!("{e}, or \"forever\"")))?;
    if d < min {
        return o.err(
            key,
            Some(s.span()),
            format!(
                "must be at least {} ({why}), or \"forever\"",
                format_duration(min)
            ),
        );
    }
    Ok(Some(d))
}

fn retention(
    raw: &RawRetention,
    o: &Origin<'_>,
) -> Result<crate::store::retention::Policy, ConfigError> {
    let defaults = crate::store::retention::Policy::default();
    let events_why = "the monthly call budget is counted from poll events";
    Ok(crate::store::retention::Policy {
        readings: keep_for(
            &raw.readings,
            defaults.readings,
            MIN_READINGS_RETENTION,
            "retention.readings",
            "today's and yesterday's readings always stay",
            o,
        )?,
        ok_poll_events: keep_for(
            &raw.poll_events_ok,
            defaults.ok_poll_events,
            MIN_POLL_EVENTS_RETENTION,
            "retention.poll_events_ok",
            events_why,
            o,
        )?,
        other_poll_events: keep_for(
            &raw.poll_events_other,
            defaults.other_poll_events,
            MIN_POLL_EVENTS_RETENTION,
            "retention.poll_events_other",
            events_why,
            o,
        )?,
    })
}

fn backup(raw: &RawBackup, store_path: &str, o: &Origin<'_>) -> Result<BackupConfig, ConfigError> {
    let schedule = match &raw.schedule {
        None => None,
        Some(c) => Some(check_cron(
            c.get_ref(),
            "backup.schedule",
            Some(c.span()),
            o,
        )?),
    };
    let keep = match &raw.keep {
        None => DEFAULT_BACKUP_KEEP,
        Some(n) if (1..=10_000).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            return o.err(
                "backup.keep",
                Some(n.span()),
                format!("{} is out of range 1..=10000", n.get_ref()),
            )
        }
    };
    let dir = match &raw.dir {
        Some(d) if d.get_ref().trim().is_empty() => {
            return o.err("backup.dir", Some(d.span()), "must not be empty".into())
        }
        Some(d) => PathBuf::from(d.get_ref()),
        None => Path::new(store_path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("backups"),
    };
    Ok(BackupConfig {
        schedule,
        keep,
        dir,
    })
}

/// Where one secret may come from.
struct SecretKeys<'a> {
    value: &'a S<String>,
    file: &'a S<String>,
    env: &'static str,
    /// `smartcar.client_secret`; the file key is this with `_file`.
    key: &'static str,
    /// The systemd credential's name (`LoadCredential=client_secret:...`).
    credential: &'static str,
}

/// The secret systemd passed as credential `name` (`$CREDENTIALS_DIRECTORY/name`), if there
/// is one and it is not empty (the unit's `SetCredential=name:` default is empty: the
/// operator did not provide that file).
fn credential(env: &dyn Env, name: &str) -> Result<Option<Secret>, ConfigError> {
    let Some(dir) = env.var(ENV_CREDENTIALS_DIRECTORY) else {
        return Ok(None);
    };
    let path = Path::new(&dir).join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(Secret::new(s.trim().to_string()))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError(format!(
            "{}: cannot read the systemd credential {name}: {e}",
            path.display()
        ))),
    }
}

/// Precedence: the environment variable, then the systemd credential (`LoadCredential=`, read
/// from `$CREDENTIALS_DIRECTORY`), then the `_file` key, then the value in the file. Both file
/// keys at once is refused as ambiguous. `None`: none is set.
fn resolve_secret(
    k: SecretKeys<'_>,
    o: &Origin<'_>,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    let file_key = format!("{}_file", k.key);
    if let (Some(_), Some(f)) = (k.value, k.file) {
        return o.err(
            &file_key,
            Some(f.span()),
            format!("set either {0} or {0}_file, not both", short(k.key)),
        );
    }
    if let Some(v) = env.var(k.env).filter(|v| !v.trim().is_empty()) {
        return Ok(Some(Secret::new(v.trim().to_string())));
    }
    if let Some(secret) = credential(env, k.credential)? {
        return Ok(Some(secret));
    }
    if let Some(f) = k.file {
        let path = f.get_ref();
        return match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(Secret::new(s.trim().to_string()))),
            Ok(_) => o.err(&file_key, Some(f.span()), format!("{path} is empty")),
            Err(e) => o.err(
                &file_key,
                Some(f.span()),
                format!("cannot read {path}: {e}"),
            ),
        };
    }
    match k.value {
        Some(s) if !s.get_ref().trim().is_empty() => {
            Ok(Some(Secret::new(s.get_ref().trim().to_string())))
        }
        Some(s) => o.err(k.key, Some(s.span()), "must not be empty".into()),
        None => Ok(None),
    }
}

fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// `api_client_id` with its secret and `iam_url` (env `CARPULSE_IAM_URL` wins). One without
/// the other is an error: half-configured API Authentication would silently fall back.
fn api_credentials(
    sc: &RawSmartcar,
    o: &Origin<'_>,
    env: &dyn Env,
) -> Result<Option<crate::smartcar::iam::AppCredentials>, ConfigError> {
    let secret = resolve_secret(
        SecretKeys {
            value: &sc.api_client_secret,
            file: &sc.api_client_secret_file,
            env: ENV_API_CLIENT_SECRET,
            key: "smartcar.api_client_secret",
            credential: CREDENTIAL_API_CLIENT_SECRET,
        },
        o,
        env,
    )?;
    let id = match &sc.api_client_id {
        Some(id) if id.get_ref().trim().is_empty() => {
            return o.err(
                "smartcar.api_client_id",
                Some(id.span()),
                "must not be empty".into(),
            )
        }
        Some(id) => Some(id.get_ref().trim().to_string()),
        None => None,
    };
    let (client_id, client_secret) = match (id, secret) {
        (None, None) => return Ok(None),
        (Some(id), Some(secret)) => (id, secret),
        (Some(_), None) => {
            return o.err(
                "smartcar.api_client_secret",
                None,
                format!(
                    "missing: api_client_id is set, so set api_client_secret, \
                     api_client_secret_file or ${ENV_API_CLIENT_SECRET} too"
                ),
            )
        }
        (None, Some(_)) => {
            return o.err(
                "smartcar.api_client_id",
                None,
                "missing: an API client secret is set, so set api_client_id (Dashboard → API Credentials) too".into(),
            )
        }
    };
    let iam_url = match env.var(ENV_IAM_URL) {
        Some(v) => {
            check_http_url(
                &v,
                &format!("smartcar.iam_url (from ${ENV_IAM_URL})"),
                None,
                o,
            )?;
            v
        }
        None => {
            let url = string_or(&sc.iam_url, DEFAULT_IAM_URL);
            check_http_url(&url, "smartcar.iam_url", span(&sc.iam_url), o)?;
            url
        }
    };
    Ok(Some(crate::smartcar::iam::AppCredentials {
        client_id,
        client_secret,
        iam_url,
    }))
}

fn check_http_url(
    url: &str,
    key: &str,
    at: Option<std::ops::Range<usize>>,
    o: &Origin<'_>,
) -> Result<(), ConfigError> {
    match oauth2::url::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(_) => o.err(key, at, format!("{url:?} is not an http(s) URL")),
        Err(e) => o.err(key, at, format!("{url:?} is not a URL: {e}")),
    }
}

/// A cron line with a seconds field (`schedule.battery`, `schedule.info`,
/// `schedule.battery_charging`, `backup.schedule`), parsed once where the config is loaded, so
/// a bad one is a config error naming its key and line and no later reader parses it again
/// (or has to decide what to do when it does not parse). It keeps the text as written: logs,
/// `carpulse plan` and tokio-cron-scheduler (which parses its own copy the same way) take it.
#[derive(Clone)]
pub struct Cron {
    text: String,
    parsed: croner::Cron,
}

impl Cron {
    /// Parses `expr` exactly as tokio-cron-scheduler will (seconds field required).
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let parsed = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map_err(|e| e.to_string())?;
        Ok(Cron {
            text: expr.to_owned(),
            parsed,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first run strictly after `t` (None: it never runs again).
    pub fn next_after(
        &self,
        t: &chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.parsed.find_next_occurrence(t, false).ok()
    }

    /// Whether the line runs at `t` (to the second).
    pub fn runs_at(&self, t: &chrono::DateTime<chrono::Utc>) -> bool {
        self.parsed.is_time_matching(t).unwrap_or(false)
    }

    /// The time between its next two runs from `now` (None: it does not run twice more).
    pub fn period_after(&self, now: &chrono::DateTime<chrono::Utc>) -> Option<Duration> {
        let a = self.next_after(now)?;
        let b = self.next_after(&a)?;
        (b - a).to_std().ok()
    }
}

/// Two lines are the same when written the same (what SIGHUP compares).
impl PartialEq for Cron {
    fn eq(&self, other: &Cron) -> bool {
        self.text == other.text
    }
}

impl Eq for Cron {}

/// As the text, so logs read as they did when the config held strings.
impl std::fmt::Debug for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.text, f)
    }
}

/// As the text; honours width and alignment (`carpulse plan` lines its schedules up).
impl std::fmt::Display for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.text)
    }
}

fn check_cron(
    expr: &str,
    key: &str,
    at: Option<std::ops::Range<usize>>,
    o: &Origin<'_>,
) -> Result<Cron, ConfigError> {
    Cron::parse(expr).or_else(|e| {
        o.err(
            key,
            at,
            format!("{expr:?} is not a cron expression with a seconds field (e.g. \"0 */15 * * * *\"): {e}"),
        )
    })
}

fn duration_or(
    v: &S<String>,
    default: Duration,
    key: &str,
    o: &Origin<'_>,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s.get_ref()).or_else(|e| o.err(key, Some(s.span()), e)),
    }
}

/// `"90s"`, `"10m"`, `"2h"`, `"1d"`, `"500ms"`, or a combination such as `"1h30m"`.
/// A duration the way `parse_duration` reads it: "7d", "1h30m", "90s".
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a duration (e.g. \"90s\", \"10m\", \"2h\", \"1h30m\")");
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, String>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }
    fn no_env() -> MapEnv {
        MapEnv(HashMap::new())
    }

    const MINIMAL: &str = "[smartcar]\nclient_id = \"abc\"\nclient_secret = \"s3cret\"\n";

    fn err(text: &str) -> String {
        match Config::parse(text, "c.toml", &no_env()) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert_eq!(c.smartcar.client_id, "abc");
        assert_eq!(c.smartcar.client_secret.expose(), "s3cret");
        assert_eq!(c.smartcar.redirect_uri, DEFAULT_REDIRECT_URI);
        assert_eq!(c.smartcar.api, ApiVersion::V3);
        assert_eq!(c.smartcar.mode, Mode::Live);
        assert_eq!(c.smartcar.scope.len(), 5);
        assert_eq!(c.smartcar.token_url, DEFAULT_TOKEN_URL);
        assert_eq!(c.store.path, PathBuf::from(DEFAULT_STORE_PATH));
        assert_eq!(c.metrics.listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(c.metrics.per_vehicle_max, DEFAULT_PER_VEHICLE_MAX);
        assert_eq!(c.schedule.battery.as_str(), DEFAULT_BATTERY_CRON);
        assert_eq!(c.schedule.refresh_margin, Duration::from_secs(600));
        assert_eq!(c.poll.concurrency, 8);
        assert_eq!(c.poll.timeout, Duration::from_secs(310));
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../config/carpulse.example.toml");
        // It names /etc/carpulse/client_secret, which the environment variable overrides.
        let env = MapEnv(HashMap::from([(ENV_CLIENT_SECRET, "s".to_string())]));
        let c = Config::parse(text, "carpulse.example.toml", &env).unwrap();
        assert_eq!(c.smartcar.api, ApiVersion::V3);
        assert_eq!(c.schedule.info.as_str(), DEFAULT_INFO_CRON);
        assert_eq!(c.retention, crate::store::retention::Policy::default());
        assert_eq!(
            c.backup.schedule.as_ref().map(Cron::as_str),
            Some("0 30 3 * * *")
        );
        assert_eq!(c.backup.dir, PathBuf::from("/var/lib/carpulse/backups"));
    }

    #[test]
    fn a_bad_cron_names_key_and_line() {
        let e = err(&format!(
            "{MINIMAL}\n[schedule]\nbattery = \"every 5 minutes\"\n"
        ));
        assert!(e.starts_with("c.toml:6: schedule.battery:"), "{e}");
        // Five fields (no seconds) is the classic mistake.
        let e = err(&format!("{MINIMAL}[schedule]\ninfo = \"*/15 * * * *\"\n"));
        assert!(e.starts_with("c.toml:5: schedule.info:"), "{e}");
    }

    #[test]
    fn every_cron_key_is_parsed_once_at_load_and_a_bad_one_names_key_and_line() {
        let e = err(&format!(
            "{MINIMAL}[schedule]\nbattery_charging = \"*/5 * * * *\"\n"
        ));
        assert!(e.starts_with("c.toml:5: schedule.battery_charging:"), "{e}");
        let e = err(&format!(
            "{MINIMAL}[backup]\ndir = \"/tmp/b\"\nschedule = \"nightly\"\n"
        ));
        assert!(e.starts_with("c.toml:6: backup.schedule:"), "{e}");
        let c = Config::parse(
            &format!("{MINIMAL}[schedule]\nbattery_charging = \"0 */5 * * * *\"\n"),
            "c.toml",
            &no_env(),
        )
        .unwrap();
        let charging = c.schedule.battery_charging.as_ref().map(Cron::as_str);
        assert_eq!(charging, Some("0 */5 * * * *"));
    }

    #[test]
    fn a_cron_keeps_its_text_and_answers_its_runs() {
        let c = Cron::parse("0 */15 * * * *").unwrap();
        assert_eq!(c.as_str(), "0 */15 * * * *");
        // Logs and `carpulse plan` read it as the text it was.
        assert_eq!(
            format!("{c}|{c:<16}|{c:?}"),
            "0 */15 * * * *|0 */15 * * * *  |\"0 */15 * * * *\""
        );
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        assert_eq!(
            c.next_after(&at("2026-11-30T10:07:00Z")),
            Some(at("2026-11-30T10:15:00Z"))
        );
        // Strictly after: a run at `t` is not the next one.
        assert_eq!(
            c.next_after(&at("2026-11-30T10:15:00Z")),
            Some(at("2026-11-30T10:30:00Z"))
        );
        assert!(c.runs_at(&at("2026-11-30T10:45:00Z")));
        assert!(!c.runs_at(&at("2026-11-30T10:45:01Z")));
        assert_eq!(
            c.period_after(&at("2026-11-30T10:07:00Z")),
            Some(Duration::from_secs(900))
        );
        // Equal when written the same (SIGHUP compares configs).
        assert_eq!(c, Cron::parse("0 */15 * * * *").unwrap());
        assert_ne!(c, Cron::parse("0 0 * * * *").unwrap());
        // No seconds field, or not cron at all: refused with the parser's reason.
        assert!(Cron::parse("*/15 * * * *").is_err());
        assert!(Cron::parse("every minute").is_err());
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_line() {
        let e = err(&format!("{MINIMAL}[poll]\nconcurency = 3\n"));
        assert!(e.starts_with("c.toml:5:"), "{e}");
        assert!(e.contains("concurency"), "{e}");
        let e = err(&format!("{MINIMAL}[poll]\nconcurrency = \"eight\"\n"));
        assert!(e.starts_with("c.toml:5:"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let cases = [
            ("[poll]\nconcurrency = 0\n", "c.toml:5: poll.concurrency:"),
            ("[poll]\ntimeout = \"ten\"\n", "c.toml:5: poll.timeout:"),
            (
                "[metrics]\nlisten = \"localhost\"\n",
                "c.toml:5: metrics.listen:",
            ),
            (
                "[schedule]\nrefresh_margin = \"5x\"\n",
                "c.toml:5: schedule.refresh_margin:",
            ),
            (
                "[schedule]\ndiscover_every = \"10m\"\n",
                "c.toml:5: schedule.discover_every:",
            ),
        ];
        for (tail, prefix) in cases {
            let e = err(&format!("{MINIMAL}{tail}"));
            assert!(e.starts_with(prefix), "{e}");
        }
        let e = err("[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\napi = \"v4\"\n");
        assert!(e.starts_with("c.toml:4: smartcar.api:"), "{e}");
        let e = err("[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\nv3_page_size = 0\n");
        assert!(e.starts_with("c.toml:4: smartcar.v3_page_size:"), "{e}");
        let e =
            err("[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\ntoken_url = \"ftp://x\"\n");
        assert!(e.starts_with("c.toml:4: smartcar.token_url:"), "{e}");
    }

    #[test]
    fn missing_credentials_are_named() {
        let e = err("[smartcar]\nclient_secret = \"b\"\n");
        assert!(e.contains("smartcar.client_id: missing"), "{e}");
        let e = err("[smartcar]\nclient_id = \"a\"\n");
        assert!(e.contains("smartcar.client_secret: missing"), "{e}");
        assert!(e.contains(ENV_CLIENT_SECRET), "{e}");
    }

    #[test]
    fn secret_sources_and_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[smartcar]\nclient_id = \"a\"\nclient_secret_file = \"{}\"\n",
            file.display()
        );
        let c = Config::parse(&text, "c.toml", &no_env()).unwrap();
        assert_eq!(c.smartcar.client_secret.expose(), "from-file");

        let env = MapEnv(HashMap::from([(ENV_CLIENT_SECRET, "from-env".to_string())]));
        let c = Config::parse(&text, "c.toml", &env).unwrap();
        assert_eq!(c.smartcar.client_secret.expose(), "from-env");
        let c = Config::parse("[smartcar]\nclient_id = \"a\"\n", "c.toml", &env).unwrap();
        assert_eq!(c.smartcar.client_secret.expose(), "from-env");

        let both = format!("{text}client_secret = \"x\"\n");
        assert!(err(&both).contains("not both"));
        let missing =
            "[smartcar]\nclient_id = \"a\"\nclient_secret_file = \"/nonexistent/carpulse\"\n";
        assert!(err(missing).starts_with("c.toml:3: smartcar.client_secret_file: cannot read"));
    }

    #[test]
    fn systemd_credentials_come_before_the_file_key_and_an_empty_one_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join(CREDENTIAL_CLIENT_SECRET), "from-credential\n").unwrap();
        // The unit's SetCredential= default when /etc/carpulse/api_client_secret is absent.
        std::fs::write(creds.join(CREDENTIAL_API_CLIENT_SECRET), "").unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[smartcar]\nclient_id = \"a\"\nclient_secret_file = \"{}\"\n",
            file.display()
        );
        let env = MapEnv(HashMap::from([(
            ENV_CREDENTIALS_DIRECTORY,
            creds.display().to_string(),
        )]));
        let c = Config::parse(&text, "c.toml", &env).unwrap();
        assert_eq!(c.smartcar.client_secret.expose(), "from-credential");
        assert!(
            c.smartcar.api_credentials.is_none(),
            "an empty credential is none"
        );
        // The environment variable still wins; without a credential the file key is read.
        let env2 = MapEnv(HashMap::from([
            (ENV_CREDENTIALS_DIRECTORY, creds.display().to_string()),
            (ENV_CLIENT_SECRET, "from-env".to_string()),
        ]));
        assert_eq!(
            Config::parse(&text, "c.toml", &env2)
                .unwrap()
                .smartcar
                .client_secret
                .expose(),
            "from-env"
        );
        std::fs::remove_file(creds.join(CREDENTIAL_CLIENT_SECRET)).unwrap();
        assert_eq!(
            Config::parse(&text, "c.toml", &env)
                .unwrap()
                .smartcar
                .client_secret
                .expose(),
            "from-file"
        );
        // The API secret from its credential turns API Authentication on with its id.
        std::fs::write(creds.join(CREDENTIAL_API_CLIENT_SECRET), "api-secret").unwrap();
        let c = Config::parse(
            &format!("{text}api_client_id = \"client_x\"\n"),
            "c.toml",
            &env,
        )
        .unwrap();
        let creds = c.smartcar.api_credentials.unwrap();
        assert_eq!(creds.client_secret.expose(), "api-secret");
        // Missing everywhere: the message names the credential too.
        let e = err("[smartcar]\nclient_id = \"a\"\n");
        assert!(e.contains("credential client_secret"), "{e}");
    }

    #[test]
    fn retention_and_backup_defaults_and_limits() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert_eq!(
            c.retention.readings, None,
            "readings are kept forever by default"
        );
        assert_eq!(
            c.retention.ok_poll_events,
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(c.retention.other_poll_events, None);
        assert_eq!(c.backup.schedule, None);
        assert_eq!(c.backup.keep, DEFAULT_BACKUP_KEEP);
        assert_eq!(c.backup.dir, PathBuf::from("/var/lib/carpulse/backups"));

        let c = Config::parse(
            &format!(
                "{MINIMAL}[retention]\nreadings = \"400d\"\npoll_events_ok = \"forever\"\n\
                 poll_events_other = \"180d\"\n[backup]\nschedule = \"0 30 3 * * *\"\nkeep = 3\n\
                 dir = \"/srv/backups\"\n"
            ),
            "c.toml",
            &no_env(),
        )
        .unwrap();
        assert_eq!(
            c.retention.readings,
            Some(Duration::from_secs(400 * 86_400))
        );
        assert_eq!(c.retention.ok_poll_events, None);
        assert_eq!(
            c.retention.other_poll_events,
            Some(Duration::from_secs(180 * 86_400))
        );
        assert_eq!(
            c.backup.schedule.as_ref().map(Cron::as_str),
            Some("0 30 3 * * *")
        );
        assert_eq!(c.backup.keep, 3);
        assert_eq!(c.backup.dir, PathBuf::from("/srv/backups"));

        for (text, expected) in [
            (
                "[retention]\npoll_events_ok = \"7d\"\n",
                "c.toml:5: retention.poll_events_ok: must be at least 35d",
            ),
            (
                "[retention]\nreadings = \"1d\"\n",
                "c.toml:5: retention.readings: must be at least 2d",
            ),
            (
                "[retention]\nreadings = \"always\"\n",
                "c.toml:5: retention.readings:",
            ),
            (
                "[backup]\nschedule = \"0 3 * * *\"\n",
                "c.toml:5: backup.schedule:",
            ),
            ("[backup]\nkeep = 0\n", "c.toml:5: backup.keep:"),
        ] {
            let e = err(&format!("{MINIMAL}{text}"));
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn the_secret_never_prints() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn env_overrides_urls() {
        let env = MapEnv(HashMap::from([
            (
                "CARPULSE_TOKEN_URL",
                "http://127.0.0.1:9/oauth/token".to_string(),
            ),
            ("CARPULSE_API_V3_URL", "http://127.0.0.1:9/v3".to_string()),
        ]));
        let c = Config::parse(MINIMAL, "c.toml", &env).unwrap();
        assert_eq!(c.smartcar.token_url, "http://127.0.0.1:9/oauth/token");
        assert_eq!(c.smartcar.api_v3_url, "http://127.0.0.1:9/v3");
        assert_eq!(c.smartcar.api_v2_url, DEFAULT_API_V2_URL);
        let env = MapEnv(HashMap::from([("CARPULSE_API_V2_URL", "nope".to_string())]));
        let e = Config::parse(MINIMAL, "c.toml", &env).unwrap_err().0;
        assert!(
            e.contains("smartcar.api_v2_url (from $CARPULSE_API_V2_URL)"),
            "{e}"
        );
    }

    #[test]
    fn per_vehicle_series_switch() {
        let parse = |v: &str| {
            Config::parse(
                &format!("{MINIMAL}[metrics]\nper_vehicle = {v}\n"),
                "c.toml",
                &no_env(),
            )
            .map(|c| c.metrics.per_vehicle_max)
        };
        assert_eq!(parse("true").unwrap(), usize::MAX);
        assert_eq!(parse("false").unwrap(), 0);
        assert_eq!(parse("250").unwrap(), 250);
        let e = parse("\"lots\"").unwrap_err().0;
        assert!(e.starts_with("c.toml:5: metrics.per_vehicle:"), "{e}");
        assert!(parse("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("310s"), Ok(Duration::from_secs(310)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "m", "10", "10 m", "1.5h", "-3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn api_credentials_are_all_or_nothing_and_name_their_key() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert!(c.smartcar.api_credentials.is_none() && !c.smartcar.app_auth());
        let text =
            format!("{MINIMAL}api_client_id = \"client_1\"\napi_client_secret = \"api-s\"\n");
        let c = Config::parse(&text, "c.toml", &no_env()).unwrap();
        let creds = c.smartcar.api_credentials.clone().unwrap();
        assert_eq!(creds.client_id, "client_1");
        assert_eq!(creds.client_secret.expose(), "api-s");
        assert_eq!(creds.iam_url, DEFAULT_IAM_URL);
        assert!(c.smartcar.app_auth());
        // v2 ignores them.
        let v2 = format!("{text}api = \"v2\"\n");
        assert!(!Config::parse(&v2, "c.toml", &no_env())
            .unwrap()
            .smartcar
            .app_auth());
        // The environment wins for the secret and the IAM URL.
        let env = MapEnv(HashMap::from([
            (ENV_API_CLIENT_SECRET, "from-env".to_owned()),
            (ENV_IAM_URL, "http://127.0.0.1:9/oauth2/token".to_owned()),
        ]));
        let c = Config::parse(&text, "c.toml", &env).unwrap();
        let creds = c.smartcar.api_credentials.unwrap();
        assert_eq!(creds.client_secret.expose(), "from-env");
        assert_eq!(creds.iam_url, "http://127.0.0.1:9/oauth2/token");
        // Half a pair is an error naming the missing key; so are both secret keys at once.
        let e = err(&format!("{MINIMAL}api_client_id = \"client_1\"\n"));
        assert!(e.contains("smartcar.api_client_secret: missing"), "{e}");
        let e = err(&format!("{MINIMAL}api_client_secret = \"x\"\n"));
        assert!(e.contains("smartcar.api_client_id: missing"), "{e}");
        let e = err(&format!(
            "{MINIMAL}api_client_id = \"c\"\napi_client_secret = \"x\"\napi_client_secret_file = \"/nope\"\n"
        ));
        assert!(
            e.starts_with("c.toml:6: smartcar.api_client_secret_file"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}api_client_id = \"c\"\napi_client_secret = \"x\"\niam_url = \"ftp://x\"\n"
        ));
        assert!(e.contains("smartcar.iam_url"), "{e}");
        // The secret never appears in an error.
        assert!(!e.contains("\"x\""), "{e}");
    }

    #[test]
    fn poll_at_start_is_on_unless_turned_off() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert!(c.schedule.poll_at_start);
        let off = format!("{MINIMAL}[schedule]\npoll_at_start = false\n");
        let c = Config::parse(&off, "c.toml", &no_env()).unwrap();
        assert!(!c.schedule.poll_at_start);
        let e = err(&format!("{MINIMAL}[schedule]\npoll_at_start = \"no\"\n"));
        assert!(
            e.contains("c.toml:5: schedule.poll_at_start: \"no\" is not true or false"),
            "{e}"
        );
    }

    #[test]
    fn no_data_every_has_a_floor() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert_eq!(c.schedule.no_data_every, DEFAULT_NO_DATA_EVERY);
        let e = err(&format!("{MINIMAL}[schedule]\nno_data_every = \"5s\"\n"));
        assert!(
            e.contains("schedule.no_data_every: must be at least 1m"),
            "{e}"
        );
    }

    #[test]
    fn spread_is_optional_and_at_most_an_hour() {
        let c = Config::parse(MINIMAL, "c.toml", &no_env()).unwrap();
        assert_eq!(c.schedule.spread, None);
        let c = Config::parse(
            &format!("{MINIMAL}[schedule]\nspread = \"0s\"\n"),
            "c.toml",
            &no_env(),
        )
        .unwrap();
        assert_eq!(c.schedule.spread, Some(Duration::ZERO));
        let e = err(&format!("{MINIMAL}[schedule]\nspread = \"2h\"\n"));
        assert!(e.contains("schedule.spread: must be at most 1h"), "{e}");
        let e = err(&format!("{MINIMAL}[schedule]\nspread = \"soon\"\n"));
        assert!(e.contains("schedule.spread"), "{e}");
    }

    #[test]
    fn read_commands_need_no_credentials_and_read_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        // A secret file this user cannot read (or that is not there) is not read at all.
        std::fs::write(
            &p,
            "[smartcar]\nclient_secret_file = \"/nonexistent/secret\"\napi_client_id = \"client_x\"\n\n[store]\npath = \"/data/c.db\"\n",
        )
        .unwrap();
        let c = Config::load_for_reading(&p, &no_env()).unwrap();
        assert_eq!(c.store.path, PathBuf::from("/data/c.db"));
        assert_eq!(c.smartcar.client_id, "");
        assert!(c.smartcar.app_auth(), "API Authentication is still seen");
        // Every other key is checked as usual.
        std::fs::write(&p, "[schedule]\nbattery = \"*/15 * * * *\"\n").unwrap();
        let e = Config::load_for_reading(&p, &no_env()).unwrap_err().0;
        assert!(e.contains(":2: schedule.battery"), "{e}");
        // --db wins over store.path; with --db and no file, the defaults.
        std::fs::write(&p, "[store]\npath = \"/data/c.db\"\n").unwrap();
        let c = Config::for_reading(Some(&p), Some(Path::new("x.db")), &no_env()).unwrap();
        assert_eq!(c.store.path, PathBuf::from("x.db"));
        let d = Config::defaults_for_reading(&no_env());
        assert_eq!(d.store.path, PathBuf::from(DEFAULT_STORE_PATH));
        assert_eq!(d.schedule.battery.as_str(), DEFAULT_BATTERY_CRON);
        // The commands that talk to Smartcar still require the credentials.
        assert!(Config::load(&p, &no_env()).is_err());
    }
}
