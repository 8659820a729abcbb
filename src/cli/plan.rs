//! `carpulse plan`: what the schedule costs. Smartcar bills per call and counts every batch
//! item (the free tier is about 500 calls per vehicle per month), so before running a schedule
//! a user should see its arithmetic — and be stopped when it is over the configured budget.

use std::fmt::Write as _;

use anyhow::bail;
use chrono::{DateTime, Duration as ChronoDuration, Utc};

use crate::config::{Config, Cron};
use crate::domain::ApiVersion;
use crate::smartcar::Job;

/// A month for billing purposes.
pub const MONTH_DAYS: i64 = 30;
/// Counting occurrences one by one past this many, the count is taken over one day and scaled.
const COUNT_CAP: u64 = 200_000;

/// Billed calls one run of a job makes for one vehicle, and what they are.
pub fn calls_per_run(api: ApiVersion, job: Job) -> (u64, &'static str) {
    match (api, job) {
        (ApiVersion::V2, Job::Battery) => (2, "one batch of /battery and /charge: 2 items"),
        (ApiVersion::V2, Job::Info) => (
            3,
            "GET /vehicles/{id} + a batch of /vin and /odometer: 1 + 2",
        ),
        (ApiVersion::V3, Job::Battery) => (1, "GET /signals (+1 per extra page)"),
        (ApiVersion::V3, Job::Info) => (2, "GET /vehicles/{id} + GET /signals (+1 per extra page)"),
    }
}

/// The runs of `cron` after `from` up to `end`, one by one. Stepped with
/// [`Cron::next_after`]: croner's own iterator skips every other second of a per-second
/// pattern (it steps past a match and then searches exclusively again).
fn runs_until(
    cron: &Cron,
    from: DateTime<Utc>,
    end: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    std::iter::successors(cron.next_after(&from), move |t| cron.next_after(t))
        .take_while(move |t| *t <= end)
}

/// How many runs of `a` in the `MONTH_DAYS` days after `from` fall on a run of `b` (same
/// second). Counted run by run up to [`COUNT_CAP`]; past that, 0 (the conservative answer).
pub fn coinciding_runs(a: &Cron, b: &Cron, from: DateTime<Utc>) -> u64 {
    let end = from + ChronoDuration::days(MONTH_DAYS);
    let mut n = 0;
    for (seen, run) in runs_until(a, from, end).enumerate() {
        if seen as u64 >= COUNT_CAP {
            return 0;
        }
        if b.runs_at(&run) {
            n += 1;
        }
    }
    n
}

/// How many times `expr` fires in the `MONTH_DAYS` days after `from`.
pub fn runs_per_month(cron: &Cron, from: DateTime<Utc>) -> u64 {
    let count_until = |end: DateTime<Utc>, cap: u64| -> u64 {
        runs_until(cron, from, end).take(cap as usize).count() as u64
    };
    let month_end = from + ChronoDuration::days(MONTH_DAYS);
    let n = count_until(month_end, COUNT_CAP);
    if n < COUNT_CAP {
        return n;
    }
    // Second-level schedules: count one day and scale (they are periodic within a day).
    count_until(from + ChronoDuration::days(1), COUNT_CAP * 10) * MONTH_DAYS as u64
}

