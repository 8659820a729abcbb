//! Unit conversion into what the store keeps: percent 0–100 and kilometres. Smartcar sends
//! fractions in v2 and percent in v3, miles when asked for imperial, and spells v3 units in
//! several ways (`kilometers`/`km`, `miles`/`mi`), so every conversion is tolerant here and
//! nowhere else.

use crate::domain::UnitSystem;

/// Statute mile in kilometres (exact by definition).
pub const KM_PER_MILE: f64 = 1.609_344;

/// A distance unit as written in a v3 body (or implied by v2's `sc-unit-system`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistanceUnit {
    Kilometers,
    Miles,
}

impl DistanceUnit {
    /// Reads a unit string; `None` for one we do not know (the caller reports a decode error
    /// rather than store a number in the wrong unit).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "km" | "kms" | "kilometer" | "kilometers" | "kilometre" | "kilometres" => {
                Some(DistanceUnit::Kilometers)
            }
            "mi" | "mile" | "miles" => Some(DistanceUnit::Miles),
            _ => None,
        }
    }

    /// The unit of v2 distances under a unit system.
    pub fn of_system(system: UnitSystem) -> Self {
        match system {
            UnitSystem::Metric => DistanceUnit::Kilometers,
            UnitSystem::Imperial => DistanceUnit::Miles,
        }
    }

    pub fn to_km(self, value: f64) -> f64 {
        match self {
            DistanceUnit::Kilometers => value,
            DistanceUnit::Miles => value * KM_PER_MILE,
        }
    }
}

/// `sc-unit-system` as the server echoed it (case-insensitive); None if unknown.
pub fn parse_unit_system(s: &str) -> Option<UnitSystem> {
    match s.trim().to_ascii_lowercase().as_str() {
        "metric" => Some(UnitSystem::Metric),
        "imperial" => Some(UnitSystem::Imperial),
        _ => None,
    }
}

/// v2 `percentRemaining` is a 0–1 fraction; a value above 1 is taken as already percent
/// (tolerance for servers that send 68 rather than 0.68). Out-of-range values are clamped.
pub fn v2_fraction_to_percent(value: f64) -> f64 {
    let pct = if value > 1.0 { value } else { value * 100.0 };
    round6(pct.clamp(0.0, 100.0))
}

/// Rounds to 6 decimals so `0.57 × 100` is stored as 57, not 56.99999999999999.
fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// v3 state of charge: percent by default; an explicit fraction unit is scaled.
pub fn v3_percent(value: f64, unit: Option<&str>) -> Option<f64> {
    let pct = match unit.map(|u| u.trim().to_ascii_lowercase()) {
        None => value,
        Some(u) if u.is_empty() || u == "percent" || u == "%" || u == "pct" => value,
        Some(u) if u == "fraction" || u == "ratio" => value * 100.0,
        Some(_) => return None,
    };
    Some(round6(pct.clamp(0.0, 100.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_units() {
        for s in ["km", "kilometers", " Kilometres ", "KM"] {
            assert_eq!(
                DistanceUnit::parse(s),
                Some(DistanceUnit::Kilometers),
                "{s}"
            );
        }
        for s in ["mi", "miles", "Miles"] {
            assert_eq!(DistanceUnit::parse(s), Some(DistanceUnit::Miles), "{s}");
        }
        assert_eq!(DistanceUnit::parse("furlongs"), None);
        assert_eq!(DistanceUnit::Miles.to_km(100.0), 160.9344);
        assert_eq!(DistanceUnit::Kilometers.to_km(12.5), 12.5);
        assert_eq!(
            DistanceUnit::of_system(UnitSystem::Imperial),
            DistanceUnit::Miles
        );
    }

    #[test]
    fn percentages() {
        assert_eq!(v2_fraction_to_percent(0.68), 68.0);
        assert_eq!(v2_fraction_to_percent(1.0), 100.0);
        assert_eq!(v2_fraction_to_percent(0.0), 0.0);
        assert_eq!(v2_fraction_to_percent(0.57), 57.0);
        assert_eq!(v2_fraction_to_percent(68.0), 68.0);
        assert_eq!(v2_fraction_to_percent(250.0), 100.0);
        assert_eq!(v3_percent(75.0, Some("percent")), Some(75.0));
        assert_eq!(v3_percent(75.0, None), Some(75.0));
        assert_eq!(v3_percent(0.75, Some("ratio")), Some(75.0));
        assert_eq!(v3_percent(75.0, Some("kWh")), None);
        assert_eq!(parse_unit_system("Imperial"), Some(UnitSystem::Imperial));
    }
}
