//! A validating JSON scanner over an answer's bytes, for the fast path of the v3 signals
//! listing ([`super::v3::parse_signals_bytes`]).
//!
//! Why not serde: a listing carries 18 signals of which carpulse reads 7, and serde's derived
//! structs spent most of the parse validating and skipping the rest token by token, then
//! visiting each field name (issue 8: ~19 % of the daemon's CPU per poll). This scanner walks
//! the same bytes once, hands back the byte span of each value the caller asks for, and skips
//! everything else by string and bracket matching.
//!
//! What it accepts is what `serde_json` accepts when it skips a value
//! (`serde_json::de::Deserializer::ignore_value`): RFC 8259 syntax, no control characters in
//! strings, only the escapes JSON defines (`\u` with four hex digits), numbers as JSON writes
//! them, nothing after the document but whitespace. Like serde, it does not check the UTF-8 of
//! strings it skips nor the code points of `\u` escapes; the spans the caller reads are parsed
//! by serde afterwards, which checks them. Anything else (a truncated or malformed document,
//! nesting deeper than [`MAX_DEPTH`]) is `None`: the caller declines, and the tolerant tree
//! parser decides (so a bad document is a decode error, never a partial page).

/// Nesting the scanner follows before it declines. serde_json's tree stops at 128 levels, so
/// a document deeper than this is one the tree parser judges.
const MAX_DEPTH: u32 = 120;

/// A cursor over a JSON document. Every method returns `None` on anything it does not accept,
/// leaving the cursor somewhere undefined: the caller gives up on the whole document.
pub(crate) struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// What comes next inside an object.
pub(crate) enum Member<'a> {
    /// A member's key (its bytes between the quotes: no escapes, valid UTF-8); the cursor is
    /// on its value.
    Key(&'a [u8]),
    /// The closing brace, consumed.
    End,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Scanner { bytes, at: 0 }
    }

    /// Skips JSON whitespace (the four bytes RFC 8259 allows, as serde_json does).
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    #[inline]
    pub(crate) fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes.get(self.at).copied()
    }

    /// Consumes `b` (after whitespace), or fails.
    #[inline]
    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// The document ends here (trailing whitespace only).
    pub(crate) fn end(&mut self) -> Option<()> {
        self.ws();
        (self.at == self.bytes.len()).then_some(())
    }

    /// Consumes an object's opening brace.
    #[inline]
    pub(crate) fn open_object(&mut self) -> Option<()> {
        self.eat(b'{')
    }

    /// Consumes an array's opening bracket.
    #[inline]
    pub(crate) fn open_array(&mut self) -> Option<()> {
        self.eat(b'[')
    }

    /// Inside an object (after `{`): the next member's key, or its end. `first` is true until
    /// the first call returns. A key with an escape or invalid UTF-8 fails: serde would
    /// unescape (`"d\u0061ta"` is `data`) or reject it, and such keys do not occur in
    /// practice, so the caller declines rather than guess.
    pub(crate) fn member(&mut self, first: &mut bool) -> Option<Member<'a>> {
        match self.peek()? {
            b'}' => {
                self.at += 1;
                return Some(Member::End);
            }
            b',' if !*first => self.at += 1,
            b'"' if *first => {}
            _ => return None,
        }
        *first = false;
        self.eat(b'"')?;
        let start = self.at;
        if self.string_rest()? {
            return None;
        }
        let key = self.bytes.get(start..self.at - 1)?;
        // (A loop rather than `is_ascii`: keys are a few bytes, and a call per key showed.)
        if key.iter().any(|&b| b >= 0x80) {
            std::str::from_utf8(key).ok()?;
        }
        self.eat(b':')?;
        Some(Member::Key(key))
    }

    /// Inside an array (after `[`): true when an element follows (the cursor is on it), false
    /// at the closing bracket (consumed).
    pub(crate) fn element(&mut self, first: &mut bool) -> Option<bool> {
        match self.peek()? {
            b']' => {
                self.at += 1;
                Some(false)
            }
            b',' if !*first => {
                self.at += 1;
                Some(true)
            }
            _ if *first => {
                *first = false;
                Some(true)
            }
            _ => None,
        }
    }

    /// Skips one value and returns its bytes (without surrounding whitespace).
    #[inline]
    pub(crate) fn value(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.at;
        self.skip()?;
        self.bytes.get(start..self.at)
    }

    /// Skips one value, validating it as serde_json validates what it ignores. Iterative: a
    /// hostile nesting costs a bit per level in `open` (a stack of 128 bits: 1 for an object,
    /// 0 for an array), never the thread's stack.
    #[inline]
    pub(crate) fn skip(&mut self) -> Option<()> {
        // Most skipped values are strings: straight there, without the nesting machinery.
        if self.peek()? == b'"' {
            self.at += 1;
            return self.string_rest().map(drop);
        }
        self.skip_any()
    }

    /// [`Scanner::skip`] of any value.
    fn skip_any(&mut self) -> Option<()> {
        let mut open: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            // A value is due.
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return None;
                    }
                    open = (open << 1) | u128::from(b == b'{');
                    let close = if b == b'{' { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.at += 1;
                        depth -= 1;
                        open >>= 1;
                    } else {
                        if b == b'{' {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string_rest()?;
                }
                b'-' | b'0'..=b'9' => {
                    self.at -= 1;
                    self.number()?;
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                _ => return None,
            }
            // A value ended: close what it ends, or move on to the next element or member.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let in_object = open & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        if in_object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if in_object => {}
                    b']' if !in_object => {}
                    _ => return None,
                }
                self.at += 1;
                depth -= 1;
                open >>= 1;
            }
        }
    }

    /// A skipped member's key and its colon.
    #[inline]
    fn key(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.string_rest()?;
        self.eat(b':')
    }

    /// The rest of a literal after its first byte.
    #[inline]
    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.at + rest.len();
        (self.bytes.get(self.at..end)? == rest).then(|| self.at = end)
    }

    /// A number as serde_json's `ignore_integer` reads it: `-?(0|[1-9][0-9]*)(\.[0-9]+)?
    /// ([eE][+-]?[0-9]+)?`. Its range is not checked (serde does not when it skips).
    fn number(&mut self) -> Option<()> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.bytes.get(self.at)? {
            b'0' => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.bytes.get(self.at) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// Consumes ASCII digits; how many.
    #[inline]
    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.bytes.get(self.at) {
            self.at += 1;
        }
        self.at - start
    }

    /// The rest of a string after its opening quote, through the closing one; whether it
    /// held an escape. Eight bytes at a time while none of them needs a look (a quote, a
    /// backslash, a control character): most of a listing's bytes are in strings, most of
    /// them short and plain, which this inlined part ends; escapes and the document's last
    /// few bytes go to [`Scanner::string_slow`].
    #[inline]
    fn string_rest(&mut self) -> Option<bool> {
        let bytes = self.bytes;
        let mut at = self.at;
        while let Some(chunk) = bytes.get(at..at + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let found = needs_look(u64::from_le_bytes(word));
            if found != 0 {
                // Straight to the first byte that needs a look (a borrow only ever marks
                // bytes after a real one, so the lowest mark is real).
                at += (found.trailing_zeros() / 8) as usize;
                if bytes.get(at) == Some(&b'"') {
                    self.at = at + 1;
                    return Some(false);
                }
                break;
            }
            at += 8;
        }
        self.at = at;
        self.string_slow()
    }

    /// [`Scanner::string_rest`] from a byte that needs a look or the document's last seven:
    /// escapes are checked here, then eight at a time again (a loop, not a call back: a
    /// string of a million escapes must not cost a million stack frames).
    #[inline(never)]
    fn string_slow(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let found = needs_look(u64::from_le_bytes(word));
                if found != 0 {
                    self.at += (found.trailing_zeros() / 8) as usize;
                    break;
                }
                self.at += 8;
            }
            let b = *self.bytes.get(self.at)?;
            self.at += 1;
            match b {
                b'"' => return Some(escaped),
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                0..=0x1f => return None,
                _ => {}
            }
        }
    }

    /// An escape after its backslash: one of JSON's, `\u` with four hex digits (any code
    /// point: serde checks surrogates only where it reads the string).
    fn escape(&mut self) -> Option<()> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => {
                let hex = self.bytes.get(self.at..self.at + 4)?;
                self.at += 4;
                hex.iter().all(u8::is_ascii_hexdigit).then_some(())
            }
            _ => None,
        }
    }
}

