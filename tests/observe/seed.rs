//! A store with known contents, written through carpulse's own store (real schema, real
//! views, a real SQLite file), for the tests that check what the read commands, the README's
//! SQL and the Grafana history dashboard make of it.
//!
//! Three vehicles on one API Authentication connection, all times UTC:
//! - A `aaaa1111-…` TESLA Model 3 2021, on 2026-03-01 and 02: battery 40 → 80 % while charging
//!   09:00–11:00, down to 70 after a drive, 50 → 75 while charging 20:00–22:00; next day 70 → 90.
//!   Charge: sessions start at 03-01 09:00 and 20:00. Odometer one reading a day at 04:00:
//!   10000, 10050, 10130 km.
//! - B `bbbb2222-…` VOLKSWAGEN ID.4 2023: battery 55, 55 → 75 on 03-02; a session starting at
//!   its first charge row (03-02 07:00); odometer 500 and 530 on 03-01, 560 on 03-02.
//! - C `cccc3333-…` HYUNDAI IONIQ 5 2023: battery only in the last few hours (the README's
//!   "last 24 h" query), falling: 60 and 50 % in one hour, 40 % in the next.
//!
//! - D `dddd4444-…` CITROËN 2CV 'Charleston' 1986: an apostrophe in its model (Grafana's
//!   `$vehicle` must survive it); one battery reading, 03-03 06:00, 33 % and 99 km.
//!
//! Poll events: two failures of A (03-01 and 03-02) among ok ones, and a poll of A an hour
//! and more ago (battery ok, charge rate_limited).

use carpulse::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, PollEvent, Reading, Stamp,
    VehicleId, VehicleInfo,
};
use carpulse::store::{queries, Store, WriteItem};

pub const A: &str = "aaaa1111-0000-4000-8000-000000000001";
pub const B: &str = "bbbb2222-0000-4000-8000-000000000002";
pub const C: &str = "cccc3333-0000-4000-8000-000000000003";
pub const D: &str = "dddd4444-0000-4000-8000-000000000004";

/// 2026-03-01T00:00:00Z in unix ms.
pub const DAY1: i64 = 1_772_323_200_000;
pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;

/// The start of the hour that began three hours before `now` (C's readings are after it).
pub fn recent_hour(now: i64) -> i64 {
    now / HOUR * HOUR - 3 * HOUR
}

fn stamp(at: i64) -> Stamp {
    Stamp {
        recorded_at: at,
        fetched_at: at + 1500,
    }
}

fn battery(id: &str, at: i64, soc: f64, range_km: f64) -> WriteItem {
    WriteItem::Reading(
        VehicleId(id.into()),
        Reading::Battery(BatteryReading {
            stamp: stamp(at),
            soc_percent: soc,
            range_km: Some(range_km),
        }),
    )
}

fn charge(id: &str, at: i64, state: ChargeState) -> WriteItem {
    WriteItem::Reading(
        VehicleId(id.into()),
        Reading::Charge(ChargeReading {
            stamp: stamp(at),
            plugged_in: state != ChargeState::NotCharging,
            state,
        }),
    )
}

fn odometer(id: &str, at: i64, km: f64) -> WriteItem {
    WriteItem::Reading(
        VehicleId(id.into()),
        Reading::Odometer(OdometerReading {
            stamp: stamp(at),
            odometer_km: km,
        }),
    )
}

fn event(
    id: &str,
    at: i64,
    endpoint: &str,
    outcome: &str,
    err: Option<(u16, &str, &str)>,
) -> WriteItem {
    WriteItem::Event(PollEvent {
        vehicle_id: VehicleId(id.into()),
        at,
        endpoint: endpoint.to_owned().into(),
        outcome: outcome.to_owned().into(),
        http_status: err.map(|e| e.0),
        error_type: err.map(|e| e.1.into()),
        error_code: err.map(|e| e.2.into()),
        calls: Some(1),
    })
}

