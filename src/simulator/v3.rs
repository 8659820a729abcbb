//! Vehicle API v3 (smartcar-api.md §3): the vehicle object and the JSON:API signal list, paged
//! with `page`/`pageSize` and relative `links`, plus single signals. Units are v3's: percent
//! 0–100, kilometres.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors;
use super::fleet::Snapshot;
use super::oauth::{authenticate, Api};
use super::state::{Served, Sim};
use super::v2::owned;
use crate::domain::{now_ms, ChargeState};

const DEFAULT_PAGE_SIZE: usize = 10;
const MAX_PAGE_SIZE: usize = 100;

fn vehicle_object(sim: &Sim, v: usize) -> Value {
    let veh = &sim.fleet.vehicles[v];
    json!({
        "id": veh.id,
        "type": "vehicle",
        "attributes": {"make": veh.make, "model": veh.model, "year": veh.year,
                       "powertrainType": "BEV", "mode": "simulated"},
        "links": {"self": format!("/vehicles/{}", veh.id)},
    })
}

pub async fn vehicle(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let v = match authenticate(&sim, &headers, Api::V3).and_then(|u| owned(&sim, u, &id, Api::V3)) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    Json(json!({"data": vehicle_object(&sim, v)})).into_response()
}

/// Every signal the simulated car reports: (code, name, group, body, what it serves).
fn signals(
    sim: &Sim,
    v: usize,
    s: &Snapshot,
) -> Vec<(&'static str, &'static str, &'static str, Value, Served)> {
    let veh = &sim.fleet.vehicles[v];
    let none = Served::default();
    let battery = Served {
        battery: true,
        ..none
    };
    let charge = Served {
        charge: true,
        ..none
    };
    vec![
        (
            "tractionbattery-stateofcharge",
            "StateOfCharge",
            "TractionBattery",
            json!({"unit": "percent", "value": s.soc_percent}),
            battery,
        ),
        (
            "tractionbattery-range",
            "Range",
            "TractionBattery",
            json!({"unit": "kilometers", "value": s.range_km,
                   "additionalValues": [{"type": "ESTIMATED", "value": s.range_km}]}),
            battery,
        ),
        (
            "tractionbattery-nominalcapacity",
            "NominalCapacity",
            "TractionBattery",
            json!({"source": "SMARTCAR", "capacity": veh.capacity_kwh, "unit": "kWh",
                   "availableCapacities": [{"capacity": veh.capacity_kwh, "description": null}]}),
            none,
        ),
        (
            "charge-ischarging",
            "IsCharging",
            "Charge",
            json!({"value": s.charge_state == ChargeState::Charging}),
            none,
        ),
        (
            "charge-ischargingcableconnected",
            "IsChargingCableConnected",
            "Charge",
            json!({"value": s.plugged_in}),
            charge,
        ),
        (
            "charge-detailedchargingstatus",
            "DetailedChargingStatus",
            "Charge",
            json!({"value": s.charge_state.as_str()}),
            charge,
        ),
        (
            "charge-chargelimits",
            "ChargeLimits",
            "Charge",
            json!({"values": [{"type": "GLOBAL", "limit": s.charge_limit_percent, "condition": null}],
                   "activeLimit": s.charge_limit_percent, "unit": "percent"}),
            none,
        ),
        (
            "charge-timetocomplete",
            "TimeToComplete",
            "Charge",
            json!({"value": s.minutes_to_complete, "unit": "minutes"}),
            none,
        ),
        (
            "odometer-traveleddistance",
            "TraveledDistance",
            "Odometer",
            json!({"unit": "kilometers", "value": s.odometer_km}),
            Served {
                odometer: true,
                ..none
            },
        ),
        (
            "location-preciselocation",
            "PreciseLocation",
            "Location",
            json!({"latitude": s.latitude, "longitude": s.longitude, "heading": 0.0, "direction": "N",
                   "locationType": "CURRENT"}),
            none,
        ),
        (
            "location-isathome",
            "IsAtHome",
            "Location",
            json!({"value": s.phase != super::fleet::Phase::Driving}),
            none,
        ),
        (
            "lowvoltagebattery-stateofcharge",
            "StateOfCharge",
            "LowVoltageBattery",
            json!({"unit": "percent", "value": 92}),
            none,
        ),
        (
            "vehicleidentification-vin",
            "Vin",
            "VehicleIdentification",
            json!({"value": veh.vin}),
            none,
        ),
    ]
}

