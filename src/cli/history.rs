//! `carpulse history`: stored readings through the same views users query with sqlite3 or
//! Grafana, as a table for people (local times with their zone, vehicles by make and model) or
//! CSV/JSON for programs (the views' columns, every time as unix milliseconds, then the
//! vehicle's name and every time again as ISO-8601 UTC in a `_utc` column). Reads the store only: no Smartcar credentials needed.

use std::fmt::Write as _;

use anyhow::{bail, Context};

use crate::cli::output::{iso_utc, local, vehicle_label, vehicle_name};
use crate::cli::report::{open_read_only, resolve_vehicle};
use crate::config::Config;
use crate::domain::{now_ms, UnixMillis};

#[derive(clap::Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Only this vehicle: its Smartcar id, an id prefix, or its make and/or model ("tesla
    /// model 3"), as `carpulse vehicles list` shows them.
    #[arg(long)]
    pub vehicle: Option<String>,
    /// Which readings: battery, charge, odometer, or events (poll outcomes).
    #[arg(long, default_value = "battery", value_parser = ["battery", "charge", "odometer", "events"])]
    pub kind: String,
    /// From: RFC 3339 (2026-11-01T00:00:00Z), unix milliseconds, or an age such as 24h or 7d.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Until (same forms as --since); default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Output format: table (local times), csv or json (unix ms and ISO-8601 UTC).
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
    pub format: String,
    /// At most this many rows (newest first).
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    #[command(flatten)]
    pub store: crate::cli::StoreArgs,
}

/// Parses a `--since`/`--until` value into unix ms.
pub fn parse_time(s: &str, now: UnixMillis) -> Result<UnixMillis, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = crate::config::parse_duration(s) {
        return Ok(now - d.as_millis() as i64);
    }
    Err(format!(
        "{s:?} is not RFC 3339, unix milliseconds or an age like 24h"
    ))
}

