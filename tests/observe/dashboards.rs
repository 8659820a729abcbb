//! The Grafana dashboards and provisioning files, checked as Grafana's file provisioning loads
//! them: JSON dashboards with a schema version, a uid and no `__inputs` (those are for the
//! import dialog, which provisioning never shows), every data source referred to by a uid the
//! provisioning file declares, a `$vehicle` variable, panels on the 24-column grid. Also the
//! source of the expressions the `sql` and `prometheus` tests run.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use serde_json::Value;

use super::repo;

pub fn dashboards_dir() -> PathBuf {
    repo().join("config/grafana/dashboards")
}

/// Every dashboard: (file name, JSON).
pub fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dashboards_dir()).expect("config/grafana/dashboards") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            json,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 2, "the fleet and the history dashboards");
    out
}

/// The provisioned data sources: uid → type.
pub fn provisioned_datasources() -> HashMap<String, String> {
    let path = repo().join("config/grafana/provisioning/datasources/carpulse.yml");
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(y["apiVersion"].as_i64(), Some(1), "{}", path.display());
    y["datasources"]
        .as_sequence()
        .expect("datasources")
        .iter()
        .map(|d| {
            (
                d["uid"]
                    .as_str()
                    .expect("each data source has a uid")
                    .to_owned(),
                d["type"].as_str().expect("and a type").to_owned(),
            )
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// A query a dashboard runs: where it is, its data source type and its text.
pub struct Query {
    pub at: String,
    pub ds_type: String,
    pub text: String,
}

/// Every query of every dashboard: panel targets and variable queries (a Prometheus
/// variable's `query_result(...)` / `label_values(...)` as the PromQL inside).
pub fn queries() -> Vec<Query> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let ds = &t["datasource"];
                let ds = if ds.is_null() { &p["datasource"] } else { ds };
                let text = t["expr"]
                    .as_str()
                    .or_else(|| t["rawQueryText"].as_str())
                    .unwrap_or_else(|| {
                        panic!("{file}: panel {:?}: a target without a query", p["title"])
                    });
                out.push(Query {
                    at: format!(
                        "{file}: panel {:?} {}",
                        p["title"].as_str().unwrap_or(""),
                        t["refId"]
                    ),
                    ds_type: ds["type"].as_str().unwrap_or("").to_owned(),
                    text: text.to_owned(),
                });
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or("");
            let ds_type = v["datasource"]["type"].as_str().unwrap_or("").to_owned();
            let text = if ds_type == "prometheus" {
                promql_of_variable(q)
            } else {
                q.to_owned()
            };
            out.push(Query {
                at: format!("{file}: variable ${}", v["name"].as_str().unwrap_or("")),
                ds_type,
                text,
            });
        }
    }
    out
}

/// The PromQL inside a Prometheus variable query (`query_result(EXPR)`,
/// `label_values(EXPR, label)`).
fn promql_of_variable(q: &str) -> String {
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|s| s.strip_suffix(')'))
    {
        return inner.to_owned();
    }
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        return match inner.rsplit_once(',') {
            Some((expr, _label)) => expr.trim().to_owned(),
            None => format!("{{__name__=~\".+\", {inner}!=\"\"}}"),
        };
    }
    panic!("a Prometheus variable query carpulse does not use: {q}")
}

