//! `/healthz` and the fleet-state gauges: what the periodic health check finds (connections
//! that need a human, vehicles with no answered poll for `metrics.stale_after`, vehicles with
//! every endpoint disabled or with no data at Smartcar) and the monthly billed-calls gauges.
//!
//! Why it keeps what it found: at 10,000 vehicles a walk of the fleet costs tens of
//! milliseconds, and the check runs every 15 s whether or not anything was polled, so an idle
//! daemon spent 0.2 % of a core on it (issue 8). The walk's inputs are the poller's freshness,
//! vehicle set, gates and ledger and the metrics' fleet, each of which counts its changes
//! ([`Poller::changes`], [`Metrics::fleet_changes`]). Between two checks in which none of
//! them moved, only time did: the walk is reused until the first vehicle in it would turn
//! stale (or the month turns), and only the problem texts, which name how long ago, are
//! written again. The same holds with per-vehicle metrics on: `carpulse_reading_age_seconds`,
//! which ages with the clock, is written at each scrape from the reading times (see
//! [`Metrics`]), so the check sets none of it, and switching per-vehicle series on or off
//! moves [`Metrics::fleet_changes`].

use std::time::Duration;

use crate::daemon::gate::month_of;
use crate::daemon::metrics::{Health, Metrics};
use crate::daemon::poller::Poller;
use crate::daemon::tokens::TokenManager;
use crate::domain::{ConnectionStatus, UnixMillis, VehicleId};

/// `/healthz` staleness for a car only the info job asks (daily by default, plus slack).
const BATTERYLESS_STALE_AFTER: Duration = Duration::from_secs(26 * 3600);

fn human(ms: i64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} min", s / 60)
    }
}

/// A vehicle's problem as the walk found it; its text is written at each check, because it
/// says how long ago.
#[derive(Clone, Debug)]
enum VehicleProblem {
    NoData {
        vehicle: VehicleId,
        since: UnixMillis,
    },
    AllBlocked {
        vehicle: VehicleId,
        disabled: String,
    },
    Stale {
        vehicle: VehicleId,
        since: UnixMillis,
        stale_ms: i64,
    },
}

impl VehicleProblem {
    fn text(&self, now: UnixMillis) -> String {
        match self {
            VehicleProblem::NoData { vehicle, since } => format!(
                "vehicle {vehicle}: Smartcar holds no signals for it since {} ago (an empty listing); it is most likely not subscribed to a webhook: subscribe it in Smartcar's dashboard. Asked again every schedule.no_data_every",
                human(now - since)
            ),
            VehicleProblem::AllBlocked { vehicle, disabled } => format!(
                "vehicle {vehicle}: every endpoint is disabled ({disabled}), so it is not polled at all; `carpulse status` shows why; after fixing the cause run `carpulse vehicles enable {vehicle}` (or reconnect the owner)"
            ),
            VehicleProblem::Stale {
                vehicle,
                since,
                stale_ms,
            } => format!(
                "vehicle {vehicle}: no answered poll for {} (metrics.stale_after is {})",
                human(now - since),
                human(*stale_ms)
            ),
        }
    }
}

/// What a walk depends on besides the clock: when all of it is as it was, so is the walk's
/// result, until [`Walk::valid_until`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Inputs {
    poller: (u64, u64, u64),
    fleet: u64,
    stale_ms: i64,
    month: (i32, u32),
}

/// The result of one walk of the fleet.
#[derive(Debug)]
struct Walk {
    inputs: Inputs,
    /// The first instant at which a vehicle of the walk turns stale: the walk is done again
    /// then, even if nothing else moved.
    valid_until: UnixMillis,
    problems: Vec<VehicleProblem>,
}

/// The health check of a running daemon, with what its last walk of the fleet found (see the
/// module's header). One per daemon, owned by its health loop.
#[derive(Debug)]
pub struct HealthCheck {
    started: UnixMillis,
    last: Option<Walk>,
    walks: u64,
}

impl HealthCheck {
    /// `started`: since when a vehicle never answered counts as unanswered.
    pub fn new(started: UnixMillis) -> HealthCheck {
        HealthCheck {
            started,
            last: None,
            walks: 0,
        }
    }

    /// How many times the fleet was walked (the rest reused the last walk).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Recomputes `/healthz` (connections needing re-auth, vehicles with no answered poll for
    /// `stale_after`) and the freshness, state and billed-calls gauges.
    pub async fn check(
        &mut self,
        health: &Health,
        tokens: &TokenManager,
        poller: &Poller,
        metrics: &Metrics,
        stale_after: Duration,
    ) {
        let now = crate::domain::now_ms();
        let mut problems = connection_problems(tokens, metrics).await;
        // Read before the walk: a change during it moves them again, and the next check walks.
        let inputs = Inputs {
            poller: poller.changes(),
            fleet: metrics.fleet_changes(),
            stale_ms: stale_after.as_millis() as i64,
            month: month_of(now),
        };
        let reuse = self
            .last
            .as_ref()
            .is_some_and(|w| w.inputs == inputs && now < w.valid_until);
        if !reuse {
            self.last = Some(walk(poller, metrics, inputs, self.started, now));
            self.walks += 1;
        }
        if let Some(w) = &self.last {
            problems.extend(w.problems.iter().map(|p| p.text(now)));
        }
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        h.problems = problems;
    }
}

