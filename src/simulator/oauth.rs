//! Connect and the token endpoint (smartcar-api.md §1): authorize auto-approves and redirects
//! with a single-use code; the token endpoint exchanges codes and rotates refresh tokens with
//! a grace window, and every Vehicle API request is checked against the tokens issued here.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use base64::Engine;

use super::errors;
use super::fleet::uuid;
use super::state::{Access, Code, Refresh, Sim, Stats};
use crate::domain::now_ms;

/// Authorization codes live 10 minutes.
const CODE_LIFETIME_MS: i64 = 600_000;

pub async fn authorize(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    Stats::bump(&sim.stats.requests);
    let bad = |msg: &str| {
        (
            StatusCode::BAD_REQUEST,
            format!("carpulse simulator: {msg}\n"),
        )
            .into_response()
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return bad("response_type must be `code`");
    }
    if q.get("client_id") != Some(&sim.cfg.client_id) {
        return bad("unknown client_id");
    }
    let Some(redirect_uri) = q.get("redirect_uri").filter(|r| !r.is_empty()) else {
        return bad("redirect_uri is required");
    };
    let Ok(mut target) = oauth2::url::Url::parse(redirect_uri) else {
        return bad("redirect_uri is not a URL");
    };
    if sim.fleet.users.is_empty() {
        return bad("the simulator has no users");
    }
    let Ok(mut tokens) = sim.tokens.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "state poisoned").into_response();
    };
    // `user` names a user by id or 1-based index; otherwise users take turns.
    let user = match q.get("user") {
        Some(u) => match sim.fleet.users.iter().position(|x| &x.id == u) {
            Some(i) => i,
            None => match u.parse::<usize>() {
                Ok(n) if (1..=sim.fleet.users.len()).contains(&n) => n - 1,
                _ => return bad("unknown user"),
            },
        },
        None => {
            let u = tokens.next_user % sim.fleet.users.len();
            tokens.next_user += 1;
            u
        }
    };
    let code = uuid(&mut rand::rng());
    tokens.codes.insert(
        code.clone(),
        Code {
            user,
            redirect_uri: redirect_uri.clone(),
            expires_at: now_ms() + CODE_LIFETIME_MS,
            used: false,
        },
    );
    drop(tokens);
    {
        let mut pairs = target.query_pairs_mut();
        pairs.append_pair("code", &code);
        if let Some(state) = q.get("state") {
            pairs.append_pair("state", state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

fn client_ok(sim: &Sim, headers: &HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(raw) else {
        return false;
    };
    let Some((id, secret)) = text.split_once(':') else {
        return false;
    };
    // RFC 6749 clients form-encode id and secret before Basic; Smartcar's SDKs don't.
    let decode = |s: &str| {
        oauth2::url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    (id == sim.cfg.client_id || decode(id) == sim.cfg.client_id)
        && (secret == sim.cfg.client_secret || decode(secret) == sim.cfg.client_secret)
}

fn issue(sim: &Sim, tokens: &mut super::state::Tokens, user: usize) -> serde_json::Value {
    let now = now_ms();
    let access = uuid(&mut rand::rng());
    let refresh = uuid(&mut rand::rng());
    let lifetime = sim.cfg.access_token_lifetime.as_millis() as i64;
    tokens.access.insert(
        access.clone(),
        Access {
            user,
            expires_at: now + lifetime,
        },
    );
    tokens.refresh.insert(
        refresh.clone(),
        Refresh {
            user,
            expires_at: now + sim.cfg.refresh_token_lifetime.as_millis() as i64,
            used_at: None,
        },
    );
    serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": sim.cfg.access_token_lifetime.as_secs(),
        "refresh_token": refresh,
    })
}

pub async fn token(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    Stats::bump(&sim.stats.requests);
    if !client_ok(&sim, &headers) {
        return errors::oauth(401, "invalid_client", "Invalid client credentials.");
    }
    let Ok(mut tokens) = sim.tokens.lock() else {
        return errors::oauth(500, "server_error", "state poisoned");
    };
    let now = now_ms();
    match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let (Some(code), Some(redirect)) = (f.get("code"), f.get("redirect_uri")) else {
                return errors::oauth(
                    400,
                    "invalid_request",
                    "code and redirect_uri are required.",
                );
            };
            let user = match tokens.codes.get_mut(code) {
                Some(c) if !c.used && c.expires_at > now && &c.redirect_uri == redirect => {
                    c.used = true;
                    c.user
                }
                Some(c) if &c.redirect_uri != redirect => {
                    return errors::oauth(
                        400,
                        "invalid_request",
                        "Invalid code: redirect_uri does not match.",
                    )
                }
                _ => {
                    return errors::oauth(400, "invalid_request", &format!("Invalid code: {code}."))
                }
            };
            Stats::bump(&sim.stats.code_exchanges);
            Json(issue(&sim, &mut tokens, user)).into_response()
        }
        Some("refresh_token") => {
            let Some(rt) = f.get("refresh_token") else {
                return errors::oauth(400, "invalid_request", "refresh_token is required.");
            };
            let grace = sim.cfg.refresh_grace.as_millis() as i64;
            let user = match tokens.refresh.get_mut(rt) {
                Some(r) if r.expires_at <= now => None,
                Some(r) => match r.used_at {
                    None => {
                        r.used_at = Some(now);
                        Some(r.user)
                    }
                    Some(used) if now - used <= grace => {
                        Stats::bump(&sim.stats.grace_refresh_token_uses);
                        Some(r.user)
                    }
                    Some(_) => {
                        Stats::bump(&sim.stats.invalidated_refresh_token_uses);
                        None
                    }
                },
                None => None,
            };
            let Some(user) = user else {
                return errors::oauth(400, "invalid_grant", "Invalid or expired refresh token.");
            };
            Stats::bump(&sim.stats.refreshes);
            if let Ok(mut by_user) = sim.stats.refreshes_by_user.lock() {
                *by_user.entry(sim.fleet.users[user].id.clone()).or_default() += 1;
            }
            Json(issue(&sim, &mut tokens, user)).into_response()
        }
        Some(other) => errors::oauth(
            400,
            "unsupported_grant_type",
            &format!("{other} is not supported."),
        ),
        None => errors::oauth(400, "invalid_request", "grant_type is required."),
    }
}