/// Writes the store at `path` (which must not exist) and closes it.
pub async fn seed(path: &std::path::Path, now: i64) {
    let store = Store::open(path, None).expect("opening the seed store");
    store
        .call(|c| {
            let conn = queries::upsert_app_connection(c, "user-1", DAY1)?;
            for (id, make, model, year) in [
                (A, "TESLA", "Model 3", 2021),
                (B, "VOLKSWAGEN", "ID.4", 2023),
                (C, "HYUNDAI", "IONIQ 5", 2023),
                (D, "CITROËN", "2CV 'Charleston'", 1986),
            ] {
                queries::upsert_vehicle(
                    c,
                    conn,
                    &VehicleId(id.into()),
                    Some(&VehicleInfo {
                        make: make.into(),
                        model: model.into(),
                        year,
                    }),
                    DAY1,
                )?;
            }
            Ok(())
        })
        .await
        .expect("seeding vehicles");
    use ChargeState::*;
    let h = |day: i64, hour: i64| DAY1 + day * DAY + hour * HOUR;
    let r = recent_hour(now);
    let items = vec![
        // A, battery
        battery(A, h(0, 8), 40.0, 160.0),
        battery(A, h(0, 9), 40.0, 160.0),
        battery(A, h(0, 10), 60.0, 240.0),
        battery(A, h(0, 11), 80.0, 320.0),
        battery(A, h(0, 12), 80.0, 320.0),
        battery(A, h(0, 13), 70.0, 280.0),
        battery(A, h(0, 20), 50.0, 200.0),
        battery(A, h(0, 21), 65.0, 260.0),
        battery(A, h(0, 22), 75.0, 300.0),
        battery(A, h(1, 8), 70.0, 280.0),
        battery(A, h(1, 18), 90.0, 360.0),
        // A, charge: sessions start at day 0 09:00 and 20:00
        charge(A, h(0, 8), NotCharging),
        charge(A, h(0, 9), Charging),
        charge(A, h(0, 10), Charging),
        charge(A, h(0, 11), FullyCharged),
        charge(A, h(0, 12), NotCharging),
        charge(A, h(0, 20), Charging),
        charge(A, h(0, 21), Charging),
        charge(A, h(0, 22), NotCharging),
        // A, odometer: one reading a day
        odometer(A, h(0, 4), 10_000.0),
        odometer(A, h(1, 4), 10_050.0),
        odometer(A, h(2, 4), 10_130.0),
        // B
        battery(B, h(0, 12), 55.0, 250.0),
        battery(B, h(1, 7), 55.0, 250.0),
        battery(B, h(1, 8), 75.0, 340.0),
        charge(B, h(1, 7), Charging),
        charge(B, h(1, 8), NotCharging),
        odometer(B, h(0, 4), 500.0),
        odometer(B, h(0, 18), 530.0),
        odometer(B, h(1, 4), 560.0),
        // C, recent
        battery(C, r + 10 * 60_000, 60.0, 300.0),
        battery(C, r + 40 * 60_000, 50.0, 250.0),
        battery(C, r + HOUR + 5 * 60_000, 40.0, 200.0),
        // D
        battery(D, h(2, 6), 33.0, 99.0),
        // events
        event(A, h(0, 8), "battery", "ok", None),
        event(
            A,
            h(0, 9),
            "battery",
            "vehicle_state",
            Some((409, "VEHICLE_STATE", "ASLEEP")),
        ),
        event(
            A,
            h(1, 8),
            "charge",
            "rate_limited",
            Some((429, "RATE_LIMIT", "VEHICLE")),
        ),
        event(B, h(1, 8), "battery", "ok", None),
        event(C, r + HOUR + 5 * 60_000, "battery", "ok", None),
        event(A, r + HOUR, "battery", "ok", None),
        event(
            A,
            r + HOUR,
            "charge",
            "rate_limited",
            Some((429, "RATE_LIMIT", "VEHICLE")),
        ),
    ];
    store.write(items).await.expect("seeding readings");
    store.close().await.expect("closing the seed store");
}
