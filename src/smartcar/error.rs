//! The error taxonomy of smartcar-api.md §4: one [`ApiError`] for every way a Vehicle API call
//! can fail, one [`AuthError`] for the token endpoint, and the one parser that reads every error
//! body Smartcar has ever sent (v2 envelope, v3 `errors[]`, legacy/OAuth, plain text).
//!
//! Why one parser: the same body shapes appear at the top level, inside v2 batch items and (in
//! part) inside v3 signals, and the poller must decide retry/backoff/disable from `kind` alone,
//! whatever shape the server chose.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// What a failure means to the poller; [`ErrorKind::label`] is the metric `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 401 AUTHENTICATION: refresh once and retry once.
    Authentication,
    /// 403 PERMISSION: the consent lacks this scope; disable the endpoint.
    Permission,
    /// 400 VALIDATION: our bug; don't retry.
    Validation,
    /// 404 RESOURCE_NOT_FOUND.
    NotFound,
    /// 400 CONNECTED_SERVICES_ACCOUNT: the user must act at the OEM.
    ConnectedServicesAccount,
    /// 409 VEHICLE_STATE (asleep, unreachable, ...): try next tick.
    VehicleState,
    /// 429 RATE_LIMIT:VEHICLE: wait `retry_after` for this vehicle.
    RateLimitVehicle,
    /// 429 RATE_LIMIT:SMARTCAR_API: the app-wide bucket is empty.
    RateLimitApp,
    /// 430 BILLING: pause the vehicle.
    Billing,
    /// 501 COMPATIBILITY (and a v3 signal the vehicle does not provide).
    Compatibility,
    /// 500 SERVER.
    Server,
    /// 502 UPSTREAM (the OEM failed).
    Upstream,
    /// Connect/IO failure before an HTTP answer.
    Transport,
    /// The request took longer than `ClientConfig.timeout`.
    Timeout,
    /// An answer we could not make sense of (non-JSON, wrong shape).
    Decode,
    /// Anything else.
    Other,
    /// 403 AUTHENTICATION:ACCESS_DENIED (v3): the token is fine but this user's connection to
    /// the vehicle is not (revoked, or a wrong `sc-user-id`). A refresh cannot help; the
    /// connection is re-checked instead (smartcar-api.md §10.4).
    AccessDenied,
    /// A v3 signal answered `UNAVAILABLE`, or SUCCESS with a null value: no reading this
    /// time, nothing wrong with the vehicle (§10.4).
    NoReading,
    /// A v3 listing with no signals at all (`data: []`, `totalCount: 0`): Smartcar holds no
    /// data for the vehicle, most likely because it is not subscribed to a webhook (§10.5).
    NoData,
    /// A v3 signal group the app's Smartcar plan does not include (BILLING on a signal,
    /// §10.6): a plan fact, not a vehicle fact.
    PlanLocked,
    /// A top-level 400 or 404 on a v3 collection call (`/signals`): the request was refused
    /// as a whole (a missing `sc-user-id`, a Smartcar incident), which says nothing about what
    /// the vehicle can answer (§10.4). Backed off, never stored as a block. Also any
    /// 400/403/404/430/501 without Smartcar's typed error envelope (a proxy's HTML page): only
    /// a typed error may disable an endpoint or pause a vehicle (issue 11, item 5).
    Rejected,
    /// An answer larger than the body limit (2 MB for the Vehicle API): not read, backed off.
    TooLarge,
}

impl ErrorKind {
    /// Every kind, so the metrics can start each `outcome` series at 0 (an alert on the first
    /// failure of a kind needs the series to exist before it).
    pub const ALL: [ErrorKind; 22] = [
        ErrorKind::Authentication,
        ErrorKind::Permission,
        ErrorKind::Validation,
        ErrorKind::NotFound,
        ErrorKind::ConnectedServicesAccount,
        ErrorKind::VehicleState,
        ErrorKind::RateLimitVehicle,
        ErrorKind::RateLimitApp,
        ErrorKind::Billing,
        ErrorKind::Compatibility,
        ErrorKind::Server,
        ErrorKind::Upstream,
        ErrorKind::Transport,
        ErrorKind::Timeout,
        ErrorKind::Decode,
        ErrorKind::Other,
        ErrorKind::AccessDenied,
        ErrorKind::NoReading,
        ErrorKind::NoData,
        ErrorKind::PlanLocked,
        ErrorKind::Rejected,
        ErrorKind::TooLarge,
    ];

