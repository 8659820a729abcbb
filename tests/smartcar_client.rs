//! The Smartcar client against a scripted Smartcar look-alike on 127.0.0.1:0: asserts what the
//! client sends (Basic auth, form bodies, Bearer, sc-unit-system, sc-user-id, batch bodies,
//! paging offsets, followed `links.next`) and what it returns (exact readings and stamps, error
//! kinds with `retry_after`), over real HTTP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

use carpulse::domain::{
    now_ms, ApiVersion, BatteryReading, ChargeReading, ChargeState, OdometerReading, Secret, Stamp,
    UnitSystem, VehicleId, VehicleInfo, REFRESH_TOKEN_LIFETIME_MS,
};
use carpulse::smartcar::{
    ApiError, AuthError, ClientConfig, Endpoint, ErrorKind, Job, Payload, RequestCtx,
    SmartcarClient,
};

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Rec {
    method: String,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Rec {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn form(&self) -> Vec<(String, String)> {
        form_decode(&String::from_utf8_lossy(&self.body))
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What the scripted server answers: status, headers, body, and an optional delay.
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Option<Duration>,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
        delay: None,
    }
}

impl Answer {
    fn header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.to_string()));
        self
    }
}

type Script = Arc<dyn Fn(&Rec) -> Answer + Send + Sync>;

#[derive(Clone)]
struct Srv {
    script: Script,
    seen: Arc<Mutex<Vec<Rec>>>,
}

async fn handle(State(srv): State<Srv>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap()
        .to_vec();
    let rec = Rec {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body,
    };
    srv.seen.lock().unwrap().push(rec.clone());
    let a = (srv.script)(&rec);
    if let Some(d) = a.delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = Response::builder().status(StatusCode::from_u16(a.status).unwrap());
    for (k, v) in a.headers {
        resp = resp.header(k, v);
    }
    resp.body(Body::from(a.body)).unwrap()
}

struct Harness {
    client: SmartcarClient,
    seen: Arc<Mutex<Vec<Rec>>>,
}

impl Harness {
    fn requests(&self) -> Vec<Rec> {
        self.seen.lock().unwrap().clone()
    }
}

const CLIENT_ID: &str = "client-id-1";
const CLIENT_SECRET: &str = "s3cret-client-value";
const REDIRECT: &str = "http://localhost:8000/exchange";
const ACCESS: &str = "access-token-aaaa-1111";

async fn start(
    units: UnitSystem,
    timeout: Duration,
    script: impl Fn(&Rec) -> Answer + Send + Sync + 'static,
) -> Harness {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let srv = Srv {
        script: Arc::new(script),
        seen: seen.clone(),
    };
    let app = Router::new().fallback(handle).with_state(srv);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let base = format!("http://{addr}");
    let client = SmartcarClient::new(ClientConfig {
        client_id: CLIENT_ID.into(),
        client_secret: Secret::new(CLIENT_SECRET),
        redirect_uri: REDIRECT.into(),
        token_url: format!("{base}/oauth/token"),
        // One base with a trailing slash, one without: both must join cleanly.
        api_v2_url: format!("{base}/v2.0/"),
        api_v3_url: format!("{base}/v3"),
        unit_system: units,
        timeout,
        v3_page_size: None,
        max_in_flight: carpulse::config::DEFAULT_MAX_IN_FLIGHT,
    })
    .unwrap();
    Harness { client, seen }
}

async fn metric(script: impl Fn(&Rec) -> Answer + Send + Sync + 'static) -> Harness {
    start(UnitSystem::Metric, Duration::from_secs(10), script).await
}

fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
                out.push(h);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn form_get(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn assert_vehicle_headers(r: &Rec, user_id: Option<&str>) {
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {ACCESS}").as_str())
    );
    assert_eq!(r.header("accept"), Some("application/json"));
    assert_eq!(
        r.header("user-agent"),
        Some(concat!("carpulse/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(r.header("sc-user-id"), user_id);
}

fn ctx<'a>(token: &'a Secret, user: Option<&'a str>) -> RequestCtx<'a> {
    RequestCtx {
        access_token: token,
        user_id: user,
    }
}

fn vid(s: &str) -> VehicleId {
    VehicleId(s.to_string())
}

fn ms(iso: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(iso)
        .unwrap()
        .timestamp_millis()
}

// ---------------------------------------------------------------- token endpoint

#[tokio::test]
async fn exchange_code_sends_basic_auth_and_form_and_computes_expiries() {
    let h = metric(|_| {
        answer(
            200,
            json!({"access_token":"acc-1","token_type":"Bearer","expires_in":7200,"refresh_token":"ref-1"}),
        )
    })
    .await;
    let before = now_ms();
    let pair = h.client.exchange_code("code-xyz").await.unwrap();
    let after = now_ms();

    assert_eq!(pair.access_token.expose(), "acc-1");
    assert_eq!(pair.refresh_token.expose(), "ref-1");
    assert!(pair.access_expires_at >= before + 7_200_000);
    assert!(pair.access_expires_at <= after + 7_200_000);
    assert_eq!(
        pair.refresh_expires_at - pair.access_expires_at,
        REFRESH_TOKEN_LIFETIME_MS - 7_200_000
    );

    let reqs = h.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/oauth/token");
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    assert_eq!(
        r.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert!(r.header("user-agent").unwrap().starts_with("carpulse/"));
    let form = r.form();
    assert_eq!(
        form_get(&form, "grant_type").as_deref(),
        Some("authorization_code")
    );
    assert_eq!(form_get(&form, "code").as_deref(), Some("code-xyz"));
    assert_eq!(form_get(&form, "redirect_uri").as_deref(), Some(REDIRECT));
    // The secret travels only in the Basic header.
    assert_eq!(form_get(&form, "client_secret"), None);
}

#[tokio::test]
async fn refresh_rotates_and_tolerates_missing_fields() {
    let h = metric(|r| {
        let form = r.form();
        match form_get(&form, "refresh_token").as_deref() {
            Some("old-ref") => answer(
                200,
                json!({"access_token":"acc-2","token_type":"Bearer","expires_in":3600,"refresh_token":"new-ref"}),
            ),
            // No refresh_token, no token_type, no expires_in: keep the old token, default 2 h.
            _ => answer(200, json!({"access_token":"acc-3"})),
        }
    })
    .await;
    let before = now_ms();
    let pair = h.client.refresh(&Secret::new("old-ref")).await.unwrap();
    assert_eq!(pair.access_token.expose(), "acc-2");
    assert_eq!(pair.refresh_token.expose(), "new-ref");
    assert!(pair.access_expires_at >= before + 3_600_000);
    assert!(pair.access_expires_at <= now_ms() + 3_600_000);

    let pair = h.client.refresh(&Secret::new("keep-me")).await.unwrap();
    assert_eq!(pair.access_token.expose(), "acc-3");
    assert_eq!(pair.refresh_token.expose(), "keep-me");
    assert_eq!(
        pair.refresh_expires_at - pair.access_expires_at,
        REFRESH_TOKEN_LIFETIME_MS - 7_200_000
    );

    let reqs = h.requests();
    let form = reqs[0].form();
    assert_eq!(
        form_get(&form, "grant_type").as_deref(),
        Some("refresh_token")
    );
    assert_eq!(form_get(&form, "refresh_token").as_deref(), Some("old-ref"));
}

#[tokio::test]
async fn refused_refresh_is_rejected_and_never_shows_the_token() {
    const TOKEN: &str = "refresh-9f8e7d6c-secret";
    let h = metric(|_| {
        answer(
            400,
            json!({"error":"invalid_grant","error_description":format!("Invalid or expired refresh token {TOKEN}.")}),
        )
    })
    .await;
    let err = h.client.refresh(&Secret::new(TOKEN)).await.unwrap_err();
    match &err {
        AuthError::Rejected {
            status,
            error,
            description,
        } => {
            assert_eq!(*status, Some(400));
            assert_eq!(error, "invalid_grant");
            assert_eq!(
                description.as_deref(),
                Some("Invalid or expired refresh token [redacted].")
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(err.needs_reauth());
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(TOKEN), "{text}");
        assert!(!text.contains(CLIENT_SECRET), "{text}");
    }
}

#[tokio::test]
async fn token_endpoint_outages_are_transient() {
    let h = metric(|r| {
        let form = r.form();
        match form_get(&form, "refresh_token").as_deref() {
            Some("r-503") => answer(503, json!({"error":"server_error"})),
            Some("r-429") => answer(429, json!({"error":"rate_limited"})),
            Some("r-html") => Answer {
                status: 502,
                headers: vec![("content-type", "text/html".into())],
                body: "<html>bad gateway</html>".into(),
                delay: None,
            },
            _ => Answer {
                status: 200,
                headers: vec![("content-type", "application/json".into())],
                body: "{not json".into(),
                delay: None,
            },
        }
    })
    .await;
    for token in ["r-503", "r-429", "r-html", "r-garbage"] {
        let err = h.client.refresh(&Secret::new(token)).await.unwrap_err();
        assert!(
            matches!(err, AuthError::Transient { .. }),
            "{token}: {err:?}"
        );
        assert!(!err.needs_reauth());
        assert!(!err.to_string().contains(token), "{err}");
    }

    // Nobody listening: a network failure is transient too.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let client = SmartcarClient::new(ClientConfig {
        client_id: CLIENT_ID.into(),
        client_secret: Secret::new(CLIENT_SECRET),
        redirect_uri: REDIRECT.into(),
        token_url: format!("http://127.0.0.1:{port}/oauth/token"),
        api_v2_url: format!("http://127.0.0.1:{port}/v2.0"),
        api_v3_url: format!("http://127.0.0.1:{port}/v3"),
        unit_system: UnitSystem::Metric,
        timeout: Duration::from_secs(5),
        v3_page_size: None,
        max_in_flight: carpulse::config::DEFAULT_MAX_IN_FLIGHT,
    })
    .unwrap();
    let err = client.refresh(&Secret::new("r-net")).await.unwrap_err();
    assert!(matches!(err, AuthError::Transient { .. }), "{err:?}");
    let e = client.user_id(&Secret::new(ACCESS)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transport);
}

// ---------------------------------------------------------------- v2

#[tokio::test]
async fn user_id_and_paged_vehicle_discovery() {
    let h = metric(|r| match r.path.as_str() {
        "/v2.0/user" => answer(200, json!({"id":"user-42"})),
        "/v2.0/vehicles" => {
            let offset: usize = r
                .query
                .split('&')
                .find_map(|p| p.strip_prefix("offset="))
                .unwrap()
                .parse()
                .unwrap();
            let ids: Vec<String> = (offset..(offset + 50).min(120))
                .map(|i| format!("veh-{i}"))
                .collect();
            answer(
                200,
                json!({"vehicles": ids, "paging": {"count": 120, "offset": offset}}),
            )
        }
        _ => answer(404, json!({"type":"RESOURCE_NOT_FOUND","code":"PATH"})),
    })
    .await;
    let token = Secret::new(ACCESS);
    assert_eq!(h.client.user_id(&token).await.unwrap(), "user-42");
    let ids = h.client.list_vehicles(&token).await.unwrap();
    assert_eq!(ids.len(), 120);
    assert_eq!(ids[0], vid("veh-0"));
    assert_eq!(ids[119], vid("veh-119"));

    let reqs = h.requests();
    assert_eq!(reqs[0].path, "/v2.0/user");
    let queries: Vec<&str> = reqs[1..].iter().map(|r| r.query.as_str()).collect();
    assert_eq!(
        queries,
        [
            "limit=50&offset=0",
            "limit=50&offset=50",
            "limit=50&offset=100"
        ]
    );
    for r in &reqs {
        assert_eq!(r.method, "GET");
        assert_vehicle_headers(r, None);
        assert_eq!(r.header("sc-unit-system"), Some("metric"));
    }
}

#[tokio::test]
async fn discovery_stops_on_an_empty_page_despite_a_wrong_count() {
    let h = metric(|r| {
        let first = r.query.contains("offset=0");
        let ids: Vec<&str> = if first { vec!["a", "b"] } else { vec![] };
        answer(
            200,
            json!({"vehicles": ids, "paging": {"count": 1000, "offset": 0}}),
        )
    })
    .await;
    let ids = h.client.list_vehicles(&Secret::new(ACCESS)).await.unwrap();
    assert_eq!(ids, vec![vid("a"), vid("b")]);
    assert_eq!(h.requests().len(), 2);
}

#[tokio::test]
async fn v2_permissions_are_paged_and_an_odd_answer_is_an_error_not_an_empty_grant() {
    let h = metric(|r| {
        let body = match (r.path.as_str(), r.query.contains("offset=0")) {
            ("/v2.0/vehicles/ok/permissions", true) => {
                json!({"permissions": ["read_battery", "read_vin"], "paging": {"count": 3, "offset": 0}})
            }
            ("/v2.0/vehicles/ok/permissions", false) => {
                json!({"permissions": ["read_vehicle_info"], "paging": {"count": 3, "offset": 2}})
            }
            ("/v2.0/vehicles/objects/permissions", _) => {
                json!({"permissions": [{"permission": "read_battery"}], "paging": {"count": 1}})
            }
            ("/v2.0/vehicles/empty/permissions", _) => {
                json!({"permissions": [], "paging": {"count": 0, "offset": 0}})
            }
            _ => json!({"data": ["read_battery"]}),
        };
        answer(200, body)
    })
    .await;
    let token = Secret::new(ACCESS);
    let mut got = h
        .client
        .capabilities(ApiVersion::V2, &ctx(&token, None), &vid("ok"))
        .await
        .unwrap()
        .unavailable;
    got.sort();
    assert_eq!(
        got,
        [
            (Endpoint::Charge, "not granted: read_charge".to_string()),
            (Endpoint::Odometer, "not granted: read_odometer".to_string())
        ]
    );
    assert!(h.requests()[1].query.contains("offset=2"));
    for odd in ["objects", "other"] {
        let e = h
            .client
            .capabilities(ApiVersion::V2, &ctx(&token, None), &vid(odd))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Decode, "{odd}: {e}");
    }
    // An empty grant says nothing reliable: nothing is blocked.
    let none = h
        .client
        .capabilities(ApiVersion::V2, &ctx(&token, None), &vid("empty"))
        .await
        .unwrap()
        .unavailable;
    assert!(none.is_empty());
}

#[tokio::test]
async fn v2_battery_job_is_one_batch_with_per_item_outcomes() {
    let h = metric(|r| {
        assert_eq!(r.path, "/v2.0/vehicles/veh-1/batch");
        answer(
            200,
            json!({"responses":[
                {"path":"/battery","code":200,"body":{"range":275,"percentRemaining":0.68},
                 "headers":{"sc-data-age":"2025-05-09T15:40:57.000Z","sc-unit-system":"metric"}},
                {"path":"/charge","code":429,
                 "body":{"statusCode":429,"type":"RATE_LIMIT","code":"VEHICLE","description":"Too many"},
                 "headers":{"Retry-After":999}}
            ]}),
        )
        .header("sc-request-id", "req-batch-1")
    })
    .await;
    let token = Secret::new(ACCESS);
    let out = h
        .client
        .fetch(
            ApiVersion::V2,
            &ctx(&token, Some("u-1")),
            &vid("veh-1"),
            Job::Battery,
        )
        .await
        .unwrap();

    let reqs = h.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(
        reqs[0].json(),
        json!({"requests":[{"path":"/battery"},{"path":"/charge"}]})
    );
    // v2 never sends sc-user-id.
    assert_vehicle_headers(&reqs[0], None);
    assert_eq!(reqs[0].header("sc-unit-system"), Some("metric"));

    assert_eq!(out.len(), 2);
    assert_eq!(out[0].endpoint.as_str(), "battery");
    match &out[0].result {
        Ok(Payload::Battery(b)) => {
            assert_eq!(b.soc_percent, 68.0);
            assert_eq!(b.range_km, Some(275.0));
            assert_eq!(b.stamp.recorded_at, ms("2025-05-09T15:40:57.000Z"));
            assert!(b.stamp.fetched_at >= b.stamp.recorded_at);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(out[1].endpoint.as_str(), "charge");
    let e = out[1].result.clone().unwrap_err();
    assert_eq!(e.kind, ErrorKind::RateLimitVehicle);
    assert_eq!(e.status, Some(429));
    assert_eq!(e.retry_after, Some(Duration::from_secs(999)));
    assert_eq!(e.request_id.as_deref(), Some("req-batch-1"));
    assert_eq!(
        e.to_string(),
        "rate_limited (HTTP 429 RATE_LIMIT:VEHICLE): Too many"
    );
}

#[tokio::test]
async fn v2_info_job_in_imperial_units() {
    let h = start(UnitSystem::Imperial, Duration::from_secs(10), |r| {
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/v2.0/vehicles/veh-2") => answer(
                200,
                json!({"id":"veh-2","make":"TESLA","model":"Model S","year":2014}),
            ),
            ("POST", "/v2.0/vehicles/veh-2/batch") => answer(
                200,
                json!({"responses":[
                    {"path":"/vin","code":200,"body":{"vin":"5YJSA1E26HF000001"}},
                    {"path":"/odometer","code":200,"body":{"distance":1000.0},
                     "headers":{"SC-DATA-AGE":"2025-01-01T00:00:00Z","SC-UNIT-SYSTEM":"imperial"}}
                ]}),
            ),
            _ => answer(404, json!({})),
        }
    })
    .await;
    let token = Secret::new(ACCESS);
    let out = h
        .client
        .fetch(ApiVersion::V2, &ctx(&token, None), &vid("veh-2"), Job::Info)
        .await
        .unwrap();
    let endpoints: Vec<&str> = out.iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["info", "vin", "odometer"]);
    assert_eq!(
        out[0].result,
        Ok(Payload::Info(VehicleInfo {
            make: "TESLA".into(),
            model: "Model S".into(),
            year: 2014
        }))
    );
    assert_eq!(out[1].result, Ok(Payload::Vin("5YJSA1E26HF000001".into())));
    match &out[2].result {
        Ok(Payload::Odometer(OdometerReading { stamp, odometer_km })) => {
            assert_eq!(*odometer_km, 1609.344);
            assert_eq!(stamp.recorded_at, ms("2025-01-01T00:00:00Z"));
        }
        other => panic!("{other:?}"),
    }
    let reqs = h.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.header("sc-unit-system"), Some("imperial"));
    }
    let batch = reqs.iter().find(|r| r.method == "POST").unwrap();
    assert_eq!(
        batch.json(),
        json!({"requests":[{"path":"/vin"},{"path":"/odometer"}]})
    );
}

