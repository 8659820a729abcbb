//! The Smartcar client: the token endpoint (through `oauth2`), Vehicle API v2.0 and v3, and the
//! error taxonomy of smartcar-api.md §4. It turns wire shapes into the domain's readings, so the
//! poller never sees JSON.
//!
//! INTERFACE (fixed; the rest of carpulse is written against it):
//!
//! ```ignore
//! pub struct ClientConfig {
//!     pub client_id: String,
//!     pub client_secret: Secret,
//!     pub redirect_uri: String,
//!     pub token_url: String,
//!     pub api_v2_url: String,   // e.g. "https://api.smartcar.com/v2.0" (no trailing slash needed)
//!     pub api_v3_url: String,   // e.g. "https://vehicle.api.smartcar.com/v3"
//!     pub unit_system: UnitSystem,
//!     pub timeout: std::time::Duration, // per request
//! }
//! #[derive(Clone)] pub struct SmartcarClient { .. }
//! impl SmartcarClient {
//!     pub fn new(cfg: ClientConfig) -> anyhow::Result<Self>;
//!     pub async fn exchange_code(&self, code: &str) -> Result<TokenPair, AuthError>;
//!     pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenPair, AuthError>;
//!     pub async fn user_id(&self, access: &Secret) -> Result<String, ApiError>;          // GET {v2}/user
//!     pub async fn list_vehicles(&self, access: &Secret) -> Result<Vec<VehicleId>, ApiError>; // paged GET {v2}/vehicles
//!     pub async fn vehicle_info(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId) -> Result<VehicleInfo, ApiError>;
//!     pub async fn fetch(&self, api: ApiVersion, ctx: &RequestCtx<'_>, id: &VehicleId, job: Job)
//!         -> Result<Vec<EndpointResult>, ApiError>;
//! }
//! pub struct RequestCtx<'a> { pub access_token: &'a Secret, pub user_id: Option<&'a str> }
//! pub enum Job { Battery /* battery + charge */, Info /* info + vin + odometer */ }
//! pub struct EndpointResult { pub endpoint: &'static str, pub result: Result<Payload, ApiError> }
//! pub enum Payload { Battery(BatteryReading), Charge(ChargeReading), Odometer(OdometerReading), Info(VehicleInfo), Vin(String) }
//! ```

pub mod error;
