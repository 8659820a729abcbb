//! Vehicle API v2.0 (`/v2.0`): `/user`, `/vehicles`, the per-vehicle resources and `/batch`,
//! with the `sc-*` headers and error objects of smartcar-api.md §2 and §4.
//!
//! Every per-vehicle resource is resolved by one function ([`resource`]) so a direct request and a
//! batch item answer identically, and both record what they served. What a car cannot answer for
//! its powertrain (fuel on a BEV, battery on an ICE) is 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE,
//! as Smartcar answers it, so carpulse learns to disable such endpoints per vehicle.
//!
//! Each resource needs the permission of smartcar-api.md §2.2 ([`v2_permission`]); one the
//! token's consent did not grant is 403 PERMISSION (code null, resolution REAUTHENTICATE), checked
//! before faults and rate limits as Smartcar refuses it without asking the car. In a batch only
//! that item fails. `/permissions` lists exactly the granted scope.

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
use super::scope::{v2_permission, Scope};
use super::stats::{bump, Served};
use super::{api_json, iso_ms, Caller, Sim, SimState};
use crate::domain::{now_ms, UnitSystem, UnixMillis};

const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 50;

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
        .map(|caller| api_json(&rid, json!({"id": sim.fleet.users[caller.user].id}), &[]));
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
        let user = sim.authenticate(&headers)?.user;
        let Ok(Query(query)) = query else {
            return Err(ApiError::validation("malformed query string."));
        };
        let (limit, offset) = paging(&query)?;
        let ids: Vec<&str> = sim.fleet.users[user]
            .vehicles
            .iter()
            .filter(|v| sim.lists_vehicle(user, &v.id))
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
        let caller = sim.authenticate(headers)?;
        let vehicle = sim.vehicle_of(caller.user, id)?;
        // Smartcar refuses a permission it was not granted without asking the car: before any
        // fault or rate limit.
        check_permission(sim, &caller, path)?;
        sim.admit(vehicle, 1)?;
        let units = unit_system(sim, headers);
        let Ok(Query(query)) = query else {
            return Err(ApiError::validation("malformed query string."));
        };
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        let found = resource(vehicle, &state, path, units, &query, caller.scope)?;
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

/// Resolves a vehicle resource path (`/`, `/battery`, ...) to its body. The caller checked the
/// path's permission ([`v2_permission`]); `scope` is what `/permissions` lists.
fn resource(
    vehicle: &Vehicle,
    state: &VehicleState,
    path: &str,
    units: UnitSystem,
    query: &HashMap<String, String>,
    scope: Scope,
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
        // Exactly what the token's consent granted (no permission needed to ask).
        "/permissions" => {
            let (limit, offset) = paging(query)?;
            let granted = scope.names();
            Ok(Found {
                body: json!({
                    "permissions": page_of(&granted, limit, offset),
                    "paging": {"count": granted.len(), "offset": offset},
                }),
                is_data: false,
                served: &[],
            })
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// `POST /v2.0/vehicles/{id}/batch`: `{"requests":[{"path":"/battery"},...]}` → 200 with one
/// `{path, code, body, headers}` per item; failed items carry their error object and no headers
/// (an item whose permission was not granted: `code` 403 and the PERMISSION object).
pub(crate) async fn batch(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let caller = sim.authenticate(&headers)?;
        let paths = parse_batch(&body)?;
        // Every item counts against the vehicle's limit (smartcar-api.md §2.3).
        let cost = u32::try_from(paths.len()).unwrap_or(u32::MAX);
        let vehicle = sim.owned_vehicle_costing(caller.user, &id, cost)?;
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
                let found = check_permission(&sim, &caller, &normalized).and_then(|()| {
                    resource(vehicle, &state, &normalized, units, &no_query, caller.scope)
                });
                match found {
                    Ok(found) => {
                        sim.served.record(&vehicle.id, &state, found.served);
                        // Every successful item has `headers` (smartcar-api.md §2.3), if only
                        // `{}`: the Python SDK reads them unguarded.
                        let mut item =
                            json!({"path": path, "code": 200, "body": found.body, "headers": {}});
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

/// 403 PERMISSION if the path needs a permission the token's consent did not grant
/// (smartcar-api.md §2.2, §4.2); the same check for a direct request and a batch item.
fn check_permission(sim: &Sim, caller: &Caller, path: &str) -> Result<(), ApiError> {
    match v2_permission(path) {
        Some(permission) => caller.require(sim, permission),
        None => Ok(()),
    }
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