    /// The metric `outcome` label (DESIGN §3, `carpulse_polls_total`).
    pub fn label(&self) -> &'static str {
        match self {
            ErrorKind::Authentication => "auth",
            ErrorKind::Permission => "permission",
            ErrorKind::Validation => "validation",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ConnectedServicesAccount => "account",
            ErrorKind::VehicleState => "vehicle_state",
            ErrorKind::RateLimitVehicle => "rate_limited",
            ErrorKind::RateLimitApp => "app_rate_limited",
            ErrorKind::Billing => "billing",
            ErrorKind::Compatibility => "compatibility",
            ErrorKind::Server => "server",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Transport => "network",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Decode => "decode",
            ErrorKind::Other => "error",
            ErrorKind::AccessDenied => "access_denied",
            ErrorKind::NoReading => "no_reading",
            ErrorKind::NoData => "no_data",
            ErrorKind::PlanLocked => "plan_locked",
            ErrorKind::Rejected => "rejected",
            ErrorKind::TooLarge => "too_large",
        }
    }

    /// Worth retrying later without a human (smartcar-api.md §4.2 "Retryable").
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ErrorKind::VehicleState
                | ErrorKind::RateLimitVehicle
                | ErrorKind::RateLimitApp
                | ErrorKind::Server
                | ErrorKind::Upstream
                | ErrorKind::Transport
                | ErrorKind::Timeout
                | ErrorKind::Rejected
                | ErrorKind::TooLarge
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Classifies a failure per smartcar-api.md §4.2: the error `type` decides first (it is the
/// stable part of the contract; statuses have drifted, e.g. UPSTREAM:RATE_LIMIT), the HTTP
/// status is the fallback for bodies without a known type. Types are matched case-insensitively,
/// and the legacy v1 / OAuth names map onto the same kinds.
pub fn classify(status: Option<u16>, error_type: Option<&str>, code: Option<&str>) -> ErrorKind {
    if let Some(kind) = error_type.and_then(|t| classify_type(t, code)) {
        return kind;
    }
    match status {
        Some(400) => ErrorKind::Validation,
        Some(401) => ErrorKind::Authentication,
        Some(403) => ErrorKind::Permission,
        Some(404) => ErrorKind::NotFound,
        Some(408) => ErrorKind::Timeout,
        Some(409) => ErrorKind::VehicleState,
        Some(429) => {
            if code.is_some_and(|c| c.eq_ignore_ascii_case("SMARTCAR_API")) {
                ErrorKind::RateLimitApp
            } else {
                ErrorKind::RateLimitVehicle
            }
        }
        Some(430) => ErrorKind::Billing,
        Some(501) => ErrorKind::Compatibility,
        Some(502) | Some(504) => ErrorKind::Upstream,
        Some(s) if (500..600).contains(&s) => ErrorKind::Server,
        _ => ErrorKind::Other,
    }
}

fn classify_type(error_type: &str, code: Option<&str>) -> Option<ErrorKind> {
    let t = error_type.trim().to_ascii_uppercase().replace('-', "_");
    let kind = match t.as_str() {
        // 403 ACCESS_DENIED is the connection, not the token (smartcar-api.md §10.4).
        "AUTHENTICATION" if code.is_some_and(|c| c.eq_ignore_ascii_case("ACCESS_DENIED")) => {
            ErrorKind::AccessDenied
        }
        "AUTHENTICATION" | "AUTHENTICATION_ERROR" | "INVALID_TOKEN" => ErrorKind::Authentication,
        "PERMISSION" | "PERMISSION_ERROR" => ErrorKind::Permission,
        "VALIDATION" | "VALIDATION_ERROR" => ErrorKind::Validation,
        "RESOURCE_NOT_FOUND" | "RESOURCE_NOT_FOUND_ERROR" => ErrorKind::NotFound,
        "CONNECTED_SERVICES_ACCOUNT" | "VEHICLE_OWNER_ACTION_REQUIRED" => {
            ErrorKind::ConnectedServicesAccount
        }
        "VEHICLE_STATE" | "VEHICLE_STATE_ERROR" => ErrorKind::VehicleState,
        "RATE_LIMIT" | "RATE_LIMITING_ERROR" => {
            // SMARTCAR_API is the app-wide bucket; VEHICLE (and an unknown or missing code,
            // the common case in practice) is per vehicle, the narrower and cheaper reaction.
            if code.is_some_and(|c| c.eq_ignore_ascii_case("SMARTCAR_API")) {
                ErrorKind::RateLimitApp
            } else {
                ErrorKind::RateLimitVehicle
            }
        }
        "BILLING" | "MONTHLY_LIMIT_EXCEEDED" => ErrorKind::Billing,
        "COMPATIBILITY" | "VEHICLE_NOT_CAPABLE_ERROR" | "SMARTCAR_NOT_CAPABLE_ERROR" => {
            ErrorKind::Compatibility
        }
        "SERVER" | "SERVER_ERROR" => ErrorKind::Server,
        "UPSTREAM" | "GATEWAY_TIMEOUT_ERROR" => ErrorKind::Upstream,
        _ => return None,
    };
    Some(kind)
}

/// A failed Vehicle API call (or one failed item of a batch, or one failed v3 signal).
/// `Clone` because one top-level failure may be reported for several endpoints.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// HTTP status (of the item, for batch items); None for transport errors and v3 signals.
    pub status: Option<u16>,
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub description: Option<String>,
    /// From `retry-after` (integer seconds or an HTTP-date).
    pub retry_after: Option<Duration>,
    /// `sc-request-id` (or the body's `requestId`), for support tickets.
    pub request_id: Option<String>,
}

