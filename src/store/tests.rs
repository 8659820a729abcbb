//! Tests of the store through its real parts: real SQLite files in temp dirs, the real owner
//! thread, and independent connections reading what it wrote.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::queries::{self, VehicleRecord};
use super::*;
use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, ConnectionId, OdometerReading, PollEvent, Reading,
    Secret, Stamp, TokenPair, VehicleId, VehicleInfo,
};

const ACCESS: &str = "acc-8c5d-417d-a99f-c386cfc235cc";
const REFRESH: &str = "ref-8e44-11ee-b9d1-0242ac120002";

fn tokens() -> TokenPair {
    TokenPair {
        access_token: Secret::new(ACCESS),
        refresh_token: Secret::new(REFRESH),
        access_expires_at: 1_700_007_200_000,
        refresh_expires_at: 1_705_184_000_000,
    }
}

fn vid(s: &str) -> VehicleId {
    VehicleId(s.to_string())
}

/// Opens a store with an observer that records every report.
fn open_recording(path: &Path) -> (Store, Arc<Mutex<Vec<WriteReport>>>) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    let observer: WriteObserver = Arc::new(move |r: &WriteReport| {
        sink.lock().unwrap().push(r.clone());
    });
    (Store::open(path, Some(observer)).unwrap(), reports)
}

/// Sums one counter of every report so far.
fn total(reports: &Mutex<Vec<WriteReport>>, f: fn(&WriteReport, &str) -> u64, t: &str) -> u64 {
    reports.lock().unwrap().iter().map(|r| f(r, t)).sum()
}

/// A connection with the given vehicles, stored through `call` as the daemon does.
async fn seed(store: &Store, vehicles: &[&str]) -> ConnectionId {
    let vs: Vec<VehicleId> = vehicles.iter().map(|v| vid(v)).collect();
    store
        .call(move |c| {
            let id = queries::upsert_connection(c, "user-1", &tokens(), 1_000)?;
            for v in &vs {
                queries::upsert_vehicle(c, id, v, None, 1_000)?;
            }
            Ok(id)
        })
        .await
        .unwrap()
}

fn battery(recorded_at: i64, fetched_at: i64, soc: f64, range: Option<f64>) -> Reading {
    Reading::Battery(BatteryReading {
        stamp: Stamp {
            recorded_at,
            fetched_at,
        },
        soc_percent: soc,
        range_km: range,
    })
}

