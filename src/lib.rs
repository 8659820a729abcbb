//! carpulse keeps a time-series history of Smartcar-connected vehicles in SQLite and exports it
//! as Prometheus metrics.
//!
//! Data flows one way (DESIGN §1): [`config`] is validated at start; [`store`] owns the SQLite
//! file on one thread; [`tokens`] keeps every connection's access token fresh and persists each
//! rotated pair before it is used; [`schedule`] turns cron expressions into ticks; [`poller`]
//! turns a tick into one bounded, concurrent poll cycle through the [`smartcar`] client, skipping
//! what [`discovery`] found a vehicle cannot answer; its
//! readings go to the store's writer and its outcomes to [`metrics`]. [`connect`] runs the
//! OAuth consent flow, [`simulator`] is a Smartcar look-alike for offline use, and [`app`] wires
//! the daemon together with one shutdown path. [`demo`] runs all of it in one process.
//! [`maintenance`] prunes and backs up the store while the daemon runs; [`admin`] holds the
//! operator's commands that copy, migrate or delete; [`exit`] maps failures to exit codes
//! systemd can act on, and [`logging`] gives journald each line's priority.

pub mod admin;
pub mod app;
pub mod app_token;
pub mod cli;
pub mod config;
pub mod connect;
pub mod connections_sync;
pub mod demo;
pub mod discovery;
pub mod doctor;
pub mod domain;
pub mod exit;
pub mod gate;
pub mod history;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod output;
pub mod plan;
pub mod poller;
pub mod reauth;
pub mod reconfig;
pub mod report;
pub mod schedule;
pub mod sdnotify;
pub mod signals;
pub mod simulator;
pub mod smartcar;
pub mod store;
pub mod tokens;
pub mod webconfig;
