//! Every SQL query users are given, run against a store with known readings (see `seed`):
//! the README's examples (its ```sql block and its sqlite3 one-liners) and the Grafana history
//! dashboard's queries with Grafana's variables filled in. Each must return exactly the rows
//! the seed implies; a query added without its expected rows fails here.

use rusqlite::types::Value;

use super::dashboards::queries;
use super::repo;
use super::seed::{self, A, B, C, DAY, DAY1, HOUR};

fn run(db: &std::path::Path, sql: &str) -> Vec<Vec<String>> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut stmt = c
        .prepare(sql)
        .unwrap_or_else(|e| panic!("does not prepare: {e}\n{sql}"));
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get::<_, Value>(i)? {
                        Value::Null => "NULL".to_owned(),
                        Value::Integer(i) => i.to_string(),
                        Value::Real(f) => format!("{f:?}"),
                        Value::Text(t) => t,
                        Value::Blob(_) => "BLOB".to_owned(),
                    })
                })
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .unwrap_or_else(|e| panic!("does not run: {e}\n{sql}"));
    rows.collect::<Result<_, _>>().unwrap()
}

fn rows(r: &[&[&str]]) -> Vec<Vec<String>> {
    r.iter()
        .map(|row| row.iter().map(|c| (*c).to_owned()).collect())
        .collect()
}