#[tokio::test]
async fn open_creates_a_group_readable_history_and_a_private_token_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/carpulse.db");
    let store = Store::open(&path, None).unwrap();
    seed(&store, &["v1"]).await; // forces a WAL write
    let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode_of(&path), 0o640, "history file mode");
    let wal = path.with_file_name("carpulse.db-wal");
    let shm = path.with_file_name("carpulse.db-shm");
    assert_eq!(mode_of(&wal), 0o640, "history -wal mode");
    assert_eq!(mode_of(&shm), 0o640, "history -shm mode");
    let tokens = path.with_file_name("carpulse.tokens.db");
    assert_eq!(mode_of(&tokens), 0o600, "token store mode");
    let (journal, fk, sync, token_sync, busy, version, vacuum) = store
        .call(|c| {
            Ok((
                c.pragma_query_value(Some("main"), "journal_mode", |r| r.get::<_, String>(0))?,
                c.pragma_query_value(None, "foreign_keys", |r| r.get::<_, i64>(0))?,
                c.pragma_query_value(Some("main"), "synchronous", |r| r.get::<_, i64>(0))?,
                c.pragma_query_value(Some("tokens"), "synchronous", |r| r.get::<_, i64>(0))?,
                c.pragma_query_value(None, "busy_timeout", |r| r.get::<_, i64>(0))?,
                migrate::current_version(c)?,
                c.pragma_query_value(Some("main"), "auto_vacuum", |r| r.get::<_, i64>(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    assert_eq!(fk, 1);
    assert_eq!(sync, 1, "history NORMAL");
    assert_eq!(token_sync, 2, "token store FULL");
    assert_eq!(busy, 5000);
    assert_eq!(version, migrate::latest_version());
    assert_eq!(vacuum, 2, "auto_vacuum=INCREMENTAL");
    store.close().await.unwrap();
    // close checkpointed: the WAL is empty, and kept with the -shm for readers who may not
    // create files in the directory.
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
    assert!(shm.exists());
    assert_eq!(mode_of(&wal), 0o640);
}

#[tokio::test]
async fn reopening_keeps_data_and_the_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = Store::open(&path, None).unwrap();
    seed(&store, &["v1"]).await;
    store
        .write(vec![WriteItem::Reading(
            vid("v1"),
            battery(1_000_000, 1_000_500, 55.5, Some(200.0)),
        )])
        .await
        .unwrap();
    store.close().await.unwrap();

    let store = Store::open(&path, None).unwrap();
    let (version, rows, vehicles) = store
        .call(|c| {
            Ok((
                migrate::current_version(c)?,
                c.query_row("SELECT count(*) FROM battery_history", [], |r| {
                    r.get::<_, i64>(0)
                })?,
                queries::load_vehicles(c)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(version, migrate::latest_version());
    assert_eq!(rows, 1);
    assert_eq!(vehicles.len(), 1);
    assert_eq!(vehicles[0].vehicle_id, vid("v1"));
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_store_from_a_newer_carpulse_is_refused_and_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 999;")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path, None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("newer carpulse"), "{msg}");
    assert!(msg.contains("999"), "{msg}");
    assert!(msg.contains("newer.db"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "file was altered");
    assert!(!path.with_file_name("newer.db-wal").exists());
}

#[tokio::test]
async fn views_return_exactly_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("v.db"));
    seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");
    store
        .write(vec![
            WriteItem::Reading(
                a.clone(),
                battery(1_700_000_000_123, 1_700_000_002_456, 68.34, Some(312.4)),
            ),
            WriteItem::Reading(
                a.clone(),
                battery(1_700_000_900_000, 1_700_000_900_000, 100.0, None),
            ),
            WriteItem::Reading(
                a.clone(),
                Reading::Charge(ChargeReading {
                    stamp: Stamp {
                        recorded_at: 1_700_000_000_500,
                        fetched_at: 1_700_000_001_000,
                    },
                    plugged_in: true,
                    state: ChargeState::FullyCharged,
                }),
            ),
            WriteItem::Reading(
                a.clone(),
                Reading::Charge(ChargeReading {
                    stamp: Stamp {
                        recorded_at: 1_700_000_000_600,
                        fetched_at: 1_700_000_001_000,
                    },
                    plugged_in: false,
                    state: ChargeState::NotCharging,
                }),
            ),
            WriteItem::Reading(
                a.clone(),
                Reading::Odometer(OdometerReading {
                    stamp: Stamp {
                        recorded_at: 1_700_000_000_000,
                        fetched_at: 1_700_000_003_000,
                    },
                    odometer_km: 104_732.219,
                }),
            ),
            WriteItem::Event(PollEvent {
                vehicle_id: a.clone(),
                at: 1_700_000_004_000,
                endpoint: "battery".into(),
                outcome: "rate_limited".into(),
                http_status: Some(429),
                error_type: Some("RATE_LIMIT".into()),
                error_code: Some("VEHICLE".into()),
                calls: None,
            }),
            WriteItem::Info(
                a.clone(),
                VehicleInfo {
                    make: "TESLA".into(),
                    model: "Model 3".into(),
                    year: 2021,
                },
            ),
            WriteItem::Vin(a.clone(), "5YJ3E1EA7KF317000".into()),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();

    type Battery = (String, i64, i64, f64, Option<f64>, f64);
    type Charge = (String, i64, i64, i64, String, f64);
    type Odo = (String, i64, i64, f64, f64);
    type Ev = (
        String,
        i64,
        String,
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    type Views = (
        Vec<Battery>,
        Vec<Charge>,
        Vec<Odo>,
        Vec<Ev>,
        Vec<VehicleRecord>,
    );
    let (b, ch, o, e, v): Views = store
        .call(|c| {
            let b = c
                .prepare(
                    "SELECT vehicle_id, recorded_at, fetched_at, soc_percent, range_km, time
                         FROM battery_history ORDER BY recorded_at",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let ch = c
                .prepare(
                    "SELECT vehicle_id, recorded_at, fetched_at, plugged_in, state, time
                         FROM charge_history ORDER BY recorded_at",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let o = c
                .prepare(
                    "SELECT vehicle_id, recorded_at, fetched_at, odometer_km, time
                         FROM odometer_history",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            let e = c
                .prepare(
                    "SELECT vehicle_id, at, endpoint, outcome, http_status, error_type,
                                error_code FROM poll_events",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            Ok((b, ch, o, e, queries::load_vehicles(c)?))
        })
        .await
        .unwrap();

    assert_eq!(
        b,
        vec![
            (
                "veh-a".to_string(),
                1_700_000_000_123,
                1_700_000_002_456,
                68.34,
                Some(312.4),
                1_700_000_000.123
            ),
            (
                "veh-a".to_string(),
                1_700_000_900_000,
                1_700_000_900_000,
                100.0,
                None,
                1_700_000_900.0
            ),
        ]
    );
    assert_eq!(
        ch,
        vec![
            (
                "veh-a".to_string(),
                1_700_000_000_500,
                1_700_000_001_000,
                1,
                "FULLY_CHARGED".to_string(),
                1_700_000_000.5
            ),
            (
                "veh-a".to_string(),
                1_700_000_000_600,
                1_700_000_001_000,
                0,
                "NOT_CHARGING".to_string(),
                1_700_000_000.6
            ),
        ]
    );
    assert_eq!(
        o,
        vec![(
            "veh-a".to_string(),
            1_700_000_000_000,
            1_700_000_003_000,
            104_732.219,
            1_700_000_000.0
        )]
    );
    assert_eq!(
        e,
        vec![(
            "veh-a".to_string(),
            1_700_000_004_000,
            "battery".to_string(),
            "rate_limited".to_string(),
            Some(429),
            Some("RATE_LIMIT".to_string()),
            Some("VEHICLE".to_string())
        )]
    );
    assert_eq!(v[0].make.as_deref(), Some("TESLA"));
    assert_eq!(v[0].model.as_deref(), Some("Model 3"));
    assert_eq!(v[0].year, Some(2021));
    assert_eq!(v[0].vin.as_deref(), Some("5YJ3E1EA7KF317000"));

    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 2);
    assert_eq!(total(&reports, WriteReport::written_in, "charge"), 2);
    assert_eq!(total(&reports, WriteReport::written_in, "odometer"), 1);
    assert_eq!(total(&reports, WriteReport::written_in, "poll_events"), 1);
    assert_eq!(total(&reports, WriteReport::written_in, "vehicles"), 2);
    store.close().await.unwrap();
}

#[tokio::test]
async fn duplicates_are_counted_as_duplicates_and_unknown_vehicles_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("d.db"));
    seed(&store, &["known"]).await;
    let r = battery(5_000, 5_100, 50.0, Some(100.0));
    store
        .write(vec![WriteItem::Reading(vid("known"), r.clone())])
        .await
        .unwrap();
    store.flush().await.unwrap();
    // Same (vehicle, recorded_at) again, with another value: kept once, the first value wins.
    store
        .write(vec![
            WriteItem::Reading(vid("known"), battery(5_000, 9_999, 99.0, None)),
            WriteItem::Reading(vid("ghost"), r.clone()),
            WriteItem::Event(PollEvent {
                vehicle_id: vid("ghost"),
                at: 1,
                endpoint: "battery".into(),
                outcome: "ok".into(),
                http_status: Some(200),
                error_type: None,
                error_code: None,
                calls: None,
            }),
            WriteItem::Vin(vid("ghost"), "VIN".into()),
            WriteItem::Reading(vid("known"), battery(6_000, 6_000, f64::NAN, None)),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 1);
    assert_eq!(total(&reports, WriteReport::duplicates_in, "battery"), 1);
    // ghost's reading + the NaN one
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 2);
    assert_eq!(total(&reports, WriteReport::dropped_in, "poll_events"), 1);
    assert_eq!(total(&reports, WriteReport::dropped_in, "vehicles"), 1);
    let rows: Vec<(i64, f64)> = store
        .call(|c| {
            Ok(
                c.prepare("SELECT fetched_at, soc_percent FROM battery_history")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
            )
        })
        .await
        .unwrap();
    assert_eq!(rows, vec![(5_100, 50.0)]);
    store.close().await.unwrap();
}

/// A store that refuses writes for a reason that may pass (read-only here, as a remounted or
/// full disk would; a lock held past the busy timeout is the same): the rows are kept, not
/// dropped, `/healthz` is told, and they are stored once the store takes writes again.
#[tokio::test]
async fn a_refused_transaction_keeps_its_rows_and_stores_them_later() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("f.db"));
    seed(&store, &["v"]).await;
    store
        .call(|c| Ok(c.pragma_update(None, "query_only", true)?))
        .await
        .unwrap();
    store
        .write(vec![
            WriteItem::Reading(vid("v"), battery(1, 1, 10.0, None)),
            WriteItem::Reading(vid("v"), battery(2, 2, 11.0, None)),
            WriteItem::Event(PollEvent {
                vehicle_id: vid("v"),
                at: 2,
                endpoint: "battery".into(),
                outcome: "ok".into(),
                http_status: Some(200),
                error_type: None,
                error_code: None,
                calls: None,
            }),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 0);
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 0);
    let h = store.health();
    assert_eq!(h.pending_rows, 3, "{h:?}");
    assert!(h.failing_since.is_some(), "{h:?}");
    let problems = store.problems(crate::domain::now_ms());
    assert!(
        problems.len() == 1
            && problems[0].contains("refuses writes")
            && problems[0].contains("3 row(s)"),
        "{problems:?}"
    );

    store
        .call(|c| Ok(c.pragma_update(None, "query_only", false)?))
        .await
        .unwrap();
    store
        .write(vec![WriteItem::Reading(
            vid("v"),
            battery(3, 3, 12.0, None),
        )])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.health().pending_rows > 0 {
        assert!(std::time::Instant::now() < deadline, "{:?}", store.health());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 3);
    assert_eq!(total(&reports, WriteReport::written_in, "poll_events"), 1);
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 0);
    assert_eq!(store.health().failing_since, None);
    assert!(store.problems(crate::domain::now_ms()).is_empty());
    let n: i64 = store
        .call(|c| Ok(c.query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(n, 3);
    // A panicking call doesn't take the owner thread down either.
    let err = store
        .call(|_c| -> anyhow::Result<()> { panic!("boom") })
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("panicked"));
    store.flush().await.unwrap();
    store.close().await.unwrap();
}

/// Memory stays bounded while the store refuses writes: rows past [`super::PENDING_MAX`] are
/// dropped and counted, the rest wait.
#[tokio::test]
async fn rows_past_the_bound_are_dropped_and_counted_while_the_store_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("f.db"));
    seed(&store, &["v"]).await;
    store
        .call(|c| Ok(c.pragma_update(None, "query_only", true)?))
        .await
        .unwrap();
    let over = 25;
    let rows: Vec<_> = (0..(super::PENDING_MAX + over) as i64)
        .map(|i| WriteItem::Reading(vid("v"), battery(i, i, 50.0, None)))
        .collect();
    store.write(rows).await.unwrap();
    store.flush().await.unwrap();
    let h = store.health();
    assert_eq!(h.pending_rows, super::PENDING_MAX);
    assert_eq!(h.dropped_rows, over as u64);
    assert_eq!(
        total(&reports, WriteReport::dropped_in, "battery"),
        over as u64
    );
    let problems = store.problems(crate::domain::now_ms());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[1].contains("dropped rows"), "{problems:?}");
    store
        .call(|c| Ok(c.pragma_update(None, "query_only", false)?))
        .await
        .unwrap();
    store.close().await.unwrap();
    let c = rusqlite::Connection::open(dir.path().join("f.db")).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        n,
        super::PENDING_MAX as i64,
        "the kept rows are stored at close"
    );
}

/// Rows still refused when the store closes are offered for a bounded time, then dropped and
/// counted: a stop never hangs on a locked store.
#[tokio::test]
async fn rows_still_refused_at_close_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("f.db"));
    seed(&store, &["v"]).await;
    store
        .call(|c| Ok(c.pragma_update(None, "query_only", true)?))
        .await
        .unwrap();
    store
        .write(vec![WriteItem::Reading(
            vid("v"),
            battery(1, 1, 10.0, None),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.health().pending_rows, 1);
    let probe = store.clone();
    store.close().await.unwrap();
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 1);
    assert_eq!(probe.health().dropped_rows, 1);
    assert!(probe.health().last_dropped_at.is_some());
}

#[tokio::test]
async fn removing_a_vehicle_invalidates_the_cached_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("r.db"));
    let conn = seed(&store, &["old"]).await;
    store
        .write(vec![WriteItem::Reading(
            vid("old"),
            battery(1, 1, 1.0, None),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();
    // Remove "old" and add "new": SQLite reuses the freed integer key for it.
    let removed = store
        .call(move |c| {
            let removed = queries::remove_vehicle(c, &vid("old"))?;
            queries::upsert_vehicle(c, conn, &vid("new"), None, 2)?;
            Ok(removed)
        })
        .await
        .unwrap();
    assert!(removed);
    store
        .write(vec![
            WriteItem::Reading(vid("old"), battery(2, 2, 2.0, None)),
            WriteItem::Reading(vid("new"), battery(3, 3, 3.0, None)),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let rows: Vec<(String, f64)> = store
        .call(|c| {
            Ok(
                c.prepare("SELECT vehicle_id, soc_percent FROM battery_history")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
            )
        })
        .await
        .unwrap();
    assert_eq!(rows, vec![("new".to_string(), 3.0)]);
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn tokens_round_trip_and_never_appear_in_any_view() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&path, None).unwrap();
    let id = seed(&store, &["v"]).await;
    store
        .write(vec![
            WriteItem::Reading(vid("v"), battery(10, 11, 40.0, Some(100.0))),
            WriteItem::Event(PollEvent {
                vehicle_id: vid("v"),
                at: 12,
                endpoint: "battery".into(),
                outcome: "ok".into(),
                http_status: Some(200),
                error_type: None,
                error_code: None,
                calls: None,
            }),
        ])
        .await
        .unwrap();
    let loaded = store.call(|c| queries::load_connections(c)).await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].id, id);
    assert_eq!(loaded[0].tokens, tokens());
    assert_eq!(loaded[0].tokens.access_token.expose(), ACCESS);
    assert_eq!(loaded[0].tokens.refresh_token.expose(), REFRESH);
    store.close().await.unwrap();

    // Every column of every view, as text, from an independent connection.
    let c = Connection::open(&path).unwrap();
    let views: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'view'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        views.len(),
        13,
        "the four history views, blocked_endpoints, four rollup views and their three raw \
         parts, poll_outcomes_daily"
    );
    let mut cells = 0;
    for view in views {
        let mut stmt = c.prepare(&format!("SELECT * FROM {view}")).unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..n {
                let v: rusqlite::types::Value = row.get(i).unwrap();
                let text = format!("{v:?}");
                assert!(
                    !text.contains(ACCESS) && !text.contains(REFRESH),
                    "{view}: {text}"
                );
                cells += 1;
            }
        }
    }
    assert!(cells > 0, "the views had rows to check");
    drop(c);
    // Not a byte of a token in the history or its WAL; the token store has them.
    for file in ["t.db", "t.db-wal", "t.db-shm"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        for secret in [ACCESS, REFRESH] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{file} holds a token"
            );
        }
    }
    let tokens = std::fs::read(dir.path().join("t.tokens.db")).unwrap();
    let wal = std::fs::read(dir.path().join("t.tokens.db-wal")).unwrap_or_default();
    assert!(
        [tokens, wal]
            .iter()
            .any(|b| b.windows(REFRESH.len()).any(|w| w == REFRESH.as_bytes())),
        "the token store holds the refresh token"
    );
}

