//! Failures a restart cannot cure end with the exit code the unit lists in
//! `RestartPreventExitStatus=` and a message naming what is at fault; under journald every
//! line carries its priority, so `journalctl -p warning` shows the failure.

use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use crate::common::{free_port, spawn, BIN};

fn config(dir: &std::path::Path, store: &std::path::Path, listen: &str) -> std::path::PathBuf {
    let path = dir.join("carpulse.toml");
    std::fs::write(
        &path,
        format!(
            "[smartcar]\nclient_id = \"a\"\nclient_secret = \"s\"\n[store]\npath = \"{}\"\n\
             [metrics]\nlisten = \"{listen}\"\n",
            store.display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn a_port_in_use_exits_69_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(dir.path(), &dir.path().join("c.db"), &addr);
    let mut run = spawn("run", &["--config", cfg.to_str().unwrap(), "run"], &[]);
    assert_eq!(run.wait(Duration::from_secs(30)).await, Some(69));
    let needle = format!("metrics.listen: cannot listen on {addr}");
    let err = crate::stderr_with(&run, &needle).await;
    assert!(err.contains(&needle), "{err}");
}

#[tokio::test]
async fn an_unusable_store_exits_73_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that cannot be created: a regular file stands where it should be (root
    // cannot get past that either).
    std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
    let store = dir.path().join("not-a-dir/carpulse.db");
    let cfg = config(dir.path(), &store, &format!("127.0.0.1:{}", free_port()));
    let mut run = spawn("run", &["--config", cfg.to_str().unwrap(), "run"], &[]);
    assert_eq!(run.wait(Duration::from_secs(30)).await, Some(73));
    let needle = format!("opening the store {}", store.display());
    let err = crate::stderr_with(&run, &needle).await;
    assert!(err.contains(&needle), "{err}");
    assert_eq!(
        err.matches("opening the store").count(),
        1,
        "said once: {err}"
    );

    // A store written by a newer carpulse: refused, untouched, 73.
    let newer = dir.path().join("newer.db");
    let c = rusqlite::Connection::open(&newer).unwrap();
    c.pragma_update(None, "user_version", 999).unwrap();
    drop(c);
    let before = std::fs::read(&newer).unwrap();
    let cfg = config(dir.path(), &newer, &format!("127.0.0.1:{}", free_port()));
    let mut run = spawn("run", &["--config", cfg.to_str().unwrap(), "run"], &[]);
    assert_eq!(run.wait(Duration::from_secs(30)).await, Some(73));
    let err = crate::stderr_with(&run, "newer carpulse").await;
    assert!(err.contains("newer carpulse"), "{err}");
    assert_eq!(std::fs::read(&newer).unwrap(), before, "not modified");
}

#[tokio::test]
async fn under_journald_each_line_carries_its_priority() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(dir.path(), &dir.path().join("c.db"), &addr);
    // systemd connects stderr to journald and names the stream in $JOURNAL_STREAM
    // (device:inode); a file stands in for the stream here.
    let log_path = dir.path().join("journal");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let status = tokio::process::Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(69));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("created a new store")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<3>carpulse: metrics.listen: cannot listen on")),
        "{text}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with('<')),
        "every line has a priority: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no colours for the journal: {text}"
    );
}
