-- carpulse schema 3: a history a Grafana account may read, shaped to last for years.
--
-- * No token in this file. The OAuth pairs live in the token store (`<store>.tokens.db` beside
--   it, mode 0600), which the code filled and committed before this migration ran
--   (store/token_store.rs); here `connections` only loses its two token columns. The code
--   VACUUMs the file afterwards, so no page or WAL frame keeps the old bytes.
-- * readings: one row per (vehicle, recorded_at) holding whatever was read at that instant
--   (battery, charge, odometer; a v3 listing carries all three). A kind's fetch lag is kept in
--   its own column only where it differs from the row's. About 35 bytes for a poll's three
--   readings, where three tables took about 70.
-- * poll_log: one row per poll and outcome; `endpoints` is a bitmask of poll_endpoints.bit,
--   `calls` the poll's billed calls. The poll_events view shows one row per endpoint as before.
-- * Rollups that outlive the raw rows retention prunes: battery_rollup_hourly,
--   odometer_rollup_daily, charge_session_log. retention_cutoffs says where a vehicle's raw
--   readings begin; the rollup views read summaries below it and raw readings above it, so
--   every reading counts exactly once.

ALTER TABLE connections DROP COLUMN access_token;
ALTER TABLE connections DROP COLUMN refresh_token;

DROP VIEW battery_history;
DROP VIEW charge_history;
DROP VIEW odometer_history;
DROP VIEW poll_events;
DROP TRIGGER vehicles_after_delete;
DROP TRIGGER vehicles_after_delete_blocks;

CREATE TABLE readings (
    vehicle         INTEGER NOT NULL,
    recorded_at     INTEGER NOT NULL,
    fetch_lag_ms    INTEGER NOT NULL,
    soc_cp          INTEGER,
    range_m         INTEGER,
    battery_lag_ms  INTEGER,
    plugged_in      INTEGER,
    charge_state    INTEGER,
    charge_lag_ms   INTEGER,
    odometer_m      INTEGER,
    odometer_lag_ms INTEGER,
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m)
SELECT vehicle, recorded_at, fetch_lag_ms, soc_cp, range_m FROM battery_readings;

INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, plugged_in, charge_state)
SELECT vehicle, recorded_at, fetch_lag_ms, plugged_in, state FROM charge_readings WHERE true
ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
    plugged_in = excluded.plugged_in,
    charge_state = excluded.charge_state,
    charge_lag_ms = nullif(excluded.fetch_lag_ms, fetch_lag_ms);

INSERT INTO readings (vehicle, recorded_at, fetch_lag_ms, odometer_m)
SELECT vehicle, recorded_at, fetch_lag_ms, odometer_m FROM odometer_readings WHERE true
ON CONFLICT (vehicle, recorded_at) DO UPDATE SET
    odometer_m = excluded.odometer_m,
    odometer_lag_ms = nullif(excluded.fetch_lag_ms, fetch_lag_ms);

DROP TABLE battery_readings;
DROP TABLE charge_readings;
DROP TABLE odometer_readings;

-- Endpoint names and their bits; the writer adds a name it meets for the first time.
CREATE TABLE poll_endpoints (
    bit  INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
);
INSERT INTO poll_endpoints (bit, name) VALUES
    (1, 'battery'), (2, 'charge'), (4, 'info'), (8, 'vin'), (16, 'odometer'), (32, 'capabilities');
CREATE TEMP TABLE legacy_endpoints AS
SELECT DISTINCT endpoint AS name FROM poll_event_log
WHERE endpoint NOT IN (SELECT name FROM poll_endpoints);
INSERT INTO poll_endpoints (bit, name)
SELECT 32 << row_number() OVER (ORDER BY name), name FROM legacy_endpoints;
DROP TABLE legacy_endpoints;

CREATE TABLE poll_log (
    vehicle     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    endpoints   INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    http_status INTEGER,
    error_type  TEXT,
    error_code  TEXT,
    calls       INTEGER,
    PRIMARY KEY (vehicle, at, endpoints)
) WITHOUT ROWID;

INSERT OR IGNORE INTO poll_log
    (vehicle, at, endpoints, outcome, http_status, error_type, error_code, calls)
SELECT e.vehicle, e.at, sum(DISTINCT p.bit), e.outcome, e.http_status, e.error_type,
       e.error_code, sum(e.calls)
FROM poll_event_log e JOIN poll_endpoints p ON p.name = e.endpoint
GROUP BY e.vehicle, e.at, e.outcome, e.http_status, e.error_type, e.error_code;

DROP TABLE poll_event_log;