#[tokio::test]
async fn v2_top_level_errors() {
    let h = metric(|r| match r.path.as_str() {
        "/v2.0/vehicles/limited/batch" => answer(
            429,
            json!({"type":"RATE_LIMIT","code":"VEHICLE","description":"wait","statusCode":429,"requestId":"body-rid"}),
        )
        .header("retry-after", "30")
        .header("sc-request-id", "hdr-rid"),
        "/v2.0/vehicles/asleep/batch" => answer(
            409,
            json!({"type":"VEHICLE_STATE","code":"ASLEEP","description":"zzz","resolution":{"type":null},"statusCode":409}),
        ),
        "/v2.0/vehicles/expired/batch" => answer(
            401,
            json!({"type":"AUTHENTICATION","code":null,"description":"expired","resolution":null}),
        ),
        "/v2.0/vehicles/expired" => answer(401, json!({"type":"AUTHENTICATION","code":null})),
        "/v2.0/vehicles/garbage/batch" => Answer {
            status: 200,
            headers: vec![("content-type", "text/html".into())],
            body: "<html>maintenance</html>".into(),
            delay: None,
        },
        _ => answer(404, json!({})),
    })
    .await;
    let token = Secret::new(ACCESS);
    let c = ctx(&token, None);
    let fetch = |id: &'static str, job| {
        let client = h.client.clone();
        async move {
            client
                .fetch(ApiVersion::V2, &c, &vid(id), job)
                .await
                .unwrap_err()
        }
    };
    let e: ApiError = fetch("limited", Job::Battery).await;
    assert_eq!(e.kind, ErrorKind::RateLimitVehicle);
    assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(e.request_id.as_deref(), Some("hdr-rid"));

    let e = fetch("asleep", Job::Battery).await;
    assert_eq!(e.kind, ErrorKind::VehicleState);
    assert_eq!(e.code.as_deref(), Some("ASLEEP"));
    assert_eq!(e.kind.label(), "vehicle_state");

    let e = fetch("expired", Job::Info).await;
    assert_eq!(e.kind, ErrorKind::Authentication);
    assert_eq!(e.status, Some(401));

    let e = fetch("garbage", Job::Battery).await;
    assert_eq!(e.kind, ErrorKind::Decode);
    assert_eq!(e.status, Some(200));

    // A short per-request timeout turns a slow car into a Timeout, not a hang.
    let slow = start(UnitSystem::Metric, Duration::from_millis(300), |_| Answer {
        delay: Some(Duration::from_secs(3)),
        ..answer(200, json!({}))
    })
    .await;
    let e = slow
        .client
        .fetch(ApiVersion::V2, &c, &vid("slow"), Job::Battery)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert_eq!(e.kind.label(), "timeout");
}

