//! Smartcar's OAuth surface: Connect's `GET /oauth/authorize` (auto-approved) and re-auth flow
//! `GET /oauth/reauthenticate`, the token endpoint `POST /oauth/token`, the v3 application token
//! endpoint `POST /oauth2/token`, plus the token table the vehicle API checks bearer tokens
//! against.
//!
//! Every approval (here or on the consent page) goes through [`approved_redirect`]: it records
//! the user's connections ([`super::connections`]) and redirects with `code`, `user_id` and
//! `state` (only `user_id` and `state` with `--redirect-without-code`, the newest docs' shape,
//! smartcar-api.md §10.2).
//!
//! Every code and token carries the [`Scope`] its consent granted: the code remembers the
//! approved `scope`, the pair exchanged for it carries it, each rotation hands it on. The
//! vehicle API answers 403 PERMISSION for what it does not cover.
//!
//! The rules follow smartcar-api.md §1: single-use codes valid 10 minutes and bound to their
//! redirect URI, Basic client auth, rotation on every refresh with the used refresh token still
//! accepted for a grace window, old access tokens valid until their own expiry. Application tokens
//! follow §1.7/§10.1: `client_credentials` with the API credentials (not Connect's) in the form
//! body, one hour, no refresh token. Tokens are random (not seeded): they are credentials, and a
//! restart must not re-issue old ones.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use super::errors::oauth_error;
use super::fleet::random_uuid;
use super::scope::Scope;
use super::stats::bump;
use super::SimState;
use crate::domain::{now_ms, UnixMillis};

/// Expired tokens are remembered this long so a late use is reported as "expired", not "unknown".
const FORGET_AFTER_MS: i64 = 24 * 3600 * 1000;
/// Prune the tables after this many issued tokens.
const PRUNE_EVERY: u64 = 1024;

struct Code {
    user: usize,
    redirect_uri: String,
    /// What the consent granted; the tokens issued from the code carry it.
    scope: Scope,
    expires_at: UnixMillis,
}

struct Access {
    user: usize,
    scope: Scope,
    expires_at: UnixMillis,
}

struct Refresh {
    user: usize,
    /// Handed on to the pair a refresh issues, so rotation never widens or narrows the grant.
    scope: Scope,
    expires_at: UnixMillis,
    /// When it was first exchanged; it stays usable for `refresh_grace` after that.
    first_used_at: Option<UnixMillis>,
}

#[derive(Default)]
struct Tables {
    codes: HashMap<String, Code>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    /// Round-robin cursor for authorizations that don't name a user.
    next_user: usize,
    issued: u64,
    /// v3 application tokens (client_credentials) → expiry.
    app: HashMap<String, UnixMillis>,
    /// Users whose connection was revoked: their tokens answer 401 / `invalid_grant` until they
    /// go through Connect again.
    revoked: std::collections::HashSet<usize>,
}

/// What a bearer token turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AccessCheck {
    Valid {
        user: usize,
        scope: Scope,
    },
    /// A v3 application token: the user comes from `sc-user-id`.
    App,
    /// A v3 application token past its expiry.
    AppExpired,
    /// A user's access token past its expiry.
    Expired,
    Unknown,
    /// Issued to a user whose connection was revoked.
    Revoked,
}

/// Outcome of presenting a refresh token.
enum RefreshUse {
    /// Accepted; `in_grace` when it had been used before (inside the grace window).
    Accepted {
        user: usize,
        scope: Scope,
        in_grace: bool,
    },
    /// Known but used longer ago than the grace window.
    Invalidated,
    /// Unknown, or past its 60-day lifetime.
    Invalid,
    /// Its user's connection was revoked.
    Revoked,
}

/// Codes and tokens. No `Debug`: its keys are credentials.
#[derive(Default)]
pub(crate) struct TokenStore {
    // std Mutex: every operation is a few map lookups with no `.await` inside, so contention is
    // brief and a tokio mutex would buy nothing.
    tables: Mutex<Tables>,
}

/// A freshly issued access/refresh pair.
struct Issued {
    access_token: String,
    refresh_token: String,
}

