//! The one scrubber for text taken from an answer (error bodies, descriptions, codes, make and
//! model): every secret carpulse holds is replaced in every encoding it sends, and the text is
//! cut to a bounded length, before it reaches a log line, an error or the store.
//!
//! Why encodings and not only the raw secret: a hostile or merely careless server (a proxy's
//! error page that echoes the request) hands back what it *received*, i.e. `Bearer <token>`,
//! the Basic header `base64(client_id:client_secret)` and form bodies with percent-encoding.
//! Scrubbing only the raw client secret left its Base64 in a WARN line (issue 11, item 3).
//!
//! Secrets come from two places: those the process holds for its whole life (the client
//! secrets, registered once at client construction with [`register_client`]), and those of the
//! request at hand (its bearer token, refresh token or authorization code), passed in by the
//! caller. Rotating tokens are not kept in a process-wide list: it would grow with every
//! refresh, and an answer can only echo what its own request carried.

use std::sync::RwLock;

use base64::Engine as _;

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";
/// The most characters of answer text kept for a description (logs, errors, the store).
pub const MAX_TEXT: usize = 200;
/// The most characters kept of a short field (an error `type` or `code`, a make or model).
pub const MAX_FIELD: usize = 64;
/// Shorter strings are not scrubbed: replacing "a" everywhere would destroy the text and
/// protect nothing (no secret carpulse holds is that short).
const MIN_SECRET_LEN: usize = 4;

/// The encodings of the process-lifetime secrets (client secrets), filled at client build.
static PINNED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a client id/secret pair (Connect credentials, or API credentials): the raw
/// secret, its form encodings, and the Basic header values carpulse (through `oauth2`, which
/// form-encodes both halves first, RFC 6749 §2.3.1) or a plain client would send.
pub fn register_client(client_id: &str, client_secret: &str) {
    if client_secret.len() < MIN_SECRET_LEN {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = encodings(client_secret);
    forms.push(b64.encode(format!("{client_id}:{client_secret}")));
    forms.push(b64.encode(format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(client_secret)
    )));
    let mut pinned = PINNED.write().unwrap_or_else(|p| p.into_inner());
    for f in forms {
        if !pinned.contains(&f) {
            pinned.push(f);
        }
    }
    // Longest first: a Basic value is replaced whole before any part of it could be.
    pinned.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// A secret as carpulse may send it: raw, and form-encoded (upper- and lower-case hex).
fn encodings(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_owned()];
    let form = form_encode(secret);
    if form != secret {
        out.push(form.to_ascii_lowercase_hex());
        out.push(form);
    }
    out
}

/// `application/x-www-form-urlencoded` as the `form_urlencoded` crate (oauth2, reqwest) writes
/// it: alphanumerics and `*-._` kept, space as `+`, every other byte `%XX`.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

trait LowerHex {
    fn to_ascii_lowercase_hex(&self) -> String;
}

impl LowerHex for String {
    /// `%2F` → `%2f`: some servers echo percent-encoding in lower case.
    fn to_ascii_lowercase_hex(&self) -> String {
        let mut out = String::with_capacity(self.len());
        let mut chars = self.chars().peekable();
        while let Some(c) = chars.next() {
            out.push(c);
            if c == '%' {
                for _ in 0..2 {
                    if let Some(h) = chars.next() {
                        out.push(h.to_ascii_lowercase());
                    }
                }
            }
        }
        out
    }
}

