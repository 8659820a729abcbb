//! Smartcar's Management API for connections (smartcar-api.md §7), the v2.0-era way an
//! application lists and deletes its connections: `GET` and `DELETE
//! /v2.0/management/connections`, what the SDKs' `get_connections`/`getConnections` and
//! `delete_connections`/`deleteConnections` call (at `SMARTCAR_MANAGEMENT_API_ORIGIN`).
//!
//! It reads and changes the simulator's one connection table ([`super::connections`]): the
//! (user, vehicle) pairs approved in Connect and not revoked since. Authentication is
//! `Authorization: Basic base64("default:" + AMT)` with the Application Management Token
//! (`--management-token`); anything else is 401 AUTHENTICATION in the v2 error object. These are
//! account requests, not vehicle requests: no faults, no latency, no rate limit, not counted in
//! `v2_requests`, counted in `management_requests`.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Value};

use super::connections::{Connection, Pair, MODE, MODES};
use super::errors::{Api, ApiError};
use super::fleet::random_uuid;
use super::stats::bump;
use super::{api_json, iso_ms, Sim, SimState};
use crate::domain::UnixMillis;

const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 100;
/// The Basic user name the SDKs send before the AMT.
const USERNAME: &str = "default";

/// Whether `path` (trailing slash trimmed) is under the Management API.
pub(crate) fn is_management(path: &str) -> bool {
    path == "/v2.0/management" || path.starts_with("/v2.0/management/")
}

/// Where a connection sits in the listing: newest first, then fleet order. A cursor names the
/// last connection of a page by this key, so a page after a deletion still starts where the
/// previous one ended.
type Key = (std::cmp::Reverse<UnixMillis>, Pair);

fn key_of(pair: Pair, c: &Connection) -> Key {
    (std::cmp::Reverse(c.created_at), pair)
}

/// The opaque `paging.cursor`: base64url of `created_at.user.vehicle`.
fn encode_cursor((std::cmp::Reverse(created_at), (user, vehicle)): Key) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{created_at}.{user}.{vehicle}"))
}

fn decode_cursor(cursor: &str) -> Option<Key> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let mut parts = raw.split('.');
    let created_at = parts.next()?.parse().ok()?;
    let user = parts.next()?.parse().ok()?;
    let vehicle = parts.next()?.parse().ok()?;
    parts
        .next()
        .is_none()
        .then_some((std::cmp::Reverse(created_at), (user, vehicle)))
}

/// 401 AUTHENTICATION unless the request carries `Basic base64("default:" + AMT)`.
fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), ApiError> {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, encoded)| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
        })
        .and_then(|decoded| String::from_utf8(decoded).ok());
    match credentials.as_deref().and_then(|c| c.split_once(':')) {
        Some((USERNAME, amt)) if amt == sim.cfg.management_token => Ok(()),
        _ => Err(ApiError::authentication()),
    }
}

/// A query parameter; empty counts as absent.
fn param<'q>(query: &'q HashMap<String, String>, name: &str) -> Option<&'q str> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The query, or 400 VALIDATION for a malformed one.
fn parse_query(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|_| ApiError::validation("malformed query string."))
}

