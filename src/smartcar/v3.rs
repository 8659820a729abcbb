//! Vehicle API v3 (smartcar-api.md §3): `GET /vehicles/{id}` and the paged
//! `GET /vehicles/{id}/signals`, from which a job's endpoints are picked by signal code.
//!
//! One signals listing per job (rather than one request per signal) because every request
//! may wake the car. Pure functions parse pages and pick readings, so the tolerance rules
//! (envelope with or without `data`, ms or s timestamps, unit spellings, failed signals,
//! relative `links.next`) are unit-tested without a server.

use reqwest::{Method, Url};
use serde_json::Value;

use super::error::{api_error_from, ApiError, ErrorBody, ErrorKind};
use super::scan::{Member, Scanner};
use super::time::{parse_epoch_json, parse_epoch_value, stamp};
use super::units::{plausible_km, v3_percent, DistanceUnit};
use super::v2::{info_from_parts, parse_info, value_bool, value_num, value_raw_num};
use super::{Endpoint, EndpointResult, Job, Payload, RequestCtx, SmartcarClient};
use crate::domain::{
    BatteryReading, ChargeReading, ChargeState, OdometerReading, UnitSystem, UnixMillis, VehicleId,
    VehicleInfo,
};

/// A bound on `links.next` chains (a server that links a page to itself or loops forever).
pub const MAX_PAGES: usize = 50;

pub const SOC: &str = "tractionbattery-stateofcharge";
pub const RANGE: &str = "tractionbattery-range";
pub const CABLE: &str = "charge-ischargingcableconnected";
pub const DETAILED_STATUS: &str = "charge-detailedchargingstatus";
pub const IS_CHARGING: &str = "charge-ischarging";
pub const VIN: &str = "vehicleidentification-vin";
pub const ODOMETER: &str = "odometer-traveleddistance";

/// One signal of a listing, reduced to what the picks need.
#[derive(Clone, Debug, PartialEq)]
pub struct Signal {
    /// Lower-case kebab code, e.g. `tractionbattery-stateofcharge`: one of [`READ`]'s own
    /// strings when it is one carpulse reads (no copy per signal per poll).
    pub code: std::borrow::Cow<'static, str>,
    /// Set when `status.value` is ERROR, classified from `status.error.type`/`code`.
    pub error: Option<ApiError>,
    pub body: SignalBody,
    /// `meta.oemUpdatedAt`, when given and parsable.
    pub recorded: Option<UnixMillis>,
    /// When the page holding the signal arrived.
    pub fetched_at: UnixMillis,
}

/// What carpulse reads of a signal's `body`: its `value` and `unit`. Read straight into these
/// three fields rather than kept as a tree (a map and its keys per signal on every poll).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SignalBody {
    /// `body.value` as sent (`Some(Null)`: an explicit null); None when the body has none.
    pub value: Option<Value>,
    /// `body.unit`, when it is a string.
    pub unit: Option<String>,
    /// The body is absent or null: no reading this time (smartcar-api.md §10.4).
    pub bodiless: bool,
}

impl SignalBody {
    const NONE: SignalBody = SignalBody {
        value: None,
        unit: None,
        bodiless: true,
    };

    /// From a body already parsed (the tolerant tree parser).
    fn of_value(body: Option<&Value>) -> SignalBody {
        match body {
            None | Some(Value::Null) => SignalBody::NONE,
            Some(b) => SignalBody {
                value: b.get("value").cloned(),
                unit: b.get("unit").and_then(Value::as_str).map(str::to_owned),
                bodiless: false,
            },
        }
    }

    /// From the body's bytes (the byte parser); None when it is an object the tree parser
    /// could read differently (a member named twice), so the caller falls back.
    fn of_span(body: Option<&[u8]>) -> Option<SignalBody> {
        let text = match body {
            None | Some(b"null") => return Some(SignalBody::NONE),
            Some(text) => text,
        };
        // Not an object: no `value` (the tree's `get` finds no member in an array or a scalar).
        if !text.starts_with(b"{") {
            return Some(SignalBody {
                value: None,
                unit: None,
                bodiless: false,
            });
        }
        let [value, unit] = fields(&mut Scanner::new(text), [b"value", b"unit"])?;
        Some(SignalBody {
            // An explicit null is kept (`Some(Null)`): it means "no reading", not "no value".
            value: match value {
                Some(v) => Some(serde_json::from_slice::<Value>(v).ok()?),
                None => None,
            },
            unit: match unit {
                Some(u) => string_of(u).ok()?.map(std::borrow::Cow::into_owned),
                None => None,
            },
            bodiless: false,
        })
    }

    /// `value` as a finite number (a numeric string counts), as the v2 parser reads numbers.
    fn number(&self) -> Option<f64> {
        self.value.as_ref().and_then(value_num)
    }
}

/// One page of `GET /vehicles/{id}/signals`.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalsPage {
    pub signals: Vec<Signal>,
    pub next: Option<String>,
    /// `included.vehicle`, which spares the Info job a request.
    pub vehicle: Option<VehicleInfo>,
    /// `meta.totalCount`, when given.
    pub total_count: Option<u64>,
    /// Items in `data`, those carpulse reads or not (an empty listing has none).
    pub items: usize,
    /// `meta.pageSize`, when given.
    pub page_size: Option<u64>,
}

/// The signals carpulse reads from a listing; the others are counted and skipped.
const READ: [&str; 7] = [
    SOC,
    RANGE,
    CABLE,
    DETAILED_STATUS,
    IS_CHARGING,
    VIN,
    ODOMETER,
];

/// The included vehicle read from its bytes without a tree (it comes with every listing and
/// cost more than a signal: ~3 % of a poll's CPU in the fleet profile), in its documented
/// shape only: an object whose `attributes` object holds the make, model and year
/// (smartcar-api.md §10). `None` for any other shape (a `data` wrapper, members at the top, a
/// member named twice, a make that is not a string): the caller asks [`parse_vehicle`], whose
/// answer this one must equal.
fn vehicle_of_text(raw: &[u8]) -> Option<Result<VehicleInfo, String>> {
    if !raw.starts_with(b"{") {
        return None;
    }
    let [data, attrs] = fields(&mut Scanner::new(raw), [b"data", b"attributes"])?;
    if data.is_some() {
        return None;
    }
    let attrs = attrs.filter(|a| a.starts_with(b"{"))?;
    let [make, model, year] = fields(&mut Scanner::new(attrs), [b"make", b"model", b"year"])?;
    // A make or model that is there must be a string or null (anything else: the tree).
    fn text(t: Option<&[u8]>) -> Option<Option<std::borrow::Cow<'_, str>>> {
        match t {
            None | Some(b"null") => Some(None),
            Some(t) => string_of(t).ok()?.map(Some),
        }
    }
    let (make, model) = (text(make)?, text(model)?);
    let year = match year {
        None | Some(b"null") => None,
        Some(y) => value_raw_num(&serde_json::from_slice::<Value>(y).ok()?),
    };
    Some(info_from_parts(make.as_deref(), model.as_deref(), year))
}

/// [`vehicle_of_text`] of a raw value (the unit tests build them).
#[cfg(test)]
fn vehicle_of_raw(raw: &serde_json::value::RawValue) -> Option<Result<VehicleInfo, String>> {
    vehicle_of_text(raw.get().as_bytes())
}

/// The members of a listing item (or of its `attributes`) that carpulse may read, as spans of
/// the answer's bytes, their values unparsed.
#[derive(Default)]
struct ItemSpans<'a> {
    id: Option<&'a [u8]>,
    code: Option<&'a [u8]>,
    status: Option<&'a [u8]>,
    body: Option<&'a [u8]>,
    meta: Option<&'a [u8]>,
}

impl<'a> ItemSpans<'a> {
    /// Where the member named `key` goes, if carpulse reads it. `id` only at the item's own
    /// level: the tree parser never looks at `attributes.id`.
    fn slot(&mut self, key: &[u8], with_id: bool) -> Option<&mut Option<&'a [u8]>> {
        match key {
            b"code" => Some(&mut self.code),
            b"status" => Some(&mut self.status),
            b"body" => Some(&mut self.body),
            b"meta" => Some(&mut self.meta),
            b"id" if with_id => Some(&mut self.id),
            _ => None,
        }
    }

    /// The members of the object at the cursor (after its `{`). A member named twice: `None`
    /// (the tree keeps the last one; declining is simpler than agreeing, and never seen).
    fn scan(&mut self, s: &mut Scanner<'a>, with_id: bool) -> Option<()> {
        let mut first = true;
        while let Member::Key(key) = s.member(&mut first)? {
            match self.slot(key, with_id) {
                Some(slot) if slot.is_none() => *slot = Some(s.value()?),
                Some(_) => return None,
                None => s.skip()?,
            }
        }
        Some(())
    }
}

