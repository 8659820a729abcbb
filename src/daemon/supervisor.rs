//! The daemon's long-running tasks under one watch. Each runs until shutdown; one that ends
//! before it — with an error, with `Ok`, or by panicking — is logged with its name and cause
//! and stops the daemon, so systemd restarts a whole daemon rather than leaving one that looks
//! alive (its listener answering) while nothing polls or refreshes.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tracing::{error, warn};

/// Named tasks, watched for an early end.
#[derive(Default)]
pub struct Supervisor {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Runs `task` until shutdown (it watches the shutdown token itself).
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Resolves when the first task ends, with why (logged here); pending while all run.
    /// Only meaningful before shutdown: every task ends after it.
    pub async fn first_end(&mut self) -> String {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let why = match joined {
            Ok((id, Ok(()))) => format!("{} ended unexpectedly", self.name(id)),
            Ok((id, Err(e))) => format!("{} failed: {e:#}", self.name(id)),
            Err(e) if e.is_panic() => {
                format!("{} panicked: {}", self.name(e.id()), panic_message(e))
            }
            Err(e) => format!("{} was cancelled", self.name(e.id())),
        };
        error!(cause = %why, "a daemon task stopped; stopping the daemon");
        why
    }

    /// After shutdown was signalled: waits up to `grace` for every task to finish, then
    /// abandons (and names) those still running.
    pub async fn stop(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await {
                Ok(None) => return,
                Ok(Some(Ok((id, Err(e))))) => {
                    warn!(
                        task = self.name(id),
                        error = format!("{e:#}"),
                        "ended with an error at shutdown"
                    )
                }
                Ok(Some(Err(e))) if e.is_panic() => {
                    let name = self.name(e.id());
                    error!(task = name, cause = %panic_message(e), "panicked at shutdown")
                }
                Ok(Some(_)) => {}
                Err(_) => {
                    let mut running: Vec<&str> = self.names.values().copied().collect();
                    running.sort_unstable();
                    warn!(
                        grace_s = grace.as_secs(),
                        ?running,
                        "background tasks did not stop in time; flushing and exiting anyway"
                    );
                    self.set.abort_all();
                    return;
                }
            }
        }
    }

    fn name(&mut self, id: Id) -> &'static str {
        self.names.remove(&id).unwrap_or("a daemon task")
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn an_early_end_a_failure_or_a_panic_is_named() {
        let stop = CancellationToken::new();
        let mut s = Supervisor::new();
        let waits = stop.clone();
        s.spawn("waits", async move {
            waits.cancelled().await;
            Ok(())
        });
        s.spawn("fails", async { anyhow::bail!("disk on fire") });
        let why = s.first_end().await;
        assert_eq!(why, "fails failed: disk on fire");

        s.spawn("panics", async { panic!("boom") });
        let why = s.first_end().await;
        assert_eq!(why, "panics panicked: boom");

        s.spawn("returns", async { Ok(()) });
        assert_eq!(s.first_end().await, "returns ended unexpectedly");

        stop.cancel();
        s.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn stop_abandons_a_task_that_ignores_shutdown() {
        let mut s = Supervisor::new();
        s.spawn("stuck", std::future::pending());
        let started = tokio::time::Instant::now();
        s.stop(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
