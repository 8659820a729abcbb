//! `carpulse run`, stage by stage. [`app`] wires the daemon and owns its one shutdown path;
//! [`tokens`] keeps each connection's Connect token fresh (persisting every rotated pair before
//! it is used) and [`app_token`] the application token of API Authentication;
//! [`connections_sync`] follows `/v3/connections`; [`schedule`] turns cron lines into ticks;
//! [`poller`] turns a tick into polls through the [`crate::smartcar`] client, each admitted
//! and settled by the [`fleet`] table (busy, freshness, plugged in, and [`gate`]'s waits,
//! blocks and monthly budget) and skipping what [`discovery`] found a vehicle cannot answer;
//! readings go to the store's writer and outcomes to [`metrics`], served (with
//! [`webconfig`]'s TLS and basic auth) on the metrics listener, beside `/healthz`, which
//! [`health`] keeps. [`maintenance`] prunes and backs up the store while the daemon runs,
//! [`reconfig`] applies SIGHUP, [`signals`] and [`sdnotify`] speak to the OS and systemd;
//! [`control`] is `POST /poll` (poll now).

pub mod app;
pub mod app_token;
pub mod connections_sync;
pub mod control;
pub mod cycles;
pub mod discovery;
pub mod fleet;
pub mod gate;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod poller;
pub mod reconfig;
pub mod schedule;
pub mod sdnotify;
pub mod signals;
pub mod supervisor;
pub mod tokens;
pub mod vehicle_gauges;
pub mod webconfig;

pub use app::{adopt_stored_blocks, client_config, run, Daemon};
pub use health::check_health;
