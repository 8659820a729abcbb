//! The simulator's powertrains over real HTTP on loopback: what BEV, PHEV and ICE cars answer on
//! v2.0 (fuel, engine oil, tyres, battery, and 501 VEHICLE_NOT_CAPABLE for what they lack, in
//! batches too) and v3 (`powertrainType`, per-signal ERROR items), fuel that burns and refills,
//! and cars that fall asleep and stop reporting.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use carpulse::simulator::{Powertrain, SimulatorArgs, SimulatorConfig};
use serde_json::{json, Value};

mod common;

use common::sim::{header, spawn, stable_cfg, TestSim};

const LITRES_PER_US_GALLON: f64 = 3.785_411_784;
const KPA_PER_PSI: f64 = 6.894_757_293;
const KM_PER_MILE: f64 = 1.609_344;

/// One user with `vehicles` cars of the given powertrains, and a report interval long enough that
/// a test never crosses a report boundary by accident.
fn fleet_of(powertrains: &[Powertrain], vehicles: usize) -> SimulatorConfig {
    SimulatorConfig {
        users: 1,
        vehicles_per_user: vehicles,
        powertrains: powertrains.to_vec(),
        ..stable_cfg()
    }
}

/// A fast clock: two simulated hours per real second (a simulated day every 12 s) and a report
/// every 100 ms (12 simulated minutes).
fn fast(powertrains: &[Powertrain]) -> SimulatorConfig {
    SimulatorConfig {
        time_scale: 7200.0,
        report_interval: Duration::from_millis(100),
        ..fleet_of(powertrains, 1)
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * a.abs().max(1.0)
}

/// Asserts a v2 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE error object.
fn assert_not_capable(body: &Value, what: &str) {
    assert_eq!(body["type"], "COMPATIBILITY", "{what}: {body}");
    assert_eq!(body["code"], "VEHICLE_NOT_CAPABLE", "{what}: {body}");
    assert_eq!(body["statusCode"], 501, "{what}: {body}");
    assert!(body["description"]
        .as_str()
        .unwrap()
        .contains("not capable"));
}

async fn expect_501(sim: &TestSim, token: &str, path: &str) {
    let response = sim.get(path, token).await;
    assert_eq!(response.status(), 501, "{path}");
    assert_eq!(header(&response, "sc-request-id").len(), 36);
    assert!(response.headers().get("sc-data-age").is_none(), "{path}");
    assert_not_capable(&response.json().await.unwrap(), path);
}

#[tokio::test]
async fn ice_serves_fuel_oil_and_tyres_in_both_unit_systems_and_501_for_the_battery() {
    let sim = spawn(fleet_of(&[Powertrain::Ice], 1)).await;
    let token = sim.connect("1").await;
    let id = sim.vehicle_ids(&token).await.remove(0);
    let v = format!("/v2.0/vehicles/{id}");

    let (age, fetched, fuel) = sim.data(&format!("{v}/fuel"), &token, "metric").await;
    assert!(age <= fetched);
    let keys: BTreeSet<&str> = fuel
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["amountRemaining", "percentRemaining", "range"])
    );
    let fraction = f(&fuel["percentRemaining"]);
    let litres = f(&fuel["amountRemaining"]);
    let km = f(&fuel["range"]);
    assert!(fraction > 0.0 && fraction <= 1.0, "{fuel}");
    assert!(litres > 0.0 && litres <= 98.0, "tanks are 47–98 L: {fuel}");
    // Consumption 6–12.4 L/100 km.
    assert!(
        km > litres / 12.5 * 100.0 && km < litres / 5.9 * 100.0 + 1.0,
        "{fuel}"
    );

    let (imperial_age, _, gallons) = sim.data(&format!("{v}/fuel"), &token, "imperial").await;
    assert_eq!(imperial_age, age, "same report");
    assert_eq!(f(&gallons["percentRemaining"]), fraction);
    assert!(close(
        f(&gallons["amountRemaining"]),
        litres / LITRES_PER_US_GALLON
    ));
    assert!(close(f(&gallons["range"]), km / KM_PER_MILE));

    let (_, _, oil) = sim.data(&format!("{v}/engine/oil"), &token, "metric").await;
    let life = f(&oil["lifeRemaining"]);
    assert!(life > 0.0 && life <= 1.0, "{oil}");
    assert_eq!(oil.as_object().unwrap().len(), 1);

    let (_, _, kpa) = sim
        .data(&format!("{v}/tires/pressure"), &token, "metric")
        .await;
    let (_, _, psi) = sim
        .data(&format!("{v}/tires/pressure"), &token, "imperial")
        .await;
    let wheels = ["frontLeft", "frontRight", "backLeft", "backRight"];
    assert_eq!(kpa.as_object().unwrap().len(), 4);
    let pressures: Vec<f64> = wheels.iter().map(|w| f(&kpa[w])).collect();
    for (w, p) in wheels.iter().zip(&pressures) {
        assert!((220.0..=250.0).contains(p), "{w}: {kpa}");
        assert!(close(f(&psi[w]), p / KPA_PER_PSI), "{w}: {psi}");
    }
    let spread = pressures.iter().cloned().fold(f64::MIN, f64::max)
        - pressures.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread > 0.0 && spread <= 6.0,
        "small per-wheel offsets: {kpa}"
    );

    for lacking in [
        "/battery",
        "/battery/capacity",
        "/battery/nominal_capacity",
        "/charge",
        "/charge/limit",
    ] {
        expect_501(&sim, &token, &format!("{v}{lacking}")).await;
    }
    // What every car has still answers.
    sim.data(&format!("{v}/odometer"), &token, "metric").await;
    let served = sim.served(&id).await;
    assert_eq!(
        served["battery"],
        json!([]),
        "no battery recorded for an ICE"
    );
    assert_eq!(served["charge"], json!([]));
    assert_eq!(served["odometer"].as_array().unwrap().len(), 1);

    let vehicle = sim.get_json(&format!("/v3/vehicles/{id}"), &token).await;
    assert_eq!(vehicle["data"]["attributes"]["powertrainType"], "ICE");
    sim.stop().await;
}