#[tokio::test]
async fn a_second_independent_connection_reads_the_wal_store_while_the_owner_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let store = Store::open(&path, None).unwrap();
    seed(&store, &["v"]).await;
    store
        .write(vec![WriteItem::Reading(
            vid("v"),
            battery(1_000, 1_000, 77.7, None),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();

    let reader =
        Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let soc: f64 = reader
        .query_row("SELECT soc_percent FROM battery_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(soc, 77.7);
    // A read transaction held open by the reader doesn't block the writer.
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap();
    store
        .write(vec![WriteItem::Reading(
            vid("v"),
            battery(2_000, 2_000, 78.0, None),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let during: i64 = reader
        .query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        during, 1,
        "snapshot isolation while the reader's transaction is open"
    );
    reader.execute_batch("COMMIT").unwrap();
    let after: i64 = reader
        .query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, 2);
    drop(reader);
    store.close().await.unwrap();
}

#[tokio::test]
async fn close_commits_what_was_queued_and_later_use_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let (store, reports) = open_recording(&path);
    seed(&store, &["v"]).await;
    let other = store.clone();
    let items: Vec<WriteItem> = (0..500)
        .map(|i| WriteItem::Reading(vid("v"), battery(i, i, 50.0, None)))
        .collect();
    other.write(items).await.unwrap();
    store.close().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 500);
    let err = other
        .write(vec![WriteItem::Vin(vid("v"), "x".into())])
        .await;
    assert!(format!("{:#}", err.unwrap_err()).contains("closed"));
    assert!(other.flush().await.is_err());
    assert!(other.call(|_| Ok(())).await.is_err());
    let c = Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 500);
}

/// Measures bytes on disk per battery reading for 100 vehicles × 1,000 readings at 15 min,
/// written tick by tick through the real writer as the daemon would. Printed, not asserted:
/// run with `cargo test store_size -- --nocapture`.
#[tokio::test]
async fn store_size_per_battery_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("size.db");
    let store = Store::open(&path, None).unwrap();
    let ids: Vec<String> = (0..100)
        .map(|i| format!("{i:08x}-fd9d-4455-823a-ce30af709ffc"))
        .collect();
    let names: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
    seed(&store, &names).await;
    let start = 1_767_225_600_000i64; // 2026-01-01
    for tick in 0..1_000i64 {
        let items = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let recorded = start + tick * 900_000 + i as i64 * 37;
                WriteItem::Reading(
                    VehicleId(id.clone()),
                    battery(
                        recorded,
                        recorded + 1_200 + (tick % 50) * 20,
                        20.0 + ((tick + i as i64) % 8_000) as f64 / 100.0,
                        Some(150.0 + ((tick * 7 + i as i64) % 3_000) as f64 / 10.0),
                    ),
                )
            })
            .collect();
        store.write(items).await.unwrap();
    }
    store.flush().await.unwrap();
    let (rows, table_bytes, payload): (i64, i64, i64) = store
        .call(|c| {
            let rows = c.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
            let (bytes, payload) = c.query_row(
                "SELECT sum(pgsize), sum(payload) FROM dbstat WHERE name = 'readings'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok((rows, bytes, payload))
        })
        .await
        .unwrap();
    store.close().await.unwrap();
    let file = std::fs::metadata(&path).unwrap().len();
    assert_eq!(rows, 100_000);
    println!(
        "readings (battery only): {rows} rows, table {table_bytes} B on disk = {:.1} B/reading \
         (payload {:.1} B/reading); whole file {file} B = {:.1} B/reading",
        table_bytes as f64 / rows as f64,
        payload as f64 / rows as f64,
        file as f64 / rows as f64
    );
}

