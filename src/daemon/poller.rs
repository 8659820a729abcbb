//! A tick becomes one poll cycle: every enabled vehicle of a live connection is polled on a
//! bounded pool (`poll.concurrency`), each request bounded by `poll.timeout`. One vehicle's
//! failure is logged, counted and recorded in `poll_events`, never fatal, and a slow vehicle
//! holds one slot of the pool, never the cycle: a vehicle still busy from an earlier tick is
//! skipped rather than queued twice. Every poll starts with the [`Fleet`] table's admit and
//! ends with its settle (through a ticket); between them, [`Poller::outcome`] turns the
//! answer into store items and what the table learns from it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::daemon::fleet::{job_index, Fleet, GateStep, Refusal, Settlement};
use crate::daemon::gate::{Ledger, Reaction};
use crate::daemon::metrics::Metrics;
use crate::daemon::tokens::{Access, TokenError, TokenManager};
use crate::domain::{
    now_ms, ApiVersion, BlockScope, ConnectionId, PollEvent, Reading, UnixMillis, VehicleId,
};
use crate::smartcar::error::{ApiError, ErrorKind};
use crate::smartcar::{
    Capabilities, Endpoint, EndpointResult, Job, Payload, RequestCtx, SmartcarClient,
};
use crate::store::{Store, WriteItem};

/// Polls one runtime thread completes a millisecond at most (the daemon's CPU per poll is
/// ~0.1 ms; see BENCHMARKS.md): what [`Poller::useful_workers`] sizes the pool by.
const POLLS_PER_MS: usize = 10;

/// Due times inside a spread window are rounded up to a grain, so polls due within it start
/// together: the runtime wakes once for several and their answers share an `epoll` wait,
/// instead of one wake-up per poll. A wake-up's cost is fixed, so the grain follows the rate:
/// long enough that about this many polls share one (fleet bench, 2,000 v2 vehicles: ~8 polls
/// a grain cost 104-108 µs of CPU per poll, ~40 cost 58-62 µs; see BENCHMARKS.md).
const POLLS_PER_GRAIN: u32 = 32;

/// The shortest grain (a large fleet's polls already share it).
const MIN_GRAIN: Duration = Duration::from_millis(10);

/// The longest grain: a poll starts at most this much after its spread offset, and a tick
/// keeps at least [`GRAINS_PER_WINDOW`] start times, so it stays spread (Smartcar's
/// app-wide limit is a bucket refilled per minute; a second's grain does not burst it).
const MAX_GRAIN: Duration = Duration::from_secs(1);

/// See [`MAX_GRAIN`].
const GRAINS_PER_WINDOW: u32 = 8;

/// How often a cycle checks whether its next vehicle is overdue (and adds workers).
const GROW_CHECK: Duration = Duration::from_millis(250);

/// When a poll counts as late: a quarter of the spread window after its vehicle's due time,
/// at least a second (a busy moment at the server is not a reason to grow the pool).
fn late_after(spread: Duration) -> Duration {
    (spread / 4).max(Duration::from_secs(1))
}

/// When a cycle adds workers: its next vehicle is this overdue. Tighter than [`late_after`]
/// (which only marks the cycle late for the next one's sizing): at a quarter of a 60 s window
/// a tick at 3-8 s latency grew 15 s too late and ended ~7 s past its window (fleet bench).
fn grow_after(spread: Duration) -> Duration {
    late_after(spread).min(Duration::from_secs(2))
}

/// Workers a tick of `due` vehicles over `spread` needs at `latency_ms` per poll: the due rate
/// times the latency (Little's law), with a quarter to spare; 0 for a burst (`spread` zero,
/// sized by [`Poller::useful_workers`] instead).
pub(crate) fn workers_needed(due: usize, spread: Duration, latency_ms: f64) -> usize {
    let spread_ms = spread.as_secs_f64() * 1e3;
    if spread_ms <= 0.0 {
        return 0;
    }
    // A float cast saturates: absurd inputs give usize::MAX, clamped by the caller.
    (due as f64 * latency_ms / spread_ms * 1.25).ceil() as usize
}

/// A vehicle the poller polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolledVehicle {
    pub id: VehicleId,
    pub connection: ConnectionId,
}

/// Why a capability discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// What one cycle came to, for the log line and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub vehicles: usize,
    /// Vehicles whose every endpoint answered.
    pub ok: usize,
    /// Vehicles with at least one failed endpoint (or no token).
    pub failed: usize,
    /// Vehicles skipped because their previous poll of this job was still running.
    pub busy: usize,
    /// Vehicles not called: paused, inside retry-after or a backoff, or nothing left enabled.
    pub skipped: usize,
    /// Readings handed to the store's writer.
    pub readings: usize,
}