/// The plan as text, and the total calls per vehicle per month.
pub fn plan(cfg: &Config, from: DateTime<Utc>) -> Result<(String, u64), String> {
    let api = cfg.smartcar.api;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "calls per vehicle in a {MONTH_DAYS}-day month (API {}, schedules in UTC):",
        match api {
            ApiVersion::V2 => "v2",
            ApiVersion::V3 => "v3",
        }
    );
    let mut total = 0u64;
    // Under v3 a battery tick that falls on an info tick is not made: the info job's listing
    // answers both (schedule::merge_ticks).
    let shared = match api {
        ApiVersion::V3 => coinciding_runs(&cfg.schedule.info, &cfg.schedule.battery, from),
        ApiVersion::V2 => 0,
    };
    for (job, expr) in [
        (Job::Battery, &cfg.schedule.battery),
        (Job::Info, &cfg.schedule.info),
    ] {
        let mut runs = runs_per_month(expr, from);
        if job == Job::Battery {
            runs = runs.saturating_sub(shared);
        }
        let (per, what) = calls_per_run(api, job);
        let calls = runs * per;
        total += calls;
        let _ = writeln!(
            out,
            "  {job:<8} {expr:<18} {runs:>9} runs x {per} = {calls:>10} calls   ({what})",
            job = job.label()
        );
    }
    // The charging cron adds calls only while a vehicle is plugged in: shown, not totalled.
    let charging = match &cfg.schedule.battery_charging {
        Some(expr) => {
            let runs = runs_per_month(expr, from);
            let (per, _) = calls_per_run(api, Job::Battery);
            Some((expr.clone(), runs, per))
        }
        None => None,
    };
    let every = cfg.schedule.discover_every.as_secs().max(1);
    let runs = (MONTH_DAYS as u64 * 86_400).div_ceil(every);
    total += runs;
    let _ = writeln!(
        out,
        "  {:<8} {:<18} {runs:>9} runs x 1 = {runs:>10} calls   ({})",
        "capabil.",
        format!(
            "every {}",
            crate::config::format_duration(cfg.schedule.discover_every)
        ),
        match api {
            ApiVersion::V2 => "GET /permissions",
            ApiVersion::V3 => "GET /signals",
        }
    );
    let _ = writeln!(
        out,
        "  {:<8} {:<18} {:>9}            {total:>10} calls",
        "total", "", ""
    );
    if shared > 0 {
        let _ = writeln!(
            out,
            "  ({shared} battery runs fall on an info run and share its listing; not counted twice)"
        );
    }
    if api == ApiVersion::V3 {
        let _ = writeln!(
            out,
            "  each v3 listing is one billed call per page: {}",
            match cfg.smartcar.v3_page_size {
                Some(n) => format!("smartcar.v3_page_size = {n}, so one page for a vehicle with up to {n} signals"),
                None => "the server's default page size is undocumented; set smartcar.v3_page_size (e.g. 100) and check it with `carpulse doctor`".to_owned(),
            }
        );
        if cfg.smartcar.app_auth() {
            let _ = writeln!(
                out,
                "  GET /v3/connections (hourly, API Authentication) is not billed to a vehicle"
            );
        }
    }
    if let Some((expr, runs, per)) = charging {
        let _ = writeln!(
            out,
            "  plus, only while plugged in: battery_charging {expr}, up to {runs} runs x {per} = {} calls \
             if plugged in all month (the daemon's budget ledger still stops short of the budget)",
            runs * per
        );
    }
    Ok((out, total))
}

/// What the store says was billed this month so far (when there is a store to read): the
/// fleet's total and the vehicle closest to the budget. A store written by a newer carpulse
/// is refused (exit 73), as by every command; no store, or an unreadable one, says nothing.
fn spent_so_far(cfg: &Config) -> anyhow::Result<Option<String>> {
    let c = match crate::cli::report::open_read_only(&cfg.store.path) {
        Ok(c) => c,
        Err(e) if e.is::<crate::exit::Permanent>() => return Err(e),
        Err(_) => return Ok(None),
    };
    let now = crate::domain::now_ms();
    let Ok(used) = crate::store::queries::calls_since(
        &c,
        crate::daemon::gate::month_start(now),
        cfg.smartcar.api,
    ) else {
        return Ok(None);
    };
    let Some((top, most)) = used.iter().max_by_key(|(_, n)| **n) else {
        return Ok(None);
    };
    Ok(Some(format!(
        "this month so far ({}): {} calls billed for {} vehicle(s); the most, {most}, by {}",
        cfg.store.path.display(),
        used.values().sum::<u64>(),
        used.len(),
        crate::cli::output::short_id(&top.0)
    )))
}

/// How fast Smartcar answers, as the pace check assumes: typically ~10 s, at worst 45 s
/// (smartcar-api.md: a request that wakes the car takes 3-45 s).
const TYPICAL_LATENCY_S: f64 = 10.0;
const WORST_LATENCY_S: f64 = 45.0;

