//! The `carpulse` binary: parse the command line, set up logging, load the config, hand over to
//! the library, and turn the result into an exit code ([`carpulse::exit`]: 78 for a bad config,
//! 73 for an unusable store, 69 for an unusable listener, which systemd is told not to retry;
//! 1 for anything else).

use std::process::ExitCode;

use carpulse::cli::{Cli, Command, StoreArgs, VehiclesCommand};
use carpulse::config::{Config, ProcessEnv, DEFAULT_CONFIG_PATH};
use clap::Parser;

/// See Cargo.toml: measured against glibc's malloc on the fleet benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    let runtime = match runtime_for(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("carpulse: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `carpulse status | head -1`: the reader has what it wanted.
        Err(e) if carpulse::cli::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let code = carpulse::exit::code(&e);
            if code == carpulse::exit::EX_CONFIG {
                carpulse::logging::fatal(&format!("config error: {e}"));
            } else {
                carpulse::logging::fatal(&format!("{e:#}"));
            }
            ExitCode::from(code)
        }
    }
}

/// The daemon runs on one thread: its work is waiting on Smartcar, and the fleet profile
/// showed a tenth of its CPU in waking one runtime worker from another (the store has its own
/// thread). The simulator, which serves load, keeps a worker per core.
fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Simulator(_) => tokio::runtime::Runtime::new(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
}

fn init_logging(command: &Command) {
    // The demo shows every poll; the daemon logs one line per cycle unless RUST_LOG says more.
    let default = match command {
        Command::Demo(_) => "info,carpulse::daemon::poller=debug",
        // The command prints what it did; the in-process poller's lines are for trouble.
        Command::Poll { .. } => "warn",
        _ => "info",
    };
    carpulse::logging::init(default);
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| DEFAULT_CONFIG_PATH.into());
    Ok(Config::load(&path, &ProcessEnv)?)
}

/// The config of a read command: no Smartcar credentials needed; `--db` names the store.
fn read_config(cli: &Cli, store: &StoreArgs) -> anyhow::Result<Config> {
    Ok(Config::for_reading(
        cli.config.as_deref(),
        store.db.as_deref(),
        &ProcessEnv,
    )?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    // Not locked here: the daemon's tasks on other threads print too. Printable: the read
    // commands print text from Smartcar's answers, never a terminal escape in it.
    let mut out = carpulse::cli::output::Printable::new(std::io::stdout());
    match &cli.command {
        Command::Run => carpulse::daemon::run(load_config(&cli)?).await,
        Command::Connect { wait, paste } => {
            carpulse::cli::connect::run_cli(load_config(&cli)?, *wait, *paste).await
        }
        Command::Reauth {
            vehicle,
            retry: true,
            ..
        } => carpulse::cli::reauth::retry_cli(load_config(&cli)?, vehicle).await,
        Command::Reauth {
            vehicle,
            flow,
            wait,
            paste,
            retry: false,
        } => {
            carpulse::cli::reauth::run_cli(load_config(&cli)?, vehicle, *flow, *wait, *paste).await
        }
        Command::Vehicles { action } => match action {
            VehiclesCommand::List { store } => {
                carpulse::cli::report::vehicles_list(&read_config(&cli, store)?, &mut out).await
            }
            VehiclesCommand::Remove { id, purge, yes } => {
                let cfg = load_config(&cli)?;
                carpulse::cli::admin::vehicles_remove(&cfg.store.path, id, *purge, *yes).await
            }
            VehiclesCommand::Disable { id } => {
                carpulse::cli::report::vehicles_enable(&load_config(&cli)?, id, false).await
            }
            VehiclesCommand::Enable { id } => {
                carpulse::cli::report::vehicles_enable(&load_config(&cli)?, id, true).await
            }
        },
        Command::Status { store } => {
            carpulse::cli::report::status(&read_config(&cli, store)?, &mut out).await
        }
        Command::Doctor { yes } => {
            if carpulse::cli::doctor::run_cli(&load_config(&cli)?, *yes).await? {
                Ok(())
            } else {
                anyhow::bail!("carpulse doctor found problems (see above)")
            }
        }
        Command::Plan { force, store } => {
            carpulse::cli::plan::run(&read_config(&cli, store)?, *force, &mut out)
        }
        Command::Poll { vehicle, job } => {
            carpulse::cli::poll::run(
                &load_config(&cli)?,
                vehicle.as_deref(),
                job.as_deref(),
                &mut out,
            )
            .await
        }
        Command::History(args) => {
            carpulse::cli::history::run(&read_config(&cli, &args.store)?, args, &mut out).await
        }
        Command::Simulator(args) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            carpulse::daemon::signals::spawn_handler(shutdown.clone())?;
            carpulse::simulator::run_cli(args.clone(), shutdown).await
        }
        Command::Demo(args) => carpulse::cli::demo::run(args.clone()).await,
        Command::Backup { dest, db } => {
            let store = match db {
                Some(db) => db.clone(),
                None => load_config(&cli)?.store.path,
            };
            carpulse::cli::admin::backup(&store, dest).await
        }
        Command::Migrate { dry_run } => {
            carpulse::cli::admin::migrate(&load_config(&cli)?.store.path, *dry_run).await
        }
    }
}
