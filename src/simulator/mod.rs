//! The built-in Smartcar-compatible simulator: `carpulse simulator`, and the server carpulse's own
//! tests and `carpulse demo` run against.
//!
//! It serves Connect (`/oauth/authorize`, the re-auth flow `/oauth/reauthenticate`), the token
//! endpoints (`/oauth/token` for per-user tokens, `/oauth2/token` for v3 application tokens),
//! Vehicle API v2.0 (`/v2.0`), v3 signals (`/v3/vehicles`), v3 connections
//! (`/v3/connections`) and the Management API's connections
//! (`/v2.0/management/connections`) with the shapes, headers and errors of smartcar-api.md, over a
//! deterministic fleet whose values evolve with simulated time. `/_simulator/*` exposes counters
//! and what was served, so tests can check carpulse against ground truth. [`ENDPOINTS_HELP`] (the
//! end of `carpulse simulator --help`) lists it all.
//!
//! Two credentials, as in Smartcar's late-2026 model (smartcar-api.md §1.7, §10): Connect's
//! client (`client_id`/`client_secret`, per-user tokens through `/oauth/token`) and the separate
//! API credentials (`api_client_id`/`api_client_secret`, one application token through
//! `/oauth2/token`). `/v2.0` takes only per-user tokens. `/v3` takes either, as [`V3Auth`] allows:
//! an application token names its user in `sc-user-id` and reaches only vehicles that user
//! connected in Connect ([`connections`]); a per-user token needs no `sc-user-id` (the SDK model).
//!
//! Tokens carry the permissions their consent granted ([`scope`]); an endpoint or signal they do
//! not cover answers 403 PERMISSION like Smartcar's.
//!
//! Layout: [`fleet`] (ids and the vehicle model), [`oauth`] (codes and tokens), [`consent`] (the
//! consent page), [`connections`] (approved user/vehicle pairs and `/v3/connections`),
//! [`management`] (the same pairs through the Management API), [`scope`]
//! (granted permissions), [`v2`], [`v3`], [`faults`], [`errors`] (envelopes) and [`stats`]
//! (counters, served log). This file owns the configuration, the shared state, bearer
//! authentication, routing and the CLI entry point. The simulator imports nothing from the
//! client side (`crate::smartcar`), so it cannot inherit the client's mistakes.

mod connections;
mod consent;
mod errors;
pub mod faults;
mod fleet;
mod hostile;
pub use fleet::Powertrain;
mod management;
mod oauth;
mod scope;
mod stats;
mod v2;
mod v3;

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::domain::{now_ms, UnixMillis};
use errors::{Api, ApiError};
use fleet::{Fleet, SimClock, Vehicle};
use scope::Scope;
use stats::{bump, ServedLog, Stats};

/// How the simulator behaves. `Default` is what `carpulse simulator` runs with no flags.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// The one Connect (OAuth) client the simulator knows.
    pub client_id: String,
    /// Its secret (the token endpoint checks it in the Basic header). Redacted in `Debug`.
    pub client_secret: String,
    /// The API Credentials' client id, for v3 application tokens (`POST /oauth2/token`); not
    /// Connect's (smartcar-api.md §10.1).
    pub api_client_id: String,
    /// Its secret (checked in the form body). Redacted in `Debug`.
    pub api_client_secret: String,
    /// The Application Management Token: the Management API (`/v2.0/management/connections`)
    /// takes `Authorization: Basic base64("default:" + AMT)` (smartcar-api.md §7). Redacted in
    /// `Debug`.
    pub management_token: String,
    /// `expires_in` of application tokens (Smartcar: one hour).
    pub app_token_lifetime: Duration,
    /// Which tokens `/v3` accepts.
    pub v3_auth: V3Auth,
    /// Connect's success redirect carries only `user_id` and `state`, no `code` (the newest docs'
    /// shape, smartcar-api.md §10.2); the approval still creates the connections.
    pub redirect_without_code: bool,
    /// Vehicle ids whose v3 signal store is empty (`/signals` answers 200 with no data, as for a
    /// car Smartcar has no data for yet, §10.5); `"all"` means every vehicle.
    pub empty_signals: Vec<String>,
    /// v3 signal codes answered with `status.value = UNAVAILABLE` and no body.
    pub unavailable_signals: Vec<String>,
    /// v3 signal codes answered SUCCESS with the body `{"value": null}` (and the unit, if any).
    pub null_signals: Vec<String>,
    /// Lower-case v3 signal groups (e.g. `charge`) locked by the app's plan (§10.6): each of
    /// their signals is an ERROR BILLING:INVALID_PLAN item with no body.
    pub locked_groups: Vec<String>,
    /// v3 `meta.oemUpdatedAt`/`retrievedAt` as ISO-8601 strings instead of epoch milliseconds.
    pub iso_timestamps: bool,
    /// The unit string of v3 distances: `kilometers` (default), `km`, `miles` or `mi` (any case);
    /// the mile ones convert the value.
    pub distance_unit: String,
    /// Number of simulated accounts (each Connect consent picks one).
    pub users: usize,
    pub vehicles_per_user: usize,
    /// `expires_in` of access tokens.
    pub access_token_lifetime: Duration,
    pub refresh_token_lifetime: Duration,
    /// How long an authorization code can be exchanged (Smartcar: 10 minutes).
    pub code_lifetime: Duration,
    /// How long a used refresh token is still accepted (Smartcar: about a minute).
    pub refresh_grace: Duration,
    /// How often a car reports new data; values change only at report times.
    pub report_interval: Duration,
    /// Simulated seconds per real second (60 = a simulated day every 24 minutes).
    pub time_scale: f64,
    /// Fleet seed: the same seed gives the same users, vehicle ids and VINs.
    pub seed: u64,
    /// Faults active from the start: per vehicle id, or fleet-wide (`None`).
    pub faults: Vec<(Option<String>, faults::Fault)>,
    /// Probability that any vehicle request gets a random transient fault (soak tests).
    pub fault_rate: f64,
    /// Answer latency of vehicle requests, uniform in [min, max]; requests wait concurrently.
    pub latency: Option<(Duration, Duration)>,
    /// Show Connect's consent page (vehicle picker, Approve/Deny) instead of auto-approving;
    /// `auto_approve=true` on the authorize URL still skips it.
    pub consent: bool,
    /// Enforce Smartcar's app-wide bucket: 120 requests, refilled at 2 per minute.
    pub app_rate_limit: bool,
    /// Per-vehicle limit: at most N requests (batch items each count) per window.
    pub vehicle_rate_limit: Option<(u32, Duration)>,
    /// Powertrains the fleet is drawn from, round-robin per vehicle from a seed-chosen start
    /// (e.g. `[Bev, Phev, Ice]` gives an even mix). Default all-BEV.
    pub powertrains: Vec<Powertrain>,
    /// Cars parked (not driving, not plugged in) for more than 2 simulated hours fall asleep:
    /// their report time and values stay at their last report until they next drive or plug in.
    /// Off by default so every car always has fresh data.
    pub sleeping_cars: bool,
    /// Entries `/_simulator/served` keeps per vehicle and kind (battery, charge, odometer); 0
    /// records nothing. Each entry is 16 bytes, so a vehicle costs up to 48 × this many bytes once
    /// it has been served for that many report times.
    pub served_log: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            client_id: "carpulse-demo".to_owned(),
            client_secret: "carpulse-demo-secret".to_owned(),
            api_client_id: "carpulse-demo-api".to_owned(),
            api_client_secret: "carpulse-demo-api-secret".to_owned(),
            management_token: "carpulse-demo-amt".to_owned(),
            app_token_lifetime: Duration::from_secs(3600),
            v3_auth: V3Auth::Both,
            redirect_without_code: false,
            empty_signals: Vec::new(),
            unavailable_signals: Vec::new(),
            null_signals: Vec::new(),
            locked_groups: Vec::new(),
            iso_timestamps: false,
            distance_unit: "kilometers".to_owned(),
            users: 1,
            vehicles_per_user: 2,
            access_token_lifetime: Duration::from_secs(7200),
            refresh_token_lifetime: Duration::from_secs(60 * 24 * 3600),
            code_lifetime: Duration::from_secs(600),
            refresh_grace: Duration::from_secs(60),
            report_interval: Duration::from_secs(5),
            time_scale: 60.0,
            seed: 1,
            faults: Vec::new(),
            fault_rate: 0.0,
            latency: None,
            consent: false,
            app_rate_limit: false,
            vehicle_rate_limit: None,
            powertrains: vec![Powertrain::Bev],
            sleeping_cars: false,
            served_log: stats::SERVED_LOG_LIMIT,
        }
    }
}