/// The bytes of `w` (little-endian) that are a quote, a backslash or below 0x20, each marked by
/// its high bit (the bit tricks of "Bit Twiddling Hacks": a byte is zero / less than n). Zero
/// exactly when none is; otherwise the lowest mark is a real one (a borrow can only mark
/// bytes above one that really matches).
#[inline]
fn needs_look(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let quote = zero_in(w ^ (ONES * u64::from(b'"')));
    let backslash = zero_in(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    quote | backslash | control
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skips(text: &str) -> bool {
        let mut s = Scanner::new(text.as_bytes());
        s.skip().is_some() && s.end().is_some()
    }

    fn serde_skips(text: &str) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(text.as_bytes()).is_ok()
    }

    /// The scanner accepts exactly what serde_json accepts when it skips a value, on the
    /// corner cases of the grammar (the property test in `tests/parsers_prop.rs` covers
    /// whole listings and their mutations).
    #[test]
    fn the_scanner_accepts_what_serde_skips_and_nothing_else() {
        let cases = [
            "0",
            "-0",
            "01",
            "-",
            "1.",
            "1.5",
            "1e",
            "1e+",
            "1e+5",
            "1E-5",
            "-1.5e10",
            ".5",
            "+1",
            "1x",
            "true",
            "tru",
            "truex",
            "nul",
            "null",
            "false",
            "\"\"",
            "\"a\\\"b\"",
            "\"\\u00e9\"",
            "\"\\u00g9\"",
            "\"\\ud800\"",
            "\"\\x\"",
            "\"a\tb\"",
            "\"abc",
            "\"abcdefghijklmnop\\\"qrstuv\"",
            "[]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[1,2]",
            "{}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":1 \"b\":2}",
            "{1:2}",
            "{\"a\":[{\"b\":{}}]}",
            "[[[[]]]]",
            "[[[]]",
            "[]]",
            "{\"a\":1}}",
            " [ 1 , { \"x\" : null } ] ",
            "",
            " ",
            "[\"\u{7f}\"]",
            "[1]x",
            "{\"a\":}",
            "[\"12345678\\n\"]",
        ];
        for case in cases {
            assert_eq!(skips(case), serde_skips(case), "{case:?}");
        }
    }

    /// Strings of every length up to a few words with a byte that needs a look at every
    /// place: the eight-at-a-time search stops where the byte-at-a-time one would.
    #[test]
    fn strings_are_checked_wherever_their_special_bytes_fall() {
        for len in 0..20 {
            for at in 0..len {
                for special in ["\"", "\\n", "\\u00e9", "\\q", "\u{1}", "\u{e9}", "\\"] {
                    let mut text: String = "a".repeat(len);
                    text.replace_range(at..at + 1, special);
                    for case in [format!("\"{text}\""), format!("[\"{text}\",1]")] {
                        assert_eq!(skips(&case), serde_skips(&case), "{case:?}");
                    }
                }
            }
        }
        // Many escapes in one string: a loop, not a call per escape.
        let long = format!("\"{}\"", "\\n".repeat(200_000));
        assert!(skips(&long));
    }

    /// Word and block seams: a string whose quote follows an odd or even run of backslashes,
    /// a control character, an escape or a number, each placed at every offset around the
    /// first and second 64-byte seams (and so across every eight-byte word of the string
    /// search), in documents whose length is a multiple of 64 and not. The scanner accepts
    /// exactly what serde accepts.
    #[test]
    fn seams_change_nothing() {
        let pieces: Vec<String> = [
            "\\\"x",
            "\\\\",
            "\\\\\\\"y",
            "\\\\\\\\\\\\",
            "\\",
            "\\u00e9",
            "\\u00g9",
            "\u{1}",
            "\u{1f}",
            "\t",
            "\u{7f}",
            "\u{e9}",
            "\"",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        for pad in 0..140 {
            if !(56..72).contains(&pad) && !(120..136).contains(&pad) && pad > 8 {
                continue;
            }
            let lead = "a".repeat(pad);
            for piece in &pieces {
                for tail in ["", "bc", &"z".repeat(70)] {
                    for text in [
                        format!("[\"{lead}{piece}{tail}\"]"),
                        format!("\"{lead}{piece}{tail}\""),
                        format!("{{\"{lead}\":\"{piece}{tail}\",\"k\":1}}"),
                    ] {
                        assert_eq!(skips(&text), serde_skips(&text), "{text:?}");
                    }
                }
            }
            // Numbers and literals straddling the seam, and a document ending right at it.
            for scalar in ["-12.5e+3", "1234567", "true", "null", "-0", "01", "1.e5"] {
                for text in [
                    format!("[\"{lead}\",{scalar}]"),
                    format!("[{}{scalar}]", " ".repeat(pad)),
                ] {
                    assert_eq!(skips(&text), serde_skips(&text), "{text:?}");
                }
            }
        }
        for len in [62usize, 63, 64, 65, 127, 128, 129, 192] {
            // `"aaa…"`: exactly `len` bytes, then cut one short and one byte too many.
            let text = format!("\"{}\"", "a".repeat(len - 2));
            assert_eq!(text.len(), len);
            assert!(skips(&text));
            assert!(!skips(&text[..len - 1]));
            assert!(!skips(&format!("{text}\"")));
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_declined_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(!skips(&deep));
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(skips(&ok));
        let too_deep = format!("{}{}", "[".repeat(121), "]".repeat(121));
        assert!(!skips(&too_deep));
    }

    #[test]
    fn members_and_elements_walk_an_object() {
        let text = br#"{"a": [1, "x"], "b" : {"c": null}}"#;
        let mut s = Scanner::new(text);
        s.open_object().unwrap();
        let mut first = true;
        let mut seen = Vec::new();
        while let Member::Key(k) = s.member(&mut first).unwrap() {
            seen.push((k.to_vec(), s.value().unwrap().to_vec()));
        }
        s.end().unwrap();
        assert_eq!(
            seen,
            [
                (b"a".to_vec(), br#"[1, "x"]"#.to_vec()),
                (b"b".to_vec(), br#"{"c": null}"#.to_vec())
            ]
        );
        // An escaped key is declined, not guessed at.
        let mut s = Scanner::new(br#"{"d\u0061ta": 1}"#);
        s.open_object().unwrap();
        assert!(s.member(&mut true).is_none());
    }
}