/// Scrubs `text` of every pinned secret and of `extra` (the request's own secrets, in every
/// encoding), then cuts it to `max` characters. Only a bounded head of `text` is ever looked
/// at, so a huge body costs no more than a small one; the cut comes after the scrub, so a
/// secret straddling the cut cannot leave its first half behind.
pub fn scrub_to(text: &str, extra: &[&str], max: usize) -> String {
    let longest = {
        let pinned = PINNED.read().unwrap_or_else(|p| p.into_inner());
        pinned.first().map(String::len).unwrap_or(0)
    }
    .max(extra.iter().map(|e| e.len() * 3).max().unwrap_or(0));
    // Enough of the head to hold `max` characters plus any secret that begins inside them.
    let head_bytes = max.saturating_mul(4).saturating_add(longest);
    let head = match text.char_indices().nth(head_bytes) {
        Some((i, _)) => &text[..i],
        None => text,
    };
    // A secret longer than the text cannot be in it, nor can any of its encodings (none is
    // shorter than the secret): the make, model and VIN of every poll are shorter than any
    // token, so they skip the encodings and the copies below.
    let fits = |len: usize| len >= MIN_SECRET_LEN && len <= head.len();
    let mut out = head.to_owned();
    for e in extra.iter().filter(|e| fits(e.len())) {
        for form in encodings(e) {
            if out.contains(&form) {
                out = out.replace(&form, REDACTED);
            }
        }
    }
    {
        let pinned = PINNED.read().unwrap_or_else(|p| p.into_inner());
        for p in pinned.iter() {
            if p.len() <= out.len() && out.contains(p.as_str()) {
                out = out.replace(p.as_str(), REDACTED);
            }
        }
    }
    // Control characters (terminal escapes, a newline that would forge a log line) never
    // leave an answer either.
    if out.chars().any(char::is_control) {
        out = out
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
    }
    super::error::excerpt(out.trim(), max)
}

/// [`scrub_to`] at [`MAX_TEXT`]: descriptions and messages.
pub fn scrub(text: &str, extra: &[&str]) -> String {
    scrub_to(text, extra, MAX_TEXT)
}

/// [`scrub_to`] at [`MAX_FIELD`]: error types and codes, makes and models.
pub fn scrub_field(text: &str, extra: &[&str]) -> String {
    scrub_to(text, extra, MAX_FIELD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_of_a_request_secret_goes() {
        let token = "tok/en+1234 x";
        let text = format!(
            "echo: Authorization: Bearer {token}; body refresh_token=tok%2Fen%2B1234+x; lower tok%2fen%2b1234+x"
        );
        let out = scrub(&text, &[token]);
        assert!(!out.contains("1234"), "{out}");
        assert!(out.contains("Bearer [redacted]"), "{out}");
    }

    #[test]
    fn the_basic_header_of_a_registered_client_goes() {
        register_client("scrub-test-id", "scrub-test-secret");
        let b64 = base64::engine::general_purpose::STANDARD;
        let basic = b64.encode("scrub-test-id:scrub-test-secret");
        let out = scrub(&format!("you sent Authorization: Basic {basic}"), &[]);
        assert!(!out.contains(&basic), "{out}");
        assert!(out.ends_with(REDACTED), "{out}");
        let out = scrub("client_secret=scrub-test-secret&x=1", &[]);
        assert_eq!(out, "client_secret=[redacted]&x=1");
    }

    #[test]
    fn a_secret_is_found_in_a_text_exactly_its_length_and_short_texts_pass_whole() {
        let token = "tok/en+1234";
        assert_eq!(scrub_field(token, &[token]), REDACTED);
        // Its form encoding is longer than the raw token and still found when it fits.
        assert_eq!(scrub_field("tok%2Fen%2B1234", &[token]), REDACTED);
        assert_eq!(scrub_field(" Model 3 ", &[token]), "Model 3");
        assert_eq!(
            scrub_field("5YJ3E1EA7KF000001", &[token]),
            "5YJ3E1EA7KF000001"
        );
        assert_eq!(scrub_field("", &[token]), "");
    }

    #[test]
    fn text_is_cut_after_scrubbing_and_stripped_of_control_characters() {
        let secret = "abcdefghij-secret";
        let text = format!("{}{secret}", "x".repeat(195));
        let out = scrub(&text, &[secret]);
        assert!(!out.contains("abcde"), "no half secret at the cut: {out}");
        assert!(out.chars().count() <= MAX_TEXT + 1);
        assert_eq!(scrub_field("Tesla\u{1b}[31m", &[]), "Tesla [31m");
        let huge = "y".repeat(5_000_000);
        assert_eq!(scrub(&huge, &[]).chars().count(), MAX_TEXT + 1);
    }
}