/// The connections' problems, and their token expiry gauges (cheap: one per connection).
async fn connection_problems(tokens: &TokenManager, metrics: &Metrics) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, user) in tokens.unsaved_connections() {
        problems.push(format!(
            "connection {id} (Smartcar user {user}): its rotated token pair is only in memory because the store refuses to save it (see the log); free the disk or release the store's lock. A stop writes it to the fallback file beside the store"
        ));
    }
    for (id, user, status, expires_at) in tokens.overview().await {
        // A connection made with API Authentication holds no token of its own.
        if expires_at > 0 {
            metrics
                .token_expiry
                .with_label_values(&[id.to_string().as_str()])
                .set(expires_at as f64 / 1000.0);
        }
        match (status, tokens.app_auth()) {
            (ConnectionStatus::NeedsReauth, false) => problems.push(format!(
                "connection {id} (Smartcar user {user}) needs re-authorization: run `carpulse reauth VEHICLE` for one of its vehicles (or `carpulse connect` as that account)"
            )),
            (ConnectionStatus::Revoked, _) => problems.push(format!(
                "connection {id} (Smartcar user {user}) is revoked: Smartcar no longer lists it, so its vehicles are not polled; run `carpulse connect` as that account to connect again"
            )),
            (_, true) if !crate::domain::is_real_user_id(&user) => problems.push(format!(
                "connection {id} has no Smartcar user id, which API Authentication sends as sc-user-id: run `carpulse connect` as that account again"
            )),
            _ => {}
        }
    }
    problems
}

/// Walks every polled vehicle: its problems, the fleet's states and billed calls (set on the
/// gauges here), and when the first vehicle not stale yet will be.
fn walk(
    poller: &Poller,
    metrics: &Metrics,
    inputs: Inputs,
    started: UnixMillis,
    now: UnixMillis,
) -> Walk {
    let mut problems = Vec::new();
    let mut valid_until = UnixMillis::MAX;
    let mut states = poller.held();
    // One lock of the fleet table for the whole walk, not four per vehicle.
    for view in poller.vehicle_views() {
        let (vehicle, fresh) = (view.id, view.freshness);
        if let Some(since) = fresh.no_data_since {
            problems.push(VehicleProblem::NoData {
                vehicle: vehicle.clone(),
                since,
            });
            states.push((vehicle, "no_data"));
            continue;
        }
        if view.paused.is_some() {
            states.push((vehicle.clone(), "paused"));
        }
        // Nothing left to ask: not a quiet car but a silent one (issue 11, item 5).
        if let Some(disabled) = view.all_blocked {
            let disabled = disabled.join(", ");
            problems.push(VehicleProblem::AllBlocked { vehicle, disabled });
            continue;
        }
        let since = fresh.last_answered.unwrap_or(started);
        // A car the battery job has nothing to ask (an ICE car, a consent without battery and
        // charge) is answered by the info job only, at its slower cadence. Only when Smartcar
        // said so in a typed error (COMPATIBILITY, PERMISSION, not granted, plan-locked): any
        // other block keeps the normal threshold, so /healthz does not stay quiet for a day.
        let stale_ms = if view.battery_not_capable {
            inputs
                .stale_ms
                .max(BATTERYLESS_STALE_AFTER.as_millis() as i64)
        } else {
            inputs.stale_ms
        };
        // The ages are written at each scrape from the reading times; the poller's are
        // noted there too (a no-op when the poller recorded its readings in these metrics).
        metrics.merge_recorded(&vehicle, &fresh.recorded);
        if now - since > stale_ms {
            problems.push(VehicleProblem::Stale {
                vehicle,
                since,
                stale_ms,
            });
        } else {
            // Stale from the first millisecond past `since + stale_ms`.
            valid_until = valid_until.min(since.saturating_add(stale_ms).saturating_add(1));
        }
    }
    metrics.set_vehicle_states(&states);
    let ids: Vec<_> = metrics
        .fleet()
        .into_iter()
        .chain(poller.vehicles().into_iter().map(|v| v.id))
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect();
    let billed = poller.calls_of(ids);
    metrics.set_calls_billed(&billed);
    Walk {
        inputs,
        valid_until,
        problems,
    }
}

/// One health check without memory of an earlier one: the whole fleet is walked.
pub async fn check_health(
    health: &Health,
    tokens: &TokenManager,
    poller: &Poller,
    metrics: &Metrics,
    stale_after: Duration,
    started: UnixMillis,
) {
    HealthCheck::new(started)
        .check(health, tokens, poller, metrics, stale_after)
        .await
}
