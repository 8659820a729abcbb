//! What an outcome means for the next call (DESIGN §2.3, smartcar-api.md §4.2), per vehicle:
//! honour `retry-after`, back off exponentially on server and network trouble, try again next
//! tick when the car sleeps, stop asking for what the car or the consent cannot give, pause a
//! vehicle whose account or plan needs a human. Pure bookkeeping with `now` passed in, so every
//! rule is unit-tested; the poller asks [`Gates::admit`] before a call and tells
//! [`Gates::record`] what came of it.

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::{BlockScope, UnixMillis, VehicleId};
use crate::hash::FxHashMap;
use crate::smartcar::error::{ApiError, ErrorKind};
use crate::smartcar::Endpoint;

/// How long a block this process set is kept by [`Gates::adopt_blocks`] though the store's
/// snapshot lacks it: the writer is flushed before the read, so only a block set in the
/// instant between the flush and the poll's write can be missing.
const ADOPT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// First backoff after a server, upstream or network failure; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(30 * 60);
/// UPSTREAM:RATE_LIMIT is the manufacturer's own limit: "poll once every 30 mins" (docs).
const UPSTREAM_RATE_LIMIT_WAIT: Duration = Duration::from_secs(30 * 60);
/// `retry-after` when a 429 RATE_LIMIT:VEHICLE carries none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long a vehicle with an empty v3 signal store waits when no cadence was given.
pub const NO_DATA_WAIT: Duration = Duration::from_secs(3600);
/// The longest any wait may last, whatever set it (a `retry-after` in either form, a backoff,
/// a configured cadence, a stored `until`): a day. A longer one is a server's mistake or a
/// corrupt row, and must never silence a vehicle for good (issue 11, item 2).
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// `until`, or `now + MAX_WAIT` when it lies further out.
pub fn capped_until(until: UnixMillis, now: UnixMillis) -> UnixMillis {
    until.min(now.saturating_add(MAX_WAIT.as_millis() as i64))
}

/// What to do after one failed endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaction {
    /// Transient at the car (asleep, unreachable): the next tick is soon enough.
    NextTick,
    /// Do not call this vehicle before then (`retry-after`).
    WaitUntil(UnixMillis),
    /// Exponential backoff for this vehicle.
    BackOff { at_least: Duration },
    /// The whole application is throttled: back off every vehicle.
    ThrottleApp,
    /// Permanent for this endpoint and vehicle until the owner reconnects.
    DisableEndpoint,
    /// Needs a human (billing, the connected-services account): stop polling the vehicle.
    Pause,
    /// The token manager deals with it (refresh, then re-auth).
    Auth,
}

pub fn reaction(e: &ApiError, now: UnixMillis) -> Reaction {
    let wait_until = |wait: Duration| {
        Reaction::WaitUntil(now.saturating_add(wait.min(MAX_WAIT).as_millis() as i64))
    };
    match e.kind {
        ErrorKind::VehicleState | ErrorKind::NoReading => Reaction::NextTick,
        // A value that could not be decoded (one signal, one endpoint of a good answer) is
        // that reading lost, counted: the car and the server answered, so the next tick asks
        // again as usual. It never backs off the vehicle's other, healthy readings (issue 11,
        // item 8). An answer that could not be read at all still backs off (below).
        ErrorKind::Decode if e.code.as_deref() == Some(crate::smartcar::error::BAD_VALUE) => {
            Reaction::NextTick
        }
        // The slow cadence of a vehicle Smartcar holds no data for; the poller puts
        // `schedule.no_data_every` in `retry_after`.
        ErrorKind::NoData => wait_until(e.retry_after.unwrap_or(NO_DATA_WAIT)),
        ErrorKind::RateLimitVehicle => wait_until(e.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
        ErrorKind::RateLimitApp => Reaction::ThrottleApp,
        ErrorKind::Upstream if e.code.as_deref() == Some("RATE_LIMIT") => Reaction::BackOff {
            at_least: UPSTREAM_RATE_LIMIT_WAIT,
        },
        // SERVER:RECORD_NOT_FOUND / MULTIPLE_RECORDS_FOUND are not worth repeating.
        ErrorKind::Server
            if matches!(
                e.code.as_deref(),
                Some("RECORD_NOT_FOUND") | Some("MULTIPLE_RECORDS_FOUND")
            ) =>
        {
            Reaction::DisableEndpoint
        }
        ErrorKind::Server
        | ErrorKind::Upstream
        | ErrorKind::Transport
        | ErrorKind::Timeout
        | ErrorKind::Decode
        | ErrorKind::Other
        | ErrorKind::Rejected
        | ErrorKind::TooLarge
        | ErrorKind::AccessDenied => Reaction::BackOff {
            at_least: Duration::ZERO,
        },
        ErrorKind::Permission
        | ErrorKind::Compatibility
        | ErrorKind::Validation
        | ErrorKind::NotFound
        | ErrorKind::PlanLocked => Reaction::DisableEndpoint,
        ErrorKind::Billing | ErrorKind::ConnectedServicesAccount => Reaction::Pause,
        ErrorKind::Authentication => Reaction::Auth,
    }
}

/// An error's `TYPE:CODE` as Smartcar named it (the kind when it named nothing), for a pause
/// or a block's reason.
pub fn cause(e: &ApiError) -> String {
    let named = match (&e.error_type, &e.code) {
        (Some(t), Some(c)) => format!("{t}:{c}"),
        (Some(t), None) => t.clone(),
        _ => e.kind.label().to_owned(),
    };
    // A plan fact, told apart from "vehicle not capable" wherever a reason is shown.
    if e.kind == ErrorKind::PlanLocked {
        format!("plan_locked:{named}")
    } else {
        named
    }
}

/// Why a vehicle was not called this tick (the `reason` label of the skip counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Paused,
    /// Inside a `retry-after` window or a backoff.
    Waiting,
    /// The app-wide limit is being waited out.
    AppThrottled,
    /// Every endpoint of the job is disabled for this vehicle.
    Disabled,
    /// The vehicle's calls this month would pass `[budget] calls_per_vehicle_month`.
    Budget,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::Paused => "paused",
            Skip::Waiting => "waiting",
            Skip::AppThrottled => "app_throttled",
            Skip::Disabled => "disabled",
            Skip::Budget => "budget",
        }
    }
}

