//! `cargo bench --bench writer`: the store thread's CPU per stored poll, measured in-process on
//! the real writer (issue 8: the fleet profile put 15 % of the daemon's CPU on it), so a change
//! to the writer, its SQL or its pragmas is measured in half a minute without the fleet bench.
//!
//! A fresh store gets N vehicles; then each round polls every vehicle once, as the fleet bench's
//! v3 poll reaches the store: one `Store::write` per poll holding the battery, charge and
//! odometer readings at the vehicle's own instant and the VIN the listing carries, each after
//! its endpoint's `ok` event (as the poller queues them, and as `benches/storage.rs` models a
//! v3 listing; the writer keeps those events in the readings' row). Polls are queued at a steady rate (default 1,000/s, the fleet bench's
//! stored rate), so the owner thread forms the batches the daemon's does (its linger decides
//! their size), and the rounds follow each other as the fleet bench's 10-second ticks do. Each
//! round visits the vehicles in its own scattered order (the daemon's answers arrive in no
//! particular order), so a batch's polls land on as many leaf pages as the fleet bench's do
//! (readings are vehicle-major): in order, a fresh store's neighbours would share pages.
//!
//! What is measured, per run, on the store's owner thread only (`carpulse-store`, found by
//! name in `/proc/self/task`): its CPU time (`schedstat`, ns; the feeder's own is excluded),
//! its write system calls and bytes (`/proc/self/task/TID/io`: WAL frames, checkpoints), and
//! the batches the writer committed (its observer). Each is divided by the stored polls (the
//! battery readings the writer reports written: every poll must be, or the bench fails).
//!
//! Knobs (environment): `WRITER_VEHICLES` (10,000), `WRITER_ROUNDS` (2), `WRITER_RATE` (polls
//! per second, 1,000), `WRITER_RUNS` (3), `WRITER_DIR` (where the stores are built; unset: the
//! system's temporary directory), `WRITER_PRAGMAS` (e.g. `wal_autocheckpoint=4000`, comma
//! separated: set on the writer's own connection before the polls, to try a setting without a
//! rebuild), `WRITER_PAGE_SIZE` (the page size of the new store: the file is made with it, and
//! `auto_vacuum=INCREMENTAL` as the store makes it, before `Store::open` sees it empty of
//! tables; unset: the store's own). Under `perf record -g` the thread's samples are the
//! writer's: `perf record -g -t TID` or `perf report --comm carpulse-store`. Without
//! `--bench` (`cargo test --benches`) it is a smoke run of 50 vehicles.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use carpulse::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, PollEvent, Reading, Secret, Stamp,
    TokenPair, VehicleId,
};
use carpulse::store::{queries, Store, WriteItem, WriteObserver};

/// 2026-11-01T00:00:00Z, the first round's start.
const T0: i64 = 1_793_491_200_000;
/// The fleet bench's battery cron: a round every 10 s of data time.
const ROUND_MS: i64 = 10_000;

struct Params {
    vehicles: usize,
    rounds: usize,
    rate: f64,
    runs: usize,
    dir: Option<std::path::PathBuf>,
    pragmas: Vec<(String, String)>,
    page_size: Option<u32>,
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={s:?} is not a valid number")),
        Err(_) => Ok(default),
    }
}

fn vid(i: usize) -> VehicleId {
    VehicleId(format!("{i:08x}-5f2d-4a21-8343-5727e965c661"))
}

/// One v3 poll of vehicle `i` in round `r`, as the poller queues it.
fn poll(v: &VehicleId, i: usize, r: usize) -> Vec<WriteItem> {
    let at = T0 + r as i64 * ROUND_MS + i as i64;
    // Each car reports at its own instant, a few seconds before the answer.
    let stamp = Stamp {
        recorded_at: at - 2_000 - (i % 7) as i64 * 1_000,
        fetched_at: at,
    };
    let soc = 40.0 + ((i + r) % 50) as f64 + 0.25;
    let event = |endpoint: &'static str, calls: u64| {
        WriteItem::Event(PollEvent {
            vehicle_id: v.clone(),
            at,
            endpoint: endpoint.into(),
            outcome: "ok".into(),
            http_status: None,
            error_type: None,
            error_code: None,
            calls: Some(calls),
        })
    };
    vec![
        event("battery", 1),
        WriteItem::Reading(
            v.clone(),
            Reading::Battery(BatteryReading {
                stamp,
                soc_percent: soc,
                range_km: Some(soc * 4.1),
            }),
        ),
        event("charge", 0),
        WriteItem::Reading(
            v.clone(),
            Reading::Charge(ChargeReading {
                stamp,
                plugged_in: i % 3 == 0,
                state: if i % 3 == 0 {
                    ChargeState::Charging
                } else {
                    ChargeState::NotCharging
                },
            }),
        ),
        event("odometer", 0),
        WriteItem::Reading(
            v.clone(),
            Reading::Odometer(OdometerReading {
                stamp,
                odometer_km: 10_000.0 + (i * 7 + r) as f64,
            }),
        ),
        event("vin", 0),
        WriteItem::Vin(v.clone(), format!("5YJ3E1EA7KF{:06}", i % 1_000_000)),
    ]
}

