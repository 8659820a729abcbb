//! Vehicle API v3 (`/v3`): the vehicle object and the JSON:API signal list and single signal of
//! smartcar-api.md §3.4, with `errors[]` envelopes (§3.6).
//!
//! Signals are described by one table ([`SIGNALS`]) so adding one is a line plus its body; the
//! list and the single-signal endpoint render the same objects. Every car lists every signal: one
//! its powertrain lacks (fuel on a BEV, traction battery on an ICE) is an item with
//! `status.value = ERROR` and COMPATIBILITY:VEHICLE_NOT_CAPABLE and no body (§3.4), as Smartcar
//! reports per-signal failures, so carpulse must handle mixed pages.
//!
//! Each signal needs a permission (its [`SignalDef::permission`]: tractionbattery-* and
//! lowvoltagebattery-* read_battery, charge-* read_charge, odometer-* read_odometer, location-*
//! read_location, vehicleidentification-vin read_vin, internalcombustionengine-oillife
//! read_engine_oil, the other internalcombustionengine-* read_fuel). One the consent did not grant
//! is an ERROR item with PERMISSION in the list, and 403 PERMISSION on its own.
//!
//! Who may ask is decided by [`Sim::authenticate_v3`] (per-user token, or the application token
//! with `sc-user-id` and a connection, [`Sim::app_caller_for_vehicle`]).
//!
//! [`SignalOptions`] reproduce what third parties saw live (smartcar-api.md §10.4–§10.6): a car
//! with no data at Smartcar (an empty list), UNAVAILABLE signals, SUCCESS with a null value,
//! groups locked by the plan (our shape: ERROR with BILLING:INVALID_PLAN, §4.2), ISO-8601
//! timestamps and other distance unit strings. A signal so answered carried no value, so it is
//! not recorded in the served log; nor is any signal of its served kind (the log keeps battery,
//! charge and odometer readings whole or not at all).
//!
//! Precedence for one signal: PERMISSION (not granted), then the plan (locked group), then
//! COMPATIBILITY (the powertrain lacks it), then UNAVAILABLE, then the null value.

use std::collections::{HashMap, HashSet};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::{Api, ApiError};
use super::fleet::{km_to_miles, random_uuid, round_to, Fleet, Powertrain, Vehicle, VehicleState};
use super::scope::Scope;
use super::stats::Served;
use super::{api_json, iso_ms, Caller, Sim, SimState, SimulatorConfig, V3Bearer};
use crate::domain::{now_ms, ChargeState, UnixMillis};

const DEFAULT_PAGE_SIZE: usize = 10;
const MAX_PAGE_SIZE: usize = 100;

/// What a car needs to have for a signal to carry a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    /// A traction battery and a charge port (BEV, PHEV).
    Battery,
    /// A fuel tank and an engine (PHEV, ICE).
    Engine,
}

impl Needs {
    fn met_by(self, powertrain: Powertrain) -> bool {
        match self {
            Needs::Nothing => true,
            Needs::Battery => powertrain.has_battery(),
            Needs::Engine => powertrain.has_engine(),
        }
    }
}

/// One signal the simulator serves: code, display name, group, which served-log kind it feeds
/// (if any), the permission a consent must grant to read it, and what the car needs to provide
/// it.
struct SignalDef {
    code: &'static str,
    name: &'static str,
    group: &'static str,
    served: Option<Served>,
    permission: &'static str,
    needs: Needs,
}

