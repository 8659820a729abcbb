//! `cargo bench --bench fleet`: the real daemon at fleet scale, as a user runs it. The simulator
//! runs in its own process (`carpulse simulator`), the store is filled with N connected
//! vehicles, and the real `carpulse run` polls them on a cron. What is measured, from outside
//! the daemon, the way an operator would:
//!
//! - **CPU per stored poll**: the daemon's utime+stime (`/proc/PID/stat`) over a window,
//!   divided by the battery polls stored in it (`carpulse_polls_total{endpoint="battery",
//!   outcome="ok"}`);
//! - **ceiling**: stored polls per second while every vehicle is due at once;
//! - **RSS**: `VmRSS` and the peak `VmHWM` of the daemon;
//! - **on time**: with latency, whether every vehicle was answered within the window;
//! - **first poll**: from spawning `carpulse run` to the first stored poll;
//! - **idle CPU**: between ticks, from `/proc/PID/stat` (10 ms ticks: over 20 s, steps of
//!   0.05 %) and to the nanosecond from each live thread's `schedstat`;
//! - **bytes per poll**: the store's size after a checkpoint divided by the polls it holds.
//!
//! Scenarios (`FLEET_SCENARIO`): `steady` (the default: the fleet every 10 s, polls spread as
//! the daemon spreads them), `ceiling` (every vehicle due at once, `schedule.spread = "0s"`,
//! every 30 s: a whole tick's stored polls per second), `latency` (answers in 3-8 s, every
//! vehicle due within a 60 s window: how long a tick takes to poll every vehicle), `idle` (nothing due after the
//! start's polls: start to first stored poll, and CPU while idle). `FLEET_RUNS=3` repeats the
//! run and prints the median (min-max) of every figure; `FLEET_PROFILE=FILE` records a perf
//! profile of the daemon over the measured window.
//!
//! Knobs (environment): `FLEET_VEHICLES` (10000), `FLEET_API` (`v3`, with API Authentication,
//! or `v2`), `FLEET_LATENCY` (the scenario's, or `3-8` seconds; `none`), `FLEET_CRON` (the
//! scenario's),
//! `FLEET_SECONDS` (measurement window, 30), `FLEET_PER_VEHICLE` (`false`: per-vehicle metrics
//! off, as the 10,000-vehicle target asks), `FLEET_CONCURRENCY` (`poll.concurrency`, unset:
//! the default), `FLEET_MAX_IN_FLIGHT` (`poll.max_in_flight`), `FLEET_DAEMON_LOG` (a file for the daemon's log at info; unset: warnings
//! only, discarded), `FLEET_BIN` (the `carpulse` binary whose `run` is measured, to compare two
//! builds against the same simulator and store; unset: the one cargo built). Build with `--release` (`cargo bench` does). Without `--bench` (`cargo test
//! --benches`) it is a 5-second smoke run of 200 vehicles.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use carpulse::domain::{now_ms, TokenPair, VehicleId, VehicleInfo, REFRESH_TOKEN_LIFETIME_MS};
use carpulse::store::{queries, Store};

const BIN: &str = env!("CARGO_BIN_EXE_carpulse");
const API_ID: &str = "bench-api";
const API_SECRET: &str = "bench-api-secret";
const CLIENT: &str = "bench-client";
const SECRET: &str = "bench-secret";
const REDIRECT: &str = "http://127.0.0.1:9/cb";
const VEHICLES_PER_USER: usize = 100;

struct Params {
    scenario: Scenario,
    runs: usize,
    vehicles: usize,
    api: String,
    latency: Option<String>,
    cron: String,
    seconds: u64,
    per_vehicle: bool,
    concurrency: Option<usize>,
    max_in_flight: Option<usize>,
    /// `schedule.spread`, when the scenario sets it.
    spread: Option<&'static str>,
}