/// A step through the vehicles that visits each once per round: prime to their number.
fn coprime_stride(n: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    (7_919..).find(|s| gcd(*s, n) == 1).unwrap_or(1)
}

/// The id of this process's thread named `name`.
fn thread_id(name: &str) -> anyhow::Result<String> {
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    anyhow::bail!("no thread named {name}")
}

/// A thread's CPU time (ns), write system calls and bytes written so far.
#[derive(Clone, Copy)]
struct Usage {
    cpu_ns: u64,
    syscw: u64,
    wchar: u64,
}

fn usage(tid: &str) -> anyhow::Result<Usage> {
    let task = Path::new("/proc/self/task").join(tid);
    let sched = std::fs::read_to_string(task.join("schedstat")).context("reading schedstat")?;
    let cpu_ns = sched
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("parsing schedstat")?;
    let io = std::fs::read_to_string(task.join("io")).context("reading the thread's io")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("no {name} in the thread's io"))
    };
    Ok(Usage {
        cpu_ns,
        syscw: field("syscw:")?,
        wchar: field("wchar:")?,
    })
}

struct Run {
    polls: u64,
    cpu_us_per_poll: f64,
    writes_per_poll: f64,
    bytes_per_poll: f64,
    polls_per_batch: f64,
    wall_s: f64,
}