pub struct Poller {
    api: ApiVersion,
    client: SmartcarClient,
    tokens: Arc<TokenManager>,
    store: Store,
    metrics: Metrics,
    /// `poll.timeout` and `poll.concurrency` (the fewest workers a cycle gets); SIGHUP may
    /// change both.
    limits: Mutex<(Duration, usize)>,
    /// `poll.max_in_flight`: the pool's size, the most polls in flight at once.
    max_in_flight: usize,
    /// How long Smartcar has been taking to answer, in ms (an exponential average); the
    /// workers a cycle gets follow it. Starts at 5 s, inside Smartcar's documented 3–45 s.
    latency_ms: std::sync::atomic::AtomicU64,
    /// Per job: the workers its last cycle had and whether it fell behind (see `workers_for`).
    pacing: Mutex<[Option<(usize, bool)>; 2]>,
    pool: Arc<Semaphore>,
    /// Per job (battery, info): the window a tick's polls are spread over. Std mutexes
    /// here: held for a copy or an assignment, never across an await.
    spreads: Mutex<[Duration; 2]>,
    /// The polled vehicles and their state (busy, plugged in, freshness, gates, ledger):
    /// a poll starts with [`Fleet::admit`] and ends with [`Fleet::settle`].
    fleet: Fleet,
    /// Woken when a vehicle answers ACCESS_DENIED: its connection is checked against
    /// `/v3/connections` rather than its token refreshed (smartcar-api.md §10.4).
    connections_check: Arc<tokio::sync::Notify>,
    /// Enabled vehicles not polled because of their connection, with why (set at each reload).
    held: Mutex<Vec<(VehicleId, &'static str)>>,
    /// `schedule.no_data_every`, as ms (SIGHUP may change it).
    no_data_every_ms: std::sync::atomic::AtomicU64,
    /// Bumped when the held vehicles change; with the fleet table's counts (freshness and
    /// the vehicle set, the gates, the ledger) it is [`Poller::changes`], which lets the
    /// health check skip walking a fleet in which nothing moved.
    changes: std::sync::atomic::AtomicU64,
}

/// How fresh a vehicle's data is, for `/healthz` and `carpulse_reading_age_seconds`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Freshness {
    pub last_answered: Option<UnixMillis>,
    /// (signal, recorded_at) of the latest battery, charge and odometer readings.
    pub recorded: Vec<(&'static str, UnixMillis)>,
    /// Since when Smartcar has answered an empty signal listing (smartcar-api.md §10.5);
    /// cleared by the next listing with data.
    pub no_data_since: Option<UnixMillis>,
}

/// What polling one vehicle for one job came to (readings handed to the writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VehicleOutcome {
    Ok(usize),
    Failed(usize),
    /// Its previous poll of this job was still running.
    Busy,
    /// Not called, and why (the `reason` label of `carpulse_polls_skipped_total`).
    Skipped(&'static str),
}

impl CycleReport {
    fn add(&mut self, outcome: VehicleOutcome) {
        match outcome {
            VehicleOutcome::Ok(n) => {
                self.ok += 1;
                self.readings += n;
            }
            VehicleOutcome::Failed(n) => {
                self.failed += 1;
                self.readings += n;
            }
            VehicleOutcome::Busy => self.busy += 1,
            VehicleOutcome::Skipped(_) => self.skipped += 1,
        }
    }
}

impl Poller {
    pub fn new(
        api: ApiVersion,
        client: SmartcarClient,
        tokens: Arc<TokenManager>,
        store: Store,
        metrics: Metrics,
        poll: &crate::config::PollConfig,
    ) -> Arc<Self> {
        let (concurrency, max_in_flight, timeout) =
            (poll.concurrency, poll.max_in_flight, poll.timeout);
        Arc::new(Poller {
            api,
            client,
            tokens,
            store,
            metrics,
            limits: Mutex::new((timeout, concurrency.max(1))),
            max_in_flight: max_in_flight.max(concurrency).max(1),
            latency_ms: std::sync::atomic::AtomicU64::new(5_000),
            pacing: Mutex::new([None; 2]),
            pool: Arc::new(Semaphore::new(max_in_flight.max(concurrency).max(1))),
            spreads: Mutex::new([Duration::ZERO; 2]),
            fleet: Fleet::default(),
            connections_check: Arc::new(tokio::sync::Notify::new()),
            held: Mutex::new(Vec::new()),
            no_data_every_ms: std::sync::atomic::AtomicU64::new(
                crate::config::DEFAULT_NO_DATA_EVERY.as_millis() as u64,
            ),
            changes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves whenever what the health check reads here changes: freshness, the vehicle set,
    /// the held vehicles, the gates' blocks and pauses, the ledger's counts.
    pub fn changes(&self) -> (u64, u64, u64) {
        let own = self.changes.load(std::sync::atomic::Ordering::Relaxed);
        let (table, gates, ledger) = self.fleet.changes();
        // Both counts only grow: their sum moves whenever either does.
        (own.wrapping_add(table), gates, ledger)
    }

    /// Sets the vehicles held back by their connection (revoked, no user id, needs_reauth).
    pub fn set_held(&self, held: Vec<(VehicleId, &'static str)>) {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if *h != held {
            *h = held;
            self.changed();
        }
    }

    /// See [`Poller::set_held`].
    pub fn held(&self) -> Vec<(VehicleId, &'static str)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notified when a vehicle's connection should be checked (an ACCESS_DENIED answer).
    pub fn connections_check(&self) -> Arc<tokio::sync::Notify> {
        self.connections_check.clone()
    }

    /// `schedule.no_data_every`: how long a vehicle with an empty signal store waits.
    pub fn set_no_data_every(&self, every: Duration) {
        self.no_data_every_ms.store(
            every.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The vehicles to poll; those that stay keep their state (see [`Fleet::set_vehicles`]).
    pub fn set_vehicles(&self, vehicles: Vec<PolledVehicle>) {
        self.fleet.set_vehicles(vehicles);
    }

    /// Spreads the polls of one tick of `job` over `window`.
    pub fn set_spread(&self, job: Job, window: Duration) {
        self.spreads.lock().unwrap_or_else(|p| p.into_inner())[job_index(job)] = window;
    }

    fn spread(&self, job: Job) -> Duration {
        self.spreads.lock().unwrap_or_else(|p| p.into_inner())[job_index(job)]
    }

    pub fn vehicles(&self) -> Vec<PolledVehicle> {
        self.fleet.vehicles()
    }

    /// Polls every vehicle for `job` and waits for all of them. `cancel` abandons requests
    /// still in flight (shutdown); what was already fetched is still handed to the writer.
    pub async fn cycle(self: &Arc<Self>, job: Job, cancel: CancellationToken) -> CycleReport {
        let all = self.fleet.slotted(|_| true);
        self.cycle_of(job, all, self.spread(job), cancel).await
    }

    /// Polls the vehicles among `ids` for `job` now, unspread (the catch-up at start: their
    /// last reading is older than a period of the job, see [`crate::daemon::control`]).
    pub async fn cycle_now(
        self: &Arc<Self>,
        job: Job,
        ids: &HashSet<VehicleId>,
        cancel: CancellationToken,
    ) -> CycleReport {
        let due = self.fleet.slotted(|id| ids.contains(id));
        self.cycle_of(job, due, Duration::ZERO, cancel).await
    }

    /// The charging cadence: polls only vehicles that were plugged in at their last charge
    /// reading and were not answered within `min_gap` (the base cron may just have run).
    pub async fn cycle_plugged_in(
        self: &Arc<Self>,
        job: Job,
        min_gap: Duration,
        cancel: CancellationToken,
    ) -> CycleReport {
        let recent = now_ms() - min_gap.as_millis() as i64;
        let due = self.fleet.plugged_in(recent);
        self.cycle_of(job, due, self.spread(job), cancel).await
    }

    async fn cycle_of(
        self: &Arc<Self>,
        job: Job,
        vehicles: Vec<(usize, PolledVehicle)>,
        spread: Duration,
        cancel: CancellationToken,
    ) -> CycleReport {
        let started = Instant::now();
        // A time-ordered queue: each vehicle at its own fixed offset inside the spread window,
        // so a tick is not a burst (Smartcar's app-wide limit, the pool, the writer). Each
        // carries its slot in the fleet table, so admission finds its row without hashing.
        let grain = grain_for(vehicles.len(), spread);
        let mut queue: Vec<(Duration, usize, PolledVehicle)> = vehicles
            .into_iter()
            .map(|(slot, v)| (on_grain(offset_in(&v.id, spread), spread, grain), slot, v))
            .collect();
        queue.sort_by_key(|(offset, _, _)| *offset);
        let mut report = CycleReport {
            vehicles: queue.len(),
            ..Default::default()
        };
        // A bounded set of workers pulls from the queue: memory follows what is in flight,
        // not the fleet, and no task is spawned per vehicle per tick.
        let workers = self.workers_for(job, queue.len(), spread);
        let queue = Arc::new(queue);
        // The most any vehicle's poll started after its due time, in ms.
        let lateness = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(CycleReport::default()));
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let spawn_worker = |tasks: &mut tokio::task::JoinSet<()>| {
            let (me, queue, next, tally, cancel, lateness) = (
                self.clone(),
                queue.clone(),
                next.clone(),
                tally.clone(),
                cancel.clone(),
                lateness.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((offset, slot, v)) = queue.get(i) else { return };
                    let due = start + *offset;
                    let late = tokio::time::Instant::now().saturating_duration_since(due);
                    lateness.fetch_max(
                        late.as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let outcome = tokio::select! {
                        _ = tokio::time::sleep_until(due) => {
                            let span = tracing::info_span!("poll", vehicle = %v.id, job = job.label());
                            me.poll_vehicle(v, Some(*slot), job, cancel.clone()).instrument(span).await
                        }
                        _ = cancel.cancelled() => VehicleOutcome::Failed(0),
                    };
                    tally.lock().unwrap_or_else(|p| p.into_inner()).add(outcome);
                }
            });
        };
        let mut workers = workers;
        for _ in 0..workers {
            spawn_worker(&mut tasks);
        }
        // Within the cycle, the pool doubles (up to poll.max_in_flight) whenever the next
        // vehicle in the queue is overdue: slow answers are met within a second or two, and
        // fast ones never cost more workers than they need.
        let max = self.max_in_flight.min(queue.len().max(1));
        let mut check = tokio::time::interval(GROW_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Err(e)) => warn!(error = %e, "a poll worker ended abnormally"),
                    Some(Ok(())) => {}
                },
                _ = check.tick() => {
                    let i = next.load(std::sync::atomic::Ordering::Relaxed);
                    let overdue = queue.get(i).is_some_and(|(offset, _, _)| {
                        tokio::time::Instant::now().saturating_duration_since(start + *offset)
                            > grow_after(spread)
                    });
                    if overdue && workers < max.min(self.useful_workers()) {
                        let more = workers.min(max - workers);
                        for _ in 0..more {
                            spawn_worker(&mut tasks);
                        }
                        workers += more;
                        debug!(workers, "polls are falling behind; more workers");
                    }
                }
            }
        }
        let late_ms = lateness.load(std::sync::atomic::Ordering::Relaxed);
        let grown = workers;
        self.note_cycle(job, grown, spread, late_ms);
        let t = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.ok = t.ok;
        report.failed = t.failed
            + report
                .vehicles
                .saturating_sub(t.ok + t.failed + t.busy + t.skipped);
        report.busy = t.busy;
        report.skipped = t.skipped;
        report.readings = t.readings;
        info!(
            job = job.label(),
            vehicles = report.vehicles,
            ok = report.ok,
            failed = report.failed,
            busy = report.busy,
            skipped = report.skipped,
            readings = report.readings,
            workers,
            // The most any poll of the cycle started after its vehicle's due time.
            late_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "poll cycle done"
        );
        report
    }

    /// Polls one vehicle for `job` now, outside any cycle (`carpulse poll`): through the same
    /// gates, budget, pool and busy rule as a scheduled poll, with no spread delay. `None`:
    /// the vehicle is not one this poller polls (unknown, disabled, or held by its connection).
    pub async fn poll_one(
        &self,
        id: &VehicleId,
        job: Job,
        cancel: CancellationToken,
    ) -> Option<VehicleOutcome> {
        let v = self.vehicles().into_iter().find(|v| &v.id == id)?;
        let span = tracing::info_span!("poll", vehicle = %v.id, job = job.label(), now = true);
        Some(
            self.poll_vehicle(&v, None, job, cancel)
                .instrument(span)
                .await,
        )
    }

    /// Workers a cycle of `due` vehicles starts with, between `poll.concurrency` and
    /// `poll.max_in_flight`: the more of two answers. One is history: the job's first cycle
    /// starts at `poll.concurrency`, later ones at what the last one ended with (it grows
    /// within a cycle that falls behind), half when that one ran late, a quarter fewer when it
    /// kept time, so the pool settles at the fewest that keep up. The other is the due rate
    /// times the latency seen so far ([`workers_needed`], at most [`Self::useful_workers`]),
    /// so a tick at seconds of latency does not start small and fall behind first. The
    /// latency estimate also tells when even `poll.max_in_flight` cannot keep up.
    fn workers_for(&self, job: Job, due: usize, spread: Duration) -> usize {
        let (_, concurrency) = *self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.max_in_flight.max(concurrency);
        let latency_ms = self
            .latency_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1) as f64;
        let work_ms = due as f64 * latency_ms;
        let window = (spread * 4).min(Duration::from_secs(60));
        if !window.is_zero() && work_ms / max as f64 > window.as_millis() as f64 {
            warn!(
                due,
                latency_ms,
                window_s = window.as_secs(),
                max_in_flight = max,
                "this tick cannot finish before the next one at the latency Smartcar answers with; raise poll.max_in_flight or slow the schedule"
            );
        }
        let last = self.pacing.lock().unwrap_or_else(|p| p.into_inner())[job_index(job)];
        let wanted = match last {
            // The first cycle starts small (unless the rate below needs more) and grows while
            // it falls behind (see cycle_of).
            None => concurrency,
            // It ran late (its latest poll a quarter of the spread past due); half of what it
            // grew to is where the next starts growing from.
            Some((workers, true)) => workers / 2,
            Some((workers, false)) => workers - workers / 4,
        };
        // What the due rate needs at the latency seen so far, from the start of the tick
        // rather than after it fell behind.
        let needed = workers_needed(due, spread, latency_ms).min(self.useful_workers());
        wanted.max(needed).clamp(concurrency, max).min(due.max(1))
    }

