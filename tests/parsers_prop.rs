//! Property tests of the parsers that read what carpulse does not control (issue 11): the v2
//! batch and its items, the v3 signal listing (the fast byte parser and the tolerant tree
//! parser), the token endpoint's answers (through the real client against a tiny server on
//! loopback that answers whatever a case says) and the config file.
//!
//! Two kinds of property: none of them panics on arbitrary input (bytes, JSON, TOML-ish text),
//! and the structure holds (a well-formed reading round-trips; the two v3 parsers agree; an
//! error never quotes a secret; a config error names the file). Case counts are bounded so
//! the file runs in well under a minute on CI's two cores; `PROPTEST_CASES` raises them for a
//! longer hunt. Every failure proptest finds is kept below as a named regression test.
//!
//! Properties the code does not meet yet are `#[ignore]`d with the issue item that fixes them
//! (`cargo test --test parsers_prop -- --ignored` runs them).

use std::sync::{Arc, Mutex};

use carpulse::config::{Config, Env};
use carpulse::domain::{ChargeState, Secret, UnitSystem};
use carpulse::smartcar::v2::{self, BatchPath, TopLevel};
use carpulse::smartcar::v3;
use carpulse::smartcar::{EndpointResult, Payload};
use proptest::prelude::*;
use serde_json::{json, Value};

/// 2026-03-01T00:00:00Z: when the answers are "fetched".
const FETCHED: i64 = 1_772_323_200_000;

