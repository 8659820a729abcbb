//! A store written by the last carpulse (schema 2, tokens in `connections`, 0600) meets this
//! one: `carpulse migrate --dry-run` says what would change and changes nothing; `carpulse
//! migrate` snapshots it first, moves the tokens to the token store and keeps the history, and
//! no byte of a token is left in the history file or its WAL.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::common::spawn;

const ACCESS: &str = "acc-3f9a2b8e-5c1d-4e7f-9a0b-1c2d3e4f5a6b";
const REFRESH: &str = "ref-7b6c5d4e-3f2a-4b1c-8d9e-0f1a2b3c4d5e";

/// A schema 2 store as carpulse 0.1 left it.
fn old_store(path: &Path) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/migrations");
    let c = rusqlite::Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    for f in ["0001_initial.sql", "0002_blocks_and_calls.sql"] {
        c.execute_batch(&std::fs::read_to_string(dir.join(f)).unwrap())
            .unwrap();
    }
    c.pragma_update(None, "user_version", 2).unwrap();
    c.execute_batch(&format!(
        "INSERT INTO connections VALUES (1, 'user-1', 'active', '{ACCESS}', '{REFRESH}',
             1800000000000, 1900000000000, 1, 1);
         INSERT INTO vehicles (id, vehicle_id, connection_id, added_at) VALUES (1, 'veh-1', 1, 1);
         INSERT INTO battery_readings VALUES (1, 1767225600000, 900, 5000, 300000),
                                             (1, 1767226500000, 800, 4990, 299000);
         INSERT INTO charge_readings VALUES (1, 1767225600000, 700, 1, 1);
         INSERT INTO odometer_readings VALUES (1, 1767225600000, 900, 12345000);
         INSERT INTO poll_event_log (vehicle, at, endpoint, outcome, http_status, calls)
             VALUES (1, 1767225601000, 'battery', 'ok', 200, 1),
                    (1, 1767225601000, 'charge', 'ok', 200, 0);"
    ))
    .unwrap();
    drop(c);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn holds(path: &Path, secret: &str) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
}

