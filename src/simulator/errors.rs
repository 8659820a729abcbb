//! Smartcar's error envelopes: v2 (smartcar-api.md §4.1), v3 `errors[]` (§3.6) and the token
//! endpoint's OAuth body (§1.5).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::fleet::uuid;

pub fn request_id() -> String {
    uuid(&mut rand::rng())
}

fn resolution(error_type: &str) -> serde_json::Value {
    match error_type {
        "PERMISSION" | "AUTHENTICATION_FAILED" => json!({"type": "REAUTHENTICATE"}),
        "RATE_LIMIT" | "SERVER" | "UPSTREAM" => json!({"type": "RETRY_LATER"}),
        "BILLING" => json!({"type": "CONTACT_SUPPORT"}),
        _ => json!({"type": null}),
    }
}

fn doc_url(error_type: &str, code: Option<&str>) -> String {
    let page = error_type.to_ascii_lowercase().replace('_', "-");
    match code {
        Some(c) => format!(
            "https://smartcar.com/docs/errors/api-errors/{page}-errors#{}",
            c.to_ascii_lowercase().replace('_', "-")
        ),
        None => format!("https://smartcar.com/docs/errors/api-errors/{page}-errors"),
    }
}

/// A v2 error response with the `sc-request-id` header.
pub fn v2(status: u16, error_type: &str, code: Option<&str>, description: &str) -> Response {
    let rid = request_id();
    let body = v2_body(status, error_type, code, description, &rid);
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&rid) {
        r.headers_mut().insert("sc-request-id", v);
    }
    r
}

pub fn v2_body(
    status: u16,
    error_type: &str,
    code: Option<&str>,
    description: &str,
    rid: &str,
) -> serde_json::Value {
    json!({
        "type": error_type,
        "code": code,
        "description": description,
        "docURL": doc_url(error_type, code),
        "statusCode": status,
        "requestId": rid,
        "resolution": resolution(error_type),
        "suggestedUserMessage": description,
    })
}

/// A v3 `errors[]` response.
pub fn v3(
    status: u16,
    error_type: &str,
    code: Option<&str>,
    title: &str,
    detail: &str,
) -> Response {
    let body = json!({"errors": [{
        "status": status.to_string(),
        "type": error_type,
        "code": code,
        "title": title,
        "detail": detail,
        "links": {"about": doc_url(error_type, code)},
        "resolution": resolution(error_type),
    }]});
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&request_id()) {
        r.headers_mut().insert("sc-request-id", v);
    }
    r
}

/// The token endpoint's OAuth error body.
pub fn oauth(status: u16, error: &str, description: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}
