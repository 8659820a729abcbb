//! The simulator over real HTTP on loopback: OAuth (authorize, code exchange, refresh rotation),
//! bearer checks, v2.0 and v3 shapes and headers, batch, units, and the introspection endpoints
//! that carpulse's own tests rely on.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use carpulse::simulator::{faults, serve, Powertrain, SimulatorArgs, SimulatorConfig, V3Auth};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod common;

use common::sim::{header, is_uuid, parse_iso_ms, spawn, stable_cfg, REDIRECT};

#[tokio::test]
async fn authorize_redirects_with_code_and_state_and_rejects_bad_requests() {
    let sim = spawn(SimulatorConfig::default()).await;
    let response = sim
        .authorize(&[("state", "abc 123&x"), ("approval_prompt", "force")])
        .await;
    assert_eq!(response.status(), 302);
    let location = reqwest::Url::parse(header(&response, "location")).unwrap();
    assert_eq!(
        format!(
            "{}://{}{}",
            location.scheme(),
            location.authority(),
            location.path()
        ),
        REDIRECT
    );
    let pairs: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    assert_eq!(pairs[0].0, "code");
    assert!(is_uuid(&pairs[0].1));
    // The user id rides alongside the code (smartcar-api.md §10.2); round-robin picked user 1.
    let first_user = sim.user_ids().await[0].clone();
    assert_eq!(pairs[1], ("user_id".to_owned(), first_user));
    assert_eq!(pairs[2], ("state".to_owned(), "abc 123&x".to_owned()));

    // No state given → none echoed.
    let response = sim.authorize(&[]).await;
    assert!(!header(&response, "location").contains("state="));

    for (name, value) in [("response_type", "token"), ("client_id", "someone-else")] {
        let query = [
            ("response_type", "code"),
            ("client_id", "carpulse-demo"),
            ("redirect_uri", REDIRECT),
        ]
        .map(|(k, v)| if k == name { (k, value) } else { (k, v) });
        let response = sim
            .client
            .get(sim.url("/oauth/authorize"))
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}");
        assert!(response.text().await.unwrap().contains(name), "{name}");
    }
    let response = sim
        .client
        .get(sim.url("/oauth/authorize"))
        .query(&[("response_type", "code"), ("client_id", "carpulse-demo")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("redirect_uri"));
    sim.stop().await;
}

