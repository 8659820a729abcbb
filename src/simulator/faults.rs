//! Faults on demand: the failures a real Smartcar answer can bring (smartcar-api.md §4.2), set per
//! vehicle or fleet-wide at start (`--fault`), at run time (`/_simulator/faults`), or at random
//! (`--fault-rate`), so a client's every error path can be exercised offline.
//!
//! A `rate_limit` fault also starts the vehicle's `retry-after` window: a request inside it is a
//! client that did not wait, counted as `retry_after_violations` and refused again.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::errors::{ApiError, Resolution};
use super::stats::{bump, Stats};
use crate::domain::UnixMillis;

/// What a fault makes the API answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 RATE_LIMIT:VEHICLE with `retry-after`.
    RateLimit,
    /// 429 RATE_LIMIT:SMARTCAR_API (the app-wide bucket).
    AppRateLimit,
    /// 409 VEHICLE_STATE:ASLEEP.
    Asleep,
    /// 409 VEHICLE_STATE:UNREACHABLE.
    Unreachable,
    /// 500 SERVER:INTERNAL.
    Server,
    /// 502 UPSTREAM:NO_RESPONSE.
    Upstream,
    /// 502 UPSTREAM:RATE_LIMIT: the manufacturer's own limit (smartcar-api.md §2.4), no
    /// `retry-after` (its status is unconfirmed, §9.7; 502 as its UPSTREAM family).
    UpstreamRateLimit,
    /// 403 PERMISSION.
    Permission,
    /// 400 CONNECTED_SERVICES_ACCOUNT:AUTHENTICATION_FAILED (resolution REAUTHENTICATE with the
    /// re-auth flow's `url`): the owner's login at the manufacturer broke. The owner going
    /// through `/oauth/reauthenticate` for the vehicle clears it.
    ConnectedServicesAccount,
    /// 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE.
    Compatibility,
    /// 430 BILLING:VEHICLE_REQUEST_LIMIT.
    Billing,
    /// The answer comes `delay` seconds late (a car that takes its time).
    Slow,
    /// A 200 whose JSON body is cut short.
    Malformed,
    /// The connection drops mid-answer.
    Drop,
    /// An error page (status `status`, default 502, `text/plain`) that echoes the request's
    /// headers, `Authorization` included: what a careless proxy does. With `target: "token"`
    /// at the token endpoint.
    EchoError,
    /// A proxy's HTML error page: status `status` (default 404; 400 and 403 are as likely),
    /// `text/html`, no Smartcar error envelope. With `target: "token"` at the token endpoint.
    HtmlError,
    /// A 200 whose body is `bytes` long (default 50 MB) of JSON-looking filler, streamed
    /// without `content-length`.
    Huge,
    /// The real answer, one byte every `delay` seconds (default 10).
    SlowDrip,
    /// 429 RATE_LIMIT:VEHICLE with `retry-after` as an HTTP-date (`date`, default
    /// `Fri, 31 Dec 9999 23:59:59 GMT`).
    RetryAfterDate,
    /// The real answer with one value replaced: every `field` of the JSON (a v2 key such as
    /// `percentRemaining` or `year`, or a v3 signal code, whose `body.value` is set) becomes
    /// `value` (SoC 250, -5, 1e308, a negative odometer, year 0...).
    Absurd,
    /// A v3 signal listing whose `links.next` always names one more page (of the same data).
    EndlessPaging,
    /// Token endpoint: `400 {"error":"invalid_request"}` (as a Smartcar hiccup or a proxy
    /// could answer), for `count` requests.
    InvalidRequest,
    /// Token endpoint: a 200 whose `expires_in` is `value` (default 0; -5, 1e12, "soon").
    OddExpiresIn,
    /// Token endpoint: a 200 without `refresh_token`.
    NoRefreshToken,
}

impl FaultKind {
    pub const ALL: [FaultKind; 24] = [
        FaultKind::EchoError,
        FaultKind::HtmlError,
        FaultKind::Huge,
        FaultKind::SlowDrip,
        FaultKind::RetryAfterDate,
        FaultKind::Absurd,
        FaultKind::EndlessPaging,
        FaultKind::InvalidRequest,
        FaultKind::OddExpiresIn,
        FaultKind::NoRefreshToken,
        FaultKind::RateLimit,
        FaultKind::AppRateLimit,
        FaultKind::Asleep,
        FaultKind::Unreachable,
        FaultKind::Server,
        FaultKind::Upstream,
        FaultKind::UpstreamRateLimit,
        FaultKind::Permission,
        FaultKind::ConnectedServicesAccount,
        FaultKind::Compatibility,
        FaultKind::Billing,
        FaultKind::Slow,
        FaultKind::Malformed,
        FaultKind::Drop,
    ];