#[tokio::test]
async fn an_old_store_migrates_keeping_its_history_and_its_tokens_apart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    old_store(&db);
    assert!(holds(&db, REFRESH), "the old history holds the token");
    let cfg = dir.path().join("carpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smartcar]\nclient_id = \"a\"\nclient_secret = \"s\"\n[store]\npath = \"{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();

    let before = std::fs::read(&db).unwrap();
    let mut dry = spawn("migrate", &["--config", cfg, "migrate", "--dry-run"], &[]);
    assert_eq!(
        dry.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        dry.stderr()
    );
    let out = crate::stdout_of(&mut dry).await;
    for expected in [
        "schema version 2; this carpulse writes version 6",
        "3: a history a Grafana account may read",
        "4: a poll that stored readings is kept beside them",
        "5: poll outcomes per day, summarised",
        "snapshot of the store",
        "the OAuth tokens of 1 connection(s) move to",
        "carpulse.tokens.db",
        "dry run: nothing was changed",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "a dry run changes nothing"
    );
    assert!(!carpulse::store::token_store::path_for(&db).exists());

    let mut run = spawn("migrate", &["--config", cfg, "migrate"], &[]);
    assert_eq!(
        run.wait(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        run.stderr()
    );
    assert!(crate::stdout_of(&mut run)
        .await
        .contains("migrated to schema version 6"));

    // The snapshot: the old store as it was (tokens and all), private, and openable.
    let snapshot = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("carpulse.db.before-schema-6."))
        .expect("a snapshot before the migration");
    assert_eq!(
        std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(crate::db_i64(&snapshot, "PRAGMA user_version"), 2);
    assert_eq!(
        crate::db_i64(&snapshot, "SELECT count(*) FROM battery_readings"),
        2
    );

    // The history: same readings and events, no token anywhere in its files, group-readable.
    assert_eq!(crate::db_i64(&db, "PRAGMA user_version"), 6);
    assert_eq!(
        crate::db_i64(&db, "SELECT count(*) FROM battery_history"),
        2
    );
    assert_eq!(crate::db_i64(&db, "SELECT count(*) FROM charge_history"), 1);
    assert_eq!(
        crate::db_i64(&db, "SELECT count(*) FROM odometer_history"),
        1
    );
    assert_eq!(crate::db_i64(&db, "SELECT sum(calls) FROM poll_events"), 1);
    // Schema 5's daily view shows the same polls (nothing summarised yet: all live).
    assert_eq!(
        crate::db_i64(&db, "SELECT sum(polls) FROM poll_outcomes_daily"),
        crate::db_i64(&db, "SELECT count(*) FROM poll_events")
    );
    assert_eq!(
        crate::db_i64(&db, "SELECT sum(calls) FROM poll_outcomes_daily"),
        1
    );
    // Each kind keeps its own fetch time through schemas 3 and 4 (the charge came 200 ms
    // sooner than the battery at the same instant).
    assert_eq!(
        crate::db_i64(
            &db,
            "SELECT fetched_at FROM battery_history ORDER BY recorded_at LIMIT 1"
        ),
        1_767_225_600_900
    );
    assert_eq!(
        crate::db_i64(&db, "SELECT fetched_at FROM charge_history"),
        1_767_225_600_700
    );
    assert_eq!(
        crate::db_i64(&db, "SELECT refresh_expires_at FROM connections"),
        1_900_000_000_000
    );
    for f in crate::history_files(&db) {
        assert!(
            !holds(&f, REFRESH) && !holds(&f, ACCESS),
            "a token in {}",
            f.display()
        );
        if f.exists() {
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o640,
                "{}",
                f.display()
            );
        }
    }
    // The token store has the pair, and the daemon's view of the connection is whole.
    let tokens = carpulse::store::token_store::path_for(&db);
    assert_eq!(
        std::fs::metadata(&tokens).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let store = carpulse::store::Store::open(&db, None).unwrap();
    let loaded = store
        .call(|c| carpulse::store::queries::load_connections(c))
        .await
        .unwrap();
    store.close().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].tokens.refresh_token.expose(), REFRESH);
    assert_eq!(loaded[0].tokens.access_token.expose(), ACCESS);
    assert_eq!(loaded[0].status, carpulse::domain::ConnectionStatus::Active);

    // Migrating again: nothing to do.
    let mut again = spawn("migrate", &["--config", cfg, "migrate", "--dry-run"], &[]);
    assert_eq!(again.wait(Duration::from_secs(30)).await, Some(0));
    assert!(crate::stdout_of(&mut again)
        .await
        .contains("nothing to migrate"));
}

#[tokio::test]
async fn purging_a_vehicle_asks_first_and_removing_keeps_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("carpulse.db");
    old_store(&db);
    let cfg = dir.path().join("carpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smartcar]\nclient_id = \"a\"\nclient_secret = \"s\"\n[store]\npath = \"{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    // Without --purge: no longer polled, history kept.
    let mut remove = spawn(
        "remove",
        &["--config", cfg, "vehicles", "remove", "veh-1"],
        &[],
    );
    assert_eq!(
        remove.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        remove.stderr()
    );
    assert!(crate::stdout_of(&mut remove)
        .await
        .contains("its history stays"));
    assert_eq!(crate::db_i64(&db, "SELECT enabled FROM vehicles"), 0);
    assert_eq!(
        crate::db_i64(&db, "SELECT count(*) FROM battery_history"),
        2
    );
    // --purge without a terminal and without --yes: refused, nothing deleted.
    let mut purge = spawn(
        "purge",
        &["--config", cfg, "vehicles", "remove", "veh-1", "--purge"],
        &[],
    );
    assert_eq!(purge.wait(Duration::from_secs(30)).await, Some(1));
    assert!(purge.stderr().contains("pass --yes"), "{}", purge.stderr());
    assert!(
        purge.stderr().contains("2 battery"),
        "says what it would delete: {}",
        purge.stderr()
    );
    assert_eq!(
        crate::db_i64(&db, "SELECT count(*) FROM battery_history"),
        2
    );
    let mut purge = spawn(
        "purge",
        &[
            "--config", cfg, "vehicles", "remove", "veh-1", "--purge", "--yes",
        ],
        &[],
    );
    assert_eq!(
        purge.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        purge.stderr()
    );
    assert_eq!(crate::db_i64(&db, "SELECT count(*) FROM vehicles"), 0);
    assert_eq!(
        crate::db_i64(&db, "SELECT count(*) FROM battery_history"),
        0
    );
}