/// The query users run most (one vehicle, a time window, through a view) must be index seeks,
/// never a scan: that is what keeps "last 30 days of one car" in milliseconds, and a rollup
/// view over years of one car as cheap as reading that car's rows.
#[test]
fn one_vehicle_time_window_through_the_views_is_an_index_search() {
    let mut c = Connection::open_in_memory().unwrap();
    migrate::migrate(&mut c).unwrap();
    let plan = |view: &str, time: &str| -> Vec<String> {
        let q = format!(
            "EXPLAIN QUERY PLAN SELECT * FROM {view} WHERE vehicle_id = ?1 AND {time} >= ?2 \
             ORDER BY {time}"
        );
        c.prepare(&q)
            .unwrap()
            .query_map(["v", "0"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let vehicle = "SEARCH v USING COVERING INDEX sqlite_autoindex_vehicles_1 (vehicle_id=?)";
    for (view, time, table_plan) in [
        (
            "battery_history",
            "recorded_at",
            "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)",
        ),
        (
            "charge_history",
            "recorded_at",
            "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)",
        ),
        (
            "odometer_history",
            "recorded_at",
            "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)",
        ),
    ] {
        // A kind's own fetch lag, where it has one, is one primary-key lookup per row.
        let lags = "SEARCH l USING PRIMARY KEY (vehicle=? AND recorded_at=?) LEFT-JOIN";
        assert_eq!(
            plan(view, time),
            vec![
                vehicle.to_string(),
                table_plan.to_string(),
                lags.to_string()
            ],
            "{view}"
        );
    }
    let events = plan("poll_events", "at");
    assert!(
        events
            .iter()
            .any(|s| s == "SEARCH e USING PRIMARY KEY (vehicle=? AND at>?)"),
        "poll_events: {events:?}"
    );
    // The `ok` polls kept beside their readings: the vehicle's rows since the `ok` events'
    // horizon, never the whole table.
    assert!(
        events
            .iter()
            .any(|s| s == "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)"),
        "poll_events: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|s| s.starts_with("SCAN r") || s.starts_with("SCAN e")),
        "poll_events: {events:?}"
    );
    // Rollup views: the vehicle is pushed into every part; no part scans a table.
    for (view, time) in [
        ("battery_hourly", "hour"),
        ("battery_daily", "day"),
        ("odometer_daily", "day"),
        ("charge_sessions", "started_at"),
    ] {
        let steps = plan(view, time);
        // A scan of a co-routine (a view's or CTE's rows) is fine; a scan of a table is not.
        let routines: Vec<&str> = steps
            .iter()
            .filter_map(|s| {
                s.strip_prefix("CO-ROUTINE ")
                    .or_else(|| s.strip_prefix("MATERIALIZE "))
            })
            .collect();
        let scans: Vec<&String> = steps
            .iter()
            .filter(|s| {
                s.strip_prefix("SCAN ").is_some_and(|what| {
                    let name = what.split(' ').next().unwrap_or("");
                    name != view && !routines.contains(&name) && !name.starts_with("(subquery")
                })
            })
            .collect();
        assert!(scans.is_empty(), "{view} scans a table: {steps:?}");
        assert!(
            steps.iter().any(|s| s.contains("(vehicle=?")),
            "{view} seeks the vehicle: {steps:?}"
        );
    }
}

/// `poll_outcomes_daily` reaches every row by a primary-key range of one vehicle: for one
/// vehicle, that vehicle's alone; over every vehicle filtered on time only (the history
/// dashboard's "Poll outcomes per day" with all vehicles), each vehicle's range in turn, the
/// live arms from the rollup's watermark on. Never a scan of readings, poll_log or the rollup.
#[test]
fn poll_outcomes_per_day_are_index_searches_for_one_vehicle_and_for_the_fleet() {
    let mut c = Connection::open_in_memory().unwrap();
    migrate::migrate(&mut c).unwrap();
    let plan = |sql: &str| -> Vec<String> {
        c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let one =
        plan("SELECT * FROM poll_outcomes_daily WHERE vehicle_id = 'v' AND day >= 0 ORDER BY day");
    let vehicle = "SEARCH v USING COVERING INDEX sqlite_autoindex_vehicles_1 (vehicle_id=?)";
    for step in [
        "SEARCH k USING PRIMARY KEY (vehicle=? AND day>? AND day<?)",
        "SEARCH d USING PRIMARY KEY (vehicle=? AND day>? AND day<?)",
        "SEARCH e USING PRIMARY KEY (vehicle=? AND at>?)",
        "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)",
    ] {
        assert!(one.iter().any(|s| s == step), "{step}: {one:?}");
    }
    assert_eq!(
        one.iter().filter(|s| *s == vehicle).count(),
        4,
        "each arm seeks the one vehicle: {one:?}"
    );
    let fleet = plan(
        "SELECT o.day / 1000 AS time, sum(o.polls) AS value, o.outcome AS outcome
         FROM poll_outcomes_daily o
         WHERE o.day BETWEEN 0 AND 604800000
         GROUP BY 1, 3 ORDER BY 1, 3",
    );
    for step in [
        "SEARCH k USING PRIMARY KEY (vehicle=? AND day>? AND day<?)",
        "SEARCH d USING PRIMARY KEY (vehicle=? AND day>? AND day<?)",
        "SEARCH e USING PRIMARY KEY (vehicle=? AND at>?)",
        "SEARCH r USING PRIMARY KEY (vehicle=? AND recorded_at>?)",
    ] {
        assert!(fleet.iter().any(|s| s == step), "{step}: {fleet:?}");
    }
    for table in [
        "k",
        "d",
        "e",
        "r",
        "poll_rollup_days",
        "poll_rollup_daily",
        "poll_log",
        "readings",
    ] {
        assert!(
            !fleet
                .iter()
                .chain(&one)
                .any(|s| s.split(' ').take(2).eq(["SCAN", table])),
            "a scan of {table}: {one:?} {fleet:?}"
        );
    }
}

#[tokio::test]
async fn a_rotated_pair_never_overwrites_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_recording(&dir.path().join("c.db"));
    let id = seed(&store, &["v1"]).await;
    let rotated = TokenPair {
        access_token: Secret::new("acc-2"),
        refresh_token: Secret::new("ref-2"),
        ..tokens()
    };
    // The stored refresh token is the one that was refreshed: saved.
    let r = rotated.clone();
    let saved = store
        .call(move |c| queries::save_rotated(c, id, &Secret::new(REFRESH), &r, 2_000))
        .await
        .unwrap();
    assert!(matches!(saved, queries::Rotation::Saved), "{saved:?}");

    // A reconnect stores a new grant; a rotation of the old one must not replace it.
    let reconnect = TokenPair {
        access_token: Secret::new("acc-new-grant"),
        refresh_token: Secret::new("ref-new-grant"),
        ..tokens()
    };
    let rc = reconnect.clone();
    store
        .call(move |c| queries::upsert_connection(c, "user-1", &rc, 3_000))
        .await
        .unwrap();
    let late = TokenPair {
        access_token: Secret::new("acc-3"),
        refresh_token: Secret::new("ref-3"),
        ..tokens()
    };
    let outcome = store
        .call(move |c| queries::save_rotated(c, id, &Secret::new("ref-2"), &late, 4_000))
        .await
        .unwrap();
    match outcome {
        queries::Rotation::Superseded(r) => assert_eq!(r.tokens, reconnect),
        other => panic!("expected the reconnect to win: {other:?}"),
    }
    let stored = store.call(|c| queries::load_connections(c)).await.unwrap();
    assert_eq!(stored[0].tokens, reconnect);
}

#[tokio::test]
async fn blocks_discovery_replaces_its_own_rows_and_each_lift_lifts_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let store = Store::open(&path, None).unwrap();
    seed(&store, &["car", "other"]).await;
    let block = |endpoint: &str, at| WriteItem::Block {
        vehicle_id: vid("car"),
        scope: crate::domain::BlockScope::from_column(endpoint),
        reason: "PERMISSION".into(),
        at,
    };
    store
        .write(vec![
            block("odometer", 5),
            block("odometer", 6),
            block("*", 7),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let rows = |store: &Store| {
        let store = store.clone();
        async move {
            let mut v: Vec<(String, String, String)> = store
                .call(|c| queries::load_blocks(c))
                .await
                .unwrap()
                .into_iter()
                .map(|b| (b.vehicle_id.0, b.scope.column().to_owned(), b.source))
                .collect();
            v.sort();
            v
        }
    };
    let discover = |blocked: Vec<(String, String)>| {
        let store = store.clone();
        async move {
            store
                .call(move |c| queries::save_discovery(c, &vid("car"), &blocked, 10))
                .await
                .unwrap()
        }
    };
    let due = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .call(|c| queries::vehicles_to_discover(c, 10))
                .await
                .unwrap()
        }
    };
    assert_eq!(due(&store).await, [vid("car"), vid("other")]);
    assert!(discover(vec![("charge".into(), "not granted: read_charge".into())]).await);
    assert_eq!(due(&store).await, [vid("other")], "car was read at 10");
    // A second discovery replaces the first one's rows; answers' rows stay.
    assert!(discover(vec![("vin".into(), "not granted: read_vin".into())]).await);
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        rows(&store).await,
        [
            s("car", "*", "poll"),
            s("car", "odometer", "poll"),
            s("car", "vin", "discovery")
        ]
    );
    // `vehicles enable` lifts what answers set.
    let lifted = store
        .call(|c| queries::clear_blocks(c, &vid("car"), true))
        .await
        .unwrap();
    assert_eq!(lifted, 2);
    assert_eq!(rows(&store).await, [s("car", "vin", "discovery")]);
    // A reconnect lifts everything and asks for a new discovery.
    store
        .call(|c| queries::clear_blocks(c, &vid("car"), false))
        .await
        .unwrap();
    assert_eq!(rows(&store).await, []);
    assert_eq!(due(&store).await, [vid("car"), vid("other")]);
    // Removing the vehicle removes its blocks; unknown vehicles are refused.
    assert!(discover(vec![("vin".into(), "x".into())]).await);
    store
        .call(|c| queries::remove_vehicle(c, &vid("car")))
        .await
        .unwrap();
    assert_eq!(rows(&store).await, []);
    assert!(!discover(vec![]).await);
    store.close().await.unwrap();
    let c = Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM blocked_endpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn waits_and_quota_pauses_end_and_account_pauses_are_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("p.db"), None).unwrap();
    seed(&store, &["quota", "account", "billing", "perm", "waiting"]).await;
    const NOV_20: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z
    let block = |v: &str, endpoint: &str, reason: &str, at| WriteItem::Block {
        vehicle_id: vid(v),
        scope: crate::domain::BlockScope::from_column(endpoint),
        reason: reason.into(),
        at,
    };
    store
        .write(vec![
            block("quota", "*", "BILLING:VEHICLE_REQUEST_LIMIT", NOV_20),
            block(
                "account",
                "*",
                "CONNECTED_SERVICES_ACCOUNT:AUTHENTICATION_FAILED",
                NOV_20,
            ),
            block("billing", "*", "BILLING:INVALID_PLAN", NOV_20),
            block("perm", "charge", "PERMISSION", NOV_20),
            WriteItem::Wait {
                vehicle_id: vid("waiting"),
                until: NOV_20 + 3_600_000,
                reason: "RATE_LIMIT:VEHICLE".into(),
                at: NOV_20,
            },
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let expire = |now: i64| {
        let store = store.clone();
        async move {
            let mut v: Vec<String> = store
                .call(move |c| queries::expire_blocks(c, now))
                .await
                .unwrap()
                .into_iter()
                .map(|b| b.vehicle_id.0)
                .collect();
            v.sort();
            v
        }
    };
    // Half an hour on, the wait still holds; five hours on, only the wait has ended.
    assert!(expire(NOV_20 + 1_800_000).await.is_empty());
    assert_eq!(expire(NOV_20 + 5 * 3_600_000).await, ["waiting"]);
    // Seven hours on: the account pause is checked again.
    assert_eq!(expire(NOV_20 + 7 * 3_600_000).await, ["account"]);
    // December: the monthly quota starts over; a plan problem still needs a human.
    assert_eq!(expire(NOV_20 + 11 * 86_400_000).await, ["quota"]);
    let left: Vec<String> = store
        .call(|c| queries::load_blocks(c))
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.vehicle_id.0)
        .collect();
    assert_eq!(left, ["billing", "perm"]);
    store.close().await.unwrap();
}

fn ok_event(v: &VehicleId, at: i64, endpoint: &'static str, calls: u64) -> WriteItem {
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
}

/// One v3 listing's poll as the poller queues it: each `ok` event before the reading it brought.
fn listing_poll(v: &VehicleId, at: i64, recorded_at: i64, fetched_at: i64) -> Vec<WriteItem> {
    let stamp = Stamp {
        recorded_at,
        fetched_at,
    };
    vec![
        ok_event(v, at, "battery", 1),
        WriteItem::Reading(
            v.clone(),
            battery(recorded_at, fetched_at, 71.5, Some(280.0)),
        ),
        ok_event(v, at, "charge", 0),
        WriteItem::Reading(
            v.clone(),
            Reading::Charge(ChargeReading {
                stamp,
                plugged_in: true,
                state: ChargeState::Charging,
            }),
        ),
        ok_event(v, at, "odometer", 0),
        WriteItem::Reading(
            v.clone(),
            Reading::Odometer(OdometerReading {
                stamp,
                odometer_km: 12_345.6,
            }),
        ),
    ]
}

type EventRow = (
    i64,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

fn poll_events_of(c: &Connection) -> rusqlite::Result<Vec<EventRow>> {
    c.prepare(
        "SELECT at, endpoint, outcome, http_status, error_code, calls FROM poll_events
         ORDER BY at, endpoint",
    )?
    .query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })?
    .collect()
}