/// An item's `attributes`: absent (the tree reads the item's own members), an object (its
/// members, and the item's own where it lacks one), or anything else (no code of its own:
/// the tree's `get` finds no member in a null, an array or a scalar).
enum Attrs<'a> {
    Absent,
    Object(ItemSpans<'a>),
    Other,
}

/// One item of `data`, the cursor on its `{`, read into `item` and `attrs` (both empty on
/// entry; filled in place rather than returned: a returned pair was a memcpy per item).
fn scan_item<'a>(
    s: &mut Scanner<'a>,
    item: &mut ItemSpans<'a>,
    attrs: &mut Attrs<'a>,
) -> Option<()> {
    s.open_object()?;
    let mut first = true;
    while let Member::Key(key) = s.member(&mut first)? {
        if key == b"attributes" {
            if !matches!(attrs, Attrs::Absent) {
                return None;
            }
            // Read in place: `attributes` is most of an item, scanned once.
            *attrs = if s.peek()? == b'{' {
                s.open_object()?;
                let mut a = ItemSpans::default();
                a.scan(s, false)?;
                Attrs::Object(a)
            } else {
                s.skip()?;
                Attrs::Other
            };
            continue;
        }
        match item.slot(key, true) {
            Some(slot) if slot.is_none() => *slot = Some(s.value()?),
            Some(_) => return None,
            None => s.skip()?,
        }
    }
    Some(())
}

/// A span as text. Invalid UTF-8 in a part carpulse reads: `None` (serde rejects it there too).
fn text_of(span: &[u8]) -> Option<&str> {
    std::str::from_utf8(span).ok()
}

/// The string a span holds, borrowed when it has no escape. `Ok(None)`: not a string.
/// `Err(())`: a string serde would reject (invalid UTF-8, a lone surrogate), so the caller
/// declines.
fn string_of(span: &[u8]) -> Result<Option<std::borrow::Cow<'_, str>>, ()> {
    let Some(inner) = span.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")) else {
        return Ok(None);
    };
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner)
            .map(|s| Some(std::borrow::Cow::Borrowed(s)))
            .map_err(drop);
    }
    serde_json::from_slice::<String>(span)
        .map(|s| Some(std::borrow::Cow::Owned(s)))
        .map_err(drop)
}

/// `Value::as_u64` of the number a span holds, without building the value: only a plain
/// non-negative integer that fits is one (serde reads a fraction, an exponent, `-0` or a
/// larger integer as a float).
fn u64_of(span: &[u8]) -> Option<u64> {
    if span.is_empty() || !span.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text_of(span)?.parse().ok()
}

/// The members named in `names` of the object at the cursor (each once; twice: `None`). A
/// value that is not an object has none of them (as the tree's `get` says), and is skipped.
fn fields<'a, const N: usize>(
    s: &mut Scanner<'a>,
    names: [&[u8]; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut out = [None; N];
    if s.peek()? != b'{' {
        s.skip()?;
        return Some(out);
    }
    s.open_object()?;
    let mut first = true;
    while let Member::Key(key) = s.member(&mut first)? {
        match names.iter().position(|n| *n == key) {
            Some(i) if out[i].is_none() => out[i] = Some(s.value()?),
            Some(_) => return None,
            None => s.skip()?,
        }
    }
    Some(out)
}

/// The signal an item of `data` makes, with the tree parser's rules ([`parse_signal`]) applied
/// to spans: `Some(None)` when it is not one carpulse reads (or has no string code), `None`
/// when the fast path declines the page.
fn signal_of_spans(
    item: &ItemSpans<'_>,
    attrs: &Attrs<'_>,
    fetched_at: UnixMillis,
    request_id: Option<&str>,
) -> Option<Option<Signal>> {
    let empty = ItemSpans::default();
    let (own, has_attrs) = match attrs {
        Attrs::Absent => (&empty, false),
        Attrs::Object(a) => (a, true),
        Attrs::Other => (&empty, true),
    };
    // `attributes.code`, else `id`; with no `attributes`, the item's own `code`, else `id`.
    let code = if has_attrs {
        own.code.or(item.id)
    } else {
        item.code.or(item.id)
    };
    let Some(code) = code else {
        return Some(None);
    };
    // Most codes are plain ASCII: compared as bytes, so an item carpulse does not read costs
    // no UTF-8 check or copy. (JSON cannot hold a raw tab or newline in a string, so the
    // ASCII whitespace `str::trim` would cut is a space here.)
    if let Some(plain) = code
        .strip_prefix(b"\"")
        .and_then(|c| c.strip_suffix(b"\""))
        .filter(|c| c.iter().all(|&b| b != b'\\' && b < 0x80))
    {
        let plain = plain.trim_ascii();
        if !READ
            .iter()
            .any(|c| c.as_bytes().eq_ignore_ascii_case(plain))
        {
            return Some(None);
        }
    }
    let Some(code) = string_of(code).ok()? else {
        return Some(None);
    };
    let code = code.trim();
    if !READ.iter().any(|c| c.eq_ignore_ascii_case(code)) {
        return Some(None);
    }
    // A status that is not the documented object: the tolerant parser decides.
    let (status_value, error) = match own.status.or(item.status) {
        Some(b"null") | None => (None, None),
        Some(r) if r.starts_with(b"{") => {
            let [value, error] = fields(&mut Scanner::new(r), [b"value", b"error"])?;
            // `value` must be a string or null (anything else: the tree decides).
            let value = match value {
                Some(b"null") | None => None,
                Some(v) => Some(string_of(v).ok()??),
            };
            // `error` is read only where it is used: a failed signal.
            let failed = value
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case("ERROR"));
            let error = match error {
                Some(e) if failed && e != b"null" => Some(serde_json::from_slice::<Value>(e).ok()?),
                _ => None,
            };
            (value, error)
        }
        Some(_) => return None,
    };
    let body = SignalBody::of_span(own.body.or(item.body))?;
    // Only `oemUpdatedAt` of a signal's meta is read. A meta that is not an object has no
    // time.
    let recorded = match item.meta.or(own.meta) {
        Some(m) if m.starts_with(b"{") => match fields(&mut Scanner::new(m), [b"oemUpdatedAt"])? {
            [Some(t)] => parse_epoch_json(text_of(t)?),
            [None] => None,
        },
        _ => None,
    };
    Some(Some(signal_from_parts(
        code,
        status_value.as_deref(),
        error.as_ref(),
        body,
        recorded,
        fetched_at,
        request_id,
    )))
}

/// `data`, the cursor on its `[`: the signals carpulse reads pushed to `signals`, and how
/// many items there were. Not an array: `None` (the tree parser says why).
fn scan_items(
    s: &mut Scanner<'_>,
    signals: &mut Vec<Signal>,
    fetched_at: UnixMillis,
    request_id: Option<&str>,
) -> Option<usize> {
    s.open_array()?;
    let mut count = 0;
    let mut first = true;
    while s.element(&mut first)? {
        count += 1;
        // An item that is not an object names no signal (the tree skips it too).
        if s.peek()? != b'{' {
            s.skip()?;
            continue;
        }
        let mut item = ItemSpans::default();
        let mut attrs = Attrs::Absent;
        scan_item(s, &mut item, &mut attrs)?;
        if let Some(signal) = signal_of_spans(&item, &attrs, fetched_at, request_id)? {
            signals.push(signal);
        }
    }
    Some(count)
}