const SIGNALS: &[SignalDef] = &[
    SignalDef {
        code: "tractionbattery-stateofcharge",
        name: "StateOfCharge",
        group: "TractionBattery",
        served: Some(Served::Battery),
        permission: "read_battery",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "tractionbattery-range",
        name: "Range",
        group: "TractionBattery",
        served: Some(Served::Battery),
        permission: "read_battery",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "tractionbattery-nominalcapacity",
        name: "NominalCapacity",
        group: "TractionBattery",
        served: None,
        permission: "read_battery",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-ischarging",
        name: "IsCharging",
        group: "Charge",
        served: Some(Served::Charge),
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-ischargingcableconnected",
        name: "IsChargingCableConnected",
        group: "Charge",
        served: Some(Served::Charge),
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-detailedchargingstatus",
        name: "DetailedChargingStatus",
        group: "Charge",
        served: Some(Served::Charge),
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-chargelimits",
        name: "ChargeLimits",
        group: "Charge",
        served: None,
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-timetocomplete",
        name: "TimeToComplete",
        group: "Charge",
        served: None,
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "charge-wattage",
        name: "Wattage",
        group: "Charge",
        served: None,
        permission: "read_charge",
        needs: Needs::Battery,
    },
    SignalDef {
        code: "odometer-traveleddistance",
        name: "TraveledDistance",
        group: "Odometer",
        served: Some(Served::Odometer),
        permission: "read_odometer",
        needs: Needs::Nothing,
    },
    SignalDef {
        code: "location-preciselocation",
        name: "PreciseLocation",
        group: "Location",
        served: None,
        permission: "read_location",
        needs: Needs::Nothing,
    },
    SignalDef {
        code: "location-isathome",
        name: "IsAtHome",
        group: "Location",
        served: None,
        permission: "read_location",
        needs: Needs::Nothing,
    },
    SignalDef {
        code: "lowvoltagebattery-stateofcharge",
        name: "StateOfCharge",
        group: "LowVoltageBattery",
        served: None,
        permission: "read_battery",
        needs: Needs::Nothing,
    },
    SignalDef {
        code: "vehicleidentification-vin",
        name: "VIN",
        group: "VehicleIdentification",
        served: None,
        permission: "read_vin",
        needs: Needs::Nothing,
    },
    SignalDef {
        code: "internalcombustionengine-fuellevel",
        name: "FuelLevel",
        group: "InternalCombustionEngine",
        served: None,
        permission: "read_fuel",
        needs: Needs::Engine,
    },
    SignalDef {
        code: "internalcombustionengine-amountremaining",
        name: "AmountRemaining",
        group: "InternalCombustionEngine",
        served: None,
        permission: "read_fuel",
        needs: Needs::Engine,
    },
    SignalDef {
        code: "internalcombustionengine-range",
        name: "Range",
        group: "InternalCombustionEngine",
        served: None,
        permission: "read_fuel",
        needs: Needs::Engine,
    },
    SignalDef {
        code: "internalcombustionengine-oillife",
        name: "OilLife",
        group: "InternalCombustionEngine",
        served: None,
        permission: "read_engine_oil",
        needs: Needs::Engine,
    },
];

/// Smartcar's signal groups (docs `signals/schema`, smartcar-api.md §3.5), lower-case: what
/// `--locked-groups` accepts.
const GROUPS: &[&str] = &[
    "charge",
    "climate",
    "closure",
    "connectivitysoftware",
    "connectivitystatus",
    "diagnostics",
    "hvac",
    "internalcombustionengine",
    "location",
    "lowvoltagebattery",
    "motion",
    "odometer",
    "service",
    "surveillance",
    "tractionbattery",
    "transmission",
    "vehicleidentification",
    "vehicleuseraccount",
    "wheel",
];

/// `--unavailable-signals`/`--null-signals` values: a signal code the simulator serves (any
/// case), lower-cased.
pub(crate) fn parse_signal_code(s: &str) -> Result<String, String> {
    let code = s.trim().to_ascii_lowercase();
    if SIGNALS.iter().any(|d| d.code == code) {
        Ok(code)
    } else {
        let codes: Vec<&str> = SIGNALS.iter().map(|d| d.code).collect();
        Err(format!("{s:?} is not a signal code ({})", codes.join(", ")))
    }
}

/// `--locked-groups` values: a Smartcar signal group (any case), lower-cased.
pub(crate) fn parse_group(s: &str) -> Result<String, String> {
    let group = s.trim().to_ascii_lowercase();
    if GROUPS.contains(&group.as_str()) {
        Ok(group)
    } else {
        Err(format!(
            "{s:?} is not a signal group ({})",
            GROUPS.join(", ")
        ))
    }
}

/// `--distance-unit`: kilometers, km, miles or mi, in any case; kept as written (it is the
/// unit string served).
pub(crate) fn parse_distance_unit(s: &str) -> Result<String, String> {
    match s.to_ascii_lowercase().as_str() {
        "kilometers" | "km" | "miles" | "mi" => Ok(s.to_owned()),
        _ => Err(format!("{s:?} is not kilometers, km, miles or mi")),
    }
}

