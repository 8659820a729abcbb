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

/// A token endpoint in front of the simulator's: it records every refresh token sent and the
/// pair answered, and holds refresh requests until the test releases them (a slow Smartcar).
struct SlowTokenEndpoint {
    url: String,
    sent: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    answered: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    arrived: std::sync::Arc<tokio::sync::Notify>,
    release: tokio::sync::watch::Sender<bool>,
}

async fn slow_token_endpoint(sim_base: &str) -> SlowTokenEndpoint {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let (release, released) = tokio::sync::watch::channel(false);
    let target = format!("{sim_base}/oauth/token");
    let (s, a, n) = (sent.clone(), answered.clone(), arrived.clone());
    let handler = move |headers: HeaderMap, body: Bytes| {
        let (s, a, n, target) = (s.clone(), a.clone(), n.clone(), target.clone());
        let mut released = released.clone();
        async move {
            let form: Vec<(String, String)> = url_form(&body);
            if let Some((_, token)) = form.iter().find(|(k, _)| k == "refresh_token") {
                s.lock().unwrap().push(token.clone());
                n.notify_one();
                let _ = released.wait_for(|go| *go).await;
            }
            let mut req = reqwest::Client::new().post(&target).body(body.to_vec());
            for name in ["authorization", "content-type", "accept"] {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v.as_bytes());
                }
            }
            let resp = req.send().await.expect("forwarding to the simulator");
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let text = resp.text().await.unwrap();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(r) = v["refresh_token"].as_str() {
                    a.lock().unwrap().push(r.to_owned());
                }
            }
            (status, [("content-type", "application/json")], text)
        }
    };
    let app = axum::Router::new().route("/oauth/token", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    SlowTokenEndpoint {
        url,
        sent,
        answered,
        arrived,
        release,
    }
}

