//! With v3 API Authentication, Smartcar's `GET /v3/connections` is the truth about who is
//! connected (smartcar-api.md §10.3). The daemon re-reads it hourly, on SIGHUP and when a
//! vehicle answers ACCESS_DENIED: a user Smartcar no longer lists is marked `revoked` (its
//! vehicles stop being polled at the reload that follows, within a minute), a revoked user
//! listed again becomes active, and vehicles added to an account appear without a new
//! `carpulse connect`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::daemon::app_token::AppAuth;
use crate::daemon::tokens::TokenManager;
use crate::domain::{is_real_user_id, now_ms, ConnectionStatus, VehicleId};
use crate::smartcar::connections::V3Connection;
use crate::smartcar::SmartcarClient;
use crate::store::{queries, Store};

/// How often the connections are read when nothing asks sooner.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// ACCESS_DENIED answers ask for a check; at most one per this long (a later one waits).
pub const MIN_GAP: Duration = Duration::from_secs(10);

/// What one check changed, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub listed: usize,
    pub revoked: Vec<String>,
    pub restored: Vec<String>,
    pub added: Vec<VehicleId>,
}

impl CheckReport {
    pub fn changed(&self) -> bool {
        !(self.revoked.is_empty() && self.restored.is_empty() && self.added.is_empty())
    }
}

/// Reads every connection of the app and brings the store (and the token manager's view of
/// each connection's status) in line with it.
pub async fn check_once(
    client: &SmartcarClient,
    app: &AppAuth,
    store: &Store,
    tokens: &TokenManager,
) -> anyhow::Result<CheckReport> {
    let token = app.token().await.context("getting the application token")?;
    let list = client
        .connection_list(&token, None)
        .await
        .context("listing connections (GET /v3/connections)")?;
    if !list.complete {
        tracing::warn!(
            listed = list.connections.len(),
            "GET /v3/connections could not be read to its end; no connection is marked revoked from it"
        );
    }
    let listed = list.connections;
    let mut by_user: HashMap<&str, Vec<&V3Connection>> = HashMap::new();
    for c in &listed {
        by_user.entry(c.user_id.as_str()).or_default().push(c);
    }
    let connections = store
        .call(|c| queries::load_connections(c))
        .await
        .context("loading connections")?;
    let known: HashSet<VehicleId> = store
        .call(|c| queries::load_vehicles(c))
        .await
        .context("loading vehicles")?
        .into_iter()
        .map(|v| v.vehicle_id)
        .collect();
    let mut report = CheckReport {
        listed: listed.len(),
        ..Default::default()
    };
    let now = now_ms();
    for conn in connections {
        if !is_real_user_id(&conn.user_id) {
            continue; // status says why; nothing to match it against
        }
        let theirs = by_user.get(conn.user_id.as_str());
        let status = match (theirs, conn.status) {
            (None, ConnectionStatus::Revoked) => continue,
            // Not listed, but the listing was partial: nothing can be concluded.
            (None, _) if !list.complete => conn.status,
            (None, _) => {
                warn!(
                    connection = %conn.id,
                    user = %conn.user_id,
                    "Smartcar no longer lists this user's connection: marked revoked, its vehicles are not polled (run `carpulse connect` as that account to connect again)"
                );
                report.revoked.push(conn.user_id.clone());
                ConnectionStatus::Revoked
            }
            (Some(_), ConnectionStatus::Revoked) => {
                info!(connection = %conn.id, user = %conn.user_id, "Smartcar lists this user's connection again: polled again");
                report.restored.push(conn.user_id.clone());
                ConnectionStatus::Active
            }
            (Some(_), _) => conn.status,
        };
        if status != conn.status {
            let id = conn.id;
            store
                .call(move |c| queries::set_connection_status(c, id, status, now))
                .await
                .with_context(|| format!("storing the status of connection {id}"))?;
            tokens.set_status(id, status).await;
        }
        for v in theirs.into_iter().flatten() {
            if known.contains(&v.vehicle_id) {
                continue;
            }
            let (id, vid, info) = (conn.id, v.vehicle_id.clone(), v.vehicle.clone());
            store
                .call(move |c| queries::upsert_vehicle(c, id, &vid, info.as_ref(), now))
                .await
                .with_context(|| format!("storing vehicle {}", v.vehicle_id))?;
            let blocked = crate::smartcar::not_granted(&v.permissions);
            crate::daemon::discovery::save(store, &v.vehicle_id, &blocked).await?;
            info!(vehicle = %v.vehicle_id, user = %conn.user_id, "a vehicle was added to a connected account; polled from now on");
            report.added.push(v.vehicle_id.clone());
        }
    }
    Ok(report)
}