#[test]
fn dashboards_load_as_grafana_provisioning_expects() {
    let sources = provisioned_datasources();
    assert_eq!(
        sources.get("carpulse-prometheus").map(String::as_str),
        Some("prometheus")
    );
    assert_eq!(
        sources.get("carpulse-sqlite").map(String::as_str),
        Some("frser-sqlite-datasource")
    );
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        assert!(
            d.get("__inputs").is_none(),
            "{file}: __inputs is for imports, not provisioning"
        );
        assert!(
            d.get("__requires").is_none(),
            "{file}: no __requires either"
        );
        let schema = d["schemaVersion"].as_i64().unwrap_or(0);
        assert!(
            schema >= 36,
            "{file}: schemaVersion {schema} (Grafana 9+ migrates from 36 on)"
        );
        let uid = d["uid"]
            .as_str()
            .expect("a uid, so links and provisioning updates find it");
        assert!(
            uid.len() <= 40 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{file}: uid {uid}"
        );
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} used twice");
        assert!(
            d["id"].is_null(),
            "{file}: no numeric id (Grafana assigns it)"
        );
        assert_eq!(
            d["timezone"], "browser",
            "{file}: UTC data shown in the viewer's zone"
        );
        assert!(!d["title"].as_str().unwrap_or("").is_empty());

        // Every data source reference names a provisioned uid of the right type; no
        // ${DS_...} placeholders from an export.
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("${DS_"), "{file}: an export placeholder");
        let mut refs = Vec::new();
        collect_datasources(&d, &mut refs);
        assert!(!refs.is_empty(), "{file}");
        for (uid, ty) in refs {
            if uid == "-- Grafana --" {
                continue;
            }
            assert_eq!(
                sources.get(&uid),
                Some(&ty),
                "{file}: data source {uid} ({ty}) is not provisioned"
            );
        }

        // Panels: unique ids, on the grid, each with a query (rows aside).
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let id = p["id"].as_i64().expect("panel id");
            assert!(ids.insert(id), "{file}: panel id {id} twice");
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_i64().unwrap(), g["w"].as_i64().unwrap());
            assert!(
                x >= 0 && w > 0 && x + w <= 24 && g["h"].as_i64().unwrap() > 0,
                "{file}: {g}"
            );
            if p["type"] != "row" {
                assert!(
                    p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                    "{file}: panel {:?} has no query",
                    p["title"]
                );
                assert!(
                    !p["description"].as_str().unwrap_or("").is_empty(),
                    "{file}: {:?} says what it shows",
                    p["title"]
                );
            }
        }

        // The $vehicle variable, multi-valued with All, shows make and model.
        let vars = d["templating"]["list"].as_array().expect("templating");
        let vehicle = vars
            .iter()
            .find(|v| v["name"] == "vehicle")
            .expect("$vehicle");
        assert_eq!(vehicle["includeAll"], true, "{file}");
        assert_eq!(vehicle["multi"], true, "{file}");
        let q = serde_json::to_string(&vehicle["query"]).unwrap();
        assert!(
            q.contains("make") && q.contains("model"),
            "{file}: $vehicle shows make and model: {q}"
        );
        assert!(
            text.contains("$vehicle") || text.contains("${vehicle"),
            "{file}: panels use $vehicle"
        );
    }
}

fn collect_datasources(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(ds) = m.get("datasource") {
                match ds {
                    Value::Object(d) => out.push((
                        d.get("uid")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        d.get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    )),
                    Value::Null => {}
                    other => panic!("a data source by name, not uid: {other}"),
                }
            }
            m.values().for_each(|x| collect_datasources(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_datasources(x, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_provider_is_a_file_provider() {
    let path = repo().join("config/grafana/provisioning/dashboards/carpulse.yml");
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(y["apiVersion"].as_i64(), Some(1));
    let p = &y["providers"][0];
    assert_eq!(p["type"].as_str(), Some("file"));
    assert!(p["options"]["path"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(p["name"].as_str().is_some());
}

#[test]
fn the_fleet_dashboard_covers_what_issue_10_lists() {
    let all: String = queries().iter().map(|q| q.text.clone() + "\n").collect();
    for family in [
        "carpulse_vehicles",
        "carpulse_vehicle_up",
        "carpulse_vehicle_state",
        "carpulse_battery_state_of_charge_ratio",
        "carpulse_battery_range_meters",
        "carpulse_charge_state",
        "carpulse_reading_age_seconds",
        "carpulse_polls_total",
        "carpulse_smartcar_requests_total",
        "carpulse_smartcar_calls_billed",
        "carpulse_smartcar_calls_budget",
        "carpulse_token_expiry_timestamp_seconds",
        "carpulse_app_token_expiry_timestamp_seconds",
        "battery_history",
        "charge_history",
        // The history dashboard reads the rollups where they exist (issue 10): odometer per
        // day, hourly battery beside the raw readings, charging sessions.
        "odometer_daily",
        "battery_hourly",
        "charge_sessions",
        "poll_events",
    ] {
        assert!(all.contains(family), "no panel shows {family}");
    }
}
