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

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::{Api, ApiError};
use super::fleet::{random_uuid, round_to, Powertrain, Vehicle, VehicleState};
use super::scope::Scope;
use super::stats::Served;
use super::{api_json, Caller, Sim, SimState, V3Bearer};
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

/// The 8-point compass direction of a heading.
fn direction(heading: f64) -> &'static str {
    const NAMES: [&str; 8] = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"];
    NAMES[(((heading.rem_euclid(360.0) + 22.5) / 45.0) as usize) % 8]
}

fn signal_body(code: &str, vehicle: &Vehicle, state: &VehicleState) -> Value {
    let limit = vehicle.charge_limit_pct;
    match code {
        "tractionbattery-stateofcharge" => json!({"unit": "percent", "value": state.soc_percent}),
        "tractionbattery-range" => json!({
            "unit": "kilometers",
            "value": state.range_km,
            "additionalValues": [{"type": "ESTIMATED", "value": state.range_km}],
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
        "odometer-traveleddistance" => json!({"unit": "kilometers", "value": state.odometer_km}),
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
            Some(fuel) => json!({"unit": "kilometers", "value": fuel.range_km}),
            None => Value::Null,
        },
        "internalcombustionengine-oillife" => match state.oil_life {
            Some(life) => json!({"unit": "percent", "value": round_to(life * 100.0, 2)}),
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

/// Whether the signal has a value to serve: granted and within the car's powertrain.
fn readable(def: &SignalDef, vehicle: &Vehicle, scope: Scope) -> bool {
    scope.allows(def.permission) && def.needs.met_by(vehicle.powertrain)
}

/// The signal object: its body, or an ERROR status with PERMISSION (not granted; checked first,
/// as Smartcar refuses it without asking the car) or COMPATIBILITY:VEHICLE_NOT_CAPABLE.
fn signal_object(
    def: &SignalDef,
    vehicle: &Vehicle,
    state: &VehicleState,
    now: UnixMillis,
    scope: Scope,
) -> Value {
    let failed = |error: Value| {
        json!({
            "code": def.code,
            "name": def.name,
            "group": def.group,
            "status": {"value": "ERROR", "error": error},
        })
    };
    let attributes = if !scope.allows(def.permission) {
        failed(json!({"type": "PERMISSION", "code": null}))
    } else if def.needs.met_by(vehicle.powertrain) {
        json!({
            "code": def.code,
            "name": def.name,
            "group": def.group,
            "status": {"value": "SUCCESS"},
            "body": signal_body(def.code, vehicle, state),
        })
    } else {
        failed(json!({"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}))
    };
    json!({
        "id": def.code,
        "type": "signal",
        "attributes": attributes,
        "meta": {"retrievedAt": now, "oemUpdatedAt": state.report_ms},
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
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        let total = SIGNALS.len();
        let last = total.div_ceil(page_size).max(1);
        let defs: Vec<&SignalDef> = SIGNALS
            .iter()
            .skip(page.saturating_sub(1).saturating_mul(page_size))
            .take(page_size)
            .collect();
        let served: Vec<Served> = defs
            .iter()
            .filter(|d| readable(d, vehicle, caller.scope))
            .filter_map(|d| d.served)
            .collect();
        sim.served.record(&vehicle.id, &state, &served);
        let data: Vec<Value> = defs
            .iter()
            .map(|d| signal_object(d, vehicle, &state, now, caller.scope))
            .collect();
        let link = |p: usize| {
            format!(
                "/vehicles/{}/signals?page={p}&pageSize={page_size}",
                vehicle.id
            )
        };
        let body = json!({
            "data": data,
            "meta": {"page": page, "pageSize": page_size, "totalCount": total},
            "links": {
                "self": link(page),
                "first": link(1),
                "previous": if page > 1 { Some(link((page - 1).min(last))) } else { None },
                "next": if page < last { Some(link(page + 1)) } else { None },
                "last": link(last),
            },
            "included": {"vehicle": {
                "id": vehicle.id,
                "type": "vehicle",
                "attributes": {"make": vehicle.make, "model": vehicle.model, "year": vehicle.year},
                "links": {"self": format!("/vehicles/{}", vehicle.id)},
            }},
        });
        Ok(api_json(&rid, body, &[]))
    })();
    respond(&rid, result)
}

/// `GET /v3/vehicles/{id}/signals/{code}`: one signal object (200 with an ERROR status for a
/// signal this car's powertrain lacks, the same item the list shows); 404 for an unknown code;
/// 403 PERMISSION in the `errors[]` envelope for a signal the consent did not grant (before any
/// fault, as for v2).
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
        let now = now_ms();
        let state = vehicle.state_now(&sim.clock, now);
        if let (Some(kind), true) = (def.served, readable(def, vehicle, caller.scope)) {
            sim.served.record(&vehicle.id, &state, &[kind]);
        }
        Ok(api_json(
            &rid,
            signal_object(def, vehicle, &state, now, caller.scope),
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
                let body = signal_body(def.code, v, &state);
                let object = signal_object(def, v, &state, 1_000_000, Scope::default_grant());
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