#[derive(Default, Debug)]
struct Gate {
    not_before: UnixMillis,
    /// When this process set `not_before` (0: adopted from the store), so a stored wait
    /// lifted by `vehicles enable` is told apart from one still on its way to the store.
    wait_at: UnixMillis,
    failures: u32,
    /// Why the vehicle is paused, and when this process paused it (0: adopted from the store).
    paused: Option<(String, UnixMillis)>,
    /// Disabled endpoints, each with when this process disabled it (0: adopted from the store).
    /// Keyed by the stored name, not [`Endpoint`]: a block row may name an endpoint this build
    /// does not know, and it must still show in `describe` and count in `adopt_blocks`.
    disabled: HashMap<String, UnixMillis>,
    /// Why each disabled endpoint is (`TYPE:CODE` or a discovery's reason), when known.
    reasons: HashMap<String, String>,
}

/// The gates of every vehicle, plus the app-wide throttle.
#[derive(Default, Debug)]
pub struct Gates {
    /// Fx-hashed: looked up by every poll (see [`crate::hash`]).
    vehicles: FxHashMap<VehicleId, Gate>,
    app_not_before: UnixMillis,
    app_failures: u32,
    /// Bumped whenever what [`Gates::describe`], [`Gates::all_blocked`] and
    /// [`Gates::not_capable`] answer changes (disabled endpoints, their reasons, a pause):
    /// the health check walks the fleet again only when it moved (see
    /// `daemon::health`). Waits and backoffs are not counted: `/healthz` does not read them.
    changes: u64,
}

/// `base · 2^(failures-1)`, capped, with up to 20 % jitter (`jitter` in 0..1) so vehicles that
/// failed together do not retry together.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(BACKOFF_MAX)
        .mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0))
}

impl Gates {
    /// The endpoints of a job that may be called now, or why none may.
    pub fn admit(
        &self,
        id: &VehicleId,
        endpoints: &[Endpoint],
        now: UnixMillis,
    ) -> Result<Vec<Endpoint>, Skip> {
        if now < self.app_not_before {
            return Err(Skip::AppThrottled);
        }
        let Some(g) = self.vehicles.get(id) else {
            return Ok(endpoints.to_vec());
        };
        if g.paused.is_some() {
            return Err(Skip::Paused);
        }
        if now < g.not_before {
            return Err(Skip::Waiting);
        }
        let open: Vec<Endpoint> = endpoints
            .iter()
            .copied()
            .filter(|e| !g.disabled.contains_key(e.as_str()))
            .collect();
        if open.is_empty() {
            return Err(Skip::Disabled);
        }
        Ok(open)
    }

    /// A successful answer: the vehicle's (and the app's) backoff starts over.
    pub fn succeeded(&mut self, id: &VehicleId) {
        self.app_failures = 0;
        if let Some(g) = self.vehicles.get_mut(id) {
            g.failures = 0;
        }
    }

    /// Applies the reaction to a failure of `endpoint`; returns it for the log.
    pub fn failed(
        &mut self,
        id: &VehicleId,
        endpoint: Endpoint,
        e: &ApiError,
        now: UnixMillis,
        jitter: f64,
    ) -> Reaction {
        let r = reaction(e, now);
        match &r {
            Reaction::NextTick | Reaction::Auth => {}
            Reaction::WaitUntil(at) => {
                let g = self.vehicles.entry(id.clone()).or_default();
                g.not_before = g.not_before.max(capped_until(*at, now));
                g.wait_at = now;
            }
            Reaction::BackOff { at_least } => {
                let g = self.vehicles.entry(id.clone()).or_default();
                g.failures += 1;
                let wait = backoff(g.failures, jitter).max(*at_least).min(MAX_WAIT);
                g.not_before = g.not_before.max(now + wait.as_millis() as i64);
                g.wait_at = now;
            }
            Reaction::ThrottleApp => {
                self.app_failures += 1;
                let wait = backoff(self.app_failures, jitter);
                self.app_not_before = self.app_not_before.max(now + wait.as_millis() as i64);
            }
            Reaction::DisableEndpoint => {
                let g = self.vehicles.entry(id.clone()).or_default();
                g.disabled.insert(endpoint.as_str().to_owned(), now);
                g.reasons.insert(endpoint.as_str().to_owned(), cause(e));
                self.changes += 1;
            }
            Reaction::Pause => {
                self.vehicles.entry(id.clone()).or_default().paused = Some((cause(e), now));
                self.changes += 1;
            }
        }
        r
    }

    /// A count that moves whenever a vehicle's disabled endpoints, their reasons or its pause
    /// change (the health check compares it with the last one it saw).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Endpoints disabled for a vehicle, and why it is paused (for status and logs).
    pub fn describe(&self, id: &VehicleId) -> (Vec<String>, Option<String>) {
        match self.vehicles.get(id) {
            Some(g) => {
                let mut d: Vec<String> = g.disabled.keys().cloned().collect();
                d.sort();
                (d, g.paused.as_ref().map(|p| p.0.clone()))
            }
            None => (Vec::new(), None),
        }
    }