-- Where each vehicle's raw readings begin (absent: nothing pruned yet).
CREATE TABLE retention_cutoffs (
    vehicle         INTEGER PRIMARY KEY,
    readings_before INTEGER NOT NULL
);

-- Summaries of pruned battery readings, per UTC hour: sums, so that averages stay exact.
CREATE TABLE battery_rollup_hourly (
    vehicle        INTEGER NOT NULL,
    hour           INTEGER NOT NULL,
    readings       INTEGER NOT NULL,
    soc_sum_cp     INTEGER NOT NULL,
    soc_min_cp     INTEGER NOT NULL,
    soc_max_cp     INTEGER NOT NULL,
    range_readings INTEGER NOT NULL,
    range_sum_m    INTEGER,
    range_min_m    INTEGER,
    range_max_m    INTEGER,
    PRIMARY KEY (vehicle, hour)
) WITHOUT ROWID;

CREATE TABLE odometer_rollup_daily (
    vehicle        INTEGER NOT NULL,
    day            INTEGER NOT NULL,
    readings       INTEGER NOT NULL,
    odometer_min_m INTEGER NOT NULL,
    odometer_max_m INTEGER NOT NULL,
    PRIMARY KEY (vehicle, day)
) WITHOUT ROWID;

-- end_state: the charge state code of the reading that ended the session (NULL: ongoing).
CREATE TABLE charge_session_log (
    vehicle      INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    readings     INTEGER NOT NULL,
    soc_start_cp INTEGER,
    soc_end_cp   INTEGER,
    end_state    INTEGER,
    PRIMARY KEY (vehicle, started_at)
) WITHOUT ROWID;

CREATE TRIGGER vehicles_after_delete AFTER DELETE ON vehicles
BEGIN
    DELETE FROM readings              WHERE vehicle = old.id;
    DELETE FROM poll_log              WHERE vehicle = old.id;
    DELETE FROM vehicle_blocks        WHERE vehicle = old.id;
    DELETE FROM retention_cutoffs     WHERE vehicle = old.id;
    DELETE FROM battery_rollup_hourly WHERE vehicle = old.id;
    DELETE FROM odometer_rollup_daily WHERE vehicle = old.id;
    DELETE FROM charge_session_log    WHERE vehicle = old.id;
    UPDATE store_state SET vehicle_epoch = vehicle_epoch + 1 WHERE id = 1;
END;