/// The v3 signal options of [`SimulatorConfig`], validated and indexed for the request path.
#[derive(Debug)]
pub(crate) struct SignalOptions {
    empty_all: bool,
    empty: HashSet<String>,
    unavailable: HashSet<String>,
    null: HashSet<String>,
    locked_groups: HashSet<String>,
    iso_timestamps: bool,
    distance_unit: String,
    miles: bool,
}

/// No option: what Smartcar usually answers.
impl Default for SignalOptions {
    fn default() -> Self {
        SignalOptions {
            empty_all: false,
            empty: HashSet::new(),
            unavailable: HashSet::new(),
            null: HashSet::new(),
            locked_groups: HashSet::new(),
            iso_timestamps: false,
            distance_unit: "kilometers".to_owned(),
            miles: false,
        }
    }
}

impl SignalOptions {
    /// Checks every option against the fleet and the signal table (a typo is an error at start,
    /// not a silently ignored option).
    pub(crate) fn new(cfg: &SimulatorConfig, fleet: &Fleet) -> anyhow::Result<SignalOptions> {
        let mut options = SignalOptions {
            iso_timestamps: cfg.iso_timestamps,
            ..SignalOptions::default()
        };
        for id in &cfg.empty_signals {
            let id = id.trim();
            if id.eq_ignore_ascii_case("all") {
                options.empty_all = true;
            } else {
                anyhow::ensure!(
                    fleet.vehicle(id).is_some(),
                    "empty_signals names an unknown vehicle {id}"
                );
                options.empty.insert(id.to_owned());
            }
        }
        let codes = |list: &[String], what: &str| -> anyhow::Result<HashSet<String>> {
            list.iter()
                .map(|c| parse_signal_code(c).map_err(|e| anyhow::anyhow!("{what}: {e}")))
                .collect()
        };
        options.unavailable = codes(&cfg.unavailable_signals, "unavailable_signals")?;
        options.null = codes(&cfg.null_signals, "null_signals")?;
        options.locked_groups = cfg
            .locked_groups
            .iter()
            .map(|g| parse_group(g).map_err(|e| anyhow::anyhow!("locked_groups: {e}")))
            .collect::<anyhow::Result<_>>()?;
        options.distance_unit = parse_distance_unit(&cfg.distance_unit)
            .map_err(|e| anyhow::anyhow!("distance_unit: {e}"))?;
        options.miles = matches!(
            options.distance_unit.to_ascii_lowercase().as_str(),
            "miles" | "mi"
        );
        Ok(options)
    }

    fn is_empty_for(&self, vehicle_id: &str) -> bool {
        self.empty_all || self.empty.contains(vehicle_id)
    }

    fn is_locked(&self, def: &SignalDef) -> bool {
        !self.locked_groups.is_empty()
            && self.locked_groups.contains(&def.group.to_ascii_lowercase())
    }

    /// A signal answered without its value by an option (locked, UNAVAILABLE or null).
    fn withholds(&self, def: &SignalDef) -> bool {
        self.is_locked(def) || self.unavailable.contains(def.code) || self.null.contains(def.code)
    }

    /// A distance value in the configured unit (converted from km for miles).
    fn distance(&self, km: f64) -> Value {
        if self.miles {
            json!(km_to_miles(km))
        } else {
            json!(km)
        }
    }

    /// A timestamp of `meta`: epoch ms, or ISO-8601 with `--iso-timestamps`.
    fn timestamp(&self, ms: UnixMillis) -> Value {
        if self.iso_timestamps {
            json!(iso_ms(ms))
        } else {
            json!(ms)
        }
    }
}

/// The 8-point compass direction of a heading.
fn direction(heading: f64) -> &'static str {
    const NAMES: [&str; 8] = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"];
    NAMES[(((heading.rem_euclid(360.0) + 22.5) / 45.0) as usize) % 8]
}

