//! Cron → ticks. A tokio-cron-scheduler job only *starts* work: it sends a tick on a bounded
//! channel and returns, so the poller owns the cycle, the overlap rule and cancellation, and the
//! scheduler (which detaches each activation) never holds a poll.

use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tracing::{debug, warn};

use crate::config::ScheduleConfig;
use crate::daemon::metrics::Metrics;
use crate::smartcar::Job;

/// Ticks waiting for the poller. Small on purpose: the poller spawns each cycle at once, so a
/// full queue means it is stuck, and piling up more ticks would only burst later.
const TICK_QUEUE: usize = 4;

/// A running schedule; [`Schedule::shutdown`] stops it.
pub struct Schedule {
    scheduler: JobScheduler,
}

/// One scheduled activation: which job, and whether only vehicles that are plugged in are due
/// (`schedule.battery_charging`, the faster cadence while charging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub job: Job,
    pub plugged_in_only: bool,
}

/// Starts one cron job per poll job; ticks arrive on the returned receiver.
pub async fn start(
    cfg: &ScheduleConfig,
    metrics: &Metrics,
) -> anyhow::Result<(Schedule, mpsc::Receiver<Tick>)> {
    let (tx, rx) = mpsc::channel(TICK_QUEUE);
    let scheduler = JobScheduler::new().await?;
    let mut crons = vec![
        (Job::Battery, false, &cfg.battery),
        (Job::Info, false, &cfg.info),
    ];
    if let Some(charging) = &cfg.battery_charging {
        crons.push((Job::Battery, true, charging));
    }
    for (job, plugged_in_only, expr) in crons {
        let tick = Tick {
            job,
            plugged_in_only,
        };
        let tx = tx.clone();
        let metrics = metrics.clone();
        let cron = CronJob::new_async(expr.as_str(), move |_, _| {
            let tx = tx.clone();
            let metrics = metrics.clone();
            Box::pin(async move {
                match tx.try_send(tick) {
                    Ok(()) => debug!(job = job.label(), "tick"),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics
                            .ticks_skipped
                            .with_label_values(&[job.label()])
                            .inc();
                        warn!(
                            job = job.label(),
                            "tick skipped: the poller has not taken the previous ones"
                        );
                    }
                    // The poller is gone: the daemon is stopping.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            })
        })
        .map_err(|e| anyhow::anyhow!("schedule.{}: {expr:?}: {e}", job.label()))?;
        scheduler.add(cron).await?;
        // Say when the first poll comes: with the default 15-minute cron a new user would
        // otherwise wonder why nothing happens.
        if let Some(next) = expr.next_after(&chrono::Utc::now()) {
            tracing::info!(job = job.label(), plugged_in_only, cron = %expr, next = %next.to_rfc3339(), "scheduled");
        }
    }
    scheduler.start().await?;
    Ok((Schedule { scheduler }, rx))
}

impl Schedule {
    pub async fn shutdown(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            warn!(error = %e, "stopping the scheduler");
        }
    }
}

/// Ticks that fall due together become one cycle per listing: under v3 an Info tick answers
/// everything a Battery tick would, so a plain Battery tick beside it is dropped.
pub fn merge_ticks(api: crate::domain::ApiVersion, ticks: Vec<Tick>) -> Vec<Tick> {
    let info_due = ticks.iter().any(|t| t.job == Job::Info);
    let mut out: Vec<Tick> = Vec::with_capacity(ticks.len());
    for t in ticks {
        let covered = api == crate::domain::ApiVersion::V3 && info_due && t.job == Job::Battery;
        if !covered && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

#[cfg(test)]
mod merge_tests {
    use super::*;
    use crate::domain::ApiVersion;

    fn tick(job: Job, plugged_in_only: bool) -> Tick {
        Tick {
            job,
            plugged_in_only,
        }
    }

    #[test]
    fn v3_ticks_due_together_share_one_listing() {
        let both = vec![tick(Job::Battery, false), tick(Job::Info, false)];
        assert_eq!(
            merge_ticks(ApiVersion::V3, both.clone()),
            [tick(Job::Info, false)]
        );
        assert_eq!(merge_ticks(ApiVersion::V2, both.clone()), both);
        let charging = vec![tick(Job::Battery, true), tick(Job::Info, false)];
        assert_eq!(
            merge_ticks(ApiVersion::V3, charging),
            [tick(Job::Info, false)]
        );
        assert_eq!(
            merge_ticks(ApiVersion::V3, vec![tick(Job::Battery, false)]),
            [tick(Job::Battery, false)]
        );
    }
}
