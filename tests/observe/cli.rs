//! The read commands (`history`, `status`, `vehicles list`, `plan`) through the real binary:
//! `--db` alone is enough (no config, no Smartcar credentials), a closed pipe ends them
//! quietly, vehicles are named by make, model or id prefix, times are local with their zone for
//! people and ISO-8601 UTC plus unix ms for programs, and `status` says whether the daemon runs.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::seed::{self, A, B, C, DAY1, HOUR};
use super::{carpulse, write};

async fn seeded() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    seed::seed(&db, carpulse::domain::now_ms()).await;
    let db = db.display().to_string();
    (dir, db)
}

fn ok(args: &[&str], envs: &[(&str, &str)]) -> String {
    let (code, out, err) = carpulse(args, envs);
    assert_eq!(
        code,
        Some(0),
        "carpulse {args:?}: stderr:\n{err}\nstdout:\n{out}"
    );
    out
}

#[tokio::test]
async fn read_commands_need_only_the_store() {
    let (dir, db) = seeded().await;
    let since = "2026-03-01T00:00:00Z";
    let table = ok(
        &[
            "history",
            "--db",
            &db,
            "--since",
            since,
            "--vehicle",
            "model 3",
        ],
        &[],
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 11, "A's 11 battery readings:\n{table}");
    assert!(
        lines[1].starts_with("TESLA Model 3 2021 (aaaa1111)  "),
        "{table}"
    );
    assert!(
        lines[1].ends_with("90.0         360.0"),
        "newest first:\n{table}"
    );

    let status = ok(&["status", "--db", &db], &[]);
    assert!(
        status.starts_with(&format!("store: {db} (last poll recorded ")),
        "{status}"
    );
    assert!(status.contains("\ndaemon: "), "{status}");
    assert!(
        status.contains("connections: 1 (v3 API Authentication"),
        "with no config, the store says how it was connected:\n{status}"
    );
    assert!(
        status.contains("VOLKSWAGEN ID.4 2023 (bbbb2222)"),
        "{status}"
    );
    assert!(
        status.contains("      charge       rate_limited     "),
        "each endpoint's last outcome:\n{status}"
    );
    assert!(status.contains("(RATE_LIMIT:VEHICLE)"), "{status}");

    let list = ok(&["vehicles", "list", "--db", &db], &[]);
    assert!(
        list.contains(A) && list.contains("HYUNDAI IONIQ 5 2023"),
        "{list}"
    );
    let plan = ok(&["plan", "--db", &db], &[]);
    assert!(
        plan.starts_with("calls per vehicle in a 30-day month"),
        "{plan}"
    );
    // With a store, plan also says whether its vehicles (the seed's four enabled ones) fit the pace.
    assert!(
        plan.contains("pace for 4 enabled vehicle(s), poll.max_in_flight = 1024")
            && plan
                .contains("  battery  every 15.0 min  ~1 in flight keeps within its 60 s spread"),
        "{plan}"
    );

    // A config that names the store and holds no credentials (or names a secret file this
    // user cannot read) serves the read commands as well.
    let cfg = write(
        dir.path(),
        "read.toml",
        &format!(
            "[smartcar]\nclient_id = \"x\"\nclient_secret_file = \"/nonexistent/secret\"\n\n[store]\npath = \"{db}\"\n"
        ),
    );
    let cfg = cfg.display().to_string();
    let csv = ok(
        &[
            "--config", &cfg, "history", "--since", since, "--kind", "odometer", "--format", "csv",
        ],
        &[],
    );
    assert_eq!(csv.lines().count(), 1 + 6, "{csv}");
    // What talks to Smartcar still needs the secret.
    let (code, _, err) = carpulse(&["--config", &cfg, "doctor", "--yes"], &[]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("client_secret_file"), "{err}");

    // No store there: a clear error, and nothing created.
    let missing = dir.path().join("none.db").display().to_string();
    let (code, _, err) = carpulse(&["status", "--db", &missing], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no store at") && err.contains("--db"), "{err}");
    assert!(!std::path::Path::new(&missing).exists());
}

#[tokio::test]
async fn an_unknown_vehicle_is_an_error_that_lists_the_known_ones() {
    let (_dir, db) = seeded().await;
    let since = "2026-03-01T00:00:00Z";
    let (code, out, err) = carpulse(&["history", "--db", &db, "--vehicle", "typo"], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(err.contains("no vehicle matches \"typo\""), "{err}");
    for line in [
        format!("{A}  TESLA Model 3 2021"),
        format!("{B}  VOLKSWAGEN ID.4 2023"),
        format!("{C}  HYUNDAI IONIQ 5 2023"),
    ] {
        assert!(err.contains(&line), "{line} missing:\n{err}");
    }
    // An id prefix, a make, a model: each picks one.
    for q in ["bbbb", "volkswagen", "ID.4", B] {
        let csv = ok(
            &[
                "history",
                "--db",
                &db,
                "--since",
                since,
                "--vehicle",
                q,
                "--format",
                "csv",
            ],
            &[],
        );
        assert!(csv.lines().skip(1).all(|l| l.starts_with(B)), "{q}: {csv}");
        assert_eq!(csv.lines().count(), 1 + 3, "{q}: {csv}");
    }
}

#[tokio::test]
async fn times_are_local_with_their_zone_for_people_and_utc_for_programs() {
    let (_dir, db) = seeded().await;
    let args = |format: &'static str| {
        vec![
            "history",
            "--db",
            &db,
            "--vehicle",
            "aaaa1111",
            "--since",
            "2026-03-01T08:00:00Z",
            "--until",
            "2026-03-01T08:00:00Z",
            "--format",
            format,
        ]
    };
    // TZ as a POSIX rule: two hours east of UTC, whatever zone files the machine has.
    let tz = [("TZ", "XYZ-2")];
    let table = ok(&args("table"), &tz);
    assert!(
        table.contains("TESLA Model 3 2021 (aaaa1111)  2026-03-01 10:00:00 +02:00  2026-03-01 10:00:01 +02:00  40.0"),
        "{table}"
    );
    let csv = ok(&args("csv"), &tz);
    assert_eq!(
        csv,
        format!(
            "vehicle_id,recorded_at,fetched_at,soc_percent,range_km,vehicle,recorded_at_utc,fetched_at_utc\n\
             {A},{t},{f},40.0,160.0,TESLA Model 3 2021,2026-03-01T08:00:00.000Z,2026-03-01T08:00:01.500Z\n",
            t = DAY1 + 8 * HOUR,
            f = DAY1 + 8 * HOUR + 1500
        )
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&args("json"), &tz)).unwrap();
    assert_eq!(json[0]["recorded_at"], DAY1 + 8 * HOUR);
    assert_eq!(json[0]["recorded_at_utc"], "2026-03-01T08:00:00.000Z");
    assert_eq!(json[0]["vehicle"], "TESLA Model 3 2021");
}