impl TokenStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A poisoned lock only means another request panicked mid-update; the maps stay usable.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn check_access(&self, token: &str, now: UnixMillis) -> AccessCheck {
        let t = self.lock();
        match t.access.get(token) {
            None => match t.app.get(token) {
                Some(&exp) if now < exp => AccessCheck::App,
                Some(_) => AccessCheck::AppExpired,
                None => AccessCheck::Unknown,
            },
            Some(a) if t.revoked.contains(&a.user) => AccessCheck::Revoked,
            Some(a) if now >= a.expires_at => AccessCheck::Expired,
            Some(a) => AccessCheck::Valid {
                user: a.user,
                scope: a.scope,
            },
        }
    }

    /// Every access, refresh and application token issued in the last day (the tables keep
    /// them that long), for `GET /_simulator/tokens`: a test looks for them where they must
    /// not be (a history file, a log).
    pub(crate) fn issued(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let t = self.lock();
        let mut access: Vec<String> = t.access.keys().cloned().collect();
        let mut refresh: Vec<String> = t.refresh.keys().cloned().collect();
        let mut app: Vec<String> = t.app.keys().cloned().collect();
        access.sort();
        refresh.sort();
        app.sort();
        (access, refresh, app)
    }

    /// Revokes a user's connection (as a user removing the app in their account would).
    pub(crate) fn revoke(&self, user: usize) {
        self.lock().revoked.insert(user);
    }

    fn issue_app_token(&self, lifetime_ms: i64, now: UnixMillis) -> String {
        let token = random_uuid();
        let mut t = self.lock();
        t.app.retain(|_, exp| now < *exp + FORGET_AFTER_MS);
        t.app.insert(token.clone(), now + lifetime_ms);
        token
    }

    /// A code for an approved consent, carrying its `scope`.
    pub(crate) fn issue_code(
        &self,
        user: usize,
        redirect_uri: &str,
        scope: Scope,
        lifetime_ms: i64,
        now: UnixMillis,
    ) -> String {
        let code = random_uuid();
        let mut t = self.lock();
        t.codes.insert(
            code.clone(),
            Code {
                user,
                redirect_uri: redirect_uri.to_owned(),
                scope,
                expires_at: now + lifetime_ms,
            },
        );
        code
    }

    /// Picks the user for an authorization without a `user` parameter (round-robin).
    pub(crate) fn next_user(&self, users: usize) -> usize {
        let mut t = self.lock();
        let user = t.next_user % users.max(1);
        t.next_user = user + 1;
        user
    }

    /// Consumes a code: its user and granted scope. Errors say why, without echoing the code.
    fn redeem_code(
        &self,
        code: &str,
        redirect_uri: &str,
        now: UnixMillis,
    ) -> Result<(usize, Scope), &'static str> {
        let mut t = self.lock();
        let Some(entry) = t.codes.get(code) else {
            return Err("the code is unknown or was already used.");
        };
        if now >= entry.expires_at {
            t.codes.remove(code);
            return Err("the code has expired.");
        }
        if entry.redirect_uri != redirect_uri {
            return Err("redirect_uri does not match the one used to obtain the code.");
        }
        let (user, scope) = (entry.user, entry.scope);
        t.codes.remove(code);
        // A new consent restores a revoked connection.
        t.revoked.remove(&user);
        Ok((user, scope))
    }

    fn use_refresh(&self, token: &str, grace_ms: i64, now: UnixMillis) -> RefreshUse {
        let mut t = self.lock();
        let revoked = t
            .refresh
            .get(token)
            .is_some_and(|e| t.revoked.contains(&e.user));
        if revoked {
            return RefreshUse::Revoked;
        }
        let Some(entry) = t.refresh.get_mut(token) else {
            return RefreshUse::Invalid;
        };
        if now >= entry.expires_at {
            return RefreshUse::Invalid;
        }
        match entry.first_used_at {
            None => {
                entry.first_used_at = Some(now);
                RefreshUse::Accepted {
                    user: entry.user,
                    scope: entry.scope,
                    in_grace: false,
                }
            }
            Some(first) if now - first <= grace_ms => RefreshUse::Accepted {
                user: entry.user,
                scope: entry.scope,
                in_grace: true,
            },
            Some(_) => RefreshUse::Invalidated,
        }
    }

    fn issue_pair(
        &self,
        user: usize,
        scope: Scope,
        access_ms: i64,
        refresh_ms: i64,
        grace_ms: i64,
        now: UnixMillis,
    ) -> Issued {
        let issued = Issued {
            access_token: random_uuid(),
            refresh_token: random_uuid(),
        };
        let mut t = self.lock();
        t.access.insert(
            issued.access_token.clone(),
            Access {
                user,
                scope,
                expires_at: now + access_ms,
            },
        );
        t.refresh.insert(
            issued.refresh_token.clone(),
            Refresh {
                user,
                scope,
                expires_at: now + refresh_ms,
                first_used_at: None,
            },
        );
        t.issued += 1;
        if t.issued % PRUNE_EVERY == 0 {
            let horizon = now - FORGET_AFTER_MS;
            t.codes.retain(|_, c| c.expires_at > now);
            t.access.retain(|_, a| a.expires_at > horizon);
            t.refresh.retain(|_, r| {
                r.expires_at > horizon && r.first_used_at.is_none_or(|f| f + grace_ms > horizon)
            });
        }
        issued
    }
}

