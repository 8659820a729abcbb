//! Poll now (`carpulse poll`): `POST /poll` on the metrics listener asks the running daemon to
//! poll some vehicles at once, through its gates and budget like any scheduled poll, and
//! answers with what each poll stored; the same [`poll_now`] serves `carpulse poll` in-process
//! when no daemon runs.
//!
//! The endpoint sits behind the listener's web config (TLS, basic auth) like `/metrics`. It
//! spends billed calls, so without basic auth only loopback peers may use it: a listener
//! opened to the network for scraping does not become a way to drain the budget.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::daemon::poller::{Poller, VehicleOutcome};
use crate::domain::{now_ms, ApiVersion, UnixMillis, VehicleId};
use crate::smartcar::Job;
use crate::store::Store;

/// The path of the poll-now endpoint.
pub const POLL_PATH: &str = "/poll";

/// What `carpulse poll` asks for: vehicles by Smartcar id (empty: every vehicle the daemon
/// polls) and jobs by name (`battery`, `info`; empty: both).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PollRequest {
    #[serde(default)]
    pub vehicles: Vec<String>,
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// What one vehicle's poll of one job came to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PollResult {
    pub vehicle_id: String,
    pub job: String,
    /// `ok`, `failed` (an endpoint failed), `busy` (a scheduled poll of it was running),
    /// `skipped` (not called: see `reason`) or `not_polled` (the daemon does not poll it).
    pub outcome: String,
    pub reason: Option<String>,
    /// The `poll_events` rows this poll left: (endpoint, outcome, `TYPE:CODE` if an error).
    pub events: Vec<(String, String, Option<String>)>,
    /// The readings it stored, in words (`battery 81.0 % 312.4 km`), with their recorded_at.
    pub stored: Vec<(String, UnixMillis)>,
}

impl PollResult {
    /// Whether the poll did what was asked (an answered poll, even one that stored nothing
    /// new because the car reported nothing new).
    pub fn succeeded(&self) -> bool {
        self.outcome == "ok"
    }
}

/// The jobs a request names, in the order they run; in v3 the info job's listing carries
/// what the battery job reads, so asking both makes one call (as ticks due together do).
pub fn jobs_for(api: ApiVersion, names: &[String]) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for n in names {
        let Some(job) = Job::from_label(n) else {
            anyhow::bail!("unknown job {n:?}: battery or info");
        };
        if !jobs.contains(&job) {
            jobs.push(job);
        }
    }
    if jobs.is_empty() {
        jobs = Job::ALL.to_vec();
    }
    if api == ApiVersion::V3 && jobs.contains(&Job::Info) {
        jobs = vec![Job::Info];
    }
    Ok(jobs)
}

