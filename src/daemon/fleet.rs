//! The fleet-state table: per polled vehicle, whether a poll of each job is in flight, whether
//! its last charge reading said plugged in, and how fresh its data is; beside them the gates
//! (waits, backoffs, blocks, pauses: [`Gates`]) and this month's call ledger ([`Ledger`]).
//! One std mutex guards all of it, so a poll starts with one lock ([`Fleet::admit`]: busy
//! check, gate, budget reservation) and ends with one ([`Fleet::settle`]: busy cleared, ledger
//! settled, gate, freshness and plugged-in updated). A [`Ticket`] is the only way from one to
//! the other; one dropped unsettled (a panic, a cancelled task) frees the vehicle and refunds
//! its reservation.
//!
//! Why a std mutex and not a tokio one or an owning task: every critical section is a few
//! hash or vector look-ups and is never held across an await, so contention is a handful of
//! nanoseconds, and a message to a task would cost a wake-up per poll (the fleet bench's
//! kernel time). `Gates` and `Ledger` are kept whole (their rules are unit-tested in `gate`)
//! inside the one lock; the per-vehicle parts that were separate maps live in the entries.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::daemon::gate::{Gates, Ledger, Skip};
use crate::daemon::poller::{Freshness, PolledVehicle};
use crate::domain::{ApiVersion, BlockScope, UnixMillis, VehicleId};
use crate::hash::FxHashMap;
use crate::smartcar::error::ApiError;
use crate::smartcar::{Endpoint, Job};

/// One vehicle's row.
#[derive(Debug)]
struct Entry {
    vehicle: PolledVehicle,
    /// Per job ([`job_index`]): a poll of it is in flight.
    busy: [bool; 2],
    /// Its latest charge reading said plugged in or charging (the charging cadence's set).
    plugged: bool,
    freshness: Freshness,
}

impl Entry {
    fn new(vehicle: PolledVehicle) -> Entry {
        Entry {
            vehicle,
            busy: [false; 2],
            plugged: false,
            freshness: Freshness::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// In the order [`Fleet::set_vehicles`] was given; a vehicle's index is its slot.
    entries: Vec<Entry>,
    /// Fx-hashed: looked up by every poll (see [`crate::hash`]).
    slots: FxHashMap<VehicleId, usize>,
    gates: Gates,
    ledger: Ledger,
    /// Bumped when freshness or the vehicle set changes (see [`Fleet::changes`]).
    changes: u64,
}

impl Table {
    /// The slot of `id`: `hint` when it still holds that vehicle (a string compare, no hash),
    /// else the index. `None`: not a polled vehicle (any more).
    fn slot(&self, id: &VehicleId, hint: Option<usize>) -> Option<usize> {
        match hint {
            Some(s) if self.entries.get(s).is_some_and(|e| e.vehicle.id == *id) => Some(s),
            _ => self.slots.get(id).copied(),
        }
    }
}

/// What the health check reads of one polled vehicle ([`Fleet::views`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VehicleView {
    pub id: VehicleId,
    pub freshness: Freshness,
    /// Why it is paused, if it is.
    pub paused: Option<String>,
    /// Its disabled endpoints, when they are every endpoint of every job (nothing is polled).
    pub all_blocked: Option<Vec<String>>,
    /// Every battery endpoint is disabled because the car or its consent cannot give it (see
    /// [`Gates::not_capable`]): an ICE car.
    pub battery_not_capable: bool,
}

/// Why [`Fleet::admit`] refused a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its previous poll of this job is still running.
    Busy,
    /// Not called, and why (gate or budget).
    Skip(Skip),
    /// No longer a polled vehicle (a reload removed it while a cycle ran).
    Gone,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Fleet {
    table: Mutex<Table>,
}

/// A poll admitted and not yet settled: its vehicle is busy for its job and its estimated
/// cost is reserved in the ledger. [`Fleet::settle`] ends it; dropped unsettled, it frees
/// the vehicle and refunds the reservation.
#[must_use = "a ticket dropped unsettled refunds its reservation"]
#[derive(Debug)]
pub struct Ticket<'f> {
    fleet: &'f Fleet,
    id: VehicleId,
    slot: Option<usize>,
    /// The job whose busy flag it holds; `None` for a capability discovery (holds none).
    job: Option<Job>,
    /// The ledger's job key: the job's label or `"capabilities"` ([`Endpoint::Capabilities`]).
    label: &'static str,
    cost: u64,
    done: bool,
}

