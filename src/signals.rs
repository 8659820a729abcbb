//! The process signals the daemon answers: SIGTERM (systemd's stop) and SIGINT (Ctrl-C) both
//! mean "stop scheduling, drain, flush, exit 0"; SIGHUP means "pick up what `carpulse connect`
//! and `carpulse vehicles` changed in the store".

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub fn spawn_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
            _ = int.recv() => info!(signal = "SIGINT", "stopping"),
            _ = shutdown.cancelled() => return,
        }
        shutdown.cancel();
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
                    info!(signal = "SIGHUP", "reloading the config file and the vehicle set");
                    notify.notify_one();
                }
            }
        }
    });
    Ok(())
}
