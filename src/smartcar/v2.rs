//! Vehicle API v2.0 (smartcar-api.md §2): the user id, paged vehicle discovery, vehicle info
//! and the `/batch` request that fetches several endpoints of one vehicle in one round trip
//! (one request instead of two or three to a car that answers in 3–45 s).
//!
//! The parsing functions are pure (JSON in, domain values out) so the batch item rules of
//! §2.3 (per-item status, headers missing or differently cased, numeric `Retry-After`) are
//! unit-tested without a server.

use std::collections::HashSet;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{api_error_from, parse_error_value, retry_after_value, ApiError, ErrorKind};
use super::time::{parse_data_age, stamp};
use super::units::{
    parse_unit_system, plausible_km, plausible_year, v2_fraction_to_percent, DistanceUnit,
};
use super::{Endpoint, EndpointResult, Job, Payload, RawResponse, RequestCtx, SmartcarClient};
use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, Secret, UnitSystem, UnixMillis,
    VehicleId, VehicleInfo,
};

/// The documented maximum page size of `GET /vehicles`.
pub const PAGE_LIMIT: usize = 50;
/// A bound on discovery loops against a misbehaving server (50 × 200 = 10,000 vehicles).
const MAX_PAGES: usize = 200;

#[derive(Deserialize)]
struct UserBody {
    id: String,
}

/// One page of a v2 list: `{"<key>": [...], "paging": {"count": N, "offset": M}}`.
#[derive(Deserialize)]
struct ListPage {
    #[serde(default)]
    paging: Option<Paging>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Deserialize)]
struct Paging {
    #[serde(default)]
    count: Option<u64>,
}

pub(crate) async fn user_id(client: &SmartcarClient, access: &Secret) -> Result<String, ApiError> {
    let url = client.v2_url("/user");
    let raw = client
        .send(client.vehicle_request(Method::GET, &url, access, None))
        .await?;
    Ok(raw.json::<UserBody>("user")?.id)
}

/// Every vehicle id the token covers (`GET /vehicles`, paged).
pub(crate) async fn list_vehicles(
    client: &SmartcarClient,
    access: &Secret,
) -> Result<Vec<VehicleId>, ApiError> {
    let ids = paged_list(client, access, "/vehicles", "vehicles").await?;
    Ok(ids.into_iter().map(VehicleId).collect())
}

/// The permissions the consent granted for this vehicle (`GET /vehicles/{id}/permissions`,
/// paged).
pub(crate) async fn permissions(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
) -> Result<Vec<String>, ApiError> {
    let path = format!("/vehicles/{}/permissions", id.0);
    paged_list(client, ctx.access_token, &path, "permissions").await
}

/// Pages through a v2 list of strings until `paging.count` are read. Guards against a server
/// whose pages or count are wrong: stops on an empty page, on a page that adds nothing new
/// (an ignored `offset`), and after [`MAX_PAGES`].
async fn paged_list(
    client: &SmartcarClient,
    access: &Secret,
    path: &str,
    key: &'static str,
) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut offset = 0usize;
    for _ in 0..MAX_PAGES {
        let url = client.v2_url(&format!("{path}?limit={PAGE_LIMIT}&offset={offset}"));
        let raw = client
            .send(client.vehicle_request(Method::GET, &url, access, None))
            .await?;
        let page: ListPage = raw.json(key)?;
        // A body of another shape is an error, never an empty list: an empty permission list
        // would stop every endpoint of the vehicle.
        let bad = |what: String| ApiError {
            request_id: raw.request_id(),
            ..ApiError::decode(Some(raw.status), what)
        };
        let items: Vec<String> = match page.rest.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| bad(format!("`{key}` holds something other than strings")))?,
            Some(_) => return Err(bad(format!("`{key}` is not a list"))),
            None => return Err(bad(format!("no `{key}` in the answer"))),
        };
        let n = items.len();
        let mut added = 0;
        for item in items {
            if seen.insert(item.clone()) {
                out.push(item);
                added += 1;
            }
        }
        offset += n;
        let total = page.paging.and_then(|p| p.count);
        let done = match total {
            Some(total) => offset as u64 >= total,
            // No count: a short page is the last one.
            None => n < PAGE_LIMIT,
        };
        if n == 0 || added == 0 || done {
            break;
        }
    }
    Ok(out)
}