/// Which bearer tokens `/v3` accepts (`--v3-auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum V3Auth {
    /// Per-user Connect tokens only (the Nov-2025 SDK model); application tokens get 401.
    User,
    /// Application tokens with `sc-user-id` only (the 2026 docs model); per-user tokens get 401.
    App,
    /// Both (Smartcar: "your existing opaque tokens continue to work indefinitely").
    #[default]
    Both,
}

/// Hand-written so the client secrets never reach a log line through `{:?}`.
impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("api_client_id", &self.api_client_id)
            .field("api_client_secret", &"[redacted]")
            .field("management_token", &"[redacted]")
            .field("app_token_lifetime", &self.app_token_lifetime)
            .field("v3_auth", &self.v3_auth)
            .field("redirect_without_code", &self.redirect_without_code)
            .field("empty_signals", &self.empty_signals)
            .field("unavailable_signals", &self.unavailable_signals)
            .field("null_signals", &self.null_signals)
            .field("locked_groups", &self.locked_groups)
            .field("iso_timestamps", &self.iso_timestamps)
            .field("distance_unit", &self.distance_unit)
            .field("users", &self.users)
            .field("vehicles_per_user", &self.vehicles_per_user)
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("refresh_token_lifetime", &self.refresh_token_lifetime)
            .field("code_lifetime", &self.code_lifetime)
            .field("refresh_grace", &self.refresh_grace)
            .field("report_interval", &self.report_interval)
            .field("time_scale", &self.time_scale)
            .field("seed", &self.seed)
            .field("faults", &self.faults)
            .field("fault_rate", &self.fault_rate)
            .field("latency", &self.latency)
            .field("consent", &self.consent)
            .field("app_rate_limit", &self.app_rate_limit)
            .field("vehicle_rate_limit", &self.vehicle_rate_limit)
            .field("powertrains", &self.powertrains)
            .field("sleeping_cars", &self.sleeping_cars)
            .field("served_log", &self.served_log)
            .finish()
    }
}

/// `carpulse simulator` flags. `carpulse simulator --help` ends with [`ENDPOINTS_HELP`].
#[derive(clap::Args, Clone)]
#[command(after_long_help = ENDPOINTS_HELP)]
pub struct SimulatorArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// OAuth client id the simulator accepts.
    #[arg(long, default_value = "carpulse-demo")]
    pub client_id: String,
    /// OAuth client secret the simulator accepts.
    #[arg(long, default_value = "carpulse-demo-secret")]
    pub client_secret: String,
    /// Application Management Token the Management API (/v2.0/management/connections) accepts
    /// in `Authorization: Basic base64("default:" + AMT)`.
    #[arg(long, value_name = "AMT", default_value = "carpulse-demo-amt")]
    pub management_token: String,
    /// The v3 flags: API credentials, `--v3-auth`, the Connect redirect shape and the signal
    /// options.
    #[command(flatten)]
    pub v3: Box<V3Args>,
    /// Number of simulated user accounts.
    #[arg(long, default_value_t = 1)]
    pub users: usize,
    /// Vehicles per user account.
    #[arg(long, default_value_t = 2)]
    pub vehicles_per_user: usize,
    /// Access token lifetime in seconds (`expires_in`).
    #[arg(long = "token-lifetime", value_name = "SECONDS", default_value_t = 7200,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub token_lifetime: u64,
    /// Seconds a used refresh token is still accepted.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub refresh_grace: u64,
    /// Seconds between a car's data reports.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub report_interval: u64,
    /// Simulated seconds per real second (0 freezes the cars).
    #[arg(long, default_value_t = 60.0, value_parser = parse_time_scale)]
    pub time_scale: f64,
    /// Fleet seed: the same seed gives the same ids and VINs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A fault from the start, repeatable: KIND[@VEHICLE_ID][*COUNT], e.g. `asleep`,
    /// `rate_limit@<id>`, `server*3`. Kinds: rate_limit, app_rate_limit, asleep, unreachable,
    /// server, upstream, upstream_rate_limit, permission, connected_services_account,
    /// compatibility, billing, slow, malformed, drop, echo_error, html_error, huge, slow_drip,
    /// retry_after_date, absurd, endless_paging; at the token endpoint (fleet-wide only):
    /// invalid_request, odd_expires_in, no_refresh_token. Without @, fleet-wide; without *, until
    /// cleared through /_simulator/faults (a vehicle's connected_services_account fault also by
    /// the re-auth flow, /oauth/reauthenticate).
    #[arg(long = "fault", value_name = "SPEC", value_parser = faults::parse_spec)]
    pub faults: Vec<(Option<String>, faults::Fault)>,
    /// Probability (0–1) that a vehicle request gets a random transient fault (asleep, server,
    /// upstream, rate_limit), for soak tests.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_rate: f64,
    /// Answer latency of vehicle requests in seconds: `2` or a uniform range `3-45` (real cars
    /// answer in 3–45 s). Requests wait concurrently.
    #[arg(long, value_name = "SECONDS", value_parser = parse_latency)]
    pub latency: Option<(Duration, Duration)>,
    /// Show Connect's consent page (the permissions asked for, the user's vehicles, Approve/Deny)
    /// in the browser instead of approving at once; `&auto_approve=true` on the authorize URL
    /// skips it for scripts.
    #[arg(long)]
    pub consent: bool,
    /// Enforce Smartcar's app-wide rate limit: a bucket of 120 requests refilled at 2 per
    /// minute; past it, 429 RATE_LIMIT:SMARTCAR_API.
    #[arg(long)]
    pub app_rate_limit: bool,
    /// Per-vehicle rate limit, N/PERIOD (e.g. `20/1h`, `5/60s`): past it, 429
    /// RATE_LIMIT:VEHICLE with `retry-after`; each batch item counts. Off by default.
    #[arg(long, value_name = "N/PERIOD", value_parser = parse_rate)]
    pub vehicle_rate_limit: Option<(u32, Duration)>,
    /// Powertrains of the simulated fleet, comma-separated: bev, phev, ice. Vehicles take them
    /// in turn (`bev,phev,ice` = an even mix; repeat one to weight it, e.g. `bev,bev,ice`). ICE
    /// cars answer 501 on /battery and /charge, BEVs on /fuel and /engine/oil.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bev")]
    pub powertrains: Vec<Powertrain>,
    /// Cars parked for more than 2 simulated hours fall asleep, like real telematics units: they
    /// stop reporting (sc-data-age and every value stay at the last report) until they next drive
    /// or plug in. Off by default.
    #[arg(long)]
    pub sleeping_cars: bool,
    /// Served values `/_simulator/served` keeps per vehicle and kind, for checking carpulse
    /// against ground truth; 0 turns it off. Costs up to 48 bytes × N per served vehicle
    /// (N = 512: 24 KiB per vehicle, about 235 MiB for 10,000 vehicles once full).
    #[arg(long, value_name = "N", default_value_t = stats::SERVED_LOG_LIMIT)]
    pub served_log: usize,
}

