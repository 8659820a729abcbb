//! The Smartcar client: the token endpoint (through `oauth2`), Vehicle API v2.0 and v3, and the
//! error taxonomy of smartcar-api.md §4. It turns wire shapes into the domain's readings, so the
//! poller never sees JSON.
//!
//! INTERFACE (fixed; the rest of carpulse is written against it):
//!
//! ```ignore
//! pub struct ClientConfig {
//!     pub client_id: String,
//!     pub client_secret: Secret,
//!     pub redirect_uri: String,
//!     pub token_url: String,
//!     pub api_v2_url: String,   // e.g. "https://api.smartcar.com/v2.0" (no trailing slash needed)
//!     pub api_v3_url: String,   // e.g. "https://vehicle.api.smartcar.com/v3"
//!     pub unit_system: UnitSystem,
//!     pub timeout: std::time::Duration, // per request
//! }
//! #[derive(Clone)] pub struct SmartcarClient { .. }
//! impl SmartcarClient {
//!     pub fn new(cfg: ClientConfig) -> anyhow::Result<Self>;
//!     pub async fn exchange_code(&self, code: &str) -> Result<TokenPair, AuthError>;
//!     pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenPair, AuthError>;
//!     pub async fn user_id(&self, access: &Secret) -> Result<String, ApiError>;          // GET {v2}/user
//!     pub async fn list_vehicles(&self, access: &Secret) -> Result<Vec<VehicleId>, ApiError>; // paged GET {v2}/vehicles
//!     pub async fn vehicle_info(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId) -> Result<VehicleInfo, ApiError>;
//!     pub async fn fetch(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId, job: Job)
//!         -> Result<Vec<EndpointResult>, ApiError>;
//! }
//! pub struct RequestCtx<'a> { pub access_token: &'a Secret, pub user_id: Option<&'a str> }
//! pub enum Job { Battery /* battery + charge */, Info /* info + vin + odometer */ }
//! pub struct EndpointResult { pub endpoint: Endpoint, pub result: Result<Payload, ApiError> }
//! pub enum Payload { Battery(BatteryReading), Charge(ChargeReading), Odometer(OdometerReading), Info(VehicleInfo), Vin(String) }
//! ```
//!
//! Layout: [`auth`] the token endpoint, [`v2`] and [`v3`] the two Vehicle APIs (pure parsing
//! functions plus the requests), [`endpoint`] the typed endpoint names, [`error`] the taxonomy and the one error-body parser,
//! [`time`] and [`units`] the tolerant conversions, [`transport`] how a Vehicle API request
//! travels (hyper directly, or reqwest when a proxy applies). This file owns the clients
//! and the request/response plumbing every call shares.

pub mod auth;
pub mod connections;
pub mod endpoint;
pub mod error;
mod h1;
pub mod iam;
mod pool;
mod scan;
pub mod scrub;
pub mod time;
mod transport;
pub mod units;
pub mod v2;
pub mod v3;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION};

/// Smartcar's own request headers, parsed once (a `&str` key is parsed at every insert).
const SC_UNIT_SYSTEM: HeaderName = HeaderName::from_static("sc-unit-system");
const SC_USER_ID: HeaderName = HeaderName::from_static("sc-user-id");
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;

use crate::domain::{
    now_ms, ApiVersion, BatteryReading, ChargeReading, OdometerReading, Secret, UnitSystem,
    UnixMillis, VehicleId, VehicleInfo,
};

pub use endpoint::Endpoint;
pub use error::{classify, ApiError, AuthError, ErrorKind};

tokio::task_local! {
    /// Calls Smartcar bills, made inside [`count_billed`]: one per request, plus one per v2
    /// batch item beyond the first.
    static BILLED: std::cell::Cell<u64>;
}

/// Runs `f` and counts the billed calls it made (for the monthly budget: a v3 signal listing
/// may take several pages).
pub async fn count_billed<F: std::future::Future>(f: F) -> (F::Output, u64) {
    BILLED
        .scope(std::cell::Cell::new(0), async move {
            let out = f.await;
            (out, BILLED.with(|c| c.get()))
        })
        .await
}

tokio::task_local! {
    /// Values a parser refused inside an otherwise good reading (an absurd range, year), by
    /// endpoint, while [`SmartcarClient::fetch_only`] runs: counted as decode errors.
    static REJECTS: std::cell::RefCell<Vec<Endpoint>>;
}

