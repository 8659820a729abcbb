//! The permissions a consent grants (smartcar-api.md §1.1 `scope`, §2.2 "Permission" column).
//!
//! Connect's `scope` names what the application asks for; the approval grants exactly that (the
//! `required:` prefix only marks a permission as mandatory, it grants the same thing). Without a
//! `scope` (newer docs: the dashboard's "Vehicle Access" configuration applies) the simulator
//! grants [`DEFAULT_GRANT`], every read permission it has data for. The authorization code
//! remembers the grant, the access and refresh tokens issued from it carry it, and every rotation
//! hands it on unchanged, as Smartcar's tokens keep the scope of their consent.
//!
//! A [`Scope`] is a bit set over [`KNOWN`], so it is `Copy` and costs 4 bytes per token.

/// Every permission Connect accepts in `scope` (Smartcar's list, smartcar-api.md §2.2 and its
/// docs). Order is the order `/permissions` lists them in.
pub(crate) const KNOWN: &[&str] = &[
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
    "read_location",
    "read_tires",
    "read_fuel",
    "read_engine_oil",
    "read_security",
    "read_speedometer",
    "read_thermometer",
    "read_compass",
    "read_climate",
    "read_extended_vehicle_info",
    "read_user_profile",
    "control_security",
    "control_charge",
    "control_climate",
    "control_navigation",
];

/// What a consent without `scope` grants: every read permission the simulator serves data for
/// (each v2 endpoint and v3 signal needs one of these), the first nine of [`KNOWN`].
pub(crate) const DEFAULT_GRANT: &[&str] = KNOWN.split_at(9).0;

const _: () = assert!(KNOWN.len() <= 32, "a Scope is a u32 bit set");

/// A set of granted permissions (bits index [`KNOWN`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Scope(u32);

fn bit(permission: &str) -> Option<u32> {
    KNOWN
        .iter()
        .position(|p| *p == permission)
        .map(|i| 1u32 << i)
}

impl Scope {
    /// [`DEFAULT_GRANT`].
    pub(crate) fn default_grant() -> Scope {
        Scope(
            DEFAULT_GRANT
                .iter()
                .filter_map(|p| bit(p))
                .fold(0, |a, b| a | b),
        )
    }

    /// The grant of an authorize request's `scope`: `None` or blank → [`DEFAULT_GRANT`];
    /// otherwise exactly the space-separated permissions, `required:` stripped. `Err` lists the
    /// permissions Smartcar does not know.
    pub(crate) fn from_request(scope: Option<&str>) -> Result<Scope, Vec<String>> {
        let Some(scope) = scope.filter(|s| !s.trim().is_empty()) else {
            return Ok(Scope::default_grant());
        };
        let mut bits = 0;
        let mut unknown = Vec::new();
        for requested in scope.split_whitespace() {
            match bit(requested.trim_start_matches("required:")) {
                Some(b) => bits |= b,
                None => unknown.push(requested.to_owned()),
            }
        }
        if unknown.is_empty() {
            Ok(Scope(bits))
        } else {
            Err(unknown)
        }
    }

    /// Whether `permission` was granted.
    pub(crate) fn allows(self, permission: &str) -> bool {
        bit(permission).is_some_and(|b| self.0 & b != 0)
    }

    /// The granted permissions, in [`KNOWN`] order.
    pub(crate) fn names(self) -> Vec<&'static str> {
        KNOWN
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// The permission a v2 vehicle resource needs (smartcar-api.md §2.2), by its path relative to
/// `/v2.0/vehicles/{id}` (`/` or empty for the vehicle info). `None` for paths that need none
/// (`/permissions`) and for unknown paths (they answer 404 RESOURCE_NOT_FOUND).
pub(crate) fn v2_permission(path: &str) -> Option<&'static str> {
    Some(match path.trim_end_matches('/') {
        "" => "read_vehicle_info",
        "/vin" => "read_vin",
        "/battery" | "/battery/capacity" | "/battery/nominal_capacity" => "read_battery",
        "/charge" | "/charge/limit" => "read_charge",
        "/odometer" => "read_odometer",
        "/location" => "read_location",
        "/tires/pressure" => "read_tires",
        "/fuel" => "read_fuel",
        "/engine/oil" => "read_engine_oil",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_grant_exactly_what_they_name() {
        let s = Scope::from_request(Some("read_vehicle_info required:read_battery")).unwrap();
        assert_eq!(s.names(), ["read_vehicle_info", "read_battery"]);
        assert!(s.allows("read_battery") && !s.allows("read_charge"));
        assert!(!s.allows("read_nothing"));
        let unknown = Scope::from_request(Some("read_battery read_minds required:x")).unwrap_err();
        assert_eq!(unknown, ["read_minds", "required:x"]);
        for absent in [None, Some(""), Some("  ")] {
            assert_eq!(Scope::from_request(absent).unwrap().names(), DEFAULT_GRANT);
        }
        // Every default permission is known, and every v2 path maps to a default permission.
        assert_eq!(Scope::default_grant().names().len(), DEFAULT_GRANT.len());
        for path in [
            "/",
            "",
            "/vin",
            "/battery/capacity",
            "/charge/limit",
            "/engine/oil/",
        ] {
            assert!(
                DEFAULT_GRANT.contains(&v2_permission(path).unwrap()),
                "{path}"
            );
        }
        assert_eq!(v2_permission("/permissions"), None);
        assert_eq!(v2_permission("/warp"), None);
    }
}
