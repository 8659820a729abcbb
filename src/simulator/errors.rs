//! Smartcar's error envelopes, so the simulator fails exactly the way the real API does
//! (smartcar-api.md §3.6 for v3 `errors[]`, §4.1 for the v2 object, §1.5 for the OAuth shape).
//!
//! One [`ApiError`] value describes the failure; the API version decides how it is rendered, so a
//! handler never builds JSON error bodies by hand and the v2/v3 shapes can't drift apart.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// Which envelope to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    V2,
    V3,
}

/// `resolution.type` (smartcar-api.md §4.1). An enum rather than a string so an [`ApiError`]
/// stays under clippy's `result_large_err` bound with room for `resolution.url`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolution {
    RetryLater,
    Reauthenticate,
    ContactSupport,
}

impl Resolution {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resolution::RetryLater => "RETRY_LATER",
            Resolution::Reauthenticate => "REAUTHENTICATE",
            Resolution::ContactSupport => "CONTACT_SUPPORT",
        }
    }
}

/// A Smartcar API error: type, code and the texts the docs give for them.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) code: Option<&'static str>,
    pub(crate) description: String,
    doc_path: &'static str,
    resolution: Option<Resolution>,
    /// `resolution.url`, where the user can fix it (the re-auth flow of AUTHENTICATION_FAILED).
    resolution_url: Option<Box<str>>,
    suggested_user_message: &'static str,
    /// Seconds for the `retry-after` header (RATE_LIMIT:VEHICLE only).
    pub(crate) retry_after: Option<u32>,
}