/// Notes that one value of `endpoint`'s reading was refused (out of range, undecodable): it is
/// not stored or exported, the rest of the reading is. Logged here, counted by the caller.
pub(crate) fn reject(endpoint: Endpoint, why: &'static str) {
    tracing::warn!(
        endpoint = endpoint.as_str(),
        why,
        "a value in Smartcar's answer is out of range; not stored"
    );
    let _ = REJECTS.try_with(|r| r.borrow_mut().push(endpoint));
}

/// Makes the text of one result safe to keep: errors scrubbed (see [`scrub`]), make, model and
/// VIN cut and scrubbed (they reach the store, labels and `vehicles list`).
fn finish_result(r: &mut EndpointResult, token: &str) {
    match &mut r.result {
        Err(e) => *e = e.clone().scrubbed(&[token]),
        Ok(Payload::Info(info)) => finish_info(info, token),
        Ok(Payload::Vin(vin)) => *vin = scrub::scrub_field(vin, &[token]),
        Ok(_) => {}
    }
}

fn finish_info(info: &mut VehicleInfo, token: &str) {
    info.make = scrub::scrub_field(&info.make, &[token]);
    info.model = scrub::scrub_field(&info.model, &[token]);
}

/// Adds `n` billed calls to the enclosing [`count_billed`], if any.
pub(crate) fn bill(n: u64) {
    let _ = BILLED.try_with(|c| c.set(c.get() + n));
}

/// Where Smartcar lives and how to talk to it (DESIGN §3 `[smartcar]`, `[poll] timeout`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: String,
    pub token_url: String,
    /// e.g. "https://api.smartcar.com/v2.0" (a trailing slash is tolerated).
    pub api_v2_url: String,
    /// e.g. "https://vehicle.api.smartcar.com/v3" (a trailing slash is tolerated).
    pub api_v3_url: String,
    pub unit_system: UnitSystem,
    /// Per request (Smartcar answers in up to 300 s; the SDKs wait 310 s).
    pub timeout: Duration,
    /// `pageSize` asked of the v3 signal list (None: the server's default).
    pub v3_page_size: Option<u32>,
    /// `poll.max_in_flight`: idle connections kept per host (see [`SmartcarClient::new`]).
    pub max_in_flight: usize,
}

/// Who a Vehicle API request is made for.
#[derive(Clone, Copy, Debug)]
pub struct RequestCtx<'a> {
    pub access_token: &'a Secret,
    /// Sent as `sc-user-id` on v3 requests (the 2026 auth model); ignored by v2.
    pub user_id: Option<&'a str>,
}

/// What one scheduled poll asks for (DESIGN §3 `[schedule]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Job {
    /// battery + charge
    Battery,
    /// info + vin + odometer
    Info,
}

impl Job {
    /// Every job, in the order `carpulse poll` runs them.
    pub const ALL: [Job; 2] = [Job::Battery, Job::Info];

    /// Its name: the `job` label of metrics and logs, `carpulse poll --job`, and the config
    /// key of its cron (`schedule.<label>`). One spelling, kept here, instead of a string at
    /// every call site.
    pub const fn label(self) -> &'static str {
        match self {
            Job::Battery => "battery",
            Job::Info => "info",
        }
    }

    /// The logical endpoints it reads (the `endpoint` of its poll events and of the gates'
    /// blocks), for outcomes that concern the whole request.
    pub const fn endpoints(self) -> &'static [Endpoint] {
        match self {
            Job::Battery => &[Endpoint::Battery, Endpoint::Charge],
            Job::Info => &[Endpoint::Info, Endpoint::Vin, Endpoint::Odometer],
        }
    }

    /// Every job's endpoints, in [`Job::ALL`]'s order: what "nothing at all is polled"
    /// is checked against (a test keeps it equal to the jobs' own lists).
    pub const EVERY_ENDPOINT: [Endpoint; 5] = [
        Endpoint::Battery,
        Endpoint::Charge,
        Endpoint::Info,
        Endpoint::Vin,
        Endpoint::Odometer,
    ];

    /// The job a [`Job::label`] names.
    pub fn from_label(label: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.label() == label)
    }
}