pub(crate) async fn vehicle_info(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
) -> Result<VehicleInfo, ApiError> {
    let url = client.v2_url(&format!("/vehicles/{}", id.0));
    let raw = client
        .send(client.vehicle_request(Method::GET, &url, ctx.access_token, None))
        .await?;
    let v: Value = raw.json("vehicle")?;
    parse_info(&v).map_err(|m| ApiError {
        request_id: raw.request_id(),
        ..ApiError::decode(Some(raw.status), m)
    })
}

/// The permission each polled endpoint needs (smartcar-api.md §2.2).
pub const ENDPOINT_PERMISSIONS: &[(Endpoint, &str)] = &[
    (Endpoint::Battery, "read_battery"),
    (Endpoint::Charge, "read_charge"),
    (Endpoint::Info, "read_vehicle_info"),
    (Endpoint::Vin, "read_vin"),
    (Endpoint::Odometer, "read_odometer"),
];

pub(crate) async fn fetch(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
    job: Job,
    only: &[Endpoint],
) -> Result<Vec<EndpointResult>, ApiError> {
    let wanted = |e: Endpoint| only.is_empty() || only.contains(&e);
    let paths = |all: &[BatchPath]| -> Vec<BatchPath> {
        all.iter().copied().filter(|p| wanted(p.endpoint)).collect()
    };
    match job {
        Job::Battery => batch(client, ctx, id, &paths(&[BATTERY, CHARGE])).await,
        Job::Info => {
            let items = paths(&[VIN, ODOMETER]);
            // Both requests go out at once: the info call is cheap for Smartcar, and a slow
            // car must not double the poll's wall time.
            let (info, batch) = tokio::join!(
                async {
                    if wanted(Endpoint::Info) {
                        Some(vehicle_info(client, ctx, id).await)
                    } else {
                        None
                    }
                },
                batch(client, ctx, id, &items)
            );
            let mut results = batch?;
            match info {
                // A dead token fails the whole job, so the caller refreshes and retries once.
                Some(Err(e)) if e.kind == ErrorKind::Authentication => return Err(e),
                Some(info) => results.insert(
                    0,
                    EndpointResult {
                        endpoint: Endpoint::Info,
                        result: info.map(Payload::Info),
                    },
                ),
                None => {}
            }
            Ok(results)
        }
    }
}

/// One batch sub-request: the path sent and the endpoint label reported.
#[derive(Clone, Copy, Debug)]
pub struct BatchPath {
    pub path: &'static str,
    pub endpoint: Endpoint,
}

pub const BATTERY: BatchPath = BatchPath {
    path: "/battery",
    endpoint: Endpoint::Battery,
};
pub const CHARGE: BatchPath = BatchPath {
    path: "/charge",
    endpoint: Endpoint::Charge,
};
pub const VIN: BatchPath = BatchPath {
    path: "/vin",
    endpoint: Endpoint::Vin,
};
pub const ODOMETER: BatchPath = BatchPath {
    path: "/odometer",
    endpoint: Endpoint::Odometer,
};

/// The request body of `POST /vehicles/{id}/batch`.
pub fn batch_body(paths: &[BatchPath]) -> Value {
    let requests: Vec<Value> = paths.iter().map(|p| json!({ "path": p.path })).collect();
    json!({ "requests": requests })
}

async fn batch(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
    paths: &[BatchPath],
) -> Result<Vec<EndpointResult>, ApiError> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    // Smartcar bills every batch item (`send` counts the request itself).
    super::bill(paths.len() as u64 - 1);
    let url = client.v2_url(&format!("/vehicles/{}/batch", id.0));
    let req = client
        .vehicle_request(Method::POST, &url, ctx.access_token, None)
        .json(&batch_body(paths));
    let raw = client.send(req).await?;
    if raw.status != 200 {
        return Err(ApiError::decode(
            Some(raw.status),
            format!("batch answered HTTP {} instead of 200", raw.status),
        ));
    }
    let body: Value = raw.json("batch")?;
    let top = TopLevel::of(&raw, client.unit_system());
    parse_batch(&body, paths, &top).map_err(|m| ApiError {
        request_id: raw.request_id(),
        ..ApiError::decode(Some(raw.status), m)
    })
}