/// [`parse_signals_page`] straight from the answer's bytes, by the scanner of
/// [`super::scan`]: only the signals carpulse reads are turned into values, the other items
/// are validated and skipped without building anything. `None` when the body is not shaped
/// as expected or not valid JSON (the scanner accepts what serde_json accepts when it skips
/// a value), so the caller falls back to the tolerant tree parser: a truncated or malformed
/// answer is its decode error, never a partial page.
pub fn parse_signals_bytes(
    body: &[u8],
    fetched_at: UnixMillis,
    request_id: Option<&str>,
) -> Option<SignalsPage> {
    let mut s = Scanner::new(body);
    s.open_object()?;
    let mut signals = Vec::with_capacity(READ.len());
    let mut items = None;
    let mut links = None;
    let mut meta = None;
    let mut included = None;
    let mut first = true;
    while let Member::Key(key) = s.member(&mut first)? {
        // A part named twice: the tree keeps the last; the fast path declines.
        match key {
            b"data" if items.is_none() => {
                items = Some(scan_items(&mut s, &mut signals, fetched_at, request_id)?);
            }
            b"links" if links.is_none() => links = Some(fields(&mut s, [b"next"])?),
            b"meta" if meta.is_none() => {
                meta = Some(fields(&mut s, [b"totalCount", b"pageSize"])?);
            }
            b"included" if included.is_none() => included = Some(fields(&mut s, [b"vehicle"])?),
            b"data" | b"links" | b"meta" | b"included" => return None,
            _ => s.skip()?,
        }
    }
    s.end()?;
    let items = items?;
    let next = match links.and_then(|[n]| n) {
        Some(n) => string_of(n)
            .ok()?
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty()),
        None => None,
    };
    let vehicle = match included.and_then(|[v]| v) {
        Some(r) => {
            // Checked whole, as serde checked it when it handed the vehicle over as text.
            text_of(r)?;
            match vehicle_of_text(r) {
                Some(info) => info.ok(),
                None => serde_json::from_slice::<Value>(r)
                    .ok()
                    .and_then(|v| parse_vehicle(&v).ok()),
            }
        }
        None => None,
    };
    let [total_count, page_size] = meta.unwrap_or_default();
    Some(SignalsPage {
        signals,
        next,
        vehicle,
        total_count: total_count.and_then(u64_of),
        items,
        page_size: page_size.and_then(u64_of),
    })
}

/// Parses a signals page; `Err` when it is not one (no `data` array).
pub fn parse_signals_page(
    v: &Value,
    fetched_at: UnixMillis,
    request_id: Option<&str>,
) -> Result<SignalsPage, String> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or("signals body has no `data` array")?;
    let signals = data
        .iter()
        .filter_map(|s| parse_signal(s, fetched_at, request_id))
        .collect();
    let next = next_link(v);
    let vehicle = v
        .get("included")
        .and_then(|i| i.get("vehicle"))
        .and_then(|veh| parse_vehicle(veh).ok());
    let total_count = v
        .get("meta")
        .and_then(|m| m.get("totalCount"))
        .and_then(Value::as_u64);
    let page_size = v
        .get("meta")
        .and_then(|m| m.get("pageSize"))
        .and_then(Value::as_u64);
    Ok(SignalsPage {
        items: data.len(),
        signals,
        next,
        vehicle,
        total_count,
        page_size,
    })
}

