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

/// A writer that makes text safe for a terminal: every control character except newline and
/// tab (C0, DEL and C1, which carry escape sequences: cursor moves, a new window title, a
/// cleared screen, OSC 8 links) becomes U+FFFD. Make, model, ids, reasons and error codes come
/// from Smartcar's answers, so the read commands print through it (issue 11).
pub struct Printable<W> {
    inner: W,
    /// The last byte written was 0xC2, which starts a C1 control (U+0080..U+009F) or a
    /// printable character, depending on the next byte.
    c2: bool,
}

const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

impl<W> Printable<W> {
    pub fn new(inner: W) -> Printable<W> {
        Printable { inner, c2: false }
    }
}

impl<W: std::io::Write> std::io::Write for Printable<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 2);
        for &b in buf {
            if std::mem::take(&mut self.c2) {
                if (0x80..=0x9f).contains(&b) {
                    out.extend_from_slice(REPLACEMENT);
                    continue;
                }
                out.push(0xc2);
            }
            match b {
                b'\n' | b'\t' => out.push(b),
                0x00..=0x1f | 0x7f => out.extend_from_slice(REPLACEMENT),
                0xc2 => self.c2 = true,
                _ => out.push(b),
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if std::mem::take(&mut self.c2) {
            self.inner.write_all(&[0xc2])?;
        }
        self.inner.flush()
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
    fn terminal_escapes_never_reach_the_terminal() {
        use std::io::Write;
        let mut out = Printable::new(Vec::new());
        let hostile =
            "\u{1b}]0;pwned\u{7}TESLA\u{1b}[2J Model\u{9b}31m 3\r\u{7f}\tok\nnext é ünï\n";
        // Written in pieces that split the two bytes of U+009B.
        let bytes = hostile.as_bytes();
        let split = bytes.iter().position(|b| *b == 0xc2).unwrap() + 1;
        out.write_all(&bytes[..split]).unwrap();
        out.write_all(&bytes[split..]).unwrap();
        out.flush().unwrap();
        let text = String::from_utf8(out.inner).unwrap();
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{text:?}"
        );
        assert_eq!(
            text,
            "\u{fffd}]0;pwned\u{fffd}TESLA\u{fffd}[2J Model\u{fffd}31m 3\u{fffd}\u{fffd}\tok\nnext é ünï\n"
        );
    }

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
