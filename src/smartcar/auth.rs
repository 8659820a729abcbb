//! The token endpoint (smartcar-api.md §1.3–1.5) through the `oauth2` crate: code exchange and
//! refresh, with Basic client auth. It computes the expiries carpulse stores (Smartcar sends
//! only `expires_in`; refresh tokens live 60 days) and sorts failures into "the user must
//! reconnect" ([`AuthError::Rejected`]) and "retry with the same token" ([`AuthError::Transient`]),
//! which is what the token manager's persist-before-use rule needs.
//!
//! `oauth2` hides the HTTP status of a refusal and is strict about the success body, so the
//! HTTP function we hand it records the status and body it saw and normalises harmless
//! deviations (a missing `token_type`, `expires_in` as a string, a non-JSON content type).

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use oauth2::basic::{BasicClient, BasicErrorResponse};
use oauth2::{
    AsyncHttpClient, AuthType, AuthorizationCode, ClientId, ClientSecret, EndpointNotSet,
    EndpointSet, HttpClientError, HttpRequest, HttpResponse, RedirectUrl, RefreshToken,
    RequestTokenError, TokenResponse, TokenUrl,
};
use serde_json::Value;

use super::error::{parse_error_body, AuthError};
use super::{ClientConfig, SmartcarClient};
use crate::domain::{now_ms, Secret, TokenPair, REFRESH_TOKEN_LIFETIME_MS};

/// `expires_in` when the server omits it (Smartcar documents "always 7200").
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 7200;

/// The `oauth2` client with only the token endpoint set.
pub(crate) type OAuthClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The future of one token-endpoint HTTP call (Send, so a refresh can run in a spawned task).
type TokenHttpFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<HttpResponse, HttpClientError<reqwest::Error>>>
            + Send
            + 'a,
    >,
>;

type TokenError = RequestTokenError<HttpClientError<reqwest::Error>, BasicErrorResponse>;

pub(crate) fn build_oauth(cfg: &ClientConfig) -> anyhow::Result<OAuthClient> {
    let token_url = TokenUrl::new(cfg.token_url.trim().to_string())
        .with_context(|| format!("token_url {:?} is not a URL", cfg.token_url))?;
    let redirect = RedirectUrl::new(cfg.redirect_uri.trim().to_string())
        .with_context(|| format!("redirect_uri {:?} is not a URL", cfg.redirect_uri))?;
    Ok(BasicClient::new(ClientId::new(cfg.client_id.clone()))
        .set_client_secret(ClientSecret::new(cfg.client_secret.expose().to_string()))
        .set_auth_type(AuthType::BasicAuth)
        .set_token_uri(token_url)
        .set_redirect_uri(redirect))
}

/// What the token endpoint answered, whatever `oauth2` made of it.
#[derive(Default)]
pub(crate) struct Seen {
    status: Option<u16>,
    body: Vec<u8>,
}

impl SmartcarClient {
    /// Exchanges a Connect authorization code (valid 10 minutes) for a token pair.
    pub async fn exchange_code(&self, code: &str) -> Result<TokenPair, AuthError> {
        let issued_at = now_ms();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let http = self.recording_http(&seen);
        let result = self
            .inner
            .oauth
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .request_async(&http)
            .await;
        let secrets = [code, self.inner.client_secret.expose()];
        match result {
            Ok(tok) => {
                let refresh = tok.refresh_token().ok_or_else(|| AuthError::Transient {
                    message: "token response carried no refresh_token".into(),
                })?;
                Ok(pair(
                    issued_at,
                    tok.access_token().secret(),
                    refresh.secret(),
                    tok.expires_in(),
                ))
            }
            Err(e) => Err(map_error(e, &seen, &secrets)),
        }
    }

    /// Exchanges a refresh token for a new pair. Smartcar rotates the refresh token on every
    /// refresh; an answer without one keeps the old one (tolerance for servers that don't).
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenPair, AuthError> {
        let issued_at = now_ms();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let http = self.recording_http(&seen);
        let rt = RefreshToken::new(refresh_token.expose().to_string());
        let result = self
            .inner
            .oauth
            .exchange_refresh_token(&rt)
            .request_async(&http)
            .await;
        let secrets = [refresh_token.expose(), self.inner.client_secret.expose()];
        match result {
            Ok(tok) => {
                let refresh = match tok.refresh_token() {
                    Some(r) => r.secret().as_str(),
                    None => {
                        // Smartcar always rotates; an answer without a new one is odd, and the
                        // old token may die with its grace window: said out loud.
                        tracing::warn!(
                            "the refresh answer carried no refresh_token; keeping the old one (Smartcar normally rotates it on every refresh)"
                        );
                        refresh_token.expose()
                    }
                };
                Ok(pair(
                    issued_at,
                    tok.access_token().secret(),
                    refresh,
                    tok.expires_in(),
                ))
            }
            Err(e) => Err(map_error(e, &seen, &secrets)),
        }
    }

    /// The HTTP client handed to `oauth2`.
    fn recording_http(&self, seen: &Arc<Mutex<Seen>>) -> RecordingHttp {
        RecordingHttp {
            http: self.http().clone(),
            seen: Arc::clone(seen),
        }
    }
}