/// What a run measures (`FLEET_SCENARIO`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    /// The fleet on a cron, polls spread as by default: CPU per stored poll, RSS, bytes.
    Steady,
    /// Every vehicle due at once (`schedule.spread = "0s"`): stored polls per second over a
    /// whole tick, and CPU per poll in it.
    Ceiling,
    /// Real latency (3-8 s unless FLEET_LATENCY says otherwise), every vehicle due within a
    /// 60 s window (`schedule.spread`), every two minutes: how long a tick takes to poll them.
    Latency,
    /// Nothing due after the start: start to first stored poll (every vehicle is due at start,
    /// never polled), then the daemon's CPU while idle.
    Idle,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

impl Params {
    fn from_env(smoke: bool) -> anyhow::Result<Params> {
        let (vehicles, seconds) = if smoke { ("200", "5") } else { ("10000", "30") };
        let scenario = match env_or("FLEET_SCENARIO", "steady").as_str() {
            "steady" => Scenario::Steady,
            "ceiling" => Scenario::Ceiling,
            "latency" => Scenario::Latency,
            "idle" => Scenario::Idle,
            other => bail!("FLEET_SCENARIO={other}: steady, ceiling, latency or idle"),
        };
        let (cron, latency, spread) = match scenario {
            Scenario::Steady => ("*/10 * * * * *", None, None),
            Scenario::Ceiling => ("*/30 * * * * *", None, Some("0s")),
            // Due within a 60 s window, every two minutes (so ticks never overlap).
            Scenario::Latency => ("0 */2 * * * *", Some("3-8"), Some("60s")),
            Scenario::Idle => ("0 0 0 1 1 *", None, None),
        };
        Ok(Params {
            scenario,
            runs: env_or("FLEET_RUNS", "1").parse()?,
            spread,
            vehicles: env_or("FLEET_VEHICLES", vehicles).parse()?,
            api: env_or("FLEET_API", "v3"),
            latency: std::env::var("FLEET_LATENCY")
                .ok()
                .or(latency.map(str::to_owned))
                .filter(|s| !s.is_empty() && s != "none"),
            cron: env_or("FLEET_CRON", cron),
            seconds: env_or("FLEET_SECONDS", seconds).parse()?,
            per_vehicle: env_or("FLEET_PER_VEHICLE", "false").parse()?,
            concurrency: std::env::var("FLEET_CONCURRENCY")
                .ok()
                .map(|c| c.parse())
                .transpose()?,
            max_in_flight: std::env::var("FLEET_MAX_IN_FLIGHT")
                .ok()
                .map(|c| c.parse())
                .transpose()?,
        })
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) and RSS/peak RSS in KiB of a process.
fn sample(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // /proc reports in USER_HZ, which Linux fixes at 100.
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

/// The CPU time of the daemon's live threads in seconds, to the nanosecond (the first field of
/// each `/proc/PID/task/TID/schedstat`): `/proc/PID/stat` counts 10 ms ticks, too coarse for
/// an idle daemon. A thread that ends between two samples takes its time with it, so over a
/// window this can only read low by the work of threads that ended in it (tokio's blocking
/// threads after 10 s idle); the tick figure beside it counts everything.
fn cpu_precise(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

async fn stored_polls(http: &reqwest::Client, metrics: &str) -> f64 {
    match http.get(metrics).send().await {
        Ok(r) => metric(
            &r.text().await.unwrap_or_default(),
            "carpulse_polls_total{endpoint=\"battery\",outcome=\"ok\"}",
        ),
        Err(_) => 0.0,
    }
}

fn main() -> anyhow::Result<()> {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let p = Params::from_env(smoke)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async {
            let mut all: Vec<Vec<Figure>> = Vec::new();
            for i in 0..p.runs.max(1) {
                let figures = run(&p).await?;
                print_run(&p, i + 1, &figures);
                all.push(figures);
            }
            if all.len() > 1 {
                print_summary(&all);
            }
            Ok(())
        })
}

/// One measured figure of a run: name, value, unit.
type Figure = (&'static str, f64, &'static str);

fn print_run(p: &Params, run: usize, figures: &[Figure]) {
    println!(
        "fleet run {run}: scenario {:?}, {} vehicles, api {}, latency {}, cron {:?}, per-vehicle metrics {}",
        p.scenario,
        p.vehicles,
        p.api,
        p.latency.as_deref().unwrap_or("none"),
        p.cron,
        p.per_vehicle
    );
    for (name, value, unit) in figures {
        let d = decimals(*value);
        println!("  {name:<28} {value:>12.d$} {unit}");
    }
}

/// Decimals to print: one, but two under 1 and three under 0.1 (idle CPU is a few hundredths
/// of a percent).
fn decimals(v: f64) -> usize {
    match v.abs() {
        a if a < 0.1 => 3,
        a if a < 1.0 => 2,
        _ => 1,
    }
}

/// Median (min-max) of each figure over the runs.
fn print_summary(runs: &[Vec<Figure>]) {
    println!("summary of {} runs: median (min-max)", runs.len());
    for (i, (name, _, unit)) in runs[0].iter().enumerate() {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).map(|f| f.1)).collect();
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        let d = decimals(median);
        println!(
            "  {name:<28} {median:>12.d$} {unit} ({:.d$}-{:.d$})",
            v[0],
            v[v.len() - 1]
        );
    }
}