// ---------------------------------------------------------------- v3

fn signal(code: &str, body: Value, oem: Value) -> Value {
    json!({"id": code, "type": "signal",
           "attributes": {"code": code, "status": {"value": "SUCCESS"}, "body": body},
           "meta": {"retrievedAt": 1752104218549_i64, "oemUpdatedAt": oem}})
}

#[tokio::test]
async fn v3_battery_job_follows_relative_next_links() {
    let h = metric(|r| {
        assert_eq!(r.path, "/v3/vehicles/veh-3/signals");
        match r.query.as_str() {
            "" => answer(
                200,
                json!({"data": [
                        signal("tractionbattery-stateofcharge", json!({"unit":"percent","value":75}), json!(1752104118549_i64)),
                        signal("tractionbattery-range", json!({"unit":"km","value":350.5}), json!(1752104118549_i64))
                    ],
                    "meta": {"page": 1, "pageSize": 2, "totalCount": 5},
                    // a path relative to the v3 base *with* its leading /v3
                    "links": {"self": "/v3/vehicles/veh-3/signals", "next": "/v3/vehicles/veh-3/signals?page=2&pageSize=2"}}),
            ),
            "page=2&pageSize=2" => answer(
                200,
                json!({"data": [
                        signal("charge-ischargingcableconnected", json!({"value":true}), json!(1752104000)),
                        signal("charge-ischarging", json!({"value":true}), json!(1752104000))
                    ],
                    // a path relative to the v3 base *without* /v3
                    "links": {"next": "/vehicles/veh-3/signals?page=3&pageSize=2"}}),
            ),
            "page=3&pageSize=2" => answer(
                200,
                json!({"data": [
                        {"id": "charge-detailedchargingstatus", "type": "signal",
                         "attributes": {"code": "charge-detailedchargingstatus",
                                        "status": {"value": "ERROR", "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}}}}
                    ],
                    "links": {"next": null}}),
            ),
            q => panic!("unexpected query {q}"),
        }
    })
    .await;
    let token = Secret::new(ACCESS);
    let out = h
        .client
        .fetch(
            ApiVersion::V3,
            &ctx(&token, Some("user-77")),
            &vid("veh-3"),
            Job::Battery,
        )
        .await
        .unwrap();

    let reqs = h.requests();
    let queries: Vec<&str> = reqs.iter().map(|r| r.query.as_str()).collect();
    assert_eq!(queries, ["", "page=2&pageSize=2", "page=3&pageSize=2"]);
    for r in &reqs {
        assert_vehicle_headers(r, Some("user-77"));
        assert_eq!(r.header("sc-unit-system"), Some("metric"));
    }

    // The listing's every reading comes back, whichever job asked: battery, charge, then the
    // odometer (not listed here, so an error for it that the poller leaves to its own job).
    let endpoints: Vec<&str> = out.iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["battery", "charge", "odometer"]);
    assert!(out[2].result.is_err());
    assert_eq!(out[0].endpoint.as_str(), "battery");
    let fetched = match &out[0].result {
        Ok(Payload::Battery(b)) => {
            assert_eq!(b.soc_percent, 75.0);
            assert_eq!(b.range_km, Some(350.5));
            assert_eq!(b.stamp.recorded_at, 1752104118549);
            b.stamp.fetched_at
        }
        other => panic!("{other:?}"),
    };
    assert!(fetched >= 1752104118549);
    assert_eq!(out[1].endpoint.as_str(), "charge");
    match &out[1].result {
        // detailed status failed → fallback to charge-ischarging; oemUpdatedAt in seconds
        Ok(Payload::Charge(ChargeReading {
            stamp,
            plugged_in,
            state,
        })) => {
            assert!(*plugged_in);
            assert_eq!(*state, ChargeState::Charging);
            assert_eq!(stamp.recorded_at, 1_752_104_000_000);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v3_a_vehicle_id_is_one_path_segment() {
    // An id with a slash or a space stays one percent-encoded segment of the listing's path
    // (never a path of its own, never a query).
    let h = metric(|r| {
        assert_eq!(r.path, "/v3/vehicles/veh%203%2Fx%3F/signals");
        assert_eq!(r.query, "");
        answer(
            200,
            json!({"data": [signal("tractionbattery-stateofcharge", json!({"unit":"percent","value":75}), json!(1752104118549_i64))],
                   "links": {"next": null}}),
        )
    })
    .await;
    let token = Secret::new(ACCESS);
    let out = h
        .client
        .fetch(
            ApiVersion::V3,
            &ctx(&token, Some("user-77")),
            &vid("veh 3/x?"),
            Job::Battery,
        )
        .await
        .unwrap();
    assert_eq!(h.requests().len(), 1);
    assert!(matches!(out[0].result, Ok(Payload::Battery(_))), "{out:?}");
}

#[tokio::test]
async fn v3_info_job_fetches_the_vehicle_when_not_included() {
    let h = metric(|r| match r.path.as_str() {
        "/v3/vehicles/veh-4/signals" => answer(
            200,
            json!({"data": [
                    signal("odometer-traveleddistance", json!({"unit":"miles","value":100}), json!("2025-07-09T23:36:58.549Z")),
                    signal("vehicleidentification-vin", json!({"value":"1HGCM82633A004352"}), Value::Null),
                    {"id": "tractionbattery-stateofcharge", "type": "signal",
                     "attributes": {"code": "tractionbattery-stateofcharge",
                                    "status": {"value": "ERROR", "error": {"type": "VEHICLE_STATE", "code": "ASLEEP"}}}}
                ],
                "links": {"next": null}}),
        ),
        "/v3/vehicles/veh-4" => answer(
            200,
            json!({"data":{"id":"veh-4","type":"vehicle","attributes":{"make":"Toyota","model":"Camry","year":2020,"powertrainType":"ICE"}}}),
        ),
        _ => answer(404, json!({})),
    })
    .await;
    let token = Secret::new(ACCESS);
    let out = h
        .client
        .fetch(ApiVersion::V3, &ctx(&token, None), &vid("veh-4"), Job::Info)
        .await
        .unwrap();
    let endpoints: Vec<&str> = out.iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["info", "battery", "charge", "vin", "odometer"]);
    assert_eq!(
        out[0].result,
        Ok(Payload::Info(VehicleInfo {
            make: "Toyota".into(),
            model: "Camry".into(),
            year: 2020
        }))
    );
    assert_eq!(out[3].result, Ok(Payload::Vin("1HGCM82633A004352".into())));
    match &out[4].result {
        Ok(Payload::Odometer(o)) => {
            assert_eq!(o.odometer_km, 160.9344);
            assert_eq!(o.stamp.recorded_at, ms("2025-07-09T23:36:58.549Z"));
        }
        other => panic!("{other:?}"),
    }
    for r in h.requests() {
        assert_vehicle_headers(&r, None);
    }
    // Without info wanted (a vehicle whose consent lacks read_vehicle_info), the billed
    // GET /vehicles/{id} is not made; each request is counted for the budget.
    let before = h.requests().len();
    let (out, billed) = carpulse::smartcar::count_billed(h.client.fetch_only(
        ApiVersion::V3,
        &ctx(&token, None),
        &vid("veh-4"),
        Job::Info,
        &[
            carpulse::smartcar::Endpoint::Vin,
            carpulse::smartcar::Endpoint::Odometer,
        ],
    ))
    .await;
    let endpoints: Vec<&str> = out.unwrap().iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        ["battery", "charge", "vin", "odometer"],
        "no info"
    );
    let paths: Vec<String> = h.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, ["/v3/vehicles/veh-4/signals"]);
    assert_eq!(billed, 1);

    // The battery job on the same listing: a failed signal is that endpoint's classified error.
    let out = h
        .client
        .fetch(
            ApiVersion::V3,
            &ctx(&token, None),
            &vid("veh-4"),
            Job::Battery,
        )
        .await
        .unwrap();
    let e = out[0].result.clone().unwrap_err();
    assert_eq!(e.kind, ErrorKind::VehicleState);
    assert_eq!(e.code.as_deref(), Some("ASLEEP"));
    let e = out[1].result.clone().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Compatibility);
    assert_eq!(e.code.as_deref(), Some("SIGNAL_NOT_PROVIDED"));

    // vehicle_info(V3) alone, body without the `data` wrapper.
    let h2 = metric(|_| {
        answer(
            200,
            json!({"id":"v","type":"vehicle","attributes":{"make":"Simulated","model":"BEV","year":2023}}),
        )
    })
    .await;
    let info = h2
        .client
        .vehicle_info(ApiVersion::V3, &ctx(&token, Some("u")), &vid("v"))
        .await
        .unwrap();
    assert_eq!(
        info,
        VehicleInfo {
            make: "Simulated".into(),
            model: "BEV".into(),
            year: 2023
        }
    );
    assert_eq!(h2.requests()[0].path, "/v3/vehicles/v");
    assert_eq!(h2.requests()[0].header("sc-user-id"), Some("u"));
}

#[tokio::test]
async fn v3_error_envelope_is_a_top_level_error() {
    let h = metric(|_| {
        answer(
            502,
            json!({"errors":[{"status":"502","type":"UPSTREAM","code":"INVALID_DATA","title":"Bad Gateway","detail":"retry later"}]}),
        )
        .header("sc-request-id", "rid-v3")
    })
    .await;
    let token = Secret::new(ACCESS);
    let e = h
        .client
        .fetch(ApiVersion::V3, &ctx(&token, None), &vid("x"), Job::Battery)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Upstream);
    assert_eq!(e.status, Some(502));
    assert_eq!(e.code.as_deref(), Some("INVALID_DATA"));
    assert_eq!(e.request_id.as_deref(), Some("rid-v3"));
    assert_eq!(
        e.to_string(),
        "upstream (HTTP 502 UPSTREAM:INVALID_DATA): retry later"
    );
}