/// `application/x-www-form-urlencoded` pairs (what a token request carries).
fn url_form(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Item 13: SIGTERM while a refresh is in flight (and polls wait for its token). The refresh
/// finishes and its pair is saved before the exit, and the same refresh token is never sent a
/// second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_keeps_it_single_flight_and_saved() {
    let http = reqwest::Client::new();
    // 40 s tokens: the refresher rotates at half-life (~20 s); a poll would rotate on its own
    // within 15 s of expiry (25 s), so polls are waiting on the held refresh by then.
    let (mut sim, base) = start_simulator(&[
        "--token-lifetime",
        "40",
        "--refresh-grace",
        "5",
        "--report-interval",
        "1",
    ])
    .await;
    let endpoint = slow_token_endpoint(&base).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace(&format!("{base}/oauth/token"), &endpoint.url);
    std::fs::write(&setup.config, text).unwrap();
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let issued_at = now_s();

    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    tokio::time::timeout(Duration::from_secs(60), endpoint.arrived.notified())
        .await
        .expect("a refresh reaches the token endpoint");
    // Past the point where polls want a new token themselves: they wait on the refresh.
    wait_for(
        "polls need the new token",
        Duration::from_secs(30),
        || async { now_s() > issued_at + 27.0 },
    )
    .await;
    daemon.signal("-TERM");
    // The daemon is stopping; only now does Smartcar answer the refresh.
    wait_for(
        "the daemon says it is stopping",
        Duration::from_secs(10),
        || async { daemon.stderr().contains("stopping") },
    )
    .await;
    endpoint.release.send(true).unwrap();
    assert_eq!(daemon.wait(Duration::from_secs(60)).await, Some(0));

    let sent = endpoint.sent.lock().unwrap().clone();
    let mut unique = sent.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        sent.len(),
        unique.len(),
        "a refresh token was sent twice: {} sends",
        sent.len()
    );
    let answered = endpoint.answered.lock().unwrap().clone();
    let stored: String = {
        let c = rusqlite::Connection::open(tokens_db(&setup.db)).unwrap();
        c.query_row("SELECT refresh_token FROM connection_tokens", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(
        Some(&stored),
        answered.last(),
        "the pair answered during the stop is the one stored"
    );
    let s = stats(&http, &base).await;
    assert_eq!(stat(&s, "grace_refresh_token_uses"), 0, "{s}");
    assert_eq!(stat(&s, "invalidated_refresh_token_uses"), 0, "{s}");
    assert_eq!(connection_status(&setup.db), "active");
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Items 10 and 11: a user's `sqlite3` holds the history's write lock for 25 s. The daemon
/// keeps the rows it could not write, `/healthz` says the store refuses writes, and once the
/// lock is gone every row is stored: nothing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_external_write_lock_loses_no_row() {
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for("first rows are stored", Duration::from_secs(30), || async {
        battery_rows(&setup.db) > 0
    })
    .await;

    let locked_at_ms = (now_s() * 1000.0) as i64;
    let lock = WriteLock::take(&setup.db);
    let body = healthz_until(
        &http,
        setup.metrics_port,
        Duration::from_secs(60),
        |s, b| s == 503 && b.contains("refuses writes"),
    )
    .await;
    assert!(body.contains("kept in memory"), "{body}");
    wait_for(
        "the lock has been held 25 s",
        Duration::from_secs(60),
        || async { (now_s() * 1000.0) as i64 - locked_at_ms > 25_000 },
    )
    .await;
    let released_at_ms = (now_s() * 1000.0) as i64;
    lock.release();

    let fetched_while_locked = || {
        let c = rusqlite::Connection::open(&setup.db).unwrap();
        c.query_row(
            "SELECT count(*) FROM battery_history WHERE fetched_at BETWEEN ?1 AND ?2",
            [locked_at_ms + 6_000, released_at_ms],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
    };
    wait_for(
        "readings fetched while the lock was held are stored",
        Duration::from_secs(30),
        || async { fetched_while_locked() >= 10 },
    )
    .await;
    healthz_until(
        &http,
        setup.metrics_port,
        Duration::from_secs(40),
        |s, _| s == 200,
    )
    .await;
    let m = metrics_text(&http, setup.metrics_port).await;
    for table in ["battery", "charge", "odometer", "poll_events", "vehicles"] {
        assert_eq!(
            metric(&m, "carpulse_rows_dropped_total", &[("table", table)]),
            Some(0.0),
            "{table}"
        );
    }
    assert_eq!(daemon.terminate(Duration::from_secs(30)).await, Some(0));
    assert!(
        daemon.stderr().contains("the store accepts writes again"),
        "{}",
        daemon.stderr()
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// `carpulse run` with the soft descriptor limit of a default service (1024), as the issue's
/// run had; this test process itself may hold more.
fn spawn_with_nofile_1024(args: &[&str]) -> Proc {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("RUST_LOG", "info")
        .env_remove("CARPULSE_CONFIG");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    Proc::from_child("run", cmd.spawn().expect("spawning carpulse run"))
}

/// Raises this process's soft descriptor limit so it can hold the flood itself.
fn raise_own_nofile(to: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < to {
            lim.rlim_cur = to.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// Item 4: 1,100 idle connections to the metrics port of a daemon limited to 1,024
/// descriptors. `/healthz` still answers and polls are still stored; the listener never holds
/// more than its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_starves_nothing() {
    raise_own_nofile(4096);
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let mut daemon = spawn_with_nofile_1024(&["--config", cfg, "run"]);
    wait_for("the daemon answers", Duration::from_secs(30), || async {
        healthz(&http, setup.metrics_port).await.is_some()
    })
    .await;

    // The flood: connections that never send a byte, held open for the rest of the test.
    let addr = format!("127.0.0.1:{}", setup.metrics_port);
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            Ok(Ok(s)) => idle.push(s),
            Ok(Err(e)) => panic!("connecting #{}: {e}", idle.len()),
            Err(_) => break, // the backlog is full: that is a flood too
        }
    }
    assert!(idle.len() >= 1000, "opened {} connections", idle.len());
    let flood_started = std::time::Instant::now();

    // Health still answers (a fresh client: no pooled connection), and polls still store.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    healthz_until(
        &fresh,
        setup.metrics_port,
        Duration::from_secs(60),
        |s, _| s == 200,
    )
    .await;
    let before = battery_rows(&setup.db);
    wait_for(
        "polls are stored during the flood",
        Duration::from_secs(30),
        || async { battery_rows(&setup.db) > before },
    )
    .await;
    let m = metrics_text(&fresh, setup.metrics_port).await;
    let fds = metric(&m, "process_open_fds", &[]).expect("process_open_fds");
    eprintln!(
        "flood: {} idle connections held, /healthz 200 after {:?}, daemon holds {fds} descriptors",
        idle.len(),
        flood_started.elapsed()
    );
    assert!(fds < 300.0, "the daemon holds {fds} descriptors");
    assert!(
        !daemon.stderr().contains("Too many open files"),
        "{}",
        daemon.stderr()
    );
    drop(idle);
    assert_eq!(daemon.terminate(Duration::from_secs(30)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Item 4: a client that sends its headers a byte at a time, and one that keeps a connection
/// idle after a request, are both cut off after the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_keep_alives_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sim, base) = start_simulator(&[]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"0 0 * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    let http = reqwest::Client::new();
    wait_for("the daemon answers", Duration::from_secs(30), || async {
        healthz(&http, setup.metrics_port).await.is_some()
    })
    .await;
    let addr = format!("127.0.0.1:{}", setup.metrics_port);

    // Slow headers: a byte a second never completes a request; the server hangs up.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for b in request.iter() {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => break, // an answer (a 408 or similar) before the end: also cut off
            Err(_) => {}
        }
    }
    assert!(closed, "a byte-a-second request was never cut off");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(30), "cut off after {waited:?}");

    // Idle keep-alive: one request, then silence; the server closes the connection.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(40), async {
        let mut buf = [0u8; 1024];
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an idle keep-alive connection stayed open");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 "),
        "answered first"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(30)).await, Some(0));
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Lower items: store files made 0644 are corrected at the next open (tokens 0600, history
/// 0640); `vehicles list`, `status` and `history` never print a terminal escape that came
/// from an answer; every read command refuses a store of a newer schema (exit 73).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_escapes_and_newer_schemas() {
    use std::os::unix::fs::PermissionsExt;
    let http = reqwest::Client::new();
    let (mut sim, base) = start_simulator(&["--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;

    // Loosened by hand (or an old umask, or a cp): corrected at the next open.
    let tokens = tokens_db(&setup.db);
    for f in [&setup.db, &tokens] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // Make and model as a hostile answer could carry them.
    {
        let c = rusqlite::Connection::open(&setup.db).unwrap();
        c.execute(
            "UPDATE vehicles SET make = ?1, model = ?2",
            [
                "\u{1b}]0;pwned\u{7}TESLA\u{1b}[2J",
                "Model\u{9b}31m 3\r\u{1b}]8;;http://x\u{1b}\\",
            ],
        )
        .unwrap();
    }
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for("readings are stored", Duration::from_secs(30), || async {
        battery_rows(&setup.db) > 0
    })
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(30)).await, Some(0));
    for (f, want) in [(&setup.db, 0o640), (&tokens, 0o600)] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", f.display());
    }

    let db = setup.db.to_str().unwrap();
    let read = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env_remove("CARPULSE_CONFIG")
            .output()
            .unwrap()
    };
    for args in [
        vec!["vehicles", "list", "--db", db],
        vec!["status", "--db", db],
        vec!["history", "--db", db, "--limit", "5"],
        vec!["history", "--db", db, "--limit", "5", "--format", "csv"],
    ] {
        let out = read(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{args:?} printed a control character: {text:?}"
        );
        if args[0] != "history" || args.len() == 5 {
            assert!(text.contains("TESLA"), "{args:?}: {text}");
        }
    }

    // A store written by a newer carpulse: every read command refuses it, untouched.
    {
        let c = rusqlite::Connection::open(&setup.db).unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
    }
    let before = std::fs::read(&setup.db).unwrap();
    for args in [
        vec!["vehicles", "list", "--db", db],
        vec!["status", "--db", db],
        vec!["history", "--db", db],
        vec!["plan", "--db", db],
    ] {
        let out = read(&args);
        assert_eq!(out.status.code(), Some(73), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("newer carpulse"), "{args:?}: {err}");
    }
    assert!(
        std::fs::read(&setup.db).unwrap() == before,
        "the newer store was modified"
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}