#[tokio::test]
async fn code_exchange_checks_client_auth_single_use_and_redirect_uri() {
    let sim = spawn(SimulatorConfig::default()).await;
    let code = sim.code(&[]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];

    // Missing and wrong client credentials → 401 invalid_client.
    let missing = sim
        .client
        .post(sim.url("/oauth/token"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );
    let wrong = sim
        .client
        .post(sim.url("/oauth/token"))
        .basic_auth("carpulse-demo", Some("not-the-secret"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert!(!body.to_string().contains("not-the-secret"));

    // Redirect mismatch → invalid_request, and the code survives a mismatch.
    let mismatch = sim
        .token_request(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://evil/"),
        ])
        .await;
    assert_eq!(mismatch.status(), 400);
    let body: Value = mismatch.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("Invalid code: "));

    // Good exchange: exactly the four fields.
    let tokens = sim.exchange(&code).await;
    let keys: HashSet<&str> = tokens
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["access_token", "token_type", "expires_in", "refresh_token"])
    );
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 7200);
    assert!(is_uuid(tokens["access_token"].as_str().unwrap()));
    assert!(is_uuid(tokens["refresh_token"].as_str().unwrap()));
    assert_ne!(tokens["access_token"], tokens["refresh_token"]);

    // Single use.
    let again = sim.token_request(&form).await;
    assert_eq!(again.status(), 400);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("Invalid code: "));

    // Missing grant_type or parameters.
    let no_grant = sim.token_request(&[("code", &code)]).await;
    assert_eq!(no_grant.status(), 400);
    assert_eq!(
        no_grant.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let no_code = sim
        .token_request(&[
            ("grant_type", "authorization_code"),
            ("redirect_uri", REDIRECT),
        ])
        .await;
    assert_eq!(no_code.status(), 400);
    assert_eq!(
        no_code.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );

    // An oauth2-crate style Basic header (form-encoded id and secret) is accepted too.
    let code = sim.code(&[]).await;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode("carpulse-demo:carpulse-demo-secret");
    let response = sim
        .client
        .post(sim.url("/oauth/token"))
        .header("authorization", format!("Basic {encoded}"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let stats = sim.stats().await;
    assert_eq!(stats["code_exchanges"], 2);
    assert_eq!(stats["refreshes"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn refresh_rotates_with_grace_then_invalidates_and_counts() {
    let cfg = SimulatorConfig {
        refresh_grace: Duration::from_millis(800),
        ..SimulatorConfig::default()
    };
    let sim = spawn(cfg).await;
    let first = sim.exchange(&sim.code(&[]).await).await;
    let old_refresh = first["refresh_token"].as_str().unwrap();
    let old_access = first["access_token"].as_str().unwrap();

    let second: Value = sim.refresh(old_refresh).await.json().await.unwrap();
    assert_ne!(second["access_token"], first["access_token"]);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_eq!(second["expires_in"], 7200);

    // Inside the grace window the used token still works and yields another fresh pair.
    let grace = sim.refresh(old_refresh).await;
    assert_eq!(grace.status(), 200);
    let grace: Value = grace.json().await.unwrap();
    assert_ne!(grace["access_token"], second["access_token"]);
    assert_ne!(grace["refresh_token"], second["refresh_token"]);

    // Old access tokens stay valid until their own expiry.
    let user = sim.get_json("/v2.0/user", old_access).await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    assert_eq!(sim.fleet().await["users"][0]["id"], user_id.as_str());

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let late = sim.refresh(old_refresh).await;
    assert_eq!(late.status(), 400);
    assert_eq!(
        late.json::<Value>().await.unwrap(),
        json!({"error": "invalid_grant", "error_description": "Invalid or expired refresh token."})
    );
    // An unknown token is invalid_grant too, but not an "invalidated" use.
    let unknown = sim.refresh("00000000-0000-4000-8000-000000000000").await;
    assert_eq!(unknown.status(), 400);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    // The newest tokens were never used, so they still rotate.
    assert_eq!(
        sim.refresh(second["refresh_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    let missing = sim.token_request(&[("grant_type", "refresh_token")]).await;
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );

    let stats = sim.stats().await;
    assert_eq!(stats["refreshes"], 3);
    assert_eq!(stats["grace_refresh_token_uses"], 1);
    assert_eq!(stats["invalidated_refresh_token_uses"], 1);
    assert_eq!(stats["refreshes_by_user"], json!({ user_id: 3 }));
    sim.stop().await;
}

#[tokio::test]
async fn unknown_and_expired_tokens_get_401_and_are_counted() {
    let cfg = SimulatorConfig {
        access_token_lifetime: Duration::from_secs(1),
        ..SimulatorConfig::default()
    };
    let sim = spawn(cfg).await;
    let tokens = sim.exchange(&sim.code(&[]).await).await;
    assert_eq!(tokens["expires_in"], 1);
    let access = tokens["access_token"].as_str().unwrap();
    let vehicle = sim.fleet().await["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let response = sim.get("/v2.0/vehicles", "not-a-token").await;
    assert_eq!(response.status(), 401);
    assert!(is_uuid(header(&response, "sc-request-id")));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "AUTHENTICATION");
    assert_eq!(body["code"], Value::Null);
    assert_eq!(body["statusCode"], 401);
    assert!(is_uuid(body["requestId"].as_str().unwrap()));
    let no_header = sim.client.get(sim.url("/v2.0/user")).send().await.unwrap();
    assert_eq!(no_header.status(), 401);

    let v3 = sim
        .get(&format!("/v3/vehicles/{vehicle}/signals"), "not-a-token")
        .await;
    assert_eq!(v3.status(), 401);
    let body: Value = v3.json().await.unwrap();
    assert_eq!(body["errors"][0]["status"], "401");
    assert_eq!(body["errors"][0]["type"], "AUTHENTICATION");

    assert_eq!(sim.get("/v2.0/vehicles", access).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = sim
        .get(&format!("/v2.0/vehicles/{vehicle}/battery"), access)
        .await;
    assert_eq!(expired.status(), 401);
    assert_eq!(
        expired.json::<Value>().await.unwrap()["type"],
        "AUTHENTICATION"
    );
    let expired_v3 = sim.get(&format!("/v3/vehicles/{vehicle}"), access).await;
    assert_eq!(expired_v3.status(), 401);

    let stats = sim.stats().await;
    assert_eq!(stats["unknown_token_requests"], 3);
    assert_eq!(stats["expired_token_requests"], 2);
    sim.stop().await;
}

#[tokio::test]
async fn v2_vehicles_paging_ownership_and_user_choice() {
    let cfg = SimulatorConfig {
        users: 2,
        vehicles_per_user: 3,
        ..SimulatorConfig::default()
    };
    let sim = spawn(cfg).await;
    let fleet = sim.fleet().await;
    let ids = |u: usize| -> Vec<String> {
        fleet["users"][u]["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Round-robin: the first authorization connects user 1, the second user 2.
    let token1 = sim.exchange(&sim.code(&[]).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token2 = sim.exchange(&sim.code(&[]).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        sim.get_json("/v2.0/user", &token1).await["id"],
        fleet["users"][0]["id"]
    );
    assert_eq!(
        sim.get_json("/v2.0/user", &token2).await["id"],
        fleet["users"][1]["id"]
    );
    // Explicit choice by id and by index.
    let by_id = sim.connect(fleet["users"][1]["id"].as_str().unwrap()).await;
    assert_eq!(
        sim.get_json("/v2.0/user", &by_id).await["id"],
        fleet["users"][1]["id"]
    );
    let by_index = sim.connect("1").await;
    assert_eq!(
        sim.get_json("/v2.0/user", &by_index).await["id"],
        fleet["users"][0]["id"]
    );
    assert_eq!(sim.authorize(&[("user", "3")]).await.status(), 400);

    let mut seen = Vec::new();
    for offset in 0..4 {
        let page = sim
            .get_json(&format!("/v2.0/vehicles?limit=1&offset={offset}"), &token1)
            .await;
        assert_eq!(page["paging"], json!({"count": 3, "offset": offset}));
        let vehicles = page["vehicles"].as_array().unwrap();
        assert_eq!(vehicles.len(), if offset < 3 { 1 } else { 0 });
        seen.extend(vehicles.iter().map(|v| v.as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, ids(0));
    let all = sim.get_json("/v2.0/vehicles", &token2).await;
    assert_eq!(all["vehicles"], json!(ids(1)));

    let too_many = sim.get("/v2.0/vehicles?limit=51", &token1).await;
    assert_eq!(too_many.status(), 400);
    let body: Value = too_many.json().await.unwrap();
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some("VALIDATION"), Some("PARAMETER"))
    );

    // Another user's vehicle.
    let foreign = sim
        .get(&format!("/v2.0/vehicles/{}/battery", ids(1)[0]), &token1)
        .await;
    assert_eq!(foreign.status(), 400);
    let body: Value = foreign.json().await.unwrap();
    assert_eq!(body["type"], "CONNECTED_SERVICES_ACCOUNT");
    assert_eq!(body["code"], "VEHICLE_MISSING");
    assert_eq!(body["statusCode"], 400);
    sim.stop().await;
}

#[tokio::test]
async fn v2_endpoints_have_smartcar_shapes_and_headers() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = &fleet["users"][0]["vehicles"][0];
    let id = car["id"].as_str().unwrap();

    let info = sim.get(&format!("/v2.0/vehicles/{id}"), &token).await;
    assert!(is_uuid(header(&info, "sc-request-id")));
    let info: Value = info.json().await.unwrap();
    assert_eq!(
        info,
        json!({"id": id, "make": car["make"], "model": car["model"], "year": car["year"]})
    );
    assert_eq!(
        sim.get_json(&format!("/v2.0/vehicles/{id}/vin"), &token)
            .await,
        json!({"vin": car["vin"]})
    );
    assert_eq!(car["vin"].as_str().unwrap().len(), 17);

    let battery = sim
        .get(&format!("/v2.0/vehicles/{id}/battery"), &token)
        .await;
    assert!(is_uuid(header(&battery, "sc-request-id")));
    assert_eq!(header(&battery, "sc-unit-system"), "metric");
    let data_age = parse_iso_ms(header(&battery, "sc-data-age"));
    let fetched_at = parse_iso_ms(header(&battery, "sc-fetched-at"));
    assert!(data_age <= fetched_at && fetched_at - data_age <= 3_600_000);
    let battery: Value = battery.json().await.unwrap();
    let fraction = battery["percentRemaining"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&fraction));
    assert_eq!(
        fraction,
        (fraction * 10_000.0).round() / 10_000.0,
        "4 decimals"
    );
    let range = battery["range"].as_f64().unwrap();
    assert!(range > 0.0 && range < 700.0);
    assert_eq!(battery.as_object().unwrap().len(), 2);

    let charge = sim
        .get(&format!("/v2.0/vehicles/{id}/charge"), &token)
        .await;
    assert_eq!(parse_iso_ms(header(&charge, "sc-data-age")), data_age);
    let charge: Value = charge.json().await.unwrap();
    assert!(charge["isPluggedIn"].is_boolean());
    assert!(
        ["CHARGING", "FULLY_CHARGED", "NOT_CHARGING"].contains(&charge["state"].as_str().unwrap())
    );
    if charge["state"] != "NOT_CHARGING" {
        assert_eq!(charge["isPluggedIn"], true);
    }

    let odometer = sim
        .get_json(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    let km = odometer["distance"].as_f64().unwrap();
    assert!(km >= 5_000.0, "{km}");
    assert_eq!(km, (km * 10.0).round() / 10.0);

    let permissions = sim
        .get_json(
            &format!("/v2.0/vehicles/{id}/permissions?limit=2&offset=1"),
            &token,
        )
        .await;
    assert_eq!(permissions["permissions"].as_array().unwrap().len(), 2);
    assert_eq!(permissions["paging"]["offset"], 1);
    assert!(permissions["paging"]["count"].as_u64().unwrap() >= 5);

    // Same report window → identical values and data age.
    let again = sim
        .get(&format!("/v2.0/vehicles/{id}/battery"), &token)
        .await;
    assert_eq!(parse_iso_ms(header(&again, "sc-data-age")), data_age);
    assert_eq!(again.json::<Value>().await.unwrap(), battery);

    // Unknown paths → 404 RESOURCE_NOT_FOUND:PATH.
    for path in [
        format!("/v2.0/vehicles/{id}/teleport"),
        "/v2.0/nothing".to_owned(),
    ] {
        let response = sim.get(&path, &token).await;
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (body["type"].as_str(), body["code"].as_str()),
            (Some("RESOURCE_NOT_FOUND"), Some("PATH"))
        );
    }

    // Requests without sc-unit-system are answered metric and counted.
    assert_eq!(sim.stats().await["missing_unit_system"], 0);
    let bare = sim
        .client
        .get(sim.url(&format!("/v2.0/vehicles/{id}/odometer")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&bare, "sc-unit-system"), "metric");
    assert_eq!(
        bare.json::<Value>().await.unwrap()["distance"]
            .as_f64()
            .unwrap(),
        km
    );
    assert_eq!(sim.stats().await["missing_unit_system"], 1);

    // The served log holds exactly what was answered, in metric, once per report time.
    let served = sim.served(id).await;
    assert_eq!(
        served["battery"],
        json!([{"recorded_at": data_age, "soc_percent": served["battery"][0]["soc_percent"], "range_km": range}])
    );
    assert!(
        (served["battery"][0]["soc_percent"].as_f64().unwrap() - fraction * 100.0).abs() < 1e-9
    );
    assert_eq!(
        served["charge"],
        json!([{"recorded_at": data_age, "plugged_in": charge["isPluggedIn"], "state": charge["state"]}])
    );
    assert_eq!(
        served["odometer"],
        json!([{"recorded_at": data_age, "odometer_km": km}])
    );
    // authorize + token + 10 v2 requests; introspection is not counted.
    let stats = sim.stats().await;
    assert_eq!(stats["requests"], 12);
    assert_eq!(stats["v2_requests"], 10);
    sim.stop().await;
}

#[tokio::test]
async fn batch_answers_each_item_with_its_own_code_and_headers() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let id = sim.fleet().await["users"][0]["vehicles"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let request = json!({"requests": [
        {"path": "/battery"}, {"path": "/charge"}, {"path": "/odometer"}, {"path": "/"}, {"path": "/warp-drive"}
    ]});
    let response = sim
        .client
        .post(sim.url(&format!("/v2.0/vehicles/{id}/batch")))
        .bearer_auth(&token)
        .header("sc-unit-system", "metric")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(is_uuid(header(&response, "sc-request-id")));
    let body: Value = response.json().await.unwrap();
    let items = body["responses"].as_array().unwrap();
    let codes: Vec<u64> = items.iter().map(|i| i["code"].as_u64().unwrap()).collect();
    assert_eq!(codes, [200, 200, 200, 200, 404]);
    let paths: Vec<&str> = items.iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        ["/battery", "/charge", "/odometer", "/", "/warp-drive"]
    );
    for item in &items[..4] {
        assert_eq!(item["headers"]["sc-unit-system"], "metric");
        parse_iso_ms(item["headers"]["sc-data-age"].as_str().unwrap());
        parse_iso_ms(item["headers"]["sc-fetched-at"].as_str().unwrap());
    }
    assert_eq!(items[3]["body"]["id"], id.as_str());
    assert_eq!(items[4]["body"]["type"], "RESOURCE_NOT_FOUND");
    assert_eq!(items[4]["body"]["statusCode"], 404);
    assert!(items[4].get("headers").is_none());

    // Batch items answer exactly what the single endpoints answer.
    let battery = sim
        .get_json(&format!("/v2.0/vehicles/{id}/battery"), &token)
        .await;
    assert_eq!(items[0]["body"], battery);
    let data_age = parse_iso_ms(items[0]["headers"]["sc-data-age"].as_str().unwrap());
    let served = sim.served(&id).await;
    assert_eq!(served["battery"].as_array().unwrap().len(), 1);
    assert_eq!(served["battery"][0]["recorded_at"], data_age);
    assert_eq!(
        served["odometer"][0]["odometer_km"],
        items[2]["body"]["distance"]
    );

    let bad = sim
        .client
        .post(sim.url(&format!("/v2.0/vehicles/{id}/batch")))
        .bearer_auth(&token)
        .body("{\"requests\": 5}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["type"], "VALIDATION");
    assert_eq!(sim.stats().await["batch_items"], 5);
    sim.stop().await;
}

#[tokio::test]
async fn imperial_units_convert_distances_after_rounding() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let id = sim.fleet().await["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let imperial = |path: String| {
        sim.client
            .get(sim.url(&path))
            .bearer_auth(&token)
            .header("sc-unit-system", "imperial")
            .send()
    };
    let metric_battery = sim
        .get_json(&format!("/v2.0/vehicles/{id}/battery"), &token)
        .await;
    let response = imperial(format!("/v2.0/vehicles/{id}/battery"))
        .await
        .unwrap();
    assert_eq!(header(&response, "sc-unit-system"), "imperial");
    let imperial_battery: Value = response.json().await.unwrap();
    assert_eq!(
        imperial_battery["percentRemaining"],
        metric_battery["percentRemaining"]
    );
    let km = metric_battery["range"].as_f64().unwrap();
    let miles = imperial_battery["range"].as_f64().unwrap();
    assert!(
        (miles - km / 1.609_344).abs() < 1e-9,
        "{miles} mi vs {km} km"
    );

    let metric_odo = sim
        .get_json(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    let imperial_odo: Value = imperial(format!("/v2.0/vehicles/{id}/odometer"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let km = metric_odo["distance"].as_f64().unwrap();
    assert!((imperial_odo["distance"].as_f64().unwrap() * 1.609_344 - km).abs() < 1e-6);
    // The served log stays metric.
    assert_eq!(
        sim.served(&id).await["odometer"][0]["odometer_km"]
            .as_f64()
            .unwrap(),
        km
    );
    sim.stop().await;
}

#[tokio::test]
async fn v3_vehicle_signal_pages_and_single_signals() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let user_id = fleet["users"][0]["id"].as_str().unwrap().to_owned();
    let car = &fleet["users"][0]["vehicles"][0];
    let id = car["id"].as_str().unwrap();

    let vehicle = sim.get_json(&format!("/v3/vehicles/{id}"), &token).await;
    assert_eq!(
        vehicle,
        json!({"data": {"id": id, "type": "vehicle",
            "attributes": {"make": car["make"], "model": car["model"], "year": car["year"],
                           "powertrainType": "BEV", "mode": "simulated"},
            "links": {"self": format!("/vehicles/{id}")}}})
    );

    // Follow links.next from the first page to the end.
    let mut next = Some(format!("/vehicles/{id}/signals"));
    let mut signals = Vec::new();
    let mut pages = 0;
    while let Some(link) = next {
        let page = sim.get_json(&format!("/v3{link}"), &token).await;
        pages += 1;
        assert_eq!(page["meta"]["pageSize"], 10);
        assert_eq!(page["meta"]["page"], pages);
        assert_eq!(
            page["links"]["first"],
            format!("/vehicles/{id}/signals?page=1&pageSize=10")
        );
        assert_eq!(
            page["links"]["self"],
            format!("/vehicles/{id}/signals?page={pages}&pageSize=10")
        );
        if pages == 1 {
            assert_eq!(page["links"]["previous"], Value::Null);
        } else {
            assert_eq!(
                page["links"]["previous"],
                format!("/vehicles/{id}/signals?page={}&pageSize=10", pages - 1)
            );
        }
        assert_eq!(page["included"]["vehicle"]["id"], id);
        assert_eq!(
            page["included"]["vehicle"]["attributes"]["make"],
            car["make"]
        );
        let total = page["meta"]["totalCount"].as_u64().unwrap();
        assert!(total >= 12);
        assert_eq!(
            page["links"]["last"],
            format!(
                "/vehicles/{id}/signals?page={}&pageSize=10",
                total.div_ceil(10)
            )
        );
        signals.extend(page["data"].as_array().unwrap().iter().cloned());
        next = page["links"]["next"].as_str().map(str::to_owned);
        assert!(pages < 10);
    }
    assert_eq!(pages, 2);
    let codes: HashSet<&str> = signals.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(codes.len(), signals.len());
    for code in [
        "tractionbattery-stateofcharge",
        "tractionbattery-range",
        "tractionbattery-nominalcapacity",
        "charge-ischarging",
        "charge-ischargingcableconnected",
        "charge-detailedchargingstatus",
        "charge-chargelimits",
        "charge-timetocomplete",
        "odometer-traveleddistance",
        "location-preciselocation",
        "lowvoltagebattery-stateofcharge",
        "vehicleidentification-vin",
    ] {
        assert!(codes.contains(code), "{code}");
    }
    let find = |code: &str| signals.iter().find(|s| s["id"] == code).unwrap().clone();
    let soc = find("tractionbattery-stateofcharge");
    assert_eq!(soc["type"], "signal");
    assert_eq!(soc["attributes"]["code"], "tractionbattery-stateofcharge");
    assert_eq!(soc["attributes"]["group"], "TractionBattery");
    assert_eq!(soc["attributes"]["status"]["value"], "SUCCESS");
    assert_eq!(soc["attributes"]["body"]["unit"], "percent");
    let percent = soc["attributes"]["body"]["value"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&percent));
    assert_eq!(percent, (percent * 100.0).round() / 100.0);
    let oem = soc["meta"]["oemUpdatedAt"].as_i64().unwrap();
    let retrieved = soc["meta"]["retrievedAt"].as_i64().unwrap();
    assert!(
        oem > 1_600_000_000_000 && oem <= retrieved,
        "milliseconds expected"
    );
    assert_eq!(
        find("tractionbattery-range")["attributes"]["body"]["unit"],
        "kilometers"
    );
    assert_eq!(
        find("vehicleidentification-vin")["attributes"]["body"],
        json!({"value": car["vin"]})
    );
    assert_eq!(
        soc["links"]["self"],
        format!("/vehicles/{id}/signals/tractionbattery-stateofcharge")
    );

    // The single signal equals the listed one (same report window), and v2 agrees with v3.
    let single = sim
        .get_json(
            &format!("/v3/vehicles/{id}/signals/tractionbattery-stateofcharge"),
            &token,
        )
        .await;
    assert_eq!(single["attributes"], soc["attributes"]);
    assert_eq!(single["meta"]["oemUpdatedAt"], oem);
    let v2 = sim
        .get_json(&format!("/v2.0/vehicles/{id}/battery"), &token)
        .await;
    assert!((v2["percentRemaining"].as_f64().unwrap() * 100.0 - percent).abs() < 1e-9);

    let served = sim.served(id).await;
    assert_eq!(served["battery"][0]["recorded_at"], oem);
    assert_eq!(
        served["battery"][0]["soc_percent"].as_f64().unwrap(),
        percent
    );
    assert_eq!(
        served["battery"][0]["range_km"],
        find("tractionbattery-range")["attributes"]["body"]["value"]
    );
    assert_eq!(
        served["odometer"][0]["odometer_km"],
        find("odometer-traveleddistance")["attributes"]["body"]["value"]
    );
    assert_eq!(
        served["charge"][0]["state"],
        find("charge-detailedchargingstatus")["attributes"]["body"]["value"]
    );

    // Errors in the v3 envelope.
    let unknown = sim
        .get(&format!("/v3/vehicles/{id}/signals/flux-capacitor"), &token)
        .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["errors"][0]["status"],
        "404"
    );
    let bad_size = sim
        .get(&format!("/v3/vehicles/{id}/signals?pageSize=101"), &token)
        .await;
    assert_eq!(bad_size.status(), 400);
    assert_eq!(
        bad_size.json::<Value>().await.unwrap()["errors"][0]["type"],
        "VALIDATION"
    );
    let missing = sim
        .get("/v3/vehicles/00000000-0000-4000-8000-000000000000", &token)
        .await;
    assert_eq!(missing.status(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["type"], "CONNECTED_SERVICES_ACCOUNT");
    assert_eq!(body["errors"][0]["code"], "VEHICLE_MISSING");

    // sc-user-id must name the token's user when sent.
    let with_user = |user: &str| {
        sim.client
            .get(sim.url(&format!("/v3/vehicles/{id}")))
            .bearer_auth(&token)
            .header("sc-user-id", user)
            .send()
    };
    assert_eq!(with_user(&user_id).await.unwrap().status(), 200);
    assert_eq!(with_user("someone-else").await.unwrap().status(), 401);

    // One big page holds everything.
    let all = sim
        .get_json(
            &format!("/v3/vehicles/{id}/signals?page=1&pageSize=100"),
            &token,
        )
        .await;
    assert_eq!(all["data"].as_array().unwrap().len(), signals.len());
    assert_eq!(all["links"]["next"], Value::Null);
    sim.stop().await;
}

#[tokio::test]
async fn same_seed_gives_same_fleet_and_values_evolve_with_reports() {
    let fast = SimulatorConfig {
        seed: 42,
        report_interval: Duration::from_secs(1),
        time_scale: 3600.0,
        ..SimulatorConfig::default()
    };
    let a = spawn(fast.clone()).await;
    let b = spawn(fast).await;
    let c = spawn(SimulatorConfig {
        seed: 43,
        ..SimulatorConfig::default()
    })
    .await;
    let fleet = a.fleet().await;
    assert_eq!(fleet, b.fleet().await);
    assert_ne!(fleet, c.fleet().await);
    assert_eq!(fleet["users"].as_array().unwrap().len(), 1);
    assert_eq!(fleet["users"][0]["vehicles"].as_array().unwrap().len(), 2);

    let token = a.connect("1").await;
    let id = fleet["users"][0]["vehicles"][0]["id"].as_str().unwrap();
    let first = a
        .get(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    let first_age = parse_iso_ms(header(&first, "sc-data-age"));
    let first_km = first.json::<Value>().await.unwrap()["distance"]
        .as_f64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = a
        .get(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    let second_age = parse_iso_ms(header(&second, "sc-data-age"));
    assert!(second_age >= first_age + 2000, "{first_age} → {second_age}");
    assert_eq!(
        (second_age - first_age) % 1000,
        0,
        "reports sit on the vehicle's grid"
    );
    assert!(
        second.json::<Value>().await.unwrap()["distance"]
            .as_f64()
            .unwrap()
            >= first_km
    );
    assert_eq!(a.served(id).await["odometer"].as_array().unwrap().len(), 2);
    for sim in [a, b, c] {
        sim.stop().await;
    }
}

#[test]
fn cli_defaults_match_config_defaults() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimulatorArgs,
    }
    let args = Cli::parse_from(["simulator"]).sim;
    assert_eq!(args.listen.to_string(), "127.0.0.1:8090");
    assert_eq!(
        format!("{:?}", args.to_config()),
        format!("{:?}", SimulatorConfig::default())
    );
    assert!(!format!("{args:?}").contains("carpulse-demo-secret"));
    assert!(!format!("{:?}", args.to_config()).contains("carpulse-demo-secret"));

    let args = Cli::parse_from([
        "simulator",
        "--listen",
        "127.0.0.1:0",
        "--users",
        "3",
        "--token-lifetime",
        "60",
        "--time-scale",
        "0",
        "--report-interval",
        "2",
        "--refresh-grace",
        "5",
        "--seed",
        "9",
    ])
    .sim;
    let cfg = args.to_config();
    assert_eq!(cfg.users, 3);
    assert_eq!(cfg.access_token_lifetime, Duration::from_secs(60));
    assert_eq!(cfg.report_interval, Duration::from_secs(2));
    assert_eq!(cfg.refresh_grace, Duration::from_secs(5));
    assert_eq!(cfg.time_scale, 0.0);
    assert_eq!(cfg.seed, 9);
    assert!(Cli::try_parse_from(["simulator", "--time-scale", "-1"]).is_err());
    assert!(Cli::try_parse_from(["simulator", "--report-interval", "0"]).is_err());
}

#[tokio::test]
async fn serve_rejects_a_fleet_without_users_and_stops_on_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = SimulatorConfig {
        users: 0,
        ..SimulatorConfig::default()
    };
    let err = serve(listener, cfg, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("at least one user"), "{err:#}");

    let sim = spawn(SimulatorConfig::default()).await;
    let base = sim.base.clone();
    sim.stop().await;
    assert!(reqwest::get(format!("{base}/_simulator/stats"))
        .await
        .is_err());
}

#[tokio::test]
async fn every_fault_kind_answers_with_smartcar_s_status_type_and_code() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let id = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = fleet["users"][0]["vehicles"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = [
        ("rate_limit", 429, "RATE_LIMIT", Some("VEHICLE")),
        ("app_rate_limit", 429, "RATE_LIMIT", Some("SMARTCAR_API")),
        ("asleep", 409, "VEHICLE_STATE", Some("ASLEEP")),
        ("unreachable", 409, "VEHICLE_STATE", Some("UNREACHABLE")),
        ("server", 500, "SERVER", Some("INTERNAL")),
        ("upstream", 502, "UPSTREAM", Some("NO_RESPONSE")),
        ("permission", 403, "PERMISSION", None),
        (
            "compatibility",
            501,
            "COMPATIBILITY",
            Some("VEHICLE_NOT_CAPABLE"),
        ),
        ("billing", 430, "BILLING", Some("VEHICLE_REQUEST_LIMIT")),
    ];
    for (kind, status, error_type, code) in cases {
        // Two requests: one v2, one v3; a rate limit lasts 0 s so the next case is not refused.
        let set = sim
            .set_fault(json!({"vehicle_id": id, "kind": kind, "count": 2, "retry_after": 0}))
            .await;
        assert_eq!(set.status(), 200, "{kind}");

        let v2 = sim
            .get(&format!("/v2.0/vehicles/{id}/battery"), &token)
            .await;
        assert_eq!(v2.status().as_u16(), status, "{kind} v2");
        assert!(is_uuid(header(&v2, "sc-request-id")));
        if kind == "rate_limit" {
            assert_eq!(header(&v2, "retry-after"), "0");
        }
        let body: Value = v2.json().await.unwrap();
        assert_eq!(body["type"], error_type, "{kind}: {body}");
        assert_eq!(body["code"], json!(code), "{kind}: {body}");
        assert_eq!(body["statusCode"], status, "{kind}: {body}");

        let v3 = sim.get(&format!("/v3/vehicles/{id}/signals"), &token).await;
        assert_eq!(v3.status().as_u16(), status, "{kind} v3");
        let body: Value = v3.json().await.unwrap();
        assert_eq!(
            body["errors"][0]["status"],
            status.to_string(),
            "{kind}: {body}"
        );
        assert_eq!(body["errors"][0]["type"], error_type, "{kind}: {body}");

        // The count ran out; the other vehicle was never affected.
        assert_eq!(
            sim.get(&format!("/v2.0/vehicles/{id}/battery"), &token)
                .await
                .status(),
            200,
            "{kind}"
        );
        assert_eq!(
            sim.get(&format!("/v2.0/vehicles/{other}/battery"), &token)
                .await
                .status(),
            200
        );
    }
    assert_eq!(sim.stats().await["faults_served"], 2 * cases.len() as u64);
    sim.stop().await;
}

#[tokio::test]
async fn a_request_before_retry_after_is_refused_and_counted() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let id = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.set_fault(json!({"vehicle_id": id, "kind": "rate_limit", "count": 1, "retry_after": 30}))
        .await;
    let first = sim
        .get(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    assert_eq!(
        (first.status().as_u16(), header(&first, "retry-after")),
        (429, "30")
    );
    // The fault's count is spent, but the window it announced still holds.
    let early = sim
        .get(&format!("/v2.0/vehicles/{id}/odometer"), &token)
        .await;
    assert_eq!(early.status(), 429);
    let left: u64 = header(&early, "retry-after").parse().unwrap();
    assert!((1..=30).contains(&left), "{left}");
    let stats = sim.stats().await;
    assert_eq!(stats["retry_after_violations"], 1, "{stats}");

    // Clearing the vehicle's faults also lifts its window.
    let cleared = sim
        .client
        .delete(sim.url("/_simulator/faults"))
        .query(&[("vehicle_id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{id}/odometer"), &token)
            .await
            .status(),
        200
    );
    sim.stop().await;
}

#[tokio::test]
async fn fleet_wide_faults_from_flags_and_bad_fault_requests() {
    let (none, fault) = carpulse::simulator::faults::parse_spec("asleep*1").unwrap();
    assert!(none.is_none());
    let sim = spawn(SimulatorConfig {
        faults: vec![(None, fault)],
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let id = fleet["users"][0]["vehicles"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let batch = sim
        .client
        .post(sim.url(&format!("/v2.0/vehicles/{id}/batch")))
        .bearer_auth(&token)
        .header("sc-unit-system", "metric")
        .json(&json!({"requests": [{"path": "/battery"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        batch.status(),
        409,
        "a fault fails the whole batch, as a sleeping car does"
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{id}/battery"), &token)
            .await
            .status(),
        200
    );

    for bad in [
        json!({"kind": "sleepy"}),
        json!({"vehicle_id": "nope", "kind": "asleep"}),
        json!({}),
    ] {
        assert_eq!(sim.set_fault(bad.clone()).await.status(), 400, "{bad}");
    }
    let listed: Value = sim
        .client
        .get(sim.url("/_simulator/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["fleet"], Value::Null, "{listed}");
    sim.stop().await;
}

/// Latency is a wait per request, not a queue: 200 requests at 2 s take about 2 s, not 400 s.
#[tokio::test]
async fn slow_answers_wait_side_by_side() {
    let sim = spawn(SimulatorConfig {
        latency: Some((Duration::from_secs(2), Duration::from_secs(2))),
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let id = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = std::time::Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (client, url, token) = (
            sim.client.clone(),
            sim.url(&format!("/v2.0/vehicles/{id}/battery")),
            token.clone(),
        );
        requests.spawn(async move {
            let r = client
                .get(url)
                .bearer_auth(token)
                .header("sc-unit-system", "metric");
            r.send().await.map(|r| r.status().as_u16())
        });
    }
    let answers: Vec<u16> = requests
        .join_all()
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let elapsed = started.elapsed();
    assert_eq!(answers.len(), 200);
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "the latency applies: {elapsed:?}"
    );
    // Generous bound (a loaded CI machine): serial answers would take 400 s.
    assert!(
        elapsed < Duration::from_secs(60),
        "answers were serialised: {elapsed:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn consent_page_picks_vehicles_and_deny_redirects_with_access_denied() {
    let sim = spawn(SimulatorConfig {
        consent: true,
        vehicles_per_user: 3,
        ..stable_cfg()
    })
    .await;
    let page = sim.authorize(&[("state", "s1"), ("user", "1")]).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let fleet = sim.fleet().await;
    let cars: Vec<String> = fleet["users"][0]["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &cars {
        assert!(html.contains(id.as_str()), "the picker lists {id}");
    }
    assert!(html.contains("Approve") && html.contains("Deny"));
    let user_id = fleet["users"][0]["id"].as_str().unwrap();

    let decide = |decision: &'static str, vehicles: Vec<String>| {
        let mut form = vec![
            ("redirect_uri".to_owned(), REDIRECT.to_owned()),
            ("state".to_owned(), "s1".to_owned()),
            ("user".to_owned(), user_id.to_owned()),
            ("decision".to_owned(), decision.to_owned()),
        ];
        form.extend(vehicles.into_iter().map(|v| ("vehicle".to_owned(), v)));
        sim.client
            .post(sim.url("/oauth/authorize/decision"))
            .form(&form)
            .send()
    };
    let denied = decide("deny", vec![]).await.unwrap();
    assert_eq!(denied.status(), 302);
    let location = header(&denied, "location").to_owned();
    assert!(location.starts_with(REDIRECT), "{location}");
    assert!(
        location.contains("error=access_denied") && location.contains("state=s1"),
        "{location}"
    );

    // Approve two of the three: the token sees only those.
    let approved = decide("approve", cars[..2].to_vec()).await.unwrap();
    assert_eq!(approved.status(), 302);
    let location = reqwest::Url::parse(header(&approved, "location")).unwrap();
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let token = sim.exchange(&code).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = sim.get_json("/v2.0/vehicles", &token).await;
    assert_eq!(listed["vehicles"], json!(cars[..2]));
    assert_eq!(listed["paging"]["count"], 2);
    let excluded = sim
        .get(&format!("/v2.0/vehicles/{}/battery", cars[2]), &token)
        .await;
    assert_eq!(
        excluded.status(),
        400,
        "a vehicle left out of the consent is not accessible"
    );

    // Scripts skip the page.
    let auto = sim.authorize(&[("auto_approve", "true")]).await;
    assert_eq!(auto.status(), 302);
    sim.stop().await;
}

#[tokio::test]
async fn authorize_checks_scope_and_mode() {
    let sim = spawn(stable_cfg()).await;
    assert_eq!(sim.authorize(&[("mode", "dream")]).await.status(), 400);
    let bad_scope = sim
        .client
        .get(sim.url("/oauth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", sim.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "read_battery read_minds"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_scope.status(), 400);
    assert!(bad_scope.text().await.unwrap().contains("read_minds"));
    let required = sim
        .client
        .get(sim.url("/oauth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", sim.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "required:read_odometer read_vin"),
            ("mode", "test"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(required.status(), 302);
    sim.stop().await;
}

#[tokio::test]
async fn the_v3_application_token_is_issued_only_to_the_api_credentials() {
    let sim = spawn(stable_cfg()).await;
    let (api_id, api_secret) = (
        sim.cfg.api_client_id.clone(),
        sim.cfg.api_client_secret.clone(),
    );
    let error_of = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert!(body["error_description"].is_string(), "{body}");
        (status, body["error"].as_str().unwrap().to_owned())
    };
    let invalid_request = (400, "invalid_request".to_owned());
    let invalid_client = (401, "invalid_client".to_owned());
    // Missing, malformed, or another grant type.
    for form in [
        vec![("grant_type", "client_credentials")],
        vec![
            ("client_id", api_id.as_str()),
            ("client_secret", api_secret.as_str()),
        ],
        vec![
            ("grant_type", "authorization_code"),
            ("client_id", api_id.as_str()),
            ("client_secret", api_secret.as_str()),
        ],
    ] {
        let r = sim.app_token_request(&form).await;
        assert_eq!(error_of(r).await, invalid_request, "{form:?}");
    }
    let not_a_form = sim
        .client
        .post(sim.url("/oauth2/token"))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(not_a_form).await, invalid_request);
    // Credentials in a Basic header alone are not read (the docs put them in the body).
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{api_id}:{api_secret}"))
    );
    let basic_only = sim
        .client
        .post(sim.url("/oauth2/token"))
        .header("authorization", basic)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(basic_only).await, invalid_request);
    // Wrong secret, and Connect's client credentials: not API credentials.
    for (id, secret) in [
        (api_id.as_str(), "nope"),
        (sim.cfg.client_id.as_str(), sim.cfg.client_secret.as_str()),
    ] {
        let r = sim
            .app_token_request(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", secret),
            ])
            .await;
        assert_eq!(error_of(r).await, invalid_client, "{id}");
    }
    assert_eq!(sim.stats().await["app_tokens_issued"], 0);

    let ok = sim
        .app_token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", api_id.as_str()),
            ("client_secret", api_secret.as_str()),
        ])
        .await;
    assert_eq!(ok.status(), 200);
    let ok: Value = ok.json().await.unwrap();
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["expires_in"], 3600);
    assert!(ok.get("refresh_token").is_none());
    assert!(is_uuid(ok["access_token"].as_str().unwrap()));
    let stats = sim.stats().await;
    assert_eq!(stats["app_tokens_issued"], 1, "{stats}");
    assert_eq!(stats["token_errors"], 7, "{stats}");

    // The app token reads a connected user's car with sc-user-id; it is no v2 credential.
    let token = access(&ok);
    sim.connect("1").await;
    let user = sim.user_ids().await[0].clone();
    let car = sim.first_car().await;
    let signals = format!("/v3/vehicles/{car}/signals");
    assert_eq!(
        sim.get_as(&signals, &token, Some(&user)).await.status(),
        200
    );
    let v2 = sim
        .get(&format!("/v2.0/vehicles/{car}/battery"), &token)
        .await;
    assert_eq!(v2.status(), 401);
    assert_eq!(v2.json::<Value>().await.unwrap()["type"], "AUTHENTICATION");
    assert_eq!(sim.stats().await["app_tokens_on_v2"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn an_expired_application_token_is_refused_and_counted() {
    let sim = spawn(SimulatorConfig {
        app_token_lifetime: Duration::from_millis(300),
        ..stable_cfg()
    })
    .await;
    sim.connect("1").await;
    let token = sim.app_token().await;
    let user = sim.user_ids().await[0].clone();
    let car = sim.first_car().await;
    let path = format!("/v3/vehicles/{car}");
    assert_eq!(sim.get_as(&path, &token, Some(&user)).await.status(), 200);
    // Wait (with a deadline) until the simulator says the token expired.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = sim.get_as(&path, &token, Some(&user)).await;
        if r.status() != 200 {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["type"], "AUTHENTICATION");
    assert_eq!(body["errors"][0]["status"], "401");
    let stats = sim.stats().await;
    assert_eq!(stats["app_token_expired_uses"], 1, "{stats}");
    assert_eq!(stats["expired_token_requests"], 0, "{stats}");
    // A new one works at once (no refresh token: ask again).
    let again = sim.app_token().await;
    assert_eq!(sim.get_as(&path, &again, Some(&user)).await.status(), 200);
    sim.stop().await;
}

/// The 400/403 of an application-token request, checked against the v3 envelope and its request
/// id: (status, type, code).
async fn v3_error(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let request_id = header(&response, "sc-request-id").to_owned();
    assert!(is_uuid(&request_id));
    let body: Value = response.json().await.unwrap();
    let e = &body["errors"][0];
    assert_eq!(e["status"], status.to_string(), "{body}");
    assert_eq!(e["meta"]["debug"]["requestId"], request_id, "{body}");
    for field in ["title", "detail"] {
        assert!(e[field].is_string(), "{field}: {body}");
    }
    assert!(e["resolution"].is_object(), "{body}");
    (
        status,
        e["type"].as_str().unwrap().to_owned(),
        e["code"].as_str().unwrap_or("null").to_owned(),
    )
}

#[tokio::test]
async fn the_application_token_needs_sc_user_id_naming_the_connected_owner() {
    let sim = spawn(SimulatorConfig {
        users: 3,
        ..stable_cfg()
    })
    .await;
    let users = sim.user_ids().await;
    let (cars1, cars2) = (sim.cars_of(0).await, sim.cars_of(1).await);
    sim.connect("1").await;
    sim.connect("2").await;
    let token = sim.app_token().await;
    let signals = |car: &str| format!("/v3/vehicles/{car}/signals");

    let missing = sim.get_as(&signals(&cars1[0]), &token, None).await;
    let request_id = header(&missing, "sc-request-id").to_owned();
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["status"], "400");
    assert_eq!(body["errors"][0]["type"], "VALIDATION");
    assert_eq!(body["errors"][0]["code"], "MISSING_PARAMETER");
    assert_eq!(body["errors"][0]["detail"], "missing userId");
    assert_eq!(body["errors"][0]["meta"]["debug"]["requestId"], request_id);
    let empty = sim.get_as(&signals(&cars1[0]), &token, Some(" ")).await;
    let missing = ("VALIDATION".to_owned(), "MISSING_PARAMETER".to_owned());
    let (status, kind, code) = v3_error(empty).await;
    assert_eq!((status, (kind, code)), (400, missing));

    let nobody = sim
        .get_as(
            &signals(&cars1[0]),
            &token,
            Some("0f0f0f0f-0000-4000-8000-000000000000"),
        )
        .await;
    let (status, kind, code) = v3_error(nobody).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (400, "VALIDATION", "INVALID_PARAMETER")
    );

    // User 2 asking for user 1's car: not the owner.
    let not_owner = sim
        .get_as(&signals(&cars1[0]), &token, Some(&users[1]))
        .await;
    let (status, kind, code) = v3_error(not_owner).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (403, "AUTHENTICATION", "ACCESS_DENIED")
    );
    // User 3 never approved anything in Connect: their own car is out of reach.
    let cars3 = sim.cars_of(2).await;
    let unapproved = sim
        .get_as(&signals(&cars3[0]), &token, Some(&users[2]))
        .await;
    let (status, _, code) = v3_error(unapproved).await;
    assert_eq!((status, code.as_str()), (403, "ACCESS_DENIED"));
    // The single-signal and vehicle paths follow the same rules.
    let single = format!(
        "/v3/vehicles/{}/signals/odometer-traveleddistance",
        cars2[0]
    );
    let (status, _, code) = v3_error(sim.get_as(&single, &token, None).await).await;
    assert_eq!((status, code.as_str()), (400, "MISSING_PARAMETER"));
    assert_eq!(
        sim.get_as(&single, &token, Some(&users[1])).await.status(),
        200
    );
    let vehicle = format!("/v3/vehicles/{}", cars2[1]);
    assert_eq!(
        sim.get_as(&vehicle, &token, Some(&users[1])).await.status(),
        200
    );
    let (status, _, _) = v3_error(sim.get_as(&vehicle, &token, Some(&users[0])).await).await;
    assert_eq!(status, 403);

    let stats = sim.stats().await;
    assert_eq!(stats["missing_user_id"], 3, "{stats}");
    assert_eq!(stats["wrong_user_id"], 3, "{stats}");
    assert_eq!(stats["revoked_user_requests"], 0, "{stats}");
    assert_eq!(stats["user_tokens_on_v3"], 0, "{stats}");
    assert_eq!(stats["unknown_token_requests"], 0, "{stats}");
    sim.stop().await;
}

#[tokio::test]
async fn v3_auth_decides_which_tokens_v3_accepts_and_user_tokens_are_counted() {
    // Both (the default): a per-user token works without sc-user-id, and is counted.
    let both = spawn(stable_cfg()).await;
    let user_token = both.connect("1").await;
    let car = both.first_car().await;
    let path = format!("/v3/vehicles/{car}/signals");
    assert_eq!(both.get(&path, &user_token).await.status(), 200);
    assert_eq!(both.stats().await["user_tokens_on_v3"], 1);
    both.stop().await;

    let app_only = spawn(SimulatorConfig {
        v3_auth: V3Auth::App,
        ..stable_cfg()
    })
    .await;
    let user_token = app_only.connect("1").await;
    let user = app_only.user_ids().await[0].clone();
    let car = app_only.first_car().await;
    let refused = app_only
        .get(&format!("/v3/vehicles/{car}/signals"), &user_token)
        .await;
    let (status, kind, _) = v3_error(refused).await;
    assert_eq!((status, kind.as_str()), (401, "AUTHENTICATION"));
    // Even with sc-user-id, and on the vehicle object; v2 still takes it.
    let vehicle = format!("/v3/vehicles/{car}");
    assert_eq!(
        app_only
            .get_as(&vehicle, &user_token, Some(&user))
            .await
            .status(),
        401
    );
    assert_eq!(
        app_only
            .get(&format!("/v2.0/vehicles/{car}"), &user_token)
            .await
            .status(),
        200
    );
    let app = app_only.app_token().await;
    assert_eq!(
        app_only.get_as(&vehicle, &app, Some(&user)).await.status(),
        200
    );
    let stats = app_only.stats().await;
    assert_eq!(stats["user_tokens_on_v3"], 2, "{stats}");
    app_only.stop().await;

    let user_only = spawn(SimulatorConfig {
        v3_auth: V3Auth::User,
        ..stable_cfg()
    })
    .await;
    let user_token = user_only.connect("1").await;
    let user = user_only.user_ids().await[0].clone();
    let car = user_only.first_car().await;
    let vehicle = format!("/v3/vehicles/{car}");
    let app = user_only.app_token().await;
    let (status, kind, _) = v3_error(user_only.get_as(&vehicle, &app, Some(&user)).await).await;
    assert_eq!((status, kind.as_str()), (401, "AUTHENTICATION"));
    let connections = user_only.get_as("/v3/connections", &app, None).await;
    assert_eq!(connections.status(), 401);
    assert_eq!(user_only.get(&vehicle, &user_token).await.status(), 200);
    user_only.stop().await;
}

#[tokio::test]
async fn a_revoked_connection_gets_401_and_invalid_grant_until_it_reconnects() {
    let sim = spawn(stable_cfg()).await;
    let code = sim.code(&[("user", "1")]).await;
    let pair = sim.exchange(&code).await;
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    let cars = sim.cars_of(0).await;
    let battery = |car: &str| format!("/v2.0/vehicles/{car}/battery");

    // One vehicle's connection: only that car is refused; the token and the refresh live on.
    let revoked = sim.revoke(json!({"vehicle_id": cars[0]})).await;
    assert_eq!(revoked.status(), 200);
    let revoked: Value = revoked.json().await.unwrap();
    assert_eq!(revoked["vehicle_id"], cars[0].as_str());
    assert_eq!(revoked["connections"], 1);
    assert_eq!(sim.get(&battery(&cars[0]), &access).await.status(), 401);
    assert_eq!(sim.get(&battery(&cars[1]), &access).await.status(), 200);
    assert_eq!(sim.vehicle_ids(&access).await, vec![cars[1].clone()]);
    assert_eq!(sim.stats().await["revoked_token_uses"], 1);

    // The whole user: every token 401, the refresh token invalid_grant.
    let revoked = sim.revoke(json!({"user": 1})).await;
    assert_eq!(revoked.status(), 200);
    assert_eq!(sim.get(&battery(&cars[1]), &access).await.status(), 401);
    let refused = sim.refresh(&refresh).await;
    assert_eq!(refused.status(), 400);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    let stats = sim.stats().await;
    assert_eq!(stats["revoked_token_uses"], 3, "{stats}");
    assert_eq!(stats["unknown_token_requests"], 0, "{stats}");
    assert_eq!(sim.revoke(json!({"user": 9})).await.status(), 400);
    assert_eq!(
        sim.revoke(json!({"vehicle_id": "nope"})).await.status(),
        400
    );

    // Connect again: a new consent restores access to both cars.
    let token = sim.connect("1").await;
    for car in &cars {
        assert_eq!(sim.get(&battery(car), &token).await.status(), 200);
    }
    sim.stop().await;
}

#[tokio::test]
async fn slow_malformed_and_dropped_answers() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v2.0/vehicles/{car}/battery");

    sim.set_fault(json!({"vehicle_id": car, "kind": "slow", "delay": 1.5, "count": 1}))
        .await;
    let started = std::time::Instant::now();
    assert_eq!(sim.get(&path, &token).await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    sim.set_fault(json!({"vehicle_id": car, "kind": "malformed", "count": 1}))
        .await;
    let malformed = sim.get(&path, &token).await;
    assert_eq!(malformed.status(), 200);
    assert!(
        malformed.json::<Value>().await.is_err(),
        "the body is not valid JSON"
    );

    sim.set_fault(json!({"vehicle_id": car, "kind": "drop", "count": 1}))
        .await;
    let dropped = sim
        .client
        .get(sim.url(&path))
        .bearer_auth(&token)
        .send()
        .await;
    let failed = match dropped {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed, "the answer must break off");

    // Spent: the next answer is whole again.
    assert!(sim.get_json(&path, &token).await["percentRemaining"].is_number());
    sim.stop().await;
}

#[tokio::test]
async fn the_app_wide_bucket_refuses_the_121st_request() {
    let sim = spawn(SimulatorConfig {
        app_rate_limit: true,
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v2.0/vehicles/{car}/odometer");
    for i in 0..120 {
        assert_eq!(sim.get(&path, &token).await.status(), 200, "request {i}");
    }
    let refused = sim.get(&path, &token).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some("RATE_LIMIT"), Some("SMARTCAR_API"))
    );
    assert_eq!(sim.stats().await["app_rate_limited"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn the_per_vehicle_limit_answers_429_with_retry_after() {
    let sim = spawn(SimulatorConfig {
        vehicle_rate_limit: Some((3, Duration::from_secs(3600))),
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = fleet["users"][0]["vehicles"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        assert_eq!(
            sim.get(&format!("/v2.0/vehicles/{car}/vin"), &token)
                .await
                .status(),
            200
        );
    }
    let limited = sim.get(&format!("/v2.0/vehicles/{car}/vin"), &token).await;
    assert_eq!(limited.status(), 429);
    let wait: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((3590..=3600).contains(&wait), "{wait}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "VEHICLE");
    // Another vehicle has its own budget; coming back early is a violation.
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{other}/vin"), &token)
            .await
            .status(),
        200
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{car}/vin"), &token)
            .await
            .status(),
        429
    );
    assert_eq!(sim.stats().await["retry_after_violations"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn three_users_page_through_their_vehicles_two_at_a_time() {
    let sim = spawn(SimulatorConfig {
        users: 3,
        vehicles_per_user: 5,
        ..stable_cfg()
    })
    .await;
    let fleet = sim.fleet().await;
    let mut seen_all = HashSet::new();
    for (i, user) in fleet["users"].as_array().unwrap().iter().enumerate() {
        let token = sim.connect(&(i + 1).to_string()).await;
        let expected: Vec<&str> = user["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let page = sim
                .get_json(&format!("/v2.0/vehicles?limit=2&offset={offset}"), &token)
                .await;
            assert_eq!(page["paging"], json!({"count": 5, "offset": offset}));
            let ids = page["vehicles"].as_array().unwrap();
            assert!(ids.len() <= 2);
            if ids.is_empty() {
                break;
            }
            got.extend(ids.iter().map(|v| v.as_str().unwrap().to_owned()));
            offset += ids.len();
        }
        assert_eq!(got, expected, "user {}", i + 1);
        seen_all.extend(got);
    }
    assert_eq!(seen_all.len(), 15, "no vehicle belongs to two users");
    sim.stop().await;
}

#[tokio::test]
async fn batch_items_count_against_the_per_vehicle_limit() {
    let sim = spawn(SimulatorConfig {
        vehicle_rate_limit: Some((4, Duration::from_secs(3600))),
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let batch = |n: usize| {
        let requests: Vec<Value> = (0..n).map(|_| json!({"path": "/odometer"})).collect();
        sim.client
            .post(sim.url(&format!("/v2.0/vehicles/{car}/batch")))
            .bearer_auth(&token)
            .header("sc-unit-system", "metric")
            .json(&json!({ "requests": requests }))
            .send()
    };
    assert_eq!(batch(3).await.unwrap().status(), 200, "3 of 4");
    let over = batch(2).await.unwrap();
    assert_eq!(over.status(), 429, "3 + 2 items exceed 4 per hour");
    assert!(header(&over, "retry-after").parse::<u64>().unwrap() > 3500);
    sim.stop().await;
}

#[tokio::test]
async fn codes_and_refresh_tokens_expire() {
    let sim = spawn(SimulatorConfig {
        code_lifetime: Duration::from_millis(300),
        refresh_token_lifetime: Duration::from_millis(600),
        ..stable_cfg()
    })
    .await;
    // A code used after its lifetime is refused as invalid_request (smartcar-api.md §1.5).
    let late = sim.code(&[]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = sim
        .token_request(&[
            ("grant_type", "authorization_code"),
            ("code", late.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );

    // A refresh token past its lifetime (60 days at Smartcar) gets invalid_grant.
    let pair = sim.exchange(&sim.code(&[]).await).await;
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let old = sim.refresh(&refresh).await;
    assert_eq!(old.status(), 400);
    assert_eq!(old.json::<Value>().await.unwrap()["error"], "invalid_grant");
    sim.stop().await;
}

// ---- Granted scope, PERMISSION errors and the re-auth flow ----

/// The simulator's grant when Connect names no scope.
const DEFAULT_GRANT: [&str; 9] = [
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
    "read_location",
    "read_tires",
    "read_fuel",
    "read_engine_oil",
];

fn access(pair: &Value) -> String {
    pair["access_token"].as_str().unwrap().to_owned()
}

/// The v2 PERMISSION object of smartcar-api.md §4.1/§4.2.
fn assert_permission_error(body: &Value, request_id: Option<&str>) {
    assert_eq!(body["type"], "PERMISSION", "{body}");
    assert!(body["code"].is_null(), "{body}");
    assert_eq!(body["statusCode"], 403, "{body}");
    assert_eq!(
        body["resolution"],
        json!({"type": "REAUTHENTICATE"}),
        "{body}"
    );
    assert_eq!(
        body["docURL"],
        "https://smartcar.com/docs/errors/api-errors/permission-errors"
    );
    assert!(body["description"].as_str().is_some_and(|d| !d.is_empty()));
    if let Some(rid) = request_id {
        assert_eq!(body["requestId"], rid);
    }
}

#[tokio::test]
async fn a_narrow_scope_lists_exactly_its_permissions_and_forbids_the_rest() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    let token = access(
        &sim.pair_with_scope(Some("read_vehicle_info read_battery"))
            .await,
    );

    let permissions = sim.permissions(&car, &token).await;
    assert_eq!(
        permissions,
        json!({"permissions": ["read_vehicle_info", "read_battery"],
               "paging": {"count": 2, "offset": 0}})
    );
    let page = sim
        .get_json(
            &format!("/v2.0/vehicles/{car}/permissions?limit=1&offset=1"),
            &token,
        )
        .await;
    assert_eq!(page["permissions"], json!(["read_battery"]));
    assert_eq!(page["paging"], json!({"count": 2, "offset": 1}));
    let too_many = sim
        .get(
            &format!("/v2.0/vehicles/{car}/permissions?limit=51"),
            &token,
        )
        .await;
    assert_eq!(too_many.status(), 400);

    for granted in ["", "/battery", "/battery/capacity"] {
        let path = format!("/v2.0/vehicles/{car}{granted}");
        assert_eq!(sim.get(&path, &token).await.status(), 200, "{path}");
    }
    let charge = sim
        .get(&format!("/v2.0/vehicles/{car}/charge"), &token)
        .await;
    assert_eq!(charge.status(), 403);
    let rid = header(&charge, "sc-request-id").to_owned();
    assert!(is_uuid(&rid));
    assert_permission_error(&charge.json().await.unwrap(), Some(&rid));
    for denied in [
        "/vin",
        "/charge/limit",
        "/odometer",
        "/location",
        "/tires/pressure",
        "/fuel",
        "/engine/oil",
    ] {
        let path = format!("/v2.0/vehicles/{car}{denied}");
        let response = sim.get(&path, &token).await;
        assert_eq!(response.status(), 403, "{path}");
        assert_permission_error(&response.json().await.unwrap(), None);
    }
    // Nothing was served for a refused request, and each refusal is counted.
    assert!(sim.served(&car).await["charge"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(sim.stats().await["permission_denied"], 8);

    // `required:` marks a permission as mandatory; it grants the same thing.
    let token = access(
        &sim.pair_with_scope(Some("required:read_odometer read_vin"))
            .await,
    );
    assert_eq!(
        sim.permissions(&car, &token).await["permissions"],
        json!(["read_vin", "read_odometer"])
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{car}/odometer"), &token)
            .await
            .status(),
        200
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{car}"), &token)
            .await
            .status(),
        403,
        "vehicle info needs read_vehicle_info"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_batch_item_without_permission_gets_403_while_the_batch_answers_200() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    let token = access(
        &sim.pair_with_scope(Some("read_vehicle_info read_battery"))
            .await,
    );
    let items = sim
        .batch(&car, &token, &["/battery", "/charge", "/permissions"])
        .await;
    assert_eq!(items[0]["code"], 200);
    assert!(items[0]["body"]["percentRemaining"].is_number());
    assert_eq!(items[1]["path"], "/charge");
    assert_eq!(items[1]["code"], 403);
    assert_permission_error(&items[1]["body"], None);
    assert!(items[1].get("headers").is_none());
    assert_eq!(
        items[2]["code"], 200,
        "asking for the permissions needs none"
    );
    assert_eq!(items[2]["body"]["paging"]["count"], 2);
    assert_eq!(sim.stats().await["permission_denied"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn v3_signals_outside_the_scope_are_permission_errors() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    let token = access(
        &sim.pair_with_scope(Some("read_vehicle_info read_battery"))
            .await,
    );
    let list = sim
        .get_json(&format!("/v3/vehicles/{car}/signals?pageSize=100"), &token)
        .await;
    let signals = list["data"].as_array().unwrap();
    let (mut charge, mut battery) = (0, 0);
    for signal in signals {
        let code = signal["id"].as_str().unwrap();
        let attributes = &signal["attributes"];
        if code.starts_with("charge-") {
            charge += 1;
            assert_eq!(
                attributes["status"],
                json!({"value": "ERROR", "error": {"type": "PERMISSION", "code": null}}),
                "{code}"
            );
            assert!(attributes.get("body").is_none(), "{code}");
        } else if code.starts_with("tractionbattery-") {
            battery += 1;
            assert_eq!(attributes["status"]["value"], "SUCCESS", "{code}");
            assert!(attributes["body"].is_object(), "{code}");
        } else if code.starts_with("odometer-")
            || code.starts_with("location-")
            || code == "vehicleidentification-vin"
        {
            assert_eq!(
                attributes["status"]["error"]["type"], "PERMISSION",
                "{code}"
            );
        }
    }
    assert!(charge >= 3 && battery >= 2, "{charge} {battery}");
    // Only the granted battery signals were served.
    let served = sim.served(&car).await;
    assert_eq!(served["battery"].as_array().unwrap().len(), 1);
    assert!(served["charge"].as_array().unwrap().is_empty());

    let single = sim
        .get(
            &format!("/v3/vehicles/{car}/signals/charge-ischarging"),
            &token,
        )
        .await;
    assert_eq!(single.status(), 403);
    assert!(is_uuid(header(&single, "sc-request-id")));
    let body: Value = single.json().await.unwrap();
    let error = &body["errors"][0];
    assert_eq!(error["status"], "403", "{body}");
    assert_eq!(error["type"], "PERMISSION", "{body}");
    assert!(error["code"].is_null(), "{body}");
    assert_eq!(error["title"], "Forbidden", "{body}");
    assert_eq!(
        error["resolution"],
        json!({"type": "REAUTHENTICATE"}),
        "{body}"
    );
    let soc = sim
        .get_json(
            &format!("/v3/vehicles/{car}/signals/tractionbattery-stateofcharge"),
            &token,
        )
        .await;
    assert_eq!(soc["attributes"]["status"]["value"], "SUCCESS");
    // An unknown signal is still 404, granted or not.
    assert_eq!(
        sim.get(&format!("/v3/vehicles/{car}/signals/warp-drive"), &token)
            .await
            .status(),
        404
    );
    sim.stop().await;
}

#[tokio::test]
async fn rotation_keeps_the_granted_scope() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    let first = sim
        .pair_with_scope(Some("read_vehicle_info read_battery"))
        .await;
    let narrow = json!(["read_vehicle_info", "read_battery"]);
    let mut refresh = first["refresh_token"].as_str().unwrap().to_owned();
    for round in 0..2 {
        let response = sim.refresh(&refresh).await;
        assert_eq!(response.status(), 200, "round {round}");
        let pair: Value = response.json().await.unwrap();
        let token = access(&pair);
        assert_eq!(
            sim.permissions(&car, &token).await["permissions"],
            narrow,
            "round {round}"
        );
        assert_eq!(
            sim.get(&format!("/v2.0/vehicles/{car}/charge"), &token)
                .await
                .status(),
            403,
            "round {round}"
        );
        refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    }
    // The used first refresh token, inside its grace window, also hands on the same scope.
    let again: Value = sim
        .refresh(first["refresh_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        sim.permissions(&car, &access(&again)).await["permissions"],
        narrow
    );
    // The first access token is still valid and still narrow.
    assert_eq!(
        sim.permissions(&car, &access(&first)).await["permissions"],
        narrow
    );
    sim.stop().await;
}

#[tokio::test]
async fn no_scope_grants_the_full_default_set() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    for scope in [None, Some(""), Some(" ")] {
        let token = access(&sim.pair_with_scope(scope).await);
        let permissions = sim.permissions(&car, &token).await;
        assert_eq!(
            permissions["permissions"],
            json!(DEFAULT_GRANT),
            "{scope:?}"
        );
        assert_eq!(permissions["paging"]["count"], DEFAULT_GRANT.len());
        for path in [
            "",
            "/vin",
            "/battery",
            "/charge",
            "/charge/limit",
            "/odometer",
            "/location",
            "/tires/pressure",
        ] {
            let path = format!("/v2.0/vehicles/{car}{path}");
            assert_eq!(sim.get(&path, &token).await.status(), 200, "{path}");
        }
        // Granted, but a BEV has no tank: 501, not 403.
        assert_eq!(
            sim.get(&format!("/v2.0/vehicles/{car}/fuel"), &token)
                .await
                .status(),
            501
        );
    }
    let two_pages = sim
        .get_json(
            &format!("/v2.0/vehicles/{car}/permissions?limit=5&offset=5"),
            &access(&sim.pair_with_scope(None).await),
        )
        .await;
    assert_eq!(two_pages["permissions"], json!(DEFAULT_GRANT[5..]));
    assert_eq!(sim.stats().await["permission_denied"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn the_v3_application_token_acts_with_the_user_s_latest_consent() {
    let sim = spawn(stable_cfg()).await;
    let fleet = sim.fleet().await;
    let user = fleet["users"][0]["id"].as_str().unwrap().to_owned();
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let app = sim.app_token().await;
    let signal = |code: &'static str| {
        sim.client
            .get(sim.url(&format!("/v3/vehicles/{car}/signals/{code}")))
            .bearer_auth(&app)
            .header("sc-user-id", &user)
            .send()
    };
    // No consent yet: no connection, so the user's car is out of the app token's reach.
    let (status, kind, code) = v3_error(signal("charge-ischarging").await.unwrap()).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (403, "AUTHENTICATION", "ACCESS_DENIED")
    );
    // After a narrow consent, the app token reads only what it granted.
    sim.pair_with_scope(Some("read_battery")).await;
    assert_eq!(signal("charge-ischarging").await.unwrap().status(), 403);
    assert_eq!(
        signal("tractionbattery-stateofcharge")
            .await
            .unwrap()
            .status(),
        200
    );
    // A newer, wider consent widens it again.
    sim.pair_with_scope(Some("read_battery read_charge")).await;
    assert_eq!(signal("charge-ischarging").await.unwrap().status(), 200);
    sim.stop().await;
}

#[tokio::test]
async fn the_consent_page_shows_and_keeps_the_requested_scope() {
    let sim = spawn(SimulatorConfig {
        consent: true,
        ..stable_cfg()
    })
    .await;
    let car = sim.first_car().await;
    let fleet = sim.fleet().await;
    let user_id = fleet["users"][0]["id"].as_str().unwrap().to_owned();
    let page = sim
        .client
        .get(sim.url("/oauth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", sim.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "read_battery required:read_odometer"),
            ("user", "1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<code>read_battery</code>") && html.contains("<code>read_odometer</code>"),
        "{html}"
    );
    assert!(!html.contains("<code>read_charge</code>"), "{html}");
    assert!(
        html.contains("name=\"scope\" value=\"read_battery required:read_odometer\""),
        "the form keeps the scope: {html}"
    );

    let decide = |scope: &'static str| {
        sim.client
            .post(sim.url("/oauth/authorize/decision"))
            .form(&[
                ("redirect_uri", REDIRECT),
                ("user", user_id.as_str()),
                ("scope", scope),
                ("decision", "approve"),
                ("vehicle", car.as_str()),
            ])
            .send()
    };
    let approved = decide("read_battery required:read_odometer").await.unwrap();
    assert_eq!(approved.status(), 302);
    let location = reqwest::Url::parse(header(&approved, "location")).unwrap();
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let token = access(&sim.exchange(&code).await);
    assert_eq!(
        sim.permissions(&car, &token).await["permissions"],
        json!(["read_battery", "read_odometer"])
    );
    assert_eq!(decide("read_minds").await.unwrap().status(), 400);

    // Without a scope the page says the default set applies, and lists it.
    let default_page = sim
        .client
        .get(sim.url("/oauth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", sim.cfg.client_id.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(default_page.contains("default set"), "{default_page}");
    assert!(default_page.contains("<code>read_engine_oil</code>"));
    sim.stop().await;
}

#[tokio::test]
async fn reauthentication_redirects_and_clears_the_account_fault() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let fleet = sim.fleet().await;
    let car = fleet["users"][0]["vehicles"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = fleet["users"][0]["vehicles"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let set = sim
        .set_fault(json!({"vehicle_id": car, "kind": "connected_services_account"}))
        .await;
    assert_eq!(set.status(), 200);
    assert_eq!(
        sim.set_fault(json!({"vehicle_id": other, "kind": "asleep"}))
            .await
            .status(),
        200
    );

    let broken = sim
        .get(&format!("/v2.0/vehicles/{car}/battery"), &token)
        .await;
    assert_eq!(broken.status(), 400);
    let body: Value = broken.json().await.unwrap();
    assert_eq!(body["type"], "CONNECTED_SERVICES_ACCOUNT", "{body}");
    assert_eq!(body["code"], "AUTHENTICATION_FAILED", "{body}");
    assert_eq!(body["statusCode"], 400);
    assert_eq!(body["resolution"]["type"], "REAUTHENTICATE", "{body}");
    let url = reqwest::Url::parse(body["resolution"]["url"].as_str().unwrap()).unwrap();
    assert_eq!(url.path(), "/oauth/reauthenticate");
    assert_eq!(format!("{}", url.origin().ascii_serialization()), sim.base);
    let params: std::collections::HashMap<String, String> =
        url.query_pairs().into_owned().collect();
    assert_eq!(params["response_type"], "vehicle_id");
    assert_eq!(params["client_id"], sim.cfg.client_id);
    assert_eq!(params["vehicle_id"], car);
    let v3 = sim
        .get(&format!("/v3/vehicles/{car}/signals"), &token)
        .await;
    assert_eq!(v3.status(), 400);
    let v3: Value = v3.json().await.unwrap();
    assert_eq!(v3["errors"][0]["code"], "AUTHENTICATION_FAILED");
    assert_eq!(v3["errors"][0]["resolution"], body["resolution"]);

    // The owner follows resolution.url, adding where to come back to.
    let mut follow = url.clone();
    follow
        .query_pairs_mut()
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "s 1&x");
    let redirected = sim.client.get(follow).send().await.unwrap();
    assert_eq!(redirected.status(), 302);
    let back = reqwest::Url::parse(header(&redirected, "location")).unwrap();
    assert!(back.as_str().starts_with(REDIRECT), "{back}");
    let back: std::collections::HashMap<String, String> = back.query_pairs().into_owned().collect();
    assert_eq!(back.len(), 2, "{back:?}");
    assert_eq!(back["vehicle_id"], car);
    assert_eq!(back["state"], "s 1&x");

    // Fixed, with the same token; the other car's (non-account) fault is untouched.
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{car}/battery"), &token)
            .await
            .status(),
        200
    );
    assert_eq!(
        sim.get(&format!("/v3/vehicles/{car}/signals"), &token)
            .await
            .status(),
        200
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{other}/battery"), &token)
            .await
            .status(),
        409
    );
    let stats = sim.stats().await;
    assert_eq!(stats["reauthentications"], 1, "{stats}");
    assert_eq!(
        stats["authorizations"], 1,
        "re-auth is not an authorization"
    );
    assert_eq!(stats["code_exchanges"], 1, "and issues no tokens");

    // A redirect URI with a query of its own gets `&`; no state, no state parameter.
    let again = sim
        .reauthenticate(&[
            ("response_type", "vehicle_id"),
            ("client_id", sim.cfg.client_id.as_str()),
            ("vehicle_id", car.as_str()),
            ("redirect_uri", "http://localhost:8000/back?from=sim"),
        ])
        .await;
    assert_eq!(again.status(), 302);
    assert_eq!(
        header(&again, "location"),
        format!("http://localhost:8000/back?from=sim&vehicle_id={car}")
    );
    assert_eq!(sim.stats().await["reauthentications"], 2);
    sim.stop().await;
}

#[tokio::test]
async fn reauthentication_validates_its_request() {
    let sim = spawn(stable_cfg()).await;
    let car = sim.first_car().await;
    let client_id = sim.cfg.client_id.clone();
    let good = [
        ("response_type", "vehicle_id"),
        ("client_id", client_id.as_str()),
        ("vehicle_id", car.as_str()),
        ("redirect_uri", REDIRECT),
        ("state", "s"),
    ];
    let without = |name: &str| -> Vec<(&str, &str)> {
        good.iter().copied().filter(|(k, _)| *k != name).collect()
    };
    let with = |name: &str, value: &'static str| -> Vec<(&str, &str)> {
        good.iter()
            .map(|&(k, v)| if k == name { (k, value) } else { (k, v) })
            .collect()
    };
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (with("response_type", "code"), "response_type"),
        (without("response_type"), "response_type"),
        (with("client_id", "someone-else"), "client_id"),
        (without("client_id"), "client_id"),
        (with("vehicle_id", "not-a-car"), "vehicle_id"),
        (without("vehicle_id"), "vehicle_id"),
        (without("redirect_uri"), "redirect_uri"),
        (with("redirect_uri", "/exchange"), "redirect_uri"),
    ];
    for (query, mentions) in cases {
        let response = sim.reauthenticate(&query).await;
        assert_eq!(response.status(), 400, "{query:?}");
        let text = response.text().await.unwrap();
        assert!(text.contains(mentions), "{query:?}: {text}");
    }
    assert_eq!(sim.stats().await["reauthentications"], 0);
    assert_eq!(sim.reauthenticate(&good).await.status(), 302);
    assert_eq!(sim.stats().await["reauthentications"], 1);
    sim.stop().await;
}

/// The `/v3/connections` pages from `first`, following `links.next`: every item, and the pages.
async fn all_connections(
    sim: &common::sim::TestSim,
    token: &str,
    first: &str,
) -> (Vec<Value>, Vec<Value>) {
    let (mut items, mut pages) = (Vec::new(), Vec::new());
    let mut next = Some(first.to_owned());
    while let Some(link) = next {
        assert!(link.starts_with("/v3/connections?"), "{link}");
        let page = sim.get_json(&link, token).await;
        items.extend(page["data"].as_array().unwrap().iter().cloned());
        next = page["links"]["next"].as_str().map(str::to_owned);
        pages.push(page);
        assert!(pages.len() < 20, "links.next never ends");
    }
    (items, pages)
}

#[tokio::test]
async fn connections_list_filters_and_pages_through_links() {
    let sim = spawn(SimulatorConfig {
        users: 3,
        vehicles_per_user: 3,
        powertrains: vec![Powertrain::Bev, Powertrain::Phev, Powertrain::Ice],
        ..stable_cfg()
    })
    .await;
    let users = sim.user_ids().await;
    for n in ["1", "2", "3"] {
        sim.code(&[("user", n)]).await;
    }
    let token = sim.app_token().await;
    let before = sim.stats().await;

    let (items, pages) = all_connections(&sim, &token, "/v3/connections?page[size]=2").await;
    assert_eq!(pages.len(), 5);
    assert_eq!(items.len(), 9);
    for (n, page) in pages.iter().enumerate() {
        let number = n + 1;
        assert_eq!(
            page["meta"],
            json!({"page": number, "pageSize": 2, "totalCount": 9})
        );
        let link = |p: usize| format!("/v3/connections?page[number]={p}&page[size]=2");
        assert_eq!(page["links"]["self"], link(number));
        assert_eq!(page["links"]["first"], link(1));
        assert_eq!(page["links"]["last"], link(5));
        let previous = (number > 1).then(|| link(number - 1));
        assert_eq!(page["links"]["previous"], json!(previous));
    }
    let fleet = sim.fleet().await;
    let mut ids = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let (u, v) = (i / 3, i % 3);
        let car = &fleet["users"][u]["vehicles"][v];
        assert!(is_uuid(item["id"].as_str().unwrap()), "{item}");
        assert!(ids.insert(item["id"].as_str().unwrap().to_owned()));
        assert_eq!(item["type"], "connection");
        assert_eq!(
            item["relationships"],
            json!({"vehicle": {"data": {"id": car["id"], "type": "vehicle"}},
                   "user": {"data": {"id": users[u], "type": "user"}}})
        );
        let vehicle = &item["attributes"]["vehicle"];
        assert_eq!(
            (
                &vehicle["make"],
                &vehicle["model"],
                &vehicle["year"],
                &vehicle["mode"]
            ),
            (
                &car["make"],
                &car["model"],
                &car["year"],
                &json!("simulated")
            )
        );
        assert!(["BEV", "PHEV", "ICE"].contains(&vehicle["powertrainType"].as_str().unwrap()));
        let permissions: Vec<&str> = item["attributes"]["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(permissions.join(" "), common::sim::FULL_SCOPE);
        let created = parse_iso_ms(item["meta"]["createdAt"].as_str().unwrap());
        assert!(created <= parse_iso_ms(item["meta"]["updatedAt"].as_str().unwrap()));
        // One connection by id.
        let one = sim
            .get_json(
                &format!("/v3/connections/{}", item["id"].as_str().unwrap()),
                &token,
            )
            .await;
        assert_eq!(one, json!({"data": item}));
    }
    let powertrains: HashSet<&str> = items
        .iter()
        .map(|i| {
            i["attributes"]["vehicle"]["powertrainType"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(powertrains.len(), 3);

    // Filters: by user (query, alias or header), by vehicle, by mode; they carry into the links.
    let (of_user2, pages) = all_connections(
        &sim,
        &token,
        &format!("/v3/connections?filter[userId]={}&page[size]=2", users[1]),
    )
    .await;
    assert_eq!(of_user2, items[3..6].to_vec());
    assert_eq!(
        pages[0]["links"]["next"],
        format!(
            "/v3/connections?page[number]=2&page[size]=2&filter[userId]={}",
            users[1]
        )
    );
    for alias in ["userId", "user_id"] {
        let page = sim
            .get_json(&format!("/v3/connections?{alias}={}", users[2]), &token)
            .await;
        assert_eq!(
            page["data"].as_array().unwrap(),
            &items[6..9].to_vec(),
            "{alias}"
        );
    }
    let by_header = sim.get_as("/v3/connections", &token, Some(&users[0])).await;
    assert_eq!(by_header.status(), 200);
    let by_header: Value = by_header.json().await.unwrap();
    assert_eq!(by_header["data"].as_array().unwrap(), &items[0..3].to_vec());
    let car = fleet["users"][1]["vehicles"][2]["id"].as_str().unwrap();
    for query in [
        format!("filter[vehicleId]={car}"),
        format!("vehicleId={car}"),
        format!("vehicle_id={car}"),
    ] {
        let page = sim
            .get_json(&format!("/v3/connections?{query}"), &token)
            .await;
        assert_eq!(page["data"], json!([items[5]]), "{query}");
        assert_eq!(page["meta"]["totalCount"], 1);
    }
    let simulated = sim
        .get_json(
            "/v3/connections?filter[mode]=simulated&pageSize=100",
            &token,
        )
        .await;
    assert_eq!(simulated["meta"]["totalCount"], 9);
    assert_eq!(simulated["links"]["next"], Value::Null);
    let live = sim.get_json("/v3/connections?mode=live", &token).await;
    assert_eq!(live["data"], json!([]));
    assert_eq!(live["meta"]["totalCount"], 0);
    let nobody = sim
        .get_json("/v3/connections?filter[userId]=nobody", &token)
        .await;
    assert_eq!(nobody["meta"]["totalCount"], 0);
    // Default page size 10, and `page` as an alias.
    let default = sim.get_json("/v3/connections?page=1", &token).await;
    assert_eq!(default["meta"]["pageSize"], 10);
    assert_eq!(default["data"].as_array().unwrap().len(), 9);

    // Bad paging, unknown ids, and user tokens.
    for query in [
        "page[size]=0",
        "page[size]=101",
        "pageSize=x",
        "page[number]=0",
        "filter[mode]=x",
    ] {
        let r = sim
            .get_as(&format!("/v3/connections?{query}"), &token, None)
            .await;
        let (status, kind, _) = v3_error(r).await;
        assert_eq!((status, kind.as_str()), (400, "VALIDATION"), "{query}");
    }
    let missing = sim.get_as("/v3/connections/nope", &token, None).await;
    let (status, kind, _) = v3_error(missing).await;
    assert_eq!((status, kind.as_str()), (404, "RESOURCE_NOT_FOUND"));
    let user_token = sim.connect("1").await;
    let (status, kind, _) = v3_error(sim.get("/v3/connections", &user_token).await).await;
    assert_eq!((status, kind.as_str()), (401, "AUTHENTICATION"));
    let id = items[0]["id"].as_str().unwrap();
    let by_id = sim.get(&format!("/v3/connections/{id}"), &user_token).await;
    assert_eq!(by_id.status(), 401);

    let after = sim.stats().await;
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    // 5 pages + 9 by id + 2 + 2 + 1 + 3 + 4 + 5 bad + 1 unknown id + 2 with a user token; none
    // is a vehicle request.
    assert_eq!(delta("connections_requests"), 34, "{after}");
    assert_eq!(delta("v3_requests"), 0, "{after}");
    assert_eq!(delta("user_tokens_on_v3"), 2, "{after}");
    sim.stop().await;
}

#[tokio::test]
async fn connections_are_neither_rate_limited_nor_faulted() {
    let sim = spawn(SimulatorConfig {
        app_rate_limit: true,
        faults: vec![(None, faults::Fault::new(faults::FaultKind::Server))],
        ..stable_cfg()
    })
    .await;
    sim.code(&[("user", "1")]).await;
    let token = sim.app_token().await;
    for _ in 0..130 {
        assert_eq!(
            sim.get_as("/v3/connections", &token, None).await.status(),
            200
        );
    }
    let stats = sim.stats().await;
    assert_eq!(stats["app_rate_limited"], 0, "{stats}");
    assert_eq!(stats["faults_served"], 0, "{stats}");
    assert_eq!(stats["connections_requests"], 130, "{stats}");
    sim.stop().await;
}

#[tokio::test]
async fn the_connect_redirect_carries_user_id_and_can_leave_out_the_code() {
    let sim = spawn(stable_cfg()).await;
    let users = sim.user_ids().await;
    let query_of = |r: &reqwest::Response| -> Vec<(String, String)> {
        reqwest::Url::parse(header(r, "location"))
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect()
    };
    let r = sim.authorize(&[("user", "1"), ("state", "s1")]).await;
    let keys: Vec<String> = query_of(&r).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["code", "user_id", "state"]);
    assert!(query_of(&r).contains(&("user_id".to_owned(), users[0].clone())));
    sim.stop().await;

    let sim = spawn(SimulatorConfig {
        redirect_without_code: true,
        users: 2,
        ..stable_cfg()
    })
    .await;
    let users = sim.user_ids().await;
    let r = sim.authorize(&[("user", "2"), ("state", "s2")]).await;
    assert_eq!(r.status(), 302);
    assert_eq!(
        query_of(&r),
        vec![
            ("user_id".to_owned(), users[1].clone()),
            ("state".to_owned(), "s2".to_owned())
        ]
    );
    // No code, but the approval made the connections: the app token reads the user's car.
    let token = sim.app_token().await;
    let cars = sim.cars_of(1).await;
    let path = format!("/v3/vehicles/{}/signals", cars[0]);
    assert_eq!(
        sim.get_as(&path, &token, Some(&users[1])).await.status(),
        200
    );
    let listed = sim
        .get_json(
            &format!("/v3/connections?filter[userId]={}", users[1]),
            &token,
        )
        .await;
    assert_eq!(listed["meta"]["totalCount"], 2);
    assert_eq!(sim.stats().await["code_exchanges"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn the_consent_page_connects_only_the_chosen_vehicles_and_redirects_with_user_id() {
    let sim = spawn(SimulatorConfig {
        consent: true,
        ..stable_cfg()
    })
    .await;
    let user = sim.user_ids().await[0].clone();
    let cars = sim.cars_of(0).await;
    let page = sim.authorize(&[("user", "1"), ("state", "st")]).await;
    assert_eq!(page.status(), 200);
    let decision = sim
        .client
        .post(sim.url("/oauth/authorize/decision"))
        .form(&[
            ("redirect_uri", REDIRECT),
            ("state", "st"),
            ("user", user.as_str()),
            ("vehicle", cars[1].as_str()),
            ("decision", "approve"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(decision.status(), 302);
    let location = reqwest::Url::parse(header(&decision, "location")).unwrap();
    let keys: Vec<String> = location
        .query_pairs()
        .map(|(k, _)| k.into_owned())
        .collect();
    assert_eq!(keys, ["code", "user_id", "state"]);
    assert!(location
        .query_pairs()
        .any(|(k, v)| k == "user_id" && v == user.as_str()));
    let token = sim.app_token().await;
    let listed = sim.get_json("/v3/connections", &token).await;
    assert_eq!(listed["meta"]["totalCount"], 1);
    assert_eq!(
        listed["data"][0]["relationships"]["vehicle"]["data"]["id"],
        cars[1].as_str()
    );
    let unchosen = format!("/v3/vehicles/{}", cars[0]);
    let (status, _, code) = v3_error(sim.get_as(&unchosen, &token, Some(&user)).await).await;
    assert_eq!((status, code.as_str()), (403, "ACCESS_DENIED"));
    sim.stop().await;
}

#[tokio::test]
async fn revoking_removes_connections_until_the_user_approves_again() {
    let sim = spawn(SimulatorConfig {
        users: 2,
        ..stable_cfg()
    })
    .await;
    let users = sim.user_ids().await;
    let (cars1, cars2) = (sim.cars_of(0).await, sim.cars_of(1).await);
    sim.code(&[("user", "1")]).await;
    let user2_token = sim.connect("2").await;
    let token = sim.app_token().await;
    let count = |page: Value| page["meta"]["totalCount"].as_u64().unwrap();
    let of = |user: &str| format!("/v3/connections?filter[userId]={user}");
    assert_eq!(count(sim.get_json("/v3/connections", &token).await), 4);

    assert_eq!(sim.revoke(json!({"user": users[0]})).await.status(), 200);
    assert_eq!(count(sim.get_json(&of(&users[0]), &token).await), 0);
    assert_eq!(count(sim.get_json(&of(&users[1]), &token).await), 2);
    let signals = |car: &str| format!("/v3/vehicles/{car}/signals");
    let denied = sim
        .get_as(&signals(&cars1[0]), &token, Some(&users[0]))
        .await;
    let (status, kind, code) = v3_error(denied).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (403, "AUTHENTICATION", "ACCESS_DENIED")
    );
    assert_eq!(
        sim.get_as(&signals(&cars2[0]), &token, Some(&users[1]))
            .await
            .status(),
        200
    );
    assert_eq!(sim.stats().await["revoked_user_requests"], 1);

    // A new approval restores them, with the same ids.
    sim.code(&[("user", "1")]).await;
    assert_eq!(count(sim.get_json(&of(&users[0]), &token).await), 2);
    assert_eq!(
        sim.get_as(&signals(&cars1[0]), &token, Some(&users[0]))
            .await
            .status(),
        200
    );

    // One vehicle: only that connection goes; the owner's other car stays, for both tokens.
    let r = sim.revoke(json!({"vehicle_id": cars2[0]})).await;
    assert_eq!(r.status(), 200);
    let left = sim.get_json(&of(&users[1]), &token).await;
    assert_eq!(count(left.clone()), 1);
    assert_eq!(
        left["data"][0]["relationships"]["vehicle"]["data"]["id"],
        cars2[1].as_str()
    );
    let (status, _, code) = v3_error(
        sim.get_as(&signals(&cars2[0]), &token, Some(&users[1]))
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "ACCESS_DENIED"));
    assert_eq!(
        sim.get_as(&signals(&cars2[1]), &token, Some(&users[1]))
            .await
            .status(),
        200
    );
    assert_eq!(
        sim.get(&signals(&cars2[0]), &user2_token).await.status(),
        401
    );
    assert_eq!(
        sim.get(&signals(&cars2[1]), &user2_token).await.status(),
        200
    );
    let stats = sim.stats().await;
    assert_eq!(stats["revoked_user_requests"], 2, "{stats}");
    assert_eq!(stats["revoked_token_uses"], 1, "{stats}");
    sim.code(&[("user", "2")]).await;
    assert_eq!(count(sim.get_json(&of(&users[1]), &token).await), 2);
    sim.stop().await;
}

/// A signal item of a `/signals` page by code.
fn item<'a>(page: &'a Value, code: &str) -> &'a Value {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == code)
        .unwrap_or_else(|| panic!("{code} not on the page"))
}

#[tokio::test]
async fn signal_options_shape_the_v3_answers_and_stay_out_of_the_served_log() {
    let base = spawn(SimulatorConfig {
        users: 1,
        vehicles_per_user: 2,
        ..stable_cfg()
    })
    .await;
    let cars = base.cars_of(0).await;
    base.stop().await;
    let sim = spawn(SimulatorConfig {
        vehicles_per_user: 2,
        empty_signals: vec![cars[1].clone()],
        unavailable_signals: vec!["tractionbattery-range".into()],
        null_signals: vec![
            "odometer-traveleddistance".into(),
            "tractionbattery-nominalcapacity".into(),
            "location-preciselocation".into(),
        ],
        locked_groups: vec!["charge".into()],
        iso_timestamps: true,
        ..stable_cfg()
    })
    .await;
    let token = sim.connect("1").await;
    let page = sim
        .get_json(
            &format!("/v3/vehicles/{}/signals?pageSize=100", cars[0]),
            &token,
        )
        .await;

    let range = &item(&page, "tractionbattery-range")["attributes"];
    assert_eq!(range["status"], json!({"value": "UNAVAILABLE"}));
    assert!(range.get("body").is_none(), "{range}");
    let odometer = &item(&page, "odometer-traveleddistance")["attributes"];
    assert_eq!(odometer["status"], json!({"value": "SUCCESS"}));
    assert_eq!(
        odometer["body"],
        json!({"unit": "kilometers", "value": null})
    );
    let capacity = &item(&page, "tractionbattery-nominalcapacity")["attributes"];
    assert_eq!(capacity["body"], json!({"unit": "kWh", "value": null}));
    let location = &item(&page, "location-preciselocation")["attributes"];
    assert_eq!(location["body"], json!({"value": null}));
    for code in [
        "charge-ischarging",
        "charge-detailedchargingstatus",
        "charge-chargelimits",
    ] {
        let charge = &item(&page, code)["attributes"];
        assert_eq!(
            charge["status"],
            json!({"value": "ERROR", "error": {"type": "BILLING", "code": "INVALID_PLAN"}}),
            "{code}"
        );
        assert!(charge.get("body").is_none(), "{code}");
    }
    let soc = item(&page, "tractionbattery-stateofcharge");
    assert_eq!(soc["attributes"]["status"]["value"], "SUCCESS");
    // ISO-8601 timestamps.
    let retrieved = parse_iso_ms(soc["meta"]["retrievedAt"].as_str().unwrap());
    let updated = parse_iso_ms(soc["meta"]["oemUpdatedAt"].as_str().unwrap());
    assert!(updated <= retrieved);
    // Single signals answer the same items.
    let single = sim
        .get_json(
            &format!("/v3/vehicles/{}/signals/charge-ischarging", cars[0]),
            &token,
        )
        .await;
    assert_eq!(
        single["attributes"]["status"]["error"]["code"],
        "INVALID_PLAN"
    );
    let single = sim
        .get_json(
            &format!("/v3/vehicles/{}/signals/odometer-traveleddistance", cars[0]),
            &token,
        )
        .await;
    assert_eq!(single["attributes"]["body"]["value"], Value::Null);
    // Nothing withheld reached the served log: the battery reading lost its range, the charge
    // group is locked, the odometer was null.
    assert_eq!(
        sim.served(&cars[0]).await,
        json!({"battery": [], "charge": [], "odometer": []})
    );

    // The empty car: 200 with no data and no `included`; its vehicle object still answers.
    let empty = sim
        .get_json(&format!("/v3/vehicles/{}/signals", cars[1]), &token)
        .await;
    assert_eq!(empty["data"], json!([]));
    assert_eq!(
        empty["meta"],
        json!({"page": 1, "pageSize": 10, "totalCount": 0})
    );
    assert!(empty.get("included").is_none(), "{empty}");
    assert_eq!(empty["links"]["next"], Value::Null);
    assert_eq!(
        empty["links"]["self"],
        format!("/vehicles/{}/signals?page=1&pageSize=10", cars[1])
    );
    let vehicle = sim.get(&format!("/v3/vehicles/{}", cars[1]), &token).await;
    assert_eq!(vehicle.status(), 200);
    let one = sim
        .get(
            &format!(
                "/v3/vehicles/{}/signals/tractionbattery-stateofcharge",
                cars[1]
            ),
            &token,
        )
        .await;
    let (status, kind, code) = v3_error(one).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (404, "RESOURCE_NOT_FOUND", "SIGNAL_NOT_FOUND")
    );
    assert_eq!(
        sim.served(&cars[1]).await,
        json!({"battery": [], "charge": [], "odometer": []})
    );
    sim.stop().await;

    // "all" empties every car.
    let all = spawn(SimulatorConfig {
        empty_signals: vec!["all".into()],
        ..stable_cfg()
    })
    .await;
    let token = all.connect("1").await;
    for car in all.cars_of(0).await {
        let page = all
            .get_json(&format!("/v3/vehicles/{car}/signals"), &token)
            .await;
        assert_eq!(page["meta"]["totalCount"], 0);
    }
    all.stop().await;
}

#[tokio::test]
async fn v3_distances_follow_the_unit_and_timestamps_default_to_epoch_ms() {
    for (unit, per_km) in [("kilometers", 1.0), ("km", 1.0), ("miles", 1.0 / 1.609_344)] {
        let sim = spawn(SimulatorConfig {
            distance_unit: unit.into(),
            ..stable_cfg()
        })
        .await;
        let token = sim.connect("1").await;
        let car = sim.first_car().await;
        let page = sim
            .get_json(&format!("/v3/vehicles/{car}/signals?pageSize=100"), &token)
            .await;
        let odometer = item(&page, "odometer-traveleddistance");
        assert_eq!(odometer["attributes"]["body"]["unit"], unit);
        let range = &item(&page, "tractionbattery-range")["attributes"]["body"];
        assert_eq!(range["unit"], unit);
        assert!(odometer["meta"]["oemUpdatedAt"].is_i64(), "{odometer}");
        assert!(odometer["meta"]["retrievedAt"].is_i64(), "{odometer}");
        let served = sim.served(&car).await;
        let km = served["odometer"][0]["odometer_km"].as_f64().unwrap();
        let value = odometer["attributes"]["body"]["value"].as_f64().unwrap();
        assert!(
            (value - km * per_km).abs() < 1e-9,
            "{unit}: {value} vs {km} km"
        );
        let range_km = served["battery"][0]["range_km"].as_f64().unwrap();
        assert!((range["value"].as_f64().unwrap() - range_km * per_km).abs() < 1e-9);
        assert_eq!(range["additionalValues"][0]["value"], range["value"]);
        sim.stop().await;
    }
    let bad = SimulatorConfig {
        distance_unit: "parsecs".into(),
        ..stable_cfg()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve(listener, bad, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("distance_unit"), "{err:#}");
}

#[tokio::test]
async fn the_upstream_rate_limit_fault_is_a_502_without_retry_after() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let car = sim.first_car().await;
    let set = sim
        .set_fault(json!({"vehicle_id": car, "kind": "upstream_rate_limit", "count": 2}))
        .await;
    assert_eq!(set.status(), 200);
    let v2 = sim
        .get(&format!("/v2.0/vehicles/{car}/odometer"), &token)
        .await;
    assert_eq!(v2.status(), 502);
    assert!(v2.headers().get("retry-after").is_none());
    let body: Value = v2.json().await.unwrap();
    assert_eq!(
        (&body["type"], &body["code"]),
        (&json!("UPSTREAM"), &json!("RATE_LIMIT"))
    );
    assert_eq!(body["statusCode"], 502);
    let v3 = sim
        .get(&format!("/v3/vehicles/{car}/signals"), &token)
        .await;
    assert!(v3.headers().get("retry-after").is_none());
    let (status, kind, code) = v3_error(v3).await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (502, "UPSTREAM", "RATE_LIMIT")
    );
    assert_eq!(
        sim.get(&format!("/v2.0/vehicles/{car}/odometer"), &token)
            .await
            .status(),
        200
    );
    assert_eq!(sim.stats().await["faults_served"], 2);
    sim.stop().await;
    // And from the command line.
    let (vehicle, fault) = faults::parse_spec("upstream_rate_limit*1").unwrap();
    assert_eq!(
        (vehicle, fault.kind, fault.count),
        (None, faults::FaultKind::UpstreamRateLimit, Some(1))
    );
}

#[test]
fn the_v3_flags_reach_the_config() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimulatorArgs,
    }
    let defaults = SimulatorConfig::default();
    assert_eq!(
        (
            defaults.api_client_id.as_str(),
            defaults.api_client_secret.as_str()
        ),
        ("carpulse-demo-api", "carpulse-demo-api-secret")
    );
    assert_eq!(defaults.app_token_lifetime, Duration::from_secs(3600));
    assert_eq!(defaults.v3_auth, V3Auth::Both);
    assert_eq!(defaults.distance_unit, "kilometers");
    assert!(!format!("{defaults:?}").contains("carpulse-demo-api-secret"));
    let args = Cli::parse_from([
        "simulator",
        "--api-client-id",
        "client_x",
        "--api-client-secret",
        "s3cret",
        "--app-token-lifetime",
        "60",
        "--v3-auth",
        "app",
        "--redirect-without-code",
        "--empty-signals",
        "a,b",
        "--unavailable-signals",
        "tractionbattery-range,Charge-IsCharging",
        "--null-signals",
        "odometer-traveleddistance",
        "--locked-groups",
        "charge,Location",
        "--iso-timestamps",
        "--distance-unit",
        "miles",
    ])
    .sim;
    assert!(!format!("{args:?}").contains("s3cret"));
    let cfg = args.to_config();
    assert!(!format!("{cfg:?}").contains("s3cret"));
    assert_eq!(
        (cfg.api_client_id.as_str(), cfg.api_client_secret.as_str()),
        ("client_x", "s3cret")
    );
    assert_eq!(cfg.app_token_lifetime, Duration::from_secs(60));
    assert_eq!(cfg.v3_auth, V3Auth::App);
    assert!(cfg.redirect_without_code && cfg.iso_timestamps);
    assert_eq!(cfg.empty_signals, ["a", "b"]);
    assert_eq!(
        cfg.unavailable_signals,
        ["tractionbattery-range", "charge-ischarging"]
    );
    assert_eq!(cfg.null_signals, ["odometer-traveleddistance"]);
    assert_eq!(cfg.locked_groups, ["charge", "location"]);
    assert_eq!(cfg.distance_unit, "miles");
    assert_eq!(
        Cli::parse_from(["simulator", "--empty-signals", "all"])
            .sim
            .to_config()
            .empty_signals,
        ["all"]
    );
    for bad in [
        ["--v3-auth", "nobody"],
        ["--locked-groups", "warp"],
        ["--null-signals", "odometer-bogus"],
        ["--unavailable-signals", "x"],
        ["--distance-unit", "parsecs"],
        ["--app-token-lifetime", "0"],
    ] {
        assert!(
            Cli::try_parse_from(["simulator", bad[0], bad[1]]).is_err(),
            "{bad:?}"
        );
    }
    let Err(help) = Cli::try_parse_from(["simulator", "--help"]) else {
        panic!("--help parsed as arguments");
    };
    let help = help.to_string();
    for needle in [
        "--api-client-id",
        "--v3-auth",
        "--empty-signals",
        "--locked-groups",
        "--distance-unit",
        "/v3/connections",
        "upstream_rate_limit",
        "missing userId",
    ] {
        assert!(help.contains(needle), "{needle} not in --help");
    }
}

#[tokio::test]
async fn stats_count_requests_by_api_and_every_new_counter_is_reported() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let car = sim.first_car().await;
    sim.get(&format!("/v2.0/vehicles/{car}/odometer"), &token)
        .await;
    sim.get("/v2.0/nowhere", &token).await;
    sim.get(&format!("/v3/vehicles/{car}"), &token).await;
    let stats = sim.stats().await;
    assert_eq!(stats["v2_requests"], 2, "{stats}");
    assert_eq!(stats["v3_requests"], 1, "{stats}");
    for key in [
        "v2_requests",
        "v3_requests",
        "missing_user_id",
        "wrong_user_id",
        "revoked_user_requests",
        "user_tokens_on_v3",
        "app_tokens_issued",
        "app_token_expired_uses",
        "connections_requests",
        "requests",
        "authorizations",
        "refreshes",
        "revoked_token_uses",
        "permission_denied",
    ] {
        assert!(stats[key].is_u64(), "{key}: {stats}");
    }
    sim.stop().await;
}

/// `retrievedAt` is the time of the answer: two requests differ in it and nothing else.
fn without_retrieved_at(mut value: Value) -> Value {
    match &mut value {
        Value::Object(map) => {
            map.remove("retrievedAt");
            for v in map.values_mut() {
                *v = without_retrieved_at(v.take());
            }
        }
        Value::Array(items) => {
            for v in items.iter_mut() {
                *v = without_retrieved_at(v.take());
            }
        }
        _ => {}
    }
    value
}

/// Smartcar's official SDKs ask some resources with a trailing slash (Python
/// `Vehicle.attributes()` → `/v2.0/vehicles/{id}/`; Node `getUser()` → `/v2.0/user/`,
/// `getVehicles()` → `/v2.0/vehicles/`, `getVehicle()` → `/v3/vehicles/{id}/`), which Smartcar
/// serves: every route answers them exactly like the plain path, query included.
#[tokio::test]
async fn a_trailing_slash_answers_like_the_plain_path() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let car = sim.first_car().await;
    let paths = [
        "/v2.0/user".to_owned(),
        "/v2.0/vehicles".to_owned(),
        "/v2.0/vehicles?limit=1&offset=1".to_owned(),
        format!("/v2.0/vehicles/{car}"),
        format!("/v2.0/vehicles/{car}/odometer"),
        format!("/v2.0/vehicles/{car}/battery/capacity"),
        format!("/v2.0/vehicles/{car}/permissions?limit=2&offset=1"),
        format!("/v3/vehicles/{car}"),
        format!("/v3/vehicles/{car}/signals?pageSize=3"),
        format!("/v3/vehicles/{car}/signals/odometer-traveleddistance"),
    ];
    for plain in &paths {
        let slashed = match plain.split_once('?') {
            Some((path, query)) => format!("{path}/?{query}"),
            None => format!("{plain}/"),
        };
        let a = sim.get(plain, &token).await;
        let b = sim.get(&slashed, &token).await;
        let statuses = (a.status().as_u16(), b.status().as_u16());
        assert_eq!(statuses, (200, 200), "{plain} vs {slashed}");
        let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
        assert_eq!(
            without_retrieved_at(a),
            without_retrieved_at(b),
            "{slashed}"
        );
    }

    // POST routes too: the batch and the token endpoint.
    let batch = sim
        .client
        .post(sim.url(&format!("/v2.0/vehicles/{car}/batch/")))
        .bearer_auth(&token)
        .json(&json!({"requests": [{"path": "/odometer"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 200);
    let body: Value = batch.json().await.unwrap();
    assert_eq!(body["responses"][0]["code"], 200);
    let code = sim.code(&[]).await;
    let exchanged = sim
        .client
        .post(sim.url("/oauth/token/"))
        .header("authorization", sim.basic())
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(exchanged.status(), 200);

    // An unknown path stays Smartcar's 404 with or without the slash; so does the bare root.
    for path in [
        "/v2.0/nowhere/",
        format!("/v2.0/vehicles/{car}/nowhere/").as_str(),
    ] {
        let response = sim.get(path, &token).await;
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (&body["type"], &body["code"]),
            (&json!("RESOURCE_NOT_FOUND"), &json!("PATH"))
        );
    }
    assert_eq!(sim.get("/", &token).await.status(), 404);
    sim.stop().await;
}

/// Every successful batch item carries `headers` (smartcar-api.md §2.3), `{}` when it has no data
/// headers (`/permissions`): the official Python SDK's `Vehicle.batch()` reads them unguarded.
/// Failed items may omit them, as Smartcar's do.
#[tokio::test]
async fn every_successful_batch_item_has_headers() {
    let sim = spawn(stable_cfg()).await;
    let token = sim.connect("1").await;
    let car = sim.first_car().await;
    let items = sim
        .batch(&car, &token, &["/permissions", "/odometer", "/nowhere"])
        .await;
    assert_eq!(items[0]["code"], 200);
    assert_eq!(items[0]["headers"], json!({}));
    assert_eq!(items[1]["headers"]["sc-unit-system"], "metric");
    assert_eq!(items[2]["code"], 404);
    assert!(items[2].get("headers").is_none());
    sim.stop().await;
}

/// A Management API request (smartcar-api.md §7): `Authorization: Basic base64(credentials)`
/// when given, e.g. `default:amt`.
async fn management(
    sim: &common::sim::TestSim,
    method: reqwest::Method,
    query: &str,
    credentials: Option<&str>,
) -> reqwest::Response {
    let mut request = sim.client.request(
        method,
        sim.url(&format!("/v2.0/management/connections{query}")),
    );
    if let Some(credentials) = credentials {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        request = request.header("authorization", format!("Basic {encoded}"));
    }
    request.send().await.unwrap()
}

/// A Management API answer that must be 200 (with a UUID `sc-request-id`): its body.
async fn management_ok(sim: &common::sim::TestSim, method: reqwest::Method, query: &str) -> Value {
    let response = management(sim, method.clone(), query, Some("default:amt")).await;
    assert_eq!(response.status(), 200, "{method} {query}");
    assert!(is_uuid(header(&response, "sc-request-id")));
    response.json().await.unwrap()
}

/// A v2 error object (§4.1) with a UUID request id matching `sc-request-id`: (status, type).
async fn v2_error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let request_id = header(&response, "sc-request-id").to_owned();
    assert!(is_uuid(&request_id));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["statusCode"], status, "{body}");
    assert_eq!(body["requestId"], request_id, "{body}");
    assert!(
        body["description"].is_string() && body["docURL"].is_string(),
        "{body}"
    );
    (status, body["type"].as_str().unwrap().to_owned())
}

/// The (userId, vehicleId) of each listed or deleted connection.
fn pairs_of(body: &Value) -> Vec<(String, String)> {
    body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["userId"].as_str().unwrap().to_owned(),
                c["vehicleId"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn management_api_lists_by_cursor_filters_and_deletes_connections() {
    use reqwest::Method;
    let sim = spawn(SimulatorConfig {
        users: 3,
        vehicles_per_user: 3,
        management_token: "amt".to_owned(),
        ..stable_cfg()
    })
    .await;
    let users = sim.user_ids().await;
    let fleet = sim.fleet().await;
    let pair = |u: usize, v: usize| {
        (
            users[u].clone(),
            fleet["users"][u]["vehicles"][v]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    // Users 1, 2, 3 connect in turn, milliseconds apart.
    let mut tokens = Vec::new();
    for n in ["1", "2", "3"] {
        tokens.push(sim.connect(n).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Newest first: user 3's cars, then 2's, then 1's; one approval's cars in fleet order.
    let newest_first: Vec<(String, String)> = [2, 1, 0]
        .into_iter()
        .flat_map(|u| (0..3).map(move |v| (u, v)))
        .map(|(u, v)| pair(u, v))
        .collect();
    let before = sim.stats().await;

    // The default page (10) holds all nine; the SDKs' trailing slash is served too.
    let all = management_ok(&sim, Method::GET, "").await;
    assert_eq!(pairs_of(&all), newest_first);
    assert_eq!(all["paging"], json!({"cursor": null}));
    let mut last = i64::MAX;
    for c in all["connections"].as_array().unwrap() {
        let keys: HashSet<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            HashSet::from(["userId", "vehicleId", "connectedAt", "mode"])
        );
        assert_eq!(c["mode"], "simulated");
        let at = parse_iso_ms(c["connectedAt"].as_str().unwrap());
        assert!(at <= last, "not newest first: {all}");
        last = at;
    }
    assert_eq!(management_ok(&sim, Method::GET, "/").await, all);

    // Paging by cursor: 4 + 4 + 1, the last page without a cursor.
    let mut listed = Vec::new();
    let mut query = "?limit=4".to_owned();
    let mut sizes = Vec::new();
    loop {
        let page = management_ok(&sim, Method::GET, &query).await;
        sizes.push(page["connections"].as_array().unwrap().len());
        listed.extend(pairs_of(&page));
        match page["paging"]["cursor"].as_str() {
            Some(cursor) => query = format!("?limit=4&cursor={cursor}"),
            None => break,
        }
        assert!(sizes.len() < 10, "the cursor never ends");
    }
    assert_eq!(sizes, [4, 4, 1]);
    assert_eq!(listed, newest_first);
    // Exactly a full last page: no cursor either.
    let full = management_ok(&sim, Method::GET, "?limit=9").await;
    assert_eq!(full["paging"]["cursor"], Value::Null);

    // Filters: user, vehicle, both, mode; they combine with paging.
    let of_user2 = management_ok(&sim, Method::GET, &format!("?user_id={}", users[1])).await;
    assert_eq!(pairs_of(&of_user2), newest_first[3..6]);
    let (_, car_1_2) = pair(0, 1);
    let one = management_ok(&sim, Method::GET, &format!("?vehicle_id={car_1_2}")).await;
    assert_eq!(pairs_of(&one), [pair(0, 1)]);
    let crossed = format!("?user_id={}&vehicle_id={car_1_2}", users[1]);
    assert_eq!(
        pairs_of(&management_ok(&sim, Method::GET, &crossed).await),
        []
    );
    let simulated = management_ok(&sim, Method::GET, "?mode=simulated&limit=100").await;
    assert_eq!(pairs_of(&simulated), newest_first);
    for query in [
        "?mode=live",
        "?mode=test",
        "?user_id=nobody",
        "?vehicle_id=nothing",
    ] {
        let body = management_ok(&sim, Method::GET, query).await;
        assert_eq!(
            body,
            json!({"connections": [], "paging": {"cursor": null}}),
            "{query}"
        );
    }
    let first = management_ok(&sim, Method::GET, &format!("?user_id={}&limit=2", users[2])).await;
    assert_eq!(pairs_of(&first), newest_first[0..2]);
    let cursor = first["paging"]["cursor"].as_str().unwrap();
    let rest = format!("?user_id={}&limit=2&cursor={cursor}", users[2]);
    let rest = management_ok(&sim, Method::GET, &rest).await;
    assert_eq!(pairs_of(&rest), newest_first[2..3]);
    assert_eq!(rest["paging"]["cursor"], Value::Null);

    // Bad parameters: 400 VALIDATION in the v2 error object.
    for query in [
        "?limit=0",
        "?limit=101",
        "?limit=x",
        "?cursor=garbage",
        "?mode=x",
    ] {
        let r = management(&sim, Method::GET, query, Some("default:amt")).await;
        assert_eq!(v2_error(r).await, (400, "VALIDATION".to_owned()), "{query}");
    }
    // Authentication: Basic base64("default:" + AMT) only (the docs' example: AMT `amt`).
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode("default:amt"),
        "ZGVmYXVsdDphbXQ="
    );
    for credentials in [None, Some("default:wrong"), Some("admin:amt"), Some("amt")] {
        let r = management(&sim, Method::GET, "", credentials).await;
        assert_eq!(
            v2_error(r).await,
            (401, "AUTHENTICATION".to_owned()),
            "{credentials:?}"
        );
    }
    let bearer = sim
        .client
        .get(sim.url("/v2.0/management/connections"))
        .bearer_auth(&tokens[0])
        .send()
        .await
        .unwrap();
    assert_eq!(v2_error(bearer).await, (401, "AUTHENTICATION".to_owned()));
    let r = management(
        &sim,
        Method::DELETE,
        &format!("?user_id={}", users[0]),
        None,
    )
    .await;
    assert_eq!(r.status(), 401);
    // 27 management requests so far, none a v2 vehicle request.
    let after = sim.stats().await;
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("management_requests"), 27, "{after}");
    assert_eq!(delta("v2_requests"), 0, "{after}");

    // A cursor holds its place across a deletion, even of the connection it points at.
    let page1 = management_ok(&sim, Method::GET, "?limit=4").await;
    assert_eq!(pairs_of(&page1), newest_first[0..4]);
    let (_, car_2_1) = pair(1, 0);
    let deleted = management_ok(&sim, Method::DELETE, &format!("?vehicle_id={car_2_1}")).await;
    assert_eq!(
        deleted,
        json!({"connections": [{"userId": users[1], "vehicleId": car_2_1}]})
    );
    let cursor = page1["paging"]["cursor"].as_str().unwrap();
    let page2 = management_ok(&sim, Method::GET, &format!("?limit=4&cursor={cursor}")).await;
    assert_eq!(pairs_of(&page2), newest_first[4..8]);

    // A deleted connection is revoked: its owner's token gets 401 on that car only, v2 no longer
    // lists it, nor does /v3/connections, and the application token is refused on it.
    let token2 = &tokens[1];
    let odometer = |car: &str| format!("/v2.0/vehicles/{car}/odometer");
    assert_eq!(sim.get(&odometer(&car_2_1), token2).await.status(), 401);
    assert_eq!(
        sim.get(&odometer(&pair(1, 1).1), token2).await.status(),
        200
    );
    assert_eq!(sim.vehicle_ids(token2).await, [pair(1, 1).1, pair(1, 2).1]);
    let app = sim.app_token().await;
    let v3 = sim.get_json("/v3/connections?page[size]=100", &app).await;
    assert_eq!(v3["meta"]["totalCount"], 8);
    let denied = sim
        .get_as(&format!("/v3/vehicles/{car_2_1}"), &app, Some(&users[1]))
        .await;
    assert_eq!(denied.status(), 403);

    // DELETE by user: all of their connections, newest first; again: nothing left to delete.
    let by_user = format!("?user_id={}", users[2]);
    let deleted = management_ok(&sim, Method::DELETE, &by_user).await;
    assert_eq!(pairs_of(&deleted), newest_first[0..3]);
    assert_eq!(
        management_ok(&sim, Method::DELETE, &by_user).await,
        json!({"connections": []})
    );
    for query in ["?user_id=nobody", "?vehicle_id=nothing"] {
        let body = management_ok(&sim, Method::DELETE, query).await;
        assert_eq!(body, json!({"connections": []}), "{query}");
    }
    let both = format!("?user_id={}&vehicle_id={}", users[0], pair(0, 0).1);
    for query in [both.as_str(), "", "?mode=simulated"] {
        let r = management(&sim, Method::DELETE, query, Some("default:amt")).await;
        assert_eq!(v2_error(r).await, (400, "VALIDATION".to_owned()), "{query}");
    }
    // The simulator's own revoke shows the same way.
    assert_eq!(sim.revoke(json!({"user": 1})).await.status(), 200);
    let left = management_ok(&sim, Method::GET, "").await;
    assert_eq!(pairs_of(&left), newest_first[4..6]);

    // A new Connect approval brings user 3's connections back, now the newest.
    sim.connect("3").await;
    let back = management_ok(&sim, Method::GET, "").await;
    let mut expected = newest_first[0..3].to_vec();
    expected.extend_from_slice(&newest_first[4..6]);
    assert_eq!(pairs_of(&back), expected);
    assert!(
        parse_iso_ms(back["connections"][0]["connectedAt"].as_str().unwrap())
            > parse_iso_ms(all["connections"][0]["connectedAt"].as_str().unwrap())
    );
    sim.stop().await;
}

#[tokio::test]
async fn management_api_is_neither_rate_limited_nor_faulted_nor_delayed() {
    let sim = spawn(SimulatorConfig {
        app_rate_limit: true,
        latency: Some((Duration::from_secs(5), Duration::from_secs(5))),
        faults: vec![(None, faults::Fault::new(faults::FaultKind::Server))],
        ..stable_cfg()
    })
    .await;
    sim.code(&[("user", "1")]).await;
    let started = std::time::Instant::now();
    for _ in 0..130 {
        let r = management(
            &sim,
            reqwest::Method::GET,
            "",
            Some("default:carpulse-demo-amt"),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let stats = sim.stats().await;
    assert_eq!(stats["app_rate_limited"], 0, "{stats}");
    assert_eq!(stats["faults_served"], 0, "{stats}");
    assert_eq!(stats["management_requests"], 130, "{stats}");
    assert_eq!(stats["v2_requests"], 0, "{stats}");
    sim.stop().await;
}

#[test]
fn the_management_token_flag_reaches_the_config_and_never_a_log_line() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimulatorArgs,
    }
    let defaults = SimulatorConfig::default();
    assert_eq!(defaults.management_token, "carpulse-demo-amt");
    assert!(!format!("{defaults:?}").contains("carpulse-demo-amt"));
    let args = Cli::parse_from(["simulator", "--management-token", "amt-s3cret"]).sim;
    let cfg = args.to_config();
    assert_eq!(cfg.management_token, "amt-s3cret");
    assert!(!format!("{args:?}").contains("amt-s3cret"));
    assert!(!format!("{cfg:?}").contains("amt-s3cret"));
    assert_eq!(
        Cli::parse_from(["simulator"])
            .sim
            .to_config()
            .management_token,
        "carpulse-demo-amt"
    );
    let Err(help) = Cli::try_parse_from(["simulator", "--help"]) else {
        panic!("--help parsed as arguments");
    };
    let help = help.to_string();
    for needle in [
        "--management-token",
        "GET  /v2.0/management/connections",
        "DELETE /v2.0/management/connections",
        "management_requests",
    ] {
        assert!(help.contains(needle), "{needle} not in --help");
    }
}

#[tokio::test]
async fn the_tokens_endpoint_lists_every_token_issued() {
    let sim = spawn(stable_cfg()).await;
    let code = sim.code(&[]).await;
    let first = sim.exchange(&code).await;
    let refresh = first["refresh_token"].as_str().unwrap();
    let rotated: Value = sim.refresh(refresh).await.json().await.unwrap();
    let listed: Value = sim
        .client
        .get(sim.url("/_simulator/tokens"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let has =
        |kind: &str, token: &Value| listed[kind].as_array().unwrap().iter().any(|t| t == token);
    for pair in [&first, &rotated] {
        assert!(has("access", &pair["access_token"]), "{listed}");
        assert!(has("refresh", &pair["refresh_token"]), "{listed}");
    }
    assert_eq!(listed["access"].as_array().unwrap().len(), 2);
    assert!(listed["app"].as_array().unwrap().is_empty());
}
