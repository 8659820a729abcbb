//! The `carpulse` binary: parse the command line, set up logging, load the config, hand over to
//! the library, and turn the result into an exit code ([`carpulse::exit`]: 78 for a bad config,
//! 73 for an unusable store, 69 for an unusable listener, which systemd is told not to retry;
//! 1 for anything else).

use std::process::ExitCode;

use carpulse::cli::{Cli, Command, VehiclesCommand};
use carpulse::config::{Config, ProcessEnv, DEFAULT_CONFIG_PATH};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("carpulse: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
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

fn init_logging(command: &Command) {
    // The demo shows every poll; the daemon logs one line per cycle unless RUST_LOG says more.
    let default = match command {
        Command::Demo(_) => "info,carpulse::poller=debug",
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
                VehiclesCommand::Remove { id, purge, yes } => {
                    carpulse::admin::vehicles_remove(&cfg.store.path, id, *purge, *yes).await
                }
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
        Command::Backup { dest, db } => {
            let store = match db {
                Some(db) => db.clone(),
                None => load_config(&cli)?.store.path,
            };
            carpulse::admin::backup(&store, dest).await
        }
        Command::Migrate { dry_run } => {
            carpulse::admin::migrate(&load_config(&cli)?.store.path, *dry_run).await
        }
    }
}
