//! `carpulse history`: stored readings through the same views users query with sqlite3 or
//! Grafana, as a table, CSV or JSON.

use std::fmt::Write as _;

use anyhow::{bail, Context};

use crate::config::Config;
use crate::domain::{now_ms, UnixMillis};
use crate::report::open_read_only;

#[derive(clap::Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Only this vehicle (Smartcar id).
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
    /// Output format: table, csv or json.
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
    pub format: String,
    /// At most this many rows (newest first).
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
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

pub async fn run(cfg: &Config, args: &HistoryArgs) -> anyhow::Result<()> {
    let out = query(cfg, args, now_ms())?;
    print!("{out}");
    Ok(())
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
    let (view, time_col, cols): (&str, &str, &[&str]) = match args.kind.as_str() {
        "battery" => (
            "battery_history",
            "recorded_at",
            &[
                "vehicle_id",
                "recorded_at",
                "fetched_at",
                "soc_percent",
                "range_km",
            ],
        ),
        "charge" => (
            "charge_history",
            "recorded_at",
            &[
                "vehicle_id",
                "recorded_at",
                "fetched_at",
                "plugged_in",
                "state",
            ],
        ),
        "odometer" => (
            "odometer_history",
            "recorded_at",
            &["vehicle_id", "recorded_at", "fetched_at", "odometer_km"],
        ),
        "events" => (
            "poll_events",
            "at",
            &[
                "vehicle_id",
                "at",
                "endpoint",
                "outcome",
                "http_status",
                "error_type",
                "error_code",
            ],
        ),
        other => bail!("unknown --kind {other}"),
    };
    let c = open_read_only(&cfg.store.path)?;
    let sql = format!(
        "SELECT {} FROM {view} WHERE {time_col} >= ?1 AND {time_col} <= ?2 AND (?3 IS NULL OR vehicle_id = ?3)
         ORDER BY {time_col} DESC LIMIT ?4",
        cols.join(", ")
    );
    let mut stmt = c
        .prepare(&sql)
        .with_context(|| format!("querying {view}"))?;
    let mut rows = stmt.query(rusqlite::params![since, until, args.vehicle, args.limit])?;
    let mut table: Vec<Vec<serde_json::Value>> = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(cols.len());
        for i in 0..cols.len() {
            let v: rusqlite::types::Value = r.get(i)?;
            row.push(match v {
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
    Ok(render(cols, &table, &args.format))
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(cols: &[&str], rows: &[Vec<serde_json::Value>], format: &str) -> String {
    let mut out = String::new();
    match format {
        "json" => {
            let objs: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::Value::Object(
                        cols.iter()
                            .map(|c| c.to_string())
                            .zip(r.iter().cloned())
                            .collect(),
                    )
                })
                .collect();
            out = serde_json::to_string_pretty(&objs).unwrap_or_default();
            out.push('\n');
        }
        "csv" => {
            let _ = writeln!(out, "{}", cols.join(","));
            for r in rows {
                let cells: Vec<String> = r
                    .iter()
                    .map(|v| {
                        let s = cell(v);
                        if s.contains([',', '"', '\n']) {
                            format!("\"{}\"", s.replace('"', "\"\""))
                        } else {
                            s
                        }
                    })
                    .collect();
                let _ = writeln!(out, "{}", cells.join(","));
            }
        }
        _ => {
            // For people: times as UTC dates (csv and json keep the store's milliseconds).
            let text: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .zip(cols)
                        .map(|(v, c)| match (v.as_i64(), *c) {
                            (Some(ms), "recorded_at" | "fetched_at" | "at") => {
                                chrono::DateTime::from_timestamp_millis(ms)
                                    .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                                    .unwrap_or_else(|| ms.to_string())
                            }
                            _ => cell(v),
                        })
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    text.iter()
                        .map(|r| r[i].len())
                        .max()
                        .unwrap_or(0)
                        .max(c.len())
                })
                .collect();
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let _ = writeln!(
                out,
                "{}",
                line(cols.iter().map(|c| c.to_uppercase()).collect())
            );
            for r in text {
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
    fn csv_quotes_and_json_objects() {
        let cols = ["a", "b"];
        let rows = vec![vec![serde_json::json!("x,y"), serde_json::json!(1.5)]];
        assert_eq!(render(&cols, &rows, "csv"), "a,b\n\"x,y\",1.5\n");
        let j: serde_json::Value = serde_json::from_str(&render(&cols, &rows, "json")).unwrap();
        assert_eq!(j, serde_json::json!([{"a": "x,y", "b": 1.5}]));
        assert_eq!(render(&cols, &rows, "table"), "A    B\nx,y  1.5\n");
        let timed = vec![vec![serde_json::json!(1_700_000_000_123i64)]];
        assert_eq!(
            render(&["recorded_at"], &timed, "table"),
            "RECORDED_AT\n2023-11-14 22:13:20.123\n"
        );
    }
}