/// Polls what `req` names now and reads back from the store what each poll left. Vehicles
/// run concurrently (the poller's pool bounds the requests); one vehicle's jobs in order.
pub async fn poll_now(
    poller: &Arc<Poller>,
    store: &Store,
    api: ApiVersion,
    req: &PollRequest,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<PollResult>> {
    let jobs = jobs_for(api, &req.jobs)?;
    let polled = poller.vehicles();
    let ids: Vec<VehicleId> = if req.vehicles.is_empty() {
        polled.iter().map(|v| v.id.clone()).collect()
    } else {
        req.vehicles.iter().map(|v| VehicleId(v.clone())).collect()
    };
    let held = poller.held();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let (poller, jobs, cancel) = (poller.clone(), jobs.clone(), cancel.clone());
        let hold = held.iter().find(|(h, _)| h == &id).map(|(_, why)| *why);
        tasks.spawn(async move {
            let mut out = Vec::new();
            let mut last_end = UnixMillis::MIN;
            for job in jobs {
                // Disjoint windows even when one job ends and the next starts in the same ms.
                let started = now_ms().max(last_end.saturating_add(1));
                let outcome = poller.poll_one(&id, job, cancel.clone()).await;
                // The poll's rows carry times inside this window (a vehicle's next job
                // starts after it, so each job reports only its own rows).
                last_end = now_ms().max(started);
                out.push((id.clone(), job, (started, last_end), outcome));
            }
            (i, hold, out)
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        done.push(joined.context("a poll-now task ended abnormally")?);
    }
    done.sort_by_key(|(i, _, _)| *i);
    // What the polls queued is committed before it is read back.
    store.flush().await.context("flushing the polls' rows")?;
    let mut results = Vec::new();
    for (_, hold, polls) in done {
        for (id, job, window, outcome) in polls {
            let (outcome, reason) = match outcome {
                Some(VehicleOutcome::Ok(_)) => ("ok", None),
                Some(VehicleOutcome::Failed(_)) => ("failed", None),
                Some(VehicleOutcome::Busy) => (
                    "busy",
                    Some("a scheduled poll of this job is running; try again in a moment".into()),
                ),
                Some(VehicleOutcome::Skipped(why)) => ("skipped", Some(skip_words(why))),
                None => (
                    "not_polled",
                    Some(match hold {
                        Some(why) => format!("its connection is {why}"),
                        None => "not polled by the daemon: disabled (carpulse vehicles enable), or not loaded yet (systemctl reload carpulse)".to_owned(),
                    }),
                ),
            };
            let key = id.0.clone();
            let (events, stored) = store
                .call(move |c| what_was_stored(c, &key, window))
                .await
                .with_context(|| format!("reading back the poll of vehicle {id}"))?;
            results.push(PollResult {
                vehicle_id: id.0,
                job: job.label().to_owned(),
                outcome: outcome.to_owned(),
                reason,
                events,
                stored,
            });
        }
    }
    Ok(results)
}

/// A skip reason in words, with what lifts it.
fn skip_words(why: &str) -> String {
    match why {
        "budget" => "its calls this month would pass [budget] calls_per_vehicle_month".into(),
        "waiting" => "inside a retry-after or a backoff from an earlier answer (carpulse status says until when)".into(),
        "app_throttled" => "Smartcar throttles the whole application; every vehicle waits".into(),
        "paused" => "paused by an earlier answer (billing, the owner's account): carpulse status says why".into(),
        "disabled" => "every endpoint of this job is disabled for it (carpulse vehicles enable lifts that)".into(),
        other => format!("its connection is {other}"),
    }
}

type Stored = (
    Vec<(String, String, Option<String>)>,
    Vec<(String, UnixMillis)>,
);

/// The `poll_events` rows and readings a vehicle's poll left within `(from, to)` (ms, both
/// included).
fn what_was_stored(
    c: &rusqlite::Connection,
    vehicle: &str,
    (from, to): (UnixMillis, UnixMillis),
) -> anyhow::Result<Stored> {
    let mut events = Vec::new();
    let mut stmt = c.prepare(
        "SELECT endpoint, outcome, error_type, error_code FROM poll_events
         WHERE vehicle_id = ?1 AND at BETWEEN ?2 AND ?3 ORDER BY at, endpoint",
    )?;
    let rows = stmt.query_map(rusqlite::params![vehicle, from, to], |r| {
        let (t, code): (Option<String>, Option<String>) = (r.get(2)?, r.get(3)?);
        let cause = match (t, code) {
            (Some(t), Some(c)) => Some(format!("{t}:{c}")),
            (t, c) => t.or(c),
        };
        Ok((r.get(0)?, r.get(1)?, cause))
    })?;
    for row in rows {
        events.push(row?);
    }
    let mut stored = Vec::new();
    for sql in [
        "SELECT 'battery ' || printf('%.1f %%', soc_percent) || coalesce(printf(' %.1f km', range_km), ''), recorded_at
         FROM battery_history WHERE vehicle_id = ?1 AND fetched_at BETWEEN ?2 AND ?3",
        "SELECT 'charge ' || state || CASE plugged_in WHEN 1 THEN ' (plugged in)' ELSE ' (unplugged)' END, recorded_at
         FROM charge_history WHERE vehicle_id = ?1 AND fetched_at BETWEEN ?2 AND ?3",
        "SELECT 'odometer ' || printf('%.1f km', odometer_km), recorded_at
         FROM odometer_history WHERE vehicle_id = ?1 AND fetched_at BETWEEN ?2 AND ?3",
    ] {
        let mut stmt = c.prepare(sql)?;
        let rows = stmt.query_map(rusqlite::params![vehicle, from, to], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        for row in rows {
            stored.push(row?);
        }
    }
    Ok((events, stored))
}

/// One period of a cron line: the time between its next two runs (None: it never runs twice).
pub fn period(cron: &crate::config::Cron) -> Option<std::time::Duration> {
    cron.period_after(&chrono::Utc::now())
}

/// The vehicles each job should poll at start: those whose last reading of that job (battery
/// for `battery`, odometer for `info`) was fetched more than one `period` of the job before
/// `now`, or never. In v3 a vehicle due for both is polled by the info job alone (its listing
/// carries the battery). `last` is (vehicle, last battery fetch, last odometer fetch).
pub fn due_at_start(
    api: ApiVersion,
    last: &[(VehicleId, Option<UnixMillis>, Option<UnixMillis>)],
    periods: [Option<std::time::Duration>; 2],
    now: UnixMillis,
) -> [std::collections::HashSet<VehicleId>; 2] {
    let older = |at: Option<UnixMillis>, period: Option<std::time::Duration>| match period {
        None => false,
        Some(p) => at.is_none_or(|at| now - at > p.as_millis() as i64),
    };
    let mut due: [std::collections::HashSet<VehicleId>; 2] = Default::default();
    for (id, battery, odometer) in last {
        let info = older(*odometer, periods[1]);
        let battery = older(*battery, periods[0]) && !(api == ApiVersion::V3 && info);
        if battery {
            due[0].insert(id.clone());
        }
        if info {
            due[1].insert(id.clone());
        }
    }
    due
}

/// `carpulse run` at start: polls at once the vehicles whose last reading is older than one
/// period of its job (a daily schedule would otherwise leave a new or long-stopped vehicle
/// without data until its next run). Unspread, through the usual gates and budget.
pub async fn catch_up(
    poller: Arc<Poller>,
    store: Store,
    metrics: crate::daemon::metrics::Metrics,
    api: ApiVersion,
    schedule: crate::config::ScheduleConfig,
    cancel: CancellationToken,
) {
    let periods = [period(&schedule.battery), period(&schedule.info)];
    let Some(due) = due_now(&poller, &store, &metrics, api, periods).await else {
        return;
    };
    for (job, ids) in [Job::Battery, Job::Info].into_iter().zip(due) {
        if ids.is_empty() || cancel.is_cancelled() {
            continue;
        }
        tracing::info!(
            job = job.label(),
            vehicles = ids.len(),
            "polling now the vehicles whose last reading is older than one period of the schedule"
        );
        poller.cycle_now(job, &ids, cancel.clone()).await;
    }
}

/// The start's due sets, built in a function of its own so that what they are built from
/// (every vehicle's summary and last fetch times, ~360 bytes a vehicle) is freed before the
/// catch-up's cycles run: held across them, at 10,000 vehicles it was 3.6 MiB (the in-place
/// `collect` of `last` keeps the summaries' allocation) on top of the start's 1,024 requests
/// in flight, the daemon's peak (heaptrack, BENCHMARKS.md). `None` when the store cannot say.
async fn due_now(
    poller: &Poller,
    store: &Store,
    metrics: &crate::daemon::metrics::Metrics,
    api: ApiVersion,
    periods: [Option<std::time::Duration>; 2],
) -> Option<[std::collections::HashSet<VehicleId>; 2]> {
    let polled: std::collections::HashSet<VehicleId> =
        poller.vehicles().into_iter().map(|v| v.id).collect();
    let summaries = match store
        .call(|c| crate::store::queries::vehicle_summaries(c))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot read the last readings; the first polls come with the schedule"
            );
            return None;
        }
    };
    // The per-vehicle gauges start from these same summaries (the daemon's load leaves them
    // to the catch-up: one read of every vehicle's summary at start, not two).
    metrics.seed_from(&summaries);
    let last: Vec<_> = summaries
        .into_iter()
        .filter(|s| polled.contains(&s.vehicle.vehicle_id))
        .map(|s| {
            (
                s.vehicle.vehicle_id,
                s.last_battery.map(|b| b.stamp.fetched_at),
                s.last_odometer.map(|o| o.stamp.fetched_at),
            )
        })
        .collect();
    Some(due_at_start(api, &last, periods, now_ms()))
}