impl fmt::Display for ApiError {
    /// `rate_limited (HTTP 429 RATE_LIMIT:VEHICLE): <description>`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.label())?;
        let mut parts: Vec<String> = Vec::new();
        if let Some(s) = self.status {
            parts.push(format!("HTTP {s}"));
        }
        match (&self.error_type, &self.code) {
            (Some(t), Some(c)) => parts.push(format!("{t}:{c}")),
            (Some(t), None) => parts.push(t.clone()),
            (None, Some(c)) => parts.push(c.clone()),
            (None, None) => {}
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(" "))?;
        }
        if let Some(d) = &self.description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// `head` followed by every cause of `err` (its `source` chain), each after ": ": a transport
/// error says what failed underneath (a refused connection, a TLS alert), not only that it did.
pub(crate) fn with_causes(mut head: String, err: &(dyn std::error::Error + 'static)) -> String {
    let mut source = err.source();
    while let Some(s) = source {
        head.push_str(": ");
        head.push_str(&s.to_string());
        source = s.source();
    }
    head
}

impl ApiError {
    /// An error with only a kind and a description (transport, decode, synthetic).
    pub fn new(kind: ErrorKind, description: impl Into<String>) -> Self {
        ApiError {
            kind,
            status: None,
            error_type: None,
            code: None,
            description: Some(description.into()),
            retry_after: None,
            request_id: None,
        }
    }

    /// An answer with a success status whose body we could not use. The body itself is not
    /// copied into the error (it may be large, and errors end up in logs and metrics).
    pub fn decode(status: Option<u16>, description: impl Into<String>) -> Self {
        ApiError {
            status,
            ..ApiError::new(ErrorKind::Decode, description)
        }
    }

    /// One reading (or signal) of an otherwise good answer that could not be decoded or is
    /// out of range: kind [`ErrorKind::Decode`] with code [`BAD_VALUE`], so the poller tells it
    /// from an answer it could not read at all: that reading is lost, counted, and asked for
    /// again next tick, never a backoff of the vehicle (issue 11, item 8).
    pub fn bad_value(status: Option<u16>, description: impl Into<String>) -> Self {
        ApiError {
            code: Some(BAD_VALUE.to_owned()),
            ..ApiError::decode(status, description)
        }
    }

    /// A request that failed before an HTTP answer: timeout or transport. reqwest's messages
    /// name the URL (vehicle ids, never tokens: those travel in headers).
    pub fn from_reqwest(err: &reqwest::Error) -> Self {
        let kind = if err.is_timeout() {
            ErrorKind::Timeout
        } else if err.is_decode() || err.is_body() {
            ErrorKind::Decode
        } else {
            ErrorKind::Transport
        };
        ApiError::new(kind, with_causes(err.to_string(), err))
    }

    /// Every text field taken from the answer (type, code, description, request id) scrubbed
    /// of the secrets carpulse holds and of `extra` (the request's own token), and cut to a
    /// bounded length: what an error carries reaches logs, `poll_events` and `/healthz`.
    pub fn scrubbed(mut self, extra: &[&str]) -> Self {
        use super::scrub::{scrub, scrub_field};
        self.error_type = self.error_type.map(|t| scrub_field(&t, extra));
        self.code = self.code.map(|c| scrub_field(&c, extra));
        self.description = self.description.map(|d| scrub(&d, extra));
        self.request_id = self.request_id.map(|r| scrub_field(&r, extra));
        self
    }

    /// The v3 "signal not provided by this vehicle" error (COMPATIBILITY:SIGNAL_NOT_PROVIDED).
    pub fn signal_not_provided(signal: &str) -> Self {
        ApiError {
            error_type: Some("COMPATIBILITY".into()),
            code: Some("SIGNAL_NOT_PROVIDED".into()),
            ..ApiError::new(
                ErrorKind::Compatibility,
                format!("the vehicle did not provide signal {signal}"),
            )
        }
    }
}

/// The `code` of a decode error that concerns one reading, not the whole answer (see
/// [`ApiError::bad_value`]); it is what `poll_events.error_code` shows for it.
pub const BAD_VALUE: &str = "BAD_VALUE";

/// The token endpoint failed (smartcar-api.md §1.5). Never carries a token or the secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token endpoint refused: `error` ∈ invalid_grant, invalid_request, invalid_client,
    /// unauthorized_client, ...
    #[error("token endpoint refused{}: {error}{}", fmt_status(*status), fmt_desc(description))]
    Rejected {
        status: Option<u16>,
        error: String,
        description: Option<String>,
    },
    /// Network, timeout, 5xx, 429, unparsable body: retry with the same refresh token.
    #[error("token endpoint unavailable: {message}")]
    Transient { message: String },
}