/// The shared reqwest client, plus a note of what came back and the normalisation described
/// in the module doc. A named type rather than a closure: `oauth2`'s blanket impl for
/// closures leaves the request future's `Send` unprovable (a higher-ranked lifetime), and
/// the token manager spawns refreshes on the multi-threaded runtime. It owns its parts (a
/// reqwest client clone is one `Arc`) for the same reason: no lifetime parameter to trip on.
/// How long a token request may take.
pub const TOKEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub(crate) struct RecordingHttp {
    http: reqwest::Client,
    seen: Arc<Mutex<Seen>>,
}

impl<'c> AsyncHttpClient<'c> for RecordingHttp {
    type Error = HttpClientError<reqwest::Error>;
    type Future = TokenHttpFuture<'c>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            // The token endpoint answers in well under a second; a refresh must not wait out
            // the vehicle API's 310 s (the used refresh token's grace window is ~1 minute).
            // One deadline for the whole exchange, the body included (a slow drip ends here).
            let deadline = tokio::time::Instant::now() + TOKEN_TIMEOUT;
            let timed_out = || {
                HttpClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer from the token endpoint within {} s",
                        TOKEN_TIMEOUT.as_secs()
                    ),
                ))
            };
            let request: reqwest::Request = request.try_into().map_err(Box::new)?;
            let response = tokio::time::timeout_at(deadline, self.http.execute(request))
                .await
                .map_err(|_| timed_out())?
                .map_err(Box::new)?;
            let mut builder = oauth2::http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            // Read with a bound (64 KB): a huge answer is never held in memory.
            let body = super::read_limited(response, super::TOKEN_BODY_LIMIT, deadline)
                .await
                .map_err(|e| match e {
                    super::BodyError::Transport(e) => HttpClientError::Reqwest(Box::new(e)),
                    super::BodyError::Deadline => timed_out(),
                    too_large => HttpClientError::Other(too_large.to_string()),
                })?;
            let resp = builder.body(body).map_err(HttpClientError::Http)?;
            let status = resp.status().as_u16();
            if let Ok(mut s) = self.seen.lock() {
                s.status = Some(status);
                s.body = resp.body().clone();
            }
            Ok(normalize(resp))
        })
    }
}

/// Makes a 200 token answer acceptable to `oauth2` when it deviates harmlessly from RFC 6749.
fn normalize(resp: HttpResponse) -> HttpResponse {
    if resp.status() != oauth2::http::StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::from_parts(parts, body);
    };
    if !matches!(obj.get("token_type"), Some(Value::String(_))) {
        obj.insert("token_type".into(), Value::String("Bearer".into()));
    }
    match obj.get("expires_in") {
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => {
                obj.insert("expires_in".into(), Value::from(n as u64));
            }
            _ => {
                obj.remove("expires_in");
            }
        },
        Some(Value::Number(n)) if n.as_u64().is_none() => match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => {
                obj.insert("expires_in".into(), Value::from(f as u64));
            }
            _ => {
                obj.remove("expires_in");
            }
        },
        Some(Value::Null) => {
            obj.remove("expires_in");
        }
        _ => {}
    }
    let body = serde_json::to_vec(&Value::Object(obj)).unwrap_or(body);
    parts.headers.insert(
        oauth2::http::header::CONTENT_TYPE,
        oauth2::http::HeaderValue::from_static("application/json"),
    );
    HttpResponse::from_parts(parts, body)
}

/// The longest `expires_in` taken as given (Smartcar documents "always 7200"): a larger one
/// (`1e12`) is read as a day, so a wrong answer cannot keep a dead token in use for ever.
pub const MAX_EXPIRES_IN_SECS: u64 = 86_400;

/// `expires_in` as carpulse uses it: missing, unparsable, zero or negative (dropped by
/// [`normalize`]) are Smartcar's documented 7200 s (issue 11: `expires_in: 0` made about two
/// refreshes a second); more than [`MAX_EXPIRES_IN_SECS`] is that. A short positive lifetime
/// is taken as given (a token used past its real expiry only earns 401s). Odd answers are
/// logged.
pub fn bounded_expires_in(expires_in: Option<std::time::Duration>) -> u64 {
    match expires_in.map(|d| d.as_secs()) {
        None | Some(0) => {
            tracing::warn!(
                default_s = DEFAULT_EXPIRES_IN_SECS,
                "the token answer had no usable expires_in (missing, zero, negative or not a number); assuming Smartcar's documented lifetime"
            );
            DEFAULT_EXPIRES_IN_SECS
        }
        Some(s) if s > MAX_EXPIRES_IN_SECS => {
            tracing::warn!(
                expires_in_s = s,
                max_s = MAX_EXPIRES_IN_SECS,
                "the token answer's expires_in is absurdly large; using the maximum"
            );
            MAX_EXPIRES_IN_SECS
        }
        Some(s) => s,
    }
}

