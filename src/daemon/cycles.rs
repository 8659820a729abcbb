//! From ticks to poll cycles: the schedule's ticks start cycles on the poller, a SIGHUP's new
//! schedule replaces the crons without losing a tick, and at shutdown in-flight polls get a
//! grace period before they are abandoned.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ScheduleConfig;
use crate::daemon::metrics::Metrics;
use crate::daemon::poller::{default_spread, Poller};
use crate::daemon::schedule::{self, Schedule, Tick};
use crate::domain::ApiVersion;
use crate::smartcar::Job;

/// How long ticks are gathered after the first of a second, so crons due together (the
/// daily info job and a battery tick) share one v3 listing.
const TICK_COALESCE: Duration = Duration::from_millis(300);

/// The running schedule and the cycles it started.
pub struct Cycles {
    poller: Arc<Poller>,
    api: ApiVersion,
    metrics: Metrics,
    schedule: Schedule,
    ticks: mpsc::Receiver<Tick>,
    /// A vehicle the base cron just answered is not asked again by the charging cron.
    charging_gap: Duration,
    running: TaskTracker,
    /// Polls get their own token: on shutdown they are given a grace period first.
    cancel: CancellationToken,
}

impl Cycles {
    /// Starts the crons of `cfg` (and sets the poller's spread windows from them).
    pub async fn start(
        poller: Arc<Poller>,
        api: ApiVersion,
        metrics: Metrics,
        cfg: &ScheduleConfig,
    ) -> anyhow::Result<Cycles> {
        let (schedule, ticks) = schedule::start(cfg, &metrics)
            .await
            .context("starting the schedule")?;
        set_spreads(&poller, cfg);
        Ok(Cycles {
            poller,
            api,
            metrics,
            schedule,
            ticks,
            charging_gap: charging_gap(cfg),
            running: TaskTracker::new(),
            cancel: CancellationToken::new(),
        })
    }

    /// Starts a cycle for every tick, and swaps in each schedule `changes` brings, until the
    /// schedule ends — which it never should: the error says so.
    pub async fn dispatch(
        &mut self,
        changes: &mut mpsc::Receiver<ScheduleConfig>,
    ) -> anyhow::Error {
        loop {
            tokio::select! {
                Some(new) = changes.recv() => self.swap(new).await,
                tick = self.ticks.recv() => {
                    let Some(tick) = tick else {
                        return anyhow::anyhow!("the schedule stopped unexpectedly");
                    };
                    // Jobs due in the same second share one v3 listing.
                    let mut due = vec![tick];
                    if self.api == ApiVersion::V3 {
                        let until = tokio::time::Instant::now() + TICK_COALESCE;
                        while let Ok(Some(more)) = tokio::time::timeout_at(until, self.ticks.recv()).await {
                            due.push(more);
                        }
                    }
                    for tick in schedule::merge_ticks(self.api, due) {
                        self.start_cycle(tick);
                    }
                }
            }
        }
    }

    /// Vehicles whose last reading is older than one period of a job are polled now, not at
    /// its next run (which a daily cron puts up to a day away).
    pub fn catch_up(&self, store: crate::store::Store, cfg: &ScheduleConfig) {
        self.running.spawn(crate::daemon::control::catch_up(
            self.poller.clone(),
            store,
            self.metrics.clone(),
            self.api,
            cfg.clone(),
            self.cancel.clone(),
        ));
    }

    fn start_cycle(&self, tick: Tick) {
        let (poller, cancel, gap) = (self.poller.clone(), self.cancel.clone(), self.charging_gap);
        self.running.spawn(async move {
            if tick.plugged_in_only {
                poller.cycle_plugged_in(tick.job, gap, cancel).await;
            } else {
                poller.cycle(tick.job, cancel).await;
            }
        });
        debug!(
            job = tick.job.label(),
            plugged_in_only = tick.plugged_in_only,
            "cycle started"
        );
    }

    /// The new crons start before the old ones stop: no tick is lost between.
    async fn swap(&mut self, new: ScheduleConfig) {
        match schedule::start(&new, &self.metrics).await {
            Ok((schedule, ticks)) => {
                let old = std::mem::replace(&mut self.schedule, schedule);
                let mut old_ticks = std::mem::replace(&mut self.ticks, ticks);
                old.shutdown().await;
                self.charging_gap = charging_gap(&new);
                // Ticks the old crons queued meanwhile still run.
                while let Ok(tick) = old_ticks.try_recv() {
                    self.start_cycle(tick);
                }
                set_spreads(&self.poller, &new);
                info!(battery = %new.battery, info = %new.info, battery_charging = ?new.battery_charging, "schedule changed");
            }
            Err(e) => warn!(
                error = format!("{e:#}"),
                "the new schedule did not start; keeping the old one"
            ),
        }
    }

    /// Stops the crons, lets in-flight polls finish within `grace`, then abandons the rest
    /// (what they already fetched still reaches the writer).
    pub async fn drain(self, grace: Duration) {
        self.schedule.shutdown().await;
        self.running.close();
        if tokio::time::timeout(grace, self.running.wait())
            .await
            .is_err()
        {
            warn!(
                grace_s = grace.as_secs(),
                "in-flight polls did not finish in time; abandoning them"
            );
            self.cancel.cancel();
            self.running.wait().await;
        }
    }
}

fn set_spreads(poller: &Poller, cfg: &ScheduleConfig) {
    let spread = |cron: &crate::config::Cron| cfg.spread.unwrap_or_else(|| default_spread(cron));
    poller.set_spread(Job::Battery, spread(&cfg.battery));
    poller.set_spread(Job::Info, spread(&cfg.info));
}

fn charging_gap(cfg: &ScheduleConfig) -> Duration {
    cfg.battery_charging
        .as_ref()
        .map(|c| default_spread(c) * 2)
        .unwrap_or_default()
}