fn signal_body(
    code: &str,
    vehicle: &Vehicle,
    state: &VehicleState,
    options: &SignalOptions,
) -> Value {
    let limit = vehicle.charge_limit_pct;
    let unit = options.distance_unit.as_str();
    let distance = |km: f64| options.distance(km);
    match code {
        "tractionbattery-stateofcharge" => json!({"unit": "percent", "value": state.soc_percent}),
        "tractionbattery-range" => json!({
            "unit": unit,
            "value": distance(state.range_km),
            "additionalValues": [{"type": "ESTIMATED", "value": distance(state.range_km)}],
        }),
        "tractionbattery-nominalcapacity" => json!({
            "source": "SMARTCAR",
            "capacity": vehicle.capacity_kwh,
            "availableCapacities": [{"capacity": vehicle.capacity_kwh, "description": null}],
            "unit": "kWh",
        }),
        "charge-ischarging" => json!({"value": state.charge_state == ChargeState::Charging}),
        "charge-ischargingcableconnected" => json!({"value": state.plugged_in}),
        "charge-detailedchargingstatus" => json!({"value": state.charge_state.as_str()}),
        "charge-chargelimits" => json!({
            "values": [{"type": "GLOBAL", "limit": limit, "condition": null}],
            "activeLimit": limit,
            "unit": "percent",
        }),
        "charge-timetocomplete" => json!({"unit": "minutes", "value": state.minutes_to_complete}),
        "charge-wattage" => json!({"unit": "kW", "value": state.charge_power_kw}),
        "odometer-traveleddistance" => json!({"unit": unit, "value": distance(state.odometer_km)}),
        "location-preciselocation" => json!({
            "latitude": state.latitude,
            "longitude": state.longitude,
            "heading": state.heading,
            "direction": direction(state.heading),
            "locationType": "CURRENT",
        }),
        "location-isathome" => json!({"value": state.at_home}),
        "lowvoltagebattery-stateofcharge" => {
            json!({"unit": "percent", "value": round_to(state.low_voltage_soc, 1)})
        }
        "vehicleidentification-vin" => json!({"value": vehicle.vin}),
        "internalcombustionengine-fuellevel" => match state.fuel {
            Some(fuel) => json!({"unit": "percent", "value": fuel.percent}),
            None => Value::Null,
        },
        "internalcombustionengine-amountremaining" => match state.fuel {
            Some(fuel) => json!({"unit": "liters", "value": fuel.litres}),
            None => Value::Null,
        },
        "internalcombustionengine-range" => match state.fuel {
            Some(fuel) => json!({"unit": unit, "value": distance(fuel.range_km)}),
            None => Value::Null,
        },
        "internalcombustionengine-oillife" => match state.oil_life {
            Some(life) => json!({"unit": "percent", "value": round_to(life * 100.0, 2)}),
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

/// Whether the signal is served with its value: granted, within the car's powertrain and not
/// withheld by an option.
fn readable(def: &SignalDef, vehicle: &Vehicle, scope: Scope, options: &SignalOptions) -> bool {
    scope.allows(def.permission) && def.needs.met_by(vehicle.powertrain) && !options.withholds(def)
}

/// The served-log kinds of `defs` whose values were served: each readable signal's kind, unless
/// an option withholds a signal of that kind (the log keeps a kind's reading whole).
fn served_kinds(
    defs: &[&SignalDef],
    vehicle: &Vehicle,
    scope: Scope,
    options: &SignalOptions,
) -> Vec<Served> {
    let withheld = |kind: Served| {
        SIGNALS
            .iter()
            .any(|d| d.served == Some(kind) && options.withholds(d))
    };
    let mut kinds: Vec<Served> = defs
        .iter()
        .filter(|d| readable(d, vehicle, scope, options))
        .filter_map(|d| d.served)
        .filter(|k| !withheld(*k))
        .collect();
    kinds.dedup();
    kinds
}

/// The signal object: its body, or what stands in for it, in the order of the module doc:
/// ERROR PERMISSION (not granted; checked first, as Smartcar refuses it without asking the car),
/// ERROR BILLING:INVALID_PLAN (locked group), ERROR COMPATIBILITY:VEHICLE_NOT_CAPABLE,
/// UNAVAILABLE (no body), or SUCCESS with `{"value": null}` (plus the unit).
fn signal_object(
    def: &SignalDef,
    vehicle: &Vehicle,
    state: &VehicleState,
    now: UnixMillis,
    scope: Scope,
    options: &SignalOptions,
) -> Value {
    let without_body = |status: Value| {
        json!({
            "code": def.code,
            "name": def.name,
            "group": def.group,
            "status": status,
        })
    };
    let failed = |error: Value| without_body(json!({"value": "ERROR", "error": error}));
    let success = |body: Value| {
        json!({
            "code": def.code,
            "name": def.name,
            "group": def.group,
            "status": {"value": "SUCCESS"},
            "body": body,
        })
    };
    let attributes = if !scope.allows(def.permission) {
        failed(json!({"type": "PERMISSION", "code": null}))
    } else if options.is_locked(def) {
        failed(json!({"type": "BILLING", "code": "INVALID_PLAN"}))
    } else if !def.needs.met_by(vehicle.powertrain) {
        failed(json!({"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}))
    } else if options.unavailable.contains(def.code) {
        without_body(json!({"value": "UNAVAILABLE"}))
    } else if options.null.contains(def.code) {
        let body = signal_body(def.code, vehicle, state, options);
        match body.get("unit") {
            Some(unit) => success(json!({"unit": unit, "value": null})),
            None => success(json!({"value": null})),
        }
    } else {
        success(signal_body(def.code, vehicle, state, options))
    };
    json!({
        "id": def.code,
        "type": "signal",
        "attributes": attributes,
        "meta": {
            "retrievedAt": options.timestamp(now),
            "oemUpdatedAt": options.timestamp(state.report_ms),
        },
        "links": {
            "self": format!("/vehicles/{}/signals/{}", vehicle.id, def.code),
            "vehicle": format!("/vehicles/{}", vehicle.id),
        },
    })
}

/// Authenticates and resolves the vehicle (access only: no fault or limit yet, see
/// [`Sim::admit`]). With a per-user token `sc-user-id` is optional (the SDK model); when sent it
/// must name the token's user (401 otherwise). With the application token it is required and
/// the user must have a connection to the vehicle ([`Sim::app_caller_for_vehicle`]).
fn caller_and_vehicle<'s>(
    sim: &'s Sim,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Caller, &'s Vehicle), ApiError> {
    match sim.authenticate_v3(headers)? {
        V3Bearer::User(caller) => {
            if let Some(claimed) = headers.get("sc-user-id") {
                if claimed.to_str().ok().map(str::trim)
                    != Some(sim.fleet.users[caller.user].id.as_str())
                {
                    return Err(ApiError::authentication());
                }
            }
            Ok((caller, sim.vehicle_of(caller.user, id)?))
        }
        V3Bearer::App => sim.app_caller_for_vehicle(headers, id),
    }
}

/// [`caller_and_vehicle`], then the vehicle's faults and limits.
fn authorize_vehicle<'s>(
    sim: &'s Sim,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Caller, &'s Vehicle), ApiError> {
    let (caller, vehicle) = caller_and_vehicle(sim, headers, id)?;
    sim.admit(vehicle, 1)?;
    Ok((caller, vehicle))
}

fn respond(request_id: &str, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| e.into_api_response(Api::V3, request_id))
}

/// `GET /v3/vehicles/{id}`
pub(crate) async fn vehicle(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let rid = random_uuid();
    let result = authorize_vehicle(&sim, &headers, &id).map(|(_, v)| {
        let body = json!({"data": {
            "id": v.id,
            "type": "vehicle",
            "attributes": {
                "make": v.make, "model": v.model, "year": v.year,
                "powertrainType": v.powertrain.as_str(), "mode": "simulated",
            },
            "links": {"self": format!("/vehicles/{}", v.id)},
        }});
        api_json(&rid, body, &[])
    });
    respond(&rid, result)
}

/// A positive integer query parameter with a default and an upper bound.
fn positive(
    query: &HashMap<String, String>,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match query.get(name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::validation(format!(
                "{name} must be an integer from 1 to {max}."
            ))),
        },
    }
}

/// `GET /v3/vehicles/{id}/signals?page=&pageSize=`: one JSON:API page of signals; a signal the
/// consent did not grant is listed with `status: {"value":"ERROR","error":{"type":"PERMISSION",
/// "code":null}}` and no body.
pub(crate) async fn signals(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let (caller, vehicle) = authorize_vehicle(&sim, &headers, &id)?;
        let Ok(Query(query)) = query else {
            return Err(ApiError::validation("malformed query string."));
        };
        let page = positive(&query, "page", 1, usize::MAX)?;
        let page_size = positive(&query, "pageSize", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let options = &sim.signal_options;
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        // A car Smartcar has no data for lists nothing (smartcar-api.md §10.5).
        let empty = options.is_empty_for(&vehicle.id);
        let total = if empty { 0 } else { SIGNALS.len() };
        let last = total.div_ceil(page_size).max(1);
        let defs: Vec<&SignalDef> = SIGNALS
            .iter()
            .take(total)
            .skip(page.saturating_sub(1).saturating_mul(page_size))
            .take(page_size)
            .collect();
        let served = served_kinds(&defs, vehicle, caller.scope, options);
        sim.served.record(&vehicle.id, &state, &served);
        let data: Vec<Value> = defs
            .iter()
            .map(|d| signal_object(d, vehicle, &state, now, caller.scope, options))
            .collect();
        let link = |p: usize| {
            format!(
                "/vehicles/{}/signals?page={p}&pageSize={page_size}",
                vehicle.id
            )
        };
        let mut body = json!({
            "data": data,
            "meta": {"page": page, "pageSize": page_size, "totalCount": total},
            "links": {
                "self": link(page),
                "first": link(1),
                "previous": if page > 1 { Some(link((page - 1).min(last))) } else { None },
                "next": if page < last { Some(link(page + 1)) } else { None },
                "last": link(last),
            },
        });
        if !empty {
            body["included"] = json!({"vehicle": {
                "id": vehicle.id,
                "type": "vehicle",
                "attributes": {"make": vehicle.make, "model": vehicle.model, "year": vehicle.year},
                "links": {"self": format!("/vehicles/{}", vehicle.id)},
            }});
        }
        Ok(api_json(&rid, body, &[]))
    })();
    respond(&rid, result)
}

