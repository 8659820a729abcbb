//! Plain data shared by every part of carpulse: ids, readings, tokens. No I/O lives here, so the
//! store, the Smartcar client, the poller and the tests all speak the same types.

use std::borrow::Cow;
use std::fmt;

/// Unix time in milliseconds, UTC: the unit of every time column in the store (DESIGN §3).
pub type UnixMillis = i64;

/// The current time in unix milliseconds.
pub fn now_ms() -> UnixMillis {
    chrono::Utc::now().timestamp_millis()
}

/// Smartcar's vehicle id (a UUID-like string). A newtype so it is never confused with a user id.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct VehicleId(pub String);

impl fmt::Display for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so table columns (`{:<38}`) line up.
        f.pad(&self.0)
    }
}

/// The store's key of one connection (one Smartcar consent = one token pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub i64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A secret string (client secret, access or refresh token). `Debug` and `Display` print a
/// placeholder so a secret can't reach a log line, an error or a panic message by accident;
/// the value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Which Smartcar Vehicle API the poller speaks (`smartcar.api`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    V2,
    V3,
}

/// `sc-unit-system`: carpulse always stores metric values; imperial answers are converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitSystem {
    Metric,
    Imperial,
}

impl UnitSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitSystem::Metric => "metric",
            UnitSystem::Imperial => "imperial",
        }
    }
}

/// An access/refresh token pair with the expiries carpulse computed when it was issued
/// (Smartcar sends `expires_in` only; the refresh token lives 60 days from issue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPair {
    pub access_token: Secret,
    pub refresh_token: Secret,
    pub access_expires_at: UnixMillis,
    pub refresh_expires_at: UnixMillis,
}

/// Refresh tokens live 60 days (smartcar-api.md §1.4).
pub const REFRESH_TOKEN_LIFETIME_MS: i64 = 60 * 24 * 3600 * 1000;

/// Status of a connection in the store's `connections.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionStatus {
    Active,
    NeedsReauth,
    /// Smartcar no longer lists the connection (`/v3/connections`): the owner disconnected
    /// the app. Its vehicles are not polled until they are listed again or reconnected.
    Revoked,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Active => "active",
            ConnectionStatus::NeedsReauth => "needs_reauth",
            ConnectionStatus::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ConnectionStatus::Active),
            "needs_reauth" => Some(ConnectionStatus::NeedsReauth),
            "revoked" => Some(ConnectionStatus::Revoked),
            _ => None,
        }
    }
}

/// Charging state as Smartcar names it (v2 `/charge.state`, v3 `charge-detailedchargingstatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChargeState {
    Charging,
    FullyCharged,
    NotCharging,
}

impl ChargeState {
    pub const ALL: [ChargeState; 3] = [
        ChargeState::Charging,
        ChargeState::FullyCharged,
        ChargeState::NotCharging,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeState::Charging => "CHARGING",
            ChargeState::FullyCharged => "FULLY_CHARGED",
            ChargeState::NotCharging => "NOT_CHARGING",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().as_str() {
            "CHARGING" => Some(ChargeState::Charging),
            "FULLY_CHARGED" => Some(ChargeState::FullyCharged),
            "NOT_CHARGING" => Some(ChargeState::NotCharging),
            _ => None,
        }
    }
    /// The inverse of [`ChargeState::code`]; an unknown code reads as NOT_CHARGING, as the
    /// store's view does.
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => ChargeState::Charging,
            2 => ChargeState::FullyCharged,
            _ => ChargeState::NotCharging,
        }
    }
    /// The small integer the store keeps instead of the string (the view maps it back).
    pub fn code(self) -> i64 {
        match self {
            ChargeState::NotCharging => 0,
            ChargeState::Charging => 1,
            ChargeState::FullyCharged => 2,
        }
    }
}

