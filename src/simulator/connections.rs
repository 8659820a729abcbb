//! Connections, the unit of access of Smartcar's v3 "API Authentication" model
//! (smartcar-api.md §7, §10.1, §10.3): one (user, vehicle) pair the user approved in Connect.
//!
//! An application token reaches a vehicle only through a connection: the request names the user
//! in `sc-user-id`, and that user must own the vehicle and have approved it in Connect (the
//! auto-approved authorize or the consent page's Approve) without revoking it since. A connection
//! carries the scope of the latest approval that covered it. `POST /_simulator/revoke` removes a
//! user's connections (or one vehicle's); a new approval restores them.
//!
//! This module owns that table and serves `GET /v3/connections` (filters, page number and size,
//! JSON:API links) and `GET /v3/connections/{id}`. Those answer only application tokens, are not
//! vehicle requests (no faults, no rate limit, not counted in `v3_requests`) and are counted in
//! `connections_requests`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::{Api, ApiError};
use super::fleet::{random_uuid, SeedRng};
use super::oauth::query_encode;
use super::scope::Scope;
use super::stats::bump;
use super::{api_json, iso_ms, Sim, SimState, V3Bearer};
use crate::domain::UnixMillis;

const DEFAULT_PAGE_SIZE: usize = 10;
const MAX_PAGE_SIZE: usize = 100;
/// Every simulated connection's `mode` (the fleet is simulated vehicles).
pub(crate) const MODE: &str = "simulated";
/// The modes `filter[mode]` accepts (Connect's `mode` values, smartcar-api.md §1.1).
pub(crate) const MODES: [&str; 3] = ["live", "simulated", "test"];

/// A vehicle's place in the fleet: (user index, vehicle index within that user). Connections are
/// keyed by it so a listing comes out in fleet order, the same on every call.
pub(crate) type Pair = (usize, usize);

/// One approved (user, vehicle) pair.
#[derive(Clone, Debug)]
pub(crate) struct Connection {
    /// Stable per user and vehicle (derived from the seed), so a re-approval keeps it.
    pub(crate) id: String,
    /// What the latest approval covering this vehicle granted.
    pub(crate) scope: Scope,
    pub(crate) created_at: UnixMillis,
    pub(crate) updated_at: UnixMillis,
}

/// Whether a user can reach one of their vehicles through a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Connected(Scope),
    /// There was one; it was revoked and not approved again since.
    Revoked,
    /// Never approved.
    None,
}

#[derive(Default)]
struct Table {
    live: BTreeMap<Pair, Connection>,
    /// Pairs whose connection was revoked and not approved since.
    revoked: HashSet<Pair>,
}

/// The connection table. A std mutex: every operation is a few map operations with no `.await`.
#[derive(Default)]
pub(crate) struct Connections {
    table: Mutex<Table>,
}

/// The id of the connection between a user and a vehicle: a UUID derived from the fleet seed and
/// both ids (FNV-1a), stable across restarts and re-approvals.
pub(crate) fn connection_id(seed: u64, user_id: &str, vehicle_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_id.bytes().chain([b'/']).chain(vehicle_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    SeedRng::new(seed, 4, hash).uuid()
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means another request panicked mid-update; the maps stay usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an approval: each pair (with its connection id) gets a connection, a new one or
    /// the existing one with the new scope and `updatedAt`.
    pub(crate) fn approve(
        &self,
        pairs: impl IntoIterator<Item = (Pair, String)>,
        scope: Scope,
        now: UnixMillis,
    ) {
        let mut t = self.lock();
        for (pair, id) in pairs {
            t.revoked.remove(&pair);
            t.live
                .entry(pair)
                .and_modify(|c| {
                    c.scope = scope;
                    c.updated_at = now;
                })
                .or_insert(Connection {
                    id,
                    scope,
                    created_at: now,
                    updated_at: now,
                });
        }
    }

    /// Revokes every live connection `select` picks; returns them, in fleet order.
    pub(crate) fn revoke(&self, select: impl Fn(Pair) -> bool) -> Vec<(Pair, Connection)> {
        let mut t = self.lock();
        let gone: Vec<Pair> = t.live.keys().copied().filter(|p| select(*p)).collect();
        gone.into_iter()
            .filter_map(|pair| {
                t.revoked.insert(pair);
                t.live.remove(&pair).map(|c| (pair, c))
            })
            .collect()
    }

    pub(crate) fn access(&self, pair: Pair) -> Access {
        let t = self.lock();
        match t.live.get(&pair) {
            Some(c) => Access::Connected(c.scope),
            None if t.revoked.contains(&pair) => Access::Revoked,
            None => Access::None,
        }
    }

    /// Whether the pair's connection was revoked and not approved since.
    pub(crate) fn is_revoked(&self, pair: Pair) -> bool {
        self.lock().revoked.contains(&pair)
    }

    /// The connections `select` keeps, in fleet order: how many there are, and the `limit` of
    /// them after the first `skip`.
    fn page(
        &self,
        select: impl Fn(Pair) -> bool,
        skip: usize,
        limit: usize,
    ) -> (usize, Vec<(Pair, Connection)>) {
        let t = self.lock();
        let mut total = 0;
        let mut page = Vec::new();
        for (pair, c) in t.live.iter().filter(|(p, _)| select(**p)) {
            if total >= skip && page.len() < limit {
                page.push((*pair, c.clone()));
            }
            total += 1;
        }
        (total, page)
    }

    /// Every connection `select` keeps, newest first (by `created_at`; one approval's
    /// connections, created at the same instant, in fleet order): the Management API's order.
    pub(crate) fn newest_first(&self, select: impl Fn(Pair) -> bool) -> Vec<(Pair, Connection)> {
        let t = self.lock();
        let mut all: Vec<(Pair, Connection)> = t
            .live
            .iter()
            .filter(|(p, _)| select(**p))
            .map(|(p, c)| (*p, c.clone()))
            .collect();
        all.sort_by_key(|(pair, c)| (std::cmp::Reverse(c.created_at), *pair));
        all
    }

    fn by_id(&self, id: &str) -> Option<(Pair, Connection)> {
        let t = self.lock();
        t.live
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(p, c)| (*p, c.clone()))
    }
}

