//! promtool on what carpulse ships for Prometheus: the alert rules parse (`check rules`), their
//! unit tests pass (`test rules`), the scrape example is a valid config (`check config`, which
//! loads the rules too), the web config of the tests is one exporter-toolkit accepts
//! (`check web-config`), and what /metrics serves passes promtool's naming lint.

use std::process::Command;

use super::{repo, tool};

fn promtool(args: &[&str]) -> String {
    let Some(promtool) = tool("promtool") else {
        return String::new();
    };
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo())
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_parse_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "config/prometheus/alerts.yml"]);
    if checked.is_empty() {
        return;
    }
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "config/prometheus/alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(repo().join("config/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("config/prometheus/alerts_test.yml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "alert {name} has no unit test"
            );
        }
    }
}

#[test]
fn the_scrape_example_and_the_web_config_are_valid() {
    let checked = promtool(&["check", "config", "config/prometheus/scrape.yml"]);
    if checked.is_empty() {
        return;
    }
    assert!(
        checked.contains("is valid prometheus config file syntax"),
        "{checked}"
    );
    let web = promtool(&["check", "web-config", "tests/fixtures/web-config.yml"]);
    assert!(web.contains("SUCCESS"), "{web}");
}

#[test]
fn the_exposition_passes_promtools_lint() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    // Every family, with per-vehicle series, as a running daemon exports them.
    let m = carpulse::daemon::metrics::Metrics::new().unwrap();
    m.set_api(carpulse::domain::ApiVersion::V3);
    let id = carpulse::domain::VehicleId("v1".into());
    m.seed_vehicle(
        &id,
        Some(&carpulse::domain::BatteryReading {
            stamp: carpulse::domain::Stamp {
                recorded_at: 1_700_000_000_000,
                fetched_at: 1_700_000_000_500,
            },
            soc_percent: 50.0,
            range_km: Some(100.0),
        }),
        None,
        None,
        Some(true),
    );
    m.set_fleet(&[(id.clone(), None)]);
    m.set_vehicle_states(&[]);
    m.set_calls_billed(&[(id, 3)]);
    m.set_budget(Some(500));
    m.request(carpulse::domain::ApiVersion::V3, "ok", 0.2);
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(m.render().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool check metrics:\n{text}"
    );
}