/// When a value was true at the car and when carpulse received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// `sc-data-age` (v2) or `meta.oemUpdatedAt` (v3); `fetched_at` when neither is given.
    pub recorded_at: UnixMillis,
    pub fetched_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BatteryReading {
    pub stamp: Stamp,
    /// 0–100 (v2's 0–1 fraction is converted by the client).
    pub soc_percent: f64,
    pub range_km: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChargeReading {
    pub stamp: Stamp,
    pub plugged_in: bool,
    pub state: ChargeState,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OdometerReading {
    pub stamp: Stamp,
    pub odometer_km: f64,
}

/// Make/model/year (v2 `GET /vehicles/{id}`, v3 `GET /v3/vehicles/{id}`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VehicleInfo {
    pub make: String,
    pub model: String,
    pub year: i32,
}

/// One time-series row bound for the store, with the vehicle it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    Battery(BatteryReading),
    Charge(ChargeReading),
    Odometer(OdometerReading),
}

impl Reading {
    /// The store table the reading lands in; also the `table` label of the row counters.
    pub fn table(&self) -> &'static str {
        match self {
            Reading::Battery(_) => "battery",
            Reading::Charge(_) => "charge",
            Reading::Odometer(_) => "odometer",
        }
    }
    pub fn stamp(&self) -> Stamp {
        match self {
            Reading::Battery(r) => r.stamp,
            Reading::Charge(r) => r.stamp,
            Reading::Odometer(r) => r.stamp,
        }
    }
}

/// What one poll of one endpoint came to, for `poll_events` and `carpulse_polls_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollEvent {
    pub vehicle_id: VehicleId,
    pub at: UnixMillis,
    /// `battery`, `charge`, `info`, `vin`, `odometer`, `signals`, ... Borrowed when the poller
    /// makes it (its names are static): a v3 poll makes four events, and their two strings each
    /// were an allocation made on the runtime thread and freed on the store's.
    pub endpoint: Cow<'static, str>,
    /// `ok` or the error class label (`auth`, `rate_limited`, `vehicle_state`, ...).
    pub outcome: Cow<'static, str>,
    pub http_status: Option<u16>,
    pub error_type: Option<String>,
    pub error_code: Option<String>,
    /// Smartcar calls the poll was billed (every event of one poll carries the poll's total);
    /// `None` where not known (rows from before schema 2).
    pub calls: Option<u64>,
}

/// Whether `user_id` is a user id Smartcar gave (not the `vehicles:<ids>` key older carpulse
/// versions made up when `GET /user` failed). Only a real one may be sent as `sc-user-id`.
pub fn is_real_user_id(user_id: &str) -> bool {
    let u = user_id.trim();
    !u.is_empty() && !u.starts_with("vehicles:")
}

/// What a stored block holds back: the `endpoint` column of `vehicle_blocks`, where the two
/// vehicle-wide kinds are spelled `*` and `~` (so SQL and older stores read them as before).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BlockScope {
    /// One endpoint the vehicle cannot answer, until a new consent or `vehicles enable`.
    Endpoint(String),
    /// The whole vehicle is paused (billing, a vehicle-wide refusal): `*`.
    Vehicle,
    /// The whole vehicle waits until the block's `until` (a retry-after, a backoff): `~`.
    Wait,
}

impl BlockScope {
    const VEHICLE: &'static str = "*";
    const WAIT: &'static str = "~";

    /// The column's spelling.
    pub fn column(&self) -> &str {
        match self {
            BlockScope::Endpoint(e) => e,
            BlockScope::Vehicle => Self::VEHICLE,
            BlockScope::Wait => Self::WAIT,
        }
    }

    pub fn from_column(s: &str) -> BlockScope {
        match s {
            Self::VEHICLE => BlockScope::Vehicle,
            Self::WAIT => BlockScope::Wait,
            e => BlockScope::Endpoint(e.to_owned()),
        }
    }

    /// The endpoint, when only one is held back.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            BlockScope::Endpoint(e) => Some(e),
            _ => None,
        }
    }
}