/// The case count of a property: `fast` for pure parsers, fewer for those doing HTTP.
fn cases(fast: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(fast);
    ProptestConfig {
        cases: n,
        // A failing case is written into the test below by hand, not into a file.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep, with the keys the parsers look for among the random
/// ones so the interesting branches are reached.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("responses".to_owned()),
        Just("path".to_owned()),
        Just("body".to_owned()),
        Just("code".to_owned()),
        Just("headers".to_owned()),
        Just("percentRemaining".to_owned()),
        Just("range".to_owned()),
        Just("distance".to_owned()),
        Just("isPluggedIn".to_owned()),
        Just("state".to_owned()),
        Just("data".to_owned()),
        Just("attributes".to_owned()),
        Just("status".to_owned()),
        Just("value".to_owned()),
        Just("unit".to_owned()),
        Just("meta".to_owned()),
        Just("oemUpdatedAt".to_owned()),
        Just("links".to_owned()),
        Just("next".to_owned()),
        Just("included".to_owned()),
        Just("vehicle".to_owned()),
        Just("make".to_owned()),
        Just("year".to_owned()),
        Just("sc-data-age".to_owned()),
        Just("retry-after".to_owned()),
        Just(v3::SOC.to_owned()),
        Just(v3::ODOMETER.to_owned()),
        "[a-zA-Z_-]{0,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just(1e308),
            Just(-1e308),
            Just(0.0),
            Just(-0.0),
            Just(250.0),
            Just(-5.0)
        ]
        .prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
        prop_oneof![
            Just("/battery"),
            Just("/charge"),
            Just("/odometer"),
            Just("CHARGING"),
            Just("ERROR"),
            Just("UNAVAILABLE"),
            Just("percent"),
            Just("miles"),
            Just("2026-03-01T00:00:00Z"),
            Just("Fri, 31 Dec 9999 23:59:59 GMT"),
            Just(v3::SOC),
            Just(v3::RANGE),
            Just(v3::CABLE),
            Just(v3::DETAILED_STATUS),
            Just(v3::IS_CHARGING),
            Just(v3::ODOMETER),
            Just(v3::VIN),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn top() -> TopLevel {
    TopLevel {
        fetched_at: FETCHED,
        data_age: None,
        unit_system: UnitSystem::Metric,
        request_id: Some("rid".into()),
    }
}

const PATHS: [BatchPath; 4] = [v2::BATTERY, v2::CHARGE, v2::ODOMETER, v2::VIN];

fn payload(results: &[EndpointResult], endpoint: &str) -> Option<Payload> {
    results
        .iter()
        .find(|r| r.endpoint.as_str() == endpoint)
        .and_then(|r| r.result.as_ref().ok().cloned())
}

/// A reading's numbers are finite and inside what a car can report.
fn plausible(p: &Payload) -> bool {
    match p {
        Payload::Battery(b) => {
            (0.0..=100.0).contains(&b.soc_percent)
                && b.range_km.is_none_or(|r| r.is_finite() && r >= 0.0)
        }
        Payload::Odometer(o) => o.odometer_km.is_finite() && o.odometer_km >= 0.0,
        Payload::Info(i) => (1900..=2100).contains(&i.year),
        Payload::Charge(_) | Payload::Vin(_) => true,
    }
}

// ---------------------------------------------------------------- v2 batch

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn v2_batch_never_panics_on_any_json(body in any_json()) {
        if let Ok(results) = v2::parse_batch(&body, &PATHS, &top()) {
            prop_assert_eq!(results.len(), PATHS.len(), "one result per asked path");
        }
        for endpoint in carpulse::smartcar::Endpoint::ALL {
            let _ = v2::parse_item(&body, endpoint, &top());
        }
    }

    #[test]
    fn v2_batch_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(body) = serde_json::from_slice::<Value>(&bytes) {
            let _ = v2::parse_batch(&body, &PATHS, &top());
        }
    }

    #[test]
    fn a_well_formed_v2_batch_round_trips(
        soc_permille in 0u32..=1000,
        range_m in 0u32..=1_000_000,
        odometer_m in 0u64..=2_000_000_000,
        plugged in any::<bool>(),
        state in prop::sample::select(vec!["CHARGING", "FULLY_CHARGED", "NOT_CHARGING"]),
        age_s in 0i64..=86_400,
    ) {
        let fraction = f64::from(soc_permille) / 1000.0;
        let (range_km, odometer_km) = (f64::from(range_m) / 1000.0, odometer_m as f64 / 1000.0);
        let age = chrono::DateTime::from_timestamp_millis(FETCHED - age_s * 1000)
            .unwrap()
            .to_rfc3339();
        let body = json!({"responses": [
            {"path": "/battery", "code": 200, "headers": {"sc-data-age": age},
             "body": {"percentRemaining": fraction, "range": range_km}},
            {"path": "/charge", "code": 200, "headers": {"sc-data-age": age},
             "body": {"isPluggedIn": plugged, "state": state}},
            {"path": "/odometer", "code": 200, "headers": {"sc-data-age": age},
             "body": {"distance": odometer_km}},
            {"path": "/vin", "code": 200, "body": {"vin": "5YJ3E1EA7JF000001"}},
        ]});
        let results = v2::parse_batch(&body, &PATHS, &top()).unwrap();
        let Some(Payload::Battery(b)) = payload(&results, "battery") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        // A fraction of 1.0 or less is a fraction; 100 % is 1.0.
        prop_assert!((b.soc_percent - fraction * 100.0).abs() < 1e-6, "{} vs {}", b.soc_percent, fraction);
        prop_assert!((b.range_km.unwrap() - range_km).abs() < 1e-9);
        prop_assert_eq!(b.stamp.recorded_at, FETCHED - age_s * 1000);
        prop_assert_eq!(b.stamp.fetched_at, FETCHED);
        let Some(Payload::Charge(c)) = payload(&results, "charge") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        prop_assert_eq!(c.plugged_in, plugged);
        prop_assert_eq!(Some(c.state), ChargeState::parse(state));
        let Some(Payload::Odometer(o)) = payload(&results, "odometer") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        prop_assert!((o.odometer_km - odometer_km).abs() < 1e-6);
        prop_assert_eq!(payload(&results, "vin"), Some(Payload::Vin("5YJ3E1EA7JF000001".into())));
    }

    /// An answer with a non-2xx item is an error for that endpoint, never a reading.
    #[test]
    fn a_v2_error_item_is_never_a_reading(code in 300u16..600, body in any_json()) {
        let batch = json!({"responses": [{"path": "/battery", "code": code, "body": body}]});
        let results = v2::parse_batch(&batch, &[v2::BATTERY], &top()).unwrap();
        prop_assert!(results[0].result.is_err(), "{:?}", results[0].result);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Issue 11 item 9: today a state of charge of 250 % or −5 % is clamped to 100 or 0 and a
    /// negative odometer is accepted; the per-signal decoding rewrite makes them decode errors.
    #[test]
    #[ignore = "issue 11 item 9: out-of-range v2 values are clamped or accepted today"]
    fn out_of_range_v2_values_are_never_readings(
        soc in prop_oneof![-1e308..-0.0001f64, 100.0001f64..1e308],
        odometer in -1e308..-0.001f64,
    ) {
        let body = json!({"responses": [
            {"path": "/battery", "code": 200, "body": {"percentRemaining": soc}},
            {"path": "/odometer", "code": 200, "body": {"distance": odometer}},
        ]});
        let results = v2::parse_batch(&body, &[v2::BATTERY, v2::ODOMETER], &top()).unwrap();
        for r in &results {
            prop_assert!(r.result.as_ref().map_or(true, plausible), "{:?}", r);
            prop_assert!(r.result.is_err(), "{} {soc} {odometer}: {:?}", r.endpoint, r.result);
        }
    }
}

// ---------------------------------------------------------------- v3 signals

/// A signal of a listing as Smartcar shapes it (smartcar-api.md §10).
fn signal(code: &str, body: Value, oem: i64) -> Value {
    json!({"id": code, "type": "signal",
           "attributes": {"code": code, "name": code, "group": "g",
                          "status": {"value": "SUCCESS"}, "body": body},
           "meta": {"retrievedAt": FETCHED, "oemUpdatedAt": oem}})
}

/// Both v3 parsers on one body: the tree parser's signals, after checking that the byte
/// parser (when it takes the body) reads the same signals, links, vehicle and counts.
fn both_v3(v: &Value) -> Result<Option<v3::SignalsPage>, TestCaseError> {
    // Both read the same bytes, as carpulse's fallback does (a float written and read back
    // may differ in its last bit from the value the case built).
    let bytes = serde_json::to_vec(v).unwrap();
    let fast = v3::parse_signals_bytes(&bytes, FETCHED, Some("rid"));
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let Ok(slow) = v3::parse_signals_page(&v, FETCHED, Some("rid")) else {
        return Ok(None);
    };
    if let Some(fast) = fast {
        let read = [
            v3::SOC,
            v3::RANGE,
            v3::CABLE,
            v3::DETAILED_STATUS,
            v3::IS_CHARGING,
            v3::VIN,
            v3::ODOMETER,
        ];
        let wanted: Vec<&v3::Signal> = slow
            .signals
            .iter()
            .filter(|s| read.contains(&&*s.code))
            .collect();
        prop_assert_eq!(fast.signals.iter().collect::<Vec<_>>(), wanted, "{}", v);
        prop_assert_eq!((&fast.next, fast.items), (&slow.next, slow.items));
    }
    Ok(Some(slow))
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn v3_parsers_never_panic_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Some(page) = v3::parse_signals_bytes(&bytes, FETCHED, None) {
            let _ = v3::pick_all(&page.signals, UnitSystem::Metric);
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = v3::parse_signals_page(&v, FETCHED, None);
        }
    }

    /// Listing items (and the other parts the byte parser reads as structs) are objects here:
    /// an array in their place is read by the byte parser field by field and skipped by the
    /// tree parser (see the regression test below).
    #[test]
    fn v3_parsers_never_panic_and_agree_on_any_json(
        data in prop::collection::vec(
            prop::collection::vec(("[a-z]{1,6}|id|attributes|code|status|body|meta", any_json()), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            0..6,
        ),
        rest in any_json(),
    ) {
        let mut page = match rest {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        page.insert("data".into(), Value::Array(data));
        let mut page = Value::Object(page);
        no_arrays_for_structs(&mut page);
        if let Some(p) = both_v3(&page)? {
            for units in [UnitSystem::Metric, UnitSystem::Imperial] {
                let _ = v3::pick_all(&p.signals, units);
                let _ = v3::unavailable_in(&p.signals, units);
            }
        }
    }

    #[test]
    fn a_well_formed_v3_listing_round_trips(
        soc_tenths in 0u32..=1000,
        range_m in 0u32..=1_000_000,
        odometer_m in 0u64..=2_000_000_000,
        plugged in any::<bool>(),
        state in prop::sample::select(vec!["CHARGING", "FULLY_CHARGED", "NOT_CHARGING"]),
        age_s in 0i64..=86_400,
        shuffle in any::<prop::sample::Index>(),
    ) {
        let soc = f64::from(soc_tenths) / 10.0;
        let (range_km, odometer_km) = (f64::from(range_m) / 1000.0, odometer_m as f64 / 1000.0);
        let oem = FETCHED - age_s * 1000;
        let mut data = vec![
            signal(v3::SOC, json!({"value": soc, "unit": "percent"}), oem),
            signal(v3::RANGE, json!({"value": range_km, "unit": "km"}), oem),
            signal(v3::CABLE, json!({"value": plugged}), oem),
            signal(v3::DETAILED_STATUS, json!({"value": state}), oem),
            signal(v3::ODOMETER, json!({"value": odometer_km, "unit": "km"}), oem),
            signal("closure-islocked", json!({"value": true}), oem),
        ];
        // Order in a listing carries no meaning.
        let k = shuffle.index(data.len());
        data.rotate_left(k);
        let page = json!({"data": data, "meta": {"totalCount": 6, "pageSize": 10}, "links": {}});
        let p = both_v3(&page)?.expect("a listing");
        let results = v3::pick_all(&p.signals, UnitSystem::Imperial);
        let Some(Payload::Battery(b)) = payload(&results, "battery") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        prop_assert!((b.soc_percent - soc).abs() < 1e-9, "{} vs {soc}", b.soc_percent);
        prop_assert!((b.range_km.unwrap() - range_km).abs() < 1e-9, "units named by the signal win");
        prop_assert_eq!((b.stamp.recorded_at, b.stamp.fetched_at), (oem, FETCHED));
        let Some(Payload::Charge(c)) = payload(&results, "charge") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        prop_assert_eq!((c.plugged_in, Some(c.state)), (plugged, ChargeState::parse(state)));
        let Some(Payload::Odometer(o)) = payload(&results, "odometer") else {
            return Err(TestCaseError::fail(format!("{results:?}")));
        };
        prop_assert!((o.odometer_km - odometer_km).abs() < 1e-6);
    }

    /// A signal that failed (ERROR) or is UNAVAILABLE is never a reading.
    #[test]
    fn a_failed_v3_signal_is_never_a_reading(
        status in prop::sample::select(vec!["ERROR", "UNAVAILABLE", "error", "Unavailable"]),
        value in any_json(),
    ) {
        let failed = json!({"id": v3::SOC, "attributes": {"code": v3::SOC,
            "status": {"value": status, "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}},
            "body": {"value": value, "unit": "percent"}}});
        let p = both_v3(&json!({"data": [failed]}))?.expect("a listing");
        let results = v3::pick_battery_job(&p.signals, UnitSystem::Metric);
        prop_assert!(results[0].result.is_err(), "{:?}", results[0].result);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Issue 11 item 9: today v3 clamps a state of charge outside 0–100 and takes a negative
    /// or 1e308 distance; the per-signal decoding rewrite makes them decode errors.
    #[test]
    #[ignore = "issue 11 item 9: out-of-range v3 values are clamped or accepted today"]
    fn out_of_range_v3_values_are_never_readings(
        soc in prop_oneof![-1e308..-0.0001f64, 100.0001f64..1e308],
        distance in prop_oneof![-1e308..-0.001f64, Just(1e308)],
    ) {
        let page = json!({"data": [
            signal(v3::SOC, json!({"value": soc, "unit": "percent"}), FETCHED),
            signal(v3::RANGE, json!({"value": distance, "unit": "km"}), FETCHED),
            signal(v3::ODOMETER, json!({"value": distance, "unit": "km"}), FETCHED),
        ]});
        let p = both_v3(&page)?.expect("a listing");
        for r in v3::pick_all(&p.signals, UnitSystem::Metric) {
            prop_assert!(r.result.as_ref().map_or(true, plausible), "{:?}", r);
            if matches!(r.endpoint.as_str(), "battery" | "odometer") {
                prop_assert!(r.result.is_err(), "{}: {:?}", r.endpoint, r.result);
            }
        }
    }
}

/// Replaces an array where the byte parser once expected an object (a listing item, its
/// `attributes`, the page's `links`, `meta`, `included`) by an object holding it, and drops an
/// item's own `code` when it has `attributes` without one: the shapes the serde-struct byte
/// parser read differently from the tree parser (see the regression test below). The scanner
/// that replaced it reads them alike; `the_fast_path_agrees_or_declines_on_generated_listings`
/// generates them unwrapped.
fn no_arrays_for_structs(page: &mut Value) {
    let wrap = |v: &mut Value| {
        if v.is_array() {
            *v = json!({ "wrapped": v.take() });
        }
    };
    for key in ["links", "meta", "included"] {
        if let Some(v) = page.get_mut(key) {
            wrap(v);
        }
    }
    if let Some(Value::Array(items)) = page.get_mut("data") {
        for item in items {
            wrap(item);
            if let Some(a) = item.get_mut("attributes") {
                wrap(a);
            }
            let attributes = item.get("attributes");
            if attributes.is_some() && attributes.and_then(|a| a.get("code")).is_none() {
                if let Some(m) = item.as_object_mut() {
                    m.remove("code");
                }
            }
        }
    }
}

/// Found by `v3_parsers_never_panic_and_agree_on_any_json`: serde's derived structs also take
/// a JSON array (fields by position), so the byte parser reads `["tractionbattery-stateofcharge",
/// …]` as a signal (with whatever body the array's fifth element holds), and an item whose
/// `attributes` is `["tractionbattery-stateofcharge"]` too, where the tree parser skips both.
/// Likewise an item with `attributes` that name no code (`null`, `{}`) and a `code` of its own:
/// the byte parser falls back to the item's `code`, the tree parser only to its `id`. Fixed by
/// the scanner that replaced the derived structs (issue 8): it applies the tree's rules to
/// whatever shape an item has.
#[test]
fn regression_v3_parsers_agree_on_an_array_item() {
    for positional in [
        json!({"data": [[v3::SOC, null, null, {"value": "SUCCESS"}, {"value": 50}]]}),
        json!({"data": [{"attributes": [v3::SOC]}]}),
        json!({"data": [{"attributes": null, "code": v3::SOC}]}),
        json!({"data": [{"attributes": {}, "code": v3::SOC}]}),
    ] {
        let bytes = serde_json::to_vec(&positional).unwrap();
        let fast = v3::parse_signals_bytes(&bytes, FETCHED, None).map(|p| p.signals);
        let slow = v3::parse_signals_page(&positional, FETCHED, None).map(|p| p.signals);
        assert_eq!(fast, slow.ok(), "{positional}");
    }
}

/// Found by `a_failed_v3_signal_is_never_a_reading` through its harness, not carpulse: the two
/// parsers must be compared on the same bytes (a float does not survive a write and a read in
/// its last bit without serde_json's float_roundtrip).
#[test]
fn regression_v3_parsers_agree_on_a_float_read_from_the_same_bytes() {
    let page =
        json!({"data": [signal(v3::SOC, json!({"value": 1.2393211069948165e-46}), FETCHED)]});
    both_v3(&page).unwrap();
}

// ---------------------------------------------------------------- v3 fast path: agree or decline

/// The one-page listing the hotpath bench times, as `carpulse simulator` serves it.
const LISTING: &[u8] = include_bytes!("../benches/fixtures/v3-listing.json");

/// The signal codes carpulse reads (the fast path answers only these).
const READ: [&str; 7] = [
    v3::SOC,
    v3::RANGE,
    v3::CABLE,
    v3::DETAILED_STATUS,
    v3::IS_CHARGING,
    v3::VIN,
    v3::ODOMETER,
];

/// The fast path's contract on any body: it answers only a body serde_json accepts (as it
/// accepts what it skips: syntax, not the UTF-8 or code points of skipped strings), and then
/// with exactly the tree parser's page (its read signals, link, vehicle and counts). `true`
/// when it answered.
fn agree_or_decline(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let Some(fast) = v3::parse_signals_bytes(bytes, FETCHED, Some("rid")) else {
        return Ok(false);
    };
    let text = String::from_utf8_lossy(bytes);
    prop_assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok(),
        "a body serde_json rejects became a page: {}",
        text
    );
    // A string the tree rejects in a part carpulse skips (invalid UTF-8, a lone surrogate)
    // was never checked by the fast path (serde skips it unchecked too): nothing to compare.
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(true);
    };
    let slow = match v3::parse_signals_page(&v, FETCHED, Some("rid")) {
        Ok(slow) => slow,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "tree: {e}, fast: a page: {text}"
            )))
        }
    };
    let wanted: Vec<&v3::Signal> = slow
        .signals
        .iter()
        .filter(|s| READ.contains(&&*s.code))
        .collect();
    prop_assert_eq!(fast.signals.iter().collect::<Vec<_>>(), wanted, "{}", text);
    prop_assert_eq!(
        (
            &fast.next,
            &fast.vehicle,
            fast.total_count,
            fast.items,
            fast.page_size
        ),
        (
            &slow.next,
            &slow.vehicle,
            slow.total_count,
            slow.items,
            slow.page_size
        ),
        "{}",
        text
    );
    Ok(true)
}