/// Whether `vehicles` can be polled on the schedule with `poll.max_in_flight` requests at
/// once: per job, the requests in flight a tick needs to stay inside its spread window at a
/// typical latency, how long it takes when that is more than the pool, and a warning when at
/// the worst latency a tick would not finish before the next one (the daemon's log says the
/// same at run time, from the latency it sees).
pub fn pace(cfg: &Config, vehicles: u64, from: DateTime<Utc>) -> String {
    let mut out = String::new();
    let max = cfg.poll.max_in_flight.max(1) as f64;
    let _ = writeln!(
        out,
        "pace for {vehicles} enabled vehicle(s), poll.max_in_flight = {} (Smartcar answers in \
         3-45 s; ~{TYPICAL_LATENCY_S:.0} s assumed, {WORST_LATENCY_S:.0} s at worst):",
        cfg.poll.max_in_flight
    );
    let n = vehicles as f64;
    for (job, expr) in [
        ("battery", &cfg.schedule.battery),
        ("info", &cfg.schedule.info),
    ] {
        // The shortest gap between two runs in the month ahead (an uneven cron's short gap is
        // the one a slow tick overruns); counted run by run up to a bound.
        let end = from + ChronoDuration::days(MONTH_DAYS);
        let runs: Vec<_> = runs_until(expr, from, end).take(10_000).collect();
        let gap = runs
            .windows(2)
            .map(|w| (w[1] - w[0]).num_milliseconds() as f64 / 1e3)
            .fold(f64::INFINITY, f64::min);
        if !gap.is_finite() {
            let _ = writeln!(
                out,
                "  {job:<8} runs at most once in the next {MONTH_DAYS} days: nothing to pace"
            );
            continue;
        }
        let spread = cfg
            .schedule
            .spread
            .unwrap_or_else(|| crate::daemon::poller::default_spread(expr))
            .as_secs_f64();
        // What the daemon starts a tick with: the due rate times the latency, a quarter to
        // spare (all at once when there is no spread).
        let needed = if spread > 0.0 {
            crate::daemon::poller::workers_needed(
                vehicles as usize,
                std::time::Duration::from_secs_f64(spread),
                TYPICAL_LATENCY_S * 1e3,
            ) as f64
        } else {
            n
        };
        // A tick lasts its spread, or as long as the pool needs for the fleet, plus the last
        // answer's own latency.
        let typical = (n * TYPICAL_LATENCY_S / max).max(spread) + TYPICAL_LATENCY_S;
        let worst = (n * WORST_LATENCY_S / max).max(spread) + WORST_LATENCY_S;
        let verdict = if worst > gap {
            format!(
                "WARNING: at {WORST_LATENCY_S:.0} s a tick takes ~{}, longer than the {} between \
                 ticks: raise poll.max_in_flight or slow schedule.{job}",
                human(worst),
                human(gap)
            )
        } else if needed > max {
            format!(
                "needs ~{needed:.0} in flight to keep within its {} spread; with {} a tick takes \
                 ~{} (at worst ~{}), before the next one",
                human(spread),
                cfg.poll.max_in_flight,
                human(typical),
                human(worst)
            )
        } else {
            format!(
                "~{needed:.0} in flight keeps within its {} spread (at worst a tick takes ~{})",
                human(spread),
                human(worst)
            )
        };
        let _ = writeln!(out, "  {job:<8} every {:<9} {verdict}", human(gap));
    }
    out
}

