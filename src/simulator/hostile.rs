//! The hostile answers of issue 11, as fault kinds (see [`super::faults::FaultKind`]): what a
//! careless proxy, a broken Smartcar deployment or an attacker in the path can send. Each one
//! either replaces the answer before the handler runs ([`before`]) or rewrites the handler's
//! answer ([`after`]), so a client's defences are exercised offline, through real HTTP.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::errors::Api;
use super::faults::{Fault, FaultKind};

/// The date a `retry_after_date` fault sends unless told otherwise: the issue's reproducer.
pub const FAR_DATE: &str = "Fri, 31 Dec 9999 23:59:59 GMT";

/// An answer that replaces the handler's, for the faults that need no real answer.
pub(crate) fn before(fault: &Fault, headers: &HeaderMap, api: Api) -> Option<Response> {
    let status = |default: u16| {
        StatusCode::from_u16(fault.status.unwrap_or(default)).unwrap_or(StatusCode::BAD_GATEWAY)
    };
    match fault.kind {
        FaultKind::EchoError => {
            // Every request header, as a debugging proxy prints them.
            let mut text = String::from("upstream error; your request was:\n");
            // Authorization first, as the proxies that leak it print it.
            let mut all: Vec<_> = headers.iter().collect();
            all.sort_by_key(|(name, _)| *name != header::AUTHORIZATION);
            for (name, value) in all {
                text.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            Some(
                (
                    status(502),
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    text,
                )
                    .into_response(),
            )
        }
        FaultKind::HtmlError => {
            let code = status(404);
            let page = format!(
                "<html><head><title>{code}</title></head><body><center><h1>{code}</h1></center><hr><center>nginx</center></body></html>\n"
            );
            Some((code, [(header::CONTENT_TYPE, "text/html")], page).into_response())
        }
        FaultKind::Huge => {
            let mut r = Response::new(Body::new(HugeBody {
                left: fault.bytes.unwrap_or(50 * 1024 * 1024),
                first: true,
            }));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Some(r)
        }
        FaultKind::RetryAfterDate => {
            let mut e = FaultKind::RateLimit.error(0);
            e.retry_after = None;
            let mut r = e.into_api_response(api, &super::fleet::random_uuid());
            let date = fault.date.as_deref().unwrap_or(FAR_DATE);
            if let Ok(v) = HeaderValue::from_str(date) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(r)
        }
        FaultKind::InvalidRequest => Some(
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({
                    "error": "invalid_request",
                    "error_description": "The request could not be processed. Please retry."
                })),
            )
                .into_response(),
        ),
        _ => None,
    }
}

/// Rewrites the handler's answer for the faults that bend a real one. `page` is the v3
/// listing's page number asked for (endless paging links one further).
pub(crate) async fn after(fault: &Fault, response: Response, page: usize) -> Response {
    match fault.kind {
        FaultKind::SlowDrip => {
            let (parts, body) = response.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            };
            let mut r = Response::from_parts(
                parts,
                Body::new(DripBody {
                    bytes,
                    pos: 0,
                    delay: Duration::from_secs_f64(fault.delay.clamp(0.0, 3600.0)),
                    sleep: None,
                }),
            );
            r.headers_mut().remove(header::CONTENT_LENGTH);
            r
        }
        FaultKind::Absurd
        | FaultKind::EndlessPaging
        | FaultKind::OddExpiresIn
        | FaultKind::NoRefreshToken => {
            if !response.status().is_success() {
                return response;
            }
            let (mut parts, body) = response.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            };
            let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
                return Response::from_parts(parts, Body::from(bytes));
            };
            match fault.kind {
                FaultKind::Absurd => {
                    if let Some(field) = &fault.field {
                        set_everywhere(&mut v, field, fault.value.clone().unwrap_or(Value::Null));
                    }
                }
                FaultKind::EndlessPaging => {
                    let next = v
                        .get("links")
                        .and_then(|l| l.get("self"))
                        .and_then(Value::as_str)
                        .map(|s| s.split('?').next().unwrap_or(s).to_owned());
                    if let Some(base) = next {
                        v["links"]["next"] = json!(format!("{base}?page={}", page + 1));
                    }
                }
                FaultKind::OddExpiresIn => {
                    v["expires_in"] = fault.value.clone().unwrap_or(json!(0));
                }
                FaultKind::NoRefreshToken => {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("refresh_token");
                    }
                }
                _ => {}
            }
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(v.to_string()))
        }
        _ => response,
    }
}

/// Sets `field` to `value` wherever it appears: as a key of any object (v2 bodies, batch
/// items, vehicle info), and as the `body.value` of a v3 signal whose code is `field`.
fn set_everywhere(v: &mut Value, field: &str, value: Value) {
    match v {
        Value::Object(o) => {
            let is_signal = o
                .get("attributes")
                .and_then(|a| a.get("code"))
                .or_else(|| o.get("code"))
                .or_else(|| o.get("id"))
                .and_then(Value::as_str)
                == Some(field);
            if is_signal {
                let target = match o.get_mut("attributes") {
                    Some(a) if a.get("body").is_some() => a.get_mut("body"),
                    _ => o.get_mut("body"),
                };
                if let Some(Value::Object(body)) = target {
                    body.insert("value".into(), value.clone());
                }
            }
            if o.contains_key(field) {
                o.insert(field.to_owned(), value.clone());
            }
            for child in o.values_mut() {
                set_everywhere(child, field, value.clone());
            }
        }
        Value::Array(a) => {
            for child in a {
                set_everywhere(child, field, value.clone());
            }
        }
        _ => {}
    }
}

/// `left` bytes of filler, 64 KB a frame, made as they are sent (the simulator never holds
/// the whole body).
struct HugeBody {
    left: u64,
    first: bool,
}

impl axum::body::HttpBody for HugeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024) as usize;
        self.left -= n as u64;
        let mut chunk = vec![b' '; n];
        if std::mem::take(&mut self.first) {
            let open = br#"{"data":[ "#;
            let k = open.len().min(n);
            chunk[..k].copy_from_slice(&open[..k]);
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(chunk)))))
    }
}

/// The real answer, one byte every `delay`.
struct DripBody {
    bytes: Bytes,
    pos: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl axum::body::HttpBody for DripBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.pos >= self.bytes.len() {
            return Poll::Ready(None);
        }
        let delay = self.delay;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let pos = self.pos;
        self.pos += 1;
        let byte = self.bytes.slice(pos..pos + 1);
        Poll::Ready(Some(Ok(http_body::Frame::data(byte))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_values_land_in_v2_keys_and_v3_signals() {
        let mut v =
            json!({"responses":[{"path":"/battery","body":{"percentRemaining":0.5,"range":10}}]});
        set_everywhere(&mut v, "percentRemaining", json!(250));
        assert_eq!(v["responses"][0]["body"]["percentRemaining"], json!(250));
        let mut v = json!({"data":[{"id":"tractionbattery-stateofcharge","attributes":{"code":"tractionbattery-stateofcharge","body":{"unit":"percent","value":50}}}]});
        set_everywhere(&mut v, "tractionbattery-stateofcharge", json!(-5));
        assert_eq!(v["data"][0]["attributes"]["body"]["value"], json!(-5));
    }
}