fn fmt_status(status: Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

fn fmt_desc(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
}

impl AuthError {
    /// True when retrying with the same grant cannot help: the user must run Connect again
    /// (DESIGN §2.2). Transient failures are never terminal; a refusal answered with a 5xx or
    /// 429 is already classified [`AuthError::Transient`].
    pub fn needs_reauth(&self) -> bool {
        // Only a refusal of the grant itself (DESIGN §2.2): `invalid_client`, a 404 and the
        // like say carpulse's own configuration is wrong (secret, token_url), and must not
        // cost every owner a reconnect.
        match self {
            AuthError::Rejected { error, .. } => {
                matches!(error.as_str(), "invalid_grant" | "invalid_request")
            }
            AuthError::Transient { .. } => false,
        }
    }
}

/// The fields one error body yields, whatever its shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// Status written in the body (`statusCode`, v3 `status` string).
    pub status: Option<u16>,
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub description: Option<String>,
    pub request_id: Option<String>,
}

/// Reads any error body: the v2 envelope (§4.1; `code` may be null, `resolution` of any shape
/// is ignored), v3 `{"errors":[…]}` (§3.6, first error wins), legacy/OAuth
/// `{"error", "message"|"error_description", "code"?}`, or non-JSON text (kept as a short
/// description). Never fails: an unknown shape yields an empty [`ErrorBody`].
pub fn parse_error_body(body: &[u8]) -> ErrorBody {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => parse_error_value(&v),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            ErrorBody {
                description: (!text.is_empty()).then(|| excerpt(text, RAW_TEXT)),
                ..ErrorBody::default()
            }
        }
    }
}

/// How much of one text field of an error body is kept before [`ApiError::scrubbed`] (or the
/// token endpoint's scrub) cuts it to its final length: enough that a secret starting inside
/// the kept part is still whole when the scrubber looks for it.
const RAW_TEXT: usize = 2_000;

/// [`parse_error_body`] on an already-parsed JSON value (batch item bodies arrive that way).
pub fn parse_error_value(v: &Value) -> ErrorBody {
    let Some(obj) = v.as_object() else {
        return ErrorBody {
            description: v.as_str().map(|s| excerpt(s, RAW_TEXT)),
            ..ErrorBody::default()
        };
    };
    // v3: {"errors":[{status,type,code,title,detail}]}
    if let Some(first) = obj
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return ErrorBody {
            status: first.get("status").and_then(value_u16),
            error_type: str_field(first, "type"),
            code: str_field(first, "code"),
            description: str_field(first, "detail")
                .or_else(|| str_field(first, "description"))
                .or_else(|| str_field(first, "title")),
            // Live v3 errors carry it in `meta.debug.requestId` (smartcar-api.md §10.4).
            request_id: str_field(first, "requestId")
                .or_else(|| {
                    first
                        .get("meta")
                        .and_then(|m| m.get("debug"))
                        .and_then(|d| str_field(d, "requestId"))
                })
                .or_else(|| str_field(v, "requestId")),
        };
    }
    // v2 envelope: {type, code, description, statusCode, requestId, resolution}
    if obj.contains_key("type") {
        return ErrorBody {
            status: obj.get("statusCode").and_then(value_u16),
            error_type: str_field(v, "type"),
            code: str_field(v, "code"),
            description: str_field(v, "description").or_else(|| str_field(v, "message")),
            request_id: str_field(v, "requestId"),
        };
    }
    // legacy v1 / OAuth: {error, message|error_description, code?}
    if let Some(err) = str_field(v, "error") {
        return ErrorBody {
            status: obj.get("statusCode").and_then(value_u16),
            error_type: Some(err),
            code: str_field(v, "code"),
            description: str_field(v, "error_description").or_else(|| str_field(v, "message")),
            request_id: str_field(v, "requestId"),
        };
    }
    ErrorBody {
        status: obj.get("statusCode").and_then(value_u16),
        description: str_field(v, "message").or_else(|| str_field(v, "description")),
        request_id: str_field(v, "requestId"),
        ..ErrorBody::default()
    }
}

