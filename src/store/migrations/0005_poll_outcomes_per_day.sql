-- carpulse schema 5: poll outcomes per day, summarised, so a fleet's days read in milliseconds.
--
-- * poll_rollup_daily: per vehicle, UTC day, endpoints and outcome, the polls of that day
--   (`polls`) and their billed calls (`calls`, NULL where every poll's was). `endpoints` is a
--   poll's bitmask of poll_endpoints.bit, as in poll_log: the endpoints one poll answered
--   together share a row (a v3 listing's battery, charge, odometer and VIN: one row a day, not
--   four), which keeps the rollup at about 0.8 bytes per poll. Filled for closed days, a vehicle
--   at a time, by maintenance on the owner thread (src/store/rollup.rs), always before
--   retention lets those days' events go: the counts outlive `retention.ok_poll_events`.
-- * store_state.polls_summarised_before: the watermark, a UTC midnight. Days before it are read
--   from the rollup, days from it on from the events themselves. It moves only when every
--   vehicle's days below the new value are summarised, so a pass cut short counts nothing
--   twice (rows for days at or past the watermark are not shown until it passes them).
-- * poll_outcomes_daily (view): per vehicle, day, endpoint and outcome, the poll_events rows
--   (`polls`) and their `calls`, from the rollup for summarised days and aggregated live for the
--   days after. Every arm reaches its rows by primary-key ranges of one vehicle (the live ones
--   from the watermark on: poll_log (vehicle, at), readings (vehicle, recorded_at)), so a query
--   over every vehicle reads a day or so of each one's events, never its whole history.
--   A day may have more than one row for an endpoint and outcome (polls of different endpoint
--   sets; live, polls kept in readings and in poll_log): sum `polls` and `calls`.
-- poll_events keeps its name, columns and rows.

CREATE TABLE poll_rollup_daily (
    vehicle   INTEGER NOT NULL,
    day       INTEGER NOT NULL,
    endpoints INTEGER NOT NULL,
    outcome   TEXT    NOT NULL,
    polls     INTEGER NOT NULL,
    calls     INTEGER,
    PRIMARY KEY (vehicle, day, endpoints, outcome)
) WITHOUT ROWID;

ALTER TABLE store_state ADD COLUMN polls_summarised_before INTEGER NOT NULL DEFAULT 0;

DROP TRIGGER vehicles_after_delete;
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
    DELETE FROM poll_rollup_daily     WHERE vehicle = old.id;
    UPDATE store_state SET vehicle_epoch = vehicle_epoch + 1 WHERE id = 1;
END;

-- Every arm spreads a row's endpoints with poll_events' expressions (a poll's billed calls on
-- its first endpoint, 0 on the others). The live arms group first, per vehicle, day and
-- endpoint set, and spread the few groups after (spreading every poll first took three times
-- as long). Vehicles come first in every arm (CROSS JOIN fixes the order), so each vehicle's
-- rows are one primary-key range, and a filter on vehicle_id searches that vehicle alone. The
-- live arms stay two rather than one aggregate over a compound: SQLite does not push a
-- vehicle_id filter through an aggregate into a compound below it, and would read every
-- vehicle; so a live day may have two `ok` rows for an endpoint (polls that stored new
-- readings, and polls that did not). The `ok` polls kept in readings are found by recorded_at
-- from a day before the later of the watermark and the `ok` horizon (a kept reading is within
-- a day of its poll: KEEP_LAG_MAX_MS in writer.rs).
CREATE VIEW poll_outcomes_daily AS
SELECT v.vehicle_id   AS vehicle_id,
       d.day          AS day,
       d.day / 1000.0 AS time,
       p.name         AS endpoint,
       d.outcome      AS outcome,
       d.polls        AS polls,
       CASE WHEN (d.endpoints & (p.bit - 1)) = 0 THEN d.calls ELSE d.calls * 0 END AS calls
FROM vehicles v
CROSS JOIN poll_rollup_daily d ON d.vehicle = v.id
JOIN poll_endpoints p ON (d.endpoints & p.bit) <> 0
WHERE d.day < (SELECT polls_summarised_before FROM store_state WHERE id = 1)
UNION ALL
SELECT x.vehicle_id,
       x.day,
       x.day / 1000.0,
       p.name,
       x.outcome,
       x.polls,
       CASE WHEN (x.endpoints & (p.bit - 1)) = 0 THEN x.calls ELSE x.calls * 0 END
FROM (
    SELECT v.vehicle_id               AS vehicle_id,
           e.at / 86400000 * 86400000 AS day,
           e.endpoints                AS endpoints,
           e.outcome                  AS outcome,
           count(*)                   AS polls,
           sum(e.calls)               AS calls
    FROM vehicles v
    CROSS JOIN poll_log e ON e.vehicle = v.id
    WHERE e.at >= (SELECT polls_summarised_before FROM store_state WHERE id = 1)
    GROUP BY v.vehicle_id, e.at / 86400000, e.endpoints, e.outcome
) x
JOIN poll_endpoints p ON (x.endpoints & p.bit) <> 0
UNION ALL
SELECT x.vehicle_id,
       x.day,
       x.day / 1000.0,
       p.name,
       'ok',
       x.polls,
       CASE WHEN (x.endpoints & (p.bit - 1)) = 0 THEN x.calls ELSE 0 END
FROM (
    SELECT v.vehicle_id                                            AS vehicle_id,
           (r.recorded_at + r.fetch_lag_ms) / 86400000 * 86400000 AS day,
           r.poll_endpoints                                        AS endpoints,
           count(*)                                                AS polls,
           sum(r.poll_calls)                                       AS calls
    FROM vehicles v
    CROSS JOIN readings r ON r.vehicle = v.id
    WHERE r.poll_endpoints IS NOT NULL
      AND r.recorded_at >= (SELECT max(polls_summarised_before, ok_events_since)
                            FROM store_state WHERE id = 1) - 86400000
      AND r.recorded_at + r.fetch_lag_ms >= (SELECT max(polls_summarised_before, ok_events_since)
                                             FROM store_state WHERE id = 1)
    GROUP BY v.vehicle_id, (r.recorded_at + r.fetch_lag_ms) / 86400000, r.poll_endpoints
) x
JOIN poll_endpoints p ON (x.endpoints & p.bit) <> 0;