/// The JSON:API connection object of smartcar-api.md §10.3.
fn connection_json(sim: &Sim, (ui, vi): Pair, c: &Connection) -> Value {
    let user = &sim.fleet.users[ui];
    let v = &user.vehicles[vi];
    json!({
        "id": c.id,
        "type": "connection",
        "attributes": {
            "permissions": c.scope.names(),
            "vehicle": {
                "make": v.make,
                "model": v.model,
                "year": v.year,
                "mode": MODE,
                "powertrainType": v.powertrain.as_str(),
            },
        },
        "relationships": {
            "vehicle": {"data": {"id": v.id, "type": "vehicle"}},
            "user": {"data": {"id": user.id, "type": "user"}},
        },
        "meta": {"createdAt": iso_ms(c.created_at), "updatedAt": iso_ms(c.updated_at)},
    })
}

/// Only application tokens list connections (a user token → 401 AUTHENTICATION, counted in
/// `user_tokens_on_v3` by [`Sim::authenticate_v3`]).
fn app_only(sim: &Sim, headers: &HeaderMap) -> Result<(), ApiError> {
    match sim.authenticate_v3(headers)? {
        V3Bearer::App => Ok(()),
        V3Bearer::User(_) => Err(ApiError::authentication()),
    }
}

/// The first of `names` present in the query (non-empty).
fn first<'q>(query: &'q HashMap<String, String>, names: &[&str]) -> Option<&'q str> {
    names
        .iter()
        .find_map(|n| query.get(*n))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// A page parameter: an integer in `1..=max`, or 400 VALIDATION:INVALID_PARAMETER.
fn page_param(
    query: &HashMap<String, String>,
    names: &[&str],
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match first(query, names) {
        None => Ok(default),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid_parameter(format!(
                "{} must be an integer from 1 to {max}.",
                names[0]
            ))),
        },
    }
}

