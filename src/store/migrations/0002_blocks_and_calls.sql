-- carpulse schema 2: what a vehicle cannot be asked for, kept across restarts; the calls
-- each poll was billed.
--
-- endpoint: a poll endpoint (battery, charge, info, vin, odometer), '*' for the whole
-- vehicle (a pause: BILLING, CONNECTED_SERVICES_ACCOUNT), or '~' for a wait: no call to the
-- vehicle before `until` (a retry-after, a backoff), so a restart does not call early.
-- source: 'discovery' (the grant's /permissions or the v3 signal list says so, rewritten at
-- every discovery) or 'poll' (an answer said so: PERMISSION, COMPATIBILITY, BILLING, ...).
-- A reconnect of the vehicle's account lifts every row of it; `carpulse vehicles enable`
-- lifts the 'poll' rows.
CREATE TABLE vehicle_blocks (
    vehicle   INTEGER NOT NULL,
    endpoint  TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    since     INTEGER NOT NULL,
    until     INTEGER,
    PRIMARY KEY (vehicle, endpoint)
) WITHOUT ROWID;

-- When the vehicle's capabilities were last read (NULL: never; the daemon reads them soon).
ALTER TABLE vehicles ADD COLUMN capabilities_at INTEGER;

CREATE TRIGGER vehicles_after_delete_blocks AFTER DELETE ON vehicles
BEGIN
    DELETE FROM vehicle_blocks WHERE vehicle = old.id;
END;

CREATE VIEW blocked_endpoints AS
SELECT v.vehicle_id        AS vehicle_id,
       b.endpoint          AS endpoint,
       b.source            AS source,
       b.reason            AS reason,
       b.since             AS since,
       b.since / 1000.0    AS time,
       b.until             AS until
FROM vehicle_blocks b
JOIN vehicles v ON v.id = b.vehicle;

-- The Smartcar calls each poll was billed (every event row of one poll carries the poll's
-- total), so the monthly budget survives a restart exactly. NULL on older rows.
ALTER TABLE poll_event_log ADD COLUMN calls INTEGER;

DROP VIEW poll_events;
CREATE VIEW poll_events AS
SELECT v.vehicle_id   AS vehicle_id,
       e.at           AS at,
       e.endpoint     AS endpoint,
       e.outcome      AS outcome,
       e.http_status  AS http_status,
       e.error_type   AS error_type,
       e.error_code   AS error_code,
       e.at / 1000.0  AS time,
       e.calls        AS calls
FROM poll_event_log e
JOIN vehicles v ON v.id = e.vehicle;