/// The README's ```sql block: (title comment, statement).
fn readme_queries() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```sql\n") {
        let block = &rest[start + 7..];
        let end = block.find("```").expect("a closed ```sql block");
        for stmt in block[..end].split(';') {
            let stmt = stmt.trim();
            if stmt.is_empty() {
                continue;
            }
            let title = stmt
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("-- "))
                .unwrap_or_else(|| panic!("each README query starts with a -- title:\n{stmt}"));
            out.push((title.to_owned(), stmt.to_owned()));
        }
        rest = &block[end + 3..];
    }
    out
}

#[tokio::test]
async fn every_readme_query_returns_the_expected_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    let now = carpulse::domain::now_ms();
    seed::seed(&db, now).await;
    let hour = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%d %H:00")
            .to_string()
    };
    let r = seed::recent_hour(now);
    let queries = readme_queries();
    assert!(queries.len() >= 5, "{queries:?}");
    for (title, sql) in queries {
        let sql = sql.replace("your-vehicle-id", C);
        let want = match title.as_str() {
            "The last 24 h of one car, hourly average state of charge" => vec![
                vec![hour(r), "55.0".to_owned()],
                vec![hour(r + HOUR), "40.0".to_owned()],
            ],
            "Charging sessions: when each began (a CHARGING reading after anything else)" => rows(&[
                &[A, "2026-03-01 09:00:00"],
                &[A, "2026-03-01 20:00:00"],
                &[B, "2026-03-02 07:00:00"],
            ]),
            "Distance driven per day: between consecutive odometer readings, on the day of the later one" => rows(&[
                &[A, "2026-03-02", "50.0"],
                &[A, "2026-03-03", "80.0"],
                &[B, "2026-03-01", "30.0"],
                &[B, "2026-03-02", "30.0"],
            ]),
            "Energy charged per day, in state-of-charge points (times the usable kWh / 100 for kWh)" => rows(&[
                &[A, "2026-03-01", "65.0"],
                &[A, "2026-03-02", "20.0"],
                &[B, "2026-03-02", "20.0"],
            ]),
            "What failed recently" => {
                let recent = chrono::DateTime::from_timestamp_millis(r + HOUR)
                    .unwrap()
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string();
                vec![
                    vec![A.into(), recent, "charge".into(), "rate_limited".into(), "RATE_LIMIT".into(), "VEHICLE".into()],
                    vec![A.into(), "2026-03-02 08:00:00".into(), "charge".into(), "rate_limited".into(), "RATE_LIMIT".into(), "VEHICLE".into()],
                    vec![A.into(), "2026-03-01 09:00:00".into(), "battery".into(), "vehicle_state".into(), "VEHICLE_STATE".into(), "ASLEEP".into()],
                ]
            }
            other => panic!("a README query without expected rows in this test: {other:?}"),
        };
        assert_eq!(run(&db, &sql), want, "README: {title}\n{sql}");
    }

    // The sqlite3 one-liners (the demo's): they run and show readings.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut one_liners = 0;
    for line in readme
        .lines()
        .filter(|l| l.trim_start().starts_with("sqlite3 "))
    {
        let sql = line
            .split_once('"')
            .and_then(|(_, rest)| rest.rsplit_once('"'))
            .map(|(sql, _)| sql)
            .unwrap_or_else(|| panic!("a sqlite3 line quotes its SQL in \"…\": {line}"));
        assert!(
            !sql.contains('"'),
            "string literals in single quotes: {sql}"
        );
        let got = run(&db, sql);
        assert!(!got.is_empty(), "{sql}");
        one_liners += 1;
    }
    assert!(one_liners >= 1);
}

/// Grafana's variables, as Grafana fills them: `$__from`/`$__to` in ms, `$vehicle` as the chosen
/// texts, quoted and comma-separated: `${vehicle:sqlstring}` doubles an apostrophe in a value
/// (SQL's own quoting); `${vehicle:singlequote}` puts a backslash before it, which SQLite does
/// not read as an escape (a name with an apostrophe broke the query).
fn fill(sql: &str, from: i64, to: i64, vehicles: &[&str]) -> String {
    let quoted = |escape: &dyn Fn(&str) -> String| {
        vehicles
            .iter()
            .map(|v| format!("'{}'", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    };
    sql.replace("$__from", &from.to_string())
        .replace("$__to", &to.to_string())
        .replace("${vehicle:sqlstring}", &quoted(&|v| v.replace('\'', "''")))
        .replace(
            "${vehicle:singlequote}",
            &quoted(&|v| v.replace('\'', "\\'")),
        )
}

#[tokio::test]
async fn every_history_dashboard_query_returns_the_expected_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    seed::seed(&db, carpulse::domain::now_ms()).await;
    check_history_dashboard(&db, false);
    // The same numbers once retention has summarised every raw reading older than a day into
    // the rollups (hourly battery, daily odometer, charging sessions): the dashboard reads
    // them where the raw readings are gone. Only the charging timeline is raw-only.
    let pruned = dir.path().join("pruned.db");
    std::fs::copy(&db, &pruned).unwrap();
    let mut c = rusqlite::Connection::open(&pruned).unwrap();
    let policy = carpulse::store::retention::Policy {
        readings: Some(std::time::Duration::from_secs(86_400)),
        ok_poll_events: None,
        other_poll_events: None,
    };
    carpulse::store::retention::run_all(&mut c, &policy, carpulse::domain::now_ms()).unwrap();
    drop(c);
    assert_eq!(
        run(&pruned, "SELECT count(*) FROM battery_history WHERE vehicle_id <> 'cccc3333-0000-4000-8000-000000000003'"),
        rows(&[&["0"]]),
        "retention summarised the March readings"
    );
    check_history_dashboard(&pruned, true);
}

fn check_history_dashboard(db: &std::path::Path, pruned: bool) {
    let db = db.to_path_buf();
    let (ta, tb) = ("TESLA Model 3 (aaaa1111)", "VOLKSWAGEN ID.4 (bbbb2222)");
    // An apostrophe in the model, as Grafana's variable passes it.
    let td = "CITROËN 2CV 'Charleston' (dddd4444)";
    let all = [ta, tb, "HYUNDAI IONIQ 5 (cccc3333)", td];
    let (from, to) = (DAY1, DAY1 + 3 * DAY);
    let s = |ms: i64| (ms / 1000).to_string();
    let secs = |ms: i64| format!("{:?}", ms as f64 / 1000.0);
    let h = |day: i64, hour: i64| DAY1 + day * DAY + hour * HOUR;
    let mut seen = 0;
    for q in queries()
        .into_iter()
        .filter(|q| q.ds_type == "frser-sqlite-datasource")
    {
        seen += 1;
        let title = q.at.split('"').nth(1).unwrap_or(&q.at).to_owned();
        let (vehicles, want): (&[&str], Vec<Vec<String>>) = match title.as_str() {
            // The variable: every vehicle, by make and model.
            _ if q.at.contains("variable $vehicle") => (
                &[],
                rows(&[&[td], &["HYUNDAI IONIQ 5 (cccc3333)"], &[ta], &[tb]]),
            ),
            "State of charge" => (
                &[ta],
                [
                    (0, 8, "40.0"),
                    (0, 9, "40.0"),
                    (0, 10, "60.0"),
                    (0, 11, "80.0"),
                    (0, 12, "80.0"),
                    (0, 13, "70.0"),
                    (0, 20, "50.0"),
                    (0, 21, "65.0"),
                    (0, 22, "75.0"),
                    (1, 8, "70.0"),
                    (1, 18, "90.0"),
                ]
                .iter()
                .map(|(d, hr, v)| vec![secs(h(*d, *hr)), (*v).to_owned(), ta.to_owned()])
                .collect(),
            ),
            "Range" => (
                &[tb],
                [(0, 12, "250.0"), (1, 7, "250.0"), (1, 8, "340.0")]
                    .iter()
                    .map(|(d, hr, v)| vec![secs(h(*d, *hr)), (*v).to_owned(), tb.to_owned()])
                    .collect(),
            ),
            "Charging" if pruned => (&[ta], vec![]),
            "Charging" => (
                &[ta],
                [
                    (8, "0"),
                    (9, "1"),
                    (10, "1"),
                    (11, "0"),
                    (12, "0"),
                    (20, "1"),
                    (21, "1"),
                    (22, "0"),
                ]
                .iter()
                .map(|(hr, v)| vec![secs(h(0, *hr)), (*v).to_owned(), ta.to_owned()])
                .collect(),
            ),
            "Charging sessions" => (
                &all,
                vec![
                    vec![secs(h(1, 7)), tb.into(), secs(h(1, 8)), "55.0".into()],
                    vec![secs(h(0, 20)), ta.into(), secs(h(0, 22)), "50.0".into()],
                    vec![secs(h(0, 9)), ta.into(), secs(h(0, 11)), "40.0".into()],
                ],
            ),
            "Energy charged per day" => (
                &all,
                vec![
                    vec![s(h(0, 0)), "65.0".into(), ta.into()],
                    vec![s(h(1, 0)), "20.0".into(), ta.into()],
                    vec![s(h(1, 0)), "20.0".into(), tb.into()],
                ],
            ),
            "Distance per day" => (
                &all,
                vec![
                    vec![s(h(0, 0)), "30.0".into(), tb.into()],
                    vec![s(h(1, 0)), "50.0".into(), ta.into()],
                    vec![s(h(1, 0)), "30.0".into(), tb.into()],
                    vec![s(h(2, 0)), "80.0".into(), ta.into()],
                ],
            ),
            "Poll outcomes per day" => (
                &all,
                vec![
                    vec![s(h(0, 0)), "1".into(), "ok".into()],
                    vec![s(h(0, 0)), "1".into(), "vehicle_state".into()],
                    vec![s(h(1, 0)), "1".into(), "ok".into()],
                    vec![s(h(1, 0)), "1".into(), "rate_limited".into()],
                ],
            ),
            "Failed polls" => (
                &[ta],
                vec![
                    vec![
                        secs(h(1, 8)),
                        ta.into(),
                        "charge".into(),
                        "rate_limited".into(),
                        "429".into(),
                        "RATE_LIMIT".into(),
                        "VEHICLE".into(),
                    ],
                    vec![
                        secs(h(0, 9)),
                        ta.into(),
                        "battery".into(),
                        "vehicle_state".into(),
                        "409".into(),
                        "VEHICLE_STATE".into(),
                        "ASLEEP".into(),
                    ],
                ],
            ),
            other => panic!(
                "{}: a dashboard query without expected rows in this test: {other:?}",
                q.at
            ),
        };
        let sql = fill(&q.text, from, to, vehicles);
        assert_eq!(run(&db, &sql), want, "{}\n{sql}", q.at);
        // The vehicle with an apostrophe in its name, chosen alone.
        let only_d = run(&db, &fill(&q.text, from, to, &[td]));
        let want_d = match title.as_str() {
            "State of charge" => vec![vec![secs(h(2, 6)), "33.0".into(), td.into()]],
            "Range" => vec![vec![secs(h(2, 6)), "99.0".into(), td.into()]],
            _ if q.at.contains("variable $vehicle") => only_d.clone(),
            _ => vec![],
        };
        assert_eq!(only_d, want_d, "{}: $vehicle = {td:?}", q.at);
        // The time range applies: nothing from the week before.
        if !q.at.contains("variable") {
            let before = fill(&q.text, DAY1 - 7 * DAY, DAY1 - DAY, vehicles);
            assert!(
                run(&db, &before).is_empty(),
                "{}: the time range is ignored",
                q.at
            );
        }
    }
    assert!(seen >= 9, "the history dashboard's queries: {seen}");
}
