//! The process signals the daemon answers: SIGTERM (systemd's stop) and SIGINT (Ctrl-C) both
//! mean "stop scheduling, drain, flush, exit 0"; SIGHUP means "re-read the config file and pick
//! up what `carpulse connect` and `carpulse vehicles` changed in the store".

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub fn spawn_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = shutdown.cancelled() => return,
        };
        // Stop first, then say so: a log write that fails (a dead pipe) must not lose the stop.
        shutdown.cancel();
        info!(signal, "stopping");
    });
    Ok(())
}

/// Calls `notify` on every SIGHUP (reload the vehicle set) until `shutdown`.
pub fn spawn_reload_handler(
    notify: std::sync::Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    notify.notify_one();
                    info!(signal = "SIGHUP", "reloading the config file and the vehicle set");
                }
            }
        }
    });
    Ok(())
}