    /// The most workers that can help at the latency Smartcar answers with: one thread
    /// completes at most [`POLLS_PER_MS`] polls a millisecond, so past `latency × that` more
    /// requests in flight only queue (here or at the server) and cost a connection each. With
    /// Smartcar's 3-45 s that is never the bound (`poll.max_in_flight` is); against a server
    /// answering in a millisecond it keeps a tick due all at once from opening a thousand
    /// connections (the fleet benchmark's ceiling).
    fn useful_workers(&self) -> usize {
        let (_, concurrency) = *self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let latency_ms = self.latency_ms.load(std::sync::atomic::Ordering::Relaxed);
        (latency_ms as usize)
            .saturating_mul(POLLS_PER_MS)
            .max(concurrency)
    }

    /// Remembers how a cycle kept time: late when a poll started more than a quarter of the
    /// spread (at least a second) after its vehicle's due time.
    fn note_cycle(&self, job: Job, workers: usize, spread: Duration, late_ms: u64) {
        let late = late_ms > late_after(spread).as_millis() as u64;
        self.pacing.lock().unwrap_or_else(|p| p.into_inner())[job_index(job)] =
            Some((workers, late));
    }

    /// Folds one request's wall time into the latency estimate the worker count follows.
    fn note_latency(&self, elapsed: Duration) {
        let ms = elapsed.as_millis().min(u128::from(u32::MAX)) as u64;
        let old = self.latency_ms.load(std::sync::atomic::Ordering::Relaxed);
        // An exponential average (1/8 weight) that a single slow answer does not swing.
        let new = (old * 7 + ms) / 8;
        self.latency_ms
            .store(new.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// One poll of one vehicle: admitted by the fleet table (the only way a poll starts),
    /// fetched within a pool slot, its answer turned into store items by [`Poller::outcome`]
    /// and settled in the table (the only way it ends). `slot`: the vehicle's row in the
    /// table, when the caller knows it.
    async fn poll_vehicle(
        &self,
        v: &PolledVehicle,
        slot: Option<usize>,
        job: Job,
        cancel: CancellationToken,
    ) -> VehicleOutcome {
        // Asked before taking a pool slot: a vehicle that must not be called costs nothing.
        let (ticket, allowed) = match self.fleet.admit(&v.id, slot, job, self.api, now_ms()) {
            Ok(admitted) => admitted,
            Err(Refusal::Busy) => {
                debug!("still busy with the previous poll; skipped");
                return VehicleOutcome::Busy;
            }
            Err(Refusal::Gone) => {
                debug!("no longer polled (a reload removed it); skipped");
                return VehicleOutcome::Skipped("removed");
            }
            Err(Refusal::Skip(skip)) => {
                debug!(reason = skip.label(), "not polled");
                self.metrics
                    .polls_skipped
                    .with_label_values(&[job.label(), skip.label()])
                    .inc();
                return VehicleOutcome::Skipped(skip.label());
            }
        };
        // From here on every way out settles, abandons or drops the ticket, so the vehicle is
        // never left busy (a panic or a cancelled task drops it: freed and refunded).
        // The permit bounds concurrent requests; closed only if the poller is dropped.
        let Ok(_permit) = self.pool.clone().acquire_owned().await else {
            return VehicleOutcome::Failed(0);
        };
        if cancel.is_cancelled() {
            return VehicleOutcome::Failed(0);
        }
        let started = Instant::now();
        // Boxed once here rather than copied through the select and the poll's own future.
        let fetch = Box::pin(crate::smartcar::count_billed(
            self.fetch_with_auth_retry(v, job, &allowed),
        ));
        let (results, billed) = tokio::select! {
            out = fetch => out,
            _ = cancel.cancelled() => {
                debug!("abandoned at shutdown");
                ticket.abandon();
                return VehicleOutcome::Failed(0);
            }
        };
        self.note_latency(started.elapsed());
        let at = answered_at(results.as_ref().map(Vec::as_slice).unwrap_or(&[]));
        let polled = self.outcome(v, job, &allowed, results, at);
        let Polled {
            mut items,
            mut settlement,
            failed,
            readings,
            waited,
            skipped,
        } = polled;
        // Charged on admission at the estimate; what the poll really cost counts (a v3
        // listing of several pages, nothing when no token was at hand).
        settlement.billed = billed;
        let settled = self.fleet.settle(ticket, settlement);
        if let Some(reason) = skipped {
            return VehicleOutcome::Skipped(reason);
        }
        self.keep_wait(v, at, waited, settled.not_before, &mut items);
        bill_events(&mut items, billed);
        self.write(items).await;
        if failed {
            VehicleOutcome::Failed(readings)
        } else {
            VehicleOutcome::Ok(readings)
        }
    }

    /// Every polled vehicle's freshness (vehicles never answered have a default entry).
    pub fn freshness(&self) -> Vec<(VehicleId, Freshness)> {
        self.fleet.freshness()
    }

    fn no_data_every(&self) -> Duration {
        Duration::from_millis(
            self.no_data_every_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn timeout(&self) -> Duration {
        self.limits.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// New `poll.timeout` and `poll.concurrency` (SIGHUP); the next cycle uses them.
    pub fn set_limits(&self, timeout: Duration, concurrency: usize) {
        self.client.set_timeout(timeout);
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = (timeout, concurrency.max(1));
    }

    /// A new `[budget] calls_per_vehicle_month` (SIGHUP); what was spent this month stays.
    pub fn set_budget(&self, budget: Option<u64>) {
        self.fleet.set_budget(budget);
    }

    /// Sets the monthly call budget, with this month's calls so far.
    pub fn set_ledger(&self, ledger: Ledger) {
        self.fleet.set_ledger(ledger);
    }

    /// See [`Ledger::seed`].
    pub fn seed_ledger(&self, budget: Option<u64>, counted: HashMap<VehicleId, u64>) {
        self.fleet.seed_ledger(budget, counted, now_ms());
    }

    /// Every polled vehicle as the health check reads it (one lock for the fleet).
    pub fn vehicle_views(&self) -> Vec<crate::daemon::fleet::VehicleView> {
        self.fleet.views()
    }

    /// Calls each of `ids` made this month, as the ledger counts them (one lock).
    pub fn calls_of(&self, ids: Vec<VehicleId>) -> Vec<(VehicleId, u64)> {
        self.fleet.calls_of(ids, now_ms())
    }

    /// Calls this vehicle made this month, as the ledger counts them.
    pub fn calls_this_month(&self, id: &VehicleId) -> u64 {
        self.fleet.calls_this_month(id, now_ms())
    }

    /// Adopts the store's blocked endpoints and pauses (see [`crate::daemon::gate::Gates::adopt_blocks`]).
    pub fn adopt_blocks(
        &self,
        blocks: &HashMap<VehicleId, Vec<(BlockScope, String)>>,
        waits: &HashMap<VehicleId, UnixMillis>,
        read_at: UnixMillis,
    ) {
        self.fleet.adopt_blocks(blocks, waits, read_at);
    }

    /// A new consent lifts what the old one could not give (disabled endpoints, a pause).
    pub fn reset_gate(&self, id: &VehicleId) {
        self.fleet.reset_gate(id);
    }

    /// Whether every endpoint of `job` is blocked for the vehicle (its polls are skipped).
    pub fn job_blocked(&self, id: &VehicleId, job: Job) -> bool {
        self.fleet.all_blocked(id, job.endpoints())
    }

    /// Whether nothing at all is polled for the vehicle: every endpoint of every job
    /// disabled (`/healthz` names it).
    pub fn all_blocked(&self, id: &VehicleId) -> bool {
        self.fleet.all_blocked(id, &Job::EVERY_ENDPOINT)
    }

    /// Whether every endpoint of `job` is disabled because the car or its consent cannot give
    /// it (see [`crate::daemon::gate::Gates::not_capable`]): an ICE car's battery job.
    pub fn job_not_capable(&self, id: &VehicleId, job: Job) -> bool {
        self.fleet.not_capable(id, job.endpoints())
    }

    /// Disabled endpoints and pause reason of a vehicle, for status output and tests.
    pub fn gate_of(&self, id: &VehicleId) -> (Vec<String>, Option<String>) {
        self.fleet.gate_of(id)
    }

    /// The outcome step: turns a poll's answer into store items and metrics, and into what
    /// the fleet table learns from it at settlement (gate steps in order, freshness, plugged
    /// in). It reads the table only when a v3 listing carries another job's reading (is that
    /// endpoint disabled?); everything else it decides from the answer alone.
    fn outcome(
        &self,
        v: &PolledVehicle,
        job: Job,
        allowed: &[Endpoint],
        results: Result<Vec<EndpointResult>, Failure>,
        at: UnixMillis,
    ) -> Polled {
        let mut p = Polled {
            items: Vec::new(),
            settlement: Settlement {
                at,
                ..Default::default()
            },
            failed: false,
            readings: 0,
            waited: None,
            skipped: None,
        };
        match results {
            // Known before any call: not a poll but a skip, until the reload drops the vehicle
            // (the refusal that caused it was recorded as token_error).
            Err(Failure::Token(
                e @ (TokenError::NeedsReauth(_) | TokenError::Revoked(_) | TokenError::NoUserId(_)),
            )) => {
                let reason = match e {
                    TokenError::Revoked(_) => "revoked",
                    TokenError::NoUserId(_) => "no_user_id",
                    _ => "needs_reauth",
                };
                debug!(reason, "not polled");
                self.metrics
                    .polls_skipped
                    .with_label_values(&[job.label(), reason])
                    .inc();
                if self.metrics.per_vehicle() {
                    self.metrics
                        .vehicle_up
                        .with_label_values(&[v.id.0.as_str()])
                        .set(0.0);
                }
                p.skipped = Some(reason);
                return p;
            }
            Err(Failure::Token(e)) => {
                p.failed = true;
                warn!(error = %e, "no access token; vehicle not polled");
                for &endpoint in job.endpoints() {
                    self.count(endpoint, "token_error");
                    p.items.push(WriteItem::Event(event(
                        v,
                        at,
                        endpoint,
                        "token_error",
                        None,
                    )));
                }
            }
            Err(Failure::Api(mut e)) => {
                p.failed = true;
                match e.kind {
                    ErrorKind::NoData => {
                        e.retry_after = Some(self.no_data_every());
                        p.settlement.no_data_at = Some(at);
                    }
                    ErrorKind::AccessDenied => self.connections_check.notify_one(),
                    _ => {}
                }
                let reaction = crate::daemon::gate::reaction(&e, at);
                if is_wait(&reaction) {
                    p.waited = Some(crate::daemon::gate::cause(&e));
                }
                p.settlement.gate.push(GateStep::Failed {
                    endpoint: allowed[0],
                    error: e.clone(),
                    jitter: rand::random(),
                });
                if reaction == Reaction::DisableEndpoint {
                    for &endpoint in &allowed[1..] {
                        p.settlement.gate.push(GateStep::Failed {
                            endpoint,
                            error: e.clone(),
                            jitter: 0.0,
                        });
                    }
                }
                warn!(error = %e, ?reaction, "request failed");
                for &endpoint in allowed {
                    self.failed(v, at, endpoint, &e, &mut p.items);
                }
            }
            Ok(results) => {
                let mut delayed = false;
                // The vehicle's disabled endpoints, read once and only when needed.
                let mut disabled: Option<Vec<String>> = None;
                for EndpointResult { endpoint, result } in results {
                    // What was disabled is not stored or counted, even when a combined answer
                    // (v3 signals, a v2 batch) still carries it.
                    if !allowed.contains(&endpoint) {
                        // A v3 listing carries other jobs' readings too: paid for, so kept
                        // (when not disabled); their failures are left to their own job.
                        if let Ok(payload) = result {
                            let off = disabled.get_or_insert_with(|| self.fleet.gate_of(&v.id).0);
                            if !off.iter().any(|d| d == endpoint.as_str()) {
                                self.record(v, at, endpoint, "ok", None, &mut p.items);
                                p.readings +=
                                    self.apply(v, payload, &mut p.items, &mut p.settlement.plugged);
                            }
                        }
                        continue;
                    }
                    match result {
                        Ok(payload) => {
                            p.settlement.gate.push(GateStep::Succeeded);
                            self.record(v, at, endpoint, "ok", None, &mut p.items);
                            p.readings +=
                                self.apply(v, payload, &mut p.items, &mut p.settlement.plugged);
                        }
                        Err(e) => {
                            p.failed = true;
                            // One answer, one step of backoff: two endpoints failing together
                            // (battery and charge of one request) must not double the wait.
                            let reaction = crate::daemon::gate::reaction(&e, at);
                            let timed = matches!(
                                reaction,
                                Reaction::BackOff { .. }
                                    | Reaction::WaitUntil(_)
                                    | Reaction::ThrottleApp
                            );
                            if is_wait(&reaction) {
                                p.waited = Some(crate::daemon::gate::cause(&e));
                            }
                            warn!(endpoint = endpoint.as_str(), error = %e, ?reaction, "endpoint failed");
                            self.failed(v, at, endpoint, &e, &mut p.items);
                            if !(timed && delayed) {
                                delayed |= timed;
                                p.settlement.gate.push(GateStep::Failed {
                                    endpoint,
                                    error: e,
                                    jitter: rand::random(),
                                });
                            }
                        }
                    }
                }
            }
        }
        let answered = p
            .items
            .iter()
            .any(|i| matches!(i, WriteItem::Event(e) if e.outcome == "ok"));
        if answered {
            let recorded: Vec<(&'static str, UnixMillis)> = p
                .items
                .iter()
                .filter_map(|i| match i {
                    WriteItem::Reading(_, r) => Some((r.table(), r.stamp().recorded_at)),
                    _ => None,
                })
                .collect();
            p.settlement.answered = Some((at, recorded));
        }
        if self.metrics.per_vehicle() {
            self.metrics
                .vehicle_up
                .with_label_values(&[v.id.0.as_str()])
                .set(if answered { 1.0 } else { 0.0 });
        }
        p
    }

    /// Queues the vehicle's wait (`retry-after`, backoff) for the store when `waited` says this
    /// answer caused one, so a restart does not call early; `not_before` is the gate's, as
    /// settlement left it.
    fn keep_wait(
        &self,
        v: &PolledVehicle,
        at: UnixMillis,
        waited: Option<String>,
        not_before: Option<UnixMillis>,
        items: &mut Vec<WriteItem>,
    ) {
        let Some(reason) = waited else { return };
        if let Some(until) = not_before.filter(|u| *u > at) {
            items.push(WriteItem::Wait {
                vehicle_id: v.id.clone(),
                until,
                reason,
                at,
            });
        }
    }

    /// Counts one endpoint's outcome and queues its `poll_events` row.
    fn record(
        &self,
        v: &PolledVehicle,
        at: i64,
        endpoint: Endpoint,
        outcome: &'static str,
        e: Option<&ApiError>,
        items: &mut Vec<WriteItem>,
    ) {
        self.count(endpoint, outcome);
        items.push(WriteItem::Event(event(v, at, endpoint, outcome, e)));
    }

    /// Counts a failed endpoint and queues its `poll_events` row, and the block it causes
    /// (a disabled endpoint, a paused vehicle) so a restart does not ask again. A v3 signal
    /// merely missing from a listing is not kept: a sleeping car may list less.
    fn failed(
        &self,
        v: &PolledVehicle,
        at: i64,
        endpoint: Endpoint,
        e: &ApiError,
        items: &mut Vec<WriteItem>,
    ) {
        self.record(v, at, endpoint, e.kind.label(), Some(e), items);
        let blocked = match crate::daemon::gate::reaction(e, at) {
            Reaction::DisableEndpoint if e.code.as_deref() != Some("SIGNAL_NOT_PROVIDED") => {
                BlockScope::Endpoint(endpoint.as_str().to_owned())
            }
            Reaction::Pause => BlockScope::Vehicle,
            _ => return,
        };
        let known = items
            .iter()
            .any(|i| matches!(i, WriteItem::Block { scope, .. } if *scope == blocked));
        if !known {
            items.push(WriteItem::Block {
                vehicle_id: v.id.clone(),
                scope: blocked,
                reason: crate::daemon::gate::cause(e),
                at,
            });
        }
    }

    /// One endpoint's result (requests and their durations are counted where they are made:
    /// [`SmartcarClient::observe_requests`]).
    fn count(&self, endpoint: Endpoint, outcome: &str) {
        self.metrics.endpoint(endpoint, outcome);
    }

    /// Turns a payload into store items and gauges; returns the number of readings.
    /// `plugged` takes a charge reading's plugged-in state, for settlement.
    fn apply(
        &self,
        v: &PolledVehicle,
        payload: Payload,
        items: &mut Vec<WriteItem>,
        plugged: &mut Option<bool>,
    ) -> usize {
        let id = &v.id;
        match payload {
            Payload::Battery(r) => {
                self.metrics.record_battery(id, &r);
                debug!(
                    soc_percent = r.soc_percent,
                    range_km = r.range_km,
                    recorded_at = r.stamp.recorded_at,
                    "battery"
                );
                items.push(WriteItem::Reading(id.clone(), Reading::Battery(r)));
                1
            }
            Payload::Charge(r) => {
                *plugged = Some(r.plugged_in || r.state == crate::domain::ChargeState::Charging);
                self.metrics.record_charge(id, &r);
                debug!(
                    plugged_in = r.plugged_in,
                    state = r.state.as_str(),
                    "charge"
                );
                items.push(WriteItem::Reading(id.clone(), Reading::Charge(r)));
                1
            }
            Payload::Odometer(r) => {
                self.metrics.record_odometer(id, &r);
                debug!(odometer_km = r.odometer_km, "odometer");
                items.push(WriteItem::Reading(id.clone(), Reading::Odometer(r)));
                1
            }
            Payload::Info(info) => {
                self.metrics.record_info(id, &info);
                items.push(WriteItem::Info(id.clone(), info));
                0
            }
            Payload::Vin(vin) => {
                // The VIN is stored, never logged or used as a label.
                items.push(WriteItem::Vin(id.clone(), vin));
                0
            }
        }
    }

    /// Hands items to the writer; if the store is gone, the readings among them are counted
    /// as dropped (nothing is lost silently).
    async fn write(&self, items: Vec<WriteItem>) {
        if items.is_empty() {
            return;
        }
        let tables: Vec<&'static str> = items
            .iter()
            .filter_map(|i| match i {
                WriteItem::Reading(_, r) => Some(r.table()),
                WriteItem::Event(_) => Some("poll_events"),
                _ => None,
            })
            .collect();
        if let Err(e) = self.store.write(items).await {
            warn!(
                error = format!("{e:#}"),
                rows = tables.len(),
                "the store refused the rows; counted as dropped"
            );
            for t in tables {
                self.metrics.rows_dropped.with_label_values(&[t]).inc();
            }
        }
    }

    /// One request for the job; on 401 AUTHENTICATION, one refresh and one retry (DESIGN §2.2).
    /// Reads what the vehicle cannot answer ([`SmartcarClient::unavailable`]), with the
    /// poll's token handling (one refresh and retry on a 401), timeout, pool slot and budget
    /// (one call). `Ok(None)`: not asked now (gate, budget or shutdown).
    pub async fn discover(
        &self,
        v: &PolledVehicle,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<(Endpoint, String)>>, DiscoveryError> {
        let Some(ticket) = self.fleet.admit_discovery(&v.id, now_ms()) else {
            return Ok(None);
        };
        // Dropped on the way out unsettled: the reserved call is refunded.
        let Ok(_permit) = self.pool.clone().acquire_owned().await else {
            return Ok(None);
        };
        let ask = async {
            let access = self.tokens.access(v.connection).await?;
            let first = self.unavailable_once(v, &access).await;
            match first {
                Err(e) if e.kind == ErrorKind::Authentication => {
                    let fresh = self
                        .tokens
                        .refresh_after_401(v.connection, &access.token)
                        .await?;
                    Ok(self.unavailable_once(v, &fresh).await?)
                }
                other => Ok(other?),
            }
        };
        let (r, billed): (Result<Capabilities, DiscoveryError>, u64) = tokio::select! {
            out = crate::smartcar::count_billed(ask) => out,
            _ = cancel.cancelled() => {
                ticket.abandon();
                return Ok(None);
            }
        };
        let at = answered_at(r.as_ref().map(|c| c.readings.as_slice()).unwrap_or(&[]));
        let mut settlement = Settlement {
            at,
            billed,
            ..Default::default()
        };
        let r = r.map_err(|e| match e {
            DiscoveryError::Api(mut e) => {
                match e.kind {
                    ErrorKind::NoData => {
                        e.retry_after = Some(self.no_data_every());
                        settlement.no_data_at = Some(at);
                    }
                    ErrorKind::AccessDenied => self.connections_check.notify_one(),
                    _ => {}
                }
                DiscoveryError::Api(e)
            }
            other => other,
        });
        // Recorded and gated like a poll: an outcome in poll_events and polls_total, a
        // retry-after or backoff honoured, a billing pause kept.
        let mut items = Vec::new();
        let mut waited = None;
        match &r {
            Ok(caps) => {
                self.record(v, at, Endpoint::Capabilities, "ok", None, &mut items);
                // A v3 listing's readings were paid for: stored like a poll's.
                let blocked: Vec<Endpoint> = caps.unavailable.iter().map(|(e, _)| *e).collect();
                let disabled = self.gate_of(&v.id).0;
                let mut readings = Vec::new();
                for r in &caps.readings {
                    if let Ok(payload) = &r.result {
                        if !blocked.contains(&r.endpoint)
                            && !disabled.iter().any(|d| d == r.endpoint.as_str())
                        {
                            self.record(v, at, r.endpoint, "ok", None, &mut items);
                            self.apply(v, payload.clone(), &mut items, &mut settlement.plugged);
                            if let Payload::Battery(b) = payload {
                                readings.push(("battery", b.stamp.recorded_at));
                            }
                        }
                    }
                }
                settlement.answered = Some((at, readings));
            }
            // This server or vehicle has no such reading (404, 403, 501, ...): recorded, not
            // blocked; discovery notes the try and asks again when due.
            Err(DiscoveryError::Api(e))
                if crate::daemon::gate::reaction(e, at) == Reaction::DisableEndpoint =>
            {
                self.record(
                    v,
                    at,
                    Endpoint::Capabilities,
                    e.kind.label(),
                    Some(e),
                    &mut items,
                );
            }
            Err(DiscoveryError::Api(e)) => {
                let reaction = crate::daemon::gate::reaction(e, at);
                settlement.gate.push(GateStep::Failed {
                    endpoint: Endpoint::Capabilities,
                    error: e.clone(),
                    jitter: rand::random(),
                });
                self.failed(v, at, Endpoint::Capabilities, e, &mut items);
                if is_wait(&reaction) {
                    waited = Some(crate::daemon::gate::cause(e));
                }
            }
            Err(DiscoveryError::Token(
                TokenError::NeedsReauth(_) | TokenError::Revoked(_) | TokenError::NoUserId(_),
            )) => {}
            Err(DiscoveryError::Token(_)) => {
                self.record(
                    v,
                    at,
                    Endpoint::Capabilities,
                    "token_error",
                    None,
                    &mut items,
                );
            }
        }
        let settled = self.fleet.settle(ticket, settlement);
        self.keep_wait(v, at, waited, settled.not_before, &mut items);
        bill_events(&mut items, billed);
        self.write(items).await;
        r.map(|caps| Some(caps.unavailable))
    }

    async fn unavailable_once(
        &self,
        v: &PolledVehicle,
        access: &Access,
    ) -> Result<Capabilities, ApiError> {
        let ctx = RequestCtx {
            access_token: &access.token,
            user_id: access.user_id.as_deref(),
        };
        let ask = self.client.capabilities(self.api, &ctx, &v.id);
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                ErrorKind::Timeout,
                format!("no answer within {} s (poll.timeout)", timeout.as_secs()),
            )),
        }
    }

    async fn fetch_with_auth_retry(
        &self,
        v: &PolledVehicle,
        job: Job,
        only: &[Endpoint],
    ) -> Result<Vec<EndpointResult>, Failure> {
        let access = self
            .tokens
            .access(v.connection)
            .await
            .map_err(Failure::Token)?;
        match self.fetch_once(v, job, only, &access).await {
            Err(e) if e.kind == ErrorKind::Authentication => {
                info!("401 from Smartcar; refreshing the token once and retrying");
                let fresh = self
                    .tokens
                    .refresh_after_401(v.connection, &access.token)
                    .await
                    .map_err(Failure::Token)?;
                self.fetch_once(v, job, only, &fresh)
                    .await
                    .map_err(Failure::Api)
            }
            other => other.map_err(Failure::Api),
        }
    }

    async fn fetch_once(
        &self,
        v: &PolledVehicle,
        job: Job,
        only: &[Endpoint],
        access: &Access,
    ) -> Result<Vec<EndpointResult>, ApiError> {
        let ctx = RequestCtx {
            access_token: &access.token,
            user_id: access.user_id.as_deref(),
        };
        let fetch = self.client.fetch_only(self.api, &ctx, &v.id, job, only);
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(ApiError {
                kind: ErrorKind::Timeout,
                status: None,
                error_type: None,
                code: None,
                description: Some(format!(
                    "no answer within {} s (poll.timeout)",
                    timeout.as_secs()
                )),
                retry_after: None,
                request_id: None,
            }),
        }
    }
}

/// A reaction that makes the vehicle wait (its own retry-after or backoff, not the app's).
fn is_wait(r: &Reaction) -> bool {
    matches!(r, Reaction::BackOff { .. } | Reaction::WaitUntil(_))
}

/// Puts a poll's billed calls on its first event row (0 on the others), so summing `calls`
/// over `poll_events` gives what was billed.
fn bill_events(items: &mut [WriteItem], billed: u64) {
    let mut first = true;
    for item in items.iter_mut() {
        if let WriteItem::Event(ev) = item {
            ev.calls = Some(if first { billed } else { 0 });
            first = false;
        }
    }
}

/// A vehicle's fixed offset in `window`: from a hash of its id, so it is the same every tick
/// (an even cadence per vehicle) and different between vehicles.
pub fn offset_in(id: &VehicleId, window: Duration) -> Duration {
    let ms = window.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: stable across runs and builds, unlike std's randomly seeded hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.0.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_millis(h % ms)
}

/// The grain `due` polls spread over `window` start on: about [`POLLS_PER_GRAIN`] a grain,
/// between [`MIN_GRAIN`] and [`MAX_GRAIN`] (and an eighth of the window).
fn grain_for(due: usize, window: Duration) -> Duration {
    let due = u32::try_from(due.max(1)).unwrap_or(u32::MAX);
    let longest = MAX_GRAIN.min(window / GRAINS_PER_WINDOW).max(MIN_GRAIN);
    (window * POLLS_PER_GRAIN / due).clamp(MIN_GRAIN, longest)
}

/// `offset` rounded up to `grain`, kept inside `window` (a window shorter than the grain
/// keeps its offsets).
fn on_grain(offset: Duration, window: Duration, grain: Duration) -> Duration {
    let grain = (grain.as_millis() as u64).max(1);
    let ms = offset.as_millis() as u64;
    let up = ms.div_ceil(grain) * grain;
    if up < window.as_millis() as u64 {
        Duration::from_millis(up)
    } else {
        offset
    }
}

/// The default spread of a job: a quarter of the time between two of its runs, at most a
/// minute, so one tick's polls are done well before the next tick.
pub fn default_spread(cron: &crate::config::Cron) -> Duration {
    let gap = cron.period_after(&chrono::Utc::now()).unwrap_or_default();
    (gap / 4).min(Duration::from_secs(60))
}

/// What one answer came to (see [`Poller::outcome`]).
struct Polled {
    items: Vec<WriteItem>,
    settlement: Settlement,
    failed: bool,
    /// Readings handed to the writer.
    readings: usize,
    /// Why this poll made the vehicle wait (a retry-after, a backoff), if it did.
    waited: Option<String>,
    /// Not a poll after all (the connection needs a human): the skip reason.
    skipped: Option<&'static str>,
}

enum Failure {
    Token(TokenError),
    Api(ApiError),
}

/// A poll's time: when its answer arrived, the latest `fetched_at` of the readings it brought
/// (now when it brought none). The readings a poll stores are kept with its `ok` events in one
/// row (schema 4), whose `fetched_at` is then exactly the poll's `at` in `poll_events`.
fn answered_at(results: &[EndpointResult]) -> UnixMillis {
    let now = now_ms();
    results
        .iter()
        .filter_map(|r| match &r.result {
            Ok(Payload::Battery(b)) => Some(b.stamp.fetched_at),
            Ok(Payload::Charge(c)) => Some(c.stamp.fetched_at),
            Ok(Payload::Odometer(o)) => Some(o.stamp.fetched_at),
            _ => None,
        })
        .max()
        .map_or(now, |arrived| arrived.min(now))
}

fn event(
    v: &PolledVehicle,
    at: i64,
    endpoint: Endpoint,
    outcome: &'static str,
    e: Option<&ApiError>,
) -> PollEvent {
    PollEvent {
        vehicle_id: v.id.clone(),
        at,
        endpoint: endpoint.as_str().into(),
        outcome: outcome.into(),
        http_status: e.and_then(|e| e.status),
        error_type: e.and_then(|e| e.error_type.clone()),
        error_code: e.and_then(|e| e.code.clone()),
        calls: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_sized_by_its_due_rate_times_the_latency() {
        // 10,000 due over 60 s at 5.5 s: ~917 in flight on average, a quarter more to spare.
        assert_eq!(
            workers_needed(10_000, Duration::from_secs(60), 5_500.0),
            1146
        );
        // The same fleet answering in 2 ms over 10 s needs a few workers only.
        assert_eq!(workers_needed(10_000, Duration::from_secs(10), 2.0), 3);
        // A burst is sized by the latency alone (useful_workers), not by a rate.
        assert_eq!(workers_needed(10_000, Duration::ZERO, 5_500.0), 0);
        // Growth starts within two seconds of a missed due time, sooner than a quarter of
        // a long window.
        assert_eq!(grow_after(Duration::from_secs(60)), Duration::from_secs(2));
        assert_eq!(grow_after(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(late_after(Duration::from_secs(60)), Duration::from_secs(15));
    }

    #[test]
    fn offsets_are_stable_spread_and_inside_the_window() {
        let w = Duration::from_secs(60);
        let ids: Vec<VehicleId> = (0..200)
            .map(|i| VehicleId(format!("vehicle-{i}")))
            .collect();
        let offsets: Vec<Duration> = ids.iter().map(|id| offset_in(id, w)).collect();
        assert!(offsets.iter().all(|o| *o < w));
        assert_eq!(offsets[7], offset_in(&ids[7], w), "the same every tick");
        let first_half = offsets.iter().filter(|o| **o < w / 2).count();
        assert!(
            (60..140).contains(&first_half),
            "roughly even: {first_half} of 200"
        );
        assert_eq!(offset_in(&ids[0], Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn due_times_share_a_grain_and_stay_inside_the_window() {
        let w = Duration::from_millis(2_500);
        let ms = |m: u64| Duration::from_millis(m);
        let g = ms(10);
        // Rounded up to the grain: polls due within 10 ms start together, never early.
        assert_eq!(on_grain(ms(1), w, g), ms(10));
        assert_eq!(on_grain(ms(10), w, g), ms(10));
        assert_eq!(on_grain(ms(11), w, g), ms(20));
        assert_eq!(on_grain(ms(0), w, g), ms(0));
        assert_eq!(on_grain(ms(11), w, ms(40)), ms(40));
        // Never pushed out of the window (the next tick's polls stay after this tick's).
        assert_eq!(on_grain(ms(2_495), w, g), ms(2_495));
        assert_eq!(on_grain(ms(3), ms(5), g), ms(3));
        assert_eq!(on_grain(ms(3), ms(5), Duration::ZERO), ms(3));
        // Across a fleet the order of due times is kept and the offsets still spread.
        let pairs = starts_in_order(1_000, w, g);
        let grains: std::collections::BTreeSet<Duration> = pairs.iter().map(|p| p.1).collect();
        assert!(grains.len() > 200, "{} distinct start times", grains.len());
    }

    #[test]
    fn the_grain_follows_the_rate_and_keeps_a_tick_spread() {
        let ms = |m: u64| Duration::from_millis(m);
        let s = |n: u64| Duration::from_secs(n);
        // 10,000 vehicles in 2.5 s: the shortest grain already holds ~40 polls.
        assert_eq!(grain_for(10_000, ms(2_500)), MIN_GRAIN);
        // 2,000 in 2.5 s: 40 ms, ~32 polls a grain.
        assert_eq!(grain_for(2_000, ms(2_500)), ms(40));
        // 2,000 on a 15-minute schedule (a minute's spread): under a second.
        assert_eq!(grain_for(2_000, s(60)), ms(960));
        // A few cars: at most a second, and at least 8 start times in the window.
        assert_eq!(grain_for(10, s(60)), MAX_GRAIN);
        assert_eq!(grain_for(10, s(4)), ms(500));
        assert_eq!(grain_for(10, ms(40)), MIN_GRAIN);
        // No spread (the catch-up) and an empty due list do not divide by zero.
        assert_eq!(grain_for(0, Duration::ZERO), MIN_GRAIN);
        assert_eq!(grain_for(usize::MAX, s(60)), MIN_GRAIN);
        // Every poll of a tick still starts inside its window, in its order.
        for (due, w) in [(2_000, s(60)), (10, s(60)), (300, ms(2_500))] {
            starts_in_order(due, w, grain_for(due, w));
        }
    }

    /// The (offset, start) of `n` vehicles in `w` on grain `g`, sorted, after checking that
    /// starts keep the offsets' order, stay inside the window and are never early, at most a
    /// grain late.
    fn starts_in_order(n: usize, w: Duration, g: Duration) -> Vec<(Duration, Duration)> {
        let mut pairs: Vec<(Duration, Duration)> = (0..n)
            .map(|i| {
                let o = offset_in(&VehicleId(format!("vehicle-{i}")), w);
                (o, on_grain(o, w, g))
            })
            .collect();
        pairs.sort();
        assert!(pairs.windows(2).all(|p| p[0].1 <= p[1].1));
        assert!(pairs
            .iter()
            .all(|(o, on)| on >= o && *on < w && *on - *o < g));
        pairs
    }

    #[test]
    fn default_spread_is_a_quarter_of_the_gap_at_most_a_minute() {
        let spread = |c: &str| default_spread(&crate::config::Cron::parse(c).unwrap());
        assert_eq!(spread("*/2 * * * * *"), Duration::from_millis(500));
        assert_eq!(spread("0 */15 * * * *"), Duration::from_secs(60));
        assert_eq!(spread("0 * * * * *"), Duration::from_secs(15));
    }
}
