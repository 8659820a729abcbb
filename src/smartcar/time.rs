//! When a value was true at the car: v2's `sc-data-age` header and v3's `meta.oemUpdatedAt`,
//! turned into a [`Stamp`]. Kept apart because both APIs disagree on the format (ISO strings,
//! epoch milliseconds, epoch seconds) and a wrong guess silently corrupts the history.

use serde_json::Value;

use crate::domain::{Stamp, UnixMillis};

/// Epoch numbers below this are seconds (1e11 ms is 1973, 1e11 s is year 5138), so a v3 server
/// that sends seconds (the docs' example `1696156800`) is read right.
const SECONDS_THRESHOLD: f64 = 1e11;

/// Parses an ISO-8601 / RFC 3339 timestamp (`2018-06-20T01:33:37.078Z`); also tolerates a
/// missing zone (read as UTC) and a space instead of `T`.
pub fn parse_iso(s: &str) -> Option<UnixMillis> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    let s = s.replace(' ', "T");
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&s) {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(&s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// v2 `sc-data-age` (an ISO string).
pub fn parse_data_age(s: &str) -> Option<UnixMillis> {
    parse_iso(s)
}

/// v3 `meta.oemUpdatedAt`: a number of milliseconds (seconds when < 1e11), a numeric string,
/// or an ISO string.
pub fn parse_epoch_value(v: &Value) -> Option<UnixMillis> {
    match v {
        Value::Number(n) => epoch_number(n.as_f64()?),
        Value::String(s) => parse_epoch_text(s),
        _ => None,
    }
}

/// [`parse_epoch_value`] of a JSON string's content.
pub fn parse_epoch_text(s: &str) -> Option<UnixMillis> {
    match s.trim().parse::<f64>() {
        Ok(n) => epoch_number(n),
        Err(_) => parse_iso(s),
    }
}

/// [`parse_epoch_value`] of a JSON value's text, without building the value: a number, or a
/// string (escapes and all).
pub fn parse_epoch_json(text: &str) -> Option<UnixMillis> {
    if text.starts_with('"') {
        // Borrowed unless it has escapes (a `Cow<str>` would always copy).
        match serde_json::from_str::<&str>(text) {
            Ok(s) => parse_epoch_text(s),
            Err(_) => parse_epoch_text(&serde_json::from_str::<String>(text).ok()?),
        }
    } else {
        match serde_json::from_str::<Value>(text).ok()? {
            Value::Number(n) => epoch_number(n.as_f64()?),
            _ => None,
        }
    }
}

fn epoch_number(n: f64) -> Option<UnixMillis> {
    if !n.is_finite() || n <= 0.0 {
        return None;
    }
    let ms = if n < SECONDS_THRESHOLD { n * 1000.0 } else { n };
    // Beyond year ~292 million chrono-wise nonsense; reject rather than saturate.
    (ms < 1e15).then_some(ms.round() as i64)
}

/// The stamp of a reading: `recorded` when known, else `fetched_at`; a recorded time later than
/// `fetched_at` (a car or server clock ahead of ours) is clamped to `fetched_at`, so no stored
/// reading claims to come from the future.
pub fn stamp(recorded: Option<UnixMillis>, fetched_at: UnixMillis) -> Stamp {
    let recorded_at = match recorded {
        Some(r) if r <= fetched_at => r,
        _ => fetched_at,
    };
    Stamp {
        recorded_at,
        fetched_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: i64 = 1_529_458_417_078; // 2018-06-20T01:33:37.078Z

    #[test]
    fn iso_forms() {
        assert_eq!(parse_data_age("2018-06-20T01:33:37.078Z"), Some(T));
        assert_eq!(parse_data_age("2018-06-20T03:33:37.078+02:00"), Some(T));
        assert_eq!(parse_data_age("2018-06-20 01:33:37.078Z"), Some(T));
        assert_eq!(parse_data_age("2018-06-20T01:33:37.078"), Some(T));
        assert_eq!(parse_data_age("yesterday"), None);
        assert_eq!(parse_data_age(""), None);
    }

    #[test]
    fn epoch_forms() {
        assert_eq!(
            parse_epoch_value(&json!(1752104118549_i64)),
            Some(1752104118549)
        );
        assert_eq!(parse_epoch_value(&json!(1696156800)), Some(1696156800000));
        assert_eq!(parse_epoch_value(&json!(1696156800.5)), Some(1696156800500));
        assert_eq!(
            parse_epoch_value(&json!("1752104118549")),
            Some(1752104118549)
        );
        assert_eq!(
            parse_epoch_value(&json!("2018-06-20T01:33:37.078Z")),
            Some(T)
        );
        assert_eq!(parse_epoch_value(&json!(null)), None);
        assert_eq!(parse_epoch_value(&json!(-5)), None);
        assert_eq!(parse_epoch_value(&json!("garbage")), None);
    }

    #[test]
    fn stamp_falls_back_and_clamps() {
        assert_eq!(
            stamp(Some(T), T + 5_000),
            Stamp {
                recorded_at: T,
                fetched_at: T + 5_000
            }
        );
        assert_eq!(
            stamp(None, T),
            Stamp {
                recorded_at: T,
                fetched_at: T
            }
        );
        assert_eq!(
            stamp(Some(T + 60_000), T),
            Stamp {
                recorded_at: T,
                fetched_at: T
            }
        );
    }
}
