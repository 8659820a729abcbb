//! `carpulse doctor`: what the configured Smartcar account really does, in plain words, with
//! the fix for each problem. Nobody on the team can reach Smartcar, and smartcar-api.md §9
//! leaves questions open (which authentication v3 takes, whether `pageSize` is honoured, why a
//! listing is empty), so each user settles them on their own account in a minute.
//!
//! It gets an application token (when API credentials are set), lists connections, and reads
//! one signal listing for one vehicle per stored connection. Listings are billed, so it says
//! how many calls that costs and asks first (`--yes` skips the question). It never refreshes a
//! per-user token: a rotation here would strand the running daemon's copy.

use std::io::{BufRead, Write};

use anyhow::Context as _;

use crate::config::Config;
use crate::domain::{is_real_user_id, now_ms, ApiVersion, ConnectionStatus, VehicleId};
use crate::smartcar::error::{ApiError, ErrorKind};
use crate::smartcar::v3::{pick_all, Listing};
use crate::smartcar::{RequestCtx, SmartcarClient};
use crate::store::{queries, Store};

/// What the doctor found: lines of findings, and how many are problems.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub problems: usize,
}

impl Report {
    fn ok(&mut self, s: impl Into<String>) {
        self.lines.push(format!("  ok    {}", s.into()));
    }
    fn info(&mut self, s: impl Into<String>) {
        self.lines.push(format!("  note  {}", s.into()));
    }
    fn problem(&mut self, s: impl Into<String>, fix: impl Into<String>) {
        self.problems += 1;
        self.lines.push(format!("  FAIL  {}", s.into()));
        self.lines.push(format!("        fix: {}", fix.into()));
    }
    fn heading(&mut self, s: &str) {
        self.lines.push(String::new());
        self.lines.push(s.to_owned());
    }
}

/// One vehicle to read a listing for, with what to send.
struct Probe {
    vehicle: VehicleId,
    user: String,
    token: crate::domain::Secret,
    app: bool,
}

/// `carpulse doctor` from the command line: the report on stdout, exit 1 when it found a
/// problem.
pub async fn run_cli(cfg: &Config, yes: bool) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout();
    let report = run(cfg, yes, &mut input, &mut out).await?;
    for l in &report.lines {
        writeln!(out, "{l}").ok();
    }
    writeln!(
        out,
        "\n{}",
        if report.problems == 0 {
            "No problem found.".to_owned()
        } else {
            format!(
                "{} problem(s) found; each has its fix above.",
                report.problems
            )
        }
    )
    .ok();
    Ok(report.problems == 0)
}

