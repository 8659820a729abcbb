//! Connect's consent screen, for people trying the simulator in a browser (`--consent`): the
//! permissions asked for, the user's vehicles with checkboxes, Approve and Deny. Approve connects
//! the chosen vehicles and redirects with a code covering them (and `user_id`), granting the
//! requested `scope` (carried through the form; without one, the simulator's default set); Deny
//! redirects with `error=access_denied`
//! (smartcar-api.md §1.2). Headless clients skip it with `auto_approve=true` on the authorize URL
//! (or run without `--consent`).

use std::collections::{HashMap, HashSet};

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::oauth::{approved_redirect, query_encode};
use super::scope::Scope;
use super::{Sim, SimState};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The consent page for `user`, carrying the authorize parameters through hidden fields.
pub(crate) fn page(sim: &Sim, user: usize, q: &HashMap<String, String>) -> Response {
    let u = &sim.fleet.users[user];
    let mut hidden = String::new();
    for key in ["redirect_uri", "state", "scope"] {
        if let Some(v) = q.get(key) {
            hidden.push_str(&format!(
                "<input type=hidden name=\"{key}\" value=\"{}\">",
                escape(v)
            ));
        }
    }
    hidden.push_str(&format!(
        "<input type=hidden name=user value=\"{}\">",
        escape(&u.id)
    ));
    let mut cars = String::new();
    for v in &u.vehicles {
        cars.push_str(&format!(
            "<li><label><input type=checkbox name=vehicle value=\"{}\" checked> {} {} {} <small>{}</small></label></li>",
            escape(&v.id),
            v.year,
            escape(v.make),
            escape(v.model),
            escape(&v.vin)
        ));
    }
    // `authorize` validated the scope before showing the page.
    let requested = q.get("scope").map(String::as_str);
    let granted = Scope::from_request(requested).unwrap_or_else(|_| Scope::default_grant());
    let default_note = if requested.is_some_and(|s| !s.trim().is_empty()) {
        ""
    } else {
        " <small>(no scope requested: the simulator's default set)</small>"
    };
    let permissions: String = granted
        .names()
        .iter()
        .map(|p| format!("<li><code>{}</code></li>", escape(p)))
        .collect();
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>Smartcar simulator: connect</title>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:2em auto\">\
         <h1>Allow access</h1><p>Application <b>{client}</b> asks for:{default_note}</p>\
         <ul id=permissions>{permissions}</ul>\
         <form method=post action=\"/oauth/authorize/decision\">{hidden}\
         <p>Vehicles of simulated user <code>{user}</code>:</p><ul>{cars}</ul>\
         <button name=decision value=approve>Approve</button> \
         <button name=decision value=deny>Deny</button></form></body>",
        client = escape(&sim.cfg.client_id),
        user = escape(&u.id),
    ))
    .into_response()
}

/// `POST /oauth/authorize/decision`, the consent form's answer. Its `scope` field (the
/// authorize request's, kept in a hidden field) is what an approval grants; 400 if it names a
/// permission Smartcar does not know.
pub(crate) async fn decision(
    State(sim): State<SimState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let Ok(Form(pairs)) = form else {
        return (StatusCode::BAD_REQUEST, "malformed form\n").into_response();
    };
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let (Some(redirect_uri), Some(user_id)) = (get("redirect_uri"), get("user")) else {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri and user are required\n",
        )
            .into_response();
    };
    let Some(user) = sim.fleet.user_by_id(user_id) else {
        return (StatusCode::BAD_REQUEST, "unknown user\n").into_response();
    };
    let scope = match Scope::from_request(get("scope")) {
        Ok(scope) => scope,
        Err(unknown) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown permission(s) in scope: {}\n", unknown.join(" ")),
            )
                .into_response()
        }
    };
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let state = get("state")
        .map(|s| format!("&state={}", query_encode(s)))
        .unwrap_or_default();
    let chosen: HashSet<String> = pairs
        .iter()
        .filter(|(k, _)| k == "vehicle")
        .map(|(_, v)| v.clone())
        .filter(|v| sim.fleet.vehicle(v).is_some_and(|(owner, _)| owner == user))
        .collect();
    let location = if get("decision") == Some("approve") && !chosen.is_empty() {
        let location =
            approved_redirect(&sim, user, Some(&chosen), scope, redirect_uri, get("state"));
        sim.grant(user, chosen);
        location
    } else if get("decision") == Some("approve") {
        format!("{redirect_uri}{separator}error=no_vehicles&error_description=No+vehicle+was+selected.{state}")
    } else {
        format!(
            "{redirect_uri}{separator}error=access_denied&error_description=User+denied+access+to+application.{state}"
        )
    };
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}