    /// Takes the stored blocks, read at `read_at`, as the truth (a reconnect or `vehicles
    /// enable` lifted some; a discovery added some). A block this process set after
    /// [`ADOPT_GRACE`] before the read is kept: its row may still be on its way to the store.
    /// Backoff and `retry-after` are untouched.
    pub fn adopt_blocks(
        &mut self,
        blocks: &HashMap<VehicleId, Vec<(BlockScope, String)>>,
        read_at: UnixMillis,
    ) {
        let recent = read_at - ADOPT_GRACE.as_millis() as i64;
        let paused = |rows: &[(BlockScope, String)]| {
            rows.iter()
                .find(|(s, _)| *s == BlockScope::Vehicle)
                .map(|(_, why)| (why.clone(), 0))
        };
        // (endpoint, why) of each disabled endpoint.
        let disabled = |rows: &[(BlockScope, String)]| -> Vec<(String, String)> {
            rows.iter()
                .filter_map(|(s, why)| s.endpoint().map(|e| (e.to_owned(), why.clone())))
                .collect()
        };
        // Counted only when something a reader sees moved: a reload adopts the same blocks
        // every minute, and an unchanged fleet must not make the health check walk it again.
        let mut changed = false;
        for (id, g) in self.vehicles.iter_mut() {
            let rows = blocks.get(id).map(Vec::as_slice).unwrap_or_default();
            // A stored block is dropped and taken again from `rows`: changed only if the
            // set of endpoints differs once that is done.
            let old = std::mem::take(&mut g.disabled);
            g.disabled = old
                .iter()
                .filter(|(_, at)| **at >= recent && **at > 0)
                .map(|(e, at)| (e.clone(), *at))
                .collect();
            for (e, why) in disabled(rows) {
                g.disabled.entry(e.clone()).or_insert(0);
                changed |= g.reasons.get(&e) != Some(&why);
                g.reasons.insert(e, why);
            }
            changed |=
                g.disabled.len() != old.len() || g.disabled.keys().any(|e| !old.contains_key(e));
            let old = g.paused.take();
            let kept = old.clone().filter(|(_, at)| *at >= recent && *at > 0);
            g.paused = paused(rows).or(kept);
            changed |= g.paused.as_ref().map(|p| &p.0) != old.as_ref().map(|p| &p.0);
        }
        for (id, rows) in blocks {
            if !self.vehicles.contains_key(id) {
                let g = self.vehicles.entry(id.clone()).or_default();
                let off = disabled(rows);
                g.disabled = off.iter().map(|(e, _)| (e.clone(), 0)).collect();
                g.reasons = off.into_iter().collect();
                g.paused = paused(rows);
                changed |= !g.disabled.is_empty() || g.paused.is_some();
            }
        }
        if changed {
            self.changes += 1;
        }
    }

    /// No call to the vehicle before `until` (a stored retry-after or backoff), but never
    /// past [`MAX_WAIT`] from `now`: a stored `until` beyond it (an older carpulse stored an
    /// HTTP-date uncapped, a hand-edited row) is corrected here, when it is loaded.
    pub fn wait_until(&mut self, id: &VehicleId, until: UnixMillis, now: UnixMillis) {
        let g = self.vehicles.entry(id.clone()).or_default();
        g.not_before = g.not_before.max(capped_until(until, now));
    }

    /// Takes the stored waits, read at `read_at`, as the truth, like [`Gates::adopt_blocks`]:
    /// a stored wait is honoured (capped at [`MAX_WAIT`]); a wait the store no longer holds
    /// (`carpulse vehicles enable` lifted it) is forgotten, unless this process set it within
    /// [`ADOPT_GRACE`] of the read (its row may still be on its way).
    pub fn adopt_waits(&mut self, waits: &HashMap<VehicleId, UnixMillis>, read_at: UnixMillis) {
        let recent = read_at - ADOPT_GRACE.as_millis() as i64;
        for (id, g) in self.vehicles.iter_mut() {
            if waits.contains_key(id) || g.not_before <= read_at {
                continue;
            }
            if g.wait_at == 0 || g.wait_at < recent {
                g.not_before = 0;
                g.failures = 0;
            }
        }
        for (id, until) in waits {
            self.wait_until(id, *until, read_at);
        }
    }

    /// Whether every one of `endpoints` is disabled because the car or its consent cannot
    /// give it (COMPATIBILITY, PERMISSION or a permission not granted, a plan-locked signal
    /// group): a fact about the car, like an ICE car's battery. Blocks for other reasons
    /// (VALIDATION, RESOURCE_NOT_FOUND, SERVER:RECORD_NOT_FOUND) are not.
    pub fn not_capable(&self, id: &VehicleId, endpoints: &[Endpoint]) -> bool {
        self.vehicles.get(id).is_some_and(|g| {
            endpoints.iter().all(|e| {
                g.disabled.contains_key(e.as_str())
                    && g.reasons.get(e.as_str()).is_some_and(|why| {
                        let why = why.to_ascii_lowercase();
                        ["compatibility", "permission", "plan_locked", "not granted"]
                            .iter()
                            .any(|p| why.starts_with(p))
                    })
            })
        })
    }

    /// Forgets the vehicle's wait and backoff (`carpulse vehicles enable`: the operator says
    /// ask again now).
    pub fn clear_wait(&mut self, id: &VehicleId) {
        if let Some(g) = self.vehicles.get_mut(id) {
            g.not_before = 0;
            g.failures = 0;
        }
    }

    /// Whether every one of `endpoints` is disabled for the vehicle: then nothing is polled
    /// at all, which `/healthz` reports (a pause has its own state and reason).
    pub fn all_blocked(&self, id: &VehicleId, endpoints: &[Endpoint]) -> bool {
        self.vehicles.get(id).is_some_and(|g| {
            endpoints
                .iter()
                .all(|e| g.disabled.contains_key(e.as_str()))
        })
    }

    /// When the vehicle may be called again, if it has to wait.
    pub fn not_before(&self, id: &VehicleId) -> Option<UnixMillis> {
        self.vehicles
            .get(id)
            .map(|g| g.not_before)
            .filter(|t| *t > 0)
    }

