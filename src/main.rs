//! The `carpulse` binary: parse the command line, set up logging, load the config, hand over to
//! the library, and turn the result into an exit code (78, EX_CONFIG, for a bad config, which
//! systemd is told not to retry; 1 for anything else).

use std::io::IsTerminal;
use std::process::ExitCode;

use carpulse::cli::{Cli, Command, VehiclesCommand};
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

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run => carpulse::app::run(load_config(&cli)?).await,
        Command::Connect { wait } => carpulse::connect::run_cli(load_config(&cli)?, *wait).await,
        Command::Reauth {
            vehicle,
            flow,
            wait,
        } => carpulse::reauth::run_cli(load_config(&cli)?, vehicle, *flow, *wait).await,
        Command::Vehicles { action } => {
            let cfg = load_config(&cli)?;
            match action {
                VehiclesCommand::List => carpulse::report::vehicles_list(&cfg).await,
                VehiclesCommand::Remove { id } => carpulse::report::vehicles_remove(&cfg, id).await,
                VehiclesCommand::Disable { id } => {
                    carpulse::report::vehicles_enable(&cfg, id, false).await
                }
                VehiclesCommand::Enable { id } => {
                    carpulse::report::vehicles_enable(&cfg, id, true).await
                }
            }
        }
        Command::Status => carpulse::report::status(&load_config(&cli)?).await,
        Command::Doctor { yes } => {
            if carpulse::doctor::run_cli(&load_config(&cli)?, *yes).await? {
                Ok(())
            } else {
                anyhow::bail!("carpulse doctor found problems (see above)")
            }
        }
        Command::Plan { force } => carpulse::plan::run(&load_config(&cli)?, *force),
        Command::History(args) => carpulse::history::run(&load_config(&cli)?, args).await,
        Command::Simulator(args) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            carpulse::signals::spawn_handler(shutdown.clone())?;
            carpulse::simulator::run_cli(args.clone(), shutdown).await
        }
        Command::Demo(args) => carpulse::demo::run(args.clone()).await,
    }
}
