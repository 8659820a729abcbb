-- carpulse schema 4: a poll that stored readings is kept beside them, not in poll_log.
--
-- * readings.poll_endpoints / poll_calls: the `ok` events of the poll that created the row (a
--   bitmask of poll_endpoints.bit, and the calls it was billed); NULL when the row carries no
--   event. Such a poll's time is the row's fetched_at (recorded_at + fetch_lag_ms). poll_log now
--   holds only what no new reading row records: failures, and `ok` polls whose readings were
--   already stored (a car that did not report since). About 28 of the ~65 bytes a poll left on
--   disk were its poll_log row; here it costs ~3 bytes of the readings row.
-- * reading_lags: a kind's own fetch lag where it differs from its row's (a kind that joined
--   the row from a later request). Rare, so three mostly-NULL columns (a header byte each on
--   every reading) moved out of readings.
-- * store_state.ok_events_since: `ok` events older than this are past `retention.ok_poll_events`
--   (retention moves it forward); poll_events no longer shows the ones kept in readings.
-- The views keep their names and columns; poll_events reads both places.

DROP VIEW battery_history;
DROP VIEW charge_history;
DROP VIEW odometer_history;
DROP VIEW poll_events;
DROP TRIGGER vehicles_after_delete;

CREATE TABLE reading_lags (
    vehicle         INTEGER NOT NULL,
    recorded_at     INTEGER NOT NULL,
    battery_lag_ms  INTEGER,
    charge_lag_ms   INTEGER,
    odometer_lag_ms INTEGER,
    PRIMARY KEY (vehicle, recorded_at)
) WITHOUT ROWID;

INSERT INTO reading_lags (vehicle, recorded_at, battery_lag_ms, charge_lag_ms, odometer_lag_ms)
SELECT vehicle, recorded_at, battery_lag_ms, charge_lag_ms, odometer_lag_ms FROM readings
WHERE coalesce(battery_lag_ms, charge_lag_ms, odometer_lag_ms) IS NOT NULL;

ALTER TABLE readings DROP COLUMN battery_lag_ms;
ALTER TABLE readings DROP COLUMN charge_lag_ms;
ALTER TABLE readings DROP COLUMN odometer_lag_ms;
ALTER TABLE readings ADD COLUMN poll_endpoints INTEGER;
ALTER TABLE readings ADD COLUMN poll_calls INTEGER;

ALTER TABLE store_state ADD COLUMN ok_events_since INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER vehicles_after_delete AFTER DELETE ON vehicles
BEGIN
    DELETE FROM readings              WHERE vehicle = old.id;
    DELETE FROM reading_lags          WHERE vehicle = old.id;
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
       r.recorded_at + coalesce(l.battery_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.soc_cp / 100.0                                         AS soc_percent,
       r.range_m / 1000.0                                       AS range_km,
       r.recorded_at / 1000.0                                   AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
LEFT JOIN reading_lags l ON l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at
WHERE r.soc_cp IS NOT NULL;

CREATE VIEW charge_history AS
SELECT v.vehicle_id                                            AS vehicle_id,
       r.recorded_at                                           AS recorded_at,
       r.recorded_at + coalesce(l.charge_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.plugged_in                                            AS plugged_in,
       CASE r.charge_state
           WHEN 0 THEN 'NOT_CHARGING'
           WHEN 1 THEN 'CHARGING'
           WHEN 2 THEN 'FULLY_CHARGED'
       END                                                     AS state,
       r.recorded_at / 1000.0                                  AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
LEFT JOIN reading_lags l ON l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at
WHERE r.charge_state IS NOT NULL;

CREATE VIEW odometer_history AS
SELECT v.vehicle_id                                              AS vehicle_id,
       r.recorded_at                                             AS recorded_at,
       r.recorded_at + coalesce(l.odometer_lag_ms, r.fetch_lag_ms) AS fetched_at,
       r.odometer_m / 1000.0                                     AS odometer_km,
       r.recorded_at / 1000.0                                    AS time
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
LEFT JOIN reading_lags l ON l.vehicle = r.vehicle AND l.recorded_at = r.recorded_at
WHERE r.odometer_m IS NOT NULL;

-- One row per endpoint of each poll; the poll's billed calls on its first endpoint, 0 on the
-- others (NULL on rows from before schema 2), so summing `calls` gives what was billed. The
-- second arm: the `ok` polls kept beside the readings they stored (their time is the row's
-- fetched_at), while retention keeps `ok` events. A kept reading is at most a day older than its
-- poll (KEEP_LAG_MAX_MS in src/store/writer.rs), so the horizon also bounds `recorded_at`: a
-- primary-key range rather than every row of the vehicle.
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
JOIN poll_endpoints p ON (e.endpoints & p.bit) <> 0
UNION ALL
SELECT v.vehicle_id,
       r.recorded_at + r.fetch_lag_ms,
       p.name,
       'ok',
       NULL,
       NULL,
       NULL,
       (r.recorded_at + r.fetch_lag_ms) / 1000.0,
       CASE WHEN (r.poll_endpoints & (p.bit - 1)) = 0 THEN r.poll_calls ELSE 0 END
FROM readings r
JOIN vehicles v ON v.id = r.vehicle
JOIN poll_endpoints p ON (r.poll_endpoints & p.bit) <> 0
WHERE r.poll_endpoints IS NOT NULL
  AND r.recorded_at >= (SELECT ok_events_since FROM store_state WHERE id = 1) - 86400000
  AND r.recorded_at + r.fetch_lag_ms >= (SELECT ok_events_since FROM store_state WHERE id = 1);
