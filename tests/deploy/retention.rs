//! A year of four vehicles at the default cadence (v3 battery listing every 15 minutes: battery,
//! charge and odometer readings and four `ok` events per poll, a daily info poll, 2 % of polls
//! answered "asleep"), written through the real store writer tick by tick as the daemon would.
//! Default retention must keep it under 2 MB per vehicle, and the rollup views must agree with
//! the raw readings they summarise, before and after `retention.readings` prunes them.

use std::collections::BTreeMap;
use std::time::Duration;

use carpulse::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, PollEvent, Reading, Secret, Stamp,
    TokenPair, VehicleId,
};
use carpulse::store::retention::{self, Policy};
use carpulse::store::{queries, Store, WriteItem};

const VEHICLES: usize = 4;
const DAYS: i64 = 365;
const TICK_MS: i64 = 15 * 60_000;
/// 2026-01-01T00:00:00Z
const START: i64 = 1_767_225_600_000;
const END: i64 = START + DAYS * 86_400_000;

fn vid(i: usize) -> VehicleId {
    VehicleId(format!("{i:08x}-5f2d-4a21-8343-5727e965c661"))
}

/// A car's day: drives 08:00–08:45 and 17:30–18:30, charges from 21:00 until full on three
/// nights in four (sessions that run past midnight), parked otherwise.
struct Car {
    soc: f64,
    odometer_km: f64,
    plugged: bool,
    charging: bool,
}

impl Car {
    fn step(&mut self, t: i64, i: usize) -> (f64, bool, ChargeState) {
        let minute = (t / 60_000).rem_euclid(1440);
        let day = t / 86_400_000;
        let driving = (480..525).contains(&minute) || (1050..1110).contains(&minute);
        if driving {
            self.plugged = false;
            self.charging = false;
            self.soc = (self.soc - 1.7 - i as f64 * 0.1).max(5.0);
            self.odometer_km += 11.3 + i as f64;
        } else if minute == 1260 && (day + i as i64) % 4 != 0 {
            self.plugged = true;
            self.charging = true;
        }
        if self.charging {
            self.soc = (self.soc + 2.9).min(90.0);
            if self.soc >= 90.0 {
                self.charging = false;
            }
        }
        let state = match (self.plugged, self.charging) {
            (_, true) => ChargeState::Charging,
            (true, false) => ChargeState::FullyCharged,
            (false, false) => ChargeState::NotCharging,
        };
        // A little noise on the range estimate, as cars report it.
        let range = self.soc * 4.1 + ((t / TICK_MS) % 7) as f64 * 0.3;
        (range, self.plugged, state)
    }
}

fn event(
    v: &VehicleId,
    at: i64,
    endpoint: &'static str,
    outcome: &'static str,
    calls: u64,
) -> WriteItem {
    let failed = outcome != "ok";
    WriteItem::Event(PollEvent {
        vehicle_id: v.clone(),
        at,
        endpoint: endpoint.into(),
        outcome: outcome.into(),
        // As the poller writes them: an `ok` event has no status, a failure its answer's.
        http_status: failed.then_some(409),
        error_type: failed.then(|| "VEHICLE_STATE".into()),
        error_code: failed.then(|| "ASLEEP".into()),
        calls: Some(calls),
    })
}