    /// A new consent (reconnect) lifts disabled endpoints and a pause. A `retry-after` or a
    /// backoff still running stays: the car and Smartcar's limits did not change with it.
    pub fn reset(&mut self, id: &VehicleId) {
        if let Some(g) = self.vehicles.get_mut(id) {
            if !g.disabled.is_empty() || !g.reasons.is_empty() || g.paused.is_some() {
                self.changes += 1;
            }
            g.disabled.clear();
            g.reasons.clear();
            g.paused = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ErrorKind, code: Option<&str>, retry_after: Option<u64>) -> ApiError {
        ApiError {
            kind,
            status: None,
            error_type: None,
            code: code.map(str::to_owned),
            description: None,
            retry_after: retry_after.map(Duration::from_secs),
            request_id: None,
        }
    }

    const JOB: [Endpoint; 2] = [Endpoint::Battery, Endpoint::Charge];

    #[test]
    fn changes_count_what_describe_answers_and_not_the_same_blocks_adopted_again() {
        let mut g = Gates::default();
        let (a, b) = (VehicleId("a".into()), VehicleId("b".into()));
        let t = 1_000_000;
        let blocks: HashMap<VehicleId, Vec<(BlockScope, String)>> = [(
            a.clone(),
            vec![(BlockScope::Endpoint("charge".into()), "PERMISSION".into())],
        )]
        .into();
        g.adopt_blocks(&blocks, t);
        let after_first = g.changes();
        assert!(after_first > 0, "a new block is a change");
        // A reload every minute adopts the same rows: nothing moved.
        g.adopt_blocks(&blocks, t + 60_000);
        g.adopt_blocks(&blocks, t + 120_000);
        assert_eq!(g.changes(), after_first);
        // Waits and backoffs are not what /healthz reads.
        g.failed(
            &b,
            Endpoint::Battery,
            &err(ErrorKind::Server, None, None),
            t,
            0.0,
        );
        g.succeeded(&b);
        assert_eq!(g.changes(), after_first);
        // A pause is; so is lifting it.
        g.failed(
            &b,
            Endpoint::Battery,
            &err(ErrorKind::Billing, None, None),
            t,
            0.0,
        );
        let paused = g.changes();
        assert!(paused > after_first);
        g.reset(&b);
        assert!(g.changes() > paused);
        let reset = g.changes();
        g.reset(&b);
        assert_eq!(g.changes(), reset, "nothing left to lift");
        // The store no longer holds the block (`vehicles enable`): a change.
        g.adopt_blocks(&HashMap::new(), t + 180_000);
        assert!(g.changes() > reset);
        assert_eq!(g.describe(&a), (vec![], None));
    }

    #[test]
    fn the_store_is_the_truth_except_for_blocks_set_just_before_its_read() {
        let mut g = Gates::default();
        let (a, b) = (VehicleId("a".into()), VehicleId("b".into()));
        let t = 1_000_000;
        g.failed(
            &a,
            Endpoint::Charge,
            &err(ErrorKind::Permission, None, None),
            t,
            0.0,
        );
        g.failed(
            &b,
            Endpoint::Battery,
            &err(ErrorKind::Billing, None, None),
            t,
            0.0,
        );
        // A snapshot read the same instant lacks both rows (still queued): both are kept.
        g.adopt_blocks(&HashMap::new(), t + 500);
        assert_eq!(g.admit(&a, &JOB, t + 500), Ok(vec![Endpoint::Battery]));
        assert_eq!(g.admit(&b, &JOB, t + 500), Err(Skip::Paused));
        // A minute on, the store lacks them because they were lifted: both go.
        g.adopt_blocks(&HashMap::new(), t + 60_000);
        assert_eq!(g.admit(&a, &JOB, t + 60_000), Ok(JOB.to_vec()));
        assert_eq!(g.admit(&b, &JOB, t + 60_000), Ok(JOB.to_vec()));
        // Stored rows are adopted, and dropped once the store drops them.
        let stored = HashMap::from([(
            a.clone(),
            vec![(BlockScope::Vehicle, "BILLING".to_string())],
        )]);
        g.adopt_blocks(&stored, t + 61_000);
        assert_eq!(g.admit(&a, &JOB, t + 61_000), Err(Skip::Paused));
        assert_eq!(g.describe(&a).1.as_deref(), Some("BILLING"));
        g.adopt_blocks(&HashMap::new(), t + 62_000);
        assert_eq!(g.admit(&a, &JOB, t + 62_000), Ok(JOB.to_vec()));
    }

    #[test]
    fn retry_after_is_honoured_to_the_millisecond() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let r = g.failed(
            &v,
            Endpoint::Battery,
            &err(ErrorKind::RateLimitVehicle, Some("VEHICLE"), Some(120)),
            1_000,
            0.0,
        );
        assert_eq!(r, Reaction::WaitUntil(121_000));
        assert_eq!(g.admit(&v, &JOB, 120_999), Err(Skip::Waiting));
        assert_eq!(g.admit(&v, &JOB, 121_000), Ok(JOB.to_vec()));
        // Another vehicle is untouched.
        assert!(g.admit(&VehicleId("w".into()), &JOB, 2_000).is_ok());
    }