    /// Faults of the connection rather than of the API: applied around the handler.
    pub fn is_transport(self) -> bool {
        matches!(
            self,
            FaultKind::Slow
                | FaultKind::Malformed
                | FaultKind::Drop
                | FaultKind::EchoError
                | FaultKind::HtmlError
                | FaultKind::Huge
                | FaultKind::SlowDrip
                | FaultKind::RetryAfterDate
                | FaultKind::Absurd
                | FaultKind::EndlessPaging
        )
    }

    /// Faults of the token endpoint only (never taken by a vehicle request).
    pub fn is_token_only(self) -> bool {
        matches!(
            self,
            FaultKind::InvalidRequest | FaultKind::OddExpiresIn | FaultKind::NoRefreshToken
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RateLimit => "rate_limit",
            FaultKind::AppRateLimit => "app_rate_limit",
            FaultKind::Asleep => "asleep",
            FaultKind::Unreachable => "unreachable",
            FaultKind::Server => "server",
            FaultKind::Upstream => "upstream",
            FaultKind::UpstreamRateLimit => "upstream_rate_limit",
            FaultKind::Permission => "permission",
            FaultKind::ConnectedServicesAccount => "connected_services_account",
            FaultKind::Compatibility => "compatibility",
            FaultKind::Billing => "billing",
            FaultKind::Slow => "slow",
            FaultKind::Malformed => "malformed",
            FaultKind::Drop => "drop",
            FaultKind::EchoError => "echo_error",
            FaultKind::HtmlError => "html_error",
            FaultKind::Huge => "huge",
            FaultKind::SlowDrip => "slow_drip",
            FaultKind::RetryAfterDate => "retry_after_date",
            FaultKind::Absurd => "absurd",
            FaultKind::EndlessPaging => "endless_paging",
            FaultKind::InvalidRequest => "invalid_request",
            FaultKind::OddExpiresIn => "odd_expires_in",
            FaultKind::NoRefreshToken => "no_refresh_token",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Faults of the owner's connected services account (400 CONNECTED_SERVICES_ACCOUNT), which
    /// the re-auth flow fixes.
    pub fn is_connected_services_account(self) -> bool {
        matches!(self, FaultKind::ConnectedServicesAccount)
    }

    /// The error Smartcar answers for it.
    pub(crate) fn error(self, retry_after_s: u64) -> ApiError {
        let new = |status: u16, kind, code, description: &str, resolution| {
            ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                kind,
                code,
                description,
                resolution,
            )
        };
        let mut e = match self {
            FaultKind::Permission => ApiError::permission(),
            FaultKind::ConnectedServicesAccount => ApiError::account_authentication_failed(),
            FaultKind::RateLimit => new(
                429,
                "RATE_LIMIT",
                Some("VEHICLE"),
                "You have reached the throttling rate limit for this vehicle. Please see the retry-after header for when to retry the request.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::AppRateLimit => new(
                429,
                "RATE_LIMIT",
                Some("SMARTCAR_API"),
                "You have reached the throttling rate limit for your application. Please use exponential backoff.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::Asleep => new(
                409,
                "VEHICLE_STATE",
                Some("ASLEEP"),
                "The vehicle is in a sleep state and temporarily unable to perform your request.",
                None,
            ),
            FaultKind::Unreachable => new(
                409,
                "VEHICLE_STATE",
                Some("UNREACHABLE"),
                "The vehicle was unable to perform your request due to poor internet connectivity.",
                None,
            ),
            FaultKind::Server => new(
                500,
                "SERVER",
                Some("INTERNAL"),
                "An internal Smartcar error has occurred.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::Upstream => new(
                502,
                "UPSTREAM",
                Some("NO_RESPONSE"),
                "Smartcar did not receive a response from the vehicle's manufacturer.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::UpstreamRateLimit => new(
                502,
                "UPSTREAM",
                Some("RATE_LIMIT"),
                "The vehicle's manufacturer has rate limited Smartcar's requests for this vehicle. Please retry later.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::Compatibility => new(
                501,
                "COMPATIBILITY",
                Some("VEHICLE_NOT_CAPABLE"),
                "The vehicle is not capable of performing your request.",
                None,
            ),
            // Transport and token faults never become an API error; a server error if one is
            // asked for.
            FaultKind::Slow
            | FaultKind::Malformed
            | FaultKind::Drop
            | FaultKind::EchoError
            | FaultKind::HtmlError
            | FaultKind::Huge
            | FaultKind::SlowDrip
            | FaultKind::RetryAfterDate
            | FaultKind::Absurd
            | FaultKind::EndlessPaging
            | FaultKind::InvalidRequest
            | FaultKind::OddExpiresIn
            | FaultKind::NoRefreshToken => new(
                500,
                "SERVER",
                Some("INTERNAL"),
                "An internal Smartcar error has occurred.",
                Some(Resolution::RetryLater),
            ),
            FaultKind::Billing => new(
                430,
                "BILLING",
                Some("VEHICLE_REQUEST_LIMIT"),
                "You have reached the monthly request limit for this vehicle under your plan.",
                Some(Resolution::ContactSupport),
            ),
        };
        if self == FaultKind::RateLimit {
            e.retry_after = Some(u32::try_from(retry_after_s).unwrap_or(u32::MAX));
        }
        e
    }
}

/// One fault: what, for how many more requests (None: until cleared), and the `retry-after`
/// a rate-limit fault announces.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default = "default_retry_after")]
    pub retry_after: u64,
    /// Seconds a `slow` answer is held back (`slow_drip`: between two bytes).
    #[serde(default = "default_delay")]
    pub delay: f64,
    /// `echo_error`, `html_error`: the status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `huge`: the body's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `retry_after_date`: the `retry-after` value sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// `absurd`: the JSON key or v3 signal code whose value is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `absurd`, `odd_expires_in`: the value put there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// `"token"`: an `echo_error`, `html_error`, `huge` or `slow_drip` fault applies to the
    /// token endpoint instead of vehicle requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Fault {
    /// Whether the fault is for the token endpoint rather than vehicle requests.
    pub fn at_token_endpoint(&self) -> bool {
        self.kind.is_token_only() || self.target.as_deref() == Some("token")
    }
}