/// `links.next` of a JSON:API page, when it names one.
pub fn next_link(v: &Value) -> Option<String> {
    v.get("links")
        .and_then(|l| l.get("next"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_signal(s: &Value, fetched_at: UnixMillis, request_id: Option<&str>) -> Option<Signal> {
    let attrs = s.get("attributes").unwrap_or(s);
    let code = attrs
        .get("code")
        .or_else(|| s.get("id"))
        .and_then(Value::as_str)?;
    let status = attrs.get("status").or_else(|| s.get("status"));
    let status_value = status
        .and_then(|st| st.get("value"))
        .and_then(Value::as_str);
    let error = status.and_then(|st| st.get("error"));
    let body = SignalBody::of_value(attrs.get("body").or_else(|| s.get("body")));
    let recorded = s
        .get("meta")
        .or_else(|| attrs.get("meta"))
        .and_then(|m| m.get("oemUpdatedAt"))
        .and_then(parse_epoch_value);
    Some(signal_from_parts(
        code,
        status_value,
        error,
        body,
        recorded,
        fetched_at,
        request_id,
    ))
}

/// One signal from its parts, however the listing carried them (the tolerant tree parser and
/// the fast byte parser both end here).
///
/// `status_value` is `status.value` when it is a string, `error` is `status.error`.
fn signal_from_parts(
    code: &str,
    status_value: Option<&str>,
    error: Option<&Value>,
    body: SignalBody,
    recorded: Option<UnixMillis>,
    fetched_at: UnixMillis,
    request_id: Option<&str>,
) -> Signal {
    let code = code.trim();
    let code: std::borrow::Cow<'static, str> =
        match READ.iter().find(|r| r.eq_ignore_ascii_case(code)) {
            Some(known) => std::borrow::Cow::Borrowed(known),
            None => std::borrow::Cow::Owned(code.to_ascii_lowercase()),
        };
    let status_value = status_value.unwrap_or("SUCCESS");
    // UNAVAILABLE (smartcar-api.md §10.4): no reading this time, nothing wrong.
    if status_value.eq_ignore_ascii_case("UNAVAILABLE") {
        return Signal {
            error: Some(ApiError {
                request_id: request_id.map(str::to_owned),
                ..no_reading(&code, "UNAVAILABLE")
            }),
            code,
            body: SignalBody::NONE,
            recorded: None,
            fetched_at,
        };
    }
    let failed = status_value.eq_ignore_ascii_case("ERROR");
    let error = failed.then(|| {
        let e = error;
        let field = |k: &str| {
            e.and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let parsed = ErrorBody {
            status: None,
            error_type: field("type"),
            code: field("code"),
            description: field("description")
                .or_else(|| field("detail"))
                .or_else(|| Some(format!("signal {code} failed"))),
            request_id: None,
        };
        let mut e = api_error_from(None, parsed, None, request_id.map(str::to_owned));
        // A signal refused for BILLING is a group the app's plan does not include (§10.6),
        // not a reason to pause the whole vehicle.
        if e.kind == ErrorKind::Billing {
            e.kind = ErrorKind::PlanLocked;
        }
        e
    });
    Signal {
        code,
        error,
        body,
        recorded,
        fetched_at,
    }
}

/// A vehicle resource with or without the `data` wrapper and `attributes`.
pub fn parse_vehicle(v: &Value) -> Result<VehicleInfo, String> {
    let d = v.get("data").unwrap_or(v);
    let attrs = d.get("attributes").unwrap_or(d);
    parse_info(attrs)
}

/// The first page of a vehicle's listing, `{base}/vehicles/{id}/signals[?pageSize=N]`, as the
/// text before and after the id ([`listing_url`]): built once with the `url` crate, so every
/// poll's URL is two copies and the id instead of a clone, two parses and an encode of a
/// `Url` (~1 % of a poll's CPU in the fleet profile). `None`: the base cannot take a path.
pub(crate) fn listing_template(base: &Url, page_size: Option<u32>) -> Option<(String, String)> {
    const MARK: &str = "carpulse-vehicle-id";
    let url = listing_url_slow(base, page_size, MARK)?;
    let at = url.find(MARK)?;
    Some((url[..at].to_owned(), url[at + MARK.len()..].to_owned()))
}

/// The listing's first page for `id` through the `url` crate: the id as one percent-encoded
/// path segment, the page size as a query pair.
pub(crate) fn listing_url_slow(base: &Url, page_size: Option<u32>, id: &str) -> Option<String> {
    let mut url = base.clone();
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(["vehicles", id, "signals"]);
    // Later pages come from `links.next`, which carries the size the server settled on.
    if let Some(size) = page_size {
        url.query_pairs_mut()
            .append_pair("pageSize", &size.to_string());
    }
    Some(url.into())
}

/// The listing's first page for `id` from `template`: the id is copied as it is when it is
/// text the `url` crate copies as it is too (Smartcar's ids are UUIDs); any other id goes
/// through [`listing_url_slow`], so both give the same URL for every id.
pub(crate) fn listing_url(
    template: &(String, String),
    base: &Url,
    page_size: Option<u32>,
    id: &str,
) -> Option<String> {
    let plain = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if !plain {
        return listing_url_slow(base, page_size, id);
    }
    let (before, after) = template;
    let mut url = String::with_capacity(before.len() + id.len() + after.len());
    url.push_str(before);
    url.push_str(id);
    url.push_str(after);
    Some(url)
}

/// Resolves `links.next` (smartcar-api.md §3.4): an absolute URL (only on the v3 base's own
/// origin, so the bearer token never travels elsewhere), a path relative to the v3 base with
/// or without its leading `/v3`, or a bare `?query` on the current page.
pub fn resolve_next(base: &Url, current: &Url, next: &str) -> Result<Url, String> {
    if let Ok(abs) = Url::parse(next) {
        let same = abs.scheme() == base.scheme()
            && abs.host_str() == base.host_str()
            && abs.port_or_known_default() == base.port_or_known_default();
        return if same {
            Ok(abs)
        } else {
            Err(format!(
                "links.next points to another origin ({}); not following it",
                abs.origin().ascii_serialization()
            ))
        };
    }
    if let Some(query) = next.strip_prefix('?') {
        let mut u = current.clone();
        u.set_query(Some(query));
        return Ok(u);
    }
    let base_path = base.path().trim_end_matches('/');
    let rel = if next.starts_with('/') {
        next.to_string()
    } else {
        format!("/{next}")
    };
    let strip = |prefix: &str, s: &str| -> Option<String> {
        if prefix.is_empty() {
            return None;
        }
        let rest = s.strip_prefix(prefix)?;
        (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            .then(|| rest.to_string())
    };
    let last_segment = base_path.rsplit('/').next().unwrap_or("");
    let rest = strip(base_path, &rel)
        .or_else(|| strip(&format!("/{last_segment}"), &rel).filter(|_| !last_segment.is_empty()))
        .unwrap_or(rel);
    let joined = format!("{base_path}{rest}");
    base.join(&joined)
        .map_err(|e| format!("links.next {next:?} is not a usable URL: {e}"))
}

pub(crate) async fn vehicle_info(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
) -> Result<VehicleInfo, ApiError> {
    let url = client.v3_url(&format!("/vehicles/{}", id.0));
    let raw = client
        .send(client.vehicle_request(Method::GET, &url, ctx.access_token, ctx.user_id))
        .await?;
    let v: Value = raw.json("vehicle")?;
    parse_vehicle(&v).map_err(|m| ApiError {
        request_id: raw.request_id(),
        ..ApiError::decode(Some(raw.status), m)
    })
}

/// What one signal listing (all its pages) holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    pub signals: Vec<Signal>,
    /// `included.vehicle`, when the listing carried it.
    pub vehicle: Option<VehicleInfo>,
    /// Pages read (each a billed call).
    pub pages: usize,
    /// `meta.pageSize` of the first page, when given (`carpulse doctor` checks it against
    /// `smartcar.v3_page_size`).
    pub page_size: Option<u64>,
    /// Items the pages held, read or not.
    pub items: usize,
}

/// A top-level failure of the listing. A 400 or 404 refuses the request as a whole (a missing
/// `sc-user-id`, a Smartcar incident: smartcar-api.md §10.4) and says nothing about the
/// vehicle's signals, so it becomes [`ErrorKind::Rejected`]: backed off, never a stored block.
fn whole_listing_failed(id: &VehicleId, mut e: ApiError) -> ApiError {
    if matches!(e.kind, ErrorKind::Validation | ErrorKind::NotFound) {
        tracing::warn!(
            vehicle = %id,
            status = e.status,
            error_type = e.error_type.as_deref().unwrap_or(""),
            code = e.code.as_deref().unwrap_or(""),
            request_id = e.request_id.as_deref().unwrap_or(""),
            "Smartcar refused the signal listing as a whole; backing off (this is not a fact about the vehicle)"
        );
        e.kind = ErrorKind::Rejected;
    }
    e
}

/// "No reading this time" for `code` (an UNAVAILABLE signal or a null value).
fn no_reading(code: &str, why: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NoReading,
        format!("signal {code}: no reading this time ({why})"),
    )
}

/// The empty signal store of smartcar-api.md §10.5.
pub fn no_data() -> ApiError {
    ApiError::new(
        ErrorKind::NoData,
        "Smartcar holds no signals for this vehicle (an empty listing); it is most likely not \
         subscribed to a webhook: subscribe it in Smartcar's dashboard",
    )
}

/// Every signal of the vehicle, following `links.next` up to [`MAX_PAGES`] pages. An empty
/// listing is [`ErrorKind::NoData`].
pub(crate) async fn listing(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
) -> Result<Listing, ApiError> {
    let mut url = client.v3_listing_url(id)?;
    // The pages asked before this one (a `links.next` back to any of them ends the listing).
    let mut visited: Vec<String> = Vec::new();
    let mut out = Listing::default();
    for page_no in 1..=MAX_PAGES {
        let raw = client
            .send(client.vehicle_request(Method::GET, &url, ctx.access_token, ctx.user_id))
            .await
            .map_err(|e| whole_listing_failed(id, e))?;
        let rid = raw.request_id();
        let page = match parse_signals_bytes(&raw.body, raw.fetched_at, rid.as_deref()) {
            Some(page) => page,
            // Not the shape the fast path expects: the tolerant tree parser decides.
            None => {
                let v: Value = raw.json("signals")?;
                parse_signals_page(&v, raw.fetched_at, rid.as_deref()).map_err(|m| ApiError {
                    request_id: rid.clone(),
                    ..ApiError::decode(Some(raw.status), m)
                })?
            }
        };
        if page_no == 1 {
            out.page_size = page.page_size;
        }
        out.pages = page_no;
        out.items += page.items;
        // A page that repeats the signals already read (a server that serves page 1 under
        // every link) ends the listing: each page is a billed call (issue 11, endless paging).
        let repeat = !page.signals.is_empty()
            && page.signals.iter().all(|s| {
                out.signals
                    .iter()
                    .any(|o| o.code == s.code && o.body == s.body)
            });
        if repeat {
            tracing::warn!(
                vehicle = %id,
                page = page_no,
                "the signal listing repeats itself; not following links.next further"
            );
            break;
        }
        out.signals.extend(page.signals);
        out.vehicle = out.vehicle.or(page.vehicle);
        // The listing said how many items it holds: once they are read, a further link is
        // not followed.
        if page
            .total_count
            .is_some_and(|total| out.items as u64 >= total)
        {
            break;
        }
        // An empty page after the first ends the listing whatever it links to.
        if page.items == 0 && page_no > 1 {
            break;
        }
        let Some(next) = page.next else { break };
        let current = Url::parse(&url).map_err(|e| {
            ApiError::new(
                ErrorKind::Other,
                format!("the page's URL does not parse: {e}"),
            )
        })?;
        match resolve_next(client.v3_base(), &current, &next) {
            Ok(n) if n.as_str() == url || visited.iter().any(|v| v == n.as_str()) => {
                tracing::debug!(page = page_no, "links.next repeats a page; stopping");
                break;
            }
            Ok(n) => visited.push(std::mem::replace(&mut url, n.into())),
            Err(msg) => {
                tracing::warn!(page = page_no, reason = %msg, "not following links.next");
                break;
            }
        }
        if page_no == MAX_PAGES {
            tracing::warn!(
                pages = MAX_PAGES,
                "signals paging stopped at the page limit"
            );
        }
    }
    if out.items == 0 {
        return Err(no_data());
    }
    Ok(out)
}

/// One job from one listing. Every reading the listing carries is returned, whichever job
/// asked (it was paid for either way); the Info job adds make/model/year.
pub(crate) async fn fetch(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
    job: Job,
    only: &[Endpoint],
) -> Result<Vec<EndpointResult>, ApiError> {
    let listing = listing(client, ctx, id).await?;
    let units = client.unit_system();
    let mut out = Vec::with_capacity(5);
    // `GET /vehicles/{id}` is a billed call of its own: not made when info is not wanted.
    if job == Job::Info && (only.is_empty() || only.contains(&Endpoint::Info)) {
        let info = match listing.vehicle {
            Some(info) => Ok(info),
            None => match vehicle_info(client, ctx, id).await {
                // A dead token fails the whole job, so the caller refreshes and retries.
                Err(e) if e.kind == ErrorKind::Authentication => return Err(e),
                other => other,
            },
        };
        out.push(EndpointResult {
            endpoint: Endpoint::Info,
            result: info.map(Payload::Info),
        });
    }
    out.extend(pick_all(&listing.signals, units));
    Ok(out)
}

/// Every endpoint a listing answers: battery, charge, vin (when listed) and odometer.
pub fn pick_all(signals: &[Signal], units: UnitSystem) -> Vec<EndpointResult> {
    let mut out = pick_battery_job(signals, units);
    out.extend(pick_info_job(signals, units));
    out
}

/// What a listing says the vehicle cannot answer, and the readings it carried (stored by the
/// caller: the listing was paid for).
pub(crate) async fn capabilities(
    client: &SmartcarClient,
    ctx: &RequestCtx<'_>,
    id: &VehicleId,
) -> Result<super::Capabilities, ApiError> {
    let listing = listing(client, ctx, id).await?;
    let units = client.unit_system();
    Ok(super::Capabilities {
        unavailable: unavailable_in(&listing.signals, units),
        readings: pick_all(&listing.signals, units),
    })
}

/// The pure half of [`unavailable`].
pub fn unavailable_in(signals: &[Signal], units: UnitSystem) -> Vec<(Endpoint, String)> {
    pick_all(signals, units)
        .into_iter()
        .filter_map(|r| match r.result {
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::Permission | ErrorKind::Compatibility | ErrorKind::PlanLocked
                ) && e.code.as_deref() != Some("SIGNAL_NOT_PROVIDED") =>
            {
                Some((r.endpoint, crate::daemon::gate::cause(&e)))
            }
            _ => None,
        })
        .collect()
}

fn find<'a>(signals: &'a [Signal], code: &str) -> Option<&'a Signal> {
    signals.iter().find(|s| s.code == code)
}

