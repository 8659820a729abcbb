//! v3 connections (smartcar-api.md §7, §10.3): `GET {v3}/connections`, the app's list of
//! (user, vehicle) pairs with each vehicle's make/model/year/powertrain and the permissions
//! the user granted. With API Authentication it replaces v2 `GET /vehicles`, `GET /user` and
//! `GET /vehicles/{id}/permissions`, so a v3 integration makes no v2.0 call.
//!
//! The query names are uncertain (§10.3: "`filter[userId]`-style"), so the filter is also
//! applied here, and paging follows `links.next` (or, without one, `meta.page`/`pageSize`/
//! `totalCount`, under either spelling).

use std::collections::HashSet;

use reqwest::{Method, Url};
use serde_json::Value;

use super::error::{ApiError, ErrorKind};
use super::v2::parse_info;
use super::v3::resolve_next;
use super::SmartcarClient;
use crate::domain::{Secret, VehicleId, VehicleInfo};

/// Page size asked for (the documented maximum of the listing is 100).
const PAGE_SIZE: u32 = 100;
/// A bound on the pages followed: a million connections at the documented page size, so a
/// server that pages forever still ends.
const MAX_CONNECTION_PAGES: usize = 10_000;

/// Every connection listed, and whether the listing was read to its end (a partial listing
/// must never be taken as "the others are gone").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionList {
    pub connections: Vec<V3Connection>,
    pub complete: bool,
}

/// One v3 connection: a user's grant to one vehicle.
#[derive(Clone, Debug, PartialEq)]
pub struct V3Connection {
    pub id: String,
    pub user_id: String,
    pub vehicle_id: VehicleId,
    pub permissions: Vec<String>,
    pub vehicle: Option<VehicleInfo>,
    /// `BEV`, `PHEV`, `ICE`, ... as Smartcar names it.
    pub powertrain: Option<String>,
}

/// One page: its connections and the link (or page number) of the next.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionsPage {
    pub connections: Vec<V3Connection>,
    pub next: Option<String>,
    /// `(page, page size, total)` from `meta`, when given.
    pub paging: Option<(u64, u64, u64)>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// One connection resource, with or without the `data` wrapper. `None` when it names no
/// user or no vehicle (nothing carpulse could poll).
pub fn parse_connection(v: &Value) -> Option<V3Connection> {
    let d = v.get("data").filter(|d| d.is_object()).unwrap_or(v);
    let attrs = d.get("attributes").unwrap_or(d);
    let rel = d.get("relationships");
    let user_id = rel
        .and_then(|r| str_at(r, &["user", "data", "id"]))
        .or_else(|| str_at(attrs, &["userId"]))
        .or_else(|| str_at(attrs, &["user", "id"]))?;
    let vehicle_id = rel
        .and_then(|r| str_at(r, &["vehicle", "data", "id"]))
        .or_else(|| str_at(attrs, &["vehicleId"]))
        .or_else(|| str_at(attrs, &["vehicle", "id"]))?;
    let vehicle = attrs.get("vehicle");
    let permissions = attrs
        .get("permissions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|p| p.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    Some(V3Connection {
        id: str_at(d, &["id"]).unwrap_or(vehicle_id).to_owned(),
        user_id: user_id.to_owned(),
        vehicle_id: VehicleId(vehicle_id.to_owned()),
        permissions,
        vehicle: vehicle.and_then(|veh| parse_info(veh).ok()),
        powertrain: vehicle
            .and_then(|veh| str_at(veh, &["powertrainType"]))
            .map(str::to_owned),
    })
}

/// A listing page (`{"data":[…],"meta":{…},"links":{…}}`); `Err` when there is no `data`.
pub fn parse_connections_page(v: &Value) -> Result<ConnectionsPage, String> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or("connections body has no `data` array")?;
    let next = super::v3::next_link(v);
    let meta = v.get("meta");
    let num = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| meta.and_then(|m| m.get(*k)).and_then(Value::as_u64))
    };
    let paging = match (
        num(&["page", "pageNumber"]),
        num(&["pageSize", "size"]),
        num(&["totalCount", "total"]),
    ) {
        (Some(p), Some(s), Some(t)) => Some((p, s, t)),
        _ => None,
    };
    Ok(ConnectionsPage {
        connections: data.iter().filter_map(parse_connection).collect(),
        next,
        paging,
    })
}

impl SmartcarClient {
    /// Every connection of the app (or of `user`), following the pages. Needs the application
    /// token; each request names the user in `sc-user-id` too when filtering by one.
    pub async fn connections(
        &self,
        app_token: &Secret,
        user: Option<&str>,
    ) -> Result<Vec<V3Connection>, ApiError> {
        Ok(self.connection_list(app_token, user).await?.connections)
    }