async fn run(p: &Params) -> anyhow::Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let users = p.vehicles.div_ceil(VEHICLES_PER_USER).max(1);
    let per_user = p.vehicles.clamp(1, VEHICLES_PER_USER);
    let mut args = vec![
        "simulator".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--client-id".into(),
        CLIENT.into(),
        "--client-secret".into(),
        SECRET.into(),
        "--api-client-id".into(),
        API_ID.into(),
        "--api-client-secret".into(),
        API_SECRET.into(),
        "--users".into(),
        users.to_string(),
        "--vehicles-per-user".into(),
        per_user.to_string(),
        "--served-log".into(),
        "0".into(),
        "--report-interval".into(),
        "1".into(),
    ];
    if let Some(l) = &p.latency {
        args.extend(["--latency".into(), l.clone()]);
    }
    let mut sim = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting carpulse simulator")?;
    let mut lines = std::io::BufReader::new(sim.stdout.take().context("simulator stdout")?).lines();
    let first = lines.next().context("the simulator printed nothing")??;
    // Keep draining its stdout: a closed pipe would end it at its next line.
    std::thread::spawn(move || lines.for_each(drop));
    let _sim = Proc(sim);
    let base = first
        .strip_prefix("carpulse simulator listening on ")
        .context("unexpected simulator line")?
        .trim()
        .to_owned();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;

    let db = dir.path().join("fleet.db");
    let t = Instant::now();
    let n = fill_store(&http, &base, &db, p, users).await?;
    eprintln!("store: {n} vehicles connected in {:?}", t.elapsed());

    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("carpulse.toml");
    std::fs::write(&config, config_text(&base, &db, metrics_port, p))?;
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    // The poll counter's family alone (`name[]`): what the bench reads while it waits outside
    // a measured window. The whole `/metrics` is ~18 MB with per-vehicle series on at 10,000
    // vehicles, and rendering it every 20-100 ms while the start's polls ran was the bench
    // measuring itself (the idle scenario's peak RSS, issue 8). A daemon without the filter
    // (`FLEET_BIN`, an older build) serves the whole text, which holds the counter too.
    let counter = format!("{metrics}?name[]=carpulse_polls_total");

    let started = Instant::now();
    // FLEET_DAEMON_LOG=FILE keeps the daemon's log (at info) for a look afterwards.
    let (log_level, log) = match std::env::var("FLEET_DAEMON_LOG") {
        Ok(path) => ("info", Stdio::from(std::fs::File::create(path)?)),
        Err(_) => ("warn", Stdio::null()),
    };
    let bin = std::env::var("FLEET_BIN").unwrap_or_else(|_| BIN.to_string());
    let daemon = Command::new(bin)
        .args(["--config", config.to_str().context("path")?, "run"])
        .env("RUST_LOG", log_level)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting carpulse run")?;
    let pid = daemon.id();
    let _daemon = Proc(daemon);

    let mut figures: Vec<Figure> = Vec::new();
    let n = p.vehicles as f64;
    let polls = || stored_polls(&http, &metrics);
    let polls_cheap = || stored_polls(&http, &counter);
    // First stored poll.
    let deadline = Instant::now() + Duration::from_secs(120);
    while polls().await < 1.0 {
        if Instant::now() > deadline {
            bail!("no poll stored within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    figures.push((
        "first stored poll",
        started.elapsed().as_secs_f64() * 1e3,
        "ms after start",
    ));
    let perf_for = |seconds: u64| profile(pid, seconds);
    match p.scenario {
        Scenario::Steady => {
            // Warm up one full tick, then measure a window.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let mut perf = perf_for(p.seconds)?;
            let (cpu0, _, _) = sample(pid)?;
            let polls0 = polls().await;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(p.seconds) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (cpu1, _, _) = sample(pid)?;
            let done = polls().await - polls0;
            finish_profile(perf.as_mut())?;
            let window = t0.elapsed().as_secs_f64();
            figures.push(("stored polls per second", done / window, "/s"));
            figures.push(("cpu per stored poll", per_poll_us(cpu1 - cpu0, done), "us"));
            figures.push(("cpu", (cpu1 - cpu0) / window * 100.0, "% of a core"));
        }
        Scenario::Ceiling | Scenario::Latency => {
            // The first tick (the poll at start) warms connections up. Once every vehicle was
            // polled and the count stood still (the tick is over), the next tick is measured
            // from its first stored poll to its last.
            //
            // While the tick runs the counter is read only every 250 ms: each read is a scrape
            // the daemon renders (at 20 ms, as before, the scrapes were ~30 % of its CPU in
            // the latency scenario). The tick's span comes from the store instead: the first
            // and the last `poll_events.at` of the tick (the time each poll was answered).
            wait_for(&polls, n, 300, FINE).await?;
            let base = wait_still(&polls_cheap, Duration::from_secs(2), 300).await?;
            let since = carpulse::domain::now_ms();
            wait_for(&polls, base + 1.0, 300, FINE).await?;
            let mut perf = perf_for(p.seconds)?;
            let (cpu0, _, _) = sample(pid)?;
            let end = wait_for(&polls, base + n, 300, COARSE).await?;
            let (cpu1, _, _) = sample(pid)?;
            finish_profile(perf.as_mut())?;
            let took = tick_span(&db, since)?;
            let done = end - base;
            figures.push(("tick: every vehicle polled in", took, "s"));
            figures.push(("stored polls per second", done / took, "/s"));
            figures.push(("cpu per stored poll", per_poll_us(cpu1 - cpu0, done), "us"));
        }
        Scenario::Idle => {
            // The start's polls of every vehicle, then quiet.
            wait_for(&polls_cheap, n, 120, FINE).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut perf = perf_for(p.seconds)?;
            let (cpu0, _, _) = sample(pid)?;
            let precise0 = cpu_precise(pid)?;
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(p.seconds)).await;
            let (cpu1, _, _) = sample(pid)?;
            let precise1 = cpu_precise(pid)?;
            let window = t0.elapsed().as_secs_f64();
            finish_profile(perf.as_mut())?;
            figures.push(("idle cpu", (cpu1 - cpu0) / window * 100.0, "% of a core"));
            figures.push((
                "idle cpu (schedstat, ns)",
                (precise1 - precise0) / window * 100.0,
                "% of a core",
            ));
        }
    }
    let (_, rss, hwm) = sample(pid)?;
    figures.push(("rss", rss as f64 / 1024.0, "MiB"));
    figures.push(("peak rss", hwm as f64 / 1024.0, "MiB"));
    let total = polls().await;
    figures.push((
        "store bytes per stored poll",
        store_bytes(&db, total)?,
        "B (file after checkpoint / polls)",
    ));
    Ok(figures)
}