/// The fixture, and every prefix of it: a truncated answer is never a page (a decode error by
/// the tree parser), wherever the connection broke.
#[test]
fn the_fast_path_reads_the_fixture_and_declines_every_truncation_of_it() {
    assert!(agree_or_decline(LISTING).unwrap(), "the fixture is a page");
    let page = v3::parse_signals_bytes(LISTING, FETCHED, None).unwrap();
    assert_eq!((page.items, page.signals.len()), (18, 7));
    for end in 0..LISTING.len() {
        assert!(
            v3::parse_signals_bytes(&LISTING[..end], FETCHED, None).is_none(),
            "a page from the first {end} bytes"
        );
    }
}

/// A small deterministic generator (xorshift) driving the rewrites of the fixture below, so
/// one proptest seed names one rewritten document.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: u32) -> bool {
        self.next() % u64::from(n) == 0
    }
}

/// Writes `v` as JSON text, rewritten at random but staying valid JSON with (where no
/// structural change happens) the same meaning: whitespace between tokens, members reordered,
/// characters written as `\u` escapes or `\/`; and, at `rate`, changes of meaning the parsers
/// must agree on: unknown members (deeply nested ones too), a member named twice, a value
/// wrapped in an array or an object.
struct Rewriter {
    dice: Dice,
    rate: u32,
    out: String,
}

