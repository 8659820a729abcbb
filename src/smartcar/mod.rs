//! STUB
#![allow(unused)]
pub mod error;
use crate::domain::*;
use error::*;
use std::time::Duration;
pub struct ClientConfig {
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: String,
    pub token_url: String,
    pub api_v2_url: String,
    pub api_v3_url: String,
    pub unit_system: UnitSystem,
    pub timeout: Duration,
}
#[derive(Clone)]
pub struct SmartcarClient;
pub struct RequestCtx<'a> { pub access_token: &'a Secret, pub user_id: Option<&'a str> }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job { Battery, Info }
pub struct EndpointResult { pub endpoint: &'static str, pub result: Result<Payload, ApiError> }
pub enum Payload { Battery(BatteryReading), Charge(ChargeReading), Odometer(OdometerReading), Info(VehicleInfo), Vin(String) }
impl SmartcarClient {
    pub fn new(cfg: ClientConfig) -> anyhow::Result<Self> { todo!() }
    pub async fn exchange_code(&self, code: &str) -> Result<TokenPair, AuthError> { todo!() }
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenPair, AuthError> { todo!() }
    pub async fn user_id(&self, access: &Secret) -> Result<String, ApiError> { todo!() }
    pub async fn list_vehicles(&self, access: &Secret) -> Result<Vec<VehicleId>, ApiError> { todo!() }
    pub async fn vehicle_info(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId) -> Result<VehicleInfo, ApiError> { todo!() }
    pub async fn fetch(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId, job: Job) -> Result<Vec<EndpointResult>, ApiError> { todo!() }
}