/// The signal's body, or its error, or "not provided".
fn body_of<'a>(signals: &'a [Signal], code: &str) -> Result<&'a Signal, ApiError> {
    let s = find(signals, code).ok_or_else(|| ApiError::signal_not_provided(code))?;
    match &s.error {
        Some(e) => Err(e.clone()),
        None => Ok(s),
    }
}

/// One signal that could not be read: that reading lost, the rest of the listing kept.
fn decode(code: &str, what: &str) -> ApiError {
    ApiError::bad_value(None, format!("signal {code}: {what}"))
}

/// A signal whose `value` is not what `what` says: no reading this time when the value is
/// null or the body absent (smartcar-api.md §10.4), a decode error otherwise.
fn unusable(s: &Signal, what: &str) -> ApiError {
    if s.body.bodiless || s.body.value.as_ref().is_some_and(Value::is_null) {
        no_reading(&s.code, "null value")
    } else {
        decode(&s.code, what)
    }
}

fn unit_of(s: &Signal) -> Option<&str> {
    s.body.unit.as_deref()
}

fn distance_km(s: &Signal, units: UnitSystem) -> Result<f64, ApiError> {
    let value = s
        .body
        .number()
        .ok_or_else(|| unusable(s, "missing numeric `value`"))?;
    let unit = match unit_of(s) {
        Some(u) => DistanceUnit::parse(u)
            .ok_or_else(|| decode(&s.code, &format!("unknown distance unit {u:?}")))?,
        None => DistanceUnit::of_system(units),
    };
    plausible_km(unit.to_km(value)).ok_or_else(|| {
        decode(
            &s.code,
            "distance is negative, not finite or beyond 10 million km",
        )
    })
}

/// "battery" and "charge" from a signal listing.
pub fn pick_battery_job(signals: &[Signal], units: UnitSystem) -> Vec<EndpointResult> {
    vec![
        EndpointResult {
            endpoint: Endpoint::Battery,
            result: pick_battery(signals, units).map(Payload::Battery),
        },
        EndpointResult {
            endpoint: Endpoint::Charge,
            result: pick_charge(signals).map(Payload::Charge),
        },
    ]
}

/// "vin" (omitted when the vehicle does not list it) and "odometer" from a signal listing.
pub fn pick_info_job(signals: &[Signal], units: UnitSystem) -> Vec<EndpointResult> {
    let mut out = Vec::with_capacity(2);
    if let Some(vin) = find(signals, VIN) {
        let result = match &vin.error {
            Some(e) => Err(e.clone()),
            None => vin
                .body
                .value
                .as_ref()
                .and_then(Value::as_str)
                .map(|v| Payload::Vin(v.trim().to_string()))
                .ok_or_else(|| unusable(vin, "missing string `value`")),
        };
        out.push(EndpointResult {
            endpoint: Endpoint::Vin,
            result,
        });
    }
    let odometer = body_of(signals, ODOMETER).and_then(|s| {
        Ok(Payload::Odometer(OdometerReading {
            stamp: stamp(s.recorded, s.fetched_at),
            odometer_km: distance_km(s, units)?,
        }))
    });
    out.push(EndpointResult {
        endpoint: Endpoint::Odometer,
        result: odometer,
    });
    out
}

fn pick_battery(signals: &[Signal], units: UnitSystem) -> Result<BatteryReading, ApiError> {
    let soc = body_of(signals, SOC)?;
    let value = soc
        .body
        .number()
        .ok_or_else(|| unusable(soc, "missing numeric `value`"))?;
    let soc_percent = v3_percent(value, unit_of(soc)).map_err(|why| decode(SOC, why))?;
    // Range is optional: a failed or odd range must not cost the state of charge. An absurd
    // one is that value lost, counted as a decode error of the battery endpoint.
    let range_km = match body_of(signals, RANGE) {
        Ok(r) => match distance_km(r, units) {
            Ok(km) => Some(km),
            Err(e) => {
                if e.kind == ErrorKind::Decode {
                    super::reject(Endpoint::Battery, "range is undecodable or out of range");
                }
                tracing::debug!(error = %e, "ignoring unusable range signal");
                None
            }
        },
        Err(_) => None,
    };
    Ok(BatteryReading {
        stamp: stamp(soc.recorded, soc.fetched_at),
        soc_percent,
        range_km,
    })
}

/// Logs each unknown `charge-detailedchargingstatus` value once per process.
fn note_unknown_status(raw: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() < 64 && !seen.iter().any(|s| s == raw) {
        seen.push(raw.to_owned());
        tracing::info!(
            value = %crate::smartcar::scrub::scrub_to(raw, &[], 40),
            "unknown charge-detailedchargingstatus; taking the state from charge-ischarging"
        );
    }
}