fn per_poll_us(cpu_seconds: f64, polls: f64) -> f64 {
    if polls > 0.0 {
        cpu_seconds / polls * 1e6
    } else {
        f64::NAN
    }
}

/// How often [`wait_for`] reads the counter outside a measured window.
const FINE: Duration = Duration::from_millis(20);
/// How often [`wait_for`] reads the counter inside one (each read is a scrape the daemon pays).
const COARSE: Duration = Duration::from_millis(250);

/// Polls the counter every `every` until it reaches `target`; returns the value reached.
async fn wait_for<F, Fut>(
    polls: &F,
    target: f64,
    seconds: u64,
    every: Duration,
) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let now = polls().await;
        if now >= target {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("stored polls reached {now}, not {target}, within {seconds} s");
        }
        tokio::time::sleep(every).await;
    }
}

/// Seconds from the first to the last poll answered at or after `since` (Unix ms), from the
/// store's `poll_events` (since schema 4 an `ok` poll that stored readings is kept beside them,
/// not in `poll_log`; the view shows both).
fn tick_span(db: &Path, since: i64) -> anyhow::Result<f64> {
    let c = rusqlite::Connection::open(db)?;
    let (first, last): (Option<i64>, Option<i64>) = c.query_row(
        "SELECT min(at), max(at) FROM poll_events WHERE at >= ?1",
        [since],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    match (first, last) {
        // A tick answered within one millisecond (a smoke run) still has a span to divide by.
        (Some(f), Some(l)) => Ok(((l - f) as f64 / 1e3).max(1e-3)),
        _ => bail!("no poll in poll_events since {since}"),
    }
}

/// Waits until the counter has not moved for `still`; returns its value then.
async fn wait_still<F, Fut>(polls: &F, still: Duration, seconds: u64) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut last = (polls().await, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = polls().await;
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= still {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("stored polls never stood still for {still:?} within {seconds} s");
        }
    }
}