#[tokio::test]
async fn a_closed_pipe_ends_the_read_commands_quietly() {
    let (_dir, db) = seeded().await;
    let commands: [&[&str]; 4] = [
        &["status", "--db", &db],
        &["plan", "--db", &db],
        &["history", "--db", &db, "--since", "2026-03-01T00:00:00Z"],
        &["vehicles", "list", "--db", &db],
    ];
    for args in commands {
        // The reading end is closed before the command writes anything: its first write
        // fails with EPIPE.
        let mut child = std::process::Command::new(crate::common::BIN)
            .args(args)
            .env_remove("CARPULSE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: quiet, not:\n{err}");
    }
    // As a user types it.
    for cmd in ["status", "plan"] {
        let out = std::process::Command::new("bash")
            .args([
                "-c",
                &format!("set -o pipefail; \"$0\" {cmd} --db \"$1\" | head -1"),
            ])
            .args([crate::common::BIN, &db])
            .env_remove("CARPULSE_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd} | head -1: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    }
}

/// `carpulse demo` on its own store; `status` and `history` read that store with `--db`
/// (and a credential-free config naming the demo's metrics address) while the demo runs,
/// and `status` sees it stop.
#[tokio::test]
async fn the_demo_store_is_read_with_db_and_status_sees_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db").display().to_string();
    let mut demo = crate::common::spawn(
        "demo",
        &[
            "demo",
            "--db",
            &db,
            "--metrics",
            "127.0.0.1:0",
            "--battery-cron",
            "*/2 * * * * *",
        ],
        &[],
    );
    let mut metrics = None;
    loop {
        let line = demo.line(Duration::from_secs(60)).await;
        if let Some(url) = line.strip_prefix("metrics: http://") {
            metrics = url.strip_suffix("/metrics").map(str::to_owned);
        }
        if line.starts_with("stop with Ctrl-C") {
            break;
        }
    }
    let metrics = metrics.expect("the demo prints its metrics address");
    // Readings arrive within a few battery ticks.
    let deadline = Instant::now() + Duration::from_secs(60);
    let csv = loop {
        let csv = ok(&["history", "--db", &db, "--format", "csv"], &[]);
        if csv.lines().count() > 1 {
            break csv;
        }
        assert!(Instant::now() < deadline, "no readings in the demo store");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(csv.contains(",TESLA Model 3 2024,"), "{csv}");
    let cfg = write(
        dir.path(),
        "status.toml",
        &format!("[store]\npath = \"{db}\"\n\n[metrics]\nlisten = \"{metrics}\"\n"),
    )
    .display()
    .to_string();
    let status = ok(&["--config", &cfg, "status"], &[]);
    assert!(
        status.contains(&format!(
            "daemon: running: carpulse {} answers on http://{metrics} (metrics.listen)",
            env!("CARGO_PKG_VERSION")
        )),
        "{status}"
    );
    assert!(status.contains("      battery      ok "), "{status}");
    assert_eq!(demo.terminate(Duration::from_secs(30)).await, Some(0));
    let status = ok(&["--config", &cfg, "status"], &[]);
    assert!(
        status.contains(&format!(
            "daemon: not running (nothing listens on {metrics}"
        )),
        "{status}"
    );
}

/// A web config carpulse cannot use stops `run` with the config exit code, before anything is
/// opened or bound, and names the file and key without quoting secrets.
#[test]
fn a_broken_web_config_stops_run_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let web = write(
        dir.path(),
        "web.yml",
        "basic_auth_users:\n  alice: hunter2\n",
    );
    let db = dir.path().join("c.db");
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[smartcar]\nclient_id = \"x\"\nclient_secret = \"y\"\n\n[store]\npath = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\nweb_config_file = \"{}\"\n",
            db.display(),
            web.display()
        ),
    );
    let (code, _, err) = carpulse(&["--config", &cfg.display().to_string(), "run"], &[]);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("metrics.web_config_file") && err.contains("alice: not a bcrypt hash"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!db.exists(), "nothing opened");
}