    #[test]
    fn server_errors_back_off_exponentially_and_success_resets() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let e = err(ErrorKind::Server, Some("INTERNAL"), None);
        g.failed(&v, Endpoint::Battery, &e, 0, 0.0);
        assert_eq!(g.admit(&v, &JOB, 59_999), Err(Skip::Waiting));
        assert!(g.admit(&v, &JOB, 60_000).is_ok());
        g.failed(&v, Endpoint::Battery, &e, 60_000, 0.0);
        assert_eq!(g.admit(&v, &JOB, 60_000 + 119_999), Err(Skip::Waiting));
        assert!(g.admit(&v, &JOB, 180_000).is_ok());
        g.succeeded(&v);
        g.failed(&v, Endpoint::Battery, &e, 200_000, 0.0);
        assert!(g.admit(&v, &JOB, 260_000).is_ok(), "back to the first step");
        assert_eq!(backoff(40, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(1, 1.0), BACKOFF_BASE.mul_f64(1.2));
        let upstream = err(ErrorKind::Upstream, Some("RATE_LIMIT"), None);
        g.failed(&v, Endpoint::Battery, &upstream, 300_000, 0.0);
        assert_eq!(
            g.admit(&v, &JOB, 300_000 + 30 * 60_000 - 1),
            Err(Skip::Waiting)
        );
    }

    #[test]
    fn every_wait_is_capped_at_a_day() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let now = 1_000_000;
        let day = MAX_WAIT.as_millis() as i64;
        let far = err(ErrorKind::RateLimitVehicle, None, Some(u64::MAX / 4_000));
        assert_eq!(
            g.failed(&v, Endpoint::Battery, &far, now, 0.0),
            Reaction::WaitUntil(now + day)
        );
        assert_eq!(g.not_before(&v), Some(now + day));
        let mut no_data = err(ErrorKind::NoData, None, None);
        no_data.retry_after = Some(Duration::from_secs(400 * 86_400));
        assert_eq!(reaction(&no_data, now), Reaction::WaitUntil(now + day));
        // A stored `until` in year 9999 is corrected when loaded.
        let w = VehicleId("w".into());
        g.adopt_waits(&HashMap::from([(w.clone(), 253_402_300_799_000)]), now);
        assert_eq!(g.not_before(&w), Some(now + day));
        assert!(g.admit(&w, &JOB, now + day).is_ok());
        // The store no longer holds it (`vehicles enable`): forgotten at the next adoption.
        g.adopt_waits(&HashMap::new(), now + 1);
        assert!(g.admit(&w, &JOB, now + 1).is_ok());
        // A wait this process set just before the read is kept (its row is on its way).
        g.failed(&v, Endpoint::Battery, &far, now + 2, 0.0);
        g.adopt_waits(&HashMap::new(), now + 3);
        assert_eq!(g.admit(&v, &JOB, now + 3), Err(Skip::Waiting));
        g.clear_wait(&v);
        assert!(g.admit(&v, &JOB, now + 3).is_ok());
    }

    #[test]
    fn a_decode_error_is_next_tick_not_a_backoff() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let bad = ApiError::bad_value(Some(200), "signal x: value outside 0-100 %");
        let r = g.failed(&v, Endpoint::Battery, &bad, 0, 0.0);
        assert_eq!(r, Reaction::NextTick);
        assert!(g.admit(&v, &JOB, 1).is_ok());
        // An answer that could not be read at all is the server's trouble: backoff.
        let r = g.failed(
            &v,
            Endpoint::Battery,
            &err(ErrorKind::Decode, None, None),
            0,
            0.0,
        );
        assert!(matches!(r, Reaction::BackOff { .. }));
        g.succeeded(&v);
        g.clear_wait(&v);
        let r = g.failed(
            &v,
            Endpoint::Battery,
            &err(ErrorKind::TooLarge, None, None),
            0,
            0.0,
        );
        assert!(matches!(r, Reaction::BackOff { .. }));
        assert_eq!(g.admit(&v, &JOB, 1), Err(Skip::Waiting));
    }

    #[test]
    fn all_blocked_means_every_endpoint() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let all = [
            Endpoint::Battery,
            Endpoint::Charge,
            Endpoint::Info,
            Endpoint::Vin,
            Endpoint::Odometer,
        ];
        assert!(!g.all_blocked(&v, &all));
        for e in all {
            g.failed(&v, e, &err(ErrorKind::Permission, None, None), 0, 0.0);
        }
        assert!(g.all_blocked(&v, &all));
        assert!(g.not_capable(&v, &[Endpoint::Battery, Endpoint::Charge]));
        g.reset(&v);
        assert!(!g.all_blocked(&v, &all));
        // A typed 404 on battery is no fact about the car: not an "ICE car".
        let mut nf = err(ErrorKind::NotFound, Some("PATH"), None);
        nf.error_type = Some("RESOURCE_NOT_FOUND".into());
        g.failed(&v, Endpoint::Battery, &nf, 0, 0.0);
        g.failed(
            &v,
            Endpoint::Charge,
            &err(ErrorKind::Compatibility, None, None),
            0,
            0.0,
        );
        assert!(!g.not_capable(&v, &[Endpoint::Battery, Endpoint::Charge]));
        // Stored discovery reasons count as facts.
        let stored = HashMap::from([(
            v.clone(),
            vec![
                (
                    BlockScope::Endpoint("battery".into()),
                    "not granted: read_battery".to_string(),
                ),
                (
                    BlockScope::Endpoint("charge".into()),
                    "COMPATIBILITY:VEHICLE_NOT_CAPABLE".to_string(),
                ),
            ],
        )]);
        g.adopt_blocks(&stored, 10_000);
        assert!(g.not_capable(&v, &[Endpoint::Battery, Endpoint::Charge]));
    }

    #[test]
    fn a_sleeping_car_is_asked_again_next_tick() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let r = g.failed(
            &v,
            Endpoint::Battery,
            &err(ErrorKind::VehicleState, Some("ASLEEP"), None),
            0,
            0.0,
        );
        assert_eq!(r, Reaction::NextTick);
        assert!(g.admit(&v, &JOB, 0).is_ok());
    }

    #[test]
    fn a_stored_block_of_an_endpoint_this_build_does_not_know_is_kept_and_shown() {
        // Names read from the store are not necessarily an `Endpoint`: kept as written.
        assert_eq!(Endpoint::parse("tires"), None);
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let blocks: HashMap<VehicleId, Vec<(BlockScope, String)>> = [(
            v.clone(),
            vec![
                (BlockScope::Endpoint("tires".into()), "PERMISSION".into()),
                (BlockScope::Endpoint("charge".into()), "PERMISSION".into()),
            ],
        )]
        .into();
        g.adopt_blocks(&blocks, 1_000);
        assert_eq!(g.describe(&v).0, vec!["charge", "tires"]);
        assert_eq!(g.admit(&v, &JOB, 1_000), Ok(vec![Endpoint::Battery]));
        assert!(!g.all_blocked(&v, &JOB));
    }

    #[test]
    fn permission_and_compatibility_disable_only_that_endpoint() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        g.failed(
            &v,
            Endpoint::Charge,
            &err(ErrorKind::Compatibility, Some("VEHICLE_NOT_CAPABLE"), None),
            0,
            0.0,
        );
        assert_eq!(g.admit(&v, &JOB, 0), Ok(vec![Endpoint::Battery]));
        g.failed(
            &v,
            Endpoint::Battery,
            &err(ErrorKind::Permission, None, None),
            0,
            0.0,
        );
        assert_eq!(g.admit(&v, &JOB, 0), Err(Skip::Disabled));
        assert_eq!(
            g.admit(&v, &[Endpoint::Odometer], 0),
            Ok(vec![Endpoint::Odometer])
        );
        assert_eq!(g.describe(&v).0, vec!["battery", "charge"]);
        g.reset(&v);
        assert!(g.admit(&v, &JOB, 0).is_ok());
    }

    #[test]
    fn billing_pauses_and_the_app_limit_throttles_everyone() {
        let mut g = Gates::default();
        let v = VehicleId("v".into());
        let mut billing = err(ErrorKind::Billing, Some("VEHICLE_REQUEST_LIMIT"), None);
        billing.error_type = Some("BILLING".into());
        g.failed(&v, Endpoint::Battery, &billing, 0, 0.0);
        assert_eq!(g.admit(&v, &JOB, i64::MAX / 2), Err(Skip::Paused));
        assert_eq!(
            g.describe(&v).1.as_deref(),
            Some("BILLING:VEHICLE_REQUEST_LIMIT")
        );

        let w = VehicleId("w".into());
        g.failed(
            &w,
            Endpoint::Battery,
            &err(ErrorKind::RateLimitApp, Some("SMARTCAR_API"), None),
            0,
            0.0,
        );
        assert_eq!(
            g.admit(&VehicleId("x".into()), &JOB, 1_000),
            Err(Skip::AppThrottled)
        );
        assert!(g.admit(&VehicleId("x".into()), &JOB, 60_000).is_ok());
    }
}