/// Builds the [`ApiError`] of a non-success answer. `status` is the HTTP status (the body's
/// own `statusCode` is only used when the transport gave none).
pub fn api_error_from(
    status: Option<u16>,
    parsed: ErrorBody,
    retry_after: Option<Duration>,
    request_id: Option<String>,
) -> ApiError {
    let status = status.or(parsed.status);
    let mut kind = classify(status, parsed.error_type.as_deref(), parsed.code.as_deref());
    // Only Smartcar's own typed envelope may disable an endpoint or pause a vehicle: a bare
    // status (a proxy's HTML 404, a load balancer's 403) says nothing about the vehicle, so it
    // is backed off like any transient failure and never stored as a block.
    let typed = parsed
        .error_type
        .as_deref()
        .and_then(|t| classify_type(t, parsed.code.as_deref()))
        .is_some();
    if !typed
        && matches!(
            kind,
            ErrorKind::Permission
                | ErrorKind::Validation
                | ErrorKind::NotFound
                | ErrorKind::ConnectedServicesAccount
                | ErrorKind::Billing
                | ErrorKind::Compatibility
        )
    {
        kind = ErrorKind::Rejected;
    }
    ApiError {
        kind,
        status,
        error_type: parsed.error_type,
        code: parsed.code,
        description: parsed.description,
        retry_after,
        request_id: request_id.or(parsed.request_id),
    }
}

/// `retry-after`: integer (or decimal) seconds as documented, or an HTTP-date (tolerated:
/// RFC 7231 allows it); a date in the past means "now" (zero).
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(cap_retry_after(Duration::from_secs(secs)));
    }
    if let Ok(secs) = v.parse::<f64>() {
        return secs_capped(secs);
    }
    // RFC 9110 §10.2.3: an HTTP-date (IMF-fixdate; RFC 2822 parsing also takes the obsolete
    // forms' common cases). A date in the past is "now"; one beyond a day is capped like the
    // seconds form (a `Fri, 31 Dec 9999` must not silence a vehicle for ever, issue 11 item 2).
    let date = chrono::DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|d| d.timestamp_millis())
        .or_else(|| {
            // RFC 850 / asctime forms, which RFC 9110 still asks recipients to accept.
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(v, f).ok())
                .map(|t| t.and_utc().timestamp_millis())
        })?;
    let delta = date.saturating_sub(now_ms).max(0);
    Some(cap_retry_after(Duration::from_millis(delta as u64)))
}

/// A day at most: a larger `retry-after` is a server's mistake, not a plan.
fn cap_retry_after(d: Duration) -> Duration {
    d.min(Duration::from_secs(86_400))
}

