//! v3 API Authentication (smartcar-api.md §1.7, §10.1): the application token from
//! `POST {iam_url}` with `grant_type=client_credentials` and the API credentials in the form
//! body (not a Basic header). One token serves every user of the app for an hour; there is no
//! refresh token, so nothing here is ever stored: [`crate::daemon::app_token`] keeps it in memory.

use std::time::Duration;

use serde_json::Value;

use super::error::{parse_error_body, AuthError};
use super::SmartcarClient;
use crate::domain::{now_ms, Secret, UnixMillis};

/// `expires_in` when the IAM endpoint omits it (documented: 3600).
pub const DEFAULT_APP_EXPIRES_IN_SECS: u64 = 3600;

/// The API credentials of `[smartcar] api_client_id` / `api_client_secret` / `iam_url`.
#[derive(Clone, Debug)]
pub struct AppCredentials {
    pub client_id: String,
    pub client_secret: Secret,
    pub iam_url: String,
}

/// One application token. `Debug` is safe: the token is a [`Secret`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppToken {
    pub token: Secret,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
}

impl AppToken {
    /// When to ask for the next one: at half its life (the brief: "never later than half its
    /// life"), so a failing IAM endpoint leaves half an hour of retries before polls stop.
    pub fn renew_at(&self) -> UnixMillis {
        self.issued_at + (self.expires_at - self.issued_at).max(0) / 2
    }
}

impl SmartcarClient {
    /// Asks the IAM endpoint for an application token. A refusal (`invalid_client`,
    /// `invalid_request`) is [`AuthError::Rejected`]; network trouble, 5xx and 429 are
    /// [`AuthError::Transient`]. Neither ever carries the secret or the token.
    pub async fn app_token(&self, creds: &AppCredentials) -> Result<AppToken, AuthError> {
        let issued_at = now_ms();
        // Its answers' text is scrubbed of this secret in every form it travels in.
        super::scrub::register_client(&creds.client_id, creds.client_secret.expose());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", creds.client_id.as_str()),
            ("client_secret", creds.client_secret.expose()),
        ];
        let resp = self
            .http()
            .post(creds.iam_url.trim())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| AuthError::Transient {
                message: format!("POST smartcar.iam_url: {}", scrub(&e.to_string(), creds)),
            })?;
        let status = resp.status().as_u16();
        // Read with a bound (64 KB) and the request's deadline: never a huge answer in memory.
        let body = super::read_limited(resp, super::TOKEN_BODY_LIMIT, deadline)
            .await
            .map_err(|e| AuthError::Transient {
                message: format!("reading the IAM answer: {}", scrub(&e.to_string(), creds)),
            })?;
        if (200..300).contains(&status) {
            return parse_app_token(&body, issued_at).map_err(|m| AuthError::Transient {
                message: format!("the IAM endpoint answered {status} with {m}"),
            });
        }
        let parsed = parse_error_body(&body);
        let description = parsed.description.map(|d| scrub(&d, creds));
        if status == 429 || status >= 500 {
            return Err(AuthError::Transient {
                message: format!(
                    "the IAM endpoint answered {status}{}",
                    description.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            });
        }
        Err(AuthError::Rejected {
            status: Some(status),
            error: parsed
                .error_type
                .map(|e| super::scrub::scrub_field(&e, &[creds.client_secret.expose()]))
                .unwrap_or_else(|| format!("http_{status}")),
            description,
        })
    }
}

/// `{"access_token","token_type","expires_in"}`; `expires_in` may be a number or a string.
pub fn parse_app_token(body: &[u8], issued_at: UnixMillis) -> Result<AppToken, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "a body that is not JSON".to_owned())?;
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
        .ok_or("no access_token")?;
    let expires_in = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .unwrap_or(DEFAULT_APP_EXPIRES_IN_SECS)
    // A day at most: a server's odd answer must not keep a token past its real life.
    .min(86_400);
    Ok(AppToken {
        token: Secret::new(token.trim()),
        issued_at,
        expires_at: issued_at + expires_in as i64 * 1000,
    })
}

fn scrub(text: &str, creds: &AppCredentials) -> String {
    super::scrub::scrub(text, &[creds.client_secret.expose()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_tokens_parse_and_renew_at_half_life() {
        let t = parse_app_token(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600}"#,
            1_000,
        )
        .unwrap();
        assert_eq!(t.token.expose(), "abc");
        assert_eq!(t.expires_at, 1_000 + 3_600_000);
        assert_eq!(t.renew_at(), 1_000 + 1_800_000);
        let t = parse_app_token(br#"{"access_token":"abc","expires_in":"20"}"#, 0).unwrap();
        assert_eq!(t.expires_at, 20_000);
        let t = parse_app_token(br#"{"access_token":"abc"}"#, 0).unwrap();
        assert_eq!(t.expires_at, 3_600_000);
        assert!(parse_app_token(br#"{"token_type":"Bearer"}"#, 0).is_err());
        assert!(parse_app_token(b"<html>", 0).is_err());
    }

    #[test]
    fn the_secret_is_scrubbed() {
        let creds = AppCredentials {
            client_id: "id".into(),
            client_secret: Secret::new("s3cr3t"),
            iam_url: "http://127.0.0.1:9/oauth2/token".into(),
        };
        assert_eq!(scrub("bad s3cr3t here", &creds), "bad [redacted] here");
    }
}
