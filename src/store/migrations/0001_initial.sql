-- carpulse schema version 1. Append-only: never edit this file once released; add 0002_*.sql.
-- Times are INTEGER unix milliseconds UTC. The tables are shaped for size (integer vehicle key,
-- WITHOUT ROWID readings keyed by (vehicle, recorded_at)); the views are the user-facing contract
-- (DESIGN §3) and never show tokens.

CREATE TABLE connections (
    id                 INTEGER PRIMARY KEY,
    user_id            TEXT    NOT NULL UNIQUE,
    status             TEXT    NOT NULL DEFAULT 'active',
    access_token       TEXT    NOT NULL,
    refresh_token      TEXT    NOT NULL,
    access_expires_at  INTEGER NOT NULL,
    refresh_expires_at INTEGER NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);

CREATE TABLE vehicles (
    id            INTEGER PRIMARY KEY,
    vehicle_id    TEXT    NOT NULL UNIQUE,
    connection_id INTEGER NOT NULL REFERENCES connections(id),
    make          TEXT,
    model         TEXT,
    year          INTEGER,
    vin           TEXT,
    enabled       INTEGER NOT NULL DEFAULT 1,
    added_at      INTEGER NOT NULL
);
CREATE INDEX vehicles_connection ON vehicles(connection_id);

-- soc_cp: state of charge in centi-percent (68.34 % -> 6834); range_m: metres.
-- fetch_lag_ms = fetched_at - recorded_at: small, so it takes a byte or two instead of six.
CREATE TABLE battery_readings (
    vehicle      INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    fetch_lag_ms INTEGER NOT NULL,
    soc_cp       INTEGER NOT NULL,
    range_m      INTEGER,
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

-- state: ChargeState::code(): 0 NOT_CHARGING, 1 CHARGING, 2 FULLY_CHARGED.
CREATE TABLE charge_readings (
    vehicle      INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    fetch_lag_ms INTEGER NOT NULL,
    plugged_in   INTEGER NOT NULL,
    state        INTEGER NOT NULL,
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

CREATE TABLE odometer_readings (
    vehicle      INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    fetch_lag_ms INTEGER NOT NULL,
    odometer_m   INTEGER NOT NULL,
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

CREATE TABLE poll_event_log (
    id          INTEGER PRIMARY KEY,
    vehicle     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    endpoint    TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    http_status INTEGER,
    error_type  TEXT,
    error_code  TEXT
);
CREATE INDEX poll_event_log_vehicle_at ON poll_event_log(vehicle, at);

-- The writer caches vehicle_id -> vehicles.id. Any change that could make a cached key wrong
-- (a vehicle removed, by carpulse or by a user's sqlite3, or re-keyed) bumps vehicle_epoch,
-- which the writer checks at the start of every batch transaction.
CREATE TABLE store_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    vehicle_epoch INTEGER NOT NULL
);
INSERT INTO store_state (id, vehicle_epoch) VALUES (1, 0);

-- Removing a vehicle removes its history (readings carry no foreign key, so that inserts stay
-- cheap and a stale key can never abort a whole batch).
CREATE TRIGGER vehicles_after_delete AFTER DELETE ON vehicles
BEGIN
    DELETE FROM battery_readings  WHERE vehicle = old.id;
    DELETE FROM charge_readings   WHERE vehicle = old.id;
    DELETE FROM odometer_readings WHERE vehicle = old.id;
    DELETE FROM poll_event_log    WHERE vehicle = old.id;
    UPDATE store_state SET vehicle_epoch = vehicle_epoch + 1 WHERE id = 1;
END;

CREATE TRIGGER vehicles_after_rekey AFTER UPDATE OF id, vehicle_id ON vehicles
BEGIN
    UPDATE store_state SET vehicle_epoch = vehicle_epoch + 1 WHERE id = 1;
END;

-- The user-facing views. `time` is unix seconds for Grafana's SQLite datasource.
CREATE VIEW battery_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       b.recorded_at                 AS recorded_at,
       b.recorded_at + b.fetch_lag_ms AS fetched_at,
       b.soc_cp / 100.0              AS soc_percent,
       b.range_m / 1000.0            AS range_km,
       b.recorded_at / 1000.0        AS time
FROM battery_readings b
JOIN vehicles v ON v.id = b.vehicle;

CREATE VIEW charge_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       c.recorded_at                 AS recorded_at,
       c.recorded_at + c.fetch_lag_ms AS fetched_at,
       c.plugged_in                  AS plugged_in,
       CASE c.state
           WHEN 0 THEN 'NOT_CHARGING'
           WHEN 1 THEN 'CHARGING'
           WHEN 2 THEN 'FULLY_CHARGED'
       END                           AS state,
       c.recorded_at / 1000.0        AS time
FROM charge_readings c
JOIN vehicles v ON v.id = c.vehicle;

CREATE VIEW odometer_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       o.recorded_at                 AS recorded_at,
       o.recorded_at + o.fetch_lag_ms AS fetched_at,
       o.odometer_m / 1000.0         AS odometer_km,
       o.recorded_at / 1000.0        AS time
FROM odometer_readings o
JOIN vehicles v ON v.id = o.vehicle;

CREATE VIEW poll_events AS
SELECT v.vehicle_id   AS vehicle_id,
       e.at           AS at,
       e.endpoint     AS endpoint,
       e.outcome      AS outcome,
       e.http_status  AS http_status,
       e.error_type   AS error_type,
       e.error_code   AS error_code,
       e.at / 1000.0  AS time
FROM poll_event_log e
JOIN vehicles v ON v.id = e.vehicle;