fn default_delay() -> f64 {
    10.0
}

fn default_retry_after() -> u64 {
    60
}

impl Fault {
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            kind,
            count: None,
            retry_after: default_retry_after(),
            delay: default_delay(),
            status: None,
            bytes: None,
            date: None,
            field: None,
            value: None,
            target: None,
        }
    }
}

/// Parses `--fault KIND[@VEHICLE_ID][*COUNT]`, e.g. `asleep`, `rate_limit@<id>`, `server*3`.
pub fn parse_spec(s: &str) -> Result<(Option<String>, Fault), String> {
    let (rest, count) = match s.split_once('*') {
        Some((r, c)) => (
            r,
            Some(
                c.parse::<u64>()
                    .map_err(|_| format!("{s:?}: the count after * must be a whole number"))?,
            ),
        ),
        None => (s, None),
    };
    let (kind, vehicle) = match rest.split_once('@') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => (rest, None),
    };
    let kind = FaultKind::parse(kind).ok_or_else(|| {
        let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        format!("{kind:?} is not a fault kind ({})", names.join(", "))
    })?;
    Ok((
        vehicle,
        Fault {
            count,
            ..Fault::new(kind)
        },
    ))
}

#[derive(Default)]
struct Table {
    fleet: Option<Fault>,
    vehicles: HashMap<String, Fault>,
    /// Per vehicle: until when the last `retry-after` holds.
    retry_after_until: HashMap<String, UnixMillis>,
    /// Probability that a request without a set fault gets a random transient one.
    random_rate: f64,
    /// Per vehicle: times of its recent requests, for the per-vehicle rate limit.
    recent: HashMap<String, std::collections::VecDeque<UnixMillis>>,
}

/// The fault table. A std mutex: a check is a few map operations and never spans an await.
#[derive(Default)]
pub struct Faults {
    table: Mutex<Table>,
}

