//! Shared harness for the tests that run the real `carpulse` binary: child processes whose
//! output is read line by line, free loopback ports, Prometheus text parsing. [`sim`] is the
//! in-process simulator harness of the tests that talk to the simulator over HTTP.

#![allow(dead_code)]

pub mod sim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_carpulse");

/// A child process with its stdout and stderr delivered as lines.
pub struct Proc {
    pub child: Child,
    pub stdout: mpsc::UnboundedReceiver<String>,
    pub stderr_log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub name: String,
    /// The task copying stderr into `stderr_log`: [`Proc::wait`] lets it reach the end of the
    /// stream, so `stderr()` after an exit holds everything the process wrote.
    stderr_done: Option<tokio::task::JoinHandle<()>>,
}

pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info,carpulse::daemon::poller=debug")
        .env_remove("CARPULSE_CONFIG")
        .env_remove("CARPULSE_CLIENT_SECRET")
        .env_remove("CARPULSE_API_CLIENT_SECRET")
        .env_remove("CARPULSE_IAM_URL")
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    Proc::from_child(name, child)
}

impl Proc {
    /// Wraps a child spawned with piped stdout and stderr: stdout lines arrive on `stdout`,
    /// stderr lines are echoed with the name and kept for [`Proc::stderr`].
    pub fn from_child(name: &str, mut child: Child) -> Proc {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let log2 = log.clone();
        let tag = name.to_string();
        let stderr_done = tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("[{tag}] {l}");
                log2.lock().unwrap().push(l);
            }
        });
        Proc {
            child,
            stdout: rx,
            stderr_log: log,
            name: name.to_string(),
            stderr_done: Some(stderr_done),
        }
    }
}

impl Proc {
    /// The next stdout line, or a panic naming the process after `within`.
    pub async fn line(&mut self, within: Duration) -> String {
        match tokio::time::timeout(within, self.stdout.recv()).await {
            Ok(Some(l)) => l,
            Ok(None) => panic!("{}: stdout closed", self.name),
            Err(_) => panic!("{}: no stdout line within {within:?}", self.name),
        }
    }

    /// Sends a signal (`-HUP`, `-KILL`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// Every stdout line not read yet, up to the end of the stream: lines may still be on
    /// their way from the reader task after the process has exited.
    pub async fn rest_of_stdout(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Ok(Some(l)) =
            tokio::time::timeout(Duration::from_secs(10), self.stdout.recv()).await
        {
            rest.push(l);
        }
        rest
    }

    pub fn stderr(&self) -> String {
        self.stderr_log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(&mut self, within: Duration) -> Option<i32> {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        self.wait(within).await
    }

    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let code = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(s)) => s.code(),
            Ok(Err(e)) => panic!("{}: wait: {e}", self.name),
            Err(_) => panic!("{}: did not exit within {within:?}", self.name),
        };
        if let Some(done) = self.stderr_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
        }
        code
    }
}

/// A loopback port that was free a moment ago, for a config that must name its port before the
/// process that binds it starts (the redirect URI, the metrics listener). Drawn outside the
/// kernel's ephemeral range (where outgoing connections take their local ports, so a port
/// freed by a port-0 bind can be taken by any HTTP client a moment later) and never handed out
/// twice by this process.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // 20000..32000 lies below Linux's default ephemeral range (32768..60999).
    let seed = std::process::id()
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0));
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((seed.wrapping_add(n.wrapping_mul(7919))) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// Waits for `cond` with a deadline (checking every 100 ms); panics naming `what`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `carpulse simulator` on port 0 and returns it with its base URL.
pub async fn start_simulator(extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "simulator",
        "--listen",
        "127.0.0.1:0",
        "--client-id",
        "test-client",
        "--client-secret",
        "test-secret",
    ];
    args.extend_from_slice(extra);
    let mut sim = spawn("simulator", &args, &[]);
    let first = sim.line(Duration::from_secs(30)).await;
    let base = first
        .strip_prefix("carpulse simulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first simulator line: {first}"))
        .trim()
        .to_string();
    (sim, base)
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
    pub metrics_port: u16,
    pub redirect_port: u16,
}

/// Writes a config pointing at the simulator at `base`.
pub fn write_config(base: &str, api: &str, schedule: &str) -> Setup {
    write_config_with(base, api, schedule, "")
}

/// [`write_config`] with more `[smartcar]` lines (e.g. API credentials).
pub fn write_config_with(base: &str, api: &str, schedule: &str, smartcar: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    let metrics_port = free_port();
    let redirect_port = free_port();
    let text = format!(
        r#"[smartcar]
client_id = "test-client"
client_secret = "test-secret"
redirect_uri = "http://127.0.0.1:{redirect_port}/exchange"
mode = "simulated"
api = "{api}"
connect_url = "{base}/oauth/authorize"
token_url = "{base}/oauth/token"
api_v2_url = "{base}/v2.0"
api_v3_url = "{base}/v3"
{smartcar}

[store]
path = "{db}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[schedule]
{schedule}

[poll]
concurrency = 4
timeout = "10s"
"#,
        db = db.display()
    );
    let config = dir.path().join("carpulse.toml");
    std::fs::write(&config, text).unwrap();
    Setup {
        dir,
        config,
        db,
        metrics_port,
        redirect_port,
    }
}

/// Runs `carpulse connect` and plays the browser: follows the printed URL (the simulator
/// auto-approves and redirects to the callback). Returns connect's stdout after the URL.
pub async fn connect(config: &Path, http: &reqwest::Client) -> Vec<String> {
    let cfg = config.to_str().unwrap();
    let mut c = spawn(
        "connect",
        &["--config", cfg, "connect", "--wait", "60s"],
        &[],
    );
    let url = c.line(Duration::from_secs(30)).await;
    assert!(
        url.contains("response_type=code"),
        "first stdout line is the Connect URL: {url}"
    );
    let page = http
        .get(&url)
        .send()
        .await
        .expect("following the Connect URL");
    assert_eq!(page.status(), 200, "the callback page after approval");
    let code = c.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "connect exit code; stderr:\n{}", c.stderr());
    c.rest_of_stdout().await
}

/// The value of one series in Prometheus text, matched on the given labels.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: HashMap<&str, &str> = l
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return value.parse().ok();
        }
    }
    None
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}