/// `GET /v3/connections`: the application's connections, in fleet order, filtered by
/// `filter[userId]` (or `sc-user-id`), `filter[vehicleId]` and `filter[mode]` (aliases `userId`/
/// `user_id`, `vehicleId`/`vehicle_id`, `mode`), paged by `page[number]` and `page[size]`
/// (aliases `page`, `pageSize`; size 1–100, default 10). `links` are relative to the server
/// root and carry the filters.
pub(crate) async fn list(
    State(sim): State<SimState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    bump(&sim.stats.connections_requests);
    let rid = random_uuid();
    let result = (|| {
        app_only(&sim, &headers)?;
        let Ok(Query(query)) = query else {
            return Err(ApiError::invalid_parameter("malformed query string."));
        };
        let number = page_param(&query, &["page[number]", "page"], 1, usize::MAX)?;
        let size = page_param(
            &query,
            &["page[size]", "pageSize"],
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        )?;
        let header_user = headers
            .get("sc-user-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let user_filter = first(&query, &["filter[userId]", "userId", "user_id"]);
        let vehicle_filter = first(&query, &["filter[vehicleId]", "vehicleId", "vehicle_id"]);
        let mode_filter = first(&query, &["filter[mode]", "mode"]);
        if let Some(mode) = mode_filter {
            if !MODES.contains(&mode) {
                return Err(ApiError::invalid_parameter(
                    "filter[mode] must be live, simulated or test.",
                ));
            }
        }
        // A filter naming nobody selects nothing (None inside Some).
        let by_user = |id: &str| sim.fleet.user_by_id(id);
        let users: Vec<Option<usize>> = [user_filter, header_user]
            .into_iter()
            .flatten()
            .map(by_user)
            .collect();
        let vehicle = vehicle_filter.map(|id| sim.fleet.vehicle_position(id));
        let select = |(ui, vi): Pair| {
            users.iter().all(|u| *u == Some(ui))
                && vehicle.is_none_or(|v| v == Some((ui, vi)))
                && mode_filter.is_none_or(|m| m == MODE)
        };
        let skip = number.saturating_sub(1).saturating_mul(size);
        let (total, page) = sim.connections.page(select, skip, size);
        let data: Vec<Value> = page
            .iter()
            .map(|(pair, c)| connection_json(&sim, *pair, c))
            .collect();
        let mut filters = String::new();
        for (name, value) in [
            ("filter[userId]", user_filter.or(header_user)),
            ("filter[vehicleId]", vehicle_filter),
            ("filter[mode]", mode_filter),
        ] {
            if let Some(value) = value {
                filters.push_str(&format!("&{name}={}", query_encode(value)));
            }
        }
        let link =
            |n: usize| format!("/v3/connections?page[number]={n}&page[size]={size}{filters}");
        let last = total.div_ceil(size).max(1);
        let body = json!({
            "data": data,
            "meta": {"page": number, "pageSize": size, "totalCount": total},
            "links": {
                "self": link(number),
                "first": link(1),
                "previous": (number > 1).then(|| link((number - 1).min(last))),
                "next": (number < last).then(|| link(number + 1)),
                "last": link(last),
            },
        });
        Ok(api_json(&rid, body, &[]))
    })();
    result.unwrap_or_else(|e| e.into_api_response(Api::V3, &rid))
}

/// `GET /v3/connections/{id}`: `{"data": connection}`, or 404 RESOURCE_NOT_FOUND.
pub(crate) async fn one(
    State(sim): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    bump(&sim.stats.connections_requests);
    let rid = random_uuid();
    let result = app_only(&sim, &headers).and_then(|()| {
        let (pair, c) = sim.connections.by_id(&id).ok_or_else(|| {
            ApiError::not_found("CONNECTION_NOT_FOUND", "No connection with this id exists.")
        })?;
        Ok(api_json(
            &rid,
            json!({"data": connection_json(&sim, pair, &c)}),
            &[],
        ))
    });
    result.unwrap_or_else(|e| e.into_api_response(Api::V3, &rid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_revocations_and_pages() {
        let c = Connections::default();
        let scope = Scope::default_grant();
        c.approve(
            [((0, 0), "a".to_owned()), ((0, 1), "b".to_owned())],
            scope,
            10,
        );
        c.approve([((1, 0), "c".to_owned())], scope, 20);
        assert_eq!(c.access((0, 0)), Access::Connected(scope));
        assert_eq!(c.access((2, 0)), Access::None);
        let (total, page) = c.page(|_| true, 1, 1);
        assert_eq!((total, page[0].1.id.as_str()), (3, "b"));
        let gone = c.revoke(|(u, _)| u == 0);
        let gone: Vec<&str> = gone.iter().map(|(_, c)| c.id.as_str()).collect();
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(c.access((0, 1)), Access::Revoked);
        assert!(c.is_revoked((0, 0)));
        assert_eq!(c.page(|_| true, 0, 10).0, 1);
        assert!(c.revoke(|(u, _)| u == 0).is_empty());
        // A new approval restores it, created anew.
        let narrow = Scope::from_request(Some("read_battery")).unwrap();
        c.approve([((0, 0), "a".to_owned())], narrow, 30);
        assert_eq!(c.access((0, 0)), Access::Connected(narrow));
        assert_eq!(c.by_id("a").unwrap().1.created_at, 30);
        assert!(c.is_revoked((0, 1)));
        // Re-approving a live one keeps its creation time.
        c.approve([((1, 0), "c".to_owned())], narrow, 40);
        let (_, again) = c.by_id("c").unwrap();
        assert_eq!((again.created_at, again.updated_at), (20, 40));
        // Newest first by creation; a tie in fleet order.
        c.approve([((0, 1), "b".to_owned())], narrow, 30);
        let order: Vec<String> = c
            .newest_first(|_| true)
            .into_iter()
            .map(|(_, c)| c.id)
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
        let of_user_0: Vec<Pair> = c
            .newest_first(|(u, _)| u == 0)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(of_user_0, [(0, 0), (0, 1)]);
    }

    #[test]
    fn ids_are_stable_uuids_per_pair() {
        let a = connection_id(1, "u", "v");
        assert_eq!(a, connection_id(1, "u", "v"));
        assert_ne!(a, connection_id(1, "u", "w"));
        assert_ne!(a, connection_id(2, "u", "v"));
        assert_eq!(a.len(), 36);
    }
}
