//! An in-process simulator for the tests that talk to it over real HTTP on loopback:
//! `carpulse::simulator::serve` on `127.0.0.1:0`, and a client that connects (authorize + code
//! exchange), refreshes, sends bearer requests and reads the introspection endpoints.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use carpulse::simulator::{serve, SimulatorConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub const REDIRECT: &str = "http://localhost:8000/exchange";

/// Every permission the simulator tests read (the simulator enforces the granted scope).
pub const FULL_SCOPE: &str = "read_vehicle_info read_vin read_battery read_charge read_odometer read_location read_tires read_fuel read_engine_oil";

pub struct TestSim {
    pub base: String,
    pub client: reqwest::Client,
    pub cfg: SimulatorConfig,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn(cfg: SimulatorConfig) -> TestSim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(serve(listener, cfg.clone(), shutdown.clone()));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    TestSim {
        base,
        client,
        cfg,
        shutdown,
        handle,
    }
}

/// A report interval long enough that a test never crosses a report boundary by accident.
pub fn stable_cfg() -> SimulatorConfig {
    SimulatorConfig {
        report_interval: Duration::from_secs(3600),
        ..SimulatorConfig::default()
    }
}

impl TestSim {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.cfg.client_id, self.cfg.client_secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Runs Connect's authorize step with [`FULL_SCOPE`] and returns the response (a redirect
    /// when it succeeds).
    pub async fn authorize(&self, extra: &[(&str, &str)]) -> reqwest::Response {
        let mut query = vec![
            ("response_type", "code"),
            ("client_id", self.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", FULL_SCOPE),
            ("mode", "simulated"),
        ];
        query.extend_from_slice(extra);
        self.get_query("/oauth/authorize", &query).await
    }

    /// Authorizes (asserting the 302) and returns the code from the redirect.
    pub async fn code(&self, extra: &[(&str, &str)]) -> String {
        let response = self.authorize(extra).await;
        assert_eq!(response.status(), 302);
        code_of(&response)
    }

    pub async fn token_request(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(self.url("/oauth/token"))
            .header("authorization", self.basic())
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// Exchanges a code (asserting 200) and returns the token pair.
    pub async fn exchange(&self, code: &str) -> Value {
        let response = self
            .token_request(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
            ])
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Connects the given user (1-based) and returns its access token.
    pub async fn connect(&self, user: &str) -> String {
        let code = self.code(&[("user", user)]).await;
        self.exchange(&code).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Authorize for user 1 with exactly this `scope` (absent when `None`), then exchange the
    /// code: the token pair.
    pub async fn pair_with_scope(&self, scope: Option<&str>) -> Value {
        let mut query = vec![
            ("response_type", "code"),
            ("client_id", self.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("mode", "simulated"),
            ("user", "1"),
        ];
        if let Some(scope) = scope {
            query.push(("scope", scope));
        }
        let response = self.get_query("/oauth/authorize", &query).await;
        assert_eq!(response.status(), 302);
        self.exchange(&code_of(&response)).await
    }

    pub async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .await
    }

    pub async fn reauthenticate(&self, query: &[(&str, &str)]) -> reqwest::Response {
        self.get_query("/oauth/reauthenticate", query).await
    }

    /// A GET without credentials, with this query.
    pub async fn get_query(&self, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .query(query)
            .send()
            .await
            .unwrap()
    }

    /// A bearer GET with the given `sc-unit-system`.
    pub async fn get_units(&self, path: &str, token: &str, units: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .header("sc-unit-system", units)
            .send()
            .await
            .unwrap()
    }

    /// A bearer GET with `sc-unit-system: metric`.
    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.get_units(path, token, "metric").await
    }

    /// A metric bearer GET that must answer 200: its body.
    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self.get(path, token).await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// GET with the given units; asserts 200 and the echoed unit system and returns
    /// (data age, fetched at, body).
    pub async fn data(&self, path: &str, token: &str, units: &str) -> (i64, i64, Value) {
        let response = self.get_units(path, token, units).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "sc-unit-system"), units);
        let age = parse_rfc3339_ms(header(&response, "sc-data-age"));
        let fetched = parse_rfc3339_ms(header(&response, "sc-fetched-at"));
        (age, fetched, response.json().await.unwrap())
    }

