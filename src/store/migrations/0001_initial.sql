-- carpulse store, schema version 1.
-- The views are the user-facing contract (DESIGN §3); the tables under them are shaped for
-- size: an integer vehicle key, WITHOUT ROWID readings keyed by (vehicle, recorded_at), and
-- values as small integers (centi-percent, metres, the fetch lag instead of a second timestamp).

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
CREATE INDEX vehicles_by_connection ON vehicles(connection_id);

CREATE TABLE battery_readings (
    vehicle      INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    fetch_lag_ms INTEGER NOT NULL,
    soc_cp       INTEGER NOT NULL,   -- centi-percent: 68.34 % is 6834
    range_m      INTEGER,            -- metres
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

CREATE TABLE charge_readings (
    vehicle      INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    fetch_lag_ms INTEGER NOT NULL,
    plugged_in   INTEGER NOT NULL,
    state        INTEGER NOT NULL,   -- 0 NOT_CHARGING, 1 CHARGING, 2 FULLY_CHARGED
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
CREATE INDEX poll_event_log_by_vehicle ON poll_event_log(vehicle, at);
CREATE INDEX poll_event_log_by_time ON poll_event_log(at);

CREATE VIEW battery_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       b.recorded_at                 AS recorded_at,
       b.recorded_at + b.fetch_lag_ms AS fetched_at,
       b.soc_cp / 100.0              AS soc_percent,
       b.range_m / 1000.0            AS range_km,
       b.recorded_at / 1000.0        AS time
FROM battery_readings b JOIN vehicles v ON v.id = b.vehicle;

CREATE VIEW charge_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       c.recorded_at                 AS recorded_at,
       c.recorded_at + c.fetch_lag_ms AS fetched_at,
       c.plugged_in                  AS plugged_in,
       CASE c.state WHEN 1 THEN 'CHARGING' WHEN 2 THEN 'FULLY_CHARGED' ELSE 'NOT_CHARGING' END AS state,
       c.recorded_at / 1000.0        AS time
FROM charge_readings c JOIN vehicles v ON v.id = c.vehicle;

CREATE VIEW odometer_history AS
SELECT v.vehicle_id                  AS vehicle_id,
       o.recorded_at                 AS recorded_at,
       o.recorded_at + o.fetch_lag_ms AS fetched_at,
       o.odometer_m / 1000.0         AS odometer_km,
       o.recorded_at / 1000.0        AS time
FROM odometer_readings o JOIN vehicles v ON v.id = o.vehicle;

CREATE VIEW poll_events AS
SELECT v.vehicle_id AS vehicle_id, e.at, e.endpoint, e.outcome, e.http_status, e.error_type, e.error_code
FROM poll_event_log e JOIN vehicles v ON v.id = e.vehicle;