fn pair(
    issued_at: i64,
    access: &str,
    refresh: &str,
    expires_in: Option<std::time::Duration>,
) -> TokenPair {
    let expires_ms = bounded_expires_in(expires_in) as i64 * 1000;
    TokenPair {
        access_token: Secret::new(access),
        refresh_token: Secret::new(refresh),
        access_expires_at: issued_at.saturating_add(expires_ms),
        refresh_expires_at: issued_at.saturating_add(REFRESH_TOKEN_LIFETIME_MS),
    }
}

/// Replaces every secret we sent in `text`, in every encoding (a server may echo the token or
/// the Basic header in its description), and cuts it (see [`super::scrub`]).
fn scrub(text: &str, secrets: &[&str]) -> String {
    super::scrub::scrub(text, secrets)
}

/// OAuth `error` values that mean "try again later", not "this grant is dead".
fn is_transient_oauth_error(error: &str) -> bool {
    matches!(
        error.to_ascii_lowercase().as_str(),
        "server_error" | "temporarily_unavailable" | "slow_down"
    )
}

/// Sorts a failed token request (smartcar-api.md §1.5): no answer, 5xx, 429, 408 or an
/// unusable 200 → Transient; any other refusal → Rejected with the OAuth `error` (or the
/// Smartcar error `type`, or `http_<status>`). No message ever holds a token or the secret.
fn map_error(err: TokenError, seen: &Mutex<Seen>, secrets: &[&str]) -> AuthError {
    let (status, body) = match seen.lock() {
        Ok(s) => (s.status, s.body.clone()),
        Err(_) => (None, Vec::new()),
    };
    let err = match err {
        RequestTokenError::Request(e) => {
            let mut msg = format!("request failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            return AuthError::Transient {
                message: scrub(&msg, secrets),
            };
        }
        other => other,
    };
    let Some(status) = status else {
        return AuthError::Transient {
            message: "token request failed without an answer".into(),
        };
    };
    if status == 200 {
        // Never echo serde's message: it may quote a value from the body, i.e. a new token.
        let detail = match &err {
            RequestTokenError::Parse(e, _) => format!("malformed field `{}`", e.path()),
            RequestTokenError::Other(m) => m.clone(),
            _ => "unusable answer".into(),
        };
        return AuthError::Transient {
            message: format!("token endpoint answered 200 with an unusable body ({detail})"),
        };
    }
    let parsed = parse_error_body(&body);
    // Scrubbed before it is cut, so a secret at the cut cannot leave half of itself behind.
    let description = parsed.description.as_deref().map(|d| scrub(d, secrets));
    let error = parsed
        .error_type
        .clone()
        .map(|e| super::scrub::scrub_field(&e, secrets))
        .unwrap_or_else(|| format!("http_{status}"));
    if status >= 500 || status == 429 || status == 408 || is_transient_oauth_error(&error) {
        let mut message = format!("HTTP {status}: {error}");
        if let Some(d) = &description {
            message.push_str(&format!(" ({d})"));
        }
        return AuthError::Transient { message };
    }
    AuthError::Rejected {
        status: Some(status),
        error,
        description,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_computes_expiries() {
        let p = pair(1_000, "a", "r", Some(std::time::Duration::from_secs(3600)));
        assert_eq!(p.access_expires_at, 1_000 + 3_600_000);
        assert_eq!(p.refresh_expires_at, 1_000 + REFRESH_TOKEN_LIFETIME_MS);
        let p = pair(0, "a", "r", None);
        assert_eq!(p.access_expires_at, 7_200_000);
    }

    #[test]
    fn odd_expires_in_values_are_bounded() {
        use std::time::Duration;
        assert_eq!(bounded_expires_in(None), DEFAULT_EXPIRES_IN_SECS);
        assert_eq!(
            bounded_expires_in(Some(Duration::ZERO)),
            DEFAULT_EXPIRES_IN_SECS
        );
        assert_eq!(
            bounded_expires_in(Some(Duration::from_secs(1_000_000_000_000))),
            MAX_EXPIRES_IN_SECS
        );
        assert_eq!(bounded_expires_in(Some(Duration::from_secs(1))), 1);
        assert_eq!(bounded_expires_in(Some(Duration::from_secs(7200))), 7200);
        // Negative and non-numeric values never reach oauth2: normalize drops them.
        for body in [
            r#"{"access_token":"a","expires_in":-5,"refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":"soon","refresh_token":"r"}"#,
        ] {
            let resp = oauth2::http::Response::builder()
                .status(200)
                .body(body.as_bytes().to_vec())
                .unwrap();
            let v: Value = serde_json::from_slice(normalize(resp).body()).unwrap();
            assert!(v.get("expires_in").is_none(), "{body}");
        }
    }

    #[test]
    fn scrub_removes_secrets() {
        assert_eq!(
            scrub("bad token abcd-1234 here", &["abcd-1234"]),
            "bad token [redacted] here"
        );
    }

    #[test]
    fn normalize_fills_token_type_and_numeric_expiry() {
        let resp = oauth2::http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(br#"{"access_token":"a","expires_in":"7200","refresh_token":"r"}"#.to_vec())
            .unwrap();
        let out = normalize(resp);
        let v: Value = serde_json::from_slice(out.body()).unwrap();
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 7200);
        assert_eq!(out.headers()["content-type"], "application/json");
    }
}
