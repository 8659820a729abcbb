//! STUB
#![allow(unused)]
use std::time::Duration;
use tokio_util::sync::CancellationToken;
#[derive(Clone, Debug)]
pub struct SimulatorConfig { pub client_id: String, pub client_secret: String, pub users: usize, pub vehicles_per_user: usize, pub access_token_lifetime: Duration, pub refresh_token_lifetime: Duration, pub refresh_grace: Duration, pub report_interval: Duration, pub time_scale: f64, pub seed: u64 }
impl Default for SimulatorConfig { fn default() -> Self { todo!() } }
pub async fn serve(listener: tokio::net::TcpListener, cfg: SimulatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> { todo!() }
#[derive(clap::Args, Debug, Clone)]
pub struct SimulatorArgs { #[arg(long)] pub listen: String }
impl SimulatorArgs { pub fn to_config(&self) -> SimulatorConfig { todo!() } }
pub async fn run_cli(args: SimulatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> { todo!() }