/// The v3 flags of `carpulse simulator` (API Authentication, smartcar-api.md §10), flattened
/// into [`SimulatorArgs`]. Boxed there so the CLI's `Command` enum stays small.
#[derive(clap::Args, Clone)]
pub struct V3Args {
    /// API Credentials client id for v3 application tokens (POST /oauth2/token); Connect's
    /// client id is refused there.
    #[arg(long, default_value = "carpulse-demo-api")]
    pub api_client_id: String,
    /// API Credentials secret (sent in the /oauth2/token form body).
    #[arg(long, default_value = "carpulse-demo-api-secret")]
    pub api_client_secret: String,
    /// Application token lifetime in seconds (`expires_in`; Smartcar: 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub app_token_lifetime: u64,
    /// Tokens /v3 accepts: `user` (per-user Connect tokens), `app` (application token +
    /// sc-user-id) or `both`.
    #[arg(long, value_enum, default_value = "both")]
    pub v3_auth: V3Auth,
    /// Connect's success redirect carries only user_id and state, no code (the newest docs'
    /// shape); the approval still creates the connections.
    #[arg(long)]
    pub redirect_without_code: bool,
    /// Vehicles whose v3 signal store is empty (/signals answers 200 with no data), comma-
    /// separated ids, or `all`.
    #[arg(long, value_name = "ID[,ID..]|all", value_delimiter = ',')]
    pub empty_signals: Vec<String>,
    /// v3 signal codes answered with status UNAVAILABLE and no body, comma-separated.
    #[arg(long, value_name = "CODE[,..]", value_delimiter = ',',
          value_parser = v3::parse_signal_code)]
    pub unavailable_signals: Vec<String>,
    /// v3 signal codes answered SUCCESS with body {"value": null}, comma-separated.
    #[arg(long, value_name = "CODE[,..]", value_delimiter = ',',
          value_parser = v3::parse_signal_code)]
    pub null_signals: Vec<String>,
    /// v3 signal groups locked by the app's plan (e.g. `charge,location`): their signals are
    /// status ERROR with error BILLING:INVALID_PLAN and no body.
    #[arg(long, value_name = "GROUP[,..]", value_delimiter = ',',
          value_parser = v3::parse_group)]
    pub locked_groups: Vec<String>,
    /// v3 meta.oemUpdatedAt/retrievedAt as ISO-8601 strings instead of epoch milliseconds.
    #[arg(long)]
    pub iso_timestamps: bool,
    /// Unit string of v3 distances: kilometers, km, miles or mi (miles convert the value).
    #[arg(long, value_name = "STRING", default_value = "kilometers",
          value_parser = v3::parse_distance_unit)]
    pub distance_unit: String,
}

/// Hand-written so the API secret never reaches a log line through `{:?}`.
impl fmt::Debug for V3Args {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("V3Args")
            .field("api_client_id", &self.api_client_id)
            .field("api_client_secret", &"[redacted]")
            .field("app_token_lifetime", &self.app_token_lifetime)
            .field("v3_auth", &self.v3_auth)
            .field("redirect_without_code", &self.redirect_without_code)
            .field("empty_signals", &self.empty_signals)
            .field("unavailable_signals", &self.unavailable_signals)
            .field("null_signals", &self.null_signals)
            .field("locked_groups", &self.locked_groups)
            .field("iso_timestamps", &self.iso_timestamps)
            .field("distance_unit", &self.distance_unit)
            .finish()
    }
}

/// What `carpulse simulator --help` says after the flags: the endpoints the simulator serves and
/// how consent, permissions and the re-auth flow behave. (Attached to [`SimulatorArgs`] with
/// `#[command(after_long_help)]`, so `-h` stays short.)
pub const ENDPOINTS_HELP: &str = "\
Endpoints (base http://<listen address>; smartcar-api.md has the shapes):
  GET  /oauth/authorize          Connect. response_type=code, client_id, redirect_uri, state,
                                 scope, mode, user (id or 1-based index), auto_approve. 302 to
                                 redirect_uri?code=...&user_id=...&state=... (only user_id and
                                 state with --redirect-without-code; the consent page with
                                 --consent). An approval connects the user's vehicles (those
                                 chosen on the consent page) and grants exactly `scope`
                                 (space-separated; a `required:` prefix is stripped); without
                                 scope it grants the default set: read_vehicle_info read_vin
                                 read_battery read_charge read_odometer read_location read_tires
                                 read_fuel read_engine_oil.
  GET  /oauth/reauthenticate     Connect's re-auth flow: response_type=vehicle_id, client_id,
                                 vehicle_id, redirect_uri, state. 302 to
                                 redirect_uri?vehicle_id=...&state=...; clears the vehicle's
                                 connected_services_account fault (the owner fixed their login).
                                 Tokens are untouched. 400 (text) for a bad request.
  POST /oauth/token              Code exchange and refresh (Basic auth with the Connect client).
                                 Tokens carry the scope of their consent; each rotation keeps it.
  POST /oauth2/token             v3 application token: grant_type=client_credentials with the
                                 API credentials (--api-client-id/--api-client-secret, not
                                 Connect's) as client_id and client_secret in the form body (a
                                 Basic header is not read). 400 invalid_request when missing or
                                 malformed, 401 invalid_client when wrong. {access_token,
                                 token_type: Bearer, expires_in: --app-token-lifetime}, no
                                 refresh token; 401 AUTHENTICATION once expired.
  GET  /v2.0/user, /v2.0/vehicles          (per-user tokens only; an app token gets 401)
  GET  /v2.0/vehicles/{id}[/vin|/battery|/battery/capacity|/battery/nominal_capacity|/charge|
       /charge/limit|/odometer|/location|/tires/pressure|/fuel|/engine/oil]
  GET  /v2.0/vehicles/{id}/permissions   the granted scope, paged (limit 1-50, offset)
  POST /v2.0/vehicles/{id}/batch
  GET  /v3/vehicles/{id}, /v3/vehicles/{id}/signals[?page=&pageSize=],
       /v3/vehicles/{id}/signals/{code}
  GET  /v3/connections           the (user, vehicle) pairs approved in Connect, app token only:
                                 filter[userId] (or sc-user-id), filter[vehicleId], filter[mode]
                                 (also userId/user_id, vehicleId/vehicle_id, mode),
                                 page[number], page[size] 1-100, default 10 (also page,
                                 pageSize). {data, meta {page, pageSize, totalCount}, links
                                 {self, first, previous, next, last}} with links relative to the
                                 server root. Not rate limited, no faults, no latency.
  GET  /v3/connections/{id}      {data: connection}, or 404 RESOURCE_NOT_FOUND.
  GET  /v2.0/management/connections    Management API: the same connections, newest first.
                                 Authorization: Basic base64(\"default:\" + AMT), AMT =
                                 --management-token (else 401 AUTHENTICATION, v2 error object).
                                 Filters user_id, vehicle_id, mode; limit 1-100, default 10;
                                 cursor = the previous page's paging.cursor. {connections
                                 [{userId, vehicleId, connectedAt, mode}], paging {cursor}},
                                 cursor null on the last page. 400 VALIDATION for a bad limit,
                                 cursor or mode.
  DELETE /v2.0/management/connections  user_id or vehicle_id (neither or both: 400): deletes
                                 those connections, each like /_simulator/revoke
                                 {\"vehicle_id\"} (its owner's tokens get 401 on it; back with a
                                 new Connect approval). {connections [{userId, vehicleId}]},
                                 empty when none matched. Neither is rate limited, faulted or
                                 delayed.

