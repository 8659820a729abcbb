//! `cargo bench --bench hotpath`: the in-process pieces of one poll, timed alone, so a change
//! to one of them can be measured in seconds instead of a fleet run. The fleet bench
//! (`benches/fleet.rs`) stays the judge of the whole; this one says where a poll's CPU goes
//! before and after a change to the parsers.
//!
//! `fixtures/v3-listing.json` is a one-page v3 signals listing (18 signals, 8.7 KB) as
//! `carpulse simulator` serves it with `pageSize=50` (what the fleet bench polls).
//!
//! Knobs: `HOTPATH_ITERS` (200000), `HOTPATH_ONLY` (time only the pieces whose name holds it,
//! e.g. for a perf profile of one). Without `--bench` (`cargo test --benches`) it runs a few
//! iterations as a smoke test.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use carpulse::domain::UnitSystem;
use carpulse::smartcar::v3;

const LISTING: &[u8] = include_bytes!("fixtures/v3-listing.json");

/// This thread's time on a CPU so far, in nanoseconds (Linux's `/proc/thread-self/schedstat`,
/// brought up to date at the kernel's ticks), when the system tells it. On a shared machine a run's wall time includes the minutes other
/// processes held the cores; its CPU time does not, so the two side by side show whether a
/// difference is the code's or the neighbours'.
fn cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Runs `f` `iters` times and prints nanoseconds per call: wall time, and CPU time when known.
fn time<T>(name: &str, iters: u64, mut f: impl FnMut() -> T) {
    if std::env::var("HOTPATH_ONLY").is_ok_and(|only| !name.contains(only.as_str())) {
        return;
    }
    // Warm caches and the allocator first.
    for _ in 0..iters.min(1000) {
        black_box(f());
    }
    let (start, cpu_start) = (Instant::now(), cpu_ns());
    for _ in 0..iters {
        black_box(f());
    }
    let ns = start.elapsed().as_nanos() as f64 / iters as f64;
    // The kernel updates the figure at its ticks: meaningless for a smoke run's few calls.
    let long = start.elapsed().as_millis() >= 200;
    match cpu_start.zip(cpu_ns()).filter(|_| long) {
        Some((a, b)) => {
            let cpu = b.saturating_sub(a) as f64 / iters as f64;
            println!("{name:<44} {ns:>10.0} ns   (CPU {cpu:>8.0} ns)");
        }
        None => println!("{name:<44} {ns:>10.0} ns"),
    }
}

fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let iters: u64 = match std::env::var("HOTPATH_ITERS") {
        Ok(s) => s.parse().context("HOTPATH_ITERS")?,
        Err(_) if bench => 200_000,
        Err(_) => 10,
    };
    let page = v3::parse_signals_bytes(LISTING, 1, Some("rid"))
        .context("the fixture listing does not parse on the fast path")?;
    ensure!(page.signals.len() == 7, "expected the 7 read signals");
    let readings = v3::pick_all(&page.signals, UnitSystem::Metric);
    ensure!(readings.iter().all(|r| r.result.is_ok()), "{readings:?}");

    println!("v3 listing: {} bytes, {} items", LISTING.len(), page.items);
    time("serde_json IgnoredAny (a scan's floor)", iters, || {
        serde_json::from_slice::<serde::de::IgnoredAny>(LISTING).is_ok()
    });
    time("serde_json Value (the tree)", iters, || {
        serde_json::from_slice::<serde_json::Value>(LISTING).is_ok()
    });
    time("v3::parse_signals_bytes", iters, || {
        v3::parse_signals_bytes(LISTING, 1, Some("rid"))
    });
    time("v3::pick_all", iters, || {
        v3::pick_all(&page.signals, UnitSystem::Metric)
    });
    Ok(())
}