impl ApiError {
    /// Any type/code from the table of smartcar-api.md §4.2 (the faults use it).
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        description: &str,
        resolution: Option<Resolution>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            description: description.to_owned(),
            doc_path: "",
            resolution,
            resolution_url: None,
            suggested_user_message:
                "Your application has encountered an error. Please contact us to resolve this issue.",
            retry_after: None,
        }
    }

    /// 403 PERMISSION (code null, resolution REAUTHENTICATE): the consent behind the token did
    /// not grant the permission this endpoint or signal needs (smartcar-api.md §4.2).
    pub(crate) fn permission() -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "PERMISSION",
            code: None,
            description:
                "Your application has insufficient permissions to access the requested resource. \
                          Please prompt the user to re-authenticate using Smartcar Connect."
                    .to_owned(),
            doc_path: "permission-errors",
            resolution: Some(Resolution::Reauthenticate),
            resolution_url: None,
            suggested_user_message:
                "Your car's connection needs to be updated. Please reauthenticate to \
                                     continue.",
            retry_after: None,
        }
    }

    /// 400 CONNECTED_SERVICES_ACCOUNT:AUTHENTICATION_FAILED (resolution REAUTHENTICATE): the
    /// owner's login at the manufacturer stopped working; `resolution.url` is the re-auth flow
    /// (`/oauth/reauthenticate?response_type=vehicle_id&client_id=…&vehicle_id=…`), which
    /// [`ApiError::with_resolution_url`] fills in once the vehicle is known.
    pub(crate) fn account_authentication_failed() -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "CONNECTED_SERVICES_ACCOUNT",
            code: Some("AUTHENTICATION_FAILED"),
            description:
                "Smartcar was unable to authenticate with the user's connected services account. \
                          Please prompt the user to re-authenticate using Smartcar Connect."
                    .to_owned(),
            doc_path: "connected-services-account-errors#authentication-failed",
            resolution: Some(Resolution::Reauthenticate),
            resolution_url: None,
            suggested_user_message:
                "Smartcar can no longer log into your connected services account. \
                                     Please reconnect your car.",
            retry_after: None,
        }
    }

    /// Sets `resolution.url`.
    pub(crate) fn with_resolution_url(mut self, url: String) -> Self {
        self.resolution_url = Some(url.into_boxed_str());
        self
    }

    /// `resolution`: `{"type": …}`, plus `url` when there is one.
    fn resolution_json(&self) -> Value {
        match &self.resolution_url {
            Some(url) => json!({"type": self.resolution.map(Resolution::as_str), "url": url}),
            None => json!({"type": self.resolution.map(Resolution::as_str)}),
        }
    }

    /// 401 AUTHENTICATION: missing, unknown or expired access token (or a wrong `sc-user-id`).
    pub(crate) fn authentication() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "AUTHENTICATION",
            code: None,
            description: "The authorization header is missing or malformed, or it contains invalid or expired \
                          authentication credentials. Please check for missing parameters, spelling and casing \
                          mistakes, and other syntax issues."
                .to_owned(),
            doc_path: "authentication-errors",
            resolution: None,
            resolution_url: None,
            suggested_user_message: "Your application has encountered an error. Please contact us to resolve this issue.",
            retry_after: None,
        }
    }

    /// 400 CONNECTED_SERVICES_ACCOUNT:VEHICLE_MISSING: the vehicle is not covered by this token.
    pub(crate) fn vehicle_missing() -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "CONNECTED_SERVICES_ACCOUNT",
            code: Some("VEHICLE_MISSING"),
            description:
                "This vehicle is no longer associated with the user's connected services account. \
                          Please prompt the user to re-add the vehicle to their account."
                    .to_owned(),
            doc_path: "connected-services-account-errors#vehicle-missing",
            resolution: None,
            resolution_url: None,
            suggested_user_message:
                "Your car is no longer associated with your connected services account. \
                                     Please log into your account and re-add your car.",
            retry_after: None,
        }
    }

    /// 404 RESOURCE_NOT_FOUND:PATH: no such endpoint (or, in v3, no such signal).
    pub(crate) fn path_not_found() -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "RESOURCE_NOT_FOUND",
            code: Some("PATH"),
            description: "The requested resource does not exist. Please check the URL and try again.".to_owned(),
            doc_path: "resource-not-found-errors#path",
            resolution: None,
            resolution_url: None,
            suggested_user_message: "Your application has encountered an error. Please contact us to resolve this issue.",
            retry_after: None,
        }
    }

    /// 400 VALIDATION:MISSING_PARAMETER "missing userId": an application token without the
    /// `sc-user-id` header on a vehicle path (smartcar-api.md §10.4, seen live).
    pub(crate) fn missing_user_id() -> Self {
        ApiError {
            code: Some("MISSING_PARAMETER"),
            description: "missing userId".to_owned(),
            doc_path: "validation-errors#missing-parameter",
            ..ApiError::validation("")
        }
    }

    /// 400 VALIDATION:INVALID_PARAMETER with what was wrong (the v3 code for a bad value).
    pub(crate) fn invalid_parameter(detail: impl Into<String>) -> Self {
        ApiError {
            code: Some("INVALID_PARAMETER"),
            description: detail.into(),
            doc_path: "validation-errors#invalid-parameter",
            ..ApiError::validation("")
        }
    }

    /// 403 AUTHENTICATION:ACCESS_DENIED: the application token names a user who has no
    /// connection to the vehicle (not theirs, never approved in Connect, or revoked)
    /// (smartcar-api.md §10.4).
    pub(crate) fn access_denied() -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: Some("ACCESS_DENIED"),
            description: "The user named in sc-user-id has no connection to this vehicle. \
                          Please prompt the user to connect it using Smartcar Connect."
                .to_owned(),
            doc_path: "authentication-errors#access-denied",
            ..ApiError::authentication()
        }
    }

    /// 404 RESOURCE_NOT_FOUND with a v3 code (`SIGNAL_NOT_FOUND`, `CONNECTION_NOT_FOUND`).
    pub(crate) fn not_found(code: &'static str, detail: &str) -> Self {
        ApiError {
            code: Some(code),
            description: detail.to_owned(),
            doc_path: "",
            ..ApiError::path_not_found()
        }
    }

    /// 400 VALIDATION:PARAMETER with what was wrong.
    pub(crate) fn validation(detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "VALIDATION",
            code: Some("PARAMETER"),
            description: format!("Request invalid or malformed. {}", detail.into()),
            doc_path: "validation-errors#parameter",
            resolution: None,
            resolution_url: None,
            suggested_user_message: "Your application has encountered an error. Please contact us to resolve this issue.",
            retry_after: None,
        }
    }

    fn doc_url(&self) -> String {
        if self.doc_path.is_empty() {
            // The page of the error's type, anchored at its code, as Smartcar's docURLs are.
            let page = self.kind.to_ascii_lowercase().replace('_', "-");
            return match self.code {
                Some(c) => format!(
                    "https://smartcar.com/docs/errors/api-errors/{page}-errors#{}",
                    c.to_ascii_lowercase().replace('_', "-")
                ),
                None => format!("https://smartcar.com/docs/errors/api-errors/{page}-errors"),
            };
        }
        format!(
            "https://smartcar.com/docs/errors/api-errors/{}",
            self.doc_path
        )
    }

    /// The v2 object (§4.1); also the body of a failed batch item.
    pub(crate) fn v2_body(&self, request_id: &str) -> Value {
        json!({
            "type": self.kind,
            "code": self.code,
            "description": self.description,
            "docURL": self.doc_url(),
            "statusCode": self.status.as_u16(),
            "requestId": request_id,
            "resolution": self.resolution_json(),
            "suggestedUserMessage": self.suggested_user_message,
        })
    }

    /// The v3 envelope (§3.6): `status` is a string; `meta.debug.requestId` repeats the
    /// `sc-request-id` header, as live errors carry it (§10.4).
    pub(crate) fn v3_body(&self, request_id: &str) -> Value {
        json!({"errors": [{
            "status": self.status.as_u16().to_string(),
            "type": self.kind,
            "code": self.code,
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "detail": self.description,
            "links": {"about": self.doc_url()},
            "resolution": self.resolution_json(),
            "suggestedUserMessage": self.suggested_user_message,
            "meta": {"debug": {"requestId": request_id}},
        }]})
    }

    /// The full HTTP response, with `sc-request-id` like every Smartcar answer.
    pub(crate) fn into_api_response(self, api: Api, request_id: &str) -> Response {
        let body = match api {
            Api::V2 => self.v2_body(request_id),
            Api::V3 => self.v3_body(request_id),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("sc-request-id", value);
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

/// The token endpoint's OAuth-style error `{"error","error_description"}` (§1.5).
pub(crate) fn oauth_error(
    status: StatusCode,
    error: &str,
    description: impl Into<String>,
) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description.into()})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v3_shapes() {
        let e = ApiError::vehicle_missing();
        let v2 = e.v2_body("rid");
        assert_eq!(v2["type"], "CONNECTED_SERVICES_ACCOUNT");
        assert_eq!(v2["code"], "VEHICLE_MISSING");
        assert_eq!(v2["statusCode"], 400);
        assert_eq!(v2["requestId"], "rid");
        assert!(v2["resolution"]["type"].is_null());
        let v3 = ApiError::authentication().v3_body("rid");
        assert_eq!(v3["errors"][0]["status"], "401");
        assert_eq!(v3["errors"][0]["type"], "AUTHENTICATION");
        assert!(v3["errors"][0]["code"].is_null());
        assert_eq!(v3["errors"][0]["title"], "Unauthorized");
        assert_eq!(v3["errors"][0]["meta"]["debug"]["requestId"], "rid");
        let denied = ApiError::access_denied().v3_body("rid");
        assert_eq!(
            (
                &denied["errors"][0]["status"],
                &denied["errors"][0]["type"],
                &denied["errors"][0]["code"]
            ),
            (
                &json!("403"),
                &json!("AUTHENTICATION"),
                &json!("ACCESS_DENIED")
            )
        );
        let missing = ApiError::missing_user_id().v3_body("rid");
        assert_eq!(missing["errors"][0]["code"], "MISSING_PARAMETER");
        assert_eq!(missing["errors"][0]["detail"], "missing userId");
    }

    #[test]
    fn permission_and_account_errors_ask_for_reauthentication() {
        let v2 = ApiError::permission().v2_body("rid");
        assert_eq!(v2["type"], "PERMISSION");
        assert!(v2["code"].is_null());
        assert_eq!(v2["statusCode"], 403);
        assert_eq!(v2["resolution"], json!({"type": "REAUTHENTICATE"}));
        assert_eq!(
            v2["docURL"],
            "https://smartcar.com/docs/errors/api-errors/permission-errors"
        );
        let v3 = ApiError::permission().v3_body("rid");
        assert_eq!(v3["errors"][0]["status"], "403");
        assert_eq!(v3["errors"][0]["title"], "Forbidden");
        let account = ApiError::account_authentication_failed()
            .with_resolution_url("http://x/oauth/reauthenticate?vehicle_id=v".to_owned());
        let v2 = account.v2_body("rid");
        assert_eq!(
            (&v2["type"], &v2["code"], &v2["statusCode"]),
            (
                &json!("CONNECTED_SERVICES_ACCOUNT"),
                &json!("AUTHENTICATION_FAILED"),
                &json!(400)
            )
        );
        assert_eq!(
            v2["resolution"],
            json!({"type": "REAUTHENTICATE", "url": "http://x/oauth/reauthenticate?vehicle_id=v"})
        );
        assert_eq!(
            account.v3_body("rid")["errors"][0]["resolution"],
            v2["resolution"]
        );
    }
}