impl Ticket<'_> {
    /// The calls reserved for this poll.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// Frees the vehicle and keeps the reservation charged: the request may have reached
    /// Smartcar when it was abandoned (shutdown), so it counts as billed at the estimate.
    pub fn abandon(mut self) {
        self.done = true;
        let fleet = self.fleet;
        let mut t = fleet.lock();
        release(&mut t, &self);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let fleet = self.fleet;
        let mut t = fleet.lock();
        release(&mut t, self);
        t.ledger.settle(&self.id, None, self.cost, 0);
    }
}

/// Clears the ticket's busy flag, if its vehicle is still in the table.
fn release(t: &mut Table, ticket: &Ticket<'_>) {
    let Some(job) = ticket.job else { return };
    if let Some(s) = t.slot(&ticket.id, ticket.slot) {
        t.entries[s].busy[job_index(job)] = false;
    }
}

/// One change a poll's answer makes to the gates, applied in order at settlement (a success
/// resets the backoff that a later failure of the same answer starts again).
#[derive(Debug)]
pub enum GateStep {
    Succeeded,
    Failed {
        endpoint: Endpoint,
        error: ApiError,
        jitter: f64,
    },
}

/// What a poll came to, for [`Fleet::settle`].
#[derive(Debug, Default)]
pub struct Settlement {
    /// When the answer came (the time the gate's steps are taken at).
    pub at: UnixMillis,
    /// The calls Smartcar billed (replaces the reservation).
    pub billed: u64,
    pub gate: Vec<GateStep>,
    /// Smartcar answered an empty signal store at this time.
    pub no_data_at: Option<UnixMillis>,
    /// Answered at this time, with the (signal, recorded_at) of its readings.
    pub answered: Option<(UnixMillis, Vec<(&'static str, UnixMillis)>)>,
    /// The latest charge reading's plugged-in (or charging) state.
    pub plugged: Option<bool>,
}

/// What settlement leaves for the caller to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// When the vehicle may be called again, if a failure of this answer made it wait.
    pub not_before: Option<UnixMillis>,
}

/// The job's index in per-job arrays.
pub fn job_index(job: Job) -> usize {
    match job {
        Job::Battery => 0,
        Job::Info => 1,
    }
}

/// What one poll of `open` endpoints is billed: in v2 every batch item and the info call
/// count; a v3 poll costs its plan price whatever it reads.
pub fn call_cost(api: ApiVersion, job: Job, open: &[Endpoint]) -> u64 {
    match api {
        ApiVersion::V2 => open.len() as u64,
        ApiVersion::V3 => crate::cli::plan::calls_per_run(api, job).0,
    }
}

impl Fleet {
    /// The one place the poison-tolerant idiom lives: a panic inside a critical section
    /// leaves the table consistent (each section's writes are single assignments).
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the polled vehicles. A vehicle that stays keeps its row (busy flags, plugged
    /// in, freshness) whatever its new slot; one that leaves loses it. Gates and ledger are
    /// kept for every vehicle (a block or this month's calls outlive a disable and enable).
    pub fn set_vehicles(&self, vehicles: Vec<PolledVehicle>) {
        let mut t = self.lock();
        let same = t.entries.len() == vehicles.len()
            && t.entries
                .iter()
                .zip(&vehicles)
                .all(|(e, v)| e.vehicle == *v);
        if same {
            return;
        }
        let mut old: HashMap<VehicleId, Entry> = t
            .entries
            .drain(..)
            .map(|e| (e.vehicle.id.clone(), e))
            .collect();
        let mut slots = FxHashMap::with_capacity_and_hasher(vehicles.len(), Default::default());
        let mut entries = Vec::with_capacity(vehicles.len());
        for v in vehicles {
            slots.insert(v.id.clone(), entries.len());
            let entry = match old.remove(&v.id) {
                Some(mut e) => {
                    e.vehicle = v;
                    e
                }
                None => Entry::new(v),
            };
            entries.push(entry);
        }
        t.entries = entries;
        t.slots = slots;
        t.changes += 1;
    }

    /// The polled vehicles, in order.
    pub fn vehicles(&self) -> Vec<PolledVehicle> {
        self.lock()
            .entries
            .iter()
            .map(|e| e.vehicle.clone())
            .collect()
    }

    /// The polled vehicles with their slots (hints for [`Fleet::admit`]), those in `keep` only.
    pub fn slotted(&self, keep: impl Fn(&VehicleId) -> bool) -> Vec<(usize, PolledVehicle)> {
        self.lock()
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| keep(&e.vehicle.id))
            .map(|(s, e)| (s, e.vehicle.clone()))
            .collect()
    }