/// Transient kinds a random fault picks from (never the ones that need a human).
const RANDOM_KINDS: [FaultKind; 4] = [
    FaultKind::Asleep,
    FaultKind::Server,
    FaultKind::Upstream,
    FaultKind::RateLimit,
];

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, vehicle: Option<String>, fault: Fault) {
        let mut t = self.lock();
        match vehicle {
            Some(v) => {
                t.vehicles.insert(v, fault);
            }
            None => t.fleet = Some(fault),
        }
    }

    pub fn set_random_rate(&self, rate: f64) {
        self.lock().random_rate = rate.clamp(0.0, 1.0);
    }

    /// Clears one vehicle's fault, the fleet-wide one (`Some("fleet")`-free form: `None` clears
    /// everything, including pending `retry-after` windows and the random rate).
    pub fn clear(&self, vehicle: Option<&str>) {
        let mut t = self.lock();
        match vehicle {
            Some(v) => {
                t.vehicles.remove(v);
                t.retry_after_until.remove(v);
            }
            None => *t = Table::default(),
        }
    }

    /// The re-auth flow for `vehicle`: removes its fault if that is a connected-services-account
    /// one (the owner fixed their login). Fleet-wide faults stay. True if one was removed.
    pub fn clear_account_fault(&self, vehicle: &str) -> bool {
        let mut t = self.lock();
        let is_account = t
            .vehicles
            .get(vehicle)
            .is_some_and(|f| f.kind.is_connected_services_account());
        if is_account {
            t.vehicles.remove(vehicle);
        }
        is_account
    }

    pub fn to_json(&self) -> Value {
        let t = self.lock();
        json!({
            "fleet": t.fleet,
            "vehicles": t.vehicles,
            "random_rate": t.random_rate,
        })
    }

    /// Decides one request for `vehicle_id`: `Err` with the error to answer, or `Ok` to serve.
    pub(crate) fn check(
        &self,
        vehicle_id: &str,
        now: UnixMillis,
        stats: &Stats,
    ) -> Result<(), ApiError> {
        let mut t = self.lock();
        if let Some(&until) = t.retry_after_until.get(vehicle_id) {
            if now < until {
                bump(&stats.retry_after_violations);
                let left = ((until - now) as u64).div_ceil(1000);
                return Err(FaultKind::RateLimit.error(left));
            }
            t.retry_after_until.remove(vehicle_id);
        }
        let fault = t.take(vehicle_id, false);
        let fault = match fault {
            Some(f) => Some(f),
            None if t.random_rate > 0.0 && rand::random::<f64>() < t.random_rate => {
                let kind = RANDOM_KINDS[rand::random_range(0..RANDOM_KINDS.len())];
                Some(Fault {
                    retry_after: 5,
                    ..Fault::new(kind)
                })
            }
            None => None,
        };
        let Some(fault) = fault else {
            return Ok(());
        };
        bump(&stats.faults_served);
        if fault.kind == FaultKind::RateLimit {
            t.retry_after_until
                .insert(vehicle_id.to_owned(), now + fault.retry_after as i64 * 1000);
        }
        Err(fault.kind.error(fault.retry_after))
    }
}

impl Table {
    /// Uses one request of the vehicle's fault, else the fleet's, of the transport or the API
    /// family; spent faults are removed.
    fn take(&mut self, vehicle_id: &str, transport: bool) -> Option<Fault> {
        self.take_where(vehicle_id, |f| {
            f.kind.is_transport() == transport && !f.at_token_endpoint()
        })
    }

    /// Uses one request of the vehicle's (or the fleet's) first fault `fits` accepts.
    fn take_where(&mut self, vehicle_id: &str, fits: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let fits = |f: &&mut Fault| fits(f);
        let fault = take_one(self.vehicles.get_mut(vehicle_id).filter(fits))
            .or_else(|| take_one(self.fleet.as_mut().filter(fits)));
        self.vehicles.retain(|_, f| f.count != Some(0));
        if self.fleet.as_ref().is_some_and(|f| f.count == Some(0)) {
            self.fleet = None;
        }
        fault
    }
}

impl Faults {
    /// Smartcar's per-vehicle limit (its real thresholds are unpublished): at most `max` requests
    /// per `window_ms`, each batch item counting as one (`cost`). Past it, 429 RATE_LIMIT:VEHICLE
    /// with `retry-after` until the oldest request leaves the window — and that window is
    /// enforced like any other `retry-after`.
    pub(crate) fn limit(
        &self,
        vehicle_id: &str,
        cost: u32,
        now: UnixMillis,
        (max, window_ms): (u32, i64),
    ) -> Result<(), ApiError> {
        let mut t = self.lock();
        let recent = t.recent.entry(vehicle_id.to_owned()).or_default();
        while recent.front().is_some_and(|&at| at <= now - window_ms) {
            recent.pop_front();
        }
        if recent.len() + cost as usize > max as usize {
            let oldest = recent.front().copied().unwrap_or(now);
            let wait_ms = (oldest + window_ms - now).max(1000);
            t.retry_after_until
                .insert(vehicle_id.to_owned(), now + wait_ms);
            return Err(FaultKind::RateLimit.error((wait_ms as u64).div_ceil(1000)));
        }
        recent.extend(std::iter::repeat_n(now, cost as usize));
        Ok(())
    }

