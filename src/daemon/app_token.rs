//! The fleet's one v3 application token (API Authentication, smartcar-api.md §10.1): asked of
//! the IAM endpoint with the API credentials, kept in memory only (there is no refresh token,
//! so a crash loses nothing), renewed at half its life by one background task, and renewed at
//! once, one request at a time, when a vehicle call answers 401.
//!
//! A refusal (`invalid_client`) is carpulse's own misconfiguration: it is logged as such and
//! counted, and blames no owner (no connection is marked for re-authorization).

use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::daemon::metrics::Metrics;
use crate::domain::{now_ms, Secret};
use crate::smartcar::error::AuthError;
use crate::smartcar::iam::{AppCredentials, AppToken};
use crate::smartcar::SmartcarClient;

/// Within this of expiry a token is not handed out (a request may take a while to arrive).
const USE_SAFETY_MS: i64 = 15_000;
/// Waits between failed renewals in the background: 5 s doubling to 5 min.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// After a refusal, callers get the refusal again for this long instead of a new request
/// each (a wrong secret must not hammer the IAM endpoint from every poll).
const REFUSAL_HOLD: Duration = Duration::from_secs(60);

pub struct AppAuth {
    client: SmartcarClient,
    creds: AppCredentials,
    metrics: Metrics,
    /// The current token (a std mutex: held to copy it out, never across an await).
    current: Mutex<Option<AppToken>>,
    /// The last refusal and when it came, so callers do not all ask again.
    refused: Mutex<Option<(AuthError, std::time::Instant)>>,
    /// Held across the IAM request: one request at a time (the single flight).
    flight: tokio::sync::Mutex<()>,
}

impl AppAuth {
    pub fn new(client: SmartcarClient, creds: AppCredentials, metrics: Metrics) -> Self {
        AppAuth {
            client,
            creds,
            metrics,
            current: Mutex::new(None),
            refused: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
        }
    }

    fn usable(&self) -> Option<Secret> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        cur.as_ref()
            .filter(|t| {
                // A quarter of a short token's life at most, so a 20 s test token is not
                // renewed by every poll.
                let safety = USE_SAFETY_MS.min((t.expires_at - t.issued_at) / 4);
                now_ms() < t.expires_at - safety
            })
            .map(|t| t.token.clone())
    }

    /// A token valid now: the current one, or a new one if there is none or it is about to
    /// expire.
    pub async fn token(&self) -> Result<Secret, AuthError> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let _flight = self.flight.lock().await;
        if let Some(t) = self.usable() {
            return Ok(t); // another caller renewed it while we waited
        }
        self.renew_locked().await
    }

    /// The current token, usable or not, and when it is due for renewal.
    fn current(&self) -> Option<(Secret, crate::domain::UnixMillis)> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| (t.token.clone(), t.renew_at()))
    }

    /// After a 401 with `rejected`: renews once, unless another caller already replaced it.
    pub async fn renew_after_401(&self, rejected: &Secret) -> Result<Secret, AuthError> {
        let _flight = self.flight.lock().await;
        let current = self.current().map(|(t, _)| t);
        match current {
            Some(t) if &t != rejected && self.usable().is_some() => Ok(t),
            _ => {
                info!("the application token was refused (401); asking for a new one");
                self.renew_locked().await
            }
        }
    }

    async fn renew_locked(&self) -> Result<Secret, AuthError> {
        if let Some((e, at)) = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            if at.elapsed() < REFUSAL_HOLD {
                return Err(e);
            }
        }
        match self.client.app_token(&self.creds).await {
            Ok(t) => {
                self.metrics
                    .app_token_requests
                    .with_label_values(&["ok"])
                    .inc();
                self.metrics
                    .app_token_expiry
                    .set(t.expires_at as f64 / 1000.0);
                info!(
                    valid_s = (t.expires_at - t.issued_at) / 1000,
                    "got a v3 application token"
                );
                let token = t.token.clone();
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(token)
            }
            Err(e @ AuthError::Rejected { .. }) => {
                self.metrics
                    .app_token_requests
                    .with_label_values(&["refused"])
                    .inc();
                error!(
                    error = %e,
                    iam_url = %self.creds.iam_url,
                    "Smartcar refused carpulse's API credentials: check smartcar.api_client_id and \
                     the API client secret (Dashboard → API Credentials). This is carpulse's \
                     configuration, not any owner's connection"
                );
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((e.clone(), std::time::Instant::now()));
                Err(e)
            }
            Err(e) => {
                self.metrics
                    .app_token_requests
                    .with_label_values(&["error"])
                    .inc();
                warn!(error = %e, "the IAM token endpoint failed; retrying");
                Err(e)
            }
        }
    }

    /// Keeps a token ready: renews at half its life, retries failures with a growing wait.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let wait = {
                let due = self.current().map(|(_, at)| at);
                match due {
                    Some(at) if failures == 0 => {
                        Duration::from_millis((at - now_ms()).max(0) as u64)
                    }
                    None if failures == 0 => Duration::ZERO,
                    _ => (RETRY_MIN * 2u32.saturating_pow(failures.min(10) - 1)).min(RETRY_MAX),
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let _flight = self.flight.lock().await;
            // A caller may have renewed it meanwhile.
            let due = self.current().map(|(_, at)| at);
            if failures == 0 && due.is_some_and(|at| now_ms() < at) {
                continue;
            }
            match self.renew_locked().await {
                Ok(_) => failures = 0,
                Err(_) => failures = failures.saturating_add(1),
            }
        }
    }
}