/// Seconds as "45 s", "7.5 min" or "2.0 h".
fn human(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Enabled vehicles in the store, when there is one to read.
fn enabled_vehicles(cfg: &Config) -> Option<u64> {
    let c = crate::cli::report::open_read_only(&cfg.store.path).ok()?;
    c.query_row("SELECT count(*) FROM vehicles WHERE enabled", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .and_then(|n| u64::try_from(n).ok())
    .filter(|n| *n > 0)
}

/// `carpulse plan [--force]`, written to `out`.
pub fn run(cfg: &Config, force: bool, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let (text, total) = plan(cfg, Utc::now()).map_err(|e| anyhow::anyhow!(e))?;
    out.write_all(text.as_bytes())?;
    if let Some(spent) = spent_so_far(cfg)? {
        writeln!(out, "{spent}")?;
    }
    if let Some(vehicles) = enabled_vehicles(cfg) {
        out.write_all(pace(cfg, vehicles, Utc::now()).as_bytes())?;
    }
    let Some(budget) = cfg.budget.calls_per_vehicle_month else {
        writeln!(
            out,
            "no budget set ([budget] calls_per_vehicle_month); nothing to check against"
        )?;
        out.flush()?;
        return Ok(());
    };
    if total <= budget {
        writeln!(
            out,
            "within the budget of {budget} calls per vehicle per month ({:.0} % of it)",
            total as f64 * 100.0 / budget as f64
        )?;
        out.flush()?;
        return Ok(());
    }
    let over = format!(
        "{total} calls per vehicle per month is over the budget of {budget} ([budget] calls_per_vehicle_month) by {} ({:.0} % of it)",
        total - budget,
        total as f64 * 100.0 / budget as f64
    );
    if force {
        writeln!(out, "{over}; going ahead because of --force")?;
        out.flush()?;
        return Ok(());
    }
    out.flush()?;
    bail!("{over}: slow the schedule down, or pass --force to accept it")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_config(battery: &str, max_in_flight: usize) -> Config {
        let mut cfg = Config::defaults_for_reading(&crate::config::ProcessEnv);
        cfg.schedule.battery = Cron::parse(battery).unwrap();
        cfg.schedule.info = Cron::parse("0 0 4 * * *").unwrap();
        cfg.schedule.spread = None;
        cfg.poll.max_in_flight = max_in_flight;
        cfg
    }

    #[test]
    fn pace_says_what_a_fleet_needs_in_flight_and_when_a_tick_cannot_finish() {
        // 10,000 every 15 min over the default 60 s spread: ~2,084 in flight at 10 s, more
        // than the default 1,024, yet a tick ends long before the next.
        let p = pace(&fleet_config("0 */15 * * * *", 1024), 10_000, from());
        assert!(
            p.contains("pace for 10000 enabled vehicle(s), poll.max_in_flight = 1024"),
            "{p}"
        );
        assert!(p.contains("battery  every 15.0 min  needs ~2084 in flight to keep within its 60 s spread; with 1024 a tick takes ~108 s (at worst ~8.1 min), before the next one"), "{p}");
        assert!(!p.contains("WARNING"), "{p}");
        // Every 5 min with 64 in flight: at 45 s a tick takes ~117 min, past the next tick.
        let p = pace(&fleet_config("0 */5 * * * *", 64), 10_000, from());
        assert!(p.contains("battery  every 5.0 min   WARNING: at 45 s a tick takes ~117.9 min, longer than the 5.0 min between ticks"), "{p}");
        // A few cars fit easily.
        let p = pace(&fleet_config("0 */15 * * * *", 1024), 3, from());
        assert!(
            p.contains("battery  every 15.0 min  ~1 in flight keeps within its 60 s spread (at worst a tick takes ~105 s)"),
            "{p}"
        );
        // A cron that does not run twice in the month ahead has no pace to keep.
        let p = pace(&fleet_config("0 0 0 1 1 *", 1024), 10_000, from());
        assert!(
            p.contains("battery  runs at most once in the next 30 days: nothing to pace"),
            "{p}"
        );
    }

    fn from() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-01T00:00:30Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn monthly_runs_of_common_schedules() {
        let runs = |c: &str| runs_per_month(&Cron::parse(c).unwrap(), from());
        assert_eq!(runs("0 */15 * * * *"), 30 * 24 * 4);
        assert_eq!(runs("0 0 4 * * *"), 30);
        assert_eq!(runs("0 0 */6 * * *"), 120);
        // Every second: counted over a day and scaled.
        assert_eq!(runs("* * * * * *"), 30 * 86_400);
    }

    #[test]
    fn the_default_schedule_costs_this_much() {
        struct NoEnv;
        impl crate::config::Env for NoEnv {
            fn var(&self, _: &str) -> Option<String> {
                None
            }
        }
        let mut cfg = Config::parse(
            "[smartcar]\nclient_id = \"a\"\nclient_secret = \"b\"\n",
            "c.toml",
            &NoEnv,
        )
        .unwrap();
        let (text, total) = plan(&cfg, from()).unwrap();
        // Battery every 15 min, info daily, capabilities weekly: 5 times in 30 days. Under v3
        // the 30 battery runs at 04:00 share the info run's listing.
        assert_eq!(total, (2880 - 30) + 30 * 2 + 5, "{text}");
        assert!(text.contains("2850 runs x 1"), "{text}");
        assert!(
            text.contains("30 battery runs fall on an info run"),
            "{text}"
        );
        assert!(text.contains("every 7d"), "{text}");
        cfg.smartcar.api = ApiVersion::V2;
        let (_, total) = plan(&cfg, from()).unwrap();
        assert_eq!(total, 2880 * 2 + 30 * 3 + 5);
        // The charging cron is shown as a worst case, outside the total.
        cfg.schedule.battery_charging = Some(Cron::parse("0 */30 * * * *").unwrap());
        let (text, with_charging) = plan(&cfg, from()).unwrap();
        assert_eq!(with_charging, total);
        assert!(
            text.contains("up to 1440 runs x 2 = 2880 calls if plugged in all month"),
            "{text}"
        );
    }
}