    /// The vehicles plugged in at their last charge reading and not answered since `recent`.
    pub fn plugged_in(&self, recent: UnixMillis) -> Vec<(usize, PolledVehicle)> {
        self.lock()
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.plugged)
            .filter(|(_, e)| e.freshness.last_answered.is_none_or(|at| at <= recent))
            .map(|(s, e)| (s, e.vehicle.clone()))
            .collect()
    }

    /// Starts a poll of `job`, in one lock and in today's order: busy, then the gate (which
    /// endpoints may be called), then the budget, whose reservation is the job's plan cost or
    /// what it last cost this vehicle if more (a v3 listing of several pages). Returns the
    /// ticket and the endpoints to ask.
    pub fn admit(
        &self,
        id: &VehicleId,
        hint: Option<usize>,
        job: Job,
        api: ApiVersion,
        now: UnixMillis,
    ) -> Result<(Ticket<'_>, Vec<Endpoint>), Refusal> {
        let mut t = self.lock();
        let slot = t.slot(id, hint).ok_or(Refusal::Gone)?;
        let j = job_index(job);
        if t.entries[slot].busy[j] {
            return Err(Refusal::Busy);
        }
        let open = t
            .gates
            .admit(id, job.endpoints(), now)
            .map_err(Refusal::Skip)?;
        // Counted when admitted: a request that fails is billed all the same.
        let cost = t
            .ledger
            .charge(id, job.label(), call_cost(api, job, &open), now)
            .ok_or(Refusal::Skip(Skip::Budget))?;
        t.entries[slot].busy[j] = true;
        let ticket = Ticket {
            fleet: self,
            id: id.clone(),
            slot: Some(slot),
            job: Some(job),
            label: job.label(),
            cost,
            done: false,
        };
        Ok((ticket, open))
    }