/// `GET /v2.0/management/connections`: the application's connections, newest first, filtered by
/// `user_id`, `vehicle_id` and `mode`, `limit` (1–100, default 10) at a time from `cursor`.
/// `{"connections": [{userId, vehicleId, connectedAt, mode}], "paging": {"cursor"}}`, the
/// cursor null on the last page. A filter naming nobody selects nothing.
pub(crate) async fn list(
    State(sim): State<SimState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    bump(&sim.stats.management_requests);
    let rid = random_uuid();
    let result = (|| {
        authorize(&sim, &headers)?;
        let query = parse_query(query)?;
        let limit = match param(&query, "limit") {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::validation(format!("limit must be an integer from 1 to {MAX_LIMIT}."))
                })?,
        };
        let after = param(&query, "cursor")
            .map(|c| {
                decode_cursor(c)
                    .ok_or_else(|| ApiError::validation("cursor is not one this API returned."))
            })
            .transpose()?;
        let mode = param(&query, "mode");
        if mode.is_some_and(|m| !MODES.contains(&m)) {
            return Err(ApiError::validation(
                "mode must be live, simulated or test.",
            ));
        }
        let user = param(&query, "user_id").map(|id| sim.fleet.user_by_id(id));
        let vehicle = param(&query, "vehicle_id").map(|id| sim.fleet.vehicle_position(id));
        let all = sim.connections.newest_first(|pair| {
            user.is_none_or(|u| u == Some(pair.0))
                && vehicle.is_none_or(|v| v == Some(pair))
                && mode.is_none_or(|m| m == MODE)
        });
        let start = after.map_or(0, |after| {
            all.iter()
                .position(|(pair, c)| key_of(*pair, c) > after)
                .unwrap_or(all.len())
        });
        let end = start.saturating_add(limit).min(all.len());
        let page = &all[start..end];
        let cursor = (end < all.len())
            .then(|| page.last().map(|(pair, c)| encode_cursor(key_of(*pair, c))))
            .flatten();
        let connections: Vec<Value> = page
            .iter()
            .map(|(pair, c)| {
                let mut item = ids_json(&sim, *pair);
                item["connectedAt"] = json!(iso_ms(c.created_at));
                item["mode"] = json!(MODE);
                item
            })
            .collect();
        Ok(api_json(
            &rid,
            json!({"connections": connections, "paging": {"cursor": cursor}}),
            &[],
        ))
    })();
    result.unwrap_or_else(|e| e.into_api_response(Api::V2, &rid))
}

/// `DELETE /v2.0/management/connections?user_id=…` or `?vehicle_id=…` (neither or both: 400
/// VALIDATION): deletes the matching connections, each as `/_simulator/revoke` with its
/// `vehicle_id` does (its owner's tokens get 401 on that vehicle, the application token 403,
/// until a new Connect approval). `{"connections": [{userId, vehicleId}]}`, newest first, empty
/// when nothing matched.
pub(crate) async fn delete(
    State(sim): State<SimState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    bump(&sim.stats.management_requests);
    let rid = random_uuid();
    let result = (|| {
        authorize(&sim, &headers)?;
        let query = parse_query(query)?;
        // None inside Some: a filter naming nobody, which deletes nothing.
        let target = match (param(&query, "user_id"), param(&query, "vehicle_id")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::validation(
                    "Give either user_id or vehicle_id, not both.",
                ))
            }
            (None, None) => return Err(ApiError::validation("Give user_id or vehicle_id.")),
            (Some(user), None) => sim.fleet.user_by_id(user).map(|u| (u, None)),
            (None, Some(vehicle)) => sim
                .fleet
                .vehicle_position(vehicle)
                .map(|(u, v)| (u, Some(v))),
        };
        let mut gone = match target {
            Some((user, vehicle)) => sim
                .connections
                .revoke(|(u, v)| u == user && vehicle.is_none_or(|vehicle| vehicle == v)),
            None => Vec::new(),
        };
        gone.sort_by_key(|(pair, c)| key_of(*pair, c));
        let connections: Vec<Value> = gone.iter().map(|(pair, _)| ids_json(&sim, *pair)).collect();
        Ok(api_json(&rid, json!({ "connections": connections }), &[]))
    })();
    result.unwrap_or_else(|e| e.into_api_response(Api::V2, &rid))
}

/// `{"userId", "vehicleId"}` of a connection.
fn ids_json(sim: &Sim, (user, vehicle): Pair) -> Value {
    let u = &sim.fleet.users[user];
    json!({"userId": u.id, "vehicleId": u.vehicles[vehicle].id})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let key = (Reverse(1_760_000_000_123), (3, 7));
        let cursor = encode_cursor(key);
        assert_eq!(decode_cursor(&cursor), Some(key));
        assert!(cursor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        for bad in ["", "x", "MS4y", &encode_cursor(key)[1..]] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
        // Four parts, or a negative position.
        let four = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1.2.3.4");
        assert_eq!(decode_cursor(&four), None);
        let negative = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1.-2.3");
        assert_eq!(decode_cursor(&negative), None);
    }

    #[test]
    fn only_the_management_paths_are_management() {
        assert!(is_management("/v2.0/management/connections"));
        assert!(is_management("/v2.0/management"));
        assert!(!is_management("/v2.0/managementx"));
        assert!(!is_management("/v2.0/vehicles"));
    }
}