/// Item 1, the last resort: when neither the store nor the fallback file takes a rotated pair
/// at shutdown, `carpulse run` exits non-zero and says so (systemd and the operator see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_saved_nowhere_is_a_failed_exit() {
    let http = reqwest::Client::new();
    // 20 s tokens: rotated within seconds of the start.
    let (mut sim, base) =
        start_simulator(&["--token-lifetime", "20", "--report-interval", "1"]).await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"*/2 * * * * *\"\ninfo = \"0 0 4 * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    wait_for("the daemon answers", Duration::from_secs(30), || async {
        healthz(&http, setup.metrics_port).await.is_some()
    })
    .await;
    // The fallback file cannot be written: a non-empty directory stands where it goes (root
    // cannot rename a file over that either). Made after the start, whose merge would refuse it.
    let fallback = setup.db.with_file_name("carpulse.unsaved-tokens.json");
    std::fs::create_dir_all(fallback.join("occupied")).unwrap();
    let lock = WriteLock::take(&tokens_db(&setup.db));
    wait_for(
        "a rotated pair is only in memory",
        Duration::from_secs(90),
        || async {
            daemon
                .stderr()
                .contains("the rotated token pair is only in memory")
        },
    )
    .await;
    let code = daemon.terminate(Duration::from_secs(90)).await;
    lock.release();
    assert_ne!(code, Some(0), "{}", daemon.stderr());
    assert!(
        daemon
            .stderr()
            .contains("could be saved neither in the store nor in the fallback file"),
        "{}",
        daemon.stderr()
    );
    let _ = sim.terminate(Duration::from_secs(10)).await;
}