v3 authentication (--v3-auth, default both): a per-user Connect token (Bearer, no sc-user-id
needed; if sent it must be the token's user) is accepted unless --v3-auth app (then 401). The
application token (refused with --v3-auth user) names the user in the sc-user-id header on
/v3/vehicles/**: missing or empty: 400 VALIDATION:MISSING_PARAMETER \"missing userId\"; no such
user: 400 VALIDATION:INVALID_PARAMETER; a user who does not own the vehicle, never approved it
in Connect, or revoked it: 403 AUTHENTICATION:ACCESS_DENIED. It reads with the scope of that
user's latest approval of the vehicle. Every v3 error is {\"errors\": [{status (a string), type,
code, title, detail, resolution, links, meta.debug.requestId (= the sc-request-id header)}]}.

v3 signal options: --empty-signals (200 with no data, single signals 404
RESOURCE_NOT_FOUND:SIGNAL_NOT_FOUND), --unavailable-signals (status UNAVAILABLE, no body),
--null-signals (SUCCESS, body {\"value\": null} plus the unit), --locked-groups (status ERROR,
error BILLING:INVALID_PLAN, no body), --iso-timestamps (meta times as ISO-8601, default epoch
ms), --distance-unit (unit of tractionbattery-range, odometer-traveleddistance and
internalcombustionengine-range). Values not served this way are not in /_simulator/served.

Permissions: / needs read_vehicle_info, /vin read_vin, /battery* read_battery, /charge*
read_charge, /odometer read_odometer, /location read_location, /tires/pressure read_tires,
/fuel read_fuel, /engine/oil read_engine_oil. v3 signals: tractionbattery-* and
lowvoltagebattery-* read_battery, charge-* read_charge, odometer-* read_odometer, location-*
read_location, vehicleidentification-vin read_vin, internalcombustionengine-oillife
read_engine_oil, other internalcombustionengine-* read_fuel. Without it: 403 PERMISSION (code
null, resolution REAUTHENTICATE); a batch item gets that error with code 403; a signal list
shows the signal with status ERROR, error type PERMISSION. /v2.0/user, /v2.0/vehicles,
/v2.0/vehicles/{id}/permissions and /v3/vehicles/{id} need no permission.

Introspection (not Smartcar):
  GET /_simulator/stats          counters: requests, v2_requests, v3_requests (vehicle requests;
                                 not /v3/connections), authorizations, code_exchanges,
                                 refreshes, token_errors, expired_token_requests,
                                 unknown_token_requests, revoked_token_uses, faults_served,
                                 permission_denied, reauthentications, missing_user_id,
                                 wrong_user_id, revoked_user_requests, user_tokens_on_v3,
                                 app_tokens_issued, app_token_expired_uses, app_tokens_on_v2,
                                 connections_requests, management_requests, ...
  GET /_simulator/vehicles       users and their vehicles
  GET /_simulator/served?vehicle_id=ID   values served, for checking against ground truth
  GET|POST|DELETE /_simulator/faults     set or clear faults ({\"kind\", \"vehicle_id\"?,
                                 \"count\"?, \"retry_after\"?} or {\"random_rate\"})
  POST /_simulator/revoke        {\"user\"}: revoke the user's tokens and connections (back
                                 with a new Connect approval); {\"vehicle_id\"}: only that
                                 vehicle's connection
";

/// `20/1h`: a count and a period (s, m, h).
fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, period) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not N/PERIOD (e.g. 20/1h)"))?;
    let n: u32 = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: N must be a positive whole number"))?;
    let period = crate::config::parse_duration(period)?;
    if period.is_zero() {
        return Err(format!("{s:?}: the period must be more than 0"));
    }
    Ok((n, period))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("must be a number from 0 to 1".to_owned()),
    }
}

/// `2`, `0.5` or `3-45` seconds.
pub fn parse_latency(s: &str) -> Result<(Duration, Duration), String> {
    let secs = |x: &str| match x.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{x:?} is not a number of seconds")),
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (secs(a)?, secs(b)?),
        None => (secs(s)?, secs(s)?),
    };
    if hi < lo {
        return Err(format!("{s:?}: the range must go from low to high"));
    }
    Ok((lo, hi))
}

/// Hand-written so the client secrets never reach a log line through `{:?}`.
impl fmt::Debug for SimulatorArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorArgs")
            .field("listen", &self.listen)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("management_token", &"[redacted]")
            .field("v3", &self.v3)
            .field("users", &self.users)
            .field("vehicles_per_user", &self.vehicles_per_user)
            .field("token_lifetime", &self.token_lifetime)
            .field("refresh_grace", &self.refresh_grace)
            .field("report_interval", &self.report_interval)
            .field("time_scale", &self.time_scale)
            .field("seed", &self.seed)
            .field("faults", &self.faults)
            .field("fault_rate", &self.fault_rate)
            .field("latency", &self.latency)
            .field("consent", &self.consent)
            .field("app_rate_limit", &self.app_rate_limit)
            .field("vehicle_rate_limit", &self.vehicle_rate_limit)
            .field("powertrains", &self.powertrains)
            .field("sleeping_cars", &self.sleeping_cars)
            .field("served_log", &self.served_log)
            .finish()
    }
}

fn parse_time_scale(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err("must be a finite number ≥ 0".to_owned())
    }
}

impl SimulatorArgs {
    pub fn to_config(&self) -> SimulatorConfig {
        SimulatorConfig {
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            api_client_id: self.v3.api_client_id.clone(),
            api_client_secret: self.v3.api_client_secret.clone(),
            management_token: self.management_token.clone(),
            app_token_lifetime: Duration::from_secs(self.v3.app_token_lifetime),
            v3_auth: self.v3.v3_auth,
            redirect_without_code: self.v3.redirect_without_code,
            empty_signals: self.v3.empty_signals.clone(),
            unavailable_signals: self.v3.unavailable_signals.clone(),
            null_signals: self.v3.null_signals.clone(),
            locked_groups: self.v3.locked_groups.clone(),
            iso_timestamps: self.v3.iso_timestamps,
            distance_unit: self.v3.distance_unit.clone(),
            users: self.users,
            vehicles_per_user: self.vehicles_per_user,
            access_token_lifetime: Duration::from_secs(self.token_lifetime),
            refresh_grace: Duration::from_secs(self.refresh_grace),
            report_interval: Duration::from_secs(self.report_interval),
            time_scale: self.time_scale,
            seed: self.seed,
            faults: self.faults.clone(),
            fault_rate: self.fault_rate,
            latency: self.latency,
            consent: self.consent,
            app_rate_limit: self.app_rate_limit,
            vehicle_rate_limit: self.vehicle_rate_limit,
            powertrains: self.powertrains.clone(),
            sleeping_cars: self.sleeping_cars,
            served_log: self.served_log,
            ..SimulatorConfig::default()
        }
    }
}

/// Everything a request handler needs; shared read-mostly behind an `Arc`.
pub(crate) struct Sim {
    pub(crate) cfg: SimulatorConfig,
    pub(crate) fleet: Fleet,
    pub(crate) clock: SimClock,
    pub(crate) tokens: oauth::TokenStore,
    pub(crate) stats: Stats,
    pub(crate) served: ServedLog,
    pub(crate) faults: faults::Faults,
    /// The (user, vehicle) pairs approved in Connect: what an application token can reach.
    pub(crate) connections: connections::Connections,
    /// The v3 signal options of the configuration, validated and indexed.
    pub(crate) signal_options: v3::SignalOptions,
    /// Vehicles a user chose on the consent page; a user absent here granted all of theirs.
    grants: std::sync::Mutex<HashMap<usize, std::collections::HashSet<String>>>,
    /// The app-wide bucket: (tokens left, when last refilled).
    bucket: std::sync::Mutex<(f64, UnixMillis)>,
    /// `http://{bound address}`, set by [`serve`]; the base of the re-auth `resolution.url`.
    base_url: std::sync::OnceLock<String>,
}

/// Who a bearer token speaks for and what their consent granted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    /// Index of the user in the fleet.
    pub(crate) user: usize,
    pub(crate) scope: Scope,
}

impl Caller {
    /// 403 PERMISSION unless the consent granted `permission` (counted in `permission_denied`).
    pub(crate) fn require(&self, sim: &Sim, permission: &str) -> Result<(), ApiError> {
        if self.scope.allows(permission) {
            Ok(())
        } else {
            bump(&sim.stats.permission_denied);
            Err(ApiError::permission())
        }
    }
}

/// Smartcar's default app-wide bucket (smartcar-api.md §2.4).
const BUCKET_SIZE: f64 = 120.0;
const BUCKET_REFILL_PER_MS: f64 = 2.0 / 60_000.0;

pub(crate) type SimState = Arc<Sim>;

/// What a `/v3` request's bearer token turned out to be (see [`Sim::authenticate_v3`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum V3Bearer {
    /// A per-user Connect token.
    User(Caller),
    /// The application token: the user comes from `sc-user-id`.
    App,
}

impl Sim {
    fn new(cfg: SimulatorConfig, now: UnixMillis) -> anyhow::Result<Sim> {
        anyhow::ensure!(
            cfg.users >= 1,
            "the simulator needs at least one user (users = 0)"
        );
        anyhow::ensure!(
            cfg.time_scale.is_finite() && cfg.time_scale >= 0.0,
            "time_scale must be a finite number ≥ 0 (got {})",
            cfg.time_scale
        );
        let report_interval_ms = i64::try_from(cfg.report_interval.as_millis()).unwrap_or(i64::MAX);
        anyhow::ensure!(
            report_interval_ms >= 1,
            "report_interval must be at least 1 ms"
        );
        let fleet = Fleet::generate(
            cfg.seed,
            cfg.users,
            cfg.vehicles_per_user,
            report_interval_ms,
            &cfg.powertrains,
        );
        // Simulated time starts at the beginning of the current UTC day, so a restart on the same
        // day continues the same trajectories and the odometer starts near its base value.
        let anchor_ms = now - now.rem_euclid(86_400_000);
        let clock = SimClock {
            anchor_ms,
            time_scale: cfg.time_scale,
            report_interval_ms,
            sleeping: cfg.sleeping_cars,
        };
        let faults = faults::Faults::default();
        for (vehicle, fault) in &cfg.faults {
            if let Some(v) = vehicle {
                anyhow::ensure!(
                    fleet.vehicle(v).is_some(),
                    "--fault names an unknown vehicle {v}"
                );
            }
            faults.set(vehicle.clone(), fault.clone());
        }
        faults.set_random_rate(cfg.fault_rate);
        let signal_options = v3::SignalOptions::new(&cfg, &fleet)?;
        Ok(Sim {
            // Before `cfg` moves in.
            served: ServedLog::new(cfg.served_log),
            cfg,
            fleet,
            clock,
            tokens: oauth::TokenStore::default(),
            stats: Stats::default(),
            faults,
            connections: Default::default(),
            signal_options,
            grants: Default::default(),
            bucket: std::sync::Mutex::new((BUCKET_SIZE, now)),
            base_url: std::sync::OnceLock::new(),
        })
    }

    /// Checks a `/v2.0` bearer token and returns its user and granted scope, counting unknown,
    /// expired and revoked tokens (carpulse should refresh before expiry and never send a token
    /// it was not given). Only per-user Connect tokens: an application token is a v3 credential
    /// (401, counted in `app_tokens_on_v2`).
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        match self.check_bearer(headers) {
            oauth::AccessCheck::Valid { user, scope } => Ok(Caller { user, scope }),
            check @ (oauth::AccessCheck::App | oauth::AccessCheck::AppExpired) => {
                bump(&self.stats.app_tokens_on_v2);
                if check == oauth::AccessCheck::AppExpired {
                    bump(&self.stats.app_token_expired_uses);
                }
                Err(ApiError::authentication())
            }
            other => Err(self.refuse(other)),
        }
    }

    /// Checks a `/v3` bearer token. A per-user Connect token counts `user_tokens_on_v3` (valid
    /// or not) and is refused with `--v3-auth app`; the application token is refused with
    /// `--v3-auth user`, and after its expiry (counted in `app_token_expired_uses`).
    pub(crate) fn authenticate_v3(&self, headers: &HeaderMap) -> Result<V3Bearer, ApiError> {
        let check = self.check_bearer(headers);
        if matches!(
            check,
            oauth::AccessCheck::Valid { .. }
                | oauth::AccessCheck::Expired
                | oauth::AccessCheck::Revoked
        ) {
            bump(&self.stats.user_tokens_on_v3);
        }
        match check {
            oauth::AccessCheck::Valid { user, scope } if self.cfg.v3_auth != V3Auth::App => {
                Ok(V3Bearer::User(Caller { user, scope }))
            }
            oauth::AccessCheck::App if self.cfg.v3_auth != V3Auth::User => Ok(V3Bearer::App),
            oauth::AccessCheck::Valid { .. } | oauth::AccessCheck::App => {
                Err(ApiError::authentication())
            }
            oauth::AccessCheck::AppExpired => {
                bump(&self.stats.app_token_expired_uses);
                Err(ApiError::authentication())
            }
            other => Err(self.refuse(other)),
        }
    }

    /// What the `Authorization: Bearer` header holds (`Unknown` when there is none).
    fn check_bearer(&self, headers: &HeaderMap) -> oauth::AccessCheck {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match token {
            Some(token) => self.tokens.check_access(token, now_ms()),
            None => oauth::AccessCheck::Unknown,
        }
    }

    /// 401 AUTHENTICATION for a revoked, expired or unknown per-user token, counted.
    fn refuse(&self, check: oauth::AccessCheck) -> ApiError {
        let counter = match check {
            oauth::AccessCheck::Revoked => &self.stats.revoked_token_uses,
            oauth::AccessCheck::Expired => &self.stats.expired_token_requests,
            _ => &self.stats.unknown_token_requests,
        };
        bump(counter);
        ApiError::authentication()
    }

    /// The vehicle an application-token request may reach (2026 model, smartcar-api.md §10.1,
    /// §10.4): `sc-user-id` must name a user of the fleet (missing: 400 VALIDATION:
    /// MISSING_PARAMETER "missing userId", counted in `missing_user_id`; no such user: 400
    /// VALIDATION:INVALID_PARAMETER, `wrong_user_id`), and that user must own the vehicle
    /// (`wrong_user_id`) and have a connection to it: approved in Connect and not revoked since
    /// (`revoked_user_requests` if revoked). Otherwise 403 AUTHENTICATION:ACCESS_DENIED. The
    /// caller acts with the connection's scope.
    pub(crate) fn app_caller_for_vehicle(
        &self,
        headers: &HeaderMap,
        id: &str,
    ) -> Result<(Caller, &Vehicle), ApiError> {
        let claimed = match headers.get("sc-user-id").map(|v| v.to_str()) {
            None => None,
            Some(Ok(v)) => Some(v.trim()).filter(|v| !v.is_empty()),
            Some(Err(_)) => {
                bump(&self.stats.wrong_user_id);
                return Err(ApiError::invalid_parameter(
                    "sc-user-id is not a valid user id.",
                ));
            }
        };
        let Some(claimed) = claimed else {
            bump(&self.stats.missing_user_id);
            return Err(ApiError::missing_user_id());
        };
        let Some(user) = self.fleet.user_by_id(claimed) else {
            bump(&self.stats.wrong_user_id);
            return Err(ApiError::invalid_parameter(
                "sc-user-id names no user of this application.",
            ));
        };
        let Some((owner, index)) = self.fleet.vehicle_position(id) else {
            // Like Smartcar, an unknown vehicle is not told apart from someone else's.
            return Err(ApiError::access_denied());
        };
        if owner != user {
            bump(&self.stats.wrong_user_id);
            return Err(ApiError::access_denied());
        }
        match self.connections.access((owner, index)) {
            connections::Access::Connected(scope) => Ok((
                Caller { user, scope },
                &self.fleet.users[owner].vehicles[index],
            )),
            connections::Access::Revoked => {
                bump(&self.stats.revoked_user_requests);
                Err(ApiError::access_denied())
            }
            connections::Access::None => Err(ApiError::access_denied()),
        }
    }

    /// The vehicle `id` if the user owns it and their consent covers it; VEHICLE_MISSING
    /// otherwise (also for ids that do not exist, as Smartcar does not tell other users' vehicles
    /// from non-existent ones). A vehicle whose connection was revoked (`/_simulator/revoke`
    /// with `vehicle_id`) answers 401 AUTHENTICATION until its owner approves it again, counted
    /// in `revoked_token_uses`. Checks no fault or limit: see [`Sim::admit`].
    pub(crate) fn vehicle_of(&self, user: usize, id: &str) -> Result<&Vehicle, ApiError> {
        match self.fleet.vehicle_position(id) {
            Some((owner, index)) if owner == user && self.granted(user, id) => {
                if self.connections.is_revoked((owner, index)) {
                    bump(&self.stats.revoked_token_uses);
                    return Err(ApiError::authentication());
                }
                Ok(&self.fleet.users[owner].vehicles[index])
            }
            _ => Err(ApiError::vehicle_missing()),
        }
    }

    /// Whether a per-user token of `user` reaches the vehicle: covered by their consent and its
    /// connection not revoked (what `/v2.0/vehicles` lists).
    pub(crate) fn lists_vehicle(&self, user: usize, id: &str) -> bool {
        self.granted(user, id)
            && !self
                .fleet
                .vehicle_position(id)
                .is_some_and(|pair| self.connections.is_revoked(pair))
    }

    /// Records an approved Connect consent as connections: to the `chosen` vehicles (all of the
    /// user's when `None`), with `scope`.
    pub(crate) fn connect(
        &self,
        user: usize,
        chosen: Option<&std::collections::HashSet<String>>,
        scope: Scope,
        now: UnixMillis,
    ) {
        let u = &self.fleet.users[user];
        let pairs = u
            .vehicles
            .iter()
            .enumerate()
            .filter(|(_, v)| chosen.is_none_or(|c| c.contains(&v.id)))
            .map(|(index, v)| {
                (
                    (user, index),
                    connections::connection_id(self.cfg.seed, &u.id, &v.id),
                )
            });
        self.connections.approve(pairs, scope, now);
    }

    /// Lets one request through to the vehicle, counting `cost` times against its rate limit (a
    /// batch counts each item), or answers its fault. Permission checks come before this, as
    /// Smartcar refuses them without asking the car.
    pub(crate) fn admit(&self, vehicle: &Vehicle, cost: u32) -> Result<(), ApiError> {
        let now = now_ms();
        self.faults
            .check(&vehicle.id, now, &self.stats)
            .map_err(|e| self.with_reauth_url(e, &vehicle.id))?;
        if let Some((max, window)) = self.cfg.vehicle_rate_limit {
            let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 4);
            self.faults
                .limit(&vehicle.id, cost, now, (max, window_ms))?;
        }
        Ok(())
    }

    /// [`Sim::vehicle_of`] then [`Sim::admit`] at a cost of `cost` requests.
    pub(crate) fn owned_vehicle_costing(
        &self,
        user: usize,
        id: &str,
        cost: u32,
    ) -> Result<&Vehicle, ApiError> {
        let vehicle = self.vehicle_of(user, id)?;
        self.admit(vehicle, cost)?;
        Ok(vehicle)
    }

    /// An AUTHENTICATION_FAILED error gets the re-auth flow for the vehicle as its
    /// `resolution.url`, as Smartcar's does (relative if the bound address is unknown).
    fn with_reauth_url(&self, e: ApiError, vehicle_id: &str) -> ApiError {
        if e.code != Some("AUTHENTICATION_FAILED") {
            return e;
        }
        let base = self.base_url.get().map(String::as_str).unwrap_or("");
        e.with_resolution_url(format!(
            "{base}/oauth/reauthenticate?response_type=vehicle_id&client_id={}&vehicle_id={}",
            oauth::query_encode(&self.cfg.client_id),
            oauth::query_encode(vehicle_id),
        ))
    }
}

impl Sim {
    /// Records the vehicles a user approved on the consent page.
    pub(crate) fn grant(&self, user: usize, vehicles: std::collections::HashSet<String>) {
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user, vehicles);
    }

    /// Whether the user's consent covers the vehicle.
    pub(crate) fn granted(&self, user: usize, vehicle_id: &str) -> bool {
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
            .is_none_or(|set| set.contains(vehicle_id))
    }

    /// Takes one request from the app-wide bucket; false when it is empty.
    fn take_from_bucket(&self, now: UnixMillis) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let refilled = (b.0 + (now - b.1) as f64 * BUCKET_REFILL_PER_MS).min(BUCKET_SIZE);
        *b = (refilled, now);
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The vehicle id in a vehicle API path (`/v2.0/vehicles/{id}/...`, `/v3/vehicles/{id}/...`).
fn vehicle_in_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v2.0/vehicles/")
        .or_else(|| path.strip_prefix("/v3/vehicles/"))?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// A body that fails after the headers went out: the client sees the connection drop mid-answer.
struct DroppedBody;

impl axum::body::HttpBody for DroppedBody {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))))
    }
}

/// ISO-8601 UTC with milliseconds, the format of `sc-data-age` and `sc-fetched-at`.
pub(crate) fn iso_ms(ms: UnixMillis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A JSON 200 with `sc-request-id` and any extra headers.
pub(crate) fn api_json(
    request_id: &str,
    body: Value,
    extra: &[(&'static str, String)],
) -> Response {
    let mut response = (StatusCode::OK, Json(body)).into_response();
    let headers = response.headers_mut();
    for (name, value) in std::iter::once(&("sc-request-id", request_id.to_owned())).chain(extra) {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(*name, value);
        }
    }
    response
}

/// The router with every endpoint, for [`serve`].
fn router(sim: SimState) -> Router {
    Router::new()
        .route("/oauth/authorize", get(oauth::authorize))
        .route("/oauth/authorize/decision", post(consent::decision))
        .route("/oauth/reauthenticate", get(oauth::reauthenticate))
        .route("/oauth/token", post(oauth::token))
        .route("/oauth2/token", post(oauth::app_token))
        .route("/v2.0/user", get(v2::user))
        .route("/v2.0/vehicles", get(v2::vehicles))
        .route("/v2.0/vehicles/{id}", get(v2::vehicle_root))
        .route("/v2.0/vehicles/{id}/batch", post(v2::batch))
        .route("/v2.0/vehicles/{id}/{*rest}", get(v2::vehicle_resource))
        .route("/v3/vehicles/{id}", get(v3::vehicle))
        .route("/v3/vehicles/{id}/signals", get(v3::signals))
        .route("/v3/vehicles/{id}/signals/{code}", get(v3::signal))
        .route("/v3/connections", get(connections::list))
        .route("/v3/connections/{id}", get(connections::one))
        .route(
            "/v2.0/management/connections",
            get(management::list).delete(management::delete),
        )
        .route("/_simulator/stats", get(stats_handler))
        .route("/_simulator/vehicles", get(vehicles_handler))
        .route("/_simulator/served", get(served_handler))
        .route(
            "/_simulator/faults",
            get(faults_list).post(faults_set).delete(faults_clear),
        )
        .route("/_simulator/revoke", post(revoke_handler))
        .route("/_simulator/tokens", get(tokens_handler))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(sim.clone(), log_and_count))
        .with_state(sim)
}

/// `router` answering `/v2.0/vehicles/{id}/` like `/v2.0/vehicles/{id}`, as Smartcar does: the
/// official SDKs ask for some resources with a trailing slash (Python `Vehicle.attributes()`,
/// Node `getUser()`, `getVehicles()`, `attributes()`, `getVehicle()`). The slash is trimmed before
/// routing, so every route takes it; `Router::layer` runs after routing, hence the outer router.
fn trailing_slash_tolerant(router: Router) -> Router {
    Router::new()
        .fallback_service(router)
        .layer(middleware::map_request(trim_trailing_slash))
}

async fn trim_trailing_slash(mut request: Request) -> Request {
    let path = request.uri().path();
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() || trimmed.len() == path.len() {
        return request;
    }
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{trimmed}?{query}"),
        None => trimmed.to_owned(),
    };
    let Ok(path_and_query) = path_and_query.parse() else {
        return request;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// One debug line per request (method, path, status, time; never the query, headers or body,
/// which carry codes and tokens) and the request counters.
async fn log_and_count(State(sim): State<SimState>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // Connections are account data, not vehicle requests: no latency, no app-wide bucket, not
    // counted in v2_requests or v3_requests (they have their own counters).
    let is_connections = path == "/v3/connections"
        || path.starts_with("/v3/connections/")
        || management::is_management(&path);
    let is_api = (path == "/v2.0" || path.starts_with("/v2.0/") || path.starts_with("/v3/"))
        && !is_connections;
    if !path.starts_with("/_simulator/") {
        bump(&sim.stats.requests);
        if (path == "/v2.0" || path.starts_with("/v2.0/")) && !is_connections {
            bump(&sim.stats.v2_requests);
        } else if path.starts_with("/v3/") && !is_connections {
            bump(&sim.stats.v3_requests);
        }
    }
    let started = Instant::now();
    if let Some((lo, hi)) = sim.cfg.latency {
        if is_api {
            // A sleep, not a blocked thread: hundreds of slow answers wait side by side.
            let wait = if hi > lo {
                lo + (hi - lo).mul_f64(rand::random::<f64>())
            } else {
                lo
            };
            tokio::time::sleep(wait).await;
        }
    }
    if is_api && sim.cfg.app_rate_limit && !sim.take_from_bucket(now_ms()) {
        bump(&sim.stats.app_rate_limited);
        let api = if path.starts_with("/v3/") {
            Api::V3
        } else {
            Api::V2
        };
        return faults::FaultKind::AppRateLimit
            .error(0)
            .into_api_response(api, &fleet::random_uuid());
    }
    let transport = if path == "/oauth/token" {
        sim.faults.token(&sim.stats)
    } else {
        vehicle_in_path(&path).and_then(|id| sim.faults.transport(id, &sim.stats))
    };
    if let Some(f) = &transport {
        if f.kind == faults::FaultKind::Slow {
            tokio::time::sleep(Duration::from_secs_f64(f.delay.max(0.0))).await;
        }
        let api = if path.starts_with("/v3/") {
            Api::V3
        } else {
            Api::V2
        };
        if let Some(r) = hostile::before(f, request.headers(), api) {
            return r;
        }
    }
    // The v3 listing page asked for (endless paging links one further).
    let page = request
        .uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("page="))
                .and_then(|p| p.parse::<usize>().ok())
        })
        .unwrap_or(1);
    let mut response = next.run(request).await;
    if let Some(f) = &transport {
        response = hostile::after(f, response, page).await;
    }
    match transport.map(|f| f.kind) {
        Some(faults::FaultKind::Malformed) if response.status().is_success() => {
            *response.body_mut() = axum::body::Body::from("{\"percentRemaining\": 0.5, \"ran");
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        Some(faults::FaultKind::Drop) => {
            *response.body_mut() = axum::body::Body::new(DroppedBody);
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        _ => {}
    }
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "simulator request"
    );
    response
}

/// Unknown paths: the API's own 404 under `/v2.0` and `/v3`, plain text elsewhere.
async fn not_found(request: Request) -> Response {
    let path = request.uri().path();
    let request_id = fleet::random_uuid();
    if path == "/v2.0" || path.starts_with("/v2.0/") {
        ApiError::path_not_found().into_api_response(Api::V2, &request_id)
    } else if path == "/v3" || path.starts_with("/v3/") {
        ApiError::path_not_found().into_api_response(Api::V3, &request_id)
    } else {
        (StatusCode::NOT_FOUND, "Not found\n").into_response()
    }
}

/// `POST /_simulator/revoke` with `{"user": "<id or 1-based index>"}`: the user's connection is
/// revoked: their tokens get 401 / `invalid_grant` until they connect again (a code exchange),
/// their connections disappear from `/v3/connections`, and application-token requests naming
/// them get 403 AUTHENTICATION:ACCESS_DENIED until a new Connect approval. With
/// `{"vehicle_id": ...}` only that vehicle's connection goes: its owner's tokens get 401 on it
/// (and only on it) and the app token 403, until the owner approves it again.
async fn revoke_handler(State(sim): State<SimState>, body: axum::body::Bytes) -> Response {
    let bad = |msg: &str| (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response();
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body must be JSON");
    };
    let by_user = v.get("user").and_then(|u| match u {
        Value::String(s) => sim
            .fleet
            .user_by_id(s)
            .or_else(|| s.parse::<usize>().ok().and_then(|n| n.checked_sub(1))),
        Value::Number(n) => n.as_u64().and_then(|n| (n as usize).checked_sub(1)),
        _ => None,
    });
    let by_vehicle = v
        .get("vehicle_id")
        .and_then(Value::as_str)
        .and_then(|id| sim.fleet.vehicle_position(id));
    match (by_user.filter(|u| *u < sim.fleet.users.len()), by_vehicle) {
        (Some(user), _) => {
            sim.tokens.revoke(user);
            let connections = sim.connections.revoke(|(u, _)| u == user).len();
            Json(json!({"revoked": sim.fleet.users[user].id, "connections": connections}))
                .into_response()
        }
        (None, Some(pair)) => {
            let connections = sim.connections.revoke(|p| p == pair).len();
            let owner = &sim.fleet.users[pair.0];
            Json(json!({
                "revoked": owner.id,
                "vehicle_id": owner.vehicles[pair.1].id,
                "connections": connections,
            }))
            .into_response()
        }
        (None, None) => bad("name a known `user` (id or 1-based index) or `vehicle_id`"),
    }
}

async fn faults_list(State(sim): State<SimState>) -> Json<Value> {
    Json(sim.faults.to_json())
}

/// `POST /_simulator/faults` with `{"kind": "...", "vehicle_id"?: "...", "count"?: n,
/// "retry_after"?: seconds}`, or `{"random_rate": p}`.
async fn faults_set(State(sim): State<SimState>, body: axum::body::Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Body {
        vehicle_id: Option<String>,
        #[serde(flatten)]
        fault: Option<faults::Fault>,
        random_rate: Option<f64>,
    }
    let bad =
        |msg: String| (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response();
    let b: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(format!("not a fault: {e}")),
    };
    if let Some(v) = &b.vehicle_id {
        if sim.fleet.vehicle(v).is_none() {
            return bad(format!("unknown vehicle_id {v}"));
        }
    }
    match (b.fault, b.random_rate) {
        (Some(f), _) => sim.faults.set(b.vehicle_id, f),
        (None, Some(p)) if (0.0..=1.0).contains(&p) => sim.faults.set_random_rate(p),
        _ => return bad("give a `kind` or a `random_rate` from 0 to 1".to_owned()),
    }
    Json(sim.faults.to_json()).into_response()
}

/// `DELETE /_simulator/faults[?vehicle_id=ID]`: one vehicle's fault, or all of them.
async fn faults_clear(
    State(sim): State<SimState>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    sim.faults.clear(q.get("vehicle_id").map(String::as_str));
    Json(sim.faults.to_json())
}

/// Test introspection: every token string issued in the last day (`access`, `refresh`, `app`).
/// The simulator's tokens are worthless outside it; a test checks that none of them reached a
/// file or log line it must not.
async fn tokens_handler(State(sim): State<SimState>) -> Json<Value> {
    let (access, refresh, app) = sim.tokens.issued();
    Json(json!({ "access": access, "refresh": refresh, "app": app }))
}

async fn stats_handler(State(sim): State<SimState>) -> Json<Value> {
    Json(sim.stats.to_json())
}

async fn vehicles_handler(State(sim): State<SimState>) -> Json<Value> {
    let users: Vec<Value> = sim
        .fleet
        .users
        .iter()
        .map(|u| {
            let vehicles: Vec<Value> = u
                .vehicles
                .iter()
                .map(|v| json!({"id": v.id, "vin": v.vin, "make": v.make, "model": v.model, "year": v.year}))
                .collect();
            json!({"id": u.id, "vehicles": vehicles})
        })
        .collect();
    Json(json!({ "users": users }))
}

async fn served_handler(
    State(sim): State<SimState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match q.get("vehicle_id") {
        Some(id) if sim.fleet.vehicle(id).is_some() => Json(sim.served.to_json(id)).into_response(),
        Some(_) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown vehicle_id"})),
        )
            .into_response(),
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "vehicle_id is required"})),
        )
            .into_response(),
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: SimulatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sim = Arc::new(Sim::new(cfg, now_ms()).context("invalid simulator configuration")?);
    let addr = listener
        .local_addr()
        .context("reading the simulator's bound address")?;
    // A wildcard address is no place to send a browser; loopback is where it is reachable.
    let reachable = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let _ = sim.base_url.set(format!("http://{reachable}"));
    tracing::info!(
        %addr,
        users = sim.fleet.users.len(),
        vehicles_per_user = sim.cfg.vehicles_per_user,
        seed = sim.cfg.seed,
        "simulator serving"
    );
    axum::serve(listener, trailing_slash_tolerant(router(sim)))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("simulator server failed")?;
    tracing::info!(%addr, "simulator stopped");
    Ok(())
}

/// Binds `args.listen`, prints exactly one line to stdout
/// `carpulse simulator listening on http://{bound addr}` (flushed; tests parse it, so print it after
/// binding, with the real port when --listen uses port 0), then prints (stdout) the client id and the
/// base URLs to put in a carpulse config (connect_url, token_url, api_v2_url, api_v3_url), and as
/// comments the application-token endpoint and API client id, and serves until shutdown.
pub async fn run_cli(args: SimulatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = args.to_config();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the simulator to {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the simulator's bound address")?;
    let base = format!("http://{addr}");
    let mut out = std::io::stdout().lock();
    writeln!(out, "carpulse simulator listening on {base}").context("writing to stdout")?;
    write!(
        out,
        "\n# Point carpulse at the simulator with these [smartcar] settings:\n\
         client_id = \"{client_id}\"\n\
         # client_secret = the value of --client-secret (default \"carpulse-demo-secret\")\n\
         mode = \"simulated\"\n\
         connect_url = \"{base}/oauth/authorize\"\n\
         token_url = \"{base}/oauth/token\"\n\
         api_v2_url = \"{base}/v2.0\"\n\
         api_v3_url = \"{base}/v3\"\n\
         # v3 application token (API credentials, not Connect's): POST {base}/oauth2/token\n\
         # with client_id \"{api_client_id}\" and the value of --api-client-secret\n\
         # (default \"carpulse-demo-api-secret\") in the form body.\n\n",
        client_id = cfg.client_id,
        api_client_id = cfg.api_client_id,
    )
    .context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    drop(out);
    serve(listener, cfg, shutdown).await
}