/// Fractional seconds, capped; negative or not a number is no value (never a panic).
fn secs_capped(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// `retry-after` as a JSON value (batch item headers send it as a number or a string).
pub fn retry_after_value(v: &Value, now_ms: i64) -> Option<Duration> {
    match v {
        Value::Number(n) => n.as_f64().and_then(secs_capped),
        Value::String(s) => parse_retry_after(s, now_ms),
        _ => None,
    }
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.is_empty() => Some(excerpt(s, RAW_TEXT)),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn value_u16(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// At most `max` characters of `s` (on a char boundary), for logs and descriptions.
pub fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn api(status: u16, body: &str) -> ApiError {
        api_error_from(Some(status), parse_error_body(body.as_bytes()), None, None)
    }

    #[test]
    fn labels_are_the_metric_contract() {
        let table = [
            (ErrorKind::Authentication, "auth"),
            (ErrorKind::Permission, "permission"),
            (ErrorKind::Validation, "validation"),
            (ErrorKind::NotFound, "not_found"),
            (ErrorKind::ConnectedServicesAccount, "account"),
            (ErrorKind::VehicleState, "vehicle_state"),
            (ErrorKind::RateLimitVehicle, "rate_limited"),
            (ErrorKind::RateLimitApp, "app_rate_limited"),
            (ErrorKind::Billing, "billing"),
            (ErrorKind::Compatibility, "compatibility"),
            (ErrorKind::Server, "server"),
            (ErrorKind::Upstream, "upstream"),
            (ErrorKind::Transport, "network"),
            (ErrorKind::Timeout, "timeout"),
            (ErrorKind::Decode, "decode"),
            (ErrorKind::Other, "error"),
        ];
        for (kind, label) in table {
            assert_eq!(kind.label(), label);
        }
    }

    #[test]
    fn all_lists_every_kind_once() {
        // A new variant fails this match to compile, which points here and at ALL.
        fn known(k: ErrorKind) -> bool {
            use ErrorKind::*;
            match k {
                Authentication
                | Permission
                | Validation
                | NotFound
                | ConnectedServicesAccount
                | VehicleState
                | RateLimitVehicle
                | RateLimitApp
                | Billing
                | Compatibility
                | Server
                | Upstream
                | Transport
                | Timeout
                | Decode
                | Other
                | AccessDenied
                | NoReading
                | NoData
                | PlanLocked
                | Rejected
                | TooLarge => true,
            }
        }
        let labels: std::collections::HashSet<_> =
            ErrorKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), 22, "ALL has 22 distinct kinds");
        assert!(ErrorKind::ALL.iter().all(|k| known(*k)));
    }

    #[test]
    fn classification_table_type_first() {
        use ErrorKind::*;
        type Case = (
            Option<u16>,
            Option<&'static str>,
            Option<&'static str>,
            ErrorKind,
        );
        let cases: &[Case] = &[
            (Some(401), Some("AUTHENTICATION"), None, Authentication),
            (Some(403), Some("PERMISSION"), None, Permission),
            (Some(400), Some("VALIDATION"), Some("PARAMETER"), Validation),
            (
                Some(404),
                Some("RESOURCE_NOT_FOUND"),
                Some("PATH"),
                NotFound,
            ),
            (
                Some(400),
                Some("CONNECTED_SERVICES_ACCOUNT"),
                Some("VEHICLE_MISSING"),
                ConnectedServicesAccount,
            ),
            (
                Some(409),
                Some("VEHICLE_STATE"),
                Some("ASLEEP"),
                VehicleState,
            ),
            (
                Some(429),
                Some("RATE_LIMIT"),
                Some("VEHICLE"),
                RateLimitVehicle,
            ),
            (
                Some(429),
                Some("RATE_LIMIT"),
                Some("SMARTCAR_API"),
                RateLimitApp,
            ),
            (Some(430), Some("BILLING"), Some("VEHICLE_LIMIT"), Billing),
            (
                Some(501),
                Some("COMPATIBILITY"),
                Some("VEHICLE_NOT_CAPABLE"),
                Compatibility,
            ),
            (Some(500), Some("SERVER"), Some("INTERNAL"), Server),
            (Some(502), Some("UPSTREAM"), Some("RATE_LIMIT"), Upstream),
            // the type wins over a drifting status
            (Some(500), Some("UPSTREAM"), Some("NO_RESPONSE"), Upstream),
            (
                Some(400),
                Some("vehicle_state"),
                Some("ASLEEP"),
                VehicleState,
            ),
            // legacy v1 names
            (
                Some(409),
                Some("vehicle_state_error"),
                Some("VS_000"),
                VehicleState,
            ),
            (
                Some(501),
                Some("vehicle_not_capable_error"),
                None,
                Compatibility,
            ),
            // status fallback
            (Some(401), None, None, Authentication),
            (Some(403), Some("weird"), None, Permission),
            (Some(409), None, None, VehicleState),
            (Some(429), None, None, RateLimitVehicle),
            (Some(430), None, None, Billing),
            (Some(501), None, None, Compatibility),
            (Some(503), None, None, Server),
            (Some(504), None, None, Upstream),
            (Some(418), None, None, Other),
            (None, None, None, Other),
            (
                None,
                Some("COMPATIBILITY"),
                Some("VEHICLE_NOT_CAPABLE"),
                Compatibility,
            ),
        ];
        for (status, t, c, want) in cases {
            assert_eq!(classify(*status, *t, *c), *want, "{status:?} {t:?} {c:?}");
        }
    }

    #[test]
    fn v2_envelope_with_null_code_and_object_resolution() {
        let e = api(
            409,
            r#"{"type":"VEHICLE_STATE","code":"ASLEEP","description":"asleep.","docURL":"x",
               "statusCode":409,"requestId":"req-1","resolution":{"type":null},
               "suggestedUserMessage":"zz"}"#,
        );
        assert_eq!(e.kind, ErrorKind::VehicleState);
        assert_eq!(e.status, Some(409));
        assert_eq!(e.error_type.as_deref(), Some("VEHICLE_STATE"));
        assert_eq!(e.code.as_deref(), Some("ASLEEP"));
        assert_eq!(e.description.as_deref(), Some("asleep."));
        assert_eq!(e.request_id.as_deref(), Some("req-1"));

        let e = api(
            401,
            r#"{"type":"AUTHENTICATION","code":null,"description":"bad token","resolution":"REAUTHENTICATE","statusCode":401}"#,
        );
        assert_eq!(e.kind, ErrorKind::Authentication);
        assert_eq!(e.code, None);
        assert_eq!(e.to_string(), "auth (HTTP 401 AUTHENTICATION): bad token");

        let e = api(
            403,
            r#"{"type":"PERMISSION","code":null,"description":"no","resolution":null}"#,
        );
        assert_eq!(e.kind, ErrorKind::Permission);
    }

    #[test]
    fn v3_envelope_with_string_status() {
        let body = r#"{"errors":[{"status":"502","type":"UPSTREAM","code":"INVALID_DATA","title":"Bad Gateway",
            "detail":"invalid data","links":{"about":"x"},"resolution":{"type":"RETRY_LATER"}}]}"#;
        let parsed = parse_error_body(body.as_bytes());
        assert_eq!(parsed.status, Some(502));
        let e = api_error_from(None, parsed, None, Some("rid".into()));
        assert_eq!(e.kind, ErrorKind::Upstream);
        assert_eq!(e.status, Some(502));
        assert_eq!(e.code.as_deref(), Some("INVALID_DATA"));
        assert_eq!(e.description.as_deref(), Some("invalid data"));
        assert_eq!(e.request_id.as_deref(), Some("rid"));
    }

    #[test]
    fn legacy_oauth_and_text_bodies() {
        let e = api(
            501,
            r#"{"error":"vehicle_not_capable_error","message":"nope","code":"VNC_001"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Compatibility);
        assert_eq!(e.description.as_deref(), Some("nope"));
        assert_eq!(e.code.as_deref(), Some("VNC_001"));

        let p = parse_error_body(br#"{"error":"invalid_grant","error_description":"expired"}"#);
        assert_eq!(p.error_type.as_deref(), Some("invalid_grant"));
        assert_eq!(p.description.as_deref(), Some("expired"));

        let e = api(502, "<html>Bad gateway</html>");
        assert_eq!(e.kind, ErrorKind::Upstream);
        assert_eq!(e.description.as_deref(), Some("<html>Bad gateway</html>"));

        let e = api(500, "");
        assert_eq!(e.kind, ErrorKind::Server);
        assert_eq!(e.description, None);
        assert_eq!(e.to_string(), "server (HTTP 500)");

        let e = api(429, r#"{"unexpected":true}"#);
        assert_eq!(e.kind, ErrorKind::RateLimitVehicle);
    }

    #[test]
    fn display_format() {
        let e = ApiError {
            retry_after: Some(Duration::from_secs(30)),
            ..api(
                429,
                r#"{"type":"RATE_LIMIT","code":"VEHICLE","description":"slow down"}"#,
            )
        };
        assert_eq!(
            e.to_string(),
            "rate_limited (HTTP 429 RATE_LIMIT:VEHICLE): slow down"
        );
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(parse_retry_after("30", 0), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after(" 1.5 ", 0),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-3", 0), None);
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after_value(&json!(999), 0),
            Some(Duration::from_secs(999))
        );
        assert_eq!(
            retry_after_value(&json!("12"), 0),
            Some(Duration::from_secs(12))
        );
    }

    #[test]
    fn auth_error_reauth_rules() {
        let r = AuthError::Rejected {
            status: Some(400),
            error: "invalid_grant".into(),
            description: Some("expired".into()),
        };
        assert!(r.needs_reauth());
        assert_eq!(
            r.to_string(),
            "token endpoint refused (HTTP 400): invalid_grant (expired)"
        );
        assert!(!AuthError::Transient {
            message: "x".into()
        }
        .needs_reauth());
        assert!(!AuthError::Rejected {
            status: Some(500),
            error: "server_error".into(),
            description: None
        }
        .needs_reauth());
    }

    #[test]
    fn excerpt_cuts_on_char_boundary() {
        assert_eq!(excerpt("héllo", 2), "hé…");
        assert_eq!(excerpt("hi", 5), "hi");
    }
}

#[cfg(test)]
mod review_tests {
    use super::*;

    #[test]
    fn only_a_refused_grant_needs_reauth() {
        let rejected = |error: &str, status| AuthError::Rejected {
            status: Some(status),
            error: error.into(),
            description: None,
        };
        assert!(rejected("invalid_grant", 400).needs_reauth());
        assert!(rejected("invalid_request", 400).needs_reauth());
        // carpulse's own configuration is wrong: the owners' grants are fine.
        assert!(!rejected("invalid_client", 401).needs_reauth());
        assert!(!rejected("unauthorized_client", 400).needs_reauth());
        assert!(!rejected("http_404", 404).needs_reauth());
    }

    #[test]
    fn absurd_retry_after_values_are_capped_not_a_panic() {
        let day = Duration::from_secs(86_400);
        assert_eq!(parse_retry_after("1e30", 0), Some(day));
        assert_eq!(parse_retry_after("99999999999", 0), Some(day));
        assert_eq!(parse_retry_after("-5", 0), None);
        assert_eq!(retry_after_value(&serde_json::json!(1e300), 0), Some(day));
        assert_eq!(retry_after_value(&serde_json::json!(-1.0), 0), None);
        assert_eq!(parse_retry_after("30", 0), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_far_http_date_is_capped_at_a_day_and_a_past_one_is_now() {
        let day = Duration::from_secs(86_400);
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(day)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Monday, 30-Nov-26 12:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Mon Nov 30 12:00:30 2026", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after_value(&serde_json::json!("Fri, 31 Dec 9999 23:59:59 GMT"), now),
            Some(day)
        );
    }

    #[test]
    fn only_a_typed_error_can_block() {
        let api = |status: u16, body: &str| {
            api_error_from(Some(status), parse_error_body(body.as_bytes()), None, None)
        };
        for status in [400, 403, 404, 430, 501] {
            let e = api(status, "<html><body>Not Found</body></html>");
            assert_eq!(e.kind, ErrorKind::Rejected, "HTML {status}");
            assert!(e.kind.is_transient());
            let e = api(status, "");
            assert_eq!(e.kind, ErrorKind::Rejected, "empty {status}");
            let e = api(status, r#"{"message":"forbidden by proxy"}"#);
            assert_eq!(e.kind, ErrorKind::Rejected, "untyped JSON {status}");
        }
        let e = api(
            403,
            r#"{"type":"PERMISSION","code":null,"description":"x"}"#,
        );
        assert_eq!(e.kind, ErrorKind::Permission);
        let e = api(
            501,
            r#"{"errors":[{"status":"501","type":"COMPATIBILITY","code":"VEHICLE_NOT_CAPABLE"}]}"#,
        );
        assert_eq!(e.kind, ErrorKind::Compatibility);
        // Transient statuses keep their meaning without a type.
        assert_eq!(api(409, "<html/>").kind, ErrorKind::VehicleState);
        assert_eq!(api(429, "<html/>").kind, ErrorKind::RateLimitVehicle);
    }

    #[test]
    fn v3_errors_as_seen_live() {
        // 400 without sc-user-id, with the request id only in meta.debug (smartcar-api.md §10.4).
        let e = api_error_from(
            Some(400),
            parse_error_body(
                br#"{"errors":[{"status":"400","type":"VALIDATION","code":"MISSING_PARAMETER","title":"Bad Request","detail":"missing userId","meta":{"debug":{"requestId":"rid-123"}}}]}"#,
            ),
            None,
            None,
        );
        assert_eq!(e.kind, ErrorKind::Validation);
        assert_eq!(e.code.as_deref(), Some("MISSING_PARAMETER"));
        assert_eq!(e.request_id.as_deref(), Some("rid-123"));
        // 403 ACCESS_DENIED is the connection, not the token.
        let e = api_error_from(
            Some(403),
            parse_error_body(
                br#"{"errors":[{"status":"403","type":"AUTHENTICATION","code":"ACCESS_DENIED","detail":"x"}]}"#,
            ),
            None,
            None,
        );
        assert_eq!(e.kind, ErrorKind::AccessDenied);
        // 401 UNAUTHORIZED is still a token to renew.
        let e = api_error_from(
            Some(401),
            parse_error_body(
                br#"{"errors":[{"status":"401","type":"AUTHENTICATION","code":"UNAUTHORIZED"}]}"#,
            ),
            None,
            None,
        );
        assert_eq!(e.kind, ErrorKind::Authentication);
    }
}