/// FLEET_PROFILE=FILE: a CPU profile of the daemon over the measured window (perf).
fn profile(pid: u32, seconds: u64) -> anyhow::Result<Option<Child>> {
    let Ok(out) = std::env::var("FLEET_PROFILE") else {
        return Ok(None);
    };
    let child = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "999"])
        .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string()])
        .args(["-o", &out, "--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (apt-get install linux-perf)")?;
    Ok(Some(child))
}

/// perf ends with its `sleep`; killing it would lose the profile.
fn finish_profile(perf: Option<&mut Child>) -> anyhow::Result<()> {
    if let Some(perf) = perf {
        perf.wait().context("waiting for perf")?;
    }
    Ok(())
}

fn config_text(base: &str, db: &Path, metrics_port: u16, p: &Params) -> String {
    let app = if p.api == "v3" {
        format!(
            "api_client_id = \"{API_ID}\"\napi_client_secret = \"{API_SECRET}\"\niam_url = \"{base}/oauth2/token\""
        )
    } else {
        String::new()
    };
    let concurrency = p
        .concurrency
        .map(|c| format!("concurrency = {c}\n"))
        .unwrap_or_default()
        + &p.max_in_flight
            .map(|c| format!("max_in_flight = {c}\n"))
            .unwrap_or_default();
    format!(
        r#"[smartcar]
client_id = "{CLIENT}"
client_secret = "{SECRET}"
mode = "simulated"
api = "{api}"
connect_url = "{base}/oauth/authorize"
token_url = "{base}/oauth/token"
api_v2_url = "{base}/v2.0"
api_v3_url = "{base}/v3"
v3_page_size = 100
{app}

[store]
path = "{db}"

[metrics]
listen = "127.0.0.1:{metrics_port}"
per_vehicle = {per_vehicle}

[schedule]
battery = "{cron}"
info = "0 0 0 1 1 *"
discover_every = "365d"
{spread}
[poll]
{concurrency}timeout = "30s"
"#,
        api = p.api,
        db = db.display(),
        per_vehicle = p.per_vehicle,
        cron = p.cron,
        spread = p
            .spread
            .map(|s| format!("spread = \"{s}\"\n"))
            .unwrap_or_default(),
    )
}

