//! The `carpulse` binary: parse the command line, set up logging, load the config, hand over to
//! the library, and turn the result into an exit code (78, EX_CONFIG, for a bad config, which
//! systemd is told not to retry; 1 for anything else).

use std::io::IsTerminal;
use std::process::ExitCode;

use carpulse::cli::{Cli, Command, StoreArgs, VehiclesCommand};
use carpulse::config::{Config, ConfigError, ProcessEnv, DEFAULT_CONFIG_PATH, EX_CONFIG};
use clap::Parser;

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
        Err(e) if carpulse::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("carpulse: config error: {e}");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            eprintln!("carpulse: {e:#}");
            ExitCode::FAILURE
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
        Command::Demo(_) => "info,carpulse::poller=debug",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald and log files get plain text.
    // A log write that fails (stderr's reader is gone) is dropped; reporting it would write to
    // the same broken stderr and panic, killing whichever task logged.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
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
    // Not locked here: the daemon's tasks on other threads print too.
    let mut out = std::io::stdout();
    match &cli.command {
        Command::Run => carpulse::app::run(load_config(&cli)?).await,
        Command::Connect { wait, paste } => {
            carpulse::connect::run_cli(load_config(&cli)?, *wait, *paste).await
        }
        Command::Reauth {
            vehicle,
            flow,
            wait,
            paste,
        } => carpulse::reauth::run_cli(load_config(&cli)?, vehicle, *flow, *wait, *paste).await,
        Command::Vehicles { action } => match action {
            VehiclesCommand::List { store } => {
                carpulse::report::vehicles_list(&read_config(&cli, store)?, &mut out).await
            }
            VehiclesCommand::Remove { id } => {
                carpulse::report::vehicles_remove(&load_config(&cli)?, id).await
            }
            VehiclesCommand::Disable { id } => {
                carpulse::report::vehicles_enable(&load_config(&cli)?, id, false).await
            }
            VehiclesCommand::Enable { id } => {
                carpulse::report::vehicles_enable(&load_config(&cli)?, id, true).await
            }
        },
        Command::Status { store } => {
            carpulse::report::status(&read_config(&cli, store)?, &mut out).await
        }
        Command::Doctor { yes } => {
            if carpulse::doctor::run_cli(&load_config(&cli)?, *yes).await? {
                Ok(())
            } else {
                anyhow::bail!("carpulse doctor found problems (see above)")
            }
        }
        Command::Plan { force, store } => {
            carpulse::plan::run(&read_config(&cli, store)?, *force, &mut out)
        }
        Command::History(args) => {
            carpulse::history::run(&read_config(&cli, &args.store)?, args, &mut out).await
        }
        Command::Simulator(args) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            carpulse::signals::spawn_handler(shutdown.clone())?;
            carpulse::simulator::run_cli(args.clone(), shutdown).await
        }
        Command::Demo(args) => carpulse::demo::run(args.clone()).await,
    }
}