/// Writes the year through the writer, one batch per tick (every vehicle's poll of that tick).
async fn write_year(store: &Store) {
    let ids: Vec<VehicleId> = (0..VEHICLES).map(vid).collect();
    let seed = ids.clone();
    store
        .call(move |c| {
            let tokens = TokenPair {
                access_token: Secret::new("a"),
                refresh_token: Secret::new("r"),
                access_expires_at: START,
                refresh_expires_at: START,
            };
            let conn = queries::upsert_connection(c, "user-1", &tokens, START)?;
            for v in &seed {
                queries::upsert_vehicle(c, conn, v, None, START)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let mut cars: Vec<Car> = (0..VEHICLES)
        .map(|i| Car {
            soc: 60.0 + i as f64,
            odometer_km: 12_000.0 * (i + 1) as f64,
            plugged: false,
            charging: false,
        })
        .collect();
    let mut t = START;
    let mut n = 0u64;
    while t < END {
        let mut items = Vec::with_capacity(VEHICLES * 8);
        for (i, v) in ids.iter().enumerate() {
            n += 1;
            let at = t + i as i64 * 977; // each vehicle at its own offset in the tick
            let (range, plugged, state) = cars[i].step(t, i);
            if n % 50 == 0 {
                // Asleep: a failed poll, no reading.
                items.push(event(v, at, "battery", "vehicle_state", 1));
                items.push(event(v, at, "charge", "vehicle_state", 0));
                continue;
            }
            let stamp = Stamp {
                recorded_at: at - 40_000 - (n % 13) as i64 * 1_000,
                // The poller stamps a poll with its answer's arrival.
                fetched_at: at,
            };
            let car = &cars[i];
            items.push(event(v, at, "battery", "ok", 1));
            items.push(WriteItem::Reading(
                v.clone(),
                Reading::Battery(BatteryReading {
                    stamp,
                    soc_percent: (car.soc * 100.0).round() / 100.0,
                    range_km: Some((range * 1000.0).round() / 1000.0),
                }),
            ));
            items.push(event(v, at, "charge", "ok", 0));
            items.push(WriteItem::Reading(
                v.clone(),
                Reading::Charge(ChargeReading {
                    stamp,
                    plugged_in: plugged,
                    state,
                }),
            ));
            // The v3 listing also carries the odometer and the VIN.
            items.push(event(v, at, "odometer", "ok", 0));
            items.push(WriteItem::Reading(
                v.clone(),
                Reading::Odometer(OdometerReading {
                    stamp,
                    odometer_km: (car.odometer_km * 1000.0).round() / 1000.0,
                }),
            ));
            items.push(event(v, at, "vin", "ok", 0));
            if (t / 60_000).rem_euclid(1440) == 240 {
                items.push(event(v, at + 5, "info", "ok", 1));
                items.push(WriteItem::Vin(v.clone(), "5YJ3E1EA7KF000001".into()));
            }
        }
        store.write(items).await.unwrap();
        t += TICK_MS;
    }
    store.flush().await.unwrap();
}

type Rows = Vec<Vec<rusqlite::types::Value>>;

async fn rows(store: &Store, sql: &'static str) -> Rows {
    store
        .call(move |c| {
            let mut stmt = c.prepare(sql)?;
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..n).map(|i| r.get(i)).collect::<Result<Vec<_>, _>>()
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .unwrap()
}

fn f(v: &rusqlite::types::Value) -> f64 {
    match v {
        rusqlite::types::Value::Integer(i) => *i as f64,
        rusqlite::types::Value::Real(r) => *r,
        other => panic!("not a number: {other:?}"),
    }
}

/// Checks each view row against the expected row, column by column (numbers to 1e-9).
fn agree(what: &str, view: &Rows, expected: &Rows) {
    assert_eq!(view.len(), expected.len(), "{what}: row count");
    for (a, b) in view.iter().zip(expected) {
        for (x, y) in a.iter().zip(b) {
            match (x, y) {
                (rusqlite::types::Value::Text(x), rusqlite::types::Value::Text(y)) => {
                    assert_eq!(x, y, "{what}: {a:?} vs {b:?}")
                }
                (rusqlite::types::Value::Null, rusqlite::types::Value::Null) => {}
                (x, y) => assert!((f(x) - f(y)).abs() < 1e-9, "{what}: {a:?} vs {b:?}"),
            }
        }
    }
}

/// Charging sessions computed here, independently of the SQL: runs of CHARGING readings,
/// ended by the next reading.
fn sessions_from(charge: &Rows, battery: &BTreeMap<(String, i64), f64>) -> Rows {
    use rusqlite::types::Value;
    let mut out = Vec::new();
    let mut i = 0;
    while i < charge.len() {
        let (v, at, state) = (&charge[i][0], f(&charge[i][1]) as i64, &charge[i][2]);
        if *state != Value::Text("CHARGING".into()) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 1 < charge.len()
            && charge[j + 1][0] == *v
            && charge[j + 1][2] == Value::Text("CHARGING".into())
        {
            j += 1;
        }
        let vehicle = match v {
            Value::Text(s) => s.clone(),
            _ => unreachable!(),
        };
        let ender = (j + 1 < charge.len() && charge[j + 1][0] == *v).then(|| j + 1);
        let soc_at = |k: usize| {
            battery
                .get(&(vehicle.clone(), f(&charge[k][1]) as i64))
                .copied()
        };
        let soc_end = ender.and_then(soc_at).or_else(|| soc_at(j));
        out.push(vec![
            v.clone(),
            Value::Integer(at),
            ender.map_or(Value::Null, |k| charge[k][1].clone()),
            Value::Integer((j - i + 1) as i64),
            soc_at(i).map_or(Value::Null, Value::Real),
            soc_end.map_or(Value::Null, Value::Real),
            ender.map_or(Value::Null, |k| charge[k][2].clone()),
        ]);
        i = j + 1;
    }
    out
}

const HOURLY_VIEW: &str = "SELECT vehicle_id, hour, readings, soc_avg_percent, soc_min_percent,
    soc_max_percent, range_avg_km, range_min_km, range_max_km FROM battery_hourly
    ORDER BY vehicle_id, hour";
const HOURLY_RAW: &str = "SELECT vehicle_id, CAST(recorded_at / 3600000 AS INTEGER) * 3600000,
    count(*), avg(soc_percent), min(soc_percent), max(soc_percent), avg(range_km),
    min(range_km), max(range_km) FROM battery_history GROUP BY 1, 2 ORDER BY 1, 2";
const DAILY_VIEW: &str = "SELECT vehicle_id, day, readings, soc_avg_percent, soc_min_percent,
    soc_max_percent, range_avg_km FROM battery_daily ORDER BY vehicle_id, day";
const DAILY_RAW: &str = "SELECT vehicle_id, CAST(recorded_at / 86400000 AS INTEGER) * 86400000,
    count(*), avg(soc_percent), min(soc_percent), max(soc_percent), avg(range_km)
    FROM battery_history GROUP BY 1, 2 ORDER BY 1, 2";
const ODOMETER_VIEW: &str = "SELECT vehicle_id, day, readings, odometer_min_km, odometer_max_km, km
    FROM odometer_daily ORDER BY vehicle_id, day";
const ODOMETER_RAW: &str = "SELECT vehicle_id, CAST(recorded_at / 86400000 AS INTEGER) * 86400000,
    count(*), min(odometer_km), max(odometer_km), max(odometer_km) - min(odometer_km)
    FROM odometer_history GROUP BY 1, 2 ORDER BY 1, 2";
const SESSIONS_VIEW: &str = "SELECT vehicle_id, started_at, ended_at, readings, soc_start_percent,
    soc_end_percent, end_state FROM charge_sessions ORDER BY vehicle_id, started_at";

#[tokio::test]
async fn a_year_with_default_retention_stays_under_2_mb_per_vehicle_and_rollups_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("year.db");
    let store = Store::open(&path, None).unwrap();
    write_year(&store).await;

    // The rollup views agree with the raw readings they summarise.
    agree(
        "battery_hourly",
        &rows(&store, HOURLY_VIEW).await,
        &rows(&store, HOURLY_RAW).await,
    );
    agree(
        "battery_daily",
        &rows(&store, DAILY_VIEW).await,
        &rows(&store, DAILY_RAW).await,
    );
    agree(
        "odometer_daily",
        &rows(&store, ODOMETER_VIEW).await,
        &rows(&store, ODOMETER_RAW).await,
    );
    let charge = rows(
        &store,
        "SELECT vehicle_id, recorded_at, state FROM charge_history ORDER BY vehicle_id, recorded_at",
    )
    .await;
    let battery: BTreeMap<(String, i64), f64> = rows(
        &store,
        "SELECT vehicle_id, recorded_at, soc_percent FROM battery_history",
    )
    .await
    .iter()
    .map(|r| match &r[0] {
        rusqlite::types::Value::Text(v) => ((v.clone(), f(&r[1]) as i64), f(&r[2])),
        _ => unreachable!(),
    })
    .collect();
    let sessions = rows(&store, SESSIONS_VIEW).await;
    assert!(
        sessions.len() > 200 * VEHICLES,
        "{} sessions",
        sessions.len()
    );
    agree(
        "charge_sessions",
        &sessions,
        &sessions_from(&charge, &battery),
    );

    // Default retention: ok poll events older than 90 days go, everything else stays.
    let policy = Policy::default();
    let summary = store
        .call(move |c| retention::run_all(c, &policy, END))
        .await
        .unwrap();
    assert!(summary.events_deleted > 0);
    assert_eq!(
        summary.readings_deleted, 0,
        "readings are kept forever by default"
    );
    let oldest_ok = f(&rows(
        &store,
        "SELECT min(at) FROM poll_events WHERE outcome = 'ok'",
    )
    .await[0][0]) as i64;
    assert!(oldest_ok >= END - 90 * 86_400_000);
    let failures = rows(
        &store,
        "SELECT count(*) FROM poll_events WHERE outcome <> 'ok'",
    )
    .await;
    assert!(f(&failures[0][0]) > 0.0, "failed polls are kept");
    let battery_rows = f(&rows(&store, "SELECT count(*) FROM battery_history").await[0][0]);
    store.close().await.unwrap();

    let bytes = std::fs::metadata(&path).unwrap().len()
        + std::fs::metadata(dir.path().join("year.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    let per_vehicle = bytes as f64 / VEHICLES as f64;
    println!(
        "a vehicle-year at 15 min with default retention: {:.2} MB per vehicle ({:.1} bytes per \
         poll; {battery_rows} battery readings)",
        per_vehicle / 1e6,
        per_vehicle / (DAYS * 96) as f64
    );
    assert!(
        per_vehicle < 2.0e6,
        "{per_vehicle} bytes per vehicle-year is over 2 MB"
    );
}

/// `retention.readings` summarises before it deletes: the rollup views show the same rows
/// before and after, while the raw readings below the cutoff are gone.
#[tokio::test]
async fn pruned_readings_live_on_in_the_rollup_views() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prune.db");
    let store = Store::open(&path, None).unwrap();
    write_year(&store).await;
    let before = [
        rows(&store, HOURLY_VIEW).await,
        rows(&store, DAILY_VIEW).await,
        rows(&store, ODOMETER_VIEW).await,
        rows(&store, SESSIONS_VIEW).await,
    ];
    let policy = Policy {
        readings: Some(Duration::from_secs(30 * 86_400)),
        ..Policy::default()
    };
    let summary = store
        .call(move |c| retention::run_all(c, &policy, END))
        .await
        .unwrap();
    assert!(summary.readings_deleted > 0);
    // Small steps: about a week of one vehicle each.
    assert!(
        summary.steps as i64 >= VEHICLES as i64 * (DAYS - 30) / retention::DAYS_PER_STEP,
        "{summary:?}"
    );
    let after = [
        rows(&store, HOURLY_VIEW).await,
        rows(&store, DAILY_VIEW).await,
        rows(&store, ODOMETER_VIEW).await,
        rows(&store, SESSIONS_VIEW).await,
    ];
    for (name, (b, a)) in [
        "battery_hourly",
        "battery_daily",
        "odometer_daily",
        "charge_sessions",
    ]
    .iter()
    .zip(before.iter().zip(after.iter()))
    {
        agree(name, a, b);
    }
    let oldest =
        f(&rows(&store, "SELECT min(recorded_at) FROM battery_history").await[0][0]) as i64;
    assert!(
        oldest >= END - 31 * 86_400_000,
        "raw readings below the cutoff are gone"
    );
    assert!(oldest < END - 29 * 86_400_000, "the last 30 days stay raw");
    // A late reading below the cutoff joins its hour's summary at the next run.
    const HOUR_SQL: &str = "SELECT readings, soc_min_percent FROM battery_hourly
         WHERE vehicle_id = '00000000-5f2d-4a21-8343-5727e965c661' AND hour = 1767243600000";
    let hour_before = f(&rows(&store, HOUR_SQL).await[0][0]);
    let late_at = START + 3_600_000 * 5 + 60_000;
    store
        .write(vec![WriteItem::Reading(
            vid(0),
            Reading::Battery(BatteryReading {
                stamp: Stamp {
                    recorded_at: late_at,
                    fetched_at: END,
                },
                soc_percent: 10.0,
                range_km: None,
            }),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();
    store
        .call(move |c| retention::run_all(c, &policy, END))
        .await
        .unwrap();
    let hour = rows(&store, HOUR_SQL).await;
    assert_eq!(hour.len(), 1);
    assert_eq!(
        f(&hour[0][0]),
        hour_before + 1.0,
        "the hour's readings and the late one"
    );
    assert_eq!(f(&hour[0][1]), 10.0);
    store.close().await.unwrap();
}

/// The daemon's hourly pass (`maintenance::retention_once`, one owner-thread call per step)
/// prunes what the policy no longer keeps and gives steps only to vehicles that have some
/// (issue 8: probing costs an index seek, a step a statement; most vehicles have nothing).
#[tokio::test]
async fn the_daemons_retention_pass_steps_only_through_vehicles_with_old_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hourly.db"), None).unwrap();
    let ids: Vec<VehicleId> = (0..40).map(vid).collect();
    let seed = ids.clone();
    store
        .call(move |c| {
            let tokens = TokenPair {
                access_token: Secret::new("a"),
                refresh_token: Secret::new("r"),
                access_expires_at: START,
                refresh_expires_at: START,
            };
            let conn = queries::upsert_connection(c, "user-1", &tokens, START)?;
            for v in &seed {
                queries::upsert_vehicle(c, conn, v, None, START)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let now = carpulse::domain::now_ms();
    let old = now - 100 * 86_400_000;
    let mut items = Vec::new();
    for v in &ids {
        items.push(event(v, now - 60_000, "battery", "ok", 1));
    }
    // Of 40 vehicles, two have ok events past the default 90 days, one an old failure.
    items.push(event(&ids[3], old, "battery", "ok", 1));
    items.push(event(&ids[3], old + 1, "charge", "ok", 0));
    items.push(event(&ids[17], old, "battery", "ok", 1));
    items.push(event(&ids[30], old, "battery", "asleep", 1));
    store.write(items).await.unwrap();
    store.flush().await.unwrap();
    let outcomes = rows(&store, OUTCOMES_RAW).await;

    let summary = carpulse::daemon::maintenance::retention_once(
        &store,
        &Policy::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.events_deleted, 3, "{summary:?}");
    assert_eq!(
        summary.steps, 2,
        "one step each for the two vehicles with old ok events"
    );
    let left = rows(
        &store,
        "SELECT count(*), sum(outcome = 'ok'), min(at) FROM poll_events",
    )
    .await;
    assert_eq!(
        f(&left[0][0]) as i64,
        41,
        "40 recent events and the old failure"
    );
    assert_eq!(f(&left[0][1]) as i64, 40);
    assert_eq!(f(&left[0][2]) as i64, old, "failures are kept");
    // The pass summarised the closed days first: the pruned days' counts are still there.
    assert!(summary.rollup_steps >= 3, "{summary:?}");
    let watermark = store
        .call(|c| carpulse::store::rollup::watermark(c))
        .await
        .unwrap();
    assert!(watermark > old, "{watermark}");
    agree(
        "poll outcomes per day after the daemon's pass",
        &rows(&store, OUTCOMES_VIEW).await,
        &outcomes,
    );
    // Nothing left to prune: no step at all.
    let again = carpulse::daemon::maintenance::retention_once(
        &store,
        &Policy::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(again, Default::default());
}

const OUTCOMES_VIEW: &str = "SELECT vehicle_id, day, endpoint, outcome, sum(polls), sum(calls)
    FROM poll_outcomes_daily GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
const OUTCOMES_RAW: &str = "SELECT vehicle_id, at / 86400000 * 86400000, endpoint, outcome,
    count(*), sum(calls) FROM poll_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";

/// The rows of `rows` whose day (their second column) is `from` or later.
fn days_from(rows: &Rows, from: i64) -> Rows {
    rows.iter()
        .filter(|r| (f(&r[1]) as i64) >= from)
        .cloned()
        .collect()
}

/// `poll_outcomes_daily` counts what `poll_events` holds, per vehicle, day, endpoint and
/// outcome: live before the rollup's pass, from the rollup after it, and for the summarised
/// days still after retention let their `ok` events go. A pass cut short counts nothing twice.
#[tokio::test]
async fn poll_outcomes_per_day_outlive_the_poll_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("outcomes.db"), None).unwrap();
    write_year(&store).await;
    let events = rows(&store, OUTCOMES_RAW).await;
    assert!(
        events.len() > VEHICLES * DAYS as usize * 4,
        "{} rows",
        events.len()
    );
    agree(
        "nothing summarised",
        &rows(&store, OUTCOMES_VIEW).await,
        &events,
    );

    // A pass cut short: two vehicles' first steps written, the watermark not moved.
    let (first, second) = store
        .call(|c| {
            let target = carpulse::store::rollup::closed_before(END);
            let keys = retention::vehicles(c)?;
            let a = carpulse::store::rollup::step(c, keys[0].0, 0, target)?;
            let b = carpulse::store::rollup::step(c, keys[1].0, 0, target)?;
            // The same step again rewrites its days: still once each.
            carpulse::store::rollup::step(c, keys[1].0, 0, target)?;
            Ok((a, b))
        })
        .await
        .unwrap();
    assert!(first > START && second > START);
    agree(
        "a pass cut short",
        &rows(&store, OUTCOMES_VIEW).await,
        &events,
    );

    let pass = store
        .call(|c| carpulse::store::rollup::run_all(c, END))
        .await
        .unwrap();
    // The year's last day closes at END, and is summarised 15 minutes after.
    assert_eq!(pass.watermark, END - 86_400_000);
    assert!(pass.steps >= VEHICLES * (DAYS as usize - 1) / 7, "{pass:?}");
    agree("summarised", &rows(&store, OUTCOMES_VIEW).await, &events);
    let summarised: i64 = store
        .call(|c| Ok(c.query_row("SELECT count(*) FROM poll_rollup_days", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert!(summarised > 0);

    // Default retention: the `ok` events older than 90 days leave poll_events, not the counts.
    let summary = store
        .call(|c| retention::run_all(c, &Policy::default(), END))
        .await
        .unwrap();
    assert!(summary.events_deleted > 0, "{summary:?}");
    assert_eq!(summary.rollup_steps, 0, "the pass before had done it all");
    let after_events = rows(&store, OUTCOMES_RAW).await;
    assert!(after_events.len() < events.len(), "ok events were let go");
    let horizon = END - 90 * 86_400_000;
    agree(
        "poll_events after retention, from its horizon on",
        &days_from(&after_events, horizon),
        &days_from(&events, horizon),
    );
    agree(
        "every day's counts after retention",
        &rows(&store, OUTCOMES_VIEW).await,
        &events,
    );
    store.close().await.unwrap();
}

/// Retention never lets an event go before its day is summarised: under a policy shorter
/// than a day, the open day's events wait (the rollup's watermark bounds the pruning).
#[tokio::test]
async fn retention_waits_for_the_rollup_of_a_day_before_letting_its_events_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("short.db"), None).unwrap();
    write_year(&store).await;
    let events = rows(&store, OUTCOMES_RAW).await;
    let policy = Policy {
        readings: None,
        ok_poll_events: Some(Duration::from_secs(60)),
        other_poll_events: Some(Duration::from_secs(60)),
    };
    // At 00:05 on the day after the year, its last day is not closed yet: it keeps its events.
    let now = END + 5 * 60_000;
    store
        .call(move |c| retention::run_all(c, &policy, now))
        .await
        .unwrap();
    let last_day = END - 86_400_000;
    let left = rows(&store, OUTCOMES_RAW).await;
    assert!(!left.is_empty());
    assert!(
        left.iter().all(|r| f(&r[1]) as i64 == last_day),
        "only the last, open day's events are left"
    );
    agree(
        "the last day's events are all there",
        &left,
        &days_from(&events, last_day),
    );
    agree(
        "every day's counts",
        &rows(&store, OUTCOMES_VIEW).await,
        &events,
    );
    store.close().await.unwrap();
}