    /// [`connections`](Self::connections), saying whether the listing was read to its end.
    pub async fn connection_list(
        &self,
        app_token: &Secret,
        user: Option<&str>,
    ) -> Result<ConnectionList, ApiError> {
        let mut url = Url::parse(&self.v3_url("/connections"))
            .map_err(|e| ApiError::new(ErrorKind::Other, format!("bad connections URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(u) = user {
                q.append_pair("filter[userId]", u);
            }
            q.append_pair("page[size]", &PAGE_SIZE.to_string());
        }
        let mut visited: HashSet<String> = HashSet::new();
        let mut seen: HashSet<(String, VehicleId)> = HashSet::new();
        let mut out: Vec<V3Connection> = Vec::new();
        let mut complete = false;
        for _ in 0..MAX_CONNECTION_PAGES {
            visited.insert(url.as_str().to_owned());
            let raw = self
                .send_unbilled(self.vehicle_request(Method::GET, url.as_str(), app_token, user))
                .await?;
            let v: Value = raw.json("connections")?;
            let page = parse_connections_page(&v).map_err(|m| ApiError {
                request_id: raw.request_id(),
                ..ApiError::decode(Some(raw.status), m)
            })?;
            let got = page.connections.len();
            let before = out.len();
            for c in page.connections {
                if seen.insert((c.user_id.clone(), c.vehicle_id.clone())) {
                    out.push(c);
                }
            }
            // A page that lists nothing new (a server that serves page 1 under every link)
            // or nothing at all while linking further: stopped, and taken as partial.
            if (got > 0 && out.len() == before) || (got == 0 && page.next.is_some()) {
                tracing::warn!(
                    pages = visited.len(),
                    "GET /v3/connections: a page listed nothing new; the listing is taken as partial"
                );
                break;
            }
            let next = match (page.next, page.paging) {
                (Some(n), _) => resolve_next(self.v3_base(), &url, &n).ok(),
                // No link: the next page number, while the total says there is more.
                (None, Some((p, _, total))) if got > 0 && (out.len() as u64) < total => {
                    let mut n = url.clone();
                    let kept: Vec<(String, String)> = n
                        .query_pairs()
                        .filter(|(k, _)| k != "page[number]" && k != "page")
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect();
                    n.query_pairs_mut()
                        .clear()
                        .extend_pairs(kept)
                        .append_pair("page[number]", &(p + 1).to_string());
                    Some(n)
                }
                _ => None,
            };
            match next {
                Some(n) if !visited.contains(n.as_str()) => url = n,
                Some(_) => {
                    tracing::warn!("GET /v3/connections: links.next repeats a page; the listing is taken as partial");
                    break;
                }
                None => {
                    complete = true;
                    break;
                }
            }
        }
        // The filter's name is uncertain: a server that ignored it must not hand carpulse
        // other users' vehicles.
        if let Some(u) = user {
            out.retain(|c| c.user_id == u);
        }
        Ok(ConnectionList {
            connections: out,
            complete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn(id: &str, user: &str, vehicle: &str) -> Value {
        json!({"id": id, "type": "connection",
               "attributes": {"permissions": ["read_battery", "read_vehicle_info"],
                              "vehicle": {"make": "TESLA", "model": "Model 3", "year": 2021,
                                          "mode": "live", "powertrainType": "BEV"}},
               "relationships": {"vehicle": {"data": {"id": vehicle, "type": "vehicle"}},
                                 "user": {"data": {"id": user, "type": "user"}}},
               "meta": {"createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z"}})
    }

    #[test]
    fn a_connection_as_documented() {
        let c = parse_connection(&json!({"data": conn("c1", "u1", "v1")})).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.user_id, "u1");
        assert_eq!(c.vehicle_id, VehicleId("v1".into()));
        assert_eq!(c.permissions, ["read_battery", "read_vehicle_info"]);
        assert_eq!(
            c.vehicle,
            Some(VehicleInfo {
                make: "TESLA".into(),
                model: "Model 3".into(),
                year: 2021
            })
        );
        assert_eq!(c.powertrain.as_deref(), Some("BEV"));
        // Without user or vehicle there is nothing to poll.
        assert_eq!(
            parse_connection(&json!({"id": "x", "attributes": {}})),
            None
        );
    }

    #[test]
    fn pages_with_links_or_meta() {
        let p = parse_connections_page(&json!({
            "data": [conn("c1", "u1", "v1"), conn("c2", "u1", "v2")],
            "meta": {"page": 1, "pageSize": 2, "totalCount": 3},
            "links": {"self": "/v3/connections?page[number]=1", "next": "/v3/connections?page[number]=2&page[size]=2"}
        }))
        .unwrap();
        assert_eq!(p.connections.len(), 2);
        assert_eq!(
            p.next.as_deref(),
            Some("/v3/connections?page[number]=2&page[size]=2")
        );
        assert_eq!(p.paging, Some((1, 2, 3)));
        let p = parse_connections_page(&json!({"data": [], "links": {"next": null}})).unwrap();
        assert!(p.connections.is_empty() && p.next.is_none() && p.paging.is_none());
        assert!(parse_connections_page(&json!({"errors": []})).is_err());
    }
}