    /// Starts a capability discovery (one call): not while the gate holds the vehicle, not
    /// while any poll of it is in flight (two requests at once invite a 429), not past the
    /// budget. `None`: not now. It marks nothing busy: polls are not held up by it.
    pub fn admit_discovery(&self, id: &VehicleId, now: UnixMillis) -> Option<Ticket<'_>> {
        let mut t = self.lock();
        if t.gates.admit(id, &[Endpoint::Capabilities], now).is_err() {
            return None;
        }
        let slot = t.slot(id, None);
        if slot.is_some_and(|s| t.entries[s].busy.iter().any(|b| *b)) {
            return None;
        }
        if !t.ledger.try_spend(id, 1, now) {
            return None;
        }
        Some(Ticket {
            fleet: self,
            id: id.clone(),
            slot,
            job: None,
            label: Endpoint::Capabilities.as_str(),
            cost: 1,
            done: false,
        })
    }

    /// Ends a poll in one lock: the vehicle is free, the reservation is replaced by what was
    /// billed (and remembered as the job's cost), the gate takes the answer's steps in order,
    /// and freshness and plugged-in follow the answer.
    pub fn settle(&self, mut ticket: Ticket<'_>, s: Settlement) -> Settled {
        ticket.done = true;
        let mut t = self.lock();
        release(&mut t, &ticket);
        let id = &ticket.id;
        t.ledger
            .settle(id, Some(ticket.label), ticket.cost, s.billed);
        let mut failed = false;
        for step in &s.gate {
            match step {
                GateStep::Succeeded => t.gates.succeeded(id),
                GateStep::Failed {
                    endpoint,
                    error,
                    jitter,
                } => {
                    failed = true;
                    t.gates.failed(id, *endpoint, error, s.at, *jitter);
                }
            }
        }
        let not_before = if failed { t.gates.not_before(id) } else { None };
        let slot = t.slot(id, ticket.slot);
        if let Some(slot) = slot {
            let moved = s.no_data_at.is_some() || s.answered.is_some();
            let e = &mut t.entries[slot];
            if let Some(at) = s.no_data_at {
                e.freshness.no_data_since.get_or_insert(at);
            }
            if let Some((at, readings)) = &s.answered {
                note_answer(&mut e.freshness, *at, readings);
            }
            if let Some(plugged) = s.plugged {
                e.plugged = plugged;
            }
            if moved {
                t.changes += 1;
            }
        }
        Settled { not_before }
    }

    /// Moves whenever what the health check reads here changes: (freshness and the vehicle
    /// set, the gates' blocks and pauses, the ledger's counts).
    pub fn changes(&self) -> (u64, u64, u64) {
        let t = self.lock();
        (t.changes, t.gates.changes(), t.ledger.changes())
    }

    /// Every polled vehicle's freshness (vehicles never answered have a default one).
    pub fn freshness(&self) -> Vec<(VehicleId, Freshness)> {
        self.lock()
            .entries
            .iter()
            .map(|e| (e.vehicle.id.clone(), e.freshness.clone()))
            .collect()
    }

    /// Every polled vehicle as the health check reads it, in one lock (rather than four per
    /// vehicle).
    pub fn views(&self) -> Vec<VehicleView> {
        let all = Job::EVERY_ENDPOINT;
        let t = self.lock();
        t.entries
            .iter()
            .map(|e| {
                let id = &e.vehicle.id;
                let (disabled, paused) = t.gates.describe(id);
                VehicleView {
                    id: id.clone(),
                    freshness: e.freshness.clone(),
                    paused,
                    all_blocked: t.gates.all_blocked(id, &all).then_some(disabled),
                    battery_not_capable: t.gates.not_capable(id, Job::Battery.endpoints()),
                }
            })
            .collect()
    }

    /// Calls each of `ids` made in the month `now` falls in, in one lock.
    pub fn calls_of(&self, ids: Vec<VehicleId>, now: UnixMillis) -> Vec<(VehicleId, u64)> {
        let t = self.lock();
        ids.into_iter()
            .map(|id| {
                let n = t.ledger.used(&id, now);
                (id, n)
            })
            .collect()
    }

    /// Disabled endpoints and pause reason of a vehicle.
    pub fn gate_of(&self, id: &VehicleId) -> (Vec<String>, Option<String>) {
        self.lock().gates.describe(id)
    }

    /// Whether every one of `endpoints` is disabled for the vehicle.
    pub fn all_blocked(&self, id: &VehicleId, endpoints: &[Endpoint]) -> bool {
        self.lock().gates.all_blocked(id, endpoints)
    }

    /// See [`Gates::not_capable`].
    pub fn not_capable(&self, id: &VehicleId, endpoints: &[Endpoint]) -> bool {
        self.lock().gates.not_capable(id, endpoints)
    }

    /// A new consent lifts what the old one could not give (see [`Gates::reset`]).
    pub fn reset_gate(&self, id: &VehicleId) {
        self.lock().gates.reset(id);
    }

    /// Adopts the store's blocks and waits, read at `read_at` (see [`Gates::adopt_blocks`]).
    pub fn adopt_blocks(
        &self,
        blocks: &HashMap<VehicleId, Vec<(BlockScope, String)>>,
        waits: &HashMap<VehicleId, UnixMillis>,
        read_at: UnixMillis,
    ) {
        let mut t = self.lock();
        t.gates.adopt_blocks(blocks, read_at);
        t.gates.adopt_waits(waits, read_at);
    }

    /// Replaces the ledger (budget and this month's calls so far).
    pub fn set_ledger(&self, ledger: Ledger) {
        let mut t = self.lock();
        t.ledger = ledger;
        t.changes += 1;
    }

    /// See [`Ledger::set_budget`].
    pub fn set_budget(&self, budget: Option<u64>) {
        self.lock().ledger.set_budget(budget);
    }

    /// See [`Ledger::seed`].
    pub fn seed_ledger(
        &self,
        budget: Option<u64>,
        counted: HashMap<VehicleId, u64>,
        now: UnixMillis,
    ) {
        self.lock().ledger.seed(budget, counted, now);
    }

    /// Calls this vehicle made in the month `now` falls in.
    pub fn calls_this_month(&self, id: &VehicleId, now: UnixMillis) -> u64 {
        self.lock().ledger.used(id, now)
    }
}