/// What the top-level batch answer contributes to every item (node merges these headers).
#[derive(Clone, Debug)]
pub struct TopLevel {
    pub fetched_at: UnixMillis,
    pub data_age: Option<UnixMillis>,
    pub unit_system: UnitSystem,
    pub request_id: Option<String>,
}

impl TopLevel {
    fn of(raw: &RawResponse, requested: UnitSystem) -> Self {
        TopLevel {
            fetched_at: raw.fetched_at,
            data_age: raw.header("sc-data-age").and_then(parse_data_age),
            unit_system: raw
                .header("sc-unit-system")
                .and_then(parse_unit_system)
                .unwrap_or(requested),
            request_id: raw.request_id(),
        }
    }
}

/// Splits a batch answer into one result per requested path. An item missing from the
/// answer is a decode error for that endpoint; `Err` only when the body is not a batch answer.
pub fn parse_batch(
    body: &Value,
    paths: &[BatchPath],
    top: &TopLevel,
) -> Result<Vec<EndpointResult>, String> {
    let items = body
        .get("responses")
        .and_then(Value::as_array)
        .ok_or("batch body has no `responses` array")?;
    let results = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let by_path = items.iter().find(|it| {
                it.get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|s| same_path(s, p.path))
            });
            // Tolerance: items without `path` are matched by position.
            let item = by_path.or_else(|| {
                items
                    .get(i)
                    .filter(|it| it.get("path").and_then(Value::as_str).is_none())
            });
            let result = match item {
                Some(item) => parse_item(item, p.endpoint, top),
                None => Err(ApiError {
                    request_id: top.request_id.clone(),
                    ..ApiError::bad_value(
                        Some(200),
                        format!("batch answer has no item for {}", p.path),
                    )
                }),
            };
            EndpointResult {
                endpoint: p.endpoint,
                result,
            }
        })
        .collect();
    Ok(results)
}

fn same_path(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().trim_matches('/').to_ascii_lowercase();
    norm(a) == norm(b)
}