impl Rewriter {
    fn ws(&mut self) {
        while self.dice.one_in(4) {
            let w = [' ', '\n', '\t', '\r'][self.dice.below(4)];
            self.out.push(w);
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let escape = self.dice.one_in(self.rate);
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '/' if escape => self.out.push_str("\\/"),
                c if (c as u32) < 0x20 || escape => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, v: &Value) {
        self.ws();
        if self.dice.one_in(self.rate * 4) {
            // Nesting: the value one level down.
            if self.dice.one_in(2) {
                self.out.push('[');
                self.value(v);
                self.out.push(']');
            } else {
                self.out.push_str("{\"wrapped\":");
                self.value(v);
                self.out.push('}');
            }
            self.ws();
            return;
        }
        match v {
            Value::Object(m) => {
                let mut members: Vec<(&String, &Value)> = m.iter().collect();
                for i in (1..members.len()).rev() {
                    let j = self.dice.below(i + 1);
                    members.swap(i, j);
                }
                self.out.push('{');
                let mut first = true;
                for (k, v) in members {
                    let times = if self.dice.one_in(self.rate * 2) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..times {
                        self.member(&mut first, k, v);
                    }
                    if self.dice.one_in(self.rate) {
                        let depth = self.dice.below(40);
                        let unknown = format!(
                            "{}{{\"s\":\"x\\\"y\\u00e9\",\"n\":-1.5e-3,\"t\":[true,false,null,{{}},[]]}}{}",
                            "[".repeat(depth),
                            "]".repeat(depth)
                        );
                        let unknown: Value = serde_json::from_str(&unknown).unwrap();
                        self.member(&mut first, "x-unknown", &unknown);
                    }
                }
                self.ws();
                self.out.push('}');
            }
            Value::Array(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                    }
                    self.value(item);
                }
                self.ws();
                self.out.push(']');
            }
            Value::String(s) => self.string(s),
            other => self.out.push_str(&other.to_string()),
        }
        self.ws();
    }

    fn member(&mut self, first: &mut bool, key: &str, v: &Value) {
        if !*first {
            self.out.push(',');
        }
        *first = false;
        self.ws();
        self.string(key);
        self.ws();
        self.out.push(':');
        self.value(v);
    }
}

