#![allow(unused)]
use std::time::Duration;
#[derive(Debug, Clone, thiserror::Error)]
#[error("api error")]
pub struct ApiError { pub kind: ErrorKind, pub status: Option<u16>, pub error_type: Option<String>, pub code: Option<String>, pub description: Option<String>, pub retry_after: Option<Duration>, pub request_id: Option<String> }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind { Authentication, Permission, Validation, NotFound, ConnectedServicesAccount, VehicleState, RateLimitVehicle, RateLimitApp, Billing, Compatibility, Server, Upstream, Transport, Timeout, Decode, Other }
impl ErrorKind { pub fn label(&self) -> &'static str { "x" } }
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("rejected")]
    Rejected { status: Option<u16>, error: String, description: Option<String> },
    #[error("transient")]
    Transient { message: String },
}
impl AuthError { pub fn needs_reauth(&self) -> bool { todo!() } }
