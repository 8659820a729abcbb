//! One integration-test binary for what issue 10 asks of carpulse's observability and its
//! read side, each module through real parts (the real binary, real SQLite files, the
//! simulator on loopback, the real Prometheus server and promtool where installed):
//!
//! - `ages`: `carpulse_reading_age_seconds` written at each scrape (it grows with the clock
//!   between two scrapes without a poll) and a scrape of named families (`?name[]=`).
//! - `cli`: read commands with `--db` and no credentials, a closed pipe, vehicle names,
//!   times, `status` on a running and a stopped daemon (the demo's store).
//! - `connect`: `connect --paste` and a taken callback port.
//! - `poll`: `carpulse poll` in-process and through a running daemon, and the poll at start
//!   of `carpulse run`.
//! - `sql`: every SQL query of the README and of the Grafana history dashboard against a
//!   seeded store, with the rows they must return.
//! - `dashboards`: the Grafana JSON and provisioning files as Grafana loads them.
//! - `rules`: promtool's checks and unit tests of the alert rules.
//! - `prometheus`: the real Prometheus server scrapes the real daemon (TLS and basic auth)
//!   and evaluates every PromQL expression of the dashboards and rules.

#[path = "../common/mod.rs"]
mod common;

mod ages;
mod cli;
mod connect;
mod dashboards;
mod poll;
mod prometheus;
mod rules;
mod seed;
mod sql;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root (where README.md and config/ are).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the binary to completion: (exit code, stdout, stderr). No config from the
/// environment leaks in.
pub fn carpulse(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("CARPULSE_CONFIG")
        .env_remove("CARPULSE_CLIENT_SECRET")
        .env_remove("CARPULSE_API_CLIENT_SECRET")
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running carpulse");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tool from PATH, or None (with a line saying the check is skipped) when absent. CI
/// installs them (.ci/run); a developer machine may not have them.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIPPED: {name} is not installed (CI installs Debian's prometheus package)");
        if std::env::var_os("CI").is_some() {
            panic!("{name} is required in CI");
        }
    }
    found
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing a test file");
    p
}
