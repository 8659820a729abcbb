//! Keeps every active connection's access token fresh, independently of polling.
//!
//! Smartcar rotates the refresh token on every refresh and invalidates the used one shortly
//! after, so a refresh that is lost is a connection lost: the owner must reconnect. Hence the
//! rules (DESIGN §2): refresh ahead of expiry, one refresh at a time per connection
//! (single-flight), and the rotated pair committed to SQLite (its own `synchronous=FULL`
//! transaction) before anyone uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::daemon::metrics::Metrics;
use crate::domain::{
    now_ms, ConnectionId, ConnectionStatus, Secret, TokenPair, UnixMillis,
    REFRESH_TOKEN_LIFETIME_MS,
};
use crate::smartcar::error::AuthError;
use crate::smartcar::SmartcarClient;
use crate::store::queries::{self, ConnectionRecord};
use crate::store::{fallback, Store};

/// Within this of expiry a token is refreshed before use even if the background task has not
/// got to it (a suspended laptop, a clock jump).
const USE_SAFETY_MS: i64 = 15_000;
/// Attempts with the same refresh token after a network or 5xx failure, inside Smartcar's grace
/// window for a used refresh token (1 min by the most cautious reading of the docs).
const PROMPT_RETRIES: u32 = 3;
const PROMPT_RETRY_DELAY: Duration = Duration::from_secs(5);
/// The least time between two background refreshes of one connection, whatever its token's
/// lifetime says (an odd `expires_in` of 0 or less is already read as 7200 s, see
/// `smartcar::auth::bounded_expires_in`).
const MIN_REFRESH_INTERVAL_MS: i64 = 2_000;
/// `400 invalid_request` answers in a row before the owner is blamed (`needs_reauth`): one
/// can be a Smartcar hiccup or a proxy's, and a reconnect costs every owner a browser trip.
const INVALID_REQUEST_TRIES: u32 = 3;
/// The wait after the first such answer; it doubles with each further one.
const INVALID_REQUEST_BACKOFF: Duration = Duration::from_secs(5);
/// Backoff after the prompt retries failed.
const BACKOFF_MIN: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Why no token can be had for a connection.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("connection {0} needs re-authorization: run `carpulse reauth VEHICLE` (or `carpulse connect`) for that account")]
    NeedsReauth(ConnectionId),
    #[error("connection {0} is not loaded")]
    Unknown(ConnectionId),
    #[error("connection {0}: the token endpoint failed recently; backing off before trying again")]
    BackingOff(ConnectionId),
    #[error("connection {0} is revoked: Smartcar no longer lists it (the owner disconnected carpulse); run `carpulse connect` as that account to connect again")]
    Revoked(ConnectionId),
    #[error("connection {0} has no Smartcar user id, which API Authentication needs as sc-user-id: run `carpulse connect` as that account again")]
    NoUserId(ConnectionId),
    #[error("the v3 application token could not be had: {0}")]
    AppAuth(AuthError),
    #[error("connection {0}: the daemon is stopping; no new token refresh is started")]
    Stopping(ConnectionId),
    #[error("refreshing the token of connection {id} failed: {source}")]
    Refresh {
        id: ConnectionId,
        #[source]
        source: AuthError,
    },
}

/// When a pair should be refreshed: `margin` before expiry, but never later than half the
/// token's lifetime (a 20 s test token is refreshed after 10 s, not 10 min before it was
/// issued), minus up to a tenth of that lead as jitter (`jitter` in 0..1) so that many
/// connections issued together don't refresh together.
pub fn refresh_due_at(tokens: &TokenPair, margin: Duration, jitter: f64) -> UnixMillis {
    let issued_at = tokens.refresh_expires_at - REFRESH_TOKEN_LIFETIME_MS;
    let lifetime = (tokens.access_expires_at - issued_at).max(0);
    let lead = (margin.as_millis() as i64).min(lifetime / 2);
    let jitter_ms = (lead as f64 * 0.1 * jitter.clamp(0.0, 1.0)) as i64;
    // At least MIN_REFRESH_INTERVAL_MS after issue, so a tiny lifetime can't spin.
    (tokens.access_expires_at - lead - jitter_ms).max(issued_at + MIN_REFRESH_INTERVAL_MS)
}