    /// A metric v2 batch that must answer 200: its `responses`.
    pub async fn batch(&self, car: &str, token: &str, paths: &[&str]) -> Vec<Value> {
        let requests: Vec<Value> = paths.iter().map(|p| json!({ "path": p })).collect();
        let response = self
            .client
            .post(self.url(&format!("/v2.0/vehicles/{car}/batch")))
            .bearer_auth(token)
            .header("sc-unit-system", "metric")
            .json(&json!({ "requests": requests }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["responses"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub async fn permissions(&self, car: &str, token: &str) -> Value {
        self.get_json(&format!("/v2.0/vehicles/{car}/permissions"), token)
            .await
    }

    /// The ids of the token's vehicles (first v2 page).
    pub async fn vehicle_ids(&self, token: &str) -> Vec<String> {
        self.get_json("/v2.0/vehicles", token).await["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    /// Vehicle id by v3 `powertrainType`.
    pub async fn by_powertrain(&self, token: &str) -> HashMap<String, String> {
        let mut found = HashMap::new();
        for id in self.vehicle_ids(token).await {
            let vehicle = self.get_json(&format!("/v3/vehicles/{id}"), token).await;
            let kind = vehicle["data"]["attributes"]["powertrainType"]
                .as_str()
                .unwrap()
                .to_owned();
            found.insert(kind, id);
        }
        found
    }

    pub async fn stats(&self) -> Value {
        self.introspect("/_simulator/stats").await
    }

    pub async fn fleet(&self) -> Value {
        self.introspect("/_simulator/vehicles").await
    }

    async fn introspect(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The first vehicle of the first user, from `/_simulator/vehicles`.
    pub async fn first_car(&self) -> String {
        self.fleet().await["users"][0]["vehicles"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn served(&self, vehicle_id: &str) -> Value {
        let response = self
            .get_query("/_simulator/served", &[("vehicle_id", vehicle_id)])
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn set_fault(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/_simulator/faults"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /oauth2/token` with this form and no other credentials.
    pub async fn app_token_request(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(self.url("/oauth2/token"))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// A v3 application token for the configured API credentials (asserting 200).
    pub async fn app_token(&self) -> String {
        let response = self
            .app_token_request(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.cfg.api_client_id.as_str()),
                ("client_secret", self.cfg.api_client_secret.as_str()),
            ])
            .await;
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A bearer GET with `sc-user-id` when `user` is given (the v3 application-token model).
    pub async fn get_as(&self, path: &str, token: &str, user: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path)).bearer_auth(token);
        if let Some(user) = user {
            request = request.header("sc-user-id", user);
        }
        request.send().await.unwrap()
    }

    /// `POST /_simulator/revoke` with this body.
    pub async fn revoke(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/_simulator/revoke"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The fleet's user ids, in order.
    pub async fn user_ids(&self) -> Vec<String> {
        self.fleet().await["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The vehicle ids of the n-th user (0-based), in order.
    pub async fn cars_of(&self, user: usize) -> Vec<String> {
        self.fleet().await["users"][user]["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Shuts the simulator down and asserts it stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// The `code` query parameter of an authorize redirect.
fn code_of(response: &reqwest::Response) -> String {
    let location = reqwest::Url::parse(header(response, "location")).unwrap();
    location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned()
}

pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

/// Any RFC 3339 timestamp, in Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .timestamp_millis()
}

/// Smartcar's exact form, ISO 8601 in UTC with milliseconds, in Unix milliseconds.
pub fn parse_iso_ms(s: &str) -> i64 {
    assert_eq!(s.len(), 24, "ISO-8601 with milliseconds expected: {s}");
    assert!(s.ends_with('Z'), "{s}");
    parse_rfc3339_ms(s)
}

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}
