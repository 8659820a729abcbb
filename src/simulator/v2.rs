//! Vehicle API v2.0 (smartcar-api.md §2): `/user`, paged `/vehicles` and `/permissions`, the
//! per-vehicle data endpoints with their `sc-*` headers, and `POST /batch` with per-item codes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors;
use super::fleet::Snapshot;
use super::oauth::{authenticate, Api, Rejection};
use super::state::{iso, Served, Sim, Stats};
use crate::domain::now_ms;

const KM_PER_MILE: f64 = 1.609344;
const MAX_LIMIT: usize = 50;
const DEFAULT_LIMIT: usize = 10;

/// The permissions every simulated vehicle grants.
pub const PERMISSIONS: &[&str] = &[
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
    "read_location",
];

fn imperial(headers: &HeaderMap) -> bool {
    headers
        .get("sc-unit-system")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("imperial"))
}

fn count_unit_header(sim: &Sim, headers: &HeaderMap) {
    if headers.get("sc-unit-system").is_none() {
        Stats::bump(&sim.stats.missing_unit_system);
    }
}

fn distance(km: f64, imperial: bool) -> f64 {
    if imperial {
        (km / KM_PER_MILE * 10.0).round() / 10.0
    } else {
        km
    }
}

/// The vehicle `id` if it belongs to `user`.
pub fn owned(sim: &Sim, user: usize, id: &str, api: Api) -> Result<usize, Rejection> {
    match sim.fleet.by_id.get(id) {
        Some(&v) if sim.fleet.vehicles[v].user == user => Ok(v),
        _ => {
            let msg =
                "The vehicle is no longer associated with the user's connected services account.";
            Err(Rejection::from(match api {
                Api::V2 => errors::v2(
                    400,
                    "CONNECTED_SERVICES_ACCOUNT",
                    Some("VEHICLE_MISSING"),
                    msg,
                ),
                Api::V3 => errors::v3(
                    400,
                    "CONNECTED_SERVICES_ACCOUNT",
                    Some("VEHICLE_MISSING"),
                    "Bad Request",
                    msg,
                ),
            }))
        }
    }
}

/// The body of a data path for vehicle `v`, whether it carries units, and what it served.
fn body(
    sim: &Sim,
    v: usize,
    path: &str,
    s: &Snapshot,
    imperial: bool,
) -> Option<(Value, bool, Served)> {
    let veh = &sim.fleet.vehicles[v];
    let none = Served::default();
    Some(match path.trim_end_matches('/') {
        "" => (
            json!({"id": veh.id, "make": veh.make, "model": veh.model, "year": veh.year}),
            false,
            none,
        ),
        "/vin" => (json!({"vin": veh.vin}), false, none),
        "/battery" => (
            json!({
                "percentRemaining": (s.soc_percent * 100.0).round() / 10_000.0,
                "range": distance(s.range_km, imperial),
            }),
            true,
            Served {
                battery: true,
                ..none
            },
        ),
        "/battery/capacity" => (json!({"capacity": veh.capacity_kwh}), false, none),
        "/charge" => (
            json!({"isPluggedIn": s.plugged_in, "state": s.charge_state.as_str()}),
            false,
            Served {
                charge: true,
                ..none
            },
        ),
        "/charge/limit" => (
            json!({"limit": s.charge_limit_percent / 100.0}),
            false,
            none,
        ),
        "/odometer" => (
            json!({"distance": distance(s.odometer_km, imperial)}),
            true,
            Served {
                odometer: true,
                ..none
            },
        ),
        "/location" => (
            json!({"latitude": s.latitude, "longitude": s.longitude}),
            false,
            none,
        ),
        _ => return None,
    })
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

pub async fn user(State(sim): State<Arc<Sim>>, headers: HeaderMap) -> Response {
    match authenticate(&sim, &headers, Api::V2) {
        Ok(u) => Json(json!({"id": sim.fleet.users[u].id})).into_response(),
        Err(r) => r.into_response(),
    }
}

/// `limit`/`offset` paging of a list, with Smartcar's validation error for a bad limit.
fn page(items: Vec<Value>, q: &HashMap<String, String>, key: &str) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_LIMIT,
        Some(Ok(l)) if (1..=MAX_LIMIT).contains(&l) => l,
        _ => {
            return errors::v2(
                400,
                "VALIDATION",
                Some("PARAMETER"),
                "limit must be an integer between 1 and 50.",
            )
        }
    };
    let offset = match q.get("offset").map(|o| o.parse::<usize>()) {
        None => 0,
        Some(Ok(o)) => o,
        Some(Err(_)) => {
            return errors::v2(
                400,
                "VALIDATION",
                Some("PARAMETER"),
                "offset must be a non-negative integer.",
            )
        }
    };
    let count = items.len();
    let slice: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
    Json(json!({key: slice, "paging": {"count": count, "offset": offset}})).into_response()
}