fn pick_charge(signals: &[Signal]) -> Result<ChargeReading, ApiError> {
    let cable = body_of(signals, CABLE)?;
    let plugged_in = cable
        .body
        .value
        .as_ref()
        .and_then(value_bool)
        .ok_or_else(|| unusable(cable, "missing boolean `value`"))?;
    let detailed = body_of(signals, DETAILED_STATUS).and_then(|s| {
        let raw = s
            .body
            .value
            .as_ref()
            .and_then(Value::as_str)
            .ok_or_else(|| unusable(s, "missing string `value`"))?;
        match ChargeState::parse(raw) {
            Some(st) => Ok((st, s)),
            // An open set of strings (smartcar-api.md §10.4): an unknown one is logged once
            // and the state taken from charge-ischarging.
            None => {
                note_unknown_status(raw);
                Err(decode(
                    DETAILED_STATUS,
                    "a charging status carpulse does not know",
                ))
            }
        }
    });
    let (state, used) = match detailed {
        Ok(found) => found,
        Err(detailed_err) => match body_of(signals, IS_CHARGING) {
            Ok(s) => {
                let charging = s
                    .body
                    .value
                    .as_ref()
                    .and_then(value_bool)
                    .ok_or_else(|| unusable(s, "missing boolean `value`"))?;
                let st = if charging {
                    ChargeState::Charging
                } else {
                    ChargeState::NotCharging
                };
                (st, s)
            }
            // Report why the preferred signal failed: it is the one users look up.
            Err(_) => return Err(detailed_err),
        },
    };
    // The reading is as new as the newest signal it is made of.
    let recorded = match (cable.recorded, used.recorded) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    Ok(ChargeReading {
        stamp: stamp(recorded, cable.fetched_at.max(used.fetched_at)),
        plugged_in,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stamp;
    use serde_json::json;

    const F: i64 = 1_752_104_300_000;

    #[test]
    fn the_listing_url_from_its_template_is_the_url_crates_for_every_id() {
        let bases = [
            "https://vehicle.api.smartcar.com/v3",
            "http://127.0.0.1:8080/v3/",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://h/a/b?x=1",
            "http://h/v3#frag",
        ];
        let mut ids: Vec<String> = vec![
            "36ab27d0-fd9d-4455-823a-ce30af709ffc".into(),
            "".into(),
            ".".into(),
            "..".into(),
            "...".into(),
            "a/b".into(),
            "a?b#c".into(),
            "a%2Fb".into(),
            "tab\there".into(),
            "new\nline".into(),
            "ünï-cödé".into(),
            "a b".into(),
            "a\\b".into(),
        ];
        // Every ASCII byte alone and inside an id.
        ids.extend((0u8..128).map(|b| (b as char).to_string()));
        ids.extend((0u8..128).map(|b| format!("v-{}-1", b as char)));
        for base in bases {
            let base = Url::parse(base).unwrap();
            for size in [None, Some(100)] {
                let template = listing_template(&base, size).unwrap();
                for id in &ids {
                    assert_eq!(
                        listing_url(&template, &base, size, id),
                        listing_url_slow(&base, size, id),
                        "{base} {size:?} {id:?}"
                    );
                }
            }
        }
        let base = Url::parse("https://vehicle.api.smartcar.com/v3").unwrap();
        let t = listing_template(&base, Some(100)).unwrap();
        assert_eq!(
            listing_url(&t, &base, Some(100), "36ab27d0-fd9d").unwrap(),
            "https://vehicle.api.smartcar.com/v3/vehicles/36ab27d0-fd9d/signals?pageSize=100"
        );
        // A base that cannot take a path has no template.
        assert_eq!(
            listing_template(&Url::parse("mailto:x@y").unwrap(), None),
            None
        );
    }

    fn sig(code: &str, body: Value, oem: Value) -> Value {
        json!({"id": code, "type": "signal",
               "attributes": {"code": code, "name": "x", "group": "y",
                              "status": {"value": "SUCCESS"}, "body": body},
               "meta": {"retrievedAt": 1752104218549_i64, "oemUpdatedAt": oem}})
    }

    fn failed(code: &str, t: &str, c: &str) -> Value {
        json!({"id": code, "type": "signal",
               "attributes": {"code": code, "status": {"value": "ERROR", "error": {"type": t, "code": c}}}})
    }

    fn page(data: Vec<Value>, next: Value) -> Value {
        json!({"data": data, "meta": {"page": 1, "pageSize": 10, "totalCount": 5},
               "links": {"self": "/vehicles/v/signals?page=1", "next": next},
               "included": {"vehicle": {"id": "v", "type": "vehicle",
                                         "attributes": {"make": "Toyota", "model": "Camry", "year": 2020}}}})
    }

    /// Both parsers: the fast one must agree with the tolerant one on every signal carpulse
    /// reads, and on paging, the vehicle and the counts.
    fn parse(v: &Value) -> SignalsPage {
        let slow = parse_signals_page(v, F, Some("rid")).unwrap();
        let bytes = serde_json::to_vec(v).unwrap();
        if let Some(fast) = parse_signals_bytes(&bytes, F, Some("rid")) {
            let read: Vec<&Signal> = slow
                .signals
                .iter()
                .filter(|s| READ.contains(&&*s.code))
                .collect();
            assert_eq!(fast.signals.iter().collect::<Vec<_>>(), read, "{v}");
            assert_eq!(
                (&fast.next, &fast.vehicle, fast.total_count, fast.items),
                (&slow.next, &slow.vehicle, slow.total_count, slow.items)
            );
        }
        slow
    }

    #[test]
    fn the_fast_path_reads_the_documented_shape_and_declines_odd_statuses() {
        let ok = page(
            vec![
                sig(
                    SOC,
                    json!({"unit":"percent","value":75}),
                    json!(1752104118549_i64),
                ),
                failed(RANGE, "PERMISSION", "NO_ACCESS"),
            ],
            Value::Null,
        );
        let bytes = serde_json::to_vec(&ok).unwrap();
        let fast = parse_signals_bytes(&bytes, F, Some("rid")).expect("the documented shape");
        assert_eq!(fast.signals.len(), 2);
        assert!(fast.signals[1].error.is_some(), "{:?}", fast.signals[1]);
        // Odd statuses: the fast path declines (or agrees), and the tolerant parser's answer
        // is what a poll gets: a status that is not an object is no status (SUCCESS).
        for status in [json!("ERROR"), json!(["ERROR"]), json!(5), Value::Null] {
            let mut item = sig(SOC, json!({"unit":"percent","value":75}), json!(1));
            item["attributes"]["status"] = status.clone();
            let v = page(vec![item], Value::Null);
            let bytes = serde_json::to_vec(&v).unwrap();
            let slow = parse(&v);
            assert!(
                slow.signals[0].error.is_none(),
                "{status}: {:?}",
                slow.signals[0]
            );
            if let Some(fast) = parse_signals_bytes(&bytes, F, None) {
                assert!(
                    fast.signals[0].error.is_none(),
                    "{status}: {:?}",
                    fast.signals[0]
                );
            }
            assert!(
                status.is_null() || parse_signals_bytes(&bytes, F, None).is_none(),
                "{status}: a status that is not an object goes to the tolerant parser"
            );
        }
        // Invalid UTF-8 in a part carpulse skips (a name) still parses on the fast path.
        let mut bytes = serde_json::to_vec(&ok).unwrap();
        let at = bytes.windows(4).position(|w| w == b"page").unwrap();
        bytes.splice(at..at, *b"x\xff\xfe");
        let fast = parse_signals_bytes(&bytes, F, None);
        assert!(fast.is_some_and(|p| p.signals.len() == 2));
    }

    /// The byte parser reads a signal's body and time into the same parts as the tree parser,
    /// whatever shape they come in: a null or absent body, a body that is not an object, an
    /// explicit null value, a unit that is not a string or has escapes, a time as an ISO
    /// string (escaped too) or a number.
    #[test]
    fn both_parsers_read_odd_bodies_and_times_alike() {
        let bodies = [
            json!({"unit":"percent","value":75}),
            Value::Null,
            json!([75, "percent"]),
            json!(75),
            json!({"value":null,"unit":"percent"}),
            json!({"value":"75.5","unit":5}),
            // Serialised with escapes (a quote, a tab): the byte parser must not borrow those.
            json!({"value":75,"unit":"per\"cent","extra":{"a":[1,2]}}),
            json!({"unit":"percent"}),
        ];
        let times = [
            json!(1752104118549_i64),
            json!(1752104118.5),
            json!("2025-07-09T23:35:18.549Z"),
            json!("\t2025-07-09T23:35:18.549Z"),
            json!("1752104118"),
            json!(true),
            Value::Null,
        ];
        for body in &bodies {
            for time in &times {
                let mut item = sig(SOC, body.clone(), time.clone());
                if body.is_null() {
                    item["attributes"].as_object_mut().unwrap().remove("body");
                }
                let v = page(vec![item], Value::Null);
                let bytes = serde_json::to_vec(&v).unwrap();
                let fast = parse_signals_bytes(&bytes, F, None).expect("the documented shape");
                assert_eq!(fast, parse(&v), "{body} at {time}");
            }
        }
        // A null in `attributes` is not taken for an absent member (the item's own would stand
        // in for it), and an item's `meta` that is an array has no time.
        let mut item = sig(
            SOC,
            json!({"value":75,"unit":"percent"}),
            json!(1752104118549_i64),
        );
        item["attributes"]["body"] = Value::Null;
        item["body"] = json!({"value":80,"unit":"percent"});
        item["attributes"]["status"] = Value::Null;
        item["status"] = json!({"value":"ERROR","error":{"type":"PERMISSION","code":"X"}});
        let mut dated = sig(RANGE, json!({"value":300,"unit":"km"}), Value::Null);
        dated["meta"] = json!(["2025-07-09T23:35:18Z"]);
        let v = page(vec![item, dated], Value::Null);
        let bytes = serde_json::to_vec(&v).unwrap();
        let fast = parse_signals_bytes(&bytes, F, None).expect("the documented shape");
        assert_eq!(fast, parse(&v));
        assert!(fast.signals[0].body.bodiless && fast.signals[0].error.is_none());
        assert_eq!(fast.signals[1].recorded, None);

        let b = SignalBody::of_value(Some(&json!({"value":null})));
        assert!(!b.bodiless && b.value == Some(Value::Null) && b.number().is_none());
        assert!(SignalBody::of_value(None).bodiless);
        assert_eq!(
            SignalBody::of_value(Some(&json!({"value":" 68.5 ","unit":"km"}))).number(),
            Some(68.5)
        );
    }

    #[test]
    fn both_parsers_read_the_included_vehicle_alike() {
        let vehicles = [
            json!({"id":"v","type":"vehicle","attributes":{"make":" Tesla ","model":"Model 3","year":2024}}),
            json!({"attributes":{"make":"Tesla"}}),
            json!({"attributes":{"make":"Tesla","model":null,"year":null}}),
            json!({"attributes":{"make":"Tesla","year":"2019"}}),
            json!({"attributes":{"make":"Tesla","year":" 2019 "}}),
            json!({"attributes":{"make":"Tesla","year":2019.5}}),
            json!({"attributes":{"make":"Tesla","year":3000}}),
            json!({"attributes":{"make":"Tesla","year":true}}),
            json!({"attributes":{"make":"Te\"sla\t","model":"M\u{e9}gane"}}),
            json!({"attributes":{"make":7}}),
            json!({"attributes":{"make":null}}),
            json!({"attributes":{"model":"Model 3"}}),
            json!({"attributes":null,"make":"Tesla"}),
            json!({"attributes":["Tesla"],"make":"Tesla"}),
            json!({"data":{"attributes":{"make":"Tesla","year":2020}}}),
            json!({"data":null,"attributes":{"make":"Tesla"}}),
            json!({"make":"Tesla","model":"S","year":2015}),
            json!([{"attributes":{"make":"Tesla"}}]),
            json!("Tesla"),
            Value::Null,
        ];
        for vehicle in vehicles {
            let mut v = page(
                vec![sig(SOC, json!({"unit":"percent","value":75}), Value::Null)],
                Value::Null,
            );
            v["included"]["vehicle"] = vehicle.clone();
            let bytes = serde_json::to_vec(&v).unwrap();
            let fast = parse_signals_bytes(&bytes, F, Some("rid")).expect("the documented shape");
            let slow = parse_signals_page(&v, F, Some("rid")).unwrap();
            assert_eq!(fast.vehicle, slow.vehicle, "{vehicle}");
        }
        // The documented shape is read without a tree; the others go to the tree parser.
        let raw = |v: Value| serde_json::value::RawValue::from_string(v.to_string()).unwrap();
        let documented = raw(json!({"attributes":{"make":"Tesla","model":"Model 3","year":2024}}));
        assert_eq!(
            vehicle_of_raw(&documented).map(|r| r.map(|i| (i.make, i.year))),
            Some(Ok(("Tesla".to_string(), 2024)))
        );
        assert!(vehicle_of_raw(&raw(json!({"data":{"attributes":{"make":"T"}}}))).is_none());
        assert!(vehicle_of_raw(&raw(json!([{"attributes":{"make":"T"}}]))).is_none());
        // A duplicate member: both take the last one.
        let text = br#"{"data":[],"included":{"vehicle":{"attributes":{"make":"A","make":"B"}}}}"#;
        let fast = parse_signals_bytes(text, F, None).expect("a page");
        assert_eq!(fast.vehicle.map(|v| v.make), Some("B".to_string()));
    }

    #[test]
    fn page_parsing_next_and_included() {
        let p = parse(&page(
            vec![sig(
                SOC,
                json!({"unit":"percent","value":75}),
                json!(1752104118549_i64),
            )],
            json!("/vehicles/v/signals?page=2&pageSize=10"),
        ));
        assert_eq!(
            p.next.as_deref(),
            Some("/vehicles/v/signals?page=2&pageSize=10")
        );
        assert_eq!(
            p.vehicle,
            Some(VehicleInfo {
                make: "Toyota".into(),
                model: "Camry".into(),
                year: 2020
            })
        );
        assert_eq!(p.signals.len(), 1);
        assert_eq!(p.signals[0].code, SOC);
        assert_eq!(p.signals[0].recorded, Some(1752104118549));
        let p = parse(&json!({"data": [], "links": {"next": null}}));
        assert_eq!(p.next, None);
        assert!(parse_signals_page(&json!({"errors": []}), F, None).is_err());
    }

    #[test]
    fn only_explicit_permission_and_compatibility_errors_make_an_endpoint_unavailable() {
        let p = parse(&page(
            vec![
                failed(SOC, "COMPATIBILITY", "VEHICLE_NOT_CAPABLE"),
                failed(CABLE, "PERMISSION", "NOT_GRANTED"),
                // Asleep: a state, not a capability.
                failed(ODOMETER, "VEHICLE_STATE", "ASLEEP"),
            ],
            Value::Null,
        ));
        let mut got = unavailable_in(&p.signals, UnitSystem::Metric);
        got.sort();
        assert_eq!(
            got,
            [
                (
                    Endpoint::Battery,
                    "COMPATIBILITY:VEHICLE_NOT_CAPABLE".to_string()
                ),
                (Endpoint::Charge, "PERMISSION:NOT_GRANTED".to_string()),
            ]
        );
        // Signals merely missing from a listing block nothing.
        assert_eq!(unavailable_in(&[], UnitSystem::Metric), []);
    }

    #[test]
    fn battery_and_charge_picks() {
        let p = parse(&page(
            vec![
                sig(
                    SOC,
                    json!({"unit":"percent","value":75.5}),
                    json!(1696156800),
                ),
                sig(
                    RANGE,
                    json!({"unit":"miles","value":100}),
                    json!(1696156800),
                ),
                sig(CABLE, json!({"value":true}), json!(1696156900000_i64)),
                sig(
                    DETAILED_STATUS,
                    json!({"value":"FULLY_CHARGED"}),
                    json!("2023-10-01T10:40:00Z"),
                ),
            ],
            Value::Null,
        ));
        let r = pick_battery_job(&p.signals, UnitSystem::Metric);
        assert_eq!(r[0].endpoint, Endpoint::Battery);
        assert_eq!(
            r[0].result,
            Ok(Payload::Battery(BatteryReading {
                stamp: Stamp {
                    recorded_at: 1696156800000,
                    fetched_at: F
                },
                soc_percent: 75.5,
                range_km: Some(160.9344),
            }))
        );
        assert_eq!(r[1].endpoint, Endpoint::Charge);
        assert_eq!(
            r[1].result,
            Ok(Payload::Charge(ChargeReading {
                // the newer of cable (…900000) and status (10:40:00Z = …1696156800000 + 0)
                stamp: Stamp {
                    recorded_at: 1696156900000,
                    fetched_at: F
                },
                plugged_in: true,
                state: ChargeState::FullyCharged,
            }))
        );
    }

    #[test]
    fn charge_falls_back_to_ischarging_and_errors_are_classified() {
        let p = parse(&page(
            vec![
                failed(SOC, "VEHICLE_STATE", "ASLEEP"),
                sig(CABLE, json!({"value":true}), Value::Null),
                sig(IS_CHARGING, json!({"value":true}), Value::Null),
            ],
            Value::Null,
        ));
        let r = pick_battery_job(&p.signals, UnitSystem::Metric);
        let e = r[0].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::VehicleState);
        assert_eq!(e.code.as_deref(), Some("ASLEEP"));
        assert_eq!(e.status, None);
        assert_eq!(e.request_id.as_deref(), Some("rid"));
        assert_eq!(
            r[1].result,
            Ok(Payload::Charge(ChargeReading {
                stamp: Stamp {
                    recorded_at: F,
                    fetched_at: F
                },
                plugged_in: true,
                state: ChargeState::Charging,
            }))
        );
    }

    #[test]
    fn missing_signals_and_info_job() {
        let p = parse(&page(
            vec![
                sig(
                    ODOMETER,
                    json!({"unit":"km","value":115071.5}),
                    json!(1752104118549_i64),
                ),
                failed(VIN, "PERMISSION", ""),
            ],
            Value::Null,
        ));
        let r = pick_battery_job(&p.signals, UnitSystem::Metric);
        let e = r[0].result.clone().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Compatibility);
        assert_eq!(e.code.as_deref(), Some("SIGNAL_NOT_PROVIDED"));
        let e = r[1].result.clone().unwrap_err();
        assert_eq!(e.code.as_deref(), Some("SIGNAL_NOT_PROVIDED"));

        let r = pick_info_job(&p.signals, UnitSystem::Metric);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].endpoint, Endpoint::Vin);
        assert_eq!(r[0].result.clone().unwrap_err().kind, ErrorKind::Permission);
        assert_eq!(
            r[1].result,
            Ok(Payload::Odometer(OdometerReading {
                stamp: Stamp {
                    recorded_at: 1752104118549,
                    fetched_at: F
                },
                odometer_km: 115071.5,
            }))
        );
        // VIN absent: omitted, not an error.
        let p = parse(&page(vec![], Value::Null));
        let r = pick_info_job(&p.signals, UnitSystem::Metric);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].endpoint, Endpoint::Odometer);
        assert_eq!(
            r[0].result.clone().unwrap_err().code.as_deref(),
            Some("SIGNAL_NOT_PROVIDED")
        );
    }

    #[test]
    fn odometer_unknown_unit_is_decode_and_future_time_is_clamped() {
        let p = parse(&page(
            vec![sig(
                ODOMETER,
                json!({"unit":"furlongs","value":1}),
                json!(F + 3_600_000),
            )],
            Value::Null,
        ));
        let r = pick_info_job(&p.signals, UnitSystem::Metric);
        assert_eq!(r[0].result.clone().unwrap_err().kind, ErrorKind::Decode);
        let p = parse(&page(
            vec![sig(ODOMETER, json!({"value":10}), json!(F + 3_600_000))],
            Value::Null,
        ));
        let r = pick_info_job(&p.signals, UnitSystem::Imperial);
        assert_eq!(
            r[0].result,
            Ok(Payload::Odometer(OdometerReading {
                stamp: Stamp {
                    recorded_at: F,
                    fetched_at: F
                },
                odometer_km: 16.09344,
            }))
        );
    }

    #[test]
    fn vehicle_with_or_without_data() {
        let want = VehicleInfo {
            make: "Toyota".into(),
            model: "Camry".into(),
            year: 2020,
        };
        assert_eq!(
            parse_vehicle(
                &json!({"data":{"id":"v","type":"vehicle","attributes":{"make":"Toyota","model":"Camry","year":2020}}})
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse_vehicle(
                &json!({"id":"v","type":"vehicle","attributes":{"make":"Toyota","model":"Camry","year":2020}})
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse_vehicle(&json!({"id":"v","make":"Toyota","model":"Camry","year":2020})),
            Ok(want)
        );
    }

    #[test]
    fn next_link_resolution() {
        let base = Url::parse("http://127.0.0.1:8080/v3").unwrap();
        let cur = Url::parse("http://127.0.0.1:8080/v3/vehicles/v/signals").unwrap();
        let r = |n: &str| resolve_next(&base, &cur, n).map(|u| u.to_string());
        let want = "http://127.0.0.1:8080/v3/vehicles/v/signals?page=2";
        assert_eq!(r("/vehicles/v/signals?page=2").unwrap(), want);
        assert_eq!(r("/v3/vehicles/v/signals?page=2").unwrap(), want);
        assert_eq!(r("vehicles/v/signals?page=2").unwrap(), want);
        assert_eq!(r("?page=2").unwrap(), want);
        assert_eq!(
            r("http://127.0.0.1:8080/v3/vehicles/v/signals?page=2").unwrap(),
            want
        );
        assert!(r("https://evil.example/v3/vehicles/v/signals?page=2").is_err());

        let base = Url::parse("http://h/api/v3/").unwrap();
        let r = |n: &str| resolve_next(&base, &cur, n).map(|u| u.to_string());
        assert_eq!(
            r("/v3/vehicles/x?page=3").unwrap(),
            "http://h/api/v3/vehicles/x?page=3"
        );
        assert_eq!(
            r("/api/v3/vehicles/x?page=3").unwrap(),
            "http://h/api/v3/vehicles/x?page=3"
        );
        assert_eq!(
            r("/vehicles/x?page=3").unwrap(),
            "http://h/api/v3/vehicles/x?page=3"
        );

        let base = Url::parse("http://h").unwrap();
        let r = |n: &str| resolve_next(&base, &cur, n).map(|u| u.to_string());
        assert_eq!(
            r("/vehicles/x?page=3").unwrap(),
            "http://h/vehicles/x?page=3"
        );
    }

    /// The real-world shapes of smartcar-api.md §3 and §10: UNAVAILABLE, a null value, an ERROR
    /// item that carries a body, ISO timestamps, `km`, a plan-locked group.
    #[test]
    fn real_world_signal_shapes() {
        let p = parse(&page(
            vec![
                json!({"id": SOC, "type": "signal",
                       "attributes": {"code": SOC, "status": {"value": "UNAVAILABLE"}}}),
                sig(RANGE, json!({"unit": "km", "value": null}), Value::Null),
                json!({"id": CABLE, "type": "signal",
                       "attributes": {"code": CABLE, "body": {"value": null},
                                      "status": {"value": "ERROR", "error": {"type": "VEHICLE_STATE", "code": "NOT_CHARGING"}}}}),
                sig(
                    ODOMETER,
                    json!({"unit": "km", "value": 50000}),
                    json!("2025-07-09T23:15:18.549Z"),
                ),
                json!({"id": DETAILED_STATUS, "type": "signal",
                       "attributes": {"code": DETAILED_STATUS, "group": "Charge",
                                      "status": {"value": "ERROR", "error": {"type": "BILLING", "code": "INVALID_PLAN"}}}}),
            ],
            Value::Null,
        ));
        let r = pick_all(&p.signals, UnitSystem::Metric);
        let by = |e: Endpoint| r.iter().find(|x| x.endpoint == e).unwrap().result.clone();
        // UNAVAILABLE: no reading this time, not a decode failure.
        let e = by(Endpoint::Battery).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoReading);
        // An ERROR item with a body is still an error, classified by its type.
        let e = by(Endpoint::Charge).unwrap_err();
        assert_eq!(e.kind, ErrorKind::VehicleState);
        assert_eq!(e.code.as_deref(), Some("NOT_CHARGING"));
        // ISO-8601 oemUpdatedAt and `km`.
        assert_eq!(
            by(Endpoint::Odometer),
            Ok(Payload::Odometer(OdometerReading {
                stamp: Stamp {
                    recorded_at: 1_752_102_918_549,
                    fetched_at: F
                },
                odometer_km: 50000.0,
            }))
        );
        // A locked group is a plan fact, told apart from "not capable".
        let locked = parse(&page(
            vec![json!({"id": CABLE, "type": "signal",
                   "attributes": {"code": CABLE, "group": "Charge",
                                  "status": {"value": "ERROR", "error": {"type": "BILLING", "code": "INVALID_PLAN"}}}})],
            Value::Null,
        ));
        let e = pick_battery_job(&locked.signals, UnitSystem::Metric)[1]
            .result
            .clone()
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PlanLocked);
        assert_eq!(
            unavailable_in(&locked.signals, UnitSystem::Metric),
            [(
                Endpoint::Charge,
                "plan_locked:BILLING:INVALID_PLAN".to_string()
            )]
        );
        // A null value where a number belongs is no reading either.
        let null_soc = parse(&page(
            vec![sig(
                SOC,
                json!({"unit": "percent", "value": null}),
                Value::Null,
            )],
            Value::Null,
        ));
        assert_eq!(
            pick_battery_job(&null_soc.signals, UnitSystem::Metric)[0]
                .result
                .clone()
                .unwrap_err()
                .kind,
            ErrorKind::NoReading
        );
    }

    #[test]
    fn an_empty_listing_says_so() {
        let p = parse(&json!({"data": [], "meta": {"totalCount": 0}, "links": {"next": null}}));
        assert!(p.signals.is_empty());
        assert_eq!(p.total_count, Some(0));
        assert_eq!(no_data().kind, ErrorKind::NoData);
    }

    #[test]
    fn an_unknown_charging_status_falls_back_to_ischarging() {
        let p = parse(&page(
            vec![
                sig(CABLE, json!({"value": true}), Value::Null),
                sig(
                    DETAILED_STATUS,
                    json!({"value": "CHARGING_PAUSED"}),
                    Value::Null,
                ),
                sig(IS_CHARGING, json!({"value": false}), Value::Null),
            ],
            Value::Null,
        ));
        let r = pick_battery_job(&p.signals, UnitSystem::Metric);
        match &r[1].result {
            Ok(Payload::Charge(c)) => assert_eq!(c.state, ChargeState::NotCharging),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_fast_parser_reads_documented_pages_and_skips_the_rest() {
        let v = page(
            vec![
                sig(
                    SOC,
                    json!({"unit": "percent", "value": 75}),
                    json!(1_752_104_118_549_i64),
                ),
                sig(
                    "climate-cabintemperature",
                    json!({"unit": "celsius", "value": 21}),
                    Value::Null,
                ),
            ],
            json!("/vehicles/v/signals?page=2"),
        );
        let fast = parse_signals_bytes(&serde_json::to_vec(&v).unwrap(), F, None).unwrap();
        assert_eq!(fast.items, 2);
        assert_eq!(fast.signals.len(), 1, "only what carpulse reads");
        assert_eq!(fast.signals[0].code, SOC);
        assert_eq!(fast.page_size, Some(10));
        // Not a listing: no fast answer, the tolerant parser decides.
        assert!(parse_signals_bytes(br#"{"errors":[]}"#, F, None).is_none());
    }
}
