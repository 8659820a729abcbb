//! The history as Grafana reads it: the real daemon runs as one account (as `carpulse` under
//! systemd), and a second, unprivileged account whose group is the daemon's reads the history
//! with the sqlite3 command-line shell while the daemon writes, and after it stopped. That
//! account cannot read the token store, and no token the simulator issued (it lists them) is
//! in the history, its WAL or its shared-memory file.
//!
//! Accounts are numeric ids without passwd entries (nothing is added to the system); switching
//! to them needs root, which CI has. Without root, or without sqlite3, the test says SKIPPED.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::common::{self, Proc};

/// The daemon's account and group, and the reader's account (in that group).
const DAEMON_UID: u32 = 61_417;
const GROUP: u32 = 61_417;
const READER_UID: u32 = 61_418;

/// `bin args...` as `uid`:`gid` (no supplementary groups), output as [`Proc`] lines.
fn spawn_as(name: &str, bin: &Path, args: &[&str], uid: u32, gid: u32) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .env_remove("CARPULSE_CONFIG")
        .env_remove("CARPULSE_CLIENT_SECRET")
        .env_remove("CARPULSE_API_CLIENT_SECRET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    Proc::from_child(name, child)
}

/// sqlite3 as the reader: (success, stdout, stderr).
async fn sqlite3_as_reader(db: &Path, sql: &str) -> (bool, String, String) {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .uid(READER_UID)
        .gid(GROUP)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running sqlite3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

async fn reader_count(db: &Path) -> Option<i64> {
    let (ok, out, _) = sqlite3_as_reader(db, "SELECT count(*) FROM battery_history").await;
    if ok {
        out.parse().ok()
    } else {
        None
    }
}

#[tokio::test]
async fn an_unprivileged_reader_in_the_group_reads_the_history_and_never_a_token() {
    if !crate::is_root() {
        eprintln!("SKIPPED: switching to other accounts needs root (CI runs as root)");
        return;
    }
    if std::process::Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: the sqlite3 command-line shell is not installed (.ci/run installs it)");
        return;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // 20 s tokens: the daemon rotates each pair every 10 s while the test runs.
    let (_sim, base) = common::start_simulator(&[
        "--users",
        "2",
        "--vehicles-per-user",
        "1",
        "--token-lifetime",
        "20",
        "--report-interval",
        "1",
    ])
    .await;

    // A layout like the package's: a state directory 0750 owned by the daemon's account.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(DAEMON_UID), Some(GROUP)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    let bin = dir.path().join("carpulse");
    std::fs::copy(common::BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = state.join("carpulse.db");
    let (metrics_port, redirect_port) = (common::free_port(), common::free_port());
    let config = dir.path().join("carpulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"[smartcar]
client_id = "test-client"
client_secret = "test-secret"
redirect_uri = "http://127.0.0.1:{redirect_port}/exchange"
mode = "simulated"
api = "v3"
connect_url = "{base}/oauth/authorize"
token_url = "{base}/oauth/token"
api_v2_url = "{base}/v2.0"
api_v3_url = "{base}/v3"

[store]
path = "{db}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[schedule]
battery = "*/2 * * * * *"
info = "*/7 * * * * *"

[poll]
timeout = "10s"
"#,
            db = db.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config.to_str().unwrap();

    // `sudo -u carpulse carpulse connect`, twice (two accounts).
    for _ in 0..2 {
        let mut connect = spawn_as(
            "connect",
            &bin,
            &["--config", cfg, "connect", "--wait", "60s"],
            DAEMON_UID,
            GROUP,
        );
        let url = connect.line(Duration::from_secs(30)).await;
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
        assert_eq!(
            connect.wait(Duration::from_secs(30)).await,
            Some(0),
            "{}",
            connect.stderr()
        );
    }

    let mut daemon = spawn_as("run", &bin, &["--config", cfg, "run"], DAEMON_UID, GROUP);

    // The reader reads while the daemon writes: the count goes up between its reads.
    crate::wait_for(
        Duration::from_secs(60),
        "the reader to see rows",
        || async { reader_count(&db).await.is_some_and(|n| n > 0) },
    )
    .await;
    let first = reader_count(&db).await.unwrap_or_default();
    crate::wait_for(
        Duration::from_secs(60),
        "the reader to see new rows",
        || async { reader_count(&db).await.is_some_and(|n| n > first) },
    )
    .await;
    let (ok, views, err) = sqlite3_as_reader(
        &db,
        "SELECT count(*) FROM battery_hourly; SELECT count(*) FROM poll_events; SELECT count(*) FROM connections",
    )
    .await;
    assert!(ok, "the rollup views and the rest read too: {err}");
    assert_eq!(views.lines().count(), 3, "{views}");

    // What the reader may not do: read the token store, or write the history.
    let tokens_db = carpulse::store::token_store::path_for(&db);
    let (ok, _, err) =
        sqlite3_as_reader(&tokens_db, "SELECT count(*) FROM connection_tokens").await;
    assert!(!ok, "the reader opened the token store");
    assert!(
        err.contains("unable to open") || err.contains("ermission") || err.contains("readonly"),
        "{err}"
    );
    let (ok, _, _) = sqlite3_as_reader(&db, "DELETE FROM vehicles").await;
    assert!(!ok, "the reader wrote to the history");

    // Let every connection rotate its pair at least twice, then stop the daemon.
    crate::wait_for(
        Duration::from_secs(60),
        "two refreshes per account",
        || async {
            let stats = common::get_json(&http, &format!("{base}/_simulator/stats")).await;
            stats["refreshes_by_user"]
                .as_object()
                .is_some_and(|m| m.len() == 2 && m.values().all(|n| n.as_u64() >= Some(2)))
        },
    )
    .await;
    let code = daemon.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", daemon.stderr());

    // The daemon stopped: the reader still opens the history (its -wal and -shm were kept).
    assert!(reader_count(&db).await.is_some_and(|n| n > first));

    // Files, owners and modes as the unit and tmpfiles promise.
    for file in crate::history_files(&db) {
        let m = std::fs::metadata(&file).unwrap();
        assert_eq!(m.mode() & 0o777, 0o640, "{}", file.display());
        assert_eq!(
            (m.uid(), m.gid()),
            (DAEMON_UID, GROUP),
            "{}",
            file.display()
        );
    }
    let m = std::fs::metadata(&tokens_db).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(m.uid(), DAEMON_UID);

    // Not one of the tokens the simulator issued is in the history, its WAL or its -shm; the
    // token store does hold the live ones (so the search does find tokens where they are).
    let tokens = crate::issued_tokens(&http, &base).await;
    assert!(tokens.len() >= 2 * 2 * 3, "issued: {}", tokens.len());
    for file in crate::history_files(&db) {
        assert_eq!(
            crate::token_in(&file, &tokens),
            None,
            "a token is in {}",
            file.display()
        );
    }
    let tokens_files = [
        tokens_db.clone(),
        std::path::PathBuf::from(format!("{}-wal", tokens_db.display())),
    ];
    assert!(
        tokens_files
            .iter()
            .any(|f| crate::token_in(f, &tokens).is_some()),
        "the token store holds the live pairs"
    );
    let log = daemon.stderr();
    assert!(
        crate::token_in(
            &{
                let p = dir.path().join("daemon.log");
                std::fs::write(&p, &log).unwrap();
                p
            },
            &tokens
        )
        .is_none(),
        "a token is in the daemon's log"
    );
}