/// Case-insensitive header lookup in a batch item's `headers` object.
fn item_header<'a>(headers: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a Value> {
    headers?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn item_status(item: &Value) -> Option<u16> {
    match item.get("code")? {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn looks_like_error(body: &Value) -> bool {
    body.get("type").is_some() || body.get("error").is_some() || body.get("errors").is_some()
}

/// One batch item → the endpoint's payload or its classified error.
pub fn parse_item(item: &Value, endpoint: Endpoint, top: &TopLevel) -> Result<Payload, ApiError> {
    let headers = item.get("headers").and_then(Value::as_object);
    let null = Value::Null;
    let body = item.get("body").unwrap_or(&null);
    let status = item_status(item);
    let ok = match status {
        Some(s) => (200..300).contains(&s),
        None => !looks_like_error(body),
    };
    if !ok {
        let retry_after =
            item_header(headers, "retry-after").and_then(|v| retry_after_value(v, top.fetched_at));
        return Err(api_error_from(
            status,
            parse_error_value(body),
            retry_after,
            top.request_id.clone(),
        ));
    }
    let recorded = item_header(headers, "sc-data-age")
        .and_then(Value::as_str)
        .and_then(parse_data_age)
        .or(top.data_age);
    let st = stamp(recorded, top.fetched_at);
    let units = item_header(headers, "sc-unit-system")
        .and_then(Value::as_str)
        .and_then(parse_unit_system)
        .unwrap_or(top.unit_system);
    let dist = DistanceUnit::of_system(units);
    // One item of a good batch answer: that reading lost, the other items kept.
    let decode = |m: String| ApiError {
        request_id: top.request_id.clone(),
        ..ApiError::bad_value(status.or(Some(200)), format!("{endpoint}: {m}"))
    };
    match endpoint {
        Endpoint::Battery => {
            let pct =
                num(body, "percentRemaining").ok_or_else(|| decode(missing("percentRemaining")))?;
            let soc_percent = v2_fraction_to_percent(pct)
                .ok_or_else(|| decode("`percentRemaining` is outside 0-1 (0-100 %)".to_string()))?;
            // The range is optional: an absurd one is that value lost (counted), never the
            // state of charge with it.
            let range_km = match raw_num(body, "range") {
                None => None,
                Some(r) => {
                    let km = plausible_km(dist.to_km(r));
                    if km.is_none() {
                        super::reject(
                            Endpoint::Battery,
                            "range is negative, not finite or beyond 10 million km",
                        );
                    }
                    km
                }
            };
            Ok(Payload::Battery(BatteryReading {
                stamp: st,
                soc_percent,
                range_km,
            }))
        }
        Endpoint::Charge => {
            let plugged =
                boolean(body, "isPluggedIn").ok_or_else(|| decode(missing("isPluggedIn")))?;
            let state = body
                .get("state")
                .and_then(Value::as_str)
                .and_then(ChargeState::parse)
                .ok_or_else(|| decode("missing or unknown `state`".into()))?;
            Ok(Payload::Charge(ChargeReading {
                stamp: st,
                plugged_in: plugged,
                state,
            }))
        }
        Endpoint::Odometer => {
            let d = raw_num(body, "distance").ok_or_else(|| decode(missing("distance")))?;
            let odometer_km = plausible_km(dist.to_km(d)).ok_or_else(|| {
                decode("`distance` is negative, not finite or beyond 10 million km".to_string())
            })?;
            Ok(Payload::Odometer(OdometerReading {
                stamp: st,
                odometer_km,
            }))
        }
        Endpoint::Vin => body
            .get("vin")
            .and_then(Value::as_str)
            .map(|v| Payload::Vin(v.trim().to_string()))
            .ok_or_else(|| decode(missing("vin"))),
        Endpoint::Info => parse_info(body).map(Payload::Info).map_err(decode),
        Endpoint::Capabilities => Err(decode(format!("no parser for endpoint {endpoint}"))),
    }
}

fn missing(field: &str) -> String {
    format!("missing or non-numeric `{field}`")
}

/// A number, tolerating a numeric string.
pub(crate) fn num(v: &Value, key: &str) -> Option<f64> {
    value_num(v.get(key)?)
}

/// [`num`] of a value itself (a v3 signal's `body.value`).
pub(crate) fn value_num(v: &Value) -> Option<f64> {
    value_raw_num(v).filter(|f: &f64| f.is_finite())
}

/// A number as sent, non-finite ones included (so the caller can refuse them as out of range
/// rather than as missing).
fn raw_num(v: &Value, key: &str) -> Option<f64> {
    value_raw_num(v.get(key)?)
}

pub(crate) fn value_raw_num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean, tolerating "true"/"false" strings and 0/1.
pub(crate) fn boolean(v: &Value, key: &str) -> Option<bool> {
    value_bool(v.get(key)?)
}

pub(crate) fn value_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

/// `{"id","make","model","year"}` (year as a number or a numeric string).
pub fn parse_info(v: &Value) -> Result<VehicleInfo, String> {
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    info_from_parts(text("make"), text("model"), raw_num(v, "year"))
}

/// Vehicle info from its three members as read (by [`parse_info`] or v3's byte parser):
/// `make` required, `model` may be missing, `year` kept only when plausible.
pub(crate) fn info_from_parts(
    make: Option<&str>,
    model: Option<&str>,
    year: Option<f64>,
) -> Result<VehicleInfo, String> {
    let make = make.ok_or("missing `make`")?.trim().to_string();
    let model = model.map(|m| m.trim().to_string()).unwrap_or_default();
    // An implausible year (0, 2147483647) is that value lost (0: unknown), counted; make and
    // model still count.
    let year = match year {
        None => 0,
        Some(y) => {
            use chrono::Datelike;
            plausible_year(y, chrono::Utc::now().year()).unwrap_or_else(|| {
                super::reject(Endpoint::Info, "year is implausible");
                0
            })
        }
    };
    Ok(VehicleInfo { make, model, year })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stamp;
    use std::time::Duration;

    const FETCHED: i64 = 1_746_812_000_000; // 2025-05-09T17:33:20Z

    fn top(units: UnitSystem) -> TopLevel {
        TopLevel {
            fetched_at: FETCHED,
            data_age: None,
            unit_system: units,
            request_id: Some("req-top".into()),
        }
    }

    #[test]
    fn batch_body_lists_paths() {
        assert_eq!(
            batch_body(&[BATTERY, CHARGE]),
            json!({"requests":[{"path":"/battery"},{"path":"/charge"}]})
        );
    }

    #[test]
    fn batch_items_ok_error_and_rate_limited() {
        let body = json!({"responses":[
            {"path":"/battery","code":200,"body":{"range":275,"percentRemaining":0.68},
             "headers":{"sc-fetched-at":"2025-05-09T17:27:26.712Z","SC-Data-Age":"2025-05-09T15:40:57.000Z","sc-unit-system":"metric"}},
            {"path":"/charge","code":429,"body":{"statusCode":429,"type":"RATE_LIMIT","code":"VEHICLE","description":"slow"},
             "headers":{"Retry-After":999}}
        ]});
        let r = parse_batch(&body, &[BATTERY, CHARGE], &top(UnitSystem::Metric)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].endpoint, Endpoint::Battery);
        let recorded = parse_data_age("2025-05-09T15:40:57.000Z").unwrap();
        assert_eq!(
            r[0].result,
            Ok(Payload::Battery(BatteryReading {
                stamp: Stamp {
                    recorded_at: recorded,
                    fetched_at: FETCHED
                },
                soc_percent: 68.0,
                range_km: Some(275.0),
            }))
        );
        assert_eq!(r[1].endpoint, Endpoint::Charge);
        let e = r[1].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimitVehicle);
        assert_eq!(e.status, Some(429));
        assert_eq!(e.retry_after, Some(Duration::from_secs(999)));
        assert_eq!(e.request_id.as_deref(), Some("req-top"));
    }

    #[test]
    fn batch_items_without_headers_legacy_bodies_and_missing_items() {
        let body = json!({"responses":[
            {"path":"vin/","code":501,"body":{"error":"vehicle_not_capable_error","message":"no vin"}},
            {"path":"/battery","code":403,"body":{"statusCode":403,"type":"PERMISSION","code":null,"description":"x","resolution":{"type":"REAUTHENTICATE"}}}
        ]});
        let r = parse_batch(&body, &[VIN, ODOMETER], &top(UnitSystem::Metric)).unwrap();
        let e = r[0].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Compatibility);
        assert_eq!(e.status, Some(501));
        assert_eq!(e.retry_after, None);
        let e = r[1].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Decode);

        assert!(parse_batch(&json!({"nope":1}), &[VIN], &top(UnitSystem::Metric)).is_err());
    }

    #[test]
    fn imperial_odometer_and_charge_and_future_data_age() {
        let body = json!({"responses":[
            {"path":"/odometer","code":200,"body":{"distance":100.0},"headers":{"sc-unit-system":"imperial","sc-data-age":"2099-01-01T00:00:00Z"}},
            {"path":"/charge","code":"200","body":{"isPluggedIn":true,"state":"charging"}}
        ]});
        let r = parse_batch(&body, &[ODOMETER, CHARGE], &top(UnitSystem::Metric)).unwrap();
        assert_eq!(
            r[0].result,
            Ok(Payload::Odometer(OdometerReading {
                stamp: Stamp {
                    recorded_at: FETCHED,
                    fetched_at: FETCHED
                },
                odometer_km: 160.9344,
            }))
        );
        assert_eq!(
            r[1].result,
            Ok(Payload::Charge(ChargeReading {
                stamp: Stamp {
                    recorded_at: FETCHED,
                    fetched_at: FETCHED
                },
                plugged_in: true,
                state: ChargeState::Charging,
            }))
        );
        // The requested unit system applies when the item does not say.
        let body = json!({"responses":[{"path":"/battery","code":200,"body":{"percentRemaining":0.5,"range":10}}]});
        let r = parse_batch(&body, &[BATTERY], &top(UnitSystem::Imperial)).unwrap();
        match &r[0].result {
            Ok(Payload::Battery(b)) => {
                assert_eq!(b.soc_percent, 50.0);
                assert_eq!(b.range_km, Some(16.09344));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_item_bodies_are_decode_errors() {
        let body = json!({"responses":[{"path":"/battery","code":200,"body":{"percentRemaining":"lots"}}]});
        let r = parse_batch(&body, &[BATTERY], &top(UnitSystem::Metric)).unwrap();
        let e = r[0].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Decode);
        assert!(e.to_string().contains("percentRemaining"), "{e}");
    }

    #[test]
    fn info_tolerates_string_year() {
        assert_eq!(
            parse_info(&json!({"id":"x","make":"TESLA","model":"Model S","year":"2014"})),
            Ok(VehicleInfo {
                make: "TESLA".into(),
                model: "Model S".into(),
                year: 2014
            })
        );
        assert!(parse_info(&json!({"id":"x"})).is_err());
    }
}