pub async fn vehicles(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let user = match authenticate(&sim, &headers, Api::V2) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let ids = sim.fleet.users[user]
        .vehicles
        .iter()
        .map(|&v| Value::from(sim.fleet.vehicles[v].id.clone()))
        .collect();
    page(ids, &q, "vehicles")
}

pub async fn info(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    data(&sim, &headers, &id, "", &HashMap::new())
}

pub async fn path(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path((id, rest)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    data(&sim, &headers, &id, &format!("/{rest}"), &q)
}

fn data(
    sim: &Sim,
    headers: &HeaderMap,
    id: &str,
    path: &str,
    q: &HashMap<String, String>,
) -> Response {
    let user = match authenticate(sim, headers, Api::V2) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let v = match owned(sim, user, id, Api::V2) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if path == "/permissions" {
        let perms = PERMISSIONS.iter().map(|p| Value::from(*p)).collect();
        return page(perms, q, "permissions");
    }
    count_unit_header(sim, headers);
    let now = now_ms();
    let (at, snap) = sim.data(v, now);
    let imperial = imperial(headers);
    let Some((body, units, served)) = body(sim, v, path, &snap, imperial) else {
        return errors::v2(
            404,
            "RESOURCE_NOT_FOUND",
            Some("PATH"),
            "The requested resource does not exist.",
        );
    };
    sim.record_served(v, at, &snap, served);
    let mut r = Json(body).into_response();
    let h = r.headers_mut();
    set(h, "sc-request-id", &errors::request_id());
    set(h, "sc-data-age", &iso(at));
    set(h, "sc-fetched-at", &iso(now));
    if units {
        set(
            h,
            "sc-unit-system",
            if imperial { "imperial" } else { "metric" },
        );
    }
    r
}

pub async fn batch(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body_text: String,
) -> Response {
    let user = match authenticate(&sim, &headers, Api::V2) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let v = match owned(&sim, user, &id, Api::V2) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let requests: Vec<String> = match serde_json::from_str::<Value>(&body_text) {
        Ok(b) => match b.get("requests").and_then(Value::as_array) {
            Some(items) => items
                .iter()
                .filter_map(|i| i.get("path").and_then(Value::as_str).map(str::to_string))
                .collect(),
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    if requests.is_empty() {
        return errors::v2(
            400,
            "VALIDATION",
            None,
            "The body must be {\"requests\": [{\"path\": ...}, ...]} with at least one path.",
        );
    }
    count_unit_header(&sim, &headers);
    let now = now_ms();
    let (at, snap) = sim.data(v, now);
    let imperial = imperial(&headers);
    let responses: Vec<Value> = requests
        .iter()
        .map(|p| match body(&sim, v, p, &snap, imperial) {
            Some((b, units, served)) => {
                sim.record_served(v, at, &snap, served);
                let mut h = json!({"sc-data-age": iso(at), "sc-fetched-at": iso(now)});
                if units {
                    h["sc-unit-system"] = json!(if imperial { "imperial" } else { "metric" });
                }
                json!({"path": p, "code": 200, "body": b, "headers": h})
            }
            None => json!({
                "path": p,
                "code": 404,
                "body": errors::v2_body(404, "RESOURCE_NOT_FOUND", Some("PATH"),
                    "The requested resource does not exist.", &errors::request_id()),
            }),
        })
        .collect();
    let mut r = Json(json!({"responses": responses})).into_response();
    set(r.headers_mut(), "sc-request-id", &errors::request_id());
    r
}
