//! Vehicle API v2.0 (`/v2.0`): `/user`, `/vehicles`, the per-vehicle resources and `/batch`,
//! with the `sc-*` headers and error objects of smartcar-api.md §2 and §4.
//!
//! Every per-vehicle resource is resolved by one function ([`resource`]) so a direct request and a
//! batch item answer identically, and both record what they served. What a car cannot answer for
//! its powertrain (fuel on a BEV, battery on an ICE) is 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE,
//! as Smartcar answers it, so carpulse learns to disable such endpoints per vehicle.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::{Api, ApiError};
use super::fleet::{
    km_to_miles, kpa_to_psi, litres_to_us_gallons, random_uuid, round_to, Vehicle, VehicleState,
};
use super::stats::{bump, Served};
use super::{api_json, iso_ms, Sim, SimState};
use crate::domain::{now_ms, UnitSystem, UnixMillis};

const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 50;

/// The permissions every simulated consent grants.
const PERMISSIONS: &[&str] = &[
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
    "read_location",
    "read_fuel",
    "read_engine_oil",
    "read_tires",
];

/// 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE: the endpoint exists but this car's powertrain has
/// nothing to answer it with (smartcar-api.md §4.2: permanent for that endpoint and vehicle).
pub(crate) fn not_capable() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "COMPATIBILITY",
        Some("VEHICLE_NOT_CAPABLE"),
        "The vehicle is not capable of performing your request.",
        None,
    )
}

type QueryResult = Result<Query<HashMap<String, String>>, QueryRejection>;

/// `limit`/`offset` of a paged list: limit 1–50 (default 10), offset ≥ 0.
fn paging(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::validation(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}."
                )))
            }
        },
    };
    let offset = match query.get("offset") {
        None => 0,
        Some(raw) => raw
            .parse::<usize>()
            .map_err(|_| ApiError::validation("offset must be a non-negative integer."))?,
    };
    Ok((limit, offset))
}

fn page_of<T: Clone>(items: &[T], limit: usize, offset: usize) -> Vec<T> {
    items.iter().skip(offset).take(limit).cloned().collect()
}

fn respond(request_id: &str, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| e.into_api_response(Api::V2, request_id))
}

/// `GET /v2.0/user`
pub(crate) async fn user(State(sim): State<SimState>, headers: HeaderMap) -> Response {
    let rid = random_uuid();
    let result = sim
        .authenticate(&headers)
        .map(|user| api_json(&rid, json!({"id": sim.fleet.users[user].id}), &[]));
    respond(&rid, result)
}

/// `GET /v2.0/vehicles?limit=&offset=`: the token user's vehicle ids; `paging.count` is the total.
pub(crate) async fn vehicles(
    State(sim): State<SimState>,
    headers: HeaderMap,
    query: QueryResult,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let user = sim.authenticate(&headers)?;
        let Ok(Query(query)) = query else {
            return Err(ApiError::validation("malformed query string."));
        };
        let (limit, offset) = paging(&query)?;
        let ids: Vec<&str> = sim.fleet.users[user]
            .vehicles
            .iter()
            .filter(|v| sim.granted(user, &v.id))
            .map(|v| v.id.as_str())
            .collect();
        let body = json!({
            "vehicles": page_of(&ids, limit, offset),
            "paging": {"count": ids.len(), "offset": offset},
        });
        Ok(api_json(&rid, body, &[]))
    })();
    respond(&rid, result)
}

/// `GET /v2.0/vehicles/{id}`: the vehicle info object.
pub(crate) async fn vehicle_root(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: QueryResult,
) -> Response {
    vehicle_request(&sim, &headers, &id, "/", query)
}

/// `GET /v2.0/vehicles/{id}/{resource}`
pub(crate) async fn vehicle_resource(
    State(sim): State<SimState>,
    Path((id, rest)): Path<(String, String)>,
    headers: HeaderMap,
    query: QueryResult,
) -> Response {
    vehicle_request(&sim, &headers, &id, &format!("/{rest}"), query)
}