/// Byte-level damage to the fixture: what a broken proxy, a bad disk or a hostile server
/// might send.
#[derive(Clone, Debug)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, &'static str),
    Delete(prop::sample::Index, usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    let text = prop::sample::select(vec![
        " ", "\n", "\t\r", "\\n", "\\u0041", "\\ud800", "\\u12", "\\x", "\\", "\"", ",", ":", "{",
        "}", "[", "]", "null", "0", "-", "01", "1e", ".5", "\u{0}", "\u{1f}", "\u{e9}", "\\\"",
        "\"x\":1,", "[[[[[[",
    ]);
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        (any::<prop::sample::Index>(), text).prop_map(|(i, t)| Damage::Insert(i, t)),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| Damage::Delete(i, n)),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    /// Bytes flipped, inserted or deleted anywhere in the fixture: the fast path agrees with
    /// the tree parser or declines, and never takes a body serde_json rejects.
    #[test]
    fn the_fast_path_agrees_or_declines_on_a_damaged_fixture(
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let mut bytes = LISTING.to_vec();
        for d in &damages {
            match d {
                Damage::Flip(at, b) => {
                    let at = at.index(bytes.len());
                    bytes[at] = *b;
                }
                Damage::Insert(at, text) => {
                    let at = at.index(bytes.len() + 1);
                    bytes.splice(at..at, text.bytes());
                }
                Damage::Delete(at, n) => {
                    let at = at.index(bytes.len());
                    bytes.drain(at..(at + n).min(bytes.len()));
                }
            }
        }
        agree_or_decline(&bytes)?;
    }

    /// The fixture rewritten (whitespace, reordered members, escapes; at `rate`: unknown and
    /// nested members, duplicates, wrapped values): the fast path agrees or declines.
    #[test]
    fn the_fast_path_agrees_or_declines_on_a_rewritten_fixture(
        seed in 1u64..,
        rate in 8u32..2000,
    ) {
        let fixture: Value = serde_json::from_slice(LISTING).unwrap();
        let mut w = Rewriter { dice: Dice(seed), rate, out: String::new() };
        w.value(&fixture);
        agree_or_decline(w.out.as_bytes())?;
    }

    /// Generated listings, items of any shape (arrays, nulls and objects in place of items,
    /// `attributes`, `status`, `body`, `meta`, `links`, `included`) among well-formed signals
    /// carpulse reads: the fast path agrees or declines.
    #[test]
    fn the_fast_path_agrees_or_declines_on_generated_listings(
        data in prop::collection::vec(
            prop_oneof![
                any_json(),
                prop::collection::vec(
                    ("[a-z]{1,6}|id|attributes|code|status|body|meta", any_json()),
                    0..5,
                ).prop_map(|kv| Value::Object(kv.into_iter().collect())),
                (prop::sample::select(READ.to_vec()), any_json(), any_json(), any_json())
                    .prop_map(|(code, body, status, attributes)| {
                        let mut s = signal(code, body, FETCHED);
                        if !status.is_null() {
                            s["attributes"]["status"] = status;
                        }
                        if attributes.is_array() {
                            s["attributes"] = attributes;
                        }
                        s
                    }),
            ],
            0..6,
        ),
        rest in any_json(),
    ) {
        let mut page = match rest {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        page.insert("data".into(), Value::Array(data));
        agree_or_decline(&serde_json::to_vec(&Value::Object(page)).unwrap())?;
    }

    /// Any bytes at all: a body serde_json rejects is never a page.
    #[test]
    fn the_fast_path_never_takes_what_serde_json_rejects(
        bytes in prop::collection::vec(
            prop::sample::select(b"{}[]\":,0123456789-.eE+ \n\\utrfnalsdxyz\x00\x1f\xc3\xa9".to_vec()),
            0..96,
        ),
    ) {
        let mut body = b"{\"data\":[".to_vec();
        body.extend_from_slice(&bytes);
        agree_or_decline(&body)?;
        agree_or_decline(&bytes)?;
    }
}