/// Schema 4: an `ok` poll that stored a new reading row is kept in that row, not in
/// `poll_log`, and `poll_events` shows it exactly as before; a poll whose readings were already
/// stored, a failure, or an answer that took long to read still goes to `poll_log`. A batch
/// written twice keeps one of each; retention hides old `ok` polls without touching readings;
/// the month's billed calls count both places.
#[tokio::test]
async fn polls_that_stored_readings_are_kept_beside_them_and_shown_as_before() {
    const T: i64 = 1_767_225_600_000; // 2026-01-01
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("kept.db"));
    seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");

    // A poll at T+5,000 (when its answer arrived), data recorded at T.
    let first = listing_poll(&a, T + 5_000, T, T + 5_000);
    store.write(first.clone()).await.unwrap();
    store.flush().await.unwrap();
    // The same batch again (a replay, as a fallback file's): nothing new.
    store.write(first).await.unwrap();
    store.flush().await.unwrap();
    // The car did not report since: the next poll's readings are duplicates.
    store
        .write(listing_poll(&a, T + 900_000, T, T + 899_995))
        .await
        .unwrap();
    // A new reading, but a poll stamped later than the answer's arrival (a page of a longer
    // listing that came earlier): the reading keeps its time, the poll goes to poll_log.
    store
        .write(vec![
            ok_event(&a, T + 1_800_000, "battery", 1),
            WriteItem::Reading(a.clone(), battery(T + 1_700_000, T + 1_795_000, 70.0, None)),
        ])
        .await
        .unwrap();
    // A poll that stored a battery reading while its charge endpoint failed.
    store
        .write(vec![
            ok_event(&a, T + 2_700_000, "battery", 2),
            WriteItem::Reading(
                a.clone(),
                battery(T + 2_600_000, T + 2_700_000, 69.0, Some(270.0)),
            ),
            WriteItem::Event(PollEvent {
                vehicle_id: a.clone(),
                at: T + 2_700_000,
                endpoint: "charge".into(),
                outcome: "vehicle_state".into(),
                http_status: Some(409),
                error_type: Some("VEHICLE_STATE".into()),
                error_code: Some("ASLEEP".into()),
                calls: Some(0),
            }),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();

    let ok = |at: i64, e: &str, calls: i64| {
        (at, e.to_string(), "ok".to_string(), None, None, Some(calls))
    };
    let expected = vec![
        ok(T + 5_000, "battery", 1),
        ok(T + 5_000, "charge", 0),
        ok(T + 5_000, "odometer", 0),
        ok(T + 900_000, "battery", 1),
        ok(T + 900_000, "charge", 0),
        ok(T + 900_000, "odometer", 0),
        ok(T + 1_800_000, "battery", 1),
        ok(T + 2_700_000, "battery", 2),
        (
            T + 2_700_000,
            "charge".to_string(),
            "vehicle_state".to_string(),
            Some(409),
            Some("ASLEEP".to_string()),
            Some(0),
        ),
    ];
    type Rows = (
        Vec<EventRow>,
        Vec<(i64, i64, String)>,
        Vec<(i64, Option<i64>)>,
    );
    let (events, log, kept): Rows = store
        .call(|c| {
            let log = c
                .prepare("SELECT at, endpoints, outcome FROM poll_log ORDER BY at")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let kept = c
                .prepare("SELECT recorded_at, poll_endpoints FROM readings ORDER BY recorded_at")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok((poll_events_of(c)?, log, kept))
        })
        .await
        .unwrap();
    assert_eq!(events, expected);
    // In poll_log: only the poll that stored nothing new, the slow answer, and the failure.
    assert_eq!(
        log,
        vec![
            (T + 900_000, 1 | 2 | 16, "ok".to_string()),
            (T + 1_800_000, 1, "ok".to_string()),
            (T + 2_700_000, 2, "vehicle_state".to_string()),
        ]
    );
    assert_eq!(
        kept,
        vec![
            (T, Some(1 | 2 | 16)),
            (T + 1_700_000, None),
            (T + 2_600_000, Some(1))
        ]
    );
    // Each event and reading counted once as written, the replay's as duplicates.
    assert_eq!(total(&reports, WriteReport::written_in, "poll_events"), 9);
    assert_eq!(
        total(&reports, WriteReport::duplicates_in, "poll_events"),
        3
    );
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 3);
    assert_eq!(total(&reports, WriteReport::duplicates_in, "battery"), 2);
    assert_eq!(total(&reports, WriteReport::written_in, "charge"), 1);

    // Every reading keeps its own arrival as fetched_at, kept with its poll or not.
    let fetched: Vec<i64> = store
        .call(|c| {
            c.prepare("SELECT fetched_at FROM battery_history ORDER BY recorded_at")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()
                .map_err(Into::into)
        })
        .await
        .unwrap();
    assert_eq!(fetched, vec![T + 5_000, T + 1_795_000, T + 2_700_000]);

    // Each endpoint's last outcome, from the two tables, as the view has it.
    let last = store
        .call(|c| {
            ["battery", "charge", "odometer", "info"]
                .into_iter()
                .map(|e| queries::last_outcome(c, "veh-a", e, T))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .unwrap();
    assert_eq!(
        last,
        vec![
            Some((T + 2_700_000, "ok".to_string(), None, None)),
            Some((
                T + 2_700_000,
                "vehicle_state".to_string(),
                Some("VEHICLE_STATE".to_string()),
                Some("ASLEEP".to_string())
            )),
            Some((T + 900_000, "ok".to_string(), None, None)),
            None,
        ]
    );

    // Billed this month: 1 + 1 + 1 + 2.
    let calls = store
        .call(|c| queries::calls_since(c, T, crate::domain::ApiVersion::V3))
        .await
        .unwrap();
    assert_eq!(calls.get(&a), Some(&5));

    // 91 days on, the default retention lets the `ok` events go, in both places; the
    // readings and the failure stay.
    let (after, readings) = store
        .call(|c| {
            retention::run_all(c, &retention::Policy::default(), T + 91 * 86_400_000)?;
            let n: i64 = c.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
            Ok((poll_events_of(c)?, n))
        })
        .await
        .unwrap();
    assert_eq!(after, expected[8..].to_vec());
    assert_eq!(readings, 3);
    store.close().await.unwrap();
}

/// A kind that joins its instant's row from a later answer keeps its own fetch time (in
/// `reading_lags`), and the views show each kind's as written.
#[tokio::test]
async fn a_kind_joining_a_row_later_keeps_its_own_fetch_time() {
    const T: i64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_recording(&dir.path().join("lags.db"));
    seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");
    store
        .write(vec![WriteItem::Reading(
            a.clone(),
            battery(T, T + 2_000, 50.0, None),
        )])
        .await
        .unwrap();
    store
        .write(vec![WriteItem::Reading(
            a.clone(),
            Reading::Charge(ChargeReading {
                stamp: Stamp {
                    recorded_at: T,
                    fetched_at: T + 9_000,
                },
                plugged_in: false,
                state: ChargeState::NotCharging,
            }),
        )])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let (battery_at, charge_at, lags): (i64, i64, i64) = store
        .call(|c| {
            Ok((
                c.query_row("SELECT fetched_at FROM battery_history", [], |r| r.get(0))?,
                c.query_row("SELECT fetched_at FROM charge_history", [], |r| r.get(0))?,
                c.query_row("SELECT count(*) FROM reading_lags", [], |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!((battery_at, charge_at, lags), (T + 2_000, T + 9_000, 1));
    let summary = store.call(|c| queries::vehicle_summaries(c)).await.unwrap();
    let last_charge = summary[0].last_charge.as_ref().map(|c| c.stamp.fetched_at);
    assert_eq!(last_charge, Some(T + 9_000));
    store.close().await.unwrap();
}

/// Pruning raw readings (`retention.readings` shorter than `poll_events_ok`) must not take the
/// `ok` polls kept in those rows with them: they move to `poll_log`, so `poll_events` and the
/// month's billed calls are the same before and after.
#[tokio::test]
async fn pruning_readings_keeps_the_polls_they_carried() {
    const T: i64 = 1_767_225_600_000; // 2026-01-01
    const DAY: i64 = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_recording(&dir.path().join("pruned.db"));
    seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");
    for day in 0..20 {
        let recorded = T + day * DAY + 3_600_000;
        let at = recorded + 60_000;
        // No charge reading: a charging session would hold the raw readings back.
        let poll = vec![
            ok_event(&a, at, "battery", 1),
            WriteItem::Reading(a.clone(), battery(recorded, at, 60.0, Some(250.0))),
            ok_event(&a, at, "odometer", 0),
            WriteItem::Reading(
                a.clone(),
                Reading::Odometer(OdometerReading {
                    stamp: Stamp {
                        recorded_at: recorded,
                        fetched_at: at,
                    },
                    odometer_km: 1_000.0 + day as f64,
                }),
            ),
        ];
        store.write(poll).await.unwrap();
    }
    store.flush().await.unwrap();
    let before = store
        .call(|c| {
            let calls = queries::calls_since(c, T, crate::domain::ApiVersion::V3)?;
            Ok((poll_events_of(c)?, calls))
        })
        .await
        .unwrap();
    assert_eq!(before.0.len(), 40, "20 polls of two endpoints");
    assert_eq!(before.1.get(&a), Some(&20));
    let policy = retention::Policy {
        readings: Some(std::time::Duration::from_secs(7 * 86_400)),
        ..retention::Policy::default()
    };
    let (after, readings, logged) = store
        .call(move |c| {
            let summary = retention::run_all(c, &policy, T + 20 * DAY)?;
            assert!(summary.readings_deleted >= 12, "{summary:?}");
            let calls = queries::calls_since(c, T, crate::domain::ApiVersion::V3)?;
            let readings: i64 = c.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
            let logged: i64 = c.query_row("SELECT count(*) FROM poll_log", [], |r| r.get(0))?;
            Ok(((poll_events_of(c)?, calls), readings, logged))
        })
        .await
        .unwrap();
    assert_eq!(
        after, before,
        "poll_events and the billed calls survive the pruning"
    );
    assert!(readings <= 8, "{readings} raw rows left");
    assert_eq!(
        logged,
        20 - readings,
        "each pruned row's poll moved to poll_log"
    );
    store.close().await.unwrap();
}

/// The newest poll is not always kept in the newest reading: a later poll may store only an
/// older instant (a kind whose data is older). `status` and the summaries still find it.
#[tokio::test]
async fn the_newest_poll_is_found_when_it_kept_an_older_reading() {
    const T: i64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_recording(&dir.path().join("newest.db"));
    seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");
    let charge = |recorded_at: i64, fetched_at: i64| {
        WriteItem::Reading(
            a.clone(),
            Reading::Charge(ChargeReading {
                stamp: Stamp {
                    recorded_at,
                    fetched_at,
                },
                plugged_in: false,
                state: ChargeState::NotCharging,
            }),
        )
    };
    let (p1, p2) = (T + 10_000, T + 20_000);
    // P1 stores battery at T+5s (keeps P1) and charge at T+1s.
    store
        .write(vec![
            ok_event(&a, p1, "battery", 1),
            WriteItem::Reading(a.clone(), battery(T + 5_000, p1, 50.0, None)),
            ok_event(&a, p1, "charge", 0),
            charge(T + 1_000, p1),
        ])
        .await
        .unwrap();
    // A failed charge poll between them.
    store
        .write(vec![WriteItem::Event(PollEvent {
            vehicle_id: a.clone(),
            at: T + 15_000,
            endpoint: "charge".into(),
            outcome: "vehicle_state".into(),
            http_status: Some(409),
            error_type: Some("VEHICLE_STATE".into()),
            error_code: Some("ASLEEP".into()),
            calls: Some(1),
        })])
        .await
        .unwrap();
    // P2: the battery unchanged, a new charge reading at T+3s (older than P1's battery row).
    store
        .write(vec![
            ok_event(&a, p2, "battery", 1),
            WriteItem::Reading(a.clone(), battery(T + 5_000, p1, 50.0, None)),
            ok_event(&a, p2, "charge", 0),
            charge(T + 3_000, p2),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let (last, summary) = store
        .call(|c| {
            Ok((
                queries::last_outcome(c, "veh-a", "charge", T)?,
                queries::vehicle_summaries(c)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(last, Some((p2, "ok".to_string(), None, None)));
    let newest = summary[0]
        .last_poll
        .as_ref()
        .map(|p| (p.at, p.outcome.to_string()));
    assert_eq!(newest, Some((p2, "ok".to_string())));
    store.close().await.unwrap();
}

/// The rows of a query, each cell as text, from an independent connection.
fn text_rows(path: &Path, sql: &str) -> Vec<Vec<String>> {
    let c = Connection::open(path).unwrap();
    let mut stmt = c.prepare(sql).unwrap();
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| Ok(format!("{:?}", r.get::<_, rusqlite::types::Value>(i)?)))
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

/// A schema 4 store (polls kept beside their readings, failures and repeated `ok` polls in
/// poll_log, an `ok` horizon set) migrates to schema 5 keeping every row, and the new daily view
/// counts what poll_events shows, live at first and from the rollup once a pass has run.
#[tokio::test]
async fn a_schema_4_store_migrates_and_its_poll_outcomes_per_day_match_poll_events() {
    const DAY: i64 = 86_400_000;
    const T: i64 = 1_767_225_600_000; // 2026-01-01T00:00Z
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("four.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        for sql in &migrate::MIGRATIONS[..4] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 4).unwrap();
        let mut sql = String::from(
            "INSERT INTO connections (id, user_id, status, access_expires_at, refresh_expires_at,
                 created_at, updated_at) VALUES (1, 'u', 'active', 0, 0, 0, 0);
             INSERT INTO vehicles (id, vehicle_id, connection_id, added_at)
                 VALUES (1, 'veh-a', 1, 0), (2, 'veh-b', 1, 0);
             UPDATE store_state SET ok_events_since = ",
        );
        // The `ok` horizon in the middle of day 2: the kept polls before it are hidden.
        sql.push_str(&format!("{};\n", T + 2 * DAY + 12 * 3_600_000));
        for day in 0..6 {
            for (vehicle, tick) in [(1, 0), (1, 6), (1, 12), (1, 18), (2, 3), (2, 15)] {
                let at = T + day * DAY + tick * 3_600_000;
                // A poll kept beside its reading (battery + charge, one billed call), the
                // reading 40 s older than the poll; late in the day, one whose reading is
                // from the day before.
                let recorded = if tick == 0 {
                    at - 3_600_000
                } else {
                    at - 40_000
                };
                sql.push_str(&format!(
                    "INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp,
                         poll_endpoints, poll_calls)
                     VALUES ({vehicle}, {recorded}, {}, 5000, 3, 1);\n",
                    at - recorded
                ));
                // A repeated `ok` poll (nothing new) and a failure, in poll_log.
                sql.push_str(&format!(
                    "INSERT INTO poll_log (vehicle, at, endpoints, outcome, calls)
                         VALUES ({vehicle}, {}, 1, 'ok', 1);
                     INSERT INTO poll_log (vehicle, at, endpoints, outcome, http_status,
                         error_type, error_code, calls)
                         VALUES ({vehicle}, {}, 3, 'vehicle_state', 409, 'VEHICLE_STATE',
                                 'ASLEEP', 1);\n",
                    at + 60_000,
                    at + 120_000
                ));
            }
        }
        c.execute_batch(&sql).unwrap();
    }
    const EVENTS: &str = "SELECT vehicle_id, at, endpoint, outcome, http_status, error_type,
        error_code, calls FROM poll_events ORDER BY vehicle_id, at, endpoint, outcome";
    const BY_DAY: &str = "SELECT vehicle_id, at / 86400000 * 86400000, endpoint, outcome,
        count(*), sum(calls) FROM poll_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    const VIEW: &str = "SELECT vehicle_id, day, endpoint, outcome, sum(polls), sum(calls)
        FROM poll_outcomes_daily GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    let events = text_rows(&path, EVENTS);
    let readings = text_rows(
        &path,
        "SELECT * FROM readings ORDER BY vehicle, recorded_at",
    );
    let by_day = text_rows(&path, BY_DAY);
    assert!(events.len() > 100, "{}", events.len());

    let store = Store::open(&path, None).unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        store.call(|c| migrate::current_version(c)).await.unwrap(),
        migrate::latest_version()
    );
    assert_eq!(text_rows(&path, EVENTS), events, "poll_events unchanged");
    assert_eq!(
        text_rows(
            &path,
            "SELECT * FROM readings ORDER BY vehicle, recorded_at"
        ),
        readings
    );
    assert_eq!(text_rows(&path, VIEW), by_day, "live: nothing summarised");
    let pass = store
        .call(|c| rollup::run_all(c, T + 10 * DAY))
        .await
        .unwrap();
    assert_eq!(pass.watermark, T + 9 * DAY);
    assert!(pass.steps >= 2, "{pass:?}");
    assert_eq!(text_rows(&path, VIEW), by_day, "from the rollup");
    assert_eq!(text_rows(&path, EVENTS), events, "poll_events unchanged");
    // Removing a vehicle removes its summaries with the rest of its history.
    store
        .call(|c| Ok(c.execute("DELETE FROM vehicles WHERE vehicle_id = 'veh-b'", [])?))
        .await
        .unwrap();
    assert_eq!(
        text_rows(
            &path,
            "SELECT count(*) FROM poll_rollup_daily WHERE vehicle = 2"
        ),
        vec![vec!["Integer(0)".to_string()]]
    );
    assert_eq!(text_rows(&path, VIEW), text_rows(&path, BY_DAY));
    store.close().await.unwrap();
}

/// Issue 8's writer changes (an unkeyed hasher, the parked linger, cached BEGIN/COMMIT) must
/// not move what a batch stores. One batch holding two polls of one vehicle: a new instant each
/// time gives two rows, each keeping its poll; the same instant again is a duplicate whose poll
/// is still recorded (nothing fetched is lost).
#[tokio::test]
async fn a_batch_with_the_same_vehicle_twice_stores_both_polls() {
    const T: i64 = 1_767_225_600_000; // 2026-01-01
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("twice.db"));
    seed(&store, &["veh-a", "veh-b"]).await;
    let (a, b) = (vid("veh-a"), vid("veh-b"));
    let mut batch = listing_poll(&a, T + 5_000, T, T + 5_000);
    batch.extend(listing_poll(&b, T + 5_001, T - 7, T + 5_001));
    batch.extend(listing_poll(&a, T + 15_000, T + 10_000, T + 15_000));
    // A third poll of veh-a whose car did not report since the second.
    batch.extend(listing_poll(&a, T + 25_000, T + 10_000, T + 25_000));
    // One write is one batch: the owner never splits a message.
    store.write(batch).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 3);
    assert_eq!(total(&reports, WriteReport::duplicates_in, "battery"), 1);
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 0);
    assert_eq!(total(&reports, WriteReport::written_in, "poll_events"), 12);
    let (battery, polls) = store
        .call(|c| {
            let battery: Vec<(String, i64, i64)> = c
                .prepare(
                    "SELECT vehicle_id, recorded_at, fetched_at FROM battery_history
                     ORDER BY vehicle_id, recorded_at",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let polls: Vec<(String, i64, i64)> = c
                .prepare(
                    "SELECT vehicle_id, at, count(*) FROM poll_events WHERE outcome = 'ok'
                     GROUP BY vehicle_id, at ORDER BY vehicle_id, at",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            Ok((battery, polls))
        })
        .await
        .unwrap();
    assert_eq!(
        battery,
        vec![
            ("veh-a".to_string(), T, T + 5_000),
            ("veh-a".to_string(), T + 10_000, T + 15_000),
            ("veh-b".to_string(), T - 7, T + 5_001),
        ]
    );
    // Every poll's three events, the duplicate's included.
    assert_eq!(
        polls,
        vec![
            ("veh-a".to_string(), T + 5_000, 3),
            ("veh-a".to_string(), T + 15_000, 3),
            ("veh-a".to_string(), T + 25_000, 3),
            ("veh-b".to_string(), T + 5_001, 3),
        ]
    );
    store.close().await.unwrap();
}

/// A vehicle removed between two writes queued back to back (while the owner lingers over the
/// first): the removal ends the batch, sees the write before it, and the write after it is
/// counted as dropped, not stored under a stale cached key.
#[tokio::test]
async fn a_vehicle_removed_between_two_writes_drops_only_the_later_one() {
    const T: i64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("removed.db"));
    seed(&store, &["veh-a", "veh-b"]).await;
    let (a, b) = (vid("veh-a"), vid("veh-b"));
    store
        .write(listing_poll(&a, T + 5_000, T, T + 5_000))
        .await
        .unwrap();
    let (seen, removed) = {
        let remover = store.clone();
        let remove = tokio::spawn(async move {
            remover
                .call(|c| {
                    let seen: i64 =
                        c.query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))?;
                    Ok((seen, queries::remove_vehicle(c, &vid("veh-a"))?))
                })
                .await
        });
        // Queued after the call (it is sent before its task yields); both behind the first.
        tokio::task::yield_now().await;
        let mut later = listing_poll(&a, T + 15_000, T + 10_000, T + 15_000);
        later.extend(listing_poll(&b, T + 15_001, T + 10_001, T + 15_001));
        store.write(later).await.unwrap();
        remove.await.unwrap().unwrap()
    };
    store.flush().await.unwrap();
    assert!(removed);
    // The call ran after the first write was committed and before the second.
    assert_eq!(seen, 1);
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 2);
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 1);
    assert_eq!(total(&reports, WriteReport::dropped_in, "poll_events"), 3);
    let rows: Vec<(String, i64)> = store
        .call(|c| {
            Ok(
                c.prepare("SELECT vehicle_id, recorded_at FROM battery_history")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
            )
        })
        .await
        .unwrap();
    assert_eq!(rows, vec![("veh-b".to_string(), T + 10_001)]);
    store.close().await.unwrap();
}

/// The epoch: a vehicle removed and added again gets a new integer key; the writer's cache,
/// which held the old one, must follow (a row under the old key would belong to no vehicle, or
/// to another one that took it).
#[tokio::test]
async fn a_vehicle_added_again_is_written_under_its_new_key() {
    const T: i64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("epoch.db"));
    let conn = seed(&store, &["veh-a"]).await;
    let a = vid("veh-a");
    store
        .write(listing_poll(&a, T + 5_000, T, T + 5_000))
        .await
        .unwrap();
    store.flush().await.unwrap();
    let (old_key, new_key) = store
        .call(move |c| {
            let key = |c: &Connection| -> rusqlite::Result<i64> {
                c.query_row(
                    "SELECT id FROM vehicles WHERE vehicle_id = 'veh-a'",
                    [],
                    |r| r.get(0),
                )
            };
            let old = key(c)?;
            queries::remove_vehicle(c, &vid("veh-a"))?;
            // Another vehicle takes the freed key; veh-a comes back under a new one.
            queries::upsert_vehicle(c, conn, &vid("veh-z"), None, 2)?;
            queries::upsert_vehicle(c, conn, &vid("veh-a"), None, 3)?;
            Ok((old, key(c)?))
        })
        .await
        .unwrap();
    assert_ne!(old_key, new_key);
    store
        .write(listing_poll(&a, T + 15_000, T + 10_000, T + 15_000))
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), 2);
    assert_eq!(total(&reports, WriteReport::dropped_in, "battery"), 0);
    let rows: Vec<(i64, i64)> = store
        .call(|c| {
            Ok(c.prepare("SELECT vehicle, recorded_at FROM readings")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?)
        })
        .await
        .unwrap();
    assert_eq!(rows, vec![(new_key, T + 10_000)]);
    store.close().await.unwrap();
}

/// Many small writes (more items than a lingering batch waits for) all land, and the count of
/// items waiting for a batch, which decides when the owner stops lingering, is back to zero.
#[tokio::test]
async fn many_small_writes_all_land_and_leave_no_count_behind() {
    const T: i64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let (store, reports) = open_recording(&dir.path().join("many.db"));
    let names: Vec<String> = (0..100).map(|i| format!("veh-{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    seed(&store, &refs).await;
    let mut polls = 0u64;
    for round in 0..10i64 {
        for name in &names {
            let at = T + round * 60_000;
            store
                .write(listing_poll(&vid(name), at, at - 1_000, at))
                .await
                .unwrap();
            polls += 1;
        }
    }
    assert!(polls as usize * 6 > LINGER_UNTIL_ITEMS);
    store.flush().await.unwrap();
    assert_eq!(total(&reports, WriteReport::written_in, "battery"), polls);
    assert_eq!(
        total(&reports, WriteReport::written_in, "poll_events"),
        polls * 3
    );
    assert_eq!(
        store
            .wake
            .unbatched
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
    store.close().await.unwrap();
}

/// Schema 5's rollup statement (`src/store/rollup.rs` at schema 5), which filled
/// `poll_rollup_daily` with one plain row per vehicle, day, endpoint set and outcome: how a
/// schema 5 daemon left its summarised days, for the migration test below.
const SCHEMA_5_SUMMARISE: &str = "INSERT INTO poll_rollup_daily
         (vehicle, day, endpoints, outcome, polls, calls)
     SELECT ?1, day, endpoints, outcome, sum(polls), sum(calls) FROM (
         SELECT e.at / 86400000 * 86400000 AS day, e.endpoints AS endpoints,
                e.outcome AS outcome, count(*) AS polls, sum(e.calls) AS calls
         FROM poll_log e
         WHERE e.vehicle = ?1 AND e.at >= ?2 AND e.at < ?3
         GROUP BY 1, 2, 3
         UNION ALL
         SELECT (r.recorded_at + r.fetch_lag_ms) / 86400000 * 86400000, r.poll_endpoints,
                'ok', count(*), sum(r.poll_calls)
         FROM readings r
         WHERE r.vehicle = ?1 AND r.recorded_at >= ?2 - 86400000 AND r.recorded_at < ?3 + 86400000
           AND r.poll_endpoints IS NOT NULL
           AND r.recorded_at + r.fetch_lag_ms
               >= max(?2, (SELECT ok_events_since FROM store_state WHERE id = 1))
           AND r.recorded_at + r.fetch_lag_ms < ?3
         GROUP BY 1, 2
     ) WHERE true
     GROUP BY day, endpoints, outcome";

/// The history dashboard's "Poll outcomes per day" over every vehicle (its "All"), as the
/// storage bench runs it, over the first eight days of 2026.
const PANEL: &str = "SELECT d.day / 1000 AS time, sum(d.polls) AS value, d.outcome AS outcome
    FROM poll_outcomes_daily d
    WHERE d.day BETWEEN 1767225600000 AND 1767225600000 + 8 * 86400000
      AND d.vehicle_id IN (SELECT v.vehicle_id FROM vehicles v)
    GROUP BY 1, 3 ORDER BY 1, 3";

/// A schema 5 store whose polls were written by the real writer and whose closed days a
/// schema 5 pass summarised into plain `poll_rollup_daily` rows migrates to schema 6: the
/// facts that pack move into one `poll_rollup_days` row per vehicle-day, the others (a poll
/// billed two calls) stay plain, and `poll_outcomes_daily` and the dashboard's panel give the
/// same rows before, after, after schema 6's own pass over the later days, and after the
/// default retention (which gives the freed pages back).
#[tokio::test]
async fn a_schema_5_store_with_summarised_days_migrates_to_packed_days_with_the_same_rows() {
    const DAY: i64 = 86_400_000;
    const T: i64 = 1_767_225_600_000; // 2026-01-01T00:00Z
    let dir = tempfile::tempdir().unwrap();
    // The polls, through the real writer (readings and poll_log are the same in schemas 5
    // and 6): three vehicles, six days, a listing every two hours, asleep at 10:00, a daily
    // info poll and, for one vehicle, polls billed two calls each (they do not pack).
    let written = dir.path().join("written.db");
    let store = Store::open(&written, None).unwrap();
    let names = ["veh-a", "veh-b", "veh-c"];
    seed(&store, &names).await;
    for day in 0..6 {
        let mut items = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let v = vid(name);
            for hour in (0..24).step_by(2) {
                let at = T + day * DAY + hour * 3_600_000 + i as i64 * 60_000;
                if hour == 10 {
                    items.push(WriteItem::Event(PollEvent {
                        vehicle_id: v.clone(),
                        at,
                        endpoint: "battery".into(),
                        outcome: "vehicle_state".into(),
                        http_status: Some(409),
                        error_type: Some("VEHICLE_STATE".into()),
                        error_code: Some("ASLEEP".into()),
                        calls: Some(1),
                    }));
                    continue;
                }
                items.extend(listing_poll(&v, at, at - 40_000, at));
            }
            items.push(ok_event(&v, T + day * DAY + 4 * 3_600_000 + 5, "info", 1));
            if i == 2 {
                items.push(ok_event(&v, T + day * DAY + 13 * 3_600_000, "odometer", 2));
            }
        }
        store.write(items).await.unwrap();
    }
    store.flush().await.unwrap();
    store.close().await.unwrap();

    // The schema 5 store: schema 5's tables, the writer's rows copied in, its first four days
    // summarised by schema 5's statement and its watermark moved past them.
    let path = dir.path().join("five.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "auto_vacuum", "INCREMENTAL").unwrap();
        for sql in &migrate::MIGRATIONS[..5] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 5).unwrap();
        c.execute("ATTACH DATABASE ?1 AS w", [written.to_str().unwrap()])
            .unwrap();
        c.execute_batch(
            "DELETE FROM poll_endpoints;
             INSERT INTO poll_endpoints SELECT * FROM w.poll_endpoints;
             INSERT INTO connections SELECT * FROM w.connections;
             INSERT INTO vehicles SELECT * FROM w.vehicles;
             INSERT INTO readings SELECT * FROM w.readings;
             INSERT INTO reading_lags SELECT * FROM w.reading_lags;
             INSERT INTO poll_log SELECT * FROM w.poll_log;",
        )
        .unwrap();
        c.execute("DETACH DATABASE w", []).unwrap();
        for vehicle in 1..=3 {
            c.execute(
                SCHEMA_5_SUMMARISE,
                rusqlite::params![vehicle, T, T + 4 * DAY],
            )
            .unwrap();
        }
        c.execute(
            "UPDATE store_state SET polls_summarised_before = ?1",
            [T + 4 * DAY],
        )
        .unwrap();
    }
    const VIEW: &str = "SELECT vehicle_id, day, endpoint, outcome, sum(polls), sum(calls)
        FROM poll_outcomes_daily GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    const BY_DAY: &str = "SELECT vehicle_id, at / 86400000 * 86400000, endpoint, outcome,
        count(*), sum(calls) FROM poll_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    let plain = text_rows(&path, "SELECT count(*) FROM poll_rollup_daily");
    // Three facts a vehicle-day (the listing, the asleep poll, the info poll), four for veh-c.
    assert_eq!(plain, vec![vec!["Integer(40)".to_string()]]);
    let view = text_rows(&path, VIEW);
    let panel = text_rows(&path, PANEL);
    assert_eq!(
        view,
        text_rows(&path, BY_DAY),
        "schema 5 agrees with its events"
    );
    assert_eq!(panel.len(), 12, "{panel:?}");

    let store = Store::open(&path, None).unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        store.call(|c| migrate::current_version(c)).await.unwrap(),
        migrate::latest_version()
    );
    assert_eq!(
        text_rows(&path, VIEW),
        view,
        "the same days after the migration"
    );
    assert_eq!(text_rows(&path, PANEL), panel, "the same panel");
    // One row per vehicle-day; only the facts billed two calls a poll stayed plain.
    assert_eq!(
        text_rows(&path, "SELECT count(*) FROM poll_rollup_days"),
        vec![vec!["Integer(12)".to_string()]]
    );
    assert_eq!(
        text_rows(
            &path,
            "SELECT vehicle, count(*), sum(polls), sum(calls) FROM poll_rollup_daily GROUP BY 1"
        ),
        vec![vec![
            "Integer(3)".to_string(),
            "Integer(4)".to_string(),
            "Integer(4)".to_string(),
            "Integer(8)".to_string()
        ]]
    );
    // Schema 6's own pass summarises the later days the same way.
    let pass = store
        .call(|c| rollup::run_all(c, T + 7 * DAY))
        .await
        .unwrap();
    assert_eq!(pass.watermark, T + 6 * DAY);
    assert_eq!(
        text_rows(&path, VIEW),
        view,
        "the later days from the packed rows"
    );
    assert_eq!(text_rows(&path, PANEL), panel);
    assert_eq!(
        text_rows(&path, "SELECT count(*), count(d) FROM poll_rollup_days"),
        vec![vec!["Integer(18)".to_string(), "Integer(0)".to_string()]]
    );
    // The default retention (at 100 days, every `ok` event goes from poll_events) keeps every
    // day's counts and leaves no free page behind.
    let summary = store
        .call(|c| retention::run_all(c, &retention::Policy::default(), T + 100 * DAY))
        .await
        .unwrap();
    assert!(summary.events_deleted > 0, "{summary:?}");
    assert_eq!(text_rows(&path, VIEW), view, "after retention");
    assert_eq!(text_rows(&path, PANEL), panel);
    assert_eq!(
        text_rows(&path, "PRAGMA freelist_count"),
        vec![vec!["Integer(0)".to_string()]]
    );
    store.close().await.unwrap();
}

/// What packs into a `poll_rollup_days` fact and what stays a plain row.
#[test]
fn poll_outcome_facts_pack_only_what_their_fields_hold() {
    // A day of 96 listings: 2 bytes in SQLite; a day's one info poll: 1 byte.
    let listing = rollup::pack(1, 96).unwrap();
    assert!(listing <= i64::from(i16::MAX), "{listing}");
    assert_eq!((listing & 63, listing >> 6), (1, 96));
    assert!(rollup::pack(3, 1).unwrap() <= i64::from(i8::MAX));
    assert_eq!(rollup::pack(64, 1), None, "a shape past the field");
    assert_eq!(rollup::pack(1, 1 << 40), None);
    assert_eq!(rollup::calls_kind(2, Some(2)), Some(0));
    assert_eq!(rollup::calls_kind(2, None), Some(1));
    assert_eq!(rollup::calls_kind(2, Some(0)), Some(2));
    assert_eq!(rollup::calls_kind(2, Some(4)), None, "two calls a poll");
}

/// A day with more facts than a `poll_rollup_days` row holds, or with a fact that does not
/// pack (polls billed two calls each), keeps the rest as plain `poll_rollup_daily` rows, and
/// `poll_outcomes_daily` still counts what `poll_events` holds.
#[tokio::test]
async fn a_day_with_more_facts_than_a_day_row_holds_keeps_the_rest_as_plain_rows() {
    const T: i64 = 1_767_225_600_000; // 2026-01-01T00:00Z
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("facts.db");
    let store = Store::open(&path, None).unwrap();
    seed(&store, &["veh-a"]).await;
    let v = vid("veh-a");
    let mut items = Vec::new();
    // Six outcomes in one day, the first `n + 1` times each, then one poll billed two calls.
    for (n, outcome) in [
        "ok",
        "vehicle_state",
        "rate_limited",
        "upstream",
        "server",
        "timeout",
    ]
    .iter()
    .enumerate()
    {
        for k in 0..=n as i64 {
            items.push(WriteItem::Event(PollEvent {
                vehicle_id: v.clone(),
                at: T + (n as i64 * 10 + k) * 60_000,
                endpoint: "battery".into(),
                outcome: (*outcome).into(),
                http_status: (*outcome != "ok").then_some(500),
                error_type: None,
                error_code: None,
                calls: Some(1),
            }));
        }
    }
    items.push(ok_event(&v, T + 7_200_000, "odometer", 2));
    store.write(items).await.unwrap();
    store.flush().await.unwrap();
    let pass = store
        .call(|c| rollup::run_all(c, T + 2 * 86_400_000))
        .await
        .unwrap();
    assert_eq!(pass.watermark, T + 86_400_000);
    const VIEW: &str = "SELECT vehicle_id, day, endpoint, outcome, sum(polls), sum(calls)
        FROM poll_outcomes_daily GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    const BY_DAY: &str = "SELECT vehicle_id, at / 86400000 * 86400000, endpoint, outcome,
        count(*), sum(calls) FROM poll_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4";
    assert_eq!(text_rows(&path, VIEW), text_rows(&path, BY_DAY));
    assert_eq!(text_rows(&path, VIEW).len(), 7);
    // The four largest counts packed, the two smallest and the two-call poll plain.
    assert_eq!(
        text_rows(&path, "SELECT count(d) FROM poll_rollup_days"),
        vec![vec!["Integer(1)".to_string()]]
    );
    assert_eq!(
        text_rows(
            &path,
            "SELECT endpoints, outcome, polls, calls FROM poll_rollup_daily ORDER BY 1, 2"
        ),
        [
            ["Integer(1)", "Text(\"ok\")", "Integer(1)", "Integer(1)"],
            [
                "Integer(1)",
                "Text(\"vehicle_state\")",
                "Integer(2)",
                "Integer(2)"
            ],
            ["Integer(16)", "Text(\"ok\")", "Integer(1)", "Integer(2)"],
        ]
        .map(|r| r.map(String::from).to_vec())
        .to_vec()
    );
    store.close().await.unwrap();
}