/// The peer's address, for the loopback rule (axum's `ConnectInfo`, for plain and TLS
/// listeners alike).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::daemon::webconfig::TlsListener>,
    > for Peer
{
    fn connect_info(
        s: axum::serve::IncomingStream<'_, crate::daemon::webconfig::TlsListener>,
    ) -> Self {
        Peer(*s.remote_addr())
    }
}

/// Behind the metrics listener's connection cap ([`crate::daemon::metrics::Guarded`]).
impl<L>
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::daemon::metrics::Guarded<L>>,
    > for Peer
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    fn connect_info(
        s: axum::serve::IncomingStream<'_, crate::daemon::metrics::Guarded<L>>,
    ) -> Self {
        Peer(*s.remote_addr())
    }
}

#[derive(Clone)]
struct ControlState {
    poller: Arc<Poller>,
    store: Store,
    api: ApiVersion,
    /// Requests passed basic auth before they got here (the web config's layer).
    authenticated: bool,
    shutdown: CancellationToken,
}

/// The `POST /poll` route; [`crate::daemon::metrics::serve_with`] puts it behind the web
/// config. A poll in flight is abandoned when the daemon stops.
pub fn router(
    poller: Arc<Poller>,
    store: Store,
    api: ApiVersion,
    authenticated: bool,
    shutdown: CancellationToken,
) -> Router {
    Router::new()
        .route(POLL_PATH, post(poll_handler))
        .with_state(ControlState {
            poller,
            store,
            api,
            authenticated,
            shutdown,
        })
}

