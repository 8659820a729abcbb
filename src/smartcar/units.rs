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
/// (tolerance for servers that send 68 rather than 0.68). A value that is no percentage at
/// all (negative, above 100, not finite) is `None`: a decode error for that reading, never
/// clamped into a plausible 0 % or 100 % (issue 11, item 9).
pub fn v2_fraction_to_percent(value: f64) -> Option<f64> {
    if !value.is_finite() || !(0.0..=100.0).contains(&value) {
        return None;
    }
    let pct = if value > 1.0 { value } else { value * 100.0 };
    Some(round6(pct))
}

/// The longest distance a car's odometer or range can show: ten million km (the record
/// odometer is under five million). Beyond it a number is a server's mistake, and at 1e308
/// it becomes `inf` metres on `/metrics`.
pub const MAX_KM: f64 = 1e7;

/// A distance in km that can be true of a car: finite, not negative, at most [`MAX_KM`].
pub fn plausible_km(km: f64) -> Option<f64> {
    (km.is_finite() && (0.0..=MAX_KM).contains(&km)).then_some(km)
}

/// A model year that can be true: 1900 up to next year + 1 (makers sell next year's models
/// from mid-year). `now_year` is passed in so the rule is testable.
pub fn plausible_year(year: f64, now_year: i32) -> Option<i32> {
    (year.is_finite() && year.fract() == 0.0 && year >= 1900.0 && year <= f64::from(now_year + 2))
        .then_some(year as i32)
}

/// Rounds to 6 decimals so `0.57 × 100` is stored as 57, not 56.99999999999999.
fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// v3 state of charge: percent by default; an explicit fraction unit is scaled. `Err` names
/// why it is no state of charge: an unknown unit, or a value outside 0–100 % (0–1 for a
/// fraction) or not finite, which is never clamped (issue 11, item 9).
pub fn v3_percent(value: f64, unit: Option<&str>) -> Result<f64, &'static str> {
    let pct = match unit.map(|u| u.trim().to_ascii_lowercase()) {
        None => value,
        Some(u) if u.is_empty() || u == "percent" || u == "%" || u == "pct" => value,
        Some(u) if u == "fraction" || u == "ratio" => value * 100.0,
        Some(_) => return Err("unit is not a percentage"),
    };
    if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
        return Err("value outside 0-100 %");
    }
    Ok(round6(pct))
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
        assert_eq!(v2_fraction_to_percent(0.68), Some(68.0));
        assert_eq!(v2_fraction_to_percent(1.0), Some(100.0));
        assert_eq!(v2_fraction_to_percent(0.0), Some(0.0));
        assert_eq!(v2_fraction_to_percent(0.57), Some(57.0));
        assert_eq!(v2_fraction_to_percent(68.0), Some(68.0));
        assert_eq!(v3_percent(75.0, Some("percent")), Ok(75.0));
        assert_eq!(v3_percent(75.0, None), Ok(75.0));
        assert_eq!(v3_percent(0.75, Some("ratio")), Ok(75.0));
        assert!(v3_percent(75.0, Some("kWh")).is_err());
        assert_eq!(parse_unit_system("Imperial"), Some(UnitSystem::Imperial));
    }

    #[test]
    fn absurd_values_are_refused_never_clamped() {
        for v in [250.0, -5.0, 1e308, f64::INFINITY, f64::NAN, 100.5] {
            assert_eq!(v2_fraction_to_percent(v), None, "v2 {v}");
            assert!(v3_percent(v, Some("percent")).is_err(), "v3 {v}");
        }
        assert!(v3_percent(1.5, Some("fraction")).is_err());
        assert_eq!(v3_percent(100.0, None), Ok(100.0));
        assert_eq!(plausible_km(DistanceUnit::Miles.to_km(1e308)), None);
        assert_eq!(plausible_km(-1.0), None);
        assert_eq!(plausible_km(0.0), Some(0.0));
        assert_eq!(plausible_year(0.0, 2026), None);
        assert_eq!(plausible_year(2_147_483_647.0, 2026), None);
        assert_eq!(plausible_year(1899.0, 2026), None);
        assert_eq!(plausible_year(2028.0, 2026), Some(2028));
        assert_eq!(plausible_year(2029.0, 2026), None);
        assert_eq!(plausible_year(2014.0, 2026), Some(2014));
    }
}