/// The checks; `input` answers the question about billed calls, `out` shows it.
pub async fn run(
    cfg: &Config,
    yes: bool,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<Report> {
    let sc = &cfg.smartcar;
    let mut r = Report::default();
    let client = SmartcarClient::new(crate::daemon::client_config(cfg))?;
    r.heading("Configuration");
    r.info(format!(
        "api = {}, mode = {}, page size = {}",
        match sc.api {
            ApiVersion::V3 => "v3",
            ApiVersion::V2 => "v2",
        },
        sc.mode.as_str(),
        sc.v3_page_size
            .map_or("the server's default".to_owned(), |n| n.to_string())
    ));
    match (sc.api, &sc.api_credentials) {
        (ApiVersion::V3, Some(_)) => r.info(
            "v3 with API Authentication: one application token + sc-user-id; no refresh token is stored, no v2.0 call is made",
        ),
        (ApiVersion::V3, None) => r.info(
            "v3 with per-user Connect tokens (no api_client_id): works as Smartcar's SDKs do, but each connection holds a refresh token that must rotate; API Authentication is the documented path for v3",
        ),
        (ApiVersion::V2, _) => r.info(
            "Vehicle API v2.0, which Smartcar is retiring (2026): switch to api = \"v3\" with API credentials",
        ),
    }

    // The application token.
    let mut app_token = None;
    if let Some(creds) = &sc.api_credentials {
        r.heading("API Authentication (application token)");
        match client.app_token(creds).await {
            Ok(t) => {
                r.ok(format!(
                    "{} issued an application token valid {} min",
                    creds.iam_url,
                    (t.expires_at - t.issued_at) / 60_000
                ));
                app_token = Some(t.token);
            }
            Err(e) => r.problem(
                format!("{} refused the API credentials: {e}", creds.iam_url),
                "set smartcar.api_client_id and api_client_secret (or $CARPULSE_API_CLIENT_SECRET) to an API Credentials pair from Smartcar's Dashboard (API Credentials tab); they are not the Connect client id/secret",
            ),
        }
    }

    // The store.
    let store = Store::open(&cfg.store.path, None)
        .with_context(|| format!("opening the store {}", cfg.store.path.display()))?;
    let connections = store.call(|c| queries::load_connections(c)).await?;
    let vehicles = store.call(|c| queries::load_vehicles(c)).await?;
    store.close().await?;
    r.heading("Connections");
    if connections.is_empty() {
        r.problem(
            "the store holds no connection",
            "run `carpulse connect` and approve access in the browser",
        );
    }

    // What Smartcar lists (API Authentication only).
    let mut listed = Vec::new();
    if let Some(token) = &app_token {
        match client.connections(token, None).await {
            Ok(l) => {
                r.ok(format!(
                    "GET /v3/connections lists {} vehicle connection(s) of {} user(s)",
                    l.len(),
                    l.iter()
                        .map(|c| c.user_id.as_str())
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                ));
                listed = l;
            }
            Err(e) => r.problem(
                format!("GET /v3/connections failed: {e}"),
                "check smartcar.api_v3_url; an AUTHENTICATION error means the API credentials lack access to connections",
            ),
        }
    }
    let mut probes = Vec::new();
    for conn in &connections {
        let theirs: Vec<&queries::VehicleRecord> = vehicles
            .iter()
            .filter(|v| v.connection_id == conn.id && v.enabled)
            .collect();
        let label = format!("connection {} (user {})", conn.id, conn.user_id);
        if app_token.is_some() {
            if !is_real_user_id(&conn.user_id) {
                r.problem(
                    format!("{label} has no Smartcar user id, which sc-user-id needs"),
                    "run `carpulse connect` again as that account",
                );
                continue;
            }
            let mine: Vec<_> = listed
                .iter()
                .filter(|c| c.user_id == conn.user_id)
                .collect();
            if mine.is_empty() {
                r.problem(
                    format!("{label}: Smartcar lists no connection for this user (revoked, or made with another application)"),
                    "run `carpulse connect` as that account",
                );
                continue;
            }
            r.ok(format!("{label}: {} vehicle(s) listed", mine.len()));
            for c in &mine {
                let missing: Vec<&String> = sc
                    .scope
                    .iter()
                    .filter(|p| !c.permissions.iter().any(|g| g == *p))
                    .collect();
                if !missing.is_empty() {
                    r.problem(
                        format!(
                            "vehicle {}: the owner did not grant {}",
                            c.vehicle_id,
                            missing
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        "run `carpulse reauth VEHICLE` and approve every permission (or drop them from smartcar.scope)",
                    );
                }
            }
            if let (Some(v), Some(token)) = (theirs.first(), &app_token) {
                probes.push(Probe {
                    vehicle: v.vehicle_id.clone(),
                    user: conn.user_id.clone(),
                    token: token.clone(),
                    app: true,
                });
            }
        } else {
            match conn.status {
                ConnectionStatus::Active => {}
                other => {
                    r.problem(
                        format!("{label} is {}", other.as_str()),
                        "run `carpulse reauth VEHICLE` for one of its vehicles (or `carpulse connect` as that account)",
                    );
                    continue;
                }
            }
            let left_ms = conn.tokens.access_expires_at - now_ms();
            if left_ms < 30_000 {
                r.info(format!("{label}: its access token has expired; the running daemon refreshes it (doctor never does, a rotation here would strand the daemon's copy). Run doctor again while the daemon runs"));
                continue;
            }
            r.ok(format!(
                "{label}: access token valid for {} more min",
                left_ms / 60_000
            ));
            if let Some(v) = theirs.first() {
                probes.push(Probe {
                    vehicle: v.vehicle_id.clone(),
                    user: conn.user_id.clone(),
                    token: conn.tokens.access_token.clone(),
                    app: false,
                });
            }
        }
    }

    // One billed listing per connection.
    if sc.api == ApiVersion::V3 && !probes.is_empty() {
        r.heading("Signals (one listing per connection)");
        let question = format!(
            "Reading one signal listing for {} vehicle(s) costs about {} billed call(s) (one per page). Go on? [y/N] ",
            probes.len(),
            probes.len()
        );
        let go = yes || {
            write!(out, "{question}").ok();
            out.flush().ok();
            let mut answer = String::new();
            input.read_line(&mut answer).unwrap_or(0);
            matches!(answer.trim(), "y" | "Y" | "yes" | "Yes")
        };
        if !go {
            r.info("skipped (no billed call made); run `carpulse doctor --yes` to read them");
        } else {
            for p in &probes {
                probe(&client, cfg, p, &mut r).await;
            }
        }
    }
    Ok(r)
}

async fn probe(client: &SmartcarClient, cfg: &Config, p: &Probe, r: &mut Report) {
    let ctx = RequestCtx {
        access_token: &p.token,
        user_id: p.app.then_some(p.user.as_str()),
    };
    let who = format!("vehicle {}", p.vehicle);
    match crate::smartcar::v3::listing(client, &ctx, &p.vehicle).await {
        Ok(listing) => report_listing(cfg, &who, &listing, client, r),
        Err(e) => report_failure(&who, &e, p.app, r),
    }
}

fn report_listing(cfg: &Config, who: &str, l: &Listing, client: &SmartcarClient, r: &mut Report) {
    r.ok(format!(
        "{who}: {} signal(s) in {} page(s) ({} authentication works)",
        l.items,
        l.pages,
        if cfg.smartcar.app_auth() {
            "API"
        } else {
            "per-user token"
        }
    ));
    if let Some(asked) = cfg.smartcar.v3_page_size {
        match l.page_size {
            Some(got) if got == u64::from(asked) => {
                r.ok(format!("{who}: pageSize {asked} is honoured"))
            }
            Some(got) => r.problem(
                format!("{who}: asked pageSize {asked}, the server used {got}"),
                "set smartcar.v3_page_size to what the server accepts, or remove it; `carpulse plan` counts one billed call per page",
            ),
            None => r.info(format!(
                "{who}: the answer does not say its page size; {} page(s) were read",
                l.pages
            )),
        }
    } else if l.pages > 1 {
        r.info(format!(
            "{who}: the listing took {} pages (each billed); smartcar.v3_page_size = 100 may make it one",
            l.pages
        ));
    }
    for res in pick_all(&l.signals, client.unit_system()) {
        match &res.result {
            Ok(_) => r.ok(format!("{who}: {} reads", res.endpoint)),
            Err(e) => match e.kind {
                ErrorKind::PlanLocked => r.problem(
                    format!("{who}: {} is locked by the app's Smartcar plan ({})", res.endpoint, crate::daemon::gate::cause(e)),
                    "upgrade the plan in Smartcar's dashboard, or accept that carpulse does not store it",
                ),
                ErrorKind::Permission => r.problem(
                    format!("{who}: {} is not granted ({})", res.endpoint, crate::daemon::gate::cause(e)),
                    "run `carpulse reauth VEHICLE` and approve that permission",
                ),
                ErrorKind::Compatibility => r.info(format!(
                    "{who}: the vehicle cannot answer {} ({}); carpulse does not poll it",
                    res.endpoint,
                    crate::daemon::gate::cause(e)
                )),
                _ => r.info(format!("{who}: no {} reading this time ({e})", res.endpoint)),
            },
        }
    }
}

fn report_failure(who: &str, e: &ApiError, app: bool, r: &mut Report) {
    let rid = e
        .request_id
        .as_deref()
        .map(|id| format!(" [request id {id}]"))
        .unwrap_or_default();
    match e.kind {
        ErrorKind::NoData => r.problem(
            format!("{who}: Smartcar holds no signals for it (an empty listing){rid}"),
            "subscribe the vehicle to a webhook in Smartcar's dashboard (Smartcar fills a vehicle's signal store from its webhook subscription); carpulse asks such a vehicle only every schedule.no_data_every",
        ),
        ErrorKind::Authentication if app => r.problem(
            format!("{who}: the application token was refused on /v3{rid}: {e}"),
            "check that the API credentials belong to the same Smartcar application as the Connect client",
        ),
        ErrorKind::Authentication => r.problem(
            format!("{who}: the per-user token was refused on /v3{rid}: {e}"),
            "this account's v3 may need API Authentication: set smartcar.api_client_id and its secret (Dashboard → API Credentials)",
        ),
        ErrorKind::AccessDenied => r.problem(
            format!("{who}: access denied for this user{rid}: {e}"),
            "the owner revoked access or the connection belongs to another application: run `carpulse connect` as that account",
        ),
        ErrorKind::Rejected => r.problem(
            format!("{who}: the listing was refused as a whole{rid}: {e}"),
            "a MISSING_PARAMETER names what carpulse did not send (tell us: it is a bug); an answer without Smartcar's error envelope came from something in between (a proxy, a load balancer); otherwise Smartcar may be having an incident, try again later",
        ),
        _ => r.problem(
            format!("{who}: the listing failed{rid}: {e}"),
            "try again later; a lasting failure is worth a Smartcar support ticket with the request id",
        ),
    }
}