/// What the seams of a scanner that reads 8 or 64 bytes at a time must not change: a quote
/// after odd and even backslash runs, escapes, control and non-ASCII bytes, as a string's
/// content.
fn seam_piece() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        (
            0usize..7,
            prop::sample::select(vec!["\"", "x", "n", "u00e9", "u00g", ""])
        )
            .prop_map(|(run, after)| format!("{}{after}", "\\".repeat(run))),
        prop::sample::select(vec![
            "\u{0}", "\u{1f}", "\t", "\n", "\u{7f}", "\u{e9}", "\u{20ac}", "\"", "/", "\\/",
        ])
        .prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 1..4).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(1024))]

    /// The fixture with a string, a number or whitespace slid across the 64-byte seams (a
    /// member the parsers skip, in front of the listing or in place of an item's `group`), and
    /// the listing's length a multiple of 64 or not: the fast path takes the body exactly
    /// when serde_json does (nothing here is a shape it declines) and agrees with the tree.
    #[test]
    fn seams_change_nothing_in_a_listing(
        pad in 0usize..200,
        piece in seam_piece(),
        number in prop::sample::select(vec!["-12.5e+3", "0", "1234567890123", "-0", "01", "1.", "2E-7", "true", "nul"]),
        in_item in any::<bool>(),
        trailing in 0usize..130,
    ) {
        let text = std::str::from_utf8(LISTING).unwrap();
        let lead = "a".repeat(pad);
        let skipped = format!("\"{lead}{piece}\",\"n{pad}\":{number}");
        let mut body = if in_item {
            text.replacen("\"group\":\"TractionBattery\"", &format!("\"group\":{skipped}"), 1)
        } else {
            format!("{{\"p\":{skipped},{}", &text[1..])
        };
        // Trailing whitespace: to the next multiple of 64 when `trailing` is even.
        let spaces = if trailing % 2 == 0 { (64 - body.len() % 64) % 64 } else { trailing };
        body.push_str(&" ".repeat(spaces));
        let serde_takes = serde_json::from_slice::<serde::de::IgnoredAny>(body.as_bytes()).is_ok();
        prop_assert_eq!(agree_or_decline(body.as_bytes())?, serde_takes, "{}", body);
    }
}