/// Which envelope an authentication failure uses.
#[derive(Clone, Copy)]
pub enum Api {
    V2,
    V3,
}

fn auth_error(api: Api) -> Response {
    let msg = "The authorization header is missing or malformed, or it contains invalid or expired authentication credentials (e.g. access token).";
    match api {
        Api::V2 => errors::v2(401, "AUTHENTICATION", None, msg),
        Api::V3 => errors::v3(401, "AUTHENTICATION", None, "Unauthorized", msg),
    }
}

/// An error answer, boxed: a `Response` is large and this travels through every `Result`.
pub struct Rejection(pub Box<Response>);

impl From<Response> for Rejection {
    fn from(r: Response) -> Self {
        Rejection(Box::new(r))
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        *self.0
    }
}

/// The user whose valid access token the request carries; counts what was wrong otherwise.
pub fn authenticate(sim: &Sim, headers: &HeaderMap, api: Api) -> Result<usize, Rejection> {
    Stats::bump(&sim.stats.requests);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        Stats::bump(&sim.stats.unknown_token_requests);
        return Err(auth_error(api).into());
    };
    let Ok(tokens) = sim.tokens.lock() else {
        return Err(errors::v2(500, "SERVER", Some("INTERNAL"), "state poisoned").into());
    };
    let user = match tokens.access.get(token) {
        None => {
            Stats::bump(&sim.stats.unknown_token_requests);
            return Err(auth_error(api).into());
        }
        Some(a) if a.expires_at <= now_ms() => {
            Stats::bump(&sim.stats.expired_token_requests);
            return Err(auth_error(api).into());
        }
        Some(a) => a.user,
    };
    drop(tokens);
    // v3's app-token model names the user in `sc-user-id`; when sent it must be this one.
    if let Some(named) = headers.get("sc-user-id").and_then(|v| v.to_str().ok()) {
        if named != sim.fleet.users[user].id {
            return Err(auth_error(api).into());
        }
    }
    Ok(user)
}