#[tokio::test]
async fn v3_stamp_falls_back_to_fetched_at() {
    let h = metric(|_| {
        answer(
            200,
            json!({"data":[signal("tractionbattery-stateofcharge", json!({"unit":"percent","value":42}), Value::Null),
                           signal("charge-ischargingcableconnected", json!({"value":false}), json!(99999999999999_i64)),
                           signal("charge-detailedchargingstatus", json!({"value":"NOT_CHARGING"}), Value::Null)],
                   "links":{"next":null}}),
        )
    })
    .await;
    let token = Secret::new(ACCESS);
    let before = now_ms();
    let out = h
        .client
        .fetch(ApiVersion::V3, &ctx(&token, None), &vid("x"), Job::Battery)
        .await
        .unwrap();
    let after = now_ms();
    match (&out[0].result, &out[1].result) {
        (
            Ok(Payload::Battery(BatteryReading {
                stamp:
                    Stamp {
                        recorded_at,
                        fetched_at,
                    },
                soc_percent,
                range_km,
            })),
            Ok(Payload::Charge(c)),
        ) => {
            assert_eq!(*soc_percent, 42.0);
            assert_eq!(*range_km, None);
            assert_eq!(recorded_at, fetched_at);
            assert!(*fetched_at >= before && *fetched_at <= after);
            // a timestamp far in the future is clamped to fetched_at
            assert_eq!(c.stamp.recorded_at, c.stamp.fetched_at);
            assert_eq!(c.state, ChargeState::NotCharging);
            assert!(!c.plugged_in);
        }
        other => panic!("{other:?}"),
    }
}