fn one_run(p: &Params, dir: &Path, run: usize) -> anyhow::Result<Run> {
    let db = dir.join(format!("writer-{run}.db"));
    if let Some(size) = p.page_size {
        let c = rusqlite::Connection::open(&db).context("WRITER_PAGE_SIZE: creating the file")?;
        c.execute_batch(&format!(
            "PRAGMA page_size = {size}; PRAGMA auto_vacuum = INCREMENTAL;
             CREATE TABLE page_size_probe (x); DROP TABLE page_size_probe;"
        ))
        .context("WRITER_PAGE_SIZE: setting the page size")?;
    }
    let batches = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let observer: WriteObserver = {
        let (batches, stored, dropped) = (batches.clone(), stored.clone(), dropped.clone());
        Arc::new(move |r| {
            batches.fetch_add(1, Ordering::Relaxed);
            stored.fetch_add(r.written_in("battery"), Ordering::Relaxed);
            let lost: u64 = r.dropped.iter().map(|(_, n)| n).sum();
            dropped.fetch_add(lost, Ordering::Relaxed);
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async {
        let store = Store::open(&db, Some(observer)).context("opening the store")?;
        let ids: Vec<VehicleId> = (0..p.vehicles).map(vid).collect();
        let seed = ids.clone();
        store
            .call(move |c| {
                let tokens = TokenPair {
                    access_token: Secret::new("a"),
                    refresh_token: Secret::new("r"),
                    access_expires_at: T0,
                    refresh_expires_at: T0,
                };
                let conn = queries::upsert_connection(c, "user-1", &tokens, T0)?;
                let tx = c.transaction()?;
                for v in &seed {
                    queries::upsert_vehicle(&tx, conn, v, None, T0)?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .context("seeding the vehicles")?;
        for (name, value) in p.pragmas.clone() {
            store
                .call(move |c| {
                    c.pragma_update(None, &name, &value)
                        .with_context(|| format!("WRITER_PRAGMAS: {name}={value}"))
                })
                .await?;
        }
        store.flush().await?;
        let tid = thread_id("carpulse-store")?;
        let (b0, s0) = (
            batches.load(Ordering::Relaxed),
            stored.load(Ordering::Relaxed),
        );
        let before = usage(&tid)?;
        let began = Instant::now();
        let every = Duration::from_secs_f64(1.0 / p.rate);
        let mut n = 0u32;
        let stride = coprime_stride(p.vehicles);
        for r in 0..p.rounds {
            for k in 0..p.vehicles {
                let i = (k * stride + r * 7_777) % p.vehicles;
                let v = &ids[i];
                // Paced by a deadline, a few polls per wake-up (a timer wakes at most every ms).
                let due = began + every * n;
                if due > Instant::now() + Duration::from_millis(2) {
                    tokio::time::sleep_until(due.into()).await;
                }
                store.write(poll(v, i, r)).await?;
                n += 1;
            }
        }
        store.flush().await?;
        let wall_s = began.elapsed().as_secs_f64();
        let after = usage(&tid)?;
        store.close().await.context("closing the store")?;
        let polls = stored.load(Ordering::Relaxed) - s0;
        ensure!(
            polls == n as u64 && dropped.load(Ordering::Relaxed) == 0,
            "{n} polls queued, {polls} stored, {} rows dropped",
            dropped.load(Ordering::Relaxed)
        );
        let per = |x: u64| x as f64 / polls as f64;
        anyhow::Ok(Run {
            polls,
            cpu_us_per_poll: per(after.cpu_ns - before.cpu_ns) / 1_000.0,
            writes_per_poll: per(after.syscw - before.syscw),
            bytes_per_poll: per(after.wchar - before.wchar),
            polls_per_batch: polls as f64 / (batches.load(Ordering::Relaxed) - b0).max(1) as f64,
            wall_s,
        })
    })
}

fn spread(v: &[f64], decimals: usize) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    format!(
        "{median:.decimals$} ({:.decimals$}–{:.decimals$})",
        s[0],
        s[s.len() - 1]
    )
}

fn main() -> anyhow::Result<()> {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let p = Params {
        vehicles: env_parse("WRITER_VEHICLES", if smoke { 50 } else { 10_000 })?,
        rounds: env_parse("WRITER_ROUNDS", 2)?,
        rate: env_parse("WRITER_RATE", if smoke { 5_000.0 } else { 1_000.0 })?,
        runs: env_parse("WRITER_RUNS", if smoke { 1 } else { 3 })?,
        dir: std::env::var_os("WRITER_DIR").map(Into::into),
        page_size: match std::env::var("WRITER_PAGE_SIZE") {
            Ok(s) => Some(s.parse().context("WRITER_PAGE_SIZE")?),
            Err(_) => None,
        },
        pragmas: std::env::var("WRITER_PRAGMAS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| match s.split_once('=') {
                Some((n, v)) => Ok((n.trim().to_owned(), v.trim().to_owned())),
                None => Err(anyhow::anyhow!("WRITER_PRAGMAS: {s:?} is not name=value")),
            })
            .collect::<anyhow::Result<_>>()?,
    };
    ensure!(
        p.vehicles > 0 && p.rounds > 0 && p.runs > 0 && p.rate > 0.0,
        "WRITER_VEHICLES, WRITER_ROUNDS, WRITER_RUNS and WRITER_RATE must be positive"
    );
    let dir = match &p.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating the bench's directory")?;
    println!(
        "writer: {} vehicles, {} round(s) at {} polls/s (v3 listing: 3 readings + VIN, 4 ok events), {} run(s){}{}",
        p.vehicles,
        p.rounds,
        p.rate,
        p.runs,
        p.pragmas
            .iter()
            .map(|(n, v)| format!(", {n}={v}"))
            .collect::<String>(),
        if cfg!(debug_assertions) {
            " — debug build, times are not representative"
        } else {
            ""
        }
    );
    let mut runs = Vec::new();
    for run in 1..=p.runs {
        let r = one_run(&p, dir.path(), run).with_context(|| format!("run {run}"))?;
        println!(
            "run {run}: {} polls in {:.1} s, store thread {:.1} µs/poll, {:.2} writes/poll, \
             {:.0} bytes written/poll, {:.0} polls/batch",
            r.polls,
            r.wall_s,
            r.cpu_us_per_poll,
            r.writes_per_poll,
            r.bytes_per_poll,
            r.polls_per_batch
        );
        runs.push(r);
    }
    let fig = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    println!("result (median (min–max) over {} run(s))", runs.len());
    println!(
        "  store thread CPU per stored poll   {} µs",
        spread(&fig(&|r| r.cpu_us_per_poll), 1)
    );
    println!(
        "  write syscalls per stored poll     {}",
        spread(&fig(&|r| r.writes_per_poll), 2)
    );
    println!(
        "  bytes written per stored poll      {}",
        spread(&fig(&|r| r.bytes_per_poll), 0)
    );
    println!(
        "  polls per batch                    {}",
        spread(&fig(&|r| r.polls_per_batch), 0)
    );
    Ok(())
}