struct Slot {
    id: ConnectionId,
    user_id: String,
    /// What `access()` needs without waiting on `state` (which a refresh holds for seconds):
    /// the current access token, its expiry and the status. Written under `state`'s lock.
    view: Mutex<View>,
    /// A background refresher runs for this slot (so a reload does not start a second one).
    refresher: std::sync::atomic::AtomicBool,
    /// A tokio mutex because it is held across the refresh request: that is the single flight.
    /// In an `Arc` so that the refresh task itself can own the lock ([`OwnedMutexGuard`]): a
    /// caller dropped at shutdown then leaves the lock with the request in flight, and nobody
    /// can start a second refresh with the same refresh token until its answer is applied.
    state: Arc<tokio::sync::Mutex<SlotState>>,
}

#[derive(Clone)]
struct View {
    token: Secret,
    expires_at: UnixMillis,
    status: ConnectionStatus,
    /// A rotated pair the store refused is only in memory (`/healthz` says so).
    unsaved: bool,
}

impl Slot {
    fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn publish(&self, st: &SlotState) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = View {
            token: st.tokens.access_token.clone(),
            expires_at: st.tokens.access_expires_at,
            status: st.status,
            unsaved: st.unsaved_from.is_some(),
        };
    }

    async fn lock(&self) -> OwnedMutexGuard<SlotState> {
        self.state.clone().lock_owned().await
    }
}

struct SlotState {
    tokens: TokenPair,
    status: ConnectionStatus,
    /// Consecutive failed refresh rounds, for the backoff.
    failures: u32,
    /// When the background task tries again after a failure.
    retry_at: Option<UnixMillis>,
    /// Set while `tokens` is a rotated pair the store refused: the refresh token the store
    /// still holds, which the save must replace. The background task retries the save.
    unsaved_from: Option<Secret>,
    /// `invalid_request` refusals in a row (see [`INVALID_REQUEST_TRIES`]).
    invalid_requests: u32,
}

/// What a poll needs to make a request for a connection. `Debug` is safe: the token is a `Secret`.
#[derive(Clone, Debug)]
pub struct Access {
    pub token: Secret,
    /// Sent as `sc-user-id`: set with API Authentication only. A per-user token names its
    /// user itself, and the SDKs send no `sc-user-id` with one (smartcar-api.md §3.2).
    pub user_id: Option<String>,
}

pub struct TokenManager {
    store: Store,
    client: SmartcarClient,
    metrics: Metrics,
    /// `schedule.refresh_margin`; SIGHUP may change it (a std mutex, never held across an await).
    margin: Mutex<Duration>,
    /// A std mutex: held only to look up or insert, never across an await.
    slots: Mutex<HashMap<ConnectionId, Arc<Slot>>>,
    /// Where [`TokenManager::run`] spawns refreshers, so connections added later get one.
    runner: Mutex<Option<(TaskTracker, CancellationToken)>>,
    /// Refresh requests in flight (each with the save of its answer): shutdown waits for them,
    /// since one that is dropped after Smartcar rotated the pair loses the connection.
    inflight: TaskTracker,
    /// With v3 API Authentication: the fleet's application token. Then every request uses it
    /// with the connection's user id, and no per-user pair is refreshed.
    app: Option<Arc<crate::daemon::app_token::AppAuth>>,
    /// Set once shutdown began: no refresh starts after it (one in flight still finishes and
    /// is saved), so the last save at shutdown sees every pair there will be. Shared with the
    /// refresh tasks, whose save stops retrying once it is set (the last save and the
    /// fallback file take over, within systemd's stop timeout).
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Rotated pairs that neither the store nor the fallback file took at shutdown: the
    /// daemon exits non-zero (see [`TokenManager::lost_pairs`]).
    lost: std::sync::atomic::AtomicUsize,
}

/// How long shutdown waits for refreshes in flight (a token request is bounded at 20 s).
const INFLIGHT_GRACE: Duration = Duration::from_secs(25);

impl TokenManager {
    pub fn new(
        store: Store,
        client: SmartcarClient,
        metrics: Metrics,
        margin: Duration,
    ) -> Arc<Self> {
        Self::build(store, client, metrics, margin, None)
    }

    /// A manager for v3 API Authentication: connections supply user ids, `app` the token.
    pub fn with_app_auth(
        store: Store,
        client: SmartcarClient,
        metrics: Metrics,
        margin: Duration,
        app: Arc<crate::daemon::app_token::AppAuth>,
    ) -> Arc<Self> {
        Self::build(store, client, metrics, margin, Some(app))
    }