/// The unit system asked for; a request without `sc-unit-system` is answered metric and counted
/// (the SDKs always send it, so carpulse should too).
fn unit_system(sim: &Sim, headers: &HeaderMap) -> UnitSystem {
    match headers.get("sc-unit-system").and_then(|v| v.to_str().ok()) {
        None => {
            bump(&sim.stats.missing_unit_system);
            UnitSystem::Metric
        }
        Some(v) if v.trim().eq_ignore_ascii_case("imperial") => UnitSystem::Imperial,
        Some(_) => UnitSystem::Metric,
    }
}

/// The `sc-data-age`/`sc-fetched-at`/`sc-unit-system` trio of a data response.
fn data_headers(
    state: &VehicleState,
    now: UnixMillis,
    units: UnitSystem,
) -> [(&'static str, String); 3] {
    [
        ("sc-data-age", iso_ms(state.report_ms)),
        ("sc-fetched-at", iso_ms(now)),
        ("sc-unit-system", units.as_str().to_owned()),
    ]
}

fn vehicle_request(
    sim: &Sim,
    headers: &HeaderMap,
    id: &str,
    path: &str,
    query: QueryResult,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let user = sim.authenticate(headers)?;
        let vehicle = sim.owned_vehicle(user, id)?;
        let units = unit_system(sim, headers);
        let Ok(Query(query)) = query else {
            return Err(ApiError::validation("malformed query string."));
        };
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        let found = resource(vehicle, &state, path, units, &query)?;
        sim.served.record(&vehicle.id, &state, found.served);
        let headers = data_headers(&state, now, units);
        let extra: &[(&'static str, String)] = if found.is_data { &headers } else { &[] };
        Ok(api_json(&rid, found.body, extra))
    })();
    respond(&rid, result)
}

/// One resolved resource.
struct Found {
    body: Value,
    /// Carries vehicle data (gets the `sc-data-age` headers).
    is_data: bool,
    served: &'static [Served],
}

fn distance(km: f64, units: UnitSystem) -> f64 {
    match units {
        UnitSystem::Metric => km,
        UnitSystem::Imperial => km_to_miles(km),
    }
}

/// Litres (metric) or US gallons (imperial).
fn volume(litres: f64, units: UnitSystem) -> f64 {
    match units {
        UnitSystem::Metric => litres,
        UnitSystem::Imperial => litres_to_us_gallons(litres),
    }
}

/// kPa (metric) or psi (imperial).
fn pressure(kpa: f64, units: UnitSystem) -> f64 {
    match units {
        UnitSystem::Metric => kpa,
        UnitSystem::Imperial => kpa_to_psi(kpa),
    }
}

/// Resolves a vehicle resource path (`/`, `/battery`, ...) to its body.
fn resource(
    vehicle: &Vehicle,
    state: &VehicleState,
    path: &str,
    units: UnitSystem,
    query: &HashMap<String, String>,
) -> Result<Found, ApiError> {
    let data = |body: Value, served: &'static [Served]| {
        Ok(Found {
            body,
            is_data: true,
            served,
        })
    };
    let trimmed = path.trim_end_matches('/');
    let battery_path = matches!(
        trimmed,
        "/battery"
            | "/battery/capacity"
            | "/battery/nominal_capacity"
            | "/charge"
            | "/charge/limit"
    );
    if battery_path && !vehicle.powertrain.has_battery() {
        return Err(not_capable());
    }
    match trimmed {
        "" => data(
            json!({"id": vehicle.id, "make": vehicle.make, "model": vehicle.model, "year": vehicle.year}),
            &[],
        ),
        "/vin" => data(json!({"vin": vehicle.vin}), &[]),
        "/battery" => data(
            json!({
                "percentRemaining": round_to(state.soc_percent / 100.0, 4),
                "range": distance(state.range_km, units),
            }),
            &[Served::Battery],
        ),
        "/battery/capacity" => data(json!({"capacity": vehicle.capacity_kwh}), &[]),
        "/battery/nominal_capacity" => data(
            json!({
                "availableCapacities": [{"capacity": vehicle.capacity_kwh, "description": null}],
                "capacity": {"nominal": vehicle.capacity_kwh, "source": "SMARTCAR"},
                "url": null,
            }),
            &[],
        ),
        "/charge" => data(
            json!({"isPluggedIn": state.plugged_in, "state": state.charge_state.as_str()}),
            &[Served::Charge],
        ),
        "/charge/limit" => data(
            json!({"limit": round_to(vehicle.charge_limit_pct / 100.0, 4)}),
            &[],
        ),
        "/odometer" => data(
            json!({"distance": distance(state.odometer_km, units)}),
            &[Served::Odometer],
        ),
        "/location" => data(
            json!({"latitude": state.latitude, "longitude": state.longitude}),
            &[],
        ),
        "/fuel" => {
            let fuel = state.fuel.ok_or_else(not_capable)?;
            data(
                json!({
                    "range": distance(fuel.range_km, units),
                    "percentRemaining": round_to(fuel.percent / 100.0, 4),
                    "amountRemaining": volume(fuel.litres, units),
                }),
                &[],
            )
        }
        "/engine/oil" => {
            let life = state.oil_life.ok_or_else(not_capable)?;
            data(json!({ "lifeRemaining": life }), &[])
        }
        "/tires/pressure" => {
            let [fl, fr, bl, br] = state.tire_kpa.map(|kpa| pressure(kpa, units));
            data(
                json!({"frontLeft": fl, "frontRight": fr, "backLeft": bl, "backRight": br}),
                &[],
            )
        }
        "/permissions" => {
            let (limit, offset) = paging(query)?;
            Ok(Found {
                body: json!({
                    "permissions": page_of(PERMISSIONS, limit, offset),
                    "paging": {"count": PERMISSIONS.len(), "offset": offset},
                }),
                is_data: false,
                served: &[],
            })
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// `POST /v2.0/vehicles/{id}/batch`: `{"requests":[{"path":"/battery"},...]}` → 200 with one
/// `{path, code, body, headers}` per item; failed items carry their error object and no headers.
pub(crate) async fn batch(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let user = sim.authenticate(&headers)?;
        let paths = parse_batch(&body)?;
        // Every item counts against the vehicle's limit (smartcar-api.md §2.3).
        let cost = u32::try_from(paths.len()).unwrap_or(u32::MAX);
        let vehicle = sim.owned_vehicle_costing(user, &id, cost)?;
        let units = unit_system(&sim, &headers);
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        let no_query = HashMap::new();
        let responses: Vec<Value> = paths
            .iter()
            .map(|path| {
                bump(&sim.stats.batch_items);
                let normalized = if path.starts_with('/') {
                    path.clone()
                } else {
                    format!("/{path}")
                };
                match resource(vehicle, &state, &normalized, units, &no_query) {
                    Ok(found) => {
                        sim.served.record(&vehicle.id, &state, found.served);
                        let mut item = json!({"path": path, "code": 200, "body": found.body});
                        if found.is_data {
                            let headers: serde_json::Map<String, Value> =
                                data_headers(&state, now, units)
                                    .into_iter()
                                    .map(|(k, v)| (k.to_owned(), Value::String(v)))
                                    .collect();
                            item["headers"] = Value::Object(headers);
                        }
                        item
                    }
                    Err(e) => {
                        json!({"path": path, "code": e.status.as_u16(), "body": e.v2_body(&rid)})
                    }
                }
            })
            .collect();
        Ok(api_json(&rid, json!({ "responses": responses }), &[]))
    })();
    respond(&rid, result)
}

fn parse_batch(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let invalid =
        || ApiError::validation("the body must be {\"requests\":[{\"path\":\"/battery\"},...]}.");
    let value: Value = serde_json::from_slice(body).map_err(|_| invalid())?;
    let requests = value
        .get("requests")
        .and_then(Value::as_array)
        .ok_or_else(invalid)?;
    if requests.is_empty() {
        return Err(invalid());
    }
    requests
        .iter()
        .map(|r| {
            r.get("path")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(invalid)
        })
        .collect()
}
