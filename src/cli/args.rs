//! The command line of DESIGN §3 (clap). Parsing only: `main` dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cli::demo::DemoArgs;
use crate::simulator::SimulatorArgs;

/// carpulse: a telemetry logger for Smartcar-connected vehicles (SQLite history, Prometheus metrics).
#[derive(Parser, Debug)]
#[command(name = "carpulse", version, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Default: $CARPULSE_CONFIG, then /etc/carpulse/carpulse.toml.
    #[arg(long, global = true, env = "CARPULSE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: refresh tokens, poll on schedule, store readings, serve /metrics.
    Run,
    /// Connect a Smartcar account: print the Connect URL, serve the redirect URI, store the
    /// account's vehicles.
    Connect {
        /// How long to wait for the browser to come back (Smartcar codes live 10 minutes).
        #[arg(long, default_value = "10m", value_parser = parse_duration_arg)]
        wait: std::time::Duration,
        /// Serve nothing: after approving, paste the address the browser ended on (from its
        /// address bar) here. For a server whose redirect URI the browser cannot reach (or use
        /// an SSH tunnel: ssh -L 8000:localhost:8000 server).
        #[arg(long)]
        paste: bool,
    },
    /// Get a vehicle polled again after its owner's consent or login broke, keeping its
    /// history: Connect again for its account (a connection that needs re-authorization, a
    /// missing permission), or Smartcar's re-authentication (a vehicle paused by
    /// CONNECTED_SERVICES_ACCOUNT). The flow is picked from the store unless --flow says.
    Reauth {
        /// The Smartcar vehicle id (see `carpulse vehicles list`).
        vehicle: String,
        #[arg(long, value_enum)]
        flow: Option<crate::cli::reauth::Flow>,
        /// How long to wait for the browser to come back.
        #[arg(long, default_value = "10m", value_parser = parse_duration_arg)]
        wait: std::time::Duration,
        /// Serve nothing: paste the address the browser ended on (see `connect --paste`).
        #[arg(long)]
        paste: bool,
        /// No browser: try the grant on file (the stored refresh token) once more. For a
        /// connection marked needs_reauth by a refusal that may have been a hiccup (a proxy,
        /// a Smartcar incident). If Smartcar refuses it again, run without --retry.
        #[arg(long, conflicts_with_all = ["flow", "paste"])]
        retry: bool,
    },
    /// List, disable, enable or remove stored vehicles.
    Vehicles {
        #[command(subcommand)]
        action: VehiclesCommand,
    },
    /// Health at a glance: whether the daemon runs, connections and token expiry, and per
    /// vehicle what blocks it, each endpoint's last outcome and the calls billed this month.
    Status {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The calls per vehicle per month the schedule makes, checked against
    /// `[budget] calls_per_vehicle_month`; exits 1 over budget unless --force. With a store,
    /// also what was billed this month so far.
    Plan {
        /// Accept a schedule over the budget.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Check the configured Smartcar account and the stored connections in plain words: which
    /// authentication works, connections Smartcar lists, permissions, empty signal stores,
    /// plan-locked signals, page size. Reading signals costs one billed call per connection;
    /// it asks first. Exits 1 when it finds a problem.
    Doctor {
        /// Make the billed calls without asking.
        #[arg(long)]
        yes: bool,
    },
    /// Poll now: every vehicle, or the one --vehicle names, for both jobs or --job. Asked of
    /// the running daemon (on metrics.listen) when there is one, so it goes through its gates
    /// and counts against its budget; otherwise polled in-process on the store. Prints what
    /// was stored; exits 1 when a poll did not succeed.
    Poll {
        /// A Smartcar id, an id prefix, or words of make, model and year.
        #[arg(long)]
        vehicle: Option<String>,
        /// Only this job (default: both; in v3 one listing carries both).
        #[arg(long, value_parser = crate::smartcar::Job::ALL.map(crate::smartcar::Job::label))]
        job: Option<String>,
    },
    /// Stored readings of one or all vehicles.
    History(crate::cli::history::HistoryArgs),
    /// The Smartcar-compatible vehicle simulator, on loopback.
    Simulator(SimulatorArgs),
    /// Simulator + Connect + daemon in one process on a local SQLite file; no account needed.
    Demo(DemoArgs),
    /// An online, consistent copy of the history (while the daemon writes), checked with
    /// PRAGMA integrity_check and row counts. Tokens are not in it (they rotate; see the README).
    Backup {
        /// Where the copy goes; an existing file is never overwritten.
        dest: PathBuf,
        /// The history to copy, instead of the config's store.path (then no config is read).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
    },
    /// Migrate the store's schema to this carpulse's (the daemon does it at start); a
    /// snapshot is taken first.
    Migrate {
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VehiclesCommand {
    /// Every stored vehicle with its connection status and last readings.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Stop polling a vehicle and keep its history (as `disable`); with --purge, delete the
    /// vehicle and its whole history. Asks on a terminal.
    Remove {
        /// The Smartcar vehicle id.
        id: String,
        /// Delete the vehicle's history too (cannot be undone).
        #[arg(long)]
        purge: bool,
        /// Do not ask (for scripts).
        #[arg(long)]
        yes: bool,
    },
    /// Stop polling a vehicle (its history stays); a running daemon notices within a minute
    /// or at once on SIGHUP.
    Disable {
        /// The Smartcar vehicle id.
        id: String,
    },
    /// Poll a disabled vehicle again.
    Enable {
        /// The Smartcar vehicle id.
        id: String,
    },
}

/// Where a read command (`history`, `status`, `vehicles list`, `plan`) finds the store. Read
/// commands need no Smartcar credentials: with `--db` alone (no config file) they use the
/// defaults for everything else.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// The SQLite store to read (default: store.path of the config).
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}
