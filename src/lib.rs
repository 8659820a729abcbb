//! carpulse keeps a time-series history of Smartcar-connected vehicles in SQLite and exports it
//! as Prometheus metrics.
//!
//! Data flows one way (DESIGN §1), and `src/` is grouped by stage: [`config`] is validated at
//! start; [`smartcar`] speaks Smartcar's APIs (auth, v2.0, v3, connections); [`daemon`] is
//! `carpulse run` (tokens, schedule, poller, gates, metrics, one shutdown path); [`store`] owns
//! the SQLite file on one thread; [`cli`] is every other command; [`simulator`] is a Smartcar
//! look-alike for offline use. [`domain`] holds the types they share, [`exit`] maps failures to
//! exit codes systemd can act on, and [`logging`] gives journald each line's priority.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod exit;
pub(crate) mod hash;
pub mod logging;
pub mod simulator;
pub mod smartcar;
pub mod store;