// ---------------------------------------------------------------- token endpoint

/// What the tiny token server answers next: (status, content type, body).
type Answer = Arc<Mutex<(u16, &'static str, Vec<u8>)>>;

/// A loopback server answering every `POST /oauth/token` with what `Answer` holds, and the
/// Smartcar client pointed at it. One per test; the cases change the answer.
struct TokenServer {
    rt: tokio::runtime::Runtime,
    answer: Answer,
    client: carpulse::smartcar::SmartcarClient,
}

const CLIENT_SECRET: &str = "client-secret-Zq93";
const REFRESH: &str = "refresh-token-Pq81-kept-secret";

fn token_server() -> TokenServer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer: Answer = Arc::new(Mutex::new((200, "application/json", b"{}".to_vec())));
    let served = answer.clone();
    let addr = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/oauth/token",
            axum::routing::post(move || {
                let served = served.clone();
                async move {
                    let (status, ctype, body) = served.lock().unwrap().clone();
                    axum::response::Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(axum::body::Body::from(body))
                        .unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    let client = carpulse::smartcar::SmartcarClient::new(carpulse::smartcar::ClientConfig {
        client_id: "client-id".into(),
        client_secret: Secret::new(CLIENT_SECRET),
        redirect_uri: "http://127.0.0.1:9/exchange".into(),
        token_url: format!("http://{addr}/oauth/token"),
        api_v2_url: format!("http://{addr}/v2.0"),
        api_v3_url: format!("http://{addr}/v3"),
        unit_system: UnitSystem::Metric,
        timeout: std::time::Duration::from_secs(10),
        v3_page_size: None,
        max_in_flight: carpulse::config::DEFAULT_MAX_IN_FLIGHT,
    })
    .unwrap();
    TokenServer { rt, answer, client }
}

impl TokenServer {
    fn refresh(
        &self,
        status: u16,
        ctype: &'static str,
        body: Vec<u8>,
    ) -> Result<carpulse::domain::TokenPair, carpulse::smartcar::error::AuthError> {
        *self.answer.lock().unwrap() = (status, ctype, body);
        self.rt.block_on(self.client.refresh(&Secret::new(REFRESH)))
    }
}

/// A token answer's JSON: the fields Smartcar sends, each present or not and of any type.
fn token_json() -> impl Strategy<Value = Value> {
    let field = |name: &'static str, good: BoxedStrategy<Value>| {
        prop_oneof![
            3 => good.prop_map(move |v| Some((name, v))),
            1 => any_json().prop_map(move |v| Some((name, v))),
            1 => Just(None),
        ]
    };
    (
        field(
            "access_token",
            "[a-zA-Z0-9-]{1,40}".prop_map(Value::from).boxed(),
        ),
        field(
            "refresh_token",
            "[a-zA-Z0-9-]{1,40}".prop_map(Value::from).boxed(),
        ),
        field(
            "expires_in",
            prop_oneof![
                (0u64..100_000).prop_map(Value::from),
                Just(json!("7200")),
                Just(json!(-1)),
                Just(json!(1e12)),
                Just(json!(7200.5)),
            ]
            .boxed(),
        ),
        field("token_type", Just(json!("Bearer")).boxed()),
        field(
            "error",
            prop::sample::select(vec![
                "invalid_grant",
                "invalid_request",
                "server_error",
                "x",
            ])
            .prop_map(Value::from)
            .boxed(),
        ),
        field(
            "error_description",
            prop::sample::select(vec![
                format!("the refresh token {REFRESH} is invalid"),
                format!("client secret {CLIENT_SECRET} does not match"),
                "nothing to see".to_owned(),
            ])
            .prop_map(Value::from)
            .boxed(),
        ),
    )
        .prop_map(|(a, b, c, d, e, f)| {
            Value::Object(
                [a, b, c, d, e, f]
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            )
        })
}

proptest! {
    #![proptest_config(cases(96))]

    /// Whatever the token endpoint answers: no panic; a success carries the access token it
    /// sent with an expiry in the future; an error never quotes the refresh token or the
    /// client secret, even when the answer echoes them.
    #[test]
    fn token_answers_never_panic_and_errors_never_quote_secrets(
        status in prop::sample::select(vec![200u16, 200, 200, 400, 401, 404, 429, 500, 503]),
        ctype in prop::sample::select(vec!["application/json", "text/html", "text/plain"]),
        body in prop_oneof![
            4 => token_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => prop::collection::vec(any::<u8>(), 0..128),
            1 => Just(format!("<html>refresh_token={REFRESH}&secret={CLIENT_SECRET}</html>").into_bytes()),
        ],
    ) {
        // One server for the whole property (proptest calls this body once per case).
        thread_local! { static SERVER: TokenServer = token_server(); }
        let sent: Option<Value> = serde_json::from_slice(&body).ok();
        let before = carpulse::domain::now_ms();
        let outcome = SERVER.with(|s| s.refresh(status, ctype, body.clone()));
        match outcome {
            Ok(pair) => {
                prop_assert_eq!(status, 200);
                let sent = sent.expect("a success came from a JSON body");
                prop_assert_eq!(Some(pair.access_token.expose()), sent["access_token"].as_str());
                prop_assert!(pair.access_expires_at >= before, "{} < {before}", pair.access_expires_at);
                prop_assert!(pair.refresh_expires_at > before);
            }
            Err(e) => {
                let text = format!("{e} {e:?}");
                prop_assert!(!text.contains(REFRESH), "{text}");
                prop_assert!(!text.contains(CLIENT_SECRET), "{text}");
            }
        }
    }
}

// ---------------------------------------------------------------- config

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// TOML-ish text: the sections and keys carpulse knows, with values of any shape, and lines
/// of noise.
fn config_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "smartcar",
        "store",
        "metrics",
        "schedule",
        "poll",
        "budget",
        "retention",
        "backup",
        "nonsense",
    ]);
    let key = prop::sample::select(vec![
        "client_id",
        "client_secret",
        "client_secret_file",
        "mode",
        "api",
        "scope",
        "unit_system",
        "token_url",
        "api_v3_url",
        "v3_page_size",
        "api_client_id",
        "path",
        "listen",
        "per_vehicle",
        "stale_after",
        "web_config_file",
        "battery",
        "info",
        "battery_charging",
        "refresh_margin",
        "discover_every",
        "no_data_every",
        "poll_at_start",
        "concurrency",
        "max_in_flight",
        "timeout",
        "calls_per_vehicle_month",
        "readings",
        "every",
        "x",
    ]);
    let value = prop_oneof![
        Just("\"abc\"".to_owned()),
        Just("\"0 */15 * * * *\"".to_owned()),
        Just("\"*/15 * * * *\"".to_owned()),
        Just("\"10m\"".to_owned()),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"v3\"".to_owned()),
        Just("[\"read_battery\"]".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("1e308".to_owned()),
        Just("true".to_owned()),
        Just("{ a = 1 }".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"\\PC{0,12}\"",
        "\\PC{0,12}",
    ];
    let line = prop_oneof![
        3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => section.prop_map(|s| format!("[{s}]")),
        1 => "\\PC{0,24}",
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| {
        // Credentials first, so the other keys are reached more often than not.
        format!(
            "[smartcar]\nclient_id = \"id\"\nclient_secret = \"s\"\n{}",
            lines.join("\n")
        )
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn the_config_parser_never_panics_and_names_the_file(text in config_text()) {
        if let Err(e) = Config::parse(&text, "c.toml", &NoEnv) {
            let msg = e.to_string();
            prop_assert!(msg.contains("c.toml"), "an error names the file: {msg}\n{text}");
        }
    }

    #[test]
    fn the_config_parser_never_panics_on_any_text(text in "\\PC{0,400}") {
        let _ = Config::parse(&text, "c.toml", &NoEnv);
    }

    /// Valid values are taken as written.
    #[test]
    fn valid_config_values_round_trip(
        concurrency in 1usize..=512,
        port in 0u16..=65535,
        budget in 1u64..=1_000_000,
        minutes in 1u64..=59,
    ) {
        let text = format!(
            "[smartcar]\nclient_id = \"id\"\nclient_secret = \"s\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [schedule]\nbattery = \"0 */{minutes} * * * *\"\nrefresh_margin = \"{minutes}m\"\n\n\
             [poll]\nconcurrency = {concurrency}\n\n[budget]\ncalls_per_vehicle_month = {budget}\n"
        );
        let cfg = Config::parse(&text, "c.toml", &NoEnv)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(cfg.poll.concurrency, concurrency);
        prop_assert_eq!(cfg.metrics.listen.port(), port);
        prop_assert_eq!(cfg.budget.calls_per_vehicle_month, Some(budget));
        prop_assert_eq!(cfg.schedule.battery.as_str(), format!("0 */{minutes} * * * *"));
        prop_assert_eq!(cfg.schedule.refresh_margin, std::time::Duration::from_secs(minutes * 60));
    }
}
