-- carpulse schema 6: the daily poll outcomes packed one row per vehicle-day (0.8 -> ~0.25 byte a poll)
--
-- Why: schema 5's poll_rollup_daily holds one row per vehicle, day, endpoint set and outcome:
-- three rows a day for a v3 fleet (the listing, the info poll, the asleep polls), about 26 bytes
-- each on its pages, 0.8 byte a poll. That alone put a year's store at 40.5 bytes per battery
-- reading after the default retention (issue 8's target: <= 40). Most of a row is the row: its
-- cell pointer, lengths, the vehicle and the day. Here a vehicle-day is one row, and each of its
-- facts (endpoints, outcome, polls, calls) one small integer in it.
--
-- * poll_outcome_shapes: a small integer per (endpoint set, outcome, calls kind) met, the
--   calls kind 0 where a fact's calls = its polls (one billed call a poll, the usual), 1 where
--   they are NULL, 2 where 0. A fleet meets a handful (a v3 fleet: the listing, the info poll,
--   the asleep polls); the rollup adds one the first time it meets it (src/store/rollup.rs).
-- * poll_rollup_days: per vehicle and UTC day (`day` in ms, the same key as schema 5's, so a
--   filter on the view's `day` is still a primary-key range), up to four facts a, b, c, d,
--   each `shape + 64 * polls` (shape < 64): 2 bytes for a day's 96 listings, 1 for its info
--   poll. The view decodes them with a mask and a shift (any SQLite).
-- * poll_rollup_daily keeps schema 5's plain rows for the facts that do not pack: a fifth fact
--   of a day, a shape past 63, other calls (e.g. two billed calls a poll). The rollup writes
--   each fact into one table or the other, never both.
-- * The migration packs what schema 5 summarised and deletes those plain rows: the view shows
--   the same rows before and after (tests: src/store/tests.rs). The pages they leave go back to
--   the file system with the next retention pass's incremental vacuum.
-- poll_outcomes_daily keeps its name, columns and rows; poll_events is untouched.

CREATE TABLE poll_outcome_shapes (
    shape     INTEGER PRIMARY KEY,
    endpoints INTEGER NOT NULL,
    outcome   TEXT    NOT NULL,
    calls     INTEGER NOT NULL,
    UNIQUE (endpoints, outcome, calls)
);

CREATE TABLE poll_rollup_days (
    vehicle INTEGER NOT NULL,
    day     INTEGER NOT NULL,
    a       INTEGER,
    b       INTEGER,
    c       INTEGER,
    d       INTEGER,
    PRIMARY KEY (vehicle, day)
) WITHOUT ROWID;

CREATE TEMP TABLE facts AS
SELECT vehicle, day, endpoints, outcome, polls,
       CASE WHEN calls IS NULL THEN 1 WHEN calls = polls THEN 0 WHEN calls = 0 THEN 2 END AS kind
FROM poll_rollup_daily;
INSERT OR IGNORE INTO poll_outcome_shapes (endpoints, outcome, calls)
SELECT endpoints, outcome, kind FROM facts WHERE kind IS NOT NULL
GROUP BY endpoints, outcome, kind ORDER BY sum(polls) DESC;
CREATE TEMP TABLE packable AS
SELECT vehicle, day, endpoints, outcome, fact,
       row_number() OVER (PARTITION BY vehicle, day ORDER BY polls DESC, endpoints, outcome) AS slot
FROM (
    SELECT f.vehicle, f.day, f.endpoints, f.outcome, f.polls, s.shape + 64 * f.polls AS fact
    FROM facts f
    JOIN poll_outcome_shapes s
      ON s.endpoints = f.endpoints AND s.outcome = f.outcome AND s.calls = f.kind
    WHERE s.shape < 64 AND f.polls BETWEEN 0 AND 1099511627775
);
INSERT INTO poll_rollup_days (vehicle, day, a, b, c, d)
SELECT vehicle, day,
       max(CASE slot WHEN 1 THEN fact END), max(CASE slot WHEN 2 THEN fact END),
       max(CASE slot WHEN 3 THEN fact END), max(CASE slot WHEN 4 THEN fact END)
FROM packable WHERE slot <= 4
GROUP BY vehicle, day
ORDER BY vehicle, day;
DELETE FROM poll_rollup_daily
WHERE (vehicle, day, endpoints, outcome) IN
      (SELECT vehicle, day, endpoints, outcome FROM packable WHERE slot <= 4);
DROP TABLE packable;
DROP TABLE facts;

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
    DELETE FROM poll_rollup_days      WHERE vehicle = old.id;
    UPDATE store_state SET vehicle_epoch = vehicle_epoch + 1 WHERE id = 1;
END;

-- Schema 5's view with one more arm first: the packed days, each fact of a row taken by a
-- join with the four slot numbers (the row is read once, by a primary-key range of its
-- vehicle and days, as the plain rows are), decoded, and spread over its endpoints with the
-- same expressions as the other arms. The other three arms are schema 5's, unchanged.
DROP VIEW poll_outcomes_daily;
CREATE VIEW poll_outcomes_daily AS
SELECT x.vehicle_id   AS vehicle_id,
       x.day          AS day,
       x.day / 1000.0 AS time,
       p.name         AS endpoint,
       o.outcome      AS outcome,
       x.fact >> 6    AS polls,
       CASE WHEN o.calls = 1 THEN NULL
            WHEN o.calls = 2 THEN 0
            WHEN (o.endpoints & (p.bit - 1)) = 0 THEN x.fact >> 6
            ELSE 0 END AS calls
FROM (
    SELECT v.vehicle_id AS vehicle_id,
           k.day        AS day,
           CASE s.slot WHEN 1 THEN k.a WHEN 2 THEN k.b WHEN 3 THEN k.c ELSE k.d END AS fact
    FROM vehicles v
    CROSS JOIN poll_rollup_days k ON k.vehicle = v.id
    CROSS JOIN (SELECT 1 AS slot UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) s
    WHERE k.day < (SELECT polls_summarised_before FROM store_state WHERE id = 1)
) x
JOIN poll_outcome_shapes o ON o.shape = x.fact & 63
JOIN poll_endpoints p ON (o.endpoints & p.bit) <> 0
WHERE x.fact IS NOT NULL
UNION ALL
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