-- The user-facing views (DESIGN §3), unchanged in name and columns.
CREATE VIEW battery_history AS
SELECT v.vehicle_id                                             AS vehicle_id,
       r.recorded_at                                            AS recorded_at,
       r.recorded_at + coalesce(r.battery_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.soc_cp / 100.0                                         AS soc_percent,
       r.range_m / 1000.0                                       AS range_km,
       r.recorded_at / 1000.0                                   AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
WHERE r.soc_cp IS NOT NULL;

CREATE VIEW charge_history AS
SELECT v.vehicle_id                                            AS vehicle_id,
       r.recorded_at                                           AS recorded_at,
       r.recorded_at + coalesce(r.charge_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.plugged_in                                            AS plugged_in,
       CASE r.charge_state
           WHEN 0 THEN 'NOT_CHARGING'
           WHEN 1 THEN 'CHARGING'
           WHEN 2 THEN 'FULLY_CHARGED'
       END                                                     AS state,
       r.recorded_at / 1000.0                                  AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
WHERE r.charge_state IS NOT NULL;

CREATE VIEW odometer_history AS
SELECT v.vehicle_id                                              AS vehicle_id,
       r.recorded_at                                             AS recorded_at,
       r.recorded_at + coalesce(r.odometer_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.odometer_m / 1000.0                                     AS odometer_km,
       r.recorded_at / 1000.0                                    AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
WHERE r.odometer_m IS NOT NULL;

-- One row per endpoint of each poll; the poll's billed calls on its first endpoint, 0 on the
-- others (NULL on rows from before schema 2), so summing `calls` gives what was billed.
CREATE VIEW poll_events AS
SELECT v.vehicle_id  AS vehicle_id,
       e.at          AS at,
       p.name        AS endpoint,
       e.outcome     AS outcome,
       e.http_status AS http_status,
       e.error_type  AS error_type,
       e.error_code  AS error_code,
       e.at / 1000.0 AS time,
       CASE WHEN (e.endpoints & (p.bit - 1)) = 0 THEN e.calls ELSE e.calls * 0 END AS calls
FROM poll_log e
JOIN vehicles v ON v.id = e.vehicle
JOIN poll_endpoints p ON (e.endpoints & p.bit) <> 0;

-- Raw readings not yet summarised, aggregated as the rollup tables hold them. Internal: the
-- rollup views below read them, and retention copies them into the rollup tables.
CREATE VIEW raw_battery_hourly AS
SELECT v.vehicle_id                        AS vehicle_id,
       r.recorded_at / 3600000 * 3600000   AS hour,
       count(*)                            AS readings,
       sum(r.soc_cp)                       AS soc_sum_cp,
       min(r.soc_cp)                       AS soc_min_cp,
       max(r.soc_cp)                       AS soc_max_cp,
       count(r.range_m)                    AS range_readings,
       sum(r.range_m)                      AS range_sum_m,
       min(r.range_m)                      AS range_min_m,
       max(r.range_m)                      AS range_max_m
FROM vehicles v
LEFT JOIN retention_cutoffs k ON k.vehicle = v.id
JOIN readings r ON r.vehicle = v.id AND r.recorded_at >= coalesce(k.readings_before, 0)
WHERE r.soc_cp IS NOT NULL
GROUP BY v.vehicle_id, r.recorded_at / 3600000;

CREATE VIEW raw_odometer_daily AS
SELECT v.vehicle_id                        AS vehicle_id,
       r.recorded_at / 86400000 * 86400000 AS day,
       count(*)                            AS readings,
       min(r.odometer_m)                   AS odometer_min_m,
       max(r.odometer_m)                   AS odometer_max_m
FROM vehicles v
LEFT JOIN retention_cutoffs k ON k.vehicle = v.id
JOIN readings r ON r.vehicle = v.id AND r.recorded_at >= coalesce(k.readings_before, 0)
WHERE r.odometer_m IS NOT NULL
GROUP BY v.vehicle_id, r.recorded_at / 86400000;

-- A charging session is a run of consecutive charge readings in state CHARGING (1); it ends
-- at the next charge reading, whatever it says. Window functions over one vehicle's readings.
CREATE VIEW raw_charge_sessions AS
WITH c AS (
    SELECT v.vehicle_id                                 AS vehicle_id,
           r.recorded_at                                AS at,
           r.charge_state                               AS state,
           r.soc_cp                                     AS soc,
           coalesce(lag(r.charge_state) OVER w, -1)     AS prev_state,
           lead(r.charge_state) OVER w                  AS next_state,
           lead(r.recorded_at) OVER w                   AS next_at,
           lead(r.soc_cp) OVER w                        AS next_soc,
           sum(r.charge_state = 1) OVER w               AS charging_so_far
    FROM vehicles v
    LEFT JOIN retention_cutoffs k ON k.vehicle = v.id
    JOIN readings r ON r.vehicle = v.id AND r.recorded_at >= coalesce(k.readings_before, 0)
    WHERE r.charge_state IS NOT NULL
    WINDOW w AS (PARTITION BY v.vehicle_id ORDER BY r.recorded_at)
),
edges AS (
    SELECT vehicle_id, at, soc, next_at, next_state, next_soc, charging_so_far,
           prev_state <> 1                AS starts,
           coalesce(next_state, -1) <> 1  AS ends
    FROM c
    WHERE state = 1 AND (prev_state <> 1 OR coalesce(next_state, -1) <> 1)
),
paired AS (
    SELECT *,
           lead(next_at) OVER e         AS last_next_at,
           lead(next_state) OVER e      AS last_next_state,
           lead(next_soc) OVER e        AS last_next_soc,
           lead(soc) OVER e             AS last_soc,
           lead(charging_so_far) OVER e AS last_charging_so_far
    FROM edges
    WINDOW e AS (PARTITION BY vehicle_id ORDER BY at)
)
SELECT vehicle_id,
       at                                                                      AS started_at,
       CASE WHEN ends THEN next_at ELSE last_next_at END                       AS ended_at,
       CASE WHEN ends THEN 1 ELSE last_charging_so_far - charging_so_far + 1 END AS readings,
       soc                                                                     AS soc_start_cp,
       CASE WHEN ends THEN coalesce(next_soc, soc)
            ELSE coalesce(last_next_soc, last_soc) END                         AS soc_end_cp,
       CASE WHEN ends THEN next_state ELSE last_next_state END                 AS end_state
FROM paired
WHERE starts;

-- The rollup views: summaries of pruned readings, then the raw readings above the cutoff.
CREATE VIEW battery_hourly AS
SELECT v.vehicle_id                                   AS vehicle_id,
       b.hour                                         AS hour,
       b.hour / 1000.0                                AS time,
       b.readings                                     AS readings,
       b.soc_sum_cp * 1.0 / b.readings / 100.0        AS soc_avg_percent,
       b.soc_min_cp / 100.0                           AS soc_min_percent,
       b.soc_max_cp / 100.0                           AS soc_max_percent,
       b.range_sum_m * 1.0 / b.range_readings / 1000.0 AS range_avg_km,
       b.range_min_m / 1000.0                         AS range_min_km,
       b.range_max_m / 1000.0                         AS range_max_km
FROM battery_rollup_hourly b
JOIN vehicles v ON v.id = b.vehicle
UNION ALL
SELECT vehicle_id, hour, hour / 1000.0, readings,
       soc_sum_cp * 1.0 / readings / 100.0, soc_min_cp / 100.0, soc_max_cp / 100.0,
       range_sum_m * 1.0 / range_readings / 1000.0, range_min_m / 1000.0, range_max_m / 1000.0
FROM raw_battery_hourly;

CREATE VIEW battery_daily AS
SELECT v.vehicle_id                                           AS vehicle_id,
       b.hour / 86400000 * 86400000                           AS day,
       (b.hour / 86400000 * 86400000) / 1000.0                AS time,
       sum(b.readings)                                        AS readings,
       sum(b.soc_sum_cp) * 1.0 / sum(b.readings) / 100.0      AS soc_avg_percent,
       min(b.soc_min_cp) / 100.0                              AS soc_min_percent,
       max(b.soc_max_cp) / 100.0                              AS soc_max_percent,
       sum(b.range_sum_m) * 1.0 / sum(b.range_readings) / 1000.0 AS range_avg_km,
       min(b.range_min_m) / 1000.0                            AS range_min_km,
       max(b.range_max_m) / 1000.0                            AS range_max_km
FROM battery_rollup_hourly b
JOIN vehicles v ON v.id = b.vehicle
GROUP BY v.vehicle_id, b.hour / 86400000
UNION ALL
SELECT v.vehicle_id, r.recorded_at / 86400000 * 86400000,
       (r.recorded_at / 86400000 * 86400000) / 1000.0, count(*),
       sum(r.soc_cp) * 1.0 / count(*) / 100.0, min(r.soc_cp) / 100.0, max(r.soc_cp) / 100.0,
       sum(r.range_m) * 1.0 / count(r.range_m) / 1000.0, min(r.range_m) / 1000.0,
       max(r.range_m) / 1000.0
FROM vehicles v
LEFT JOIN retention_cutoffs k ON k.vehicle = v.id
JOIN readings r ON r.vehicle = v.id AND r.recorded_at >= coalesce(k.readings_before, 0)
WHERE r.soc_cp IS NOT NULL
GROUP BY v.vehicle_id, r.recorded_at / 86400000;

CREATE VIEW odometer_daily AS
SELECT v.vehicle_id                                   AS vehicle_id,
       o.day                                          AS day,
       o.day / 1000.0                                 AS time,
       o.readings                                     AS readings,
       o.odometer_min_m / 1000.0                      AS odometer_min_km,
       o.odometer_max_m / 1000.0                      AS odometer_max_km,
       (o.odometer_max_m - o.odometer_min_m) / 1000.0 AS km
FROM odometer_rollup_daily o
JOIN vehicles v ON v.id = o.vehicle
UNION ALL
SELECT vehicle_id, day, day / 1000.0, readings, odometer_min_m / 1000.0,
       odometer_max_m / 1000.0, (odometer_max_m - odometer_min_m) / 1000.0
FROM raw_odometer_daily;

CREATE VIEW charge_sessions AS
SELECT v.vehicle_id            AS vehicle_id,
       s.started_at            AS started_at,
       s.ended_at              AS ended_at,
       s.started_at / 1000.0   AS time,
       s.readings              AS readings,
       s.soc_start_cp / 100.0  AS soc_start_percent,
       s.soc_end_cp / 100.0    AS soc_end_percent,
       CASE s.end_state
           WHEN 0 THEN 'NOT_CHARGING'
           WHEN 2 THEN 'FULLY_CHARGED'
       END                     AS end_state
FROM charge_session_log s
JOIN vehicles v ON v.id = s.vehicle
UNION ALL
SELECT vehicle_id, started_at, ended_at, started_at / 1000.0, readings,
       soc_start_cp / 100.0, soc_end_cp / 100.0,
       CASE end_state WHEN 0 THEN 'NOT_CHARGING' WHEN 2 THEN 'FULLY_CHARGED' END
FROM raw_charge_sessions;