/// The poller and the token manager spawn these futures on the multi-threaded runtime.
#[test]
fn client_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let client = SmartcarClient::new(ClientConfig {
        client_id: CLIENT_ID.into(),
        client_secret: Secret::new(CLIENT_SECRET),
        redirect_uri: REDIRECT.into(),
        token_url: "http://127.0.0.1:1/oauth/token".into(),
        api_v2_url: "http://127.0.0.1:1/v2.0".into(),
        api_v3_url: "http://127.0.0.1:1/v3".into(),
        unit_system: UnitSystem::Metric,
        timeout: Duration::from_secs(1),
        v3_page_size: None,
        max_in_flight: carpulse::config::DEFAULT_MAX_IN_FLIGHT,
    })
    .unwrap();
    let token = Secret::new(ACCESS);
    let id = vid("x");
    let c = ctx(&token, None);
    assert_send(&client.refresh(&token));
    assert_send(&client.exchange_code("c"));
    assert_send(&client.list_vehicles(&token));
    assert_send(&client.fetch(ApiVersion::V3, &c, &id, Job::Battery));
    assert_send(&client.fetch(ApiVersion::V2, &c, &id, Job::Info));
    assert_send(&client.vehicle_info(ApiVersion::V2, &c, &id));
    // Debug never shows the secret.
    assert!(!format!("{client:?}").contains(CLIENT_SECRET));
}