#[tokio::test]
async fn bev_answers_501_for_fuel_and_oil_and_phev_answers_everything() {
    let sim = spawn(fleet_of(&[Powertrain::Bev, Powertrain::Phev], 2)).await;
    let token = sim.connect("1").await;
    let ids = sim.by_powertrain(&token).await;
    assert_eq!(ids.len(), 2, "one BEV and one PHEV: {ids:?}");
    let bev = format!("/v2.0/vehicles/{}", ids["BEV"]);
    let phev = format!("/v2.0/vehicles/{}", ids["PHEV"]);

    expect_501(&sim, &token, &format!("{bev}/fuel")).await;
    expect_501(&sim, &token, &format!("{bev}/engine/oil")).await;
    let (_, _, capacity) = sim
        .data(&format!("{bev}/battery/capacity"), &token, "metric")
        .await;
    assert!(f(&capacity["capacity"]) >= 40.0, "{capacity}");
    let (_, _, tyres) = sim
        .data(&format!("{bev}/tires/pressure"), &token, "metric")
        .await;
    assert!((220.0..=250.0).contains(&f(&tyres["backRight"])));

    for path in [
        "/battery",
        "/battery/capacity",
        "/charge",
        "/charge/limit",
        "/fuel",
        "/engine/oil",
        "/tires/pressure",
    ] {
        sim.data(&format!("{phev}{path}"), &token, "metric").await;
    }
    let (_, _, capacity) = sim
        .data(&format!("{phev}/battery/capacity"), &token, "metric")
        .await;
    assert!(
        (15.0..=25.0).contains(&f(&capacity["capacity"])),
        "a PHEV's small battery: {capacity}"
    );
    let (_, _, fuel) = sim.data(&format!("{phev}/fuel"), &token, "metric").await;
    assert!(f(&fuel["amountRemaining"]) <= 71.0 && f(&fuel["percentRemaining"]) > 0.0);
    sim.stop().await;
}

#[tokio::test]
async fn batch_mixes_200_and_501_items() {
    let sim = spawn(fleet_of(&[Powertrain::Ice], 1)).await;
    let token = sim.connect("1").await;
    let id = sim.vehicle_ids(&token).await.remove(0);
    let paths = [
        "/fuel",
        "/battery",
        "/odometer",
        "charge",
        "/engine/oil",
        "/tires/pressure",
    ];
    let items = sim.batch(&id, &token, &paths).await;
    let codes: Vec<u64> = items.iter().map(|i| i["code"].as_u64().unwrap()).collect();
    assert_eq!(codes, [200, 501, 200, 501, 200, 200]);
    for (item, path) in items.iter().zip(paths) {
        assert_eq!(item["path"], path);
        if item["code"] == 501 {
            assert_not_capable(&item["body"], path);
            assert!(item.get("headers").is_none(), "{item}");
        } else {
            assert_eq!(item["headers"]["sc-unit-system"], "metric");
            assert!(item["headers"]["sc-data-age"].is_string());
        }
    }
    assert!(f(&items[0]["body"]["percentRemaining"]) > 0.0);
    assert!(f(&items[4]["body"]["lifeRemaining"]) > 0.0);
    // The direct answer equals the batch item (one report window).
    let (_, _, fuel) = sim
        .data(&format!("/v2.0/vehicles/{id}/fuel"), &token, "metric")
        .await;
    assert_eq!(fuel, items[0]["body"]);
    assert_eq!(sim.served(&id).await["battery"], json!([]));
    sim.stop().await;
}