/// Connects every simulated user (Connect approval over HTTP, as a browser would) and writes
/// the connections and vehicles to the store, marked as discovered so no capability read runs.
async fn fill_store(
    http: &reqwest::Client,
    base: &str,
    db: &Path,
    p: &Params,
    users: usize,
) -> anyhow::Result<usize> {
    let fleet: serde_json::Value = http
        .get(format!("{base}/_simulator/vehicles"))
        .send()
        .await?
        .json()
        .await?;
    let store = Store::open(db, None)?;
    let mut n = 0;
    let scope = "read_vehicle_info read_vin read_battery read_charge read_odometer";
    for u in 1..=users {
        let loc = http
            .get(format!("{base}/oauth/authorize"))
            .query(&[
                ("response_type", "code"),
                ("client_id", CLIENT),
                ("redirect_uri", REDIRECT),
                ("scope", scope),
                ("state", "s"),
                ("mode", "simulated"),
                ("user", &u.to_string()),
                ("auto_approve", "true"),
            ])
            .send()
            .await?;
        let location = loc
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .context("no redirect from /oauth/authorize")?
            .to_owned();
        let url = reqwest::Url::parse(&location)?;
        let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
        let user = q
            .get("user_id")
            .context("no user_id on the redirect")?
            .clone();
        let tokens = if p.api == "v3" {
            None
        } else {
            let code = q.get("code").context("no code")?;
            let t: serde_json::Value = http
                .post(format!("{base}/oauth/token"))
                .basic_auth(CLIENT, Some(SECRET))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("redirect_uri", REDIRECT),
                ])
                .send()
                .await?
                .json()
                .await?;
            let now = now_ms();
            Some(TokenPair {
                access_token: carpulse::domain::Secret::new(
                    t["access_token"].as_str().context("access_token")?,
                ),
                refresh_token: carpulse::domain::Secret::new(
                    t["refresh_token"].as_str().context("refresh_token")?,
                ),
                access_expires_at: now + t["expires_in"].as_i64().unwrap_or(7200) * 1000,
                refresh_expires_at: now + REFRESH_TOKEN_LIFETIME_MS,
            })
        };
        let vehicles: Vec<(VehicleId, VehicleInfo)> = fleet["users"][u - 1]["vehicles"]
            .as_array()
            .context("fleet users")?
            .iter()
            .take(p.vehicles - n)
            .map(|v| {
                (
                    VehicleId(v["id"].as_str().unwrap_or_default().to_owned()),
                    VehicleInfo {
                        make: v["make"].as_str().unwrap_or_default().to_owned(),
                        model: v["model"].as_str().unwrap_or_default().to_owned(),
                        year: v["year"].as_i64().unwrap_or(2024) as i32,
                    },
                )
            })
            .collect();
        n += vehicles.len();
        store
            .call(move |c| {
                let now = now_ms();
                let conn = match &tokens {
                    Some(t) => queries::upsert_connection(c, &user, t, now)?,
                    None => queries::upsert_app_connection(c, &user, now)?,
                };
                for (id, info) in &vehicles {
                    queries::upsert_vehicle(c, conn, id, Some(info), now)?;
                    queries::save_discovery(c, id, &[], now)?;
                }
                Ok(())
            })
            .await?;
    }
    store.close().await?;
    Ok(n)
}

/// The store's bytes per stored poll after a checkpoint (readings, events and indexes).
fn store_bytes(db: &PathBuf, polls: f64) -> anyhow::Result<f64> {
    let c = rusqlite::Connection::open(db)?;
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .ok();
    let size = std::fs::metadata(db)?.len() as f64;
    Ok(if polls > 0.0 { size / polls } else { f64::NAN })
}