/// `GET /v3/vehicles/{id}/signals/{code}`: one signal object (200 with an ERROR or UNAVAILABLE
/// status for a signal this car's powertrain lacks or an option withholds, the same item the
/// list shows); 404 for an unknown code, and 404 RESOURCE_NOT_FOUND:SIGNAL_NOT_FOUND for any code
/// of a car with an empty signal store; 403 PERMISSION in the `errors[]` envelope for a signal
/// the consent did not grant (before any fault, as for v2).
pub(crate) async fn signal(
    State(sim): State<SimState>,
    Path((id, code)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let rid = random_uuid();
    let result = (|| {
        let (caller, vehicle) = caller_and_vehicle(&sim, &headers, &id)?;
        let code = code.to_ascii_lowercase();
        let def = SIGNALS.iter().find(|d| d.code == code);
        if let Some(def) = def {
            caller.require(&sim, def.permission)?;
        }
        sim.admit(vehicle, 1)?;
        let def = def.ok_or_else(ApiError::path_not_found)?;
        let options = &sim.signal_options;
        if options.is_empty_for(&vehicle.id) {
            return Err(ApiError::not_found(
                "SIGNAL_NOT_FOUND",
                "No data for this signal is available for the vehicle.",
            ));
        }
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        let served = served_kinds(&[def], vehicle, caller.scope, options);
        sim.served.record(&vehicle.id, &state, &served);
        Ok(api_json(
            &rid,
            signal_object(def, vehicle, &state, now, caller.scope, options),
            &[],
        ))
    })();
    respond(&rid, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capable_signal_has_a_body_and_compass_works() {
        let all = [Powertrain::Bev, Powertrain::Phev, Powertrain::Ice];
        let fleet = super::super::fleet::Fleet::generate(1, 1, 3, 5_000, &all);
        let clock = super::super::fleet::SimClock {
            anchor_ms: 0,
            time_scale: 60.0,
            report_interval_ms: 5_000,
            sleeping: true,
        };
        let mut seen = std::collections::HashSet::new();
        for v in &fleet.users[0].vehicles {
            seen.insert(v.powertrain);
            let state = v.state_now(&clock, 1_000_000);
            for def in SIGNALS {
                let options = SignalOptions::default();
                let body = signal_body(def.code, v, &state, &options);
                let object =
                    signal_object(def, v, &state, 1_000_000, Scope::default_grant(), &options);
                if def.needs.met_by(v.powertrain) {
                    assert!(body.is_object(), "{} {:?}", def.code, v.powertrain);
                    assert_eq!(object["attributes"]["status"]["value"], "SUCCESS");
                } else {
                    assert_eq!(object["attributes"]["status"]["value"], "ERROR");
                    assert!(object["attributes"].get("body").is_none());
                }
            }
        }
        assert_eq!(seen.len(), 3, "one car of each powertrain");
        assert!(SIGNALS.len() >= 12);
        assert_eq!(direction(0.0), "N");
        assert_eq!(direction(350.0), "N");
        assert_eq!(direction(90.0), "E");
        assert_eq!(direction(225.0), "SW");
    }
}
