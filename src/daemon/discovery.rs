//! Capability discovery (issue: poll only what the vehicle grants and supports). What a
//! vehicle cannot answer is read from Smartcar itself (v2 `/permissions`, the v3 signal list)
//! at `connect`, for any vehicle never read, and every `schedule.discover_every`; it is stored
//! as `discovery` blocks, so polls skip those endpoints (and, in v2, leave them out of the
//! billed batch) from then on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::daemon::poller::{DiscoveryError, PolledVehicle, Poller};
use crate::domain::{now_ms, UnixMillis, VehicleId};
use crate::smartcar::Endpoint;
use crate::store::{queries, Store};

/// Capability readings in flight at once.
const AT_ONCE: usize = 2;

/// After a failed reading, the vehicle is not asked again for this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3600);

/// The daemon's discovery state: when each vehicle's last failed reading was.
#[derive(Default)]
pub struct Discovery {
    failed_at: Mutex<HashMap<VehicleId, UnixMillis>>,
    running: tokio::sync::Mutex<()>,
}

/// What a discovery pass did, for the log and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub read: usize,
    pub blocked: usize,
    pub failed: usize,
    pub not_asked: usize,
}

impl Discovery {
    /// Reads the capabilities of every polled vehicle that is due (never read, or not within
    /// `every`), concurrently within the poller's pool, and adopts the result. A pass still
    /// running makes this one a no-op.
    pub async fn run_due(
        &self,
        store: &Store,
        poller: &Arc<Poller>,
        every: Duration,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Pass> {
        let Ok(_only_one) = self.running.try_lock() else {
            return Ok(Pass::default());
        };
        let now = now_ms();
        let before = now - every.as_millis() as i64;
        let due: std::collections::HashSet<VehicleId> = store
            .call(move |c| queries::vehicles_to_discover(c, before))
            .await
            .context("finding vehicles whose capabilities are due")?
            .into_iter()
            .collect();
        let retry_floor = now - RETRY_AFTER_FAILURE.as_millis() as i64;
        let vehicles: Vec<PolledVehicle> = {
            let failed = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
            poller
                .vehicles()
                .into_iter()
                .filter(|v| due.contains(&v.id))
                .filter(|v| failed.get(&v.id).is_none_or(|at| *at < retry_floor))
                .collect()
        };
        if vehicles.is_empty() {
            return Ok(Pass::default());
        }
        // A few at a time, so polls never queue behind a whole pass for the pool's slots.
        let limit = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut asks = tokio::task::JoinSet::new();
        for v in vehicles {
            let (poller, cancel, limit) = (poller.clone(), cancel.clone(), limit.clone());
            asks.spawn(async move {
                let _slot = limit.acquire_owned().await;
                let r = poller.discover(&v, &cancel).await;
                (v, r)
            });
        }
        let mut pass = Pass::default();
        while let Some(joined) = asks.join_next().await {
            let Ok((v, result)) = joined else {
                pass.failed += 1;
                continue;
            };
            let blocked = match result {
                Ok(Some(blocked)) => blocked,
                Ok(None) => {
                    pass.not_asked += 1;
                    continue;
                }
                // A server without the reading (or a vehicle it does not have it for) tells
                // nothing: what earlier readings found stays, polls find out the rest, and
                // the reading is tried again when due.
                Err(DiscoveryError::Api(e))
                    if crate::daemon::gate::reaction(&e, now)
                        == crate::daemon::gate::Reaction::DisableEndpoint =>
                {
                    warn!(vehicle = %v.id, error = %e, "capabilities cannot be read here; keeping what is known");
                    let vid = v.id.clone();
                    store
                        .call(move |c| queries::touch_discovery(c, &vid, now_ms()))
                        .await
                        .with_context(|| format!("dating the capabilities of vehicle {}", v.id))?;
                    pass.failed += 1;
                    continue;
                }
                Err(e) => {
                    pass.failed += 1;
                    warn!(vehicle = %v.id, error = %e, "reading capabilities failed; trying again in an hour");
                    self.failed_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(v.id.clone(), now);
                    continue;
                }
            };
            pass.read += 1;
            pass.blocked += blocked.len();
            save(store, &v.id, &blocked).await?;
        }
        if pass.read > 0 {
            crate::daemon::adopt_stored_blocks(store, poller).await?;
        }
        info!(
            read = pass.read,
            endpoints_blocked = pass.blocked,
            failed = pass.failed,
            not_asked = pass.not_asked,
            "vehicle capabilities read"
        );
        Ok(pass)
    }
}

/// Stores one vehicle's discovery and logs what it blocks.
pub async fn save(
    store: &Store,
    id: &VehicleId,
    blocked: &[(Endpoint, String)],
) -> anyhow::Result<()> {
    for (endpoint, reason) in blocked {
        info!(vehicle = %id, endpoint = endpoint.as_str(), reason, "not polled: the vehicle cannot answer it");
    }
    let rows: Vec<(String, String)> = blocked
        .iter()
        .map(|(e, r)| (e.as_str().to_owned(), r.clone()))
        .collect();
    let vid = id.clone();
    store
        .call(move |c| queries::save_discovery(c, &vid, &rows, now_ms()))
        .await
        .with_context(|| format!("storing the capabilities of vehicle {id}"))?;
    Ok(())
}
