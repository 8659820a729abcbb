//! Issue 11, the store and process side, through the real binary and real SQLite files: what a
//! store that refuses writes, a second daemon, a long external lock, a flood of idle
//! connections and hostile text do to carpulse, and that each is harmless.
//!
//! How a store is made to refuse writes: the test opens the token store (or the history) with
//! rusqlite and holds `BEGIN IMMEDIATE`, exactly what a user's `sqlite3` or a backup tool does.
//! The daemon's writes then fail with SQLITE_BUSY after its busy timeout, through the same
//! code path as a full disk (SQLITE_FULL): the write is refused and must not be lost. A real
//! full disk needs root (a tiny tmpfs or loop device) and chmod does not stop root, which these
//! tests may run as; a lock works for any user, mid-run, and is released at a chosen moment.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// `/healthz`: status and body.
async fn healthz(http: &reqwest::Client, port: u16) -> Option<(u16, String)> {
    let r = http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Polls `/healthz` until `ok(status, body)` holds; returns that body.
async fn healthz_until(
    http: &reqwest::Client,
    port: u16,
    within: Duration,
    ok: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    loop {
        if let Some((status, body)) = healthz(http, port).await {
            if ok(status, &body) {
                return body;
            }
            last = Some((status, body));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz not as expected within {within:?}; last answer: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn metrics_text(http: &reqwest::Client, port: u16) -> String {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn stats(http: &reqwest::Client, base: &str) -> serde_json::Value {
    get_json(http, &format!("{base}/_simulator/stats")).await
}

fn stat(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

fn tokens_db(db: &Path) -> std::path::PathBuf {
    db.with_file_name("carpulse.tokens.db")
}

fn connection_status(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT status FROM connections", [], |r| r.get(0))
        .unwrap()
}

fn battery_rows(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM battery_history", [], |r| r.get(0))
        .unwrap()
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Holds SQLite's write lock on `path` (what `sqlite3 FILE 'BEGIN IMMEDIATE'` does) until
/// dropped.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(path: &Path) -> WriteLock {
        let c = rusqlite::Connection::open(path).unwrap();
        c.busy_timeout(Duration::from_secs(30)).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(c)
    }
    fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

/// Item 1: the token store refuses the rotated pair. `/healthz` answers 503 naming the
/// connection (never a token), the connection is not rotated again proactively, a SIGTERM
/// writes the pair to the 0600 fallback file, and the next start merges it: the connection
/// stays active and no invalidated refresh token is ever sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsaved_rotated_tokens_survive_a_refusing_store_and_a_stop() {
    let http = reqwest::Client::new();
    // 120 s tokens: the refresher rotates at half-life (60 s); a poll only rotates on its own
    // within 15 s of expiry. A strict 5 s grace window, as the server had.
    let (mut sim, base) = start_simulator(&[
        "--token-lifetime",
        "120",
        "--refresh-grace",
        "5",
        "--report-interval",
        "1",
    ])
    .await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"*/2 * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let (old_access, old_refresh): (String, String) = {
        let c = rusqlite::Connection::open(tokens_db(&setup.db)).unwrap();
        c.query_row(
            "SELECT access_token, refresh_token FROM connection_tokens",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for(
        "the daemon answers /healthz",
        Duration::from_secs(30),
        || async { healthz(&http, setup.metrics_port).await.is_some() },
    )
    .await;
    // The token store refuses every write from now on.
    let lock = WriteLock::take(&tokens_db(&setup.db));

    // The first rotation (at half-life) cannot be saved: /healthz (recomputed every 15 s)
    // names the connection.
    let body = healthz_until(
        &http,
        setup.metrics_port,
        Duration::from_secs(150),
        |status, b| status == 503 && b.contains("only in memory"),
    )
    .await;
    assert!(body.contains("connection 1 "), "{body}");
    for secret in [&old_access, &old_refresh, &"test-secret".to_owned()] {
        assert!(
            !body.contains(secret.as_str()),
            "a secret in /healthz: {body}"
        );
    }
    assert_eq!(stat(&stats(&http, &base).await, "refreshes"), 1);

    // No proactive rotation while the pair is unsaved: the refresher would rotate it again at
    // its half-life; wait past that (polls would only rotate within 15 s of expiry).
    let expiry = metric(
        &metrics_text(&http, setup.metrics_port).await,
        "carpulse_token_expiry_timestamp_seconds",
        &[("connection", "1")],
    )
    .expect("the token expiry gauge");
    wait_for(
        "the unsaved pair's half-life passes",
        Duration::from_secs(90),
        || async { now_s() > expiry - 55.0 },
    )
    .await;
    assert_eq!(
        stat(&stats(&http, &base).await, "refreshes"),
        1,
        "no rotation while the pair is unsaved"
    );

    // A stop while the store still refuses: the pair goes to the fallback file, exit 0.
    assert_eq!(daemon.terminate(Duration::from_secs(90)).await, Some(0));
    let fallback = setup.db.with_file_name("carpulse.unsaved-tokens.json");
    let meta = std::fs::metadata(&fallback).unwrap_or_else(|e| {
        panic!(
            "no fallback file {}: {e}\n{}",
            fallback.display(),
            daemon.stderr()
        )
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    lock.release();

    // The next start merges it: the rotated pair is used, never the invalidated one.
    let before = battery_rows(&setup.db);
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for(
        "the merged pair is refreshed (it is past its half-life)",
        Duration::from_secs(60),
        || async { stat(&stats(&http, &base).await, "refreshes") >= 2 },
    )
    .await;
    wait_for(
        "polls are stored again",
        Duration::from_secs(30),
        || async { battery_rows(&setup.db) > before },
    )
    .await;
    assert!(
        !fallback.exists(),
        "the fallback file is removed once merged"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(30)).await, Some(0));
    let s = stats(&http, &base).await;
    assert_eq!(stat(&s, "invalidated_refresh_token_uses"), 0, "{s}");
    assert_eq!(stat(&s, "grace_refresh_token_uses"), 0, "{s}");
    assert_eq!(connection_status(&setup.db), "active");
    assert!(
        daemon
            .stderr()
            .contains("merged the token pairs saved at the last stop"),
        "{}",
        daemon.stderr()
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Item 12: a second `carpulse run` on the same store refuses to start, exits 75 and names
/// the first one's pid; the first one keeps running, and readers still open the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_one_store_refuses_to_start() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let mut first = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for(
        "the first daemon answers",
        Duration::from_secs(30),
        || async { healthz(&http, setup.metrics_port).await.is_some() },
    )
    .await;
    let pid = first.child.id().expect("running");

    // The same store, another metrics port (so the listener is not what stops it).
    let other = setup.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        &format!("127.0.0.1:{}", setup.metrics_port),
        &format!("127.0.0.1:{}", free_port()),
    );
    std::fs::write(&other, text).unwrap();
    let mut second = spawn("run", &["--config", other.to_str().unwrap(), "run"], &[]);
    assert_eq!(second.wait(Duration::from_secs(30)).await, Some(75));
    let err = second.stderr();
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains(&setup.db.display().to_string()), "{err}");

    // The first one is unharmed, and a reader opens the history while it runs.
    let before = battery_rows(&setup.db);
    wait_for(
        "the first daemon still stores",
        Duration::from_secs(30),
        || async { battery_rows(&setup.db) > before },
    )
    .await;
    let out = std::process::Command::new(BIN)
        .args(["status", "--db", setup.db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(first.terminate(Duration::from_secs(30)).await, Some(0));

    // Once it has stopped, the lock is free: a daemon starts again.
    let mut again = spawn("run", &["--config", other.to_str().unwrap(), "run"], &[]);
    wait_for(
        "a daemon starts after the first stopped",
        Duration::from_secs(30),
        || async { again.stderr().contains("carpulse running") },
    )
    .await;
    assert_eq!(again.terminate(Duration::from_secs(30)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