/// The outcome of one logical endpoint of a job: a poll event and maybe a reading each.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointResult {
    /// Battery, charge, info, vin or odometer.
    pub endpoint: Endpoint,
    pub result: Result<Payload, ApiError>,
}

/// One successful endpoint, already in domain units.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Battery(BatteryReading),
    Charge(ChargeReading),
    Odometer(OdometerReading),
    Info(VehicleInfo),
    Vin(String),
}

/// What a capability read learnt: the endpoints the vehicle cannot answer (endpoint, reason),
/// and any readings the answer carried (a v3 listing), which the caller stores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    pub unavailable: Vec<(Endpoint, String)>,
    pub readings: Vec<EndpointResult>,
}

/// The endpoints whose permission is missing from `granted` (v2 `/permissions`, v3
/// `/connections` both list permission names).
pub fn not_granted(granted: &[String]) -> Vec<(Endpoint, String)> {
    v2::ENDPOINT_PERMISSIONS
        .iter()
        .filter(|(_, p)| !granted.iter().any(|g| g == p))
        .map(|(e, p)| (*e, format!("not granted: {p}")))
        .collect()
}

/// The Smartcar client. Cheap to clone (one `Arc`), so every poll task holds its own handle
/// to the one connection pool.
#[derive(Clone)]
pub struct SmartcarClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Token and IAM requests, and Vehicle API requests when a proxy applies.
    http: reqwest::Client,
    /// Vehicle API requests when no proxy applies ([`transport`]).
    direct: Option<transport::Direct>,
    oauth: auth::OAuthClient,
    client_secret: Secret,
    v2: String,
    v3: String,
    v3_url: Url,
    /// The v3 listing's first-page URL around the vehicle id ([`v3::listing_template`]).
    v3_listing: Option<(String, String)>,
    unit_system: UnitSystem,
    /// Per Vehicle API request, in ms (`poll.timeout`; SIGHUP may change it).
    timeout_ms: std::sync::atomic::AtomicU64,
    v3_page_size: Option<u32>,
    /// Told of every Vehicle API request: its API, outcome label and wall time (the daemon
    /// counts them in `carpulse_smartcar_requests_total`).
    on_request: std::sync::OnceLock<RequestObserver>,
    /// Told of every value or endpoint that could not be decoded or was out of range (the
    /// daemon counts them in `carpulse_decode_errors_total`).
    on_decode: std::sync::OnceLock<DecodeObserver>,
}

/// See [`SmartcarClient::observe_decode_errors`].
pub type DecodeObserver = Arc<dyn Fn(Endpoint) + Send + Sync>;

/// See [`SmartcarClient::observe_requests`].
pub type RequestObserver = Arc<dyn Fn(ApiVersion, &'static str, f64) + Send + Sync>;

impl fmt::Debug for SmartcarClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmartcarClient")
            .field("v2", &self.inner.v2)
            .field("v3", &self.inner.v3)
            .field("unit_system", &self.inner.unit_system)
            .finish_non_exhaustive()
    }
}

/// A successful (2xx) answer, read in full.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    /// When the answer arrived: the `fetched_at` of every reading in it.
    pub fetched_at: UnixMillis,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn request_id(&self) -> Option<String> {
        self.header("sc-request-id").map(str::to_owned)
    }

    /// Decodes the body; a body that does not fit is a [`ErrorKind::Decode`] error, with a
    /// short excerpt logged at debug (never the whole body: it could be huge).
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let text = String::from_utf8_lossy(&self.body[..self.body.len().min(4096)]);
            tracing::debug!(
                what,
                status = self.status,
                error = %e,
                body = %scrub::scrub(&text, &[]),
                "unexpected response body"
            );
            ApiError {
                request_id: self.request_id(),
                ..ApiError::decode(Some(self.status), format!("unexpected {what} body: {e}"))
            }
        })
    }
}