/// `carpulse history`, written to `out`.
pub async fn run(
    cfg: &Config,
    args: &HistoryArgs,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let text = query(cfg, args, now_ms())?;
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The columns of one kind: the view, its time column, and the value columns after
/// `vehicle_id` and the times.
fn columns(
    kind: &str,
) -> anyhow::Result<(
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
)> {
    Ok(match kind {
        "battery" => (
            "battery_history",
            &["recorded_at", "fetched_at"],
            &["soc_percent", "range_km"],
        ),
        "charge" => (
            "charge_history",
            &["recorded_at", "fetched_at"],
            &["plugged_in", "state"],
        ),
        "odometer" => (
            "odometer_history",
            &["recorded_at", "fetched_at"],
            &["odometer_km"],
        ),
        "events" => (
            "poll_events",
            &["at"],
            &[
                "endpoint",
                "outcome",
                "http_status",
                "error_type",
                "error_code",
            ],
        ),
        other => bail!("unknown --kind {other}"),
    })
}

/// One row: the vehicle's id and name, its times (unix ms) and its values.
struct Row {
    vehicle_id: String,
    name: String,
    times: Vec<Option<UnixMillis>>,
    values: Vec<serde_json::Value>,
}

/// Runs the query and renders it; separate from printing so it can be tested.
pub fn query(cfg: &Config, args: &HistoryArgs, now: UnixMillis) -> anyhow::Result<String> {
    let since = parse_time(&args.since, now).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until = match &args.until {
        Some(u) => parse_time(u, now).map_err(|e| anyhow::anyhow!("--until: {e}"))?,
        None => now,
    };
    if until < since {
        bail!("--until is before --since");
    }
    let (view, times, values) = columns(&args.kind)?;
    let c = open_read_only(&cfg.store.path)?;
    let vehicle = match &args.vehicle {
        Some(q) => Some(resolve_vehicle(&c, q)?.id),
        None => None,
    };
    let time_col = times[0];
    let sql = format!(
        "SELECT h.vehicle_id, v.make, v.model, v.year, {}, {}
         FROM {view} h LEFT JOIN vehicles v ON v.vehicle_id = h.vehicle_id
         WHERE h.{time_col} >= ?1 AND h.{time_col} <= ?2 AND (?3 IS NULL OR h.vehicle_id = ?3)
         ORDER BY h.{time_col} DESC LIMIT ?4",
        times
            .iter()
            .map(|t| format!("h.{t}"))
            .collect::<Vec<_>>()
            .join(", "),
        values
            .iter()
            .map(|t| format!("h.{t}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut stmt = c
        .prepare(&sql)
        .with_context(|| format!("querying {view}"))?;
    let mut rows = stmt.query(rusqlite::params![since, until, vehicle, args.limit])?;
    let mut table = Vec::new();
    while let Some(r) = rows.next()? {
        let id: String = r.get(0)?;
        let name = vehicle_name(
            r.get::<_, Option<String>>(1)?.as_deref(),
            r.get::<_, Option<String>>(2)?.as_deref(),
            r.get(3)?,
        );
        let mut row = Row {
            vehicle_id: id,
            name,
            times: Vec::with_capacity(times.len()),
            values: Vec::with_capacity(values.len()),
        };
        for i in 0..times.len() {
            row.times.push(r.get(4 + i)?);
        }
        for i in 0..values.len() {
            let v: rusqlite::types::Value = r.get(4 + times.len() + i)?;
            row.values.push(match v {
                rusqlite::types::Value::Null => serde_json::Value::Null,
                rusqlite::types::Value::Integer(n) => n.into(),
                rusqlite::types::Value::Real(f) => {
                    serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)
                }
                rusqlite::types::Value::Text(s) => s.into(),
                rusqlite::types::Value::Blob(_) => serde_json::Value::Null,
            });
        }
        table.push(row);
    }
    Ok(render(times, values, &table, &args.format, &local))
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn csv_cell(s: String) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The machine-readable columns: the view's own first (vehicle_id, the times as unix ms, the
/// values, in the order scripts already read them), then what was added for people reading CSV
/// and JSON: the vehicle's make, model and year, and each time as ISO-8601 UTC (`_utc`).
fn machine_columns(times: &[&str], values: &[&str]) -> Vec<String> {
    let mut cols = vec!["vehicle_id".to_owned()];
    cols.extend(times.iter().map(|t| (*t).to_owned()));
    cols.extend(values.iter().map(|v| (*v).to_owned()));
    cols.push("vehicle".to_owned());
    cols.extend(times.iter().map(|t| format!("{t}_utc")));
    cols
}

fn machine_row(r: &Row) -> Vec<serde_json::Value> {
    let mut out = vec![r.vehicle_id.clone().into()];
    out.extend(
        r.times
            .iter()
            .map(|t| t.map_or(serde_json::Value::Null, Into::into)),
    );
    out.extend(r.values.iter().cloned());
    out.push(r.name.clone().into());
    out.extend(
        r.times
            .iter()
            .map(|t| t.map_or(serde_json::Value::Null, |ms| iso_utc(ms).into())),
    );
    out
}

fn render(
    times: &[&str],
    values: &[&str],
    rows: &[Row],
    format: &str,
    local: &dyn Fn(UnixMillis) -> String,
) -> String {
    let mut out = String::new();
    match format {
        "json" => {
            let cols = machine_columns(times, values);
            let objs: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::Value::Object(cols.iter().cloned().zip(machine_row(r)).collect())
                })
                .collect();
            out = serde_json::to_string_pretty(&objs).unwrap_or_default();
            out.push('\n');
        }
        "csv" => {
            let _ = writeln!(out, "{}", machine_columns(times, values).join(","));
            for r in rows {
                let cells: Vec<String> = machine_row(r).iter().map(|v| csv_cell(cell(v))).collect();
                let _ = writeln!(out, "{}", cells.join(","));
            }
        }
        _ => {
            let mut header = vec!["VEHICLE".to_owned()];
            header.extend(times.iter().map(|t| t.to_uppercase()));
            header.extend(values.iter().map(|v| v.to_uppercase()));
            let text: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut line = vec![vehicle_label(&r.vehicle_id, &r.name)];
                    line.extend(r.times.iter().map(|t| t.map(local).unwrap_or_default()));
                    line.extend(r.values.iter().map(cell));
                    line
                })
                .collect();
            let widths: Vec<usize> = header
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    text.iter()
                        .map(|r| r[i].chars().count())
                        .max()
                        .unwrap_or(0)
                        .max(c.len())
                })
                .collect();
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let _ = writeln!(out, "{}", line(&header));
            for r in &text {
                let _ = writeln!(out, "{}", line(r));
            }
            if rows.is_empty() {
                let _ = writeln!(out, "(no rows)");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_forms() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("24h", now), Ok(now - 86_400_000));
        assert_eq!(parse_time("1700000000000", now), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2026-11-01T00:00:00Z", now),
            Ok(1_793_491_200_000)
        );
        assert!(parse_time("yesterday", now).is_err());
    }

    #[test]
    fn formats_for_people_and_programs() {
        let rows = vec![Row {
            vehicle_id: "5f2d4a21-0569".into(),
            name: "TESLA Model 3 2021".into(),
            times: vec![Some(1_700_000_000_123), Some(1_700_000_001_000)],
            values: vec![serde_json::json!(68.5), serde_json::json!("a,b")],
        }];
        let times = ["recorded_at", "fetched_at"];
        let values = ["soc_percent", "note"];
        let cet = chrono::FixedOffset::east_opt(3600).unwrap();
        let local = |ms| crate::cli::output::local_in(&cet, ms);
        assert_eq!(
            render(&times, &values, &rows, "csv", &local),
            "vehicle_id,recorded_at,fetched_at,soc_percent,note,vehicle,recorded_at_utc,fetched_at_utc\n\
             5f2d4a21-0569,1700000000123,1700000001000,68.5,\"a,b\",TESLA Model 3 2021,2023-11-14T22:13:20.123Z,2023-11-14T22:13:21.000Z\n"
        );
        let j: serde_json::Value =
            serde_json::from_str(&render(&times, &values, &rows, "json", &local)).unwrap();
        assert_eq!(j[0]["recorded_at"], 1_700_000_000_123i64);
        assert_eq!(j[0]["recorded_at_utc"], "2023-11-14T22:13:20.123Z");
        assert_eq!(j[0]["vehicle"], "TESLA Model 3 2021");
        let table = render(&times, &values, &rows, "table", &local);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "VEHICLE",
                "RECORDED_AT",
                "FETCHED_AT",
                "SOC_PERCENT",
                "NOTE"
            ]
        );
        assert_eq!(
            lines[1],
            "TESLA Model 3 2021 (5f2d4a21)  2023-11-14 23:13:20 +01:00  2023-11-14 23:13:21 +01:00  68.5         a,b"
        );
        assert_eq!(lines[0].find("RECORDED_AT"), lines[1].find("2023"));
        assert!(render(&times, &values, &[], "table", &local).ends_with("(no rows)\n"));
    }
}