fn note_answer(f: &mut Freshness, at: UnixMillis, readings: &[(&'static str, UnixMillis)]) {
    f.last_answered = Some(at);
    f.no_data_since = None;
    for (signal, recorded) in readings {
        match f.recorded.iter_mut().find(|(s, _)| s == signal) {
            Some(slot) => slot.1 = slot.1.max(*recorded),
            None => f.recorded.push((signal, *recorded)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionId;
    use crate::smartcar::error::ErrorKind;

    const NOW: UnixMillis = 1_795_910_400_000; // 2026-11-29T00:00:00Z

    fn vehicle(n: usize) -> PolledVehicle {
        PolledVehicle {
            id: VehicleId(format!("v{n}")),
            connection: ConnectionId(1),
        }
    }

    fn fleet_of(n: usize) -> Fleet {
        let f = Fleet::default();
        f.set_vehicles((0..n).map(vehicle).collect());
        f
    }

    fn answered(at: UnixMillis) -> Settlement {
        Settlement {
            at,
            billed: 2,
            gate: vec![GateStep::Succeeded],
            answered: Some((at, vec![("battery", at - 5)])),
            ..Default::default()
        }
    }

    #[test]
    fn a_vehicle_admitted_is_busy_for_that_job_until_settled() {
        let f = fleet_of(2);
        let v0 = vehicle(0).id;
        let (ticket, open) = f
            .admit(&v0, Some(0), Job::Battery, ApiVersion::V2, NOW)
            .unwrap();
        assert_eq!(open, vec![Endpoint::Battery, Endpoint::Charge]);
        assert_eq!(ticket.cost(), 2, "v2: one call per batch item");
        assert_eq!(
            f.admit(&v0, Some(0), Job::Battery, ApiVersion::V2, NOW)
                .map(|_| ()),
            Err(Refusal::Busy)
        );
        // The other job and another vehicle are not held up.
        let (info, _) = f.admit(&v0, None, Job::Info, ApiVersion::V2, NOW).unwrap();
        let (other, _) = f
            .admit(&vehicle(1).id, Some(1), Job::Battery, ApiVersion::V2, NOW)
            .unwrap();
        // A discovery waits while any poll of the vehicle is in flight.
        assert!(f.admit_discovery(&v0, NOW).is_none());
        f.settle(ticket, answered(NOW));
        f.settle(info, answered(NOW));
        f.settle(other, answered(NOW));
        assert!(f
            .admit(&v0, Some(0), Job::Battery, ApiVersion::V2, NOW)
            .is_ok());
        assert!(f.admit_discovery(&v0, NOW).is_some());
    }

    #[test]
    fn a_ticket_dropped_unsettled_frees_the_vehicle_and_refunds() {
        let f = fleet_of(1);
        let v = vehicle(0).id;
        f.set_ledger(Ledger::new(Some(2), HashMap::new(), NOW));
        let admitted = f.admit(&v, None, Job::Battery, ApiVersion::V2, NOW);
        assert_eq!(f.calls_this_month(&v, NOW), 2, "reserved on admission");
        // A panic or a cancelled task drops the ticket.
        drop(admitted);
        assert_eq!(f.calls_this_month(&v, NOW), 0, "refunded");
        let (ticket, _) = f
            .admit(&v, None, Job::Battery, ApiVersion::V2, NOW)
            .expect("free again, with the budget back");
        // Abandoned at shutdown: the request may have been billed, so the charge stays.
        ticket.abandon();
        assert_eq!(f.calls_this_month(&v, NOW), 2);
        assert_eq!(
            f.admit(&v, None, Job::Battery, ApiVersion::V2, NOW)
                .map(|_| ()),
            Err(Refusal::Skip(Skip::Budget)),
            "free, but the budget is spent"
        );
    }

    #[test]
    fn an_exhausted_budget_skips_without_charging_or_holding_the_vehicle() {
        let f = fleet_of(1);
        let v = vehicle(0).id;
        f.set_ledger(Ledger::new(Some(3), HashMap::from([(v.clone(), 2)]), NOW));
        assert_eq!(
            f.admit(&v, None, Job::Battery, ApiVersion::V2, NOW)
                .map(|_| ()),
            Err(Refusal::Skip(Skip::Budget))
        );
        assert_eq!(f.calls_this_month(&v, NOW), 2, "nothing charged");
        assert!(f.admit_discovery(&v, NOW).is_some(), "one call still fits");
        assert_eq!(
            f.calls_this_month(&v, NOW),
            2,
            "that ticket, dropped, refunded"
        );
        // Settled at what was billed: a v3 listing's pages raise the next reservation.
        f.set_ledger(Ledger::new(None, HashMap::new(), NOW));
        let (t, _) = f
            .admit(&v, None, Job::Battery, ApiVersion::V3, NOW)
            .unwrap();
        let plan = t.cost();
        let mut s = answered(NOW);
        s.billed = plan + 2;
        f.settle(t, s);
        assert_eq!(
            f.calls_this_month(&v, NOW),
            plan + 2,
            "billed, not reserved"
        );
        let (t, _) = f
            .admit(&v, None, Job::Battery, ApiVersion::V3, NOW)
            .unwrap();
        assert_eq!(t.cost(), plan + 2, "what the job last cost");
    }

    #[test]
    fn settling_updates_freshness_plugged_in_and_the_gate() {
        let f = fleet_of(1);
        let v = vehicle(0).id;
        let before = f.changes();
        let (t, _) = f
            .admit(&v, Some(0), Job::Battery, ApiVersion::V2, NOW)
            .unwrap();
        let mut s = answered(NOW);
        s.plugged = Some(true);
        assert_eq!(f.settle(t, s).not_before, None);
        assert_ne!(f.changes(), before, "the health check sees it moved");
        let fresh = &f.freshness()[0].1;
        assert_eq!(fresh.last_answered, Some(NOW));
        assert_eq!(fresh.recorded, vec![("battery", NOW - 5)]);
        assert_eq!(f.plugged_in(NOW).len(), 1, "answered at NOW, not after");
        assert!(f.plugged_in(NOW - 1).is_empty());
        assert_eq!(f.calls_this_month(&v, NOW), 2);
        // A 429 with retry-after: the wait is returned for the store, and honoured.
        let (t, _) = f
            .admit(&v, Some(0), Job::Battery, ApiVersion::V2, NOW)
            .unwrap();
        let mut e = ApiError::new(ErrorKind::RateLimitVehicle, "slow down");
        e.retry_after = Some(std::time::Duration::from_secs(60));
        let settled = f.settle(
            t,
            Settlement {
                at: NOW + 1,
                billed: 1,
                gate: vec![GateStep::Failed {
                    endpoint: Endpoint::Battery,
                    error: e,
                    jitter: 0.0,
                }],
                plugged: Some(false),
                no_data_at: Some(NOW + 1),
                ..Default::default()
            },
        );
        assert_eq!(settled.not_before, Some(NOW + 1 + 60_000));
        assert_eq!(
            f.admit(&v, None, Job::Battery, ApiVersion::V2, NOW + 2)
                .map(|_| ()),
            Err(Refusal::Skip(Skip::Waiting))
        );
        assert!(f.plugged_in(NOW + 10).is_empty(), "unplugged");
        assert_eq!(f.freshness()[0].1.no_data_since, Some(NOW + 1));
    }

    #[test]
    fn set_vehicles_keeps_the_rows_of_vehicles_that_stay_and_drops_the_others() {
        let f = fleet_of(3);
        let (v0, v1, v2) = (vehicle(0).id, vehicle(1).id, vehicle(2).id);
        for (slot, id) in [(0, &v0), (2, &v2)] {
            let (t, _) = f
                .admit(id, Some(slot), Job::Battery, ApiVersion::V2, NOW)
                .unwrap();
            let mut s = answered(NOW);
            s.plugged = Some(true);
            f.settle(t, s);
        }
        // v1 is mid-poll when a reload drops v0 and reorders the rest.
        let (busy, _) = f
            .admit(&v1, Some(1), Job::Battery, ApiVersion::V2, NOW)
            .unwrap();
        let before = f.changes();
        f.set_vehicles(vec![vehicle(2), vehicle(1), vehicle(3)]);
        assert_ne!(f.changes(), before);
        let fresh = f.freshness();
        let ids: Vec<&str> = fresh.iter().map(|(id, _)| id.0.as_str()).collect();
        assert_eq!(ids, ["v2", "v1", "v3"]);
        assert_eq!(fresh[0].1.last_answered, Some(NOW), "v2 kept its freshness");
        assert_eq!(fresh[2].1, Freshness::default(), "v3 starts afresh");
        let plugged: Vec<VehicleId> = f.plugged_in(NOW).into_iter().map(|(_, v)| v.id).collect();
        assert_eq!(plugged, vec![v2.clone()], "v0's row is gone");
        // v1 stayed busy across the move; its old slot hint (1) now names itself again, but a
        // stale hint is checked, never trusted.
        assert_eq!(
            f.admit(&v1, Some(0), Job::Battery, ApiVersion::V2, NOW)
                .map(|_| ()),
            Err(Refusal::Busy)
        );
        f.settle(busy, answered(NOW));
        assert!(f
            .admit(&v1, Some(0), Job::Battery, ApiVersion::V2, NOW)
            .is_ok());
        assert_eq!(
            f.admit(&v0, Some(0), Job::Battery, ApiVersion::V2, NOW)
                .map(|_| ()),
            Err(Refusal::Gone)
        );
        // The same list again is no change.
        let same = f.changes();
        f.set_vehicles(vec![vehicle(2), vehicle(1), vehicle(3)]);
        assert_eq!(f.changes(), same);
        // The ledger outlives the row: v0's month still counts if it comes back.
        assert_eq!(f.calls_this_month(&v0, NOW), 2);
    }

    #[test]
    fn views_read_the_whole_fleet_for_the_health_check() {
        let f = fleet_of(3);
        let fail = |id: &VehicleId, endpoints: &[Endpoint], kind| {
            let (t, _) = f.admit(id, None, Job::Info, ApiVersion::V2, NOW).unwrap();
            let gate = endpoints
                .iter()
                .map(|&endpoint| GateStep::Failed {
                    endpoint,
                    error: ApiError::new(kind, "no"),
                    jitter: 0.0,
                })
                .collect();
            f.settle(
                t,
                Settlement {
                    at: NOW,
                    gate,
                    ..Default::default()
                },
            );
        };
        let (v0, v1) = (vehicle(0).id, vehicle(1).id);
        fail(&v0, Job::Battery.endpoints(), ErrorKind::Compatibility);
        fail(&v1, &[Endpoint::Info], ErrorKind::Billing);
        let views = f.views();
        assert_eq!(views.len(), 3);
        assert!(views[0].battery_not_capable && views[0].all_blocked.is_none());
        assert!(views[1].paused.is_some() && !views[1].battery_not_capable);
        assert_eq!(views[2].paused, None);
        fail(&v0, Job::Info.endpoints(), ErrorKind::Permission);
        assert_eq!(
            f.views()[0].all_blocked.as_deref().map(<[String]>::len),
            Some(5)
        );
        assert_eq!(
            f.calls_of(vec![v0, v1], NOW),
            vec![(vehicle(0).id, 0), (vehicle(1).id, 0)],
            "settled at 0 billed"
        );
    }
}