    fn build(
        store: Store,
        client: SmartcarClient,
        metrics: Metrics,
        margin: Duration,
        app: Option<Arc<crate::daemon::app_token::AppAuth>>,
    ) -> Arc<Self> {
        Arc::new(TokenManager {
            store,
            client,
            metrics,
            margin: Mutex::new(margin),
            slots: Mutex::new(HashMap::new()),
            runner: Mutex::new(None),
            inflight: TaskTracker::new(),
            app,
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            lost: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Whether requests use the application token (API Authentication).
    pub fn app_auth(&self) -> bool {
        self.app.is_some()
    }

    /// The application token with the connection's user id (API Authentication).
    async fn app_access(
        &self,
        app: &crate::daemon::app_token::AppAuth,
        slot: &Slot,
        rejected: Option<&Secret>,
    ) -> Result<Access, TokenError> {
        let status = slot.view().status;
        if status == ConnectionStatus::Revoked {
            return Err(TokenError::Revoked(slot.id));
        }
        if !crate::domain::is_real_user_id(&slot.user_id) {
            return Err(TokenError::NoUserId(slot.id));
        }
        let token = match rejected {
            None => app.token().await,
            Some(r) => app.renew_after_401(r).await,
        }
        .map_err(TokenError::AppAuth)?;
        Ok(Access {
            token,
            user_id: Some(slot.user_id.clone()),
        })
    }

    /// Marks a connection revoked or active again (the `/v3/connections` check); the caller
    /// stores it.
    pub async fn set_status(&self, id: ConnectionId, status: ConnectionStatus) {
        let Ok(slot) = self.slot(id) else { return };
        let mut st = slot.lock().await;
        st.status = status;
        slot.publish(&st);
        drop(st);
        self.update_connection_gauge().await;
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Arc<Slot>>> {
        // Poisoning would need a panic while inserting into a HashMap; the map is still valid.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers connections loaded from the store (all statuses, so `needs_reauth` ones answer
    /// with a clear error instead of "unknown").
    pub fn load(&self, records: Vec<ConnectionRecord>) {
        let mut slots = self.slots();
        for r in records {
            slots.insert(
                r.id,
                Arc::new(Slot {
                    id: r.id,
                    user_id: r.user_id,
                    view: Mutex::new(View {
                        token: r.tokens.access_token.clone(),
                        expires_at: r.tokens.access_expires_at,
                        status: r.status,
                        unsaved: false,
                    }),
                    refresher: std::sync::atomic::AtomicBool::new(false),
                    state: Arc::new(tokio::sync::Mutex::new(SlotState {
                        unsaved_from: None,
                        tokens: r.tokens,
                        status: r.status,
                        failures: 0,
                        retry_at: None,
                        invalid_requests: 0,
                    })),
                }),
            );
        }
    }

    /// Brings in what the store learned while running (`carpulse connect` added an account or
    /// re-authorized one): new connections are added, and a stored pair newer than the one in
    /// memory (a reconnect) is adopted with its status. Returns the connections that were added
    /// or consented again (their vehicles' disabled endpoints and pauses may be lifted); their
    /// refreshers are started when the manager runs.
    pub async fn merge(self: &Arc<Self>, records: Vec<ConnectionRecord>) -> Vec<ConnectionId> {
        let mut changed = Vec::new();
        for r in records {
            let existing = self.slots().get(&r.id).cloned();
            match existing {
                None => {
                    let id = r.id;
                    self.load(vec![r]);
                    changed.push(id);
                }
                Some(slot) => {
                    let mut st = slot.lock().await;
                    let newer = r.tokens.refresh_expires_at > st.tokens.refresh_expires_at;
                    // A revocation the connections check stored, or its end (a reconnect, or
                    // the connection listed again): no new pair, only the status changes.
                    let revocation = r.status != st.status
                        && (r.status == ConnectionStatus::Revoked
                            || st.status == ConnectionStatus::Revoked);
                    if revocation && !newer {
                        st.status = r.status;
                        slot.publish(&st);
                        if r.status == ConnectionStatus::Active {
                            changed.push(r.id);
                        }
                        continue;
                    }
                    if r.status == ConnectionStatus::Active && newer {
                        st.tokens = r.tokens;
                        // The reconnect's grant is stored; an unsaved rotation of the old one
                        // is moot.
                        st.unsaved_from = None;
                        st.status = ConnectionStatus::Active;
                        st.failures = 0;
                        st.invalid_requests = 0;
                        st.retry_at = None;
                        slot.publish(&st);
                        changed.push(r.id);
                    }
                }
            }
        }
        for id in &changed {
            self.spawn_refresher(*id);
        }
        if !changed.is_empty() {
            self.update_connection_gauge().await;
        }
        changed
    }

    fn spawn_refresher(self: &Arc<Self>, id: ConnectionId) {
        let runner = self
            .runner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some((tracker, stop)), Ok(slot)) = (runner, self.slot(id)) else {
            return;
        };
        if slot
            .refresher
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return; // one is already keeping this connection fresh
        }
        let me = self.clone();
        tracker.spawn(async move {
            me.keep_fresh(slot.clone(), stop).await;
            slot.refresher
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    pub fn connection_ids(&self) -> Vec<ConnectionId> {
        let mut ids: Vec<_> = self.slots().keys().copied().collect();
        ids.sort();
        ids
    }

    fn slot(&self, id: ConnectionId) -> Result<Arc<Slot>, TokenError> {
        self.slots()
            .get(&id)
            .cloned()
            .ok_or(TokenError::Unknown(id))
    }

    /// A token that is valid now, refreshing first if it is about to expire. The common case
    /// reads the published view and never waits behind a refresh in progress.
    pub async fn access(&self, id: ConnectionId) -> Result<Access, TokenError> {
        let slot = self.slot(id)?;
        if let Some(app) = &self.app {
            return self.app_access(app, &slot, None).await;
        }
        let view = slot.view();
        if view.status == ConnectionStatus::Revoked {
            return Err(TokenError::Revoked(id));
        }
        if view.status == ConnectionStatus::NeedsReauth {
            return Err(TokenError::NeedsReauth(id));
        }
        if now_ms() < view.expires_at - USE_SAFETY_MS {
            return Ok(Access {
                token: view.token,
                user_id: None,
            });
        }
        let mut st = slot.lock().await;
        if st.status == ConnectionStatus::NeedsReauth {
            return Err(TokenError::NeedsReauth(id));
        }
        let now = now_ms();
        if now >= st.tokens.access_expires_at - USE_SAFETY_MS {
            match st.retry_at {
                // Backing off after failures: use what is still valid, else say so at once
                // rather than hammering the token endpoint from every poll.
                Some(at) if now < at && now < st.tokens.access_expires_at => {}
                Some(at) if now < at => return Err(TokenError::BackingOff(id)),
                _ => {
                    let (back, result) = self.refresh(&slot, st).await;
                    st = back;
                    result?
                }
            }
        }
        Ok(Access {
            token: st.tokens.access_token.clone(),
            user_id: None,
        })
    }

    /// Called after a 401 with `rejected`: refreshes once, unless another task already replaced
    /// that token while we waited for the lock (then the new one is returned as is).
    pub async fn refresh_after_401(
        &self,
        id: ConnectionId,
        rejected: &Secret,
    ) -> Result<Access, TokenError> {
        let slot = self.slot(id)?;
        if let Some(app) = &self.app {
            return self.app_access(app, &slot, Some(rejected)).await;
        }
        let mut st = slot.lock().await;
        if st.status == ConnectionStatus::NeedsReauth {
            return Err(TokenError::NeedsReauth(id));
        }
        if &st.tokens.access_token == rejected {
            let (back, result) = self.refresh(&slot, st).await;
            st = back;
            result?;
        }
        Ok(Access {
            token: st.tokens.access_token.clone(),
            user_id: None,
        })
    }

    /// One refresh of a connection whose lock `st` is held: prompt retries with the same
    /// refresh token on transient failures, persist-before-use on success, `needs_reauth` on
    /// refusal. Returns the lock with the outcome.
    ///
    /// Single flight through shutdown: the request, the save of its answer and the update of
    /// the slot run as a task that owns the lock. If the caller is dropped (the daemon stops,
    /// a poll is abandoned), the task still finishes, applies the rotated pair and only then
    /// lets go of the lock, so no one can send the used refresh token a second time. Once the
    /// daemon is stopping, no new refresh starts at all.
    async fn refresh(
        &self,
        slot: &Arc<Slot>,
        st: OwnedMutexGuard<SlotState>,
    ) -> (OwnedMutexGuard<SlotState>, Result<(), TokenError>) {
        let id = slot.id;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return (st, Err(TokenError::Stopping(id)));
        }
        let (client, store, metrics, task_slot, stopping) = (
            self.client.clone(),
            self.store.clone(),
            self.metrics.clone(),
            slot.clone(),
            self.stopping.clone(),
        );
        let task = self.inflight.spawn(async move {
            let mut st = st;
            let refresh_token = st.tokens.refresh_token.clone();
            // The store holds the token this pair replaces, or, while an earlier pair is
            // unsaved, the one before it.
            let stored_token = st
                .unsaved_from
                .clone()
                .unwrap_or_else(|| refresh_token.clone());
            let mut attempt = 0;
            let result = loop {
                attempt += 1;
                match client.refresh(&refresh_token).await {
                    Ok(pair) => break Ok(pair),
                    // A refusal does not get better by asking again at once.
                    Err(e @ AuthError::Rejected { .. }) => break Err(e),
                    Err(e) if attempt < PROMPT_RETRIES => {
                        warn!(connection = %id, attempt, error = %e, "token refresh failed; retrying with the same refresh token");
                        metrics.token_refreshes.with_label_values(&["error"]).inc();
                        tokio::time::sleep(PROMPT_RETRY_DELAY).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            let result = match result {
                Ok(pair) => {
                    let (pair, unsaved_from) =
                        persist(&store, &metrics, id, &stored_token, pair, &stopping).await;
                    st.tokens = pair;
                    st.unsaved_from = unsaved_from;
                    st.invalid_requests = 0;
                    st.failures = 0;
                    st.retry_at = None;
                    task_slot.publish(&st);
                    metrics.token_refreshes.with_label_values(&["ok"]).inc();
                    info!(
                        connection = %id,
                        access_expires_at = st.tokens.access_expires_at,
                        "refreshed access token"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            };
            (st, result)
        });
        let (mut st, result) = match task.await {
            Ok(r) => r,
            Err(e) => {
                // The task panicked and its lock went with it; take it again.
                let st = slot.lock().await;
                let e = AuthError::Transient {
                    message: format!("the refresh task ended abnormally: {e}"),
                };
                return (st, Err(TokenError::Refresh { id, source: e }));
            }
        };
        // `invalid_request` is blamed on the owner only after a few in a row, with a backoff
        // between them; until then it is handled like a transient failure.
        let invalid_request =
            matches!(&result, Err(AuthError::Rejected { error, .. }) if error == "invalid_request");
        if invalid_request {
            st.invalid_requests += 1;
        }
        let blame_owner = match &result {
            Err(_) if invalid_request => st.invalid_requests >= INVALID_REQUEST_TRIES,
            Err(e) => e.needs_reauth(),
            Ok(_) => false,
        };
        match result {
            Err(e) if invalid_request && !blame_owner => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&["error"])
                    .inc();
                let wait = INVALID_REQUEST_BACKOFF * (1 << (st.invalid_requests - 1).min(8));
                st.retry_at = Some(now_ms() + wait.as_millis() as i64);
                warn!(
                    connection = %id,
                    error = %e,
                    attempt = st.invalid_requests,
                    of = INVALID_REQUEST_TRIES,
                    retry_in_s = wait.as_secs(),
                    "the token endpoint answered invalid_request; retrying the same grant before asking the owner to reconnect"
                );
                (st, Err(TokenError::Refresh { id, source: e }))
            }
            Ok(()) => (st, Ok(())),
            Err(e) if blame_owner => {
                // A reconnect may have stored a new grant since this pair was loaded: then the
                // refusal concerns the old grant only, and the new one is adopted.
                // What the store holds for the grant in use (an unsaved pair's predecessor).
                let used = st
                    .unsaved_from
                    .clone()
                    .unwrap_or_else(|| st.tokens.refresh_token.clone());
                let stored = self
                    .store
                    .call(move |c| {
                        Ok(queries::load_connections(c)?
                            .into_iter()
                            .find(|r| r.id == id))
                    })
                    .await;
                if let Ok(Some(r)) = stored {
                    if r.tokens.refresh_token != used && r.status == ConnectionStatus::Active {
                        info!(connection = %id, "the old grant was refused, but a reconnect stored a new one; using it");
                        st.tokens = r.tokens;
                        st.unsaved_from = None;
                        st.failures = 0;
                        st.retry_at = None;
                        slot.publish(&st);
                        return (st, Ok(()));
                    }
                }
                self.metrics
                    .token_refreshes
                    .with_label_values(&["rejected"])
                    .inc();
                error!(connection = %id, error = %e, "Smartcar refused the refresh token; the connection needs re-authorization (run `carpulse reauth VEHICLE`)");
                st.status = ConnectionStatus::NeedsReauth;
                slot.publish(&st);
                let store_result = self
                    .store
                    .call(move |c| {
                        queries::set_connection_status(
                            c,
                            id,
                            ConnectionStatus::NeedsReauth,
                            now_ms(),
                        )
                    })
                    .await;
                if let Err(err) = store_result {
                    error!(connection = %id, error = format!("{err:#}"), "cannot record needs_reauth in the store");
                }
                self.update_connection_gauge().await;
                (st, Err(TokenError::Refresh { id, source: e }))
            }
            Err(e) => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&["error"])
                    .inc();
                st.failures += 1;
                let backoff = backoff(st.failures);
                st.retry_at = Some(now_ms() + backoff.as_millis() as i64);
                if matches!(e, AuthError::Rejected { .. }) {
                    // invalid_client, a 404...: carpulse's configuration, not the owner's grant.
                    error!(connection = %id, error = %e, retry_in_s = backoff.as_secs(), "the token endpoint refused carpulse itself: check smartcar.client_id, the client secret and smartcar.token_url");
                } else {
                    warn!(connection = %id, error = %e, retry_in_s = backoff.as_secs(), "token refresh failed; backing off");
                }
                (st, Err(TokenError::Refresh { id, source: e }))
            }
        }
    }

    /// Every loaded connection: id, user, status and access-token expiry. A connection busy
    /// refreshing is reported as active with its previous expiry (read from the published
    /// views, so `/healthz` never waits behind a refresh in flight).
    pub async fn overview(&self) -> Vec<(ConnectionId, String, ConnectionStatus, UnixMillis)> {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let mut out: Vec<_> = slots
            .iter()
            .map(|s| {
                let v = s.view();
                (s.id, s.user_id.clone(), v.status, v.expires_at)
            })
            .collect();
        out.sort_by_key(|c| c.0);
        out
    }

    /// Connections whose rotated pair the store refused, so it lives only in memory: the
    /// daemon's emergency (`/healthz` answers 503 naming them; never the tokens).
    pub fn unsaved_connections(&self) -> Vec<(ConnectionId, String)> {
        let mut out: Vec<_> = self
            .slots()
            .values()
            .filter(|s| s.view().unsaved)
            .map(|s| (s.id, s.user_id.clone()))
            .collect();
        out.sort_by_key(|c| c.0);
        out
    }

    /// Rotated pairs that neither the store nor the fallback file took at shutdown; the
    /// daemon exits non-zero when there are any (their owners will have to reconnect).
    pub fn lost_pairs(&self) -> usize {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Pairs only in memory right now (for a shutdown that could not wait for [`Self::run`]
    /// to finish its last save: they are lost with the process).
    pub fn unsaved_count(&self) -> usize {
        self.slots().values().filter(|s| s.view().unsaved).count()
    }

    /// Recounts `carpulse_connections{status}` from the loaded slots' published views.
    pub async fn update_connection_gauge(&self) {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let count = |status| slots.iter().filter(|s| s.view().status == status).count() as i64;
        self.metrics.set_connections(&[
            (
                ConnectionStatus::Active.as_str(),
                count(ConnectionStatus::Active),
            ),
            (
                ConnectionStatus::NeedsReauth.as_str(),
                count(ConnectionStatus::NeedsReauth),
            ),
            (
                ConnectionStatus::Revoked.as_str(),
                count(ConnectionStatus::Revoked),
            ),
        ]);
    }

    /// The background refresher: one task per connection, each sleeping until its pair is due.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.update_connection_gauge().await;
        if let Some(app) = &self.app {
            // API Authentication: one application token; stored per-user pairs are not used
            // and not refreshed.
            app.run(shutdown).await;
            return;
        }
        let tracker = TaskTracker::new();
        *self.runner.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((tracker.clone(), shutdown.clone()));
        for id in self.connection_ids() {
            self.spawn_refresher(id);
        }
        shutdown.cancelled().await;
        // From here on no refresh starts (one in flight finishes and is saved by its task).
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.runner.lock().unwrap_or_else(|p| p.into_inner()).take();
        tracker.close();
        tracker.wait().await;
        self.inflight.close();
        if tokio::time::timeout(INFLIGHT_GRACE, self.inflight.wait())
            .await
            .is_err()
        {
            error!("a token refresh was still in flight at shutdown; its rotated pair may be lost");
        }
        self.save_before_exit().await;
    }

    /// A rotated pair the store refused so far gets a last chance: after this process, only
    /// the store remembers it. If the store still refuses, the pairs go to a 0600 file beside
    /// it ([`fallback`]), which the next start merges into the token store; if even that
    /// fails they are counted in [`TokenManager::lost_pairs`] and the daemon exits non-zero.
    async fn save_before_exit(&self) {
        let mut slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        slots.sort_by_key(|s| s.id);
        let mut refused = Vec::new();
        for slot in slots {
            let mut st = slot.lock().await;
            let Some(stored) = st.unsaved_from.clone() else {
                continue;
            };
            match save_once(&self.store, slot.id, &stored, &st.tokens).await {
                Ok(_) => {
                    st.unsaved_from = None;
                    slot.publish(&st);
                    info!(connection = %slot.id, "the rotated token pair is saved");
                }
                Err(e) => {
                    error!(
                        connection = %slot.id,
                        error = format!("{e:#}"),
                        "the store still refuses the rotated token pair; writing it to the fallback file"
                    );
                    refused.push(fallback::Unsaved {
                        connection_id: slot.id,
                        user_id: slot.user_id.clone(),
                        replaces: stored,
                        tokens: st.tokens.clone(),
                    });
                }
            }
        }
        if refused.is_empty() {
            return;
        }
        let path = fallback::path_for(self.store.path());
        match fallback::write(&path, &refused) {
            Ok(()) => warn!(
                file = %path.display(),
                connections = refused.len(),
                "the rotated token pairs the store refused are in the fallback file (mode 0600); the next start merges them into the token store"
            ),
            Err(e) => {
                self.lost
                    .store(refused.len(), std::sync::atomic::Ordering::SeqCst);
                for u in &refused {
                    error!(
                        connection = %u.connection_id,
                        file = %path.display(),
                        error = format!("{e:#}"),
                        "the rotated token pair could be saved neither in the store nor in the fallback file; the connection will need re-authorization (carpulse reauth)"
                    );
                }
            }
        }
    }

    fn margin(&self) -> Duration {
        *self.margin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new `schedule.refresh_margin` (SIGHUP); each connection's next refresh time uses it.
    pub fn set_margin(&self, margin: Duration) {
        *self.margin.lock().unwrap_or_else(|p| p.into_inner()) = margin;
    }

    async fn keep_fresh(&self, slot: Arc<Slot>, shutdown: CancellationToken) {
        loop {
            let due = {
                let st = slot.lock().await;
                if st.status == ConnectionStatus::NeedsReauth {
                    return;
                }
                let due = st.retry_at.unwrap_or_else(|| {
                    refresh_due_at(&st.tokens, self.margin(), rand::random::<f64>())
                });
                match st.unsaved_from {
                    // Only the save is retried while the pair is unsaved (no rotation), at its
                    // own pace: a full disk refuses at once, and a due time already past must
                    // not turn the retries into a busy loop.
                    Some(_) => now_ms() + UNSAVED_RETRY.as_millis() as i64,
                    None => due,
                }
            };
            let wait = Duration::from_millis((due - now_ms()).max(0) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut st = slot.lock().await;
            if let Some(stored) = st.unsaved_from.clone() {
                match save_once(&self.store, slot.id, &stored, &st.tokens).await {
                    Ok(newer) => {
                        info!(connection = %slot.id, "the rotated token pair is saved now");
                        if let Some(pair) = newer {
                            st.tokens = pair;
                        }
                        st.unsaved_from = None;
                        slot.publish(&st);
                    }
                    Err(e) => {
                        error!(connection = %slot.id, error = format!("{e:#}"), "the rotated token pair is still not saved");
                        // No proactive rotation while the pair is unsaved: each one would make
                        // a new only-copy. A poll whose token is about to expire still
                        // refreshes (see `access`).
                        continue;
                    }
                }
            }
            // Someone (a 401 path) may have refreshed while we slept.
            let still_due = st.retry_at.is_some_and(|r| now_ms() >= r)
                || now_ms() >= refresh_due_at(&st.tokens, self.margin(), 1.0);
            if !still_due {
                continue;
            }
            // Errors are logged and counted inside; the loop goes on with the backoff it set.
            // On shutdown the wait ends, but the request itself runs on with the lock (see
            // `refresh`).
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.refresh(&slot, st) => {}
            }
        }
    }
}

/// Commits a rotated pair durably, before anyone uses it, and returns the pair to use: the
/// rotated one, or the grant a reconnect stored meanwhile (never overwritten). The old refresh
/// token is dead once Smartcar's grace window passes, so the new pair is kept in memory even if
/// the disk refuses it: losing it there too would lose the connection for certain.
///
/// Returns the pair to use and, when the store refused it, the refresh token the store still
/// holds (the background task retries the save every [`UNSAVED_RETRY`]).
async fn persist(
    store: &Store,
    metrics: &Metrics,
    id: ConnectionId,
    refreshed: &Secret,
    pair: TokenPair,
    stopping: &std::sync::atomic::AtomicBool,
) -> (TokenPair, Option<Secret>) {
    for attempt in 1..=3 {
        match save_once(store, id, refreshed, &pair).await {
            Ok(Some(newer)) => return (newer, None),
            Ok(None) => return (pair, None),
            Err(e) => {
                error!(connection = %id, attempt, error = format!("{e:#}"), "cannot persist the rotated token pair");
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    break; // the last save at shutdown tries once more, then the fallback file
                }
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    metrics
        .token_refreshes
        .with_label_values(&["persist_failed"])
        .inc();
    error!(connection = %id, retry_s = UNSAVED_RETRY.as_secs(), "the rotated token pair is only in memory; saving it again until the store takes it");
    (pair, Some(refreshed.clone()))
}

/// One save of a rotated pair: `Ok(None)` saved, `Ok(Some(pair))` a reconnect's newer grant
/// is in the store (use it; nothing was overwritten).
async fn save_once(
    store: &Store,
    id: ConnectionId,
    refreshed: &Secret,
    pair: &TokenPair,
) -> anyhow::Result<Option<TokenPair>> {
    let (p, old) = (pair.clone(), refreshed.clone());
    match store
        .call(move |c| queries::save_rotated(c, id, &old, &p, now_ms()))
        .await?
    {
        queries::Rotation::Saved => Ok(None),
        queries::Rotation::Superseded(r) => {
            info!(connection = %id, "a reconnect stored a new grant meanwhile; using it");
            Ok(Some(r.tokens))
        }
    }
}

/// How often a rotated pair the store refused is offered to it again.
const UNSAVED_RETRY: Duration = Duration::from_secs(5);

fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1 << failures.saturating_sub(1).min(10));
    let capped = exp.min(BACKOFF_MAX);
    // Up to 20 % jitter so that connections failing together don't retry together.
    capped.mul_f64(1.0 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(issued_at: UnixMillis, lifetime_s: i64) -> TokenPair {
        TokenPair {
            access_token: Secret::new("a"),
            refresh_token: Secret::new("r"),
            access_expires_at: issued_at + lifetime_s * 1000,
            refresh_expires_at: issued_at + REFRESH_TOKEN_LIFETIME_MS,
        }
    }

    #[test]
    fn a_two_hour_token_is_refreshed_margin_ahead() {
        let t = pair(1_000_000, 7200);
        let due = refresh_due_at(&t, Duration::from_secs(600), 0.0);
        assert_eq!(due, t.access_expires_at - 600_000);
        // Full jitter moves it earlier by at most a tenth of the lead.
        let due_j = refresh_due_at(&t, Duration::from_secs(600), 1.0);
        assert_eq!(due_j, t.access_expires_at - 660_000);
    }

    #[test]
    fn a_short_token_is_refreshed_at_half_its_lifetime() {
        let t = pair(1_000_000, 20);
        let due = refresh_due_at(&t, Duration::from_secs(600), 0.0);
        assert_eq!(due, 1_000_000 + 10_000);
        let due_j = refresh_due_at(&t, Duration::from_secs(600), 1.0);
        assert_eq!(due_j, 1_000_000 + 9_000);
    }

    #[test]
    fn a_zero_lifetime_token_does_not_spin() {
        let t = pair(1_000_000, 0);
        assert_eq!(refresh_due_at(&t, Duration::from_secs(600), 1.0), 1_002_000);
    }

    #[test]
    fn a_small_margin_wins_over_half_the_lifetime() {
        let t = pair(0, 7200);
        assert_eq!(refresh_due_at(&t, Duration::from_secs(60), 0.0), 7_140_000);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b1 = backoff(1);
        assert!(b1 >= BACKOFF_MIN && b1 <= BACKOFF_MIN.mul_f64(1.2));
        let b3 = backoff(3);
        assert!(b3 >= BACKOFF_MIN * 4 && b3 <= (BACKOFF_MIN * 4).mul_f64(1.2));
        let b20 = backoff(20);
        assert!(b20 >= BACKOFF_MAX && b20 <= BACKOFF_MAX.mul_f64(1.2));
    }
}