#[tokio::test]
async fn v3_lists_every_signal_with_error_items_for_what_the_powertrain_lacks() {
    let all = [Powertrain::Bev, Powertrain::Phev, Powertrain::Ice];
    let sim = spawn(fleet_of(&all, 3)).await;
    let token = sim.connect("1").await;
    let ids = sim.by_powertrain(&token).await;
    assert_eq!(
        ids.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["BEV", "ICE", "PHEV"])
    );
    let engine = [
        "internalcombustionengine-amountremaining",
        "internalcombustionengine-fuellevel",
        "internalcombustionengine-oillife",
        "internalcombustionengine-range",
    ];
    let mut totals = BTreeSet::new();
    for (kind, id) in &ids {
        let list = sim
            .get_json(&format!("/v3/vehicles/{id}/signals?pageSize=100"), &token)
            .await;
        let total = list["meta"]["totalCount"].as_u64().unwrap();
        totals.insert(total);
        let data = list["data"].as_array().unwrap();
        assert_eq!(data.len() as u64, total);
        let mut errors = BTreeSet::new();
        for signal in data {
            let attributes = &signal["attributes"];
            let code = attributes["code"].as_str().unwrap();
            match attributes["status"]["value"].as_str().unwrap() {
                "SUCCESS" => assert!(attributes["body"].is_object(), "{signal}"),
                "ERROR" => {
                    assert_eq!(
                        attributes["status"]["error"],
                        json!({"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"})
                    );
                    assert!(attributes.get("body").is_none(), "{signal}");
                    assert!(signal["meta"]["oemUpdatedAt"].is_i64());
                    errors.insert(code);
                }
                other => panic!("status {other}"),
            }
        }
        let expected: BTreeSet<&str> = match kind.as_str() {
            "BEV" => engine.into_iter().collect(),
            "PHEV" => BTreeSet::new(),
            _ => data
                .iter()
                .map(|s| s["attributes"]["code"].as_str().unwrap())
                .filter(|c| c.starts_with("tractionbattery-") || c.starts_with("charge-"))
                .collect(),
        };
        assert_eq!(errors, expected, "{kind}");
        if kind == "ICE" {
            assert!(errors.contains("tractionbattery-stateofcharge"));
            assert!(errors.contains("charge-ischarging"));
        }
    }
    assert_eq!(
        totals.len(),
        1,
        "every car lists the same signals: {totals:?}"
    );

    // A single signal the car lacks: 200 with the same ERROR item as the list.
    let bev = &ids["BEV"];
    let single = sim
        .get_json(
            &format!("/v3/vehicles/{bev}/signals/internalcombustionengine-fuellevel"),
            &token,
        )
        .await;
    assert_eq!(single["id"], "internalcombustionengine-fuellevel");
    assert_eq!(single["attributes"]["group"], "InternalCombustionEngine");
    assert_eq!(single["attributes"]["status"]["value"], "ERROR");
    assert_eq!(
        single["attributes"]["status"]["error"]["code"],
        "VEHICLE_NOT_CAPABLE"
    );
    assert!(single["attributes"].get("body").is_none());

    // An ICE's engine signals agree with v2 (same report window).
    let ice = &ids["ICE"];
    let signal = |code: &str| format!("/v3/vehicles/{ice}/signals/internalcombustionengine-{code}");
    let level = sim.get_json(&signal("fuellevel"), &token).await;
    let amount = sim.get_json(&signal("amountremaining"), &token).await;
    let range = sim.get_json(&signal("range"), &token).await;
    let oil = sim.get_json(&signal("oillife"), &token).await;
    assert_eq!(level["attributes"]["body"]["unit"], "percent");
    assert_eq!(amount["attributes"]["body"]["unit"], "liters");
    assert_eq!(range["attributes"]["body"]["unit"], "kilometers");
    assert_eq!(oil["attributes"]["body"]["unit"], "percent");
    let (_, _, fuel) = sim
        .data(&format!("/v2.0/vehicles/{ice}/fuel"), &token, "metric")
        .await;
    let (_, _, engine_oil) = sim
        .data(
            &format!("/v2.0/vehicles/{ice}/engine/oil"),
            &token,
            "metric",
        )
        .await;
    assert!(
        (f(&level["attributes"]["body"]["value"]) / 100.0 - f(&fuel["percentRemaining"])).abs()
            < 1e-4
    );
    assert_eq!(
        amount["attributes"]["body"]["value"],
        fuel["amountRemaining"]
    );
    assert_eq!(range["attributes"]["body"]["value"], fuel["range"]);
    assert!(
        (f(&oil["attributes"]["body"]["value"]) / 100.0 - f(&engine_oil["lifeRemaining"])).abs()
            < 1e-4
    );

    // Unknown codes are still 404.
    let unknown = sim
        .get(
            &format!("/v3/vehicles/{ice}/signals/warpdrive-speed"),
            &token,
        )
        .await;
    assert_eq!(unknown.status(), 404);
    sim.stop().await;
}