/// Who may ask for polls: anyone who passed basic auth, else only this host (loopback; an
/// IPv4-mapped IPv6 loopback address too).
fn admitted(authenticated: bool, peer: std::net::IpAddr) -> bool {
    authenticated || peer.to_canonical().is_loopback()
}

async fn poll_handler(
    State(s): State<ControlState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<PollRequest>,
) -> axum::response::Response {
    if !admitted(s.authenticated, peer.0.ip()) {
        tracing::warn!(peer = %peer.0, "POST /poll refused: not from loopback and no basic auth configured");
        return (
            StatusCode::FORBIDDEN,
            "POST /poll is for loopback, or for users of metrics.web_config_file's basic auth\n",
        )
            .into_response();
    }
    if let Err(e) = jobs_for(s.api, &req.jobs) {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    tracing::info!(vehicles = req.vehicles.len(), jobs = ?req.jobs, peer = %peer.0, "poll now requested");
    match poll_now(&s.poller, &s.store, s.api, &req, s.shutdown.clone()).await {
        Ok(results) => Json(results).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vehicle_is_due_at_start_when_its_last_reading_is_older_than_a_period() {
        let hour = std::time::Duration::from_secs(3600);
        let day = hour * 24;
        let now = 10 * 86_400_000;
        let h = 3_600_000;
        let (fresh, stale, never) = (
            VehicleId("fresh".into()),
            VehicleId("stale".into()),
            VehicleId("never".into()),
        );
        let last = vec![
            (fresh.clone(), Some(now - h / 2), Some(now - 20 * h)),
            (stale.clone(), Some(now - 2 * h), Some(now - 30 * h)),
            (never.clone(), None, None),
        ];
        let [battery, info] = due_at_start(ApiVersion::V2, &last, [Some(hour), Some(day)], now);
        assert_eq!(
            battery,
            [stale.clone(), never.clone()].into_iter().collect()
        );
        assert_eq!(info, [stale.clone(), never.clone()].into_iter().collect());
        // v3: one listing (the info job's) carries the battery too.
        let [battery, info] = due_at_start(ApiVersion::V3, &last, [Some(hour), Some(day)], now);
        assert!(battery.is_empty(), "{battery:?}");
        assert_eq!(info.len(), 2);
        // Exactly one period old is not older than a period.
        let edge = vec![(fresh.clone(), Some(now - h), Some(now))];
        let [battery, _] = due_at_start(ApiVersion::V2, &edge, [Some(hour), Some(day)], now);
        assert!(battery.is_empty());
    }

    #[test]
    fn a_period_is_the_gap_between_two_runs() {
        let day = std::time::Duration::from_secs(86_400);
        let period = |c: &str| period(&crate::config::Cron::parse(c).unwrap());
        assert_eq!(period("0 0 4 * * *"), Some(day));
        assert_eq!(
            period("0 */15 * * * *"),
            Some(std::time::Duration::from_secs(900))
        );
    }

    #[test]
    fn without_basic_auth_only_loopback_may_ask_for_polls() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for local in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(admitted(false, ip(local)), "{local}");
        }
        for remote in ["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7", "0.0.0.0"] {
            assert!(!admitted(false, ip(remote)), "{remote}");
            assert!(admitted(true, ip(remote)), "{remote} with basic auth");
        }
    }

    #[test]
    fn jobs_default_to_both_and_v3_reads_them_in_one_listing() {
        let both: Vec<String> = vec![];
        assert_eq!(
            jobs_for(ApiVersion::V2, &both).unwrap(),
            [Job::Battery, Job::Info]
        );
        assert_eq!(jobs_for(ApiVersion::V3, &both).unwrap(), [Job::Info]);
        let battery = vec!["battery".to_string()];
        assert_eq!(jobs_for(ApiVersion::V3, &battery).unwrap(), [Job::Battery]);
        assert!(jobs_for(ApiVersion::V2, &["odometer".to_string()]).is_err());
    }
}
