//! `carpulse backup` while the real daemon writes, then a restore as the README describes it:
//! the copy passes integrity_check, holds every row committed before the backup began and no
//! token; the daemon restarted on the restored history goes on polling with its connections
//! (the token store was not in the backup, so no refresh token went back in time).

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{self, connect, spawn, start_simulator, write_config};

fn battery_keys(db: &std::path::Path) -> HashSet<(String, i64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = c
        .prepare("SELECT vehicle_id, recorded_at FROM battery_history")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<HashSet<_>, _>>()
        .unwrap();
    rows
}

#[tokio::test]
async fn a_backup_of_a_live_store_is_complete_and_checked_and_a_restore_runs() {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (_sim, base) = start_simulator(&[
        "--users",
        "2",
        "--vehicles-per-user",
        "2",
        "--token-lifetime",
        "20",
        "--report-interval",
        "1",
    ])
    .await;
    let setup = write_config(
        &base,
        "v3",
        "battery = \"* * * * * *\"\ninfo = \"*/5 * * * * *\"",
    );
    let cfg = setup.config.to_str().unwrap();
    connect(&setup.config, &http).await;
    connect(&setup.config, &http).await;
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    crate::wait_for(Duration::from_secs(60), "readings", || async {
        setup.db.exists() && crate::db_i64(&setup.db, "SELECT count(*) FROM battery_history") >= 8
    })
    .await;

    // What was committed before the backup began; the daemon keeps writing meanwhile.
    let before = battery_keys(&setup.db);
    let events_before = crate::db_i64(&setup.db, "SELECT count(*) FROM poll_events");
    let dest = setup.dir.path().join("backup.db");
    let mut backup = spawn(
        "backup",
        &["--config", cfg, "backup", dest.to_str().unwrap()],
        &[],
    );
    let code = backup.wait(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{}", backup.stderr());
    let out = crate::stdout_of(&mut backup).await;
    assert!(out.contains("PRAGMA integrity_check: ok"), "{out}");
    assert!(out.contains("readings"), "{out}");
    assert!(
        out.contains("carpulse reauth"),
        "says what a restore elsewhere needs: {out}"
    );

    // The copy on its own: checked, complete, one self-contained file, group-readable.
    {
        let c = rusqlite::Connection::open(&dest).unwrap();
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let journal: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "delete", "a backup is one file, safe to cp");
    }
    let copied = battery_keys(&dest);
    let missing: Vec<_> = before.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "rows committed before the backup are missing: {missing:?}"
    );
    assert!(crate::db_i64(&dest, "SELECT count(*) FROM poll_events") >= events_before);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // A second backup to the same file is refused, not overwritten.
    let mut again = spawn(
        "backup",
        &["--config", cfg, "backup", dest.to_str().unwrap()],
        &[],
    );
    assert_eq!(again.wait(Duration::from_secs(30)).await, Some(1));
    assert!(
        again.stderr().contains("never overwrites"),
        "{}",
        again.stderr()
    );

    // Let the pairs rotate after the backup, so a token in it would be dead by now.
    crate::wait_for(
        Duration::from_secs(60),
        "a refresh after the backup",
        || async {
            let stats = common::get_json(&http, &format!("{base}/_simulator/stats")).await;
            stats["refreshes_by_user"]
                .as_object()
                .is_some_and(|m| m.len() == 2 && m.values().all(|n| n.as_u64() >= Some(1)))
        },
    )
    .await;
    let tokens = crate::issued_tokens(&http, &base).await;
    assert_eq!(
        crate::token_in(&dest, &tokens),
        None,
        "a token is in the backup"
    );
    let code = daemon.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", daemon.stderr());

    // Restore as the README says: stop, replace the history (its -wal and -shm go), start.
    for f in crate::history_files(&setup.db) {
        let _ = std::fs::remove_file(f);
    }
    std::fs::copy(&dest, &setup.db).unwrap();
    let restored = crate::db_i64(&setup.db, "SELECT count(*) FROM battery_history");
    let mut daemon = spawn("run", &["--config", cfg, "run"], &[]);
    crate::wait_for(
        Duration::from_secs(60),
        "new readings on the restored store",
        || async {
            crate::db_i64(&setup.db, "SELECT count(*) FROM battery_history") > restored + 4
        },
    )
    .await;
    let stats = common::get_json(&http, &format!("{base}/_simulator/stats")).await;
    assert_eq!(stats["invalidated_refresh_token_uses"], 0, "{stats}");
    let code = daemon.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", daemon.stderr());
    assert_eq!(
        crate::db_i64(
            &setup.db,
            "SELECT count(*) FROM connections WHERE status <> 'active'"
        ),
        0,
        "no connection needs re-authorization after the restore"
    );
    assert!(!daemon.stderr().contains("needs re-authorization"));
}