/// Percent-decodes `application/x-www-form-urlencoded` text (`+` is a space). The oauth2 crate
/// form-encodes the client id and secret before base64 (RFC 6749 §2.3.1), so Basic credentials
/// are compared both raw and decoded.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub(crate) fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the request carries `Authorization: Basic base64(client_id:client_secret)` for this app.
fn client_authenticated(headers: &HeaderMap, client_id: &str, client_secret: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((id, secret)) = decoded.split_once(':') else {
        return false;
    };
    let raw = id == client_id && secret == client_secret;
    raw || (form_decode(id).as_deref() == Some(client_id)
        && form_decode(secret).as_deref() == Some(client_secret))
}

fn bad_authorize(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!("Invalid authorization request: {message}\n"),
    )
        .into_response()
}

/// `GET /oauth/authorize`: validates the Connect request and auto-approves it with a redirect
/// carrying a single-use code. The code grants `scope` (`required:` stripped; without `scope`,
/// [`super::scope::DEFAULT_GRANT`]), and the tokens exchanged for it carry that grant. `user`
/// (an id or a 1-based index) picks the account; otherwise users take turns, so successive
/// `carpulse connect` runs connect different accounts.
pub(crate) async fn authorize(
    State(sim): State<SimState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    bump(&sim.stats.authorizations);
    let Ok(Query(q)) = query else {
        return bad_authorize("the query string is malformed.");
    };
    let param = |name: &str| q.get(name).map(String::as_str).filter(|v| !v.is_empty());
    if param("response_type") != Some("code") {
        return bad_authorize("response_type must be \"code\".");
    }
    if param("client_id") != Some(sim.cfg.client_id.as_str()) {
        return bad_authorize("unknown client_id.");
    }
    let Some(redirect_uri) = param("redirect_uri") else {
        return bad_authorize("redirect_uri is required.");
    };
    if oauth2::url::Url::parse(redirect_uri).is_err() {
        return bad_authorize("redirect_uri is not an absolute URL.");
    }
    if let Some(mode) = param("mode") {
        if !["live", "simulated", "test"].contains(&mode) {
            return bad_authorize("mode must be live, simulated or test.");
        }
    }
    // Scope is optional in newer docs (the dashboard's default applies; here the simulator's
    // full read set); when given, every permission must be one Smartcar knows, `required:`
    // prefix allowed, and the approval grants exactly those.
    let scope = match Scope::from_request(q.get("scope").map(String::as_str)) {
        Ok(scope) => scope,
        Err(unknown) => {
            return bad_authorize(&format!(
                "unknown permission(s) in scope: {}.",
                unknown.join(" ")
            ))
        }
    };
    let users = sim.fleet.users.len();
    let user = match param("user") {
        Some(wanted) => match sim.fleet.user_by_id(wanted) {
            Some(u) => u,
            None => match wanted.parse::<usize>() {
                Ok(n) if (1..=users).contains(&n) => n - 1,
                _ => return bad_authorize("user must be a simulated user id or a 1-based index."),
            },
        },
        None => sim.tokens.next_user(users),
    };
    if sim.cfg.consent && param("auto_approve") != Some("true") {
        return super::consent::page(&sim, user, &q);
    }
    let location = approved_redirect(
        &sim,
        user,
        None,
        scope,
        redirect_uri,
        q.get("state").map(String::as_str),
    );
    tracing::debug!(user = %sim.fleet.users[user].id, "authorization approved");
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

/// An approved Connect consent: records the user's connections (to `chosen`, or all their
/// vehicles) with `scope`, issues a code unless `--redirect-without-code`, and returns the
/// redirect: `redirect_uri?code=…&user_id=…&state=…` (smartcar-api.md §10.2: the user id rides
/// alongside the code; without code, `?user_id=…&state=…`).
pub(crate) fn approved_redirect(
    sim: &super::Sim,
    user: usize,
    chosen: Option<&std::collections::HashSet<String>>,
    scope: Scope,
    redirect_uri: &str,
    state: Option<&str>,
) -> String {
    let now = now_ms();
    sim.connect(user, chosen, scope, now);
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = format!("{redirect_uri}{separator}");
    if !sim.cfg.redirect_without_code {
        let code = sim.tokens.issue_code(
            user,
            redirect_uri,
            scope,
            duration_ms(sim.cfg.code_lifetime),
            now,
        );
        location.push_str(&format!("code={code}&"));
    }
    location.push_str("user_id=");
    location.push_str(&query_encode(&sim.fleet.users[user].id));
    if let Some(state) = state {
        location.push_str("&state=");
        location.push_str(&query_encode(state));
    }
    location
}

/// `GET /oauth/reauthenticate?response_type=vehicle_id&client_id=…&vehicle_id=…&redirect_uri=…&state=…`:
/// Connect's re-auth flow (smartcar-api.md §0, §1.1, §1.2), the `resolution.url` of a
/// CONNECTED_SERVICES_ACCOUNT:AUTHENTICATION_FAILED error. Validated like `/oauth/authorize`
/// (`response_type` must be `vehicle_id`, the client known, the vehicle simulated, `redirect_uri`
/// an absolute URL; 400 plain text otherwise), then approved at once: 302 to
/// `redirect_uri?vehicle_id=…&state=…`. Its effect is the owner fixing their manufacturer login:
/// the vehicle's connected-services-account fault is cleared. Tokens are untouched (existing ones
/// stay valid, none are issued) and the consent page is never shown. Counted as
/// `reauthentications`.
pub(crate) async fn reauthenticate(
    State(sim): State<SimState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let bad = |message: &str| {
        (
            StatusCode::BAD_REQUEST,
            format!("Invalid re-authentication request: {message}\n"),
        )
            .into_response()
    };
    let Ok(Query(q)) = query else {
        return bad("the query string is malformed.");
    };
    let param = |name: &str| q.get(name).map(String::as_str).filter(|v| !v.is_empty());
    if param("response_type") != Some("vehicle_id") {
        return bad("response_type must be \"vehicle_id\".");
    }
    if param("client_id") != Some(sim.cfg.client_id.as_str()) {
        return bad("unknown client_id.");
    }
    let Some((_, vehicle)) = param("vehicle_id").and_then(|id| sim.fleet.vehicle(id)) else {
        return bad("vehicle_id must be a simulated vehicle id.");
    };
    let Some(redirect_uri) = param("redirect_uri") else {
        return bad("redirect_uri is required.");
    };
    if oauth2::url::Url::parse(redirect_uri).is_err() {
        return bad("redirect_uri is not an absolute URL.");
    }
    let cleared = sim.faults.clear_account_fault(&vehicle.id);
    bump(&sim.stats.reauthentications);
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = format!(
        "{redirect_uri}{separator}vehicle_id={}",
        query_encode(&vehicle.id)
    );
    if let Some(state) = q.get("state") {
        location.push_str("&state=");
        location.push_str(&query_encode(state));
    }
    tracing::debug!(vehicle = %vehicle.id, cleared, "re-authentication approved");
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

/// `POST /oauth2/token`: the v3 application token (smartcar-api.md §1.7, §10.1):
/// `grant_type=client_credentials` with the API credentials (`api_client_id`/`api_client_secret`,
/// not Connect's) in the form body; a Basic header alone is not read. 400 `invalid_request` when
/// something is missing or malformed, 401 `invalid_client` for wrong credentials. The token
/// lives `app_token_lifetime` (Smartcar: one hour), has no refresh token, and acts for the user
/// each request names in `sc-user-id`. Counted in `app_tokens_issued`.
pub(crate) async fn app_token(
    State(sim): State<SimState>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        bump(&sim.stats.token_errors);
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded.",
        );
    };
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let (Some("client_credentials"), Some(id), Some(secret)) = (
        field("grant_type"),
        field("client_id"),
        field("client_secret"),
    ) else {
        bump(&sim.stats.token_errors);
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "grant_type=client_credentials, client_id and client_secret are required in the form \
             body (a Basic header is not read).",
        );
    };
    if id != sim.cfg.api_client_id || secret != sim.cfg.api_client_secret {
        bump(&sim.stats.token_errors);
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client credentials.",
        );
    }
    let token = sim
        .tokens
        .issue_app_token(duration_ms(sim.cfg.app_token_lifetime), now_ms());
    bump(&sim.stats.app_tokens_issued);
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": sim.cfg.app_token_lifetime.as_secs(),
        })),
    )
        .into_response()
}