    /// The fleet-wide fault set for the token endpoint (`invalid_request`, `odd_expires_in`,
    /// `no_refresh_token`, or a response fault with `target: "token"`), if any.
    pub(crate) fn token(&self, stats: &Stats) -> Option<Fault> {
        let fault = self.lock().take_where("", Fault::at_token_endpoint);
        if fault.is_some() {
            bump(&stats.faults_served);
        }
        fault
    }

    /// The transport fault (slow, malformed, drop) for one request to `vehicle_id`, if any.
    pub(crate) fn transport(&self, vehicle_id: &str, stats: &Stats) -> Option<Fault> {
        let fault = self.lock().take(vehicle_id, true);
        if fault.is_some() {
            bump(&stats.faults_served);
        }
        fault
    }
}

/// Uses one request of a fault: returns a copy to apply, counting it down.
fn take_one(f: Option<&mut Fault>) -> Option<Fault> {
    let f = f?;
    match f.count {
        Some(0) => None,
        Some(n) => {
            f.count = Some(n - 1);
            Some(f.clone())
        }
        None => Some(f.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("asleep").unwrap(),
            (None, Fault::new(FaultKind::Asleep))
        );
        let (v, f) = parse_spec("rate_limit@abc*2").unwrap();
        assert_eq!(v.as_deref(), Some("abc"));
        assert_eq!((f.kind, f.count), (FaultKind::RateLimit, Some(2)));
        assert!(parse_spec("sleepy").unwrap_err().contains("asleep"));
        assert!(parse_spec("server*x").is_err());
        let (v, f) = parse_spec("upstream_rate_limit@abc").unwrap();
        assert_eq!(
            (v.as_deref(), f.kind),
            (Some("abc"), FaultKind::UpstreamRateLimit)
        );
        let e = f.kind.error(f.retry_after);
        assert_eq!(
            (e.status.as_u16(), e.kind, e.code, e.retry_after),
            (502, "UPSTREAM", Some("RATE_LIMIT"), None)
        );
    }

    #[test]
    fn counted_faults_run_out_and_vehicle_faults_win() {
        let stats = Stats::default();
        let f = Faults::default();
        f.set(
            None,
            Fault {
                count: Some(1),
                ..Fault::new(FaultKind::Server)
            },
        );
        f.set(
            Some("v".into()),
            Fault {
                count: Some(1),
                ..Fault::new(FaultKind::Asleep)
            },
        );
        assert_eq!(f.check("v", 0, &stats).unwrap_err().code, Some("ASLEEP"));
        assert_eq!(f.check("v", 0, &stats).unwrap_err().code, Some("INTERNAL"));
        assert!(f.check("v", 0, &stats).is_ok());
        assert!(f.check("w", 0, &stats).is_ok());
    }

    #[test]
    fn a_request_inside_retry_after_is_a_violation() {
        let stats = Stats::default();
        let f = Faults::default();
        f.set(
            Some("v".into()),
            Fault {
                count: Some(1),
                retry_after: 10,
                ..Fault::new(FaultKind::RateLimit)
            },
        );
        let e = f.check("v", 1_000, &stats).unwrap_err();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(10)));
        let again = f.check("v", 5_500, &stats).unwrap_err();
        assert_eq!(again.retry_after, Some(6));
        assert_eq!(
            stats
                .retry_after_violations
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(f.check("v", 11_000, &stats).is_ok());
    }

    #[test]
    fn the_re_auth_flow_clears_only_a_vehicle_s_account_fault() {
        let stats = Stats::default();
        let f = Faults::default();
        let (v, account) = parse_spec("connected_services_account@v").unwrap();
        f.set(v, account);
        f.set(Some("w".into()), Fault::new(FaultKind::Asleep));
        let e = f.check("v", 0, &stats).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.kind, e.code),
            (
                400,
                "CONNECTED_SERVICES_ACCOUNT",
                Some("AUTHENTICATION_FAILED")
            )
        );
        assert!(
            !f.clear_account_fault("w"),
            "an asleep car is not an account problem"
        );
        assert!(f.check("w", 0, &stats).is_err());
        assert!(f.clear_account_fault("v"));
        assert!(f.check("v", 0, &stats).is_ok());
        assert!(!f.clear_account_fault("v"), "nothing left to clear");
    }
}