/// `base` without its trailing slashes, so `{base}{/path}` never doubles or drops one.
fn trim_base(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

impl SmartcarClient {
    /// Builds the client; fails on a malformed URL or when TLS cannot initialise. Vehicle API
    /// requests honour the proxy environment (`HTTPS_PROXY`, `NO_PROXY`, …) as reqwest reads it.
    pub fn new(cfg: ClientConfig) -> anyhow::Result<Self> {
        Self::with_proxies(
            cfg,
            &hyper_util::client::proxy::matcher::Matcher::from_system(),
        )
    }

    /// [`new`](Self::new) with the proxy rules given instead of read from the environment.
    pub(crate) fn with_proxies(
        cfg: ClientConfig,
        proxies: &hyper_util::client::proxy::matcher::Matcher,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("carpulse/", env!("CARGO_PKG_VERSION")))
            // No client-wide timeout: every exchange has its own deadline over the answer and
            // its body (`send_raw`, the token and IAM requests), one timer per request where a
            // reqwest timeout added a second (and a boxed sleep) to each.
            .connect_timeout(cfg.timeout.min(Duration::from_secs(30)))
            // oauth2 advises against redirects on the token endpoint (a redirect could carry
            // the code or refresh token elsewhere); the Vehicle API never redirects either,
            // so one redirect-free client serves both.
            .redirect(reqwest::redirect::Policy::none())
            // Bounded pool (Smartcar is one or two hosts): idle connections kept per host, as
            // many as polls in flight (`poll.max_in_flight`, which also bounds the busy ones;
            // each costs a descriptor, within the unit's 16,384). A smaller pool closes and
            // reopens connections between a tick's polls: at 64, the fleet benchmark's 10,000
            // vehicles at 3-8 s took twice as long per tick.
            .pool_max_idle_per_host(cfg.max_in_flight.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let oauth = auth::build_oauth(&cfg)?;
        // Every answer's text is scrubbed of the client secret in the forms it travels in.
        scrub::register_client(&cfg.client_id, cfg.client_secret.expose());
        let v2 = trim_base(&cfg.api_v2_url);
        let v3 = trim_base(&cfg.api_v3_url);
        Url::parse(&v2).with_context(|| format!("api_v2_url {v2:?} is not a URL"))?;
        let v3_url = Url::parse(&v3).with_context(|| format!("api_v3_url {v3:?} is not a URL"))?;
        let direct = transport::Direct::for_bases(
            &[v2.as_str(), v3.as_str()],
            proxies,
            cfg.timeout.min(Duration::from_secs(30)),
            cfg.max_in_flight,
        )?;
        Ok(SmartcarClient {
            inner: Arc::new(Inner {
                http,
                direct,
                oauth,
                client_secret: cfg.client_secret,
                v2,
                v3,
                v3_listing: v3::listing_template(&v3_url, cfg.v3_page_size),
                v3_url,
                unit_system: cfg.unit_system,
                timeout_ms: std::sync::atomic::AtomicU64::new(cfg.timeout.as_millis() as u64),
                v3_page_size: cfg.v3_page_size,
                on_request: std::sync::OnceLock::new(),
                on_decode: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Calls `f` after every Vehicle API request with its API, outcome (`ok` or the error's
    /// label) and wall time. Set once; later calls are ignored.
    pub fn observe_requests(&self, f: RequestObserver) {
        let _ = self.inner.on_request.set(f);
    }

    /// Calls `f` with the endpoint of every reading (or single value of one) that could not be
    /// decoded or was out of range. Set once; later calls are ignored.
    pub fn observe_decode_errors(&self, f: DecodeObserver) {
        let _ = self.inner.on_decode.set(f);
    }

    /// Runs a fetch with the answer-text rules every caller gets: errors and texts scrubbed
    /// of secrets and cut, decode errors (whole endpoints and single values) counted.
    async fn finished<F>(&self, token: &str, f: F) -> Result<Vec<EndpointResult>, ApiError>
    where
        F: std::future::Future<Output = Result<Vec<EndpointResult>, ApiError>>,
    {
        let (out, mut rejects) = REJECTS
            .scope(std::cell::RefCell::new(Vec::new()), async move {
                let out = f.await;
                (out, REJECTS.with(|r| r.take()))
            })
            .await;
        let out = match out {
            Ok(mut results) => {
                for r in &mut results {
                    finish_result(r, token);
                    if matches!(&r.result, Err(e) if e.kind == ErrorKind::Decode) {
                        rejects.push(r.endpoint);
                    }
                }
                Ok(results)
            }
            Err(e) => Err(e.scrubbed(&[token])),
        };
        if let Some(observe) = self.inner.on_decode.get() {
            for endpoint in rejects {
                observe(endpoint);
            }
        }
        out
    }

    /// A new per-request timeout for Vehicle API calls (`poll.timeout` changed on SIGHUP).
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner.timeout_ms.store(
            timeout.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The unit system requested with `sc-unit-system`.
    pub fn unit_system(&self) -> UnitSystem {
        self.inner.unit_system
    }

    /// `GET {v2}/user`: the Smartcar user id of the token's account.
    pub async fn user_id(&self, access: &Secret) -> Result<String, ApiError> {
        v2::user_id(self, access)
            .await
            .map(|id| scrub::scrub_field(&id, &[access.expose()]))
            .map_err(|e| e.scrubbed(&[access.expose()]))
    }

    /// Every vehicle id the token covers, paged `GET {v2}/vehicles?limit=50&offset=N`.
    pub async fn list_vehicles(&self, access: &Secret) -> Result<Vec<VehicleId>, ApiError> {
        v2::list_vehicles(self, access)
            .await
            .map_err(|e| e.scrubbed(&[access.expose()]))
    }

    /// Make, model and year of one vehicle.
    pub async fn vehicle_info(
        &self,
        api: ApiVersion,
        ctx: &RequestCtx<'_>,
        id: &VehicleId,
    ) -> Result<VehicleInfo, ApiError> {
        let token = ctx.access_token.expose();
        let info = match api {
            ApiVersion::V2 => v2::vehicle_info(self, ctx, id).await,
            ApiVersion::V3 => v3::vehicle_info(self, ctx, id).await,
        };
        info.map(|mut i| {
            finish_info(&mut i, token);
            i
        })
        .map_err(|e| e.scrubbed(&[token]))
    }

    /// Runs one job for one vehicle. `Err` means the whole request failed (auth, app rate
    /// limit, network, a non-200 batch/signals answer); a failure of one endpoint is an
    /// `Err` inside its [`EndpointResult`] and the others still carry their readings.
    pub async fn fetch(
        &self,
        api: ApiVersion,
        ctx: &RequestCtx<'_>,
        id: &VehicleId,
        job: Job,
    ) -> Result<Vec<EndpointResult>, ApiError> {
        self.fetch_only(api, ctx, id, job, &[]).await
    }

    /// [`fetch`](Self::fetch) asking only for `only` of the job's endpoints (empty: all).
    /// Each v2 batch item and the info call are billed, so what the vehicle cannot answer is
    /// not asked; a v3 signal listing costs the same whatever is read from it, but its
    /// separate `GET /vehicles/{id}` is left out when info is not wanted.
    pub async fn fetch_only(
        &self,
        api: ApiVersion,
        ctx: &RequestCtx<'_>,
        id: &VehicleId,
        job: Job,
        only: &[Endpoint],
    ) -> Result<Vec<EndpointResult>, ApiError> {
        let token = ctx.access_token.expose();
        // Boxed: a job's fetch is ~6 KB of future, which every level above it (the task
        // local, the timeout, the retry) would otherwise hold inline and copy when moved.
        match api {
            ApiVersion::V2 => {
                self.finished(token, Box::pin(v2::fetch(self, ctx, id, job, only)))
                    .await
            }
            ApiVersion::V3 => {
                self.finished(token, Box::pin(v3::fetch(self, ctx, id, job, only)))
                    .await
            }
        }
    }

    /// What the vehicle cannot answer, by the API's own account, as (endpoint, reason): in
    /// v2 the endpoints whose permission the consent did not grant (`/permissions`); in v3
    /// the signals the listing marks ERROR with PERMISSION, COMPATIBILITY or a plan lock, with
    /// the readings that listing carried. A signal merely missing from a listing blocks
    /// nothing: a sleeping car may list less.
    pub async fn capabilities(
        &self,
        api: ApiVersion,
        ctx: &RequestCtx<'_>,
        id: &VehicleId,
    ) -> Result<Capabilities, ApiError> {
        match api {
            ApiVersion::V2 => {
                let granted = v2::permissions(self, ctx, id)
                    .await
                    .map_err(|e| e.scrubbed(&[ctx.access_token.expose()]))?;
                if granted.is_empty() {
                    // A consent grants something; an empty list says nothing reliable.
                    tracing::warn!(vehicle = %id, "GET /permissions listed nothing; blocking nothing");
                    return Ok(Capabilities::default());
                }
                Ok(Capabilities {
                    unavailable: not_granted(&granted),
                    readings: Vec::new(),
                })
            }
            ApiVersion::V3 => {
                let token = ctx.access_token.expose();
                let mut unavailable = Vec::new();
                let readings = self
                    .finished(token, async {
                        let caps = v3::capabilities(self, ctx, id).await?;
                        unavailable = caps
                            .unavailable
                            .into_iter()
                            .map(|(e, why)| (e, scrub::scrub_field(&why, &[token])))
                            .collect();
                        Ok(caps.readings)
                    })
                    .await?;
                Ok(Capabilities {
                    unavailable,
                    readings,
                })
            }
        }
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub(crate) fn v2_url(&self, path: &str) -> String {
        format!("{}{}", self.inner.v2, path)
    }

    pub(crate) fn v3_url(&self, path: &str) -> String {
        format!("{}{}", self.inner.v3, path)
    }

    pub(crate) fn v3_base(&self) -> &Url {
        &self.inner.v3_url
    }

    /// The first page of `id`'s v3 signal listing (with `v3_page_size`, when set).
    pub(crate) fn v3_listing_url(&self, id: &VehicleId) -> Result<String, ApiError> {
        let i = &self.inner;
        i.v3_listing
            .as_ref()
            .and_then(|t| v3::listing_url(t, &i.v3_url, i.v3_page_size, &id.0))
            .ok_or_else(|| ApiError::new(ErrorKind::Other, "the v3 base URL cannot take a path"))
    }

    /// A Vehicle API request with the headers every call carries (smartcar-api.md §2.1, §3.2).
    pub(crate) fn vehicle_request(
        &self,
        method: Method,
        url: &str,
        access: &Secret,
        user_id: Option<&str>,
    ) -> transport::VehicleRequest {
        let mut headers = HeaderMap::with_capacity(4);
        let mut unsendable = None;
        // A token is header-safe text; one that is not fails the request unsent. Built in one
        // buffer the header value then owns (from_str copies its text again).
        let token = access.expose();
        let mut bearer = String::with_capacity("Bearer ".len() + token.len());
        bearer.push_str("Bearer ");
        bearer.push_str(token);
        match HeaderValue::from_maybe_shared(bytes::Bytes::from(bearer)) {
            Ok(mut bearer) => {
                bearer.set_sensitive(true);
                headers.insert(AUTHORIZATION, bearer);
            }
            Err(_) => unsendable = Some("the access token is not valid header text; not sent"),
        }
        headers.insert(
            SC_UNIT_SYSTEM,
            HeaderValue::from_static(self.inner.unit_system.as_str()),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(user) = user_id {
            match HeaderValue::from_str(user) {
                Ok(user) => {
                    headers.insert(SC_USER_ID, user);
                }
                Err(_) => unsendable = Some("the user id is not valid header text; not sent"),
            }
        }
        transport::VehicleRequest {
            method,
            url: url.to_owned(),
            headers,
            body: None,
            unsendable,
        }
    }

    /// Sends a request and reads the answer in full; any non-2xx status becomes the parsed
    /// [`ApiError`] with `retry_after` and `request_id` from the headers.
    pub(crate) async fn send(
        &self,
        req: transport::VehicleRequest,
    ) -> Result<RawResponse, ApiError> {
        bill(1);
        self.send_unbilled(req).await
    }

    /// [`send`](Self::send) for a call Smartcar does not bill to a vehicle (`/v3/connections`,
    /// smartcar-api.md §10.3).
    pub(crate) async fn send_unbilled(
        &self,
        req: transport::VehicleRequest,
    ) -> Result<RawResponse, ApiError> {
        let api = if req.url.starts_with(self.inner.v2.as_str()) {
            ApiVersion::V2
        } else {
            ApiVersion::V3
        };
        let started = std::time::Instant::now();
        // Boxed: reqwest's and hyper's futures are kilobytes; unboxed they sit inline in every
        // future that awaits a request (the poll's, the listing's, …) and are copied each time
        // one of those is moved (memmove was ~9 % of a poll's CPU in the fleet profile).
        let result = Box::pin(self.send_raw(req)).await;
        if let Some(observe) = self.inner.on_request.get() {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind.label(),
            };
            observe(api, outcome, started.elapsed().as_secs_f64());
        }
        result
    }

    async fn send_raw(&self, request: transport::VehicleRequest) -> Result<RawResponse, ApiError> {
        // The request's own bearer token: an answer that echoes it is scrubbed of it.
        let bearer = request.bearer().to_owned();
        let scrub = |e: ApiError| e.scrubbed(&[bearer.as_str()]);
        // One deadline for the whole exchange, body included: a body that drips a byte at a
        // time ends here, not when the server tires of it.
        let timeout = Duration::from_millis(
            self.inner
                .timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let deadline = tokio::time::Instant::now() + timeout;
        let exchange = async {
            let answer = match &self.inner.direct {
                Some(direct) => direct.exchange(request, VEHICLE_BODY_LIMIT).await,
                None => self.through_reqwest(request, timeout).await,
            };
            answer.map_err(|e| {
                let e = scrub(e);
                if e.kind == ErrorKind::TooLarge {
                    tracing::warn!(
                        status = e.status,
                        limit_bytes = VEHICLE_BODY_LIMIT,
                        "an answer larger than the limit was cut off and not read; backing off"
                    );
                }
                e
            })
        };
        let (status, headers, body) =
            tokio::time::timeout_at(deadline, exchange)
                .await
                .map_err(|_| {
                    ApiError::new(
                        ErrorKind::Timeout,
                        format!("no complete answer within {} s", timeout.as_secs()),
                    )
                })??;
        let fetched_at = now_ms();
        let raw = RawResponse {
            status,
            headers,
            body,
            fetched_at,
        };
        if (200..300).contains(&status) {
            return Ok(raw);
        }
        let retry_after = raw
            .header("retry-after")
            .and_then(|v| error::parse_retry_after(v, fetched_at));
        let err = scrub(error::api_error_from(
            Some(status),
            error::parse_error_body(&raw.body),
            retry_after,
            raw.request_id(),
        ));
        tracing::debug!(
            status,
            outcome = err.kind.label(),
            request_id = err.request_id.as_deref().unwrap_or(""),
            error = %err,
            "request failed"
        );
        Err(err)
    }

    /// One exchange through reqwest (when a proxy applies): status, headers and body, read
    /// with the same limit as the direct way; the caller's deadline covers it.
    async fn through_reqwest(
        &self,
        request: transport::VehicleRequest,
        timeout: Duration,
    ) -> Result<transport::Answer, ApiError> {
        let request = request.into_reqwest(&self.inner.http)?;
        let mut resp = self
            .inner
            .http
            .execute(request)
            .await
            .map_err(|e| ApiError::from_reqwest(&e))?;
        let status = resp.status().as_u16();
        // Taken, not cloned: the body is read without them.
        let headers = std::mem::take(resp.headers_mut());
        let body = read_body(resp, VEHICLE_BODY_LIMIT)
            .await
            .map_err(|e| e.into_api_error(status, timeout))?;
        Ok((status, headers, body.into()))
    }
}

/// The most a Vehicle API answer (or a `/v3/connections` page) may hold: a v3 listing of every
/// signal is a few tens of KB, a page of 100 connections about 60 KB. Larger is a server's
/// mistake or an attack, and is not read into memory (issue 11, item 7).
pub const VEHICLE_BODY_LIMIT: usize = 2 * 1024 * 1024;
/// The most a token endpoint (or IAM) answer may hold: four short fields.
pub const TOKEN_BODY_LIMIT: usize = 64 * 1024;

/// Why a body could not be read in full.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Larger than the limit (announced by `content-length` or found while reading).
    TooLarge {
        limit: usize,
    },
    /// The request's deadline passed while the body was still coming.
    Deadline,
    Transport(reqwest::Error),
}

impl BodyError {
    fn into_api_error(self, status: u16, timeout: Duration) -> ApiError {
        match self {
            BodyError::TooLarge { limit } => ApiError {
                status: Some(status),
                ..ApiError::new(
                    ErrorKind::TooLarge,
                    format!("the answer is larger than {limit} bytes; not read"),
                )
            },
            BodyError::Deadline => ApiError::new(
                ErrorKind::Timeout,
                format!(
                    "the answer's body did not arrive within {} s",
                    timeout.as_secs()
                ),
            ),
            BodyError::Transport(e) => ApiError::from_reqwest(&e),
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(f, "the answer is larger than {limit} bytes; not read")
            }
            BodyError::Deadline => f.write_str("the answer's body did not arrive in time"),
            BodyError::Transport(e) => write!(f, "{e}"),
        }
    }
}

/// Reads a body chunk by chunk, never holding more than `limit` bytes, and gives up at
/// `deadline`. A `content-length` above the limit is refused before a byte is read.
pub(crate) async fn read_limited(
    resp: reqwest::Response,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, BodyError> {
    tokio::time::timeout_at(deadline, read_body(resp, limit))
        .await
        .unwrap_or(Err(BodyError::Deadline))
}

/// [`read_limited`] without a deadline of its own, for a caller whose deadline already
/// covers the whole exchange (one timer per request, not one per chunk).
async fn read_body(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::with_capacity(
        resp.content_length()
            .map(|n| n as usize)
            .unwrap_or(8 * 1024)
            .min(limit),
    );
    loop {
        let chunk = match resp.chunk().await {
            Err(e) => return Err(BodyError::Transport(e)),
            Ok(None) => return Ok(body),
            Ok(Some(c)) => c,
        };
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_the_jobs_endpoints_in_order() {
        let chained: Vec<Endpoint> = Job::ALL
            .iter()
            .flat_map(|j| j.endpoints().iter().copied())
            .collect();
        assert_eq!(Job::EVERY_ENDPOINT.to_vec(), chained);
    }

    #[test]
    fn a_job_owns_its_label_and_endpoints() {
        for job in Job::ALL {
            assert_eq!(Job::from_label(job.label()), Some(job));
        }
        assert_eq!(Job::from_label("odometer"), None);
        // The spellings are a contract: metric labels, config keys, `poll --job`.
        assert_eq!(Job::ALL.map(Job::label), ["battery", "info"]);
        let names = |job: Job| {
            job.endpoints()
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Job::Battery), ["battery", "charge"]);
        assert_eq!(names(Job::Info), ["info", "vin", "odometer"]);
    }

    /// A token or user id that is not header text fails the request before anything is sent,
    /// both ways (direct, and through reqwest when a proxy applies): it never goes out without
    /// its header, which the server would answer 401 and send the connection into a refresh.
    #[tokio::test]
    async fn a_request_that_cannot_carry_its_token_is_not_sent() {
        use hyper_util::client::proxy::matcher::Matcher;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let cfg = ClientConfig {
            client_id: "id".into(),
            client_secret: Secret::new("secret"),
            redirect_uri: "http://127.0.0.1:9/cb".into(),
            token_url: format!("{base}/oauth/token"),
            api_v2_url: format!("{base}/v2.0"),
            api_v3_url: format!("{base}/v3"),
            unit_system: UnitSystem::Metric,
            timeout: Duration::from_secs(5),
            v3_page_size: None,
            max_in_flight: 4,
        };
        let proxied = Matcher::builder().http("http://127.0.0.1:9").build();
        for (way, proxies) in [("direct", Matcher::builder().build()), ("reqwest", proxied)] {
            let client = SmartcarClient::with_proxies(cfg.clone(), &proxies).unwrap();
            assert_eq!(client.inner.direct.is_some(), way == "direct");
            let id = VehicleId("v".into());
            for (token, user, why) in [
                ("bad\ntoken", Some("user"), "access token"),
                ("token", Some("bad\r\nuser"), "user id"),
            ] {
                let token = Secret::new(token);
                let ctx = RequestCtx {
                    access_token: &token,
                    user_id: user,
                };
                let e = client
                    .fetch(ApiVersion::V3, &ctx, &id, Job::Battery)
                    .await
                    .unwrap_err();
                assert_eq!(e.kind, ErrorKind::Transport, "{way}: {e}");
                assert!(e.to_string().contains(why), "{way}: {e}");
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn base_urls_tolerate_trailing_slashes() {
        assert_eq!(
            trim_base("https://api.smartcar.com/v2.0/"),
            "https://api.smartcar.com/v2.0"
        );
        assert_eq!(trim_base("http://127.0.0.1:9/v3"), "http://127.0.0.1:9/v3");
    }
}