/// `POST /oauth/token`: code exchange and refresh (§1.3–1.5).
pub(crate) async fn token(
    State(sim): State<SimState>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let response = token_inner(&sim, &headers, form);
    if !response.status().is_success() {
        bump(&sim.stats.token_errors);
    }
    response
}

fn token_inner(
    sim: &SimState,
    headers: &HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    if !client_authenticated(headers, &sim.cfg.client_id, &sim.cfg.client_secret) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client credentials: send Authorization: Basic base64(client_id:client_secret).",
        );
    }
    let Ok(Form(form)) = form else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded.",
        );
    };
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let cfg = &sim.cfg;
    let now = now_ms();
    let access_ms = duration_ms(cfg.access_token_lifetime);
    let refresh_ms = duration_ms(cfg.refresh_token_lifetime);
    let grace_ms = duration_ms(cfg.refresh_grace);
    let (user, scope) = match field("grant_type") {
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing grant_type.",
            )
        }
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri)) = (field("code"), field("redirect_uri")) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Missing code or redirect_uri.",
                );
            };
            match sim.tokens.redeem_code(code, redirect_uri, now) {
                Ok(granted) => {
                    bump(&sim.stats.code_exchanges);
                    granted
                }
                Err(why) => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        format!("Invalid code: {why}"),
                    )
                }
            }
        }
        Some("refresh_token") => {
            let Some(refresh_token) = field("refresh_token") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Missing refresh_token.",
                );
            };
            match sim.tokens.use_refresh(refresh_token, grace_ms, now) {
                RefreshUse::Accepted {
                    user,
                    scope,
                    in_grace,
                } => {
                    if in_grace {
                        bump(&sim.stats.grace_refresh_token_uses);
                    }
                    sim.stats.count_refresh(&sim.fleet.users[user].id);
                    (user, scope)
                }
                outcome @ (RefreshUse::Invalidated | RefreshUse::Invalid | RefreshUse::Revoked) => {
                    match outcome {
                        RefreshUse::Invalidated => bump(&sim.stats.invalidated_refresh_token_uses),
                        RefreshUse::Revoked => bump(&sim.stats.revoked_token_uses),
                        _ => {}
                    }
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "Invalid or expired refresh token.",
                    );
                }
            }
        }
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token.",
            )
        }
    };
    let issued = sim
        .tokens
        .issue_pair(user, scope, access_ms, refresh_ms, grace_ms, now);
    tracing::debug!(user = %sim.fleet.users[user].id, "token pair issued");
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": cfg.access_token_lifetime.as_secs(),
            "refresh_token": issued.refresh_token,
        })),
    )
        .into_response()
}

pub(crate) fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}