#[tokio::test]
async fn fuel_falls_with_distance_and_refills_at_the_fuel_stop() {
    let sim = spawn(fast(&[Powertrain::Ice])).await;
    let token = sim.connect("1").await;
    let id = sim.vehicle_ids(&token).await.remove(0);
    let (mut burned, mut refilled) = (false, false);
    let mut last: Option<(f64, f64)> = None;
    let started = Instant::now();
    // Two simulated days at most (24 s).
    while !(burned && refilled) && started.elapsed() < Duration::from_secs(24) {
        let items = sim.batch(&id, &token, &["/fuel", "/odometer"]).await;
        let litres = f(&items[0]["body"]["amountRemaining"]);
        let fraction = f(&items[0]["body"]["percentRemaining"]);
        let km = f(&items[1]["body"]["distance"]);
        if let Some((last_litres, last_km)) = last {
            if litres < last_litres {
                assert!(
                    km > last_km,
                    "fuel burns only when driving: {last_km} → {km}"
                );
                burned = true;
            }
            if burned && litres > last_litres {
                assert_eq!(fraction, 1.0, "refilled to full");
                assert_eq!(km, last_km, "refuelled while parked");
                refilled = true;
            }
        }
        last = Some((litres, km));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(burned && refilled, "burned {burned}, refilled {refilled}");
    sim.stop().await;
}

#[tokio::test]
async fn a_parked_car_falls_asleep_and_its_data_age_stops() {
    let sim = spawn(SimulatorConfig {
        sleeping_cars: true,
        ..fast(&[Powertrain::Bev])
    })
    .await;
    let token = sim.connect("1").await;
    let id = sim.vehicle_ids(&token).await.remove(0);
    let path = format!("/v2.0/vehicles/{id}/odometer");
    let mut ages = BTreeSet::new();
    // (data age, first fetched at, body) of the current unchanged run.
    let mut run: Option<(i64, i64, Value)> = None;
    let mut slept = false;
    let started = Instant::now();
    // A simulated day is 12 s; a car sleeps twice a day for 2–4 s each.
    while started.elapsed() < Duration::from_secs(26) {
        let (age, fetched, body) = sim.data(&path, &token, "metric").await;
        ages.insert(age);
        match &run {
            Some((run_age, since, run_body)) if *run_age == age => {
                assert_eq!(&body, run_body, "same report, same values");
                // 15 report intervals without a new report: asleep.
                if fetched - since >= 1_500 {
                    // v3 says the same: oemUpdatedAt is the frozen report (checked only if
                    // the car is still asleep after the v3 call).
                    let signal = sim
                        .get_json(
                            &format!("/v3/vehicles/{id}/signals/odometer-traveleddistance"),
                            &token,
                        )
                        .await;
                    let (still, _, _) = sim.data(&path, &token, "metric").await;
                    if still == age {
                        assert_eq!(signal["meta"]["oemUpdatedAt"].as_i64(), Some(age));
                        assert_eq!(signal["attributes"]["body"]["value"], body["distance"]);
                        slept = true;
                    }
                }
            }
            _ => run = Some((age, fetched, body)),
        }
        if slept && ages.len() > 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slept, "never saw the car asleep");
    assert!(
        ages.len() > 10,
        "awake it reports every 100 ms: {} reports",
        ages.len()
    );
    sim.stop().await;
}

#[test]
fn powertrains_flag_parses_a_comma_list_and_defaults_to_bev() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimulatorArgs,
    }
    let cfg = Cli::parse_from(["simulator"]).sim.to_config();
    assert_eq!(cfg.powertrains, [Powertrain::Bev]);
    assert_eq!(SimulatorConfig::default().powertrains, [Powertrain::Bev]);
    let cfg = Cli::parse_from(["simulator", "--powertrains", "bev,phev,ice"])
        .sim
        .to_config();
    assert_eq!(
        cfg.powertrains,
        [Powertrain::Bev, Powertrain::Phev, Powertrain::Ice]
    );
    assert!(format!("{cfg:?}").contains("powertrains: [Bev, Phev, Ice]"));
    assert!(Cli::try_parse_from(["simulator", "--powertrains", "steam"]).is_err());
    assert!(!cfg.sleeping_cars);
    let cfg = Cli::parse_from(["simulator", "--sleeping-cars"])
        .sim
        .to_config();
    assert!(cfg.sleeping_cars);
}
