//! What the read commands (`history`, `status`, `vehicles list`, `plan`) share in how they
//! print: times for people (local, with the zone) and for programs (ISO-8601 UTC), vehicles by
//! make and model rather than bare ids, and a closed pipe (`carpulse status | head -1`) that
//! ends the command quietly instead of panicking like `println!`.
//!
//! The commands write to a `&mut dyn Write` (stdout in the binary, a buffer in tests) and
//! return its errors; the binary treats [`is_broken_pipe`] as success.

use chrono::{DateTime, Local, TimeZone, Utc};

use crate::domain::UnixMillis;

/// Whether `e` is, somewhere in its chain, a write to a pipe whose reader has gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A time for people: local time with its UTC offset, e.g. `2026-11-30 15:04:05 +01:00`
/// (the zone of `TZ` or the system's).
pub fn local(at: UnixMillis) -> String {
    local_in(&Local, at)
}

/// [`local`] in a given zone (tests pass a fixed offset).
pub fn local_in<Tz: TimeZone>(tz: &Tz, at: UnixMillis) -> String
where
    Tz::Offset: std::fmt::Display,
{
    match DateTime::from_timestamp_millis(at) {
        Some(t) => t
            .with_timezone(tz)
            .format("%Y-%m-%d %H:%M:%S %:z")
            .to_string(),
        None => at.to_string(),
    }
}

/// A time for programs: ISO-8601 in UTC with milliseconds, e.g. `2026-11-30T14:04:05.123Z`.
pub fn iso_utc(at: UnixMillis) -> String {
    match DateTime::<Utc>::from_timestamp_millis(at) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => at.to_string(),
    }
}

/// The first 8 characters of a vehicle id: enough to tell a fleet's vehicles apart, and
/// accepted wherever a vehicle is named.
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(8) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// "TESLA Model 3 2021" (what is known of it), or "" when nothing is.
pub fn vehicle_name(make: Option<&str>, model: Option<&str>, year: Option<i32>) -> String {
    let year = year.map(|y| y.to_string());
    [make, model, year.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// "TESLA Model 3 2021 (5f2d4a21)", or the short id alone when make and model are unknown.
pub fn vehicle_label(id: &str, name: &str) -> String {
    if name.is_empty() {
        short_id(id).to_owned()
    } else {
        format!("{name} ({})", short_id(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_for_people_and_programs() {
        let at = 1_700_000_000_123;
        assert_eq!(iso_utc(at), "2023-11-14T22:13:20.123Z");
        let cet = chrono::FixedOffset::east_opt(3600).unwrap();
        assert_eq!(local_in(&cet, at), "2023-11-14 23:13:20 +01:00");
        assert_eq!(local_in(&Utc, at), "2023-11-14 22:13:20 +00:00");
    }

    #[test]
    fn vehicles_by_name() {
        let id = "5f2d4a21-0569-4787-8343-5727e965c661";
        let name = vehicle_name(Some("TESLA"), Some("Model 3"), Some(2021));
        assert_eq!(vehicle_label(id, &name), "TESLA Model 3 2021 (5f2d4a21)");
        assert_eq!(vehicle_label(id, ""), "5f2d4a21");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(vehicle_name(None, None, None), "");
    }

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the table");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