/// Calls made per vehicle in the current calendar month (UTC), against a monthly budget.
#[derive(Debug, Default)]
pub struct Ledger {
    budget: Option<u64>,
    month: (i32, u32),
    /// The month's first millisecond and the next month's: every admit, spend and look-up
    /// asks whether the month turned, two comparisons instead of a calendar conversion.
    span: (UnixMillis, UnixMillis),
    /// Each vehicle's account, Fx-hashed: looked up at every admission and settlement (see
    /// [`crate::hash`]). One map, not one per fact: at 10,000 vehicles each look-up is a
    /// cache miss or two (the table, the key's text), and a poll made five.
    accounts: FxHashMap<VehicleId, Account>,
    /// Bumped at every change of a count: the health check sets the billed-calls gauges
    /// again only when it moved.
    changes: u64,
}

/// One vehicle's calls this month and what each of its jobs last cost.
#[derive(Debug, Default)]
struct Account {
    used: u64,
    /// The billed calls of the vehicle's latest poll, per job (a job's label, or
    /// `capabilities`), in place: a vehicle has two or three.
    last: [Option<(&'static str, u64)>; LAST_JOBS],
}

/// Jobs whose last cost an account keeps (battery, info, capabilities, one to spare); a
/// further job takes the last place.
const LAST_JOBS: usize = 4;

impl Account {
    fn used(used: u64) -> Account {
        Account {
            used,
            ..Default::default()
        }
    }

    fn last_cost(&self, job: &'static str) -> u64 {
        self.last
            .iter()
            .flatten()
            .find(|(j, _)| *j == job)
            .map_or(0, |(_, n)| *n)
    }

    fn set_last(&mut self, job: &'static str, billed: u64) {
        let i = self
            .last
            .iter()
            .position(|l| l.is_none_or(|(j, _)| j == job))
            .unwrap_or(LAST_JOBS - 1);
        self.last[i] = Some((job, billed));
    }
}

/// (year, month) of a unix-ms time, UTC.
pub fn month_of(at: UnixMillis) -> (i32, u32) {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_millis(at).unwrap_or_default();
    (t.year(), t.month())
}

/// The first millisecond of the month `at` falls in, UTC.
pub fn month_start(at: UnixMillis) -> UnixMillis {
    let (y, m) = month_of(at);
    first_of(y, m).unwrap_or(0)
}

fn first_of(y: i32, m: u32) -> Option<UnixMillis> {
    chrono::NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// The month `at` falls in, UTC, as its first millisecond and the next month's (an empty
/// span where the calendar ends, so every time is outside it and asks again).
fn month_span(at: UnixMillis) -> (UnixMillis, UnixMillis) {
    let (y, m) = month_of(at);
    let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    match (first_of(y, m), first_of(next.0, next.1)) {
        (Some(start), Some(end)) => (start, end),
        _ => (0, 0),
    }
}

impl Ledger {
    /// A ledger for `budget` (None: unlimited), seeded with this month's calls so far.
    pub fn new(budget: Option<u64>, used: HashMap<VehicleId, u64>, now: UnixMillis) -> Ledger {
        Ledger {
            budget,
            month: month_of(now),
            span: month_span(now),
            accounts: used
                .into_iter()
                .map(|(id, n)| (id, Account::used(n)))
                .collect(),
            changes: 0,
        }
    }

    /// A count that moves at every change of what [`Ledger::used`] answers (but for the month
    /// turning, which a reader checks itself).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    fn in_month(&self, now: UnixMillis) -> bool {
        now >= self.span.0 && now < self.span.1
    }

    fn roll(&mut self, now: UnixMillis) {
        if self.in_month(now) {
            return;
        }
        self.span = month_span(now);
        let m = month_of(now);
        if m != self.month {
            self.month = m;
            for a in self.accounts.values_mut() {
                a.used = 0;
            }
            self.changes += 1;
        }
    }

    /// Whether `cost` more calls fit this month's budget.
    pub fn allows(&mut self, id: &VehicleId, cost: u64, now: UnixMillis) -> bool {
        self.roll(now);
        match self.budget {
            None => true,
            Some(b) => self.accounts.get(id).map_or(0, |a| a.used) + cost <= b,
        }
    }

    /// Admission's one step: charges `floor` calls, or what `job` last cost when more, if that
    /// fits the budget; `None` (nothing charged) when it does not. What `last_cost`, `allows`
    /// and `spend` do in turn, with one look-up of the vehicle per table (every poll does it).
    pub fn charge(
        &mut self,
        id: &VehicleId,
        job: &'static str,
        floor: u64,
        now: UnixMillis,
    ) -> Option<u64> {
        self.spend_with(id, now, |a| floor.max(a.map_or(0, |a| a.last_cost(job))))
    }

    /// Spends `cost` calls if they fit this month's budget (what `allows` then `spend` do, with
    /// one look-up); false, and nothing spent, when they do not.
    pub fn try_spend(&mut self, id: &VehicleId, cost: u64, now: UnixMillis) -> bool {
        self.spend_with(id, now, |_| cost).is_some()
    }

    /// Spends what `cost` says for the vehicle's account (none yet: `None`) if it fits this
    /// month's budget, with one look-up; returns it, or `None` and nothing spent.
    fn spend_with(
        &mut self,
        id: &VehicleId,
        now: UnixMillis,
        cost: impl FnOnce(Option<&Account>) -> u64,
    ) -> Option<u64> {
        self.roll(now);
        let budget = self.budget;
        let fits = |used: u64, cost: u64| budget.is_none_or(|b| used + cost <= b);
        let cost = match self.accounts.get_mut(id) {
            Some(a) => {
                let cost = cost(Some(a));
                if !fits(a.used, cost) {
                    return None;
                }
                a.used += cost;
                cost
            }
            None => {
                let cost = cost(None);
                if !fits(0, cost) {
                    return None;
                }
                self.accounts.insert(id.clone(), Account::used(cost));
                cost
            }
        };
        self.changes += 1;
        Some(cost)
    }

    pub fn spend(&mut self, id: &VehicleId, cost: u64, now: UnixMillis) {
        self.roll(now);
        // The key is cloned only the first time: every poll spends and settles.
        match self.accounts.get_mut(id) {
            Some(a) => a.used += cost,
            None => {
                self.accounts.insert(id.clone(), Account::used(cost));
            }
        }
        self.changes += 1;
    }

    pub fn set_budget(&mut self, budget: Option<u64>) {
        self.budget = budget;
    }

    /// Sets the budget and takes this month's calls as the store counts them, keeping any
    /// vehicle's higher count here (polls in flight are charged here but not yet stored).
    pub fn seed(&mut self, budget: Option<u64>, counted: HashMap<VehicleId, u64>, now: UnixMillis) {
        self.roll(now);
        self.budget = budget;
        self.changes += 1;
        for (id, n) in counted {
            let a = self.accounts.entry(id).or_default();
            a.used = a.used.max(n);
        }
    }

    /// Replaces what admission `charged` with what the calls were `billed` (0: none reached
    /// Smartcar, e.g. no token or shutdown), and remembers a job's real cost, so the next
    /// admission of it is charged that much.
    pub fn settle(&mut self, id: &VehicleId, job: Option<&'static str>, charged: u64, billed: u64) {
        let a = match self.accounts.get_mut(id) {
            Some(a) => {
                a.used = a.used.saturating_sub(charged) + billed;
                a
            }
            None => self
                .accounts
                .entry(id.clone())
                .or_insert_with(|| Account::used(billed)),
        };
        self.changes += 1;
        if let (Some(job), true) = (job, billed > 0) {
            a.set_last(job, billed);
        }
    }

    /// What `job` last cost this vehicle (0: not known yet).
    pub fn last_cost(&self, id: &VehicleId, job: &'static str) -> u64 {
        self.accounts.get(id).map_or(0, |a| a.last_cost(job))
    }

    /// Calls this vehicle made in the month `now` falls in. Asked for a month the ledger has
    /// not rolled into yet (no vehicle was admitted since the 1st), that is 0: the count kept
    /// belongs to the month before, whether or not this vehicle is polled again.
    pub fn used(&self, id: &VehicleId, now: UnixMillis) -> u64 {
        if !self.in_month(now) && month_of(now) != self.month {
            return 0;
        }
        self.accounts.get(id).map_or(0, |a| a.used)
    }
}

#[cfg(test)]
mod ledger_tests {
    use super::*;

    const NOV_29: UnixMillis = 1_795_910_400_000; // 2026-11-29T00:00:00Z

    #[test]
    fn the_budget_stops_short_and_a_new_month_starts_over() {
        let v = VehicleId("v".into());
        let mut l = Ledger::new(Some(5), HashMap::from([(v.clone(), 3)]), NOV_29);
        assert!(l.allows(&v, 2, NOV_29));
        l.spend(&v, 2, NOV_29);
        assert!(!l.allows(&v, 1, NOV_29), "5 of 5 used");
        assert!(l.allows(&VehicleId("w".into()), 5, NOV_29));
        let december = NOV_29 + 3 * 86_400_000;
        assert!(l.allows(&v, 5, december), "a new month, a new budget");
        assert_eq!(l.used(&v, december), 0);
        assert!(Ledger::new(None, HashMap::new(), NOV_29).allows(&v, u64::MAX / 2, NOV_29));
    }

    #[test]
    fn an_account_keeps_each_jobs_last_cost_and_a_new_month_keeps_them() {
        let v = VehicleId("v".into());
        let mut l = Ledger::new(None, HashMap::new(), NOV_29);
        for (job, cost) in [
            ("battery", 2),
            ("info", 1),
            ("capabilities", 5),
            ("battery", 3),
        ] {
            l.settle(&v, Some(job), 0, cost);
        }
        assert_eq!(l.last_cost(&v, "battery"), 3, "the latest, not the first");
        assert_eq!(l.last_cost(&v, "info"), 1);
        assert_eq!(l.last_cost(&v, "capabilities"), 5);
        assert_eq!(l.last_cost(&v, "charging"), 0, "never settled");
        assert_eq!(l.used(&v, NOV_29), 11);
        // More jobs than places: the newest takes the last place, the first ones stay.
        l.settle(&v, Some("charging"), 0, 4);
        l.settle(&v, Some("other"), 0, 6);
        assert_eq!(l.last_cost(&v, "battery"), 3);
        assert_eq!(l.last_cost(&v, "other"), 6);
        // December: the count starts over, what a job costs does not.
        let december = NOV_29 + 3 * 86_400_000;
        assert_eq!(l.charge(&v, "battery", 1, december), Some(3));
        assert_eq!(l.used(&v, december), 3);
    }

    #[test]
    fn charge_takes_the_jobs_last_cost_and_stops_at_the_budget() {
        let (v, w) = (VehicleId("v".into()), VehicleId("w".into()));
        let mut l = Ledger::new(Some(6), HashMap::from([(v.clone(), 1)]), NOV_29);
        assert_eq!(l.charge(&v, "battery", 1, NOV_29), Some(1));
        // The job cost 3 last time: admission charges that, not the floor.
        l.settle(&v, Some("battery"), 1, 3);
        assert_eq!(l.used(&v, NOV_29), 4);
        assert_eq!(l.charge(&v, "battery", 1, NOV_29), None, "4 + 3 > 6");
        assert_eq!(l.used(&v, NOV_29), 4, "a refusal charges nothing");
        assert_eq!(
            l.charge(&v, "info", 2, NOV_29),
            Some(2),
            "another job: its floor"
        );
        assert_eq!(l.used(&v, NOV_29), 6);
        // A vehicle the ledger has not seen: charged from 0, refused past the budget alone.
        assert_eq!(l.charge(&w, "battery", 7, NOV_29), None);
        assert_eq!(l.used(&w, NOV_29), 0);
        assert_eq!(l.charge(&w, "battery", 6, NOV_29), Some(6));
        let december = NOV_29 + 3 * 86_400_000;
        assert_eq!(l.charge(&v, "battery", 1, december), Some(3), "a new month");
        assert_eq!(l.used(&v, december), 3);
        let mut free = Ledger::new(None, HashMap::new(), NOV_29);
        assert_eq!(
            free.charge(&v, "battery", u64::MAX / 2, NOV_29),
            Some(u64::MAX / 2)
        );
    }

    /// 2026-12-01T00:00:00Z: the first millisecond of December.
    const DEC_1: UnixMillis = 1_796_083_200_000;

    #[test]
    fn the_month_rolls_over_for_vehicles_not_polled_since_the_1st() {
        let (v, w) = (VehicleId("v".into()), VehicleId("w".into()));
        let last_of_november = DEC_1 - 1;
        let mut l = Ledger::new(Some(10), HashMap::from([(w.clone(), 4)]), NOV_29);
        assert!(l.allows(&v, 6, last_of_november));
        l.spend(&v, 6, last_of_november);
        assert_eq!(l.used(&v, last_of_november), 6);
        assert_eq!(l.used(&w, last_of_november), 4);
        // Nobody has been polled in December yet: what November spent is not December's.
        assert_eq!(
            l.used(&v, DEC_1),
            0,
            "v at the first millisecond of December"
        );
        assert_eq!(l.used(&w, DEC_1), 0, "w, not polled since November");
        assert_eq!(l.used(&w, DEC_1 + 20 * 86_400_000), 0);
        // Another vehicle's poll rolls the ledger; w, still not polled, stays at 0, and v's
        // full budget is there again.
        let x = VehicleId("x".into());
        assert!(l.allows(&x, 1, DEC_1 + 1));
        l.spend(&x, 1, DEC_1 + 1);
        assert_eq!(l.used(&x, DEC_1 + 1), 1);
        assert_eq!(l.used(&w, DEC_1 + 1), 0);
        assert!(l.allows(&v, 10, DEC_1 + 2));
        // Asked about the month before after the roll, nothing is invented either.
        assert_eq!(l.used(&x, last_of_november), 0);
    }

    #[test]
    fn month_boundaries_are_utc() {
        assert_eq!(month_span(NOV_29), (1_793_491_200_000, DEC_1));
        assert_eq!(month_span(DEC_1).0, DEC_1);
        assert_eq!(month_span(DEC_1 - 1).1, DEC_1);
        assert_eq!(month_of(DEC_1 - 1), (2026, 11));
        assert_eq!(month_of(DEC_1), (2026, 12));
        assert_eq!(month_start(DEC_1 + 5), DEC_1);
        assert_eq!(month_of(NOV_29), (2026, 11));
        assert_eq!(month_start(NOV_29), 1_793_491_200_000); // 2026-11-01T00:00:00Z
    }
}