fn signal_object(
    veh_id: &str,
    code: &str,
    name: &str,
    group: &str,
    body: Value,
    at: i64,
    now: i64,
) -> Value {
    json!({
        "id": code,
        "type": "signal",
        "attributes": {"code": code, "name": name, "group": group,
                       "status": {"value": "SUCCESS"}, "body": body},
        "meta": {"retrievedAt": now, "oemUpdatedAt": at},
        "links": {"self": format!("/vehicles/{veh_id}/signals/{code}"),
                  "vehicle": format!("/vehicles/{veh_id}")},
    })
}

fn bad_param(detail: &str) -> Response {
    errors::v3(400, "VALIDATION", Some("PARAMETER"), "Bad Request", detail)
}

pub async fn list(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let v = match authenticate(&sim, &headers, Api::V3).and_then(|u| owned(&sim, u, &id, Api::V3)) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let page = match q.get("page").map(|p| p.parse::<usize>()) {
        None => 1,
        Some(Ok(p)) if p >= 1 => p,
        _ => return bad_param("page must be a positive integer."),
    };
    let size = match q.get("pageSize").map(|p| p.parse::<usize>()) {
        None => DEFAULT_PAGE_SIZE,
        Some(Ok(s)) if (1..=MAX_PAGE_SIZE).contains(&s) => s,
        _ => return bad_param("pageSize must be an integer between 1 and 100."),
    };
    let now = now_ms();
    let (at, snap) = sim.data(v, now);
    let all = signals(&sim, v, &snap);
    let total = all.len();
    let pages = total.div_ceil(size).max(1);
    let veh_id = &sim.fleet.vehicles[v].id;
    let mut served = Served::default();
    let data: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|(code, name, group, body, what)| {
            served.battery |= what.battery;
            served.charge |= what.charge;
            served.odometer |= what.odometer;
            signal_object(veh_id, code, name, group, body, at, now)
        })
        .collect();
    sim.record_served(v, at, &snap, served);
    let link = |p: usize| format!("/vehicles/{veh_id}/signals?page={p}&pageSize={size}");
    Json(json!({
        "data": data,
        "meta": {"page": page, "pageSize": size, "totalCount": total},
        "links": {
            "self": link(page),
            "first": link(1),
            "previous": if page > 1 { Value::from(link(page - 1)) } else { Value::Null },
            "next": if page < pages { Value::from(link(page + 1)) } else { Value::Null },
            "last": link(pages),
        },
        "included": {"vehicle": vehicle_object(&sim, v)},
    }))
    .into_response()
}

pub async fn one(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path((id, code)): Path<(String, String)>,
) -> Response {
    let v = match authenticate(&sim, &headers, Api::V3).and_then(|u| owned(&sim, u, &id, Api::V3)) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let now = now_ms();
    let (at, snap) = sim.data(v, now);
    let veh_id = sim.fleet.vehicles[v].id.clone();
    match signals(&sim, v, &snap).into_iter().find(|s| s.0 == code) {
        Some((code, name, group, body, what)) => {
            sim.record_served(v, at, &snap, what);
            Json(signal_object(&veh_id, code, name, group, body, at, now)).into_response()
        }
        None => errors::v3(
            404,
            "RESOURCE_NOT_FOUND",
            Some("PATH"),
            "Not Found",
            &format!("The signal {code} does not exist for this vehicle."),
        ),
    }
}
