//! `carpulse connect`: Smartcar Connect, the OAuth consent flow. Prints the authorize URL, serves
//! the redirect URI (`http://localhost:8000/exchange` by default, the one Smartcar users already
//! register), checks `state`, exchanges the code, discovers the user's vehicles and stores the
//! connection (token pair durably, before anything else) and its vehicles.
//!
//! On a headless server the browser runs elsewhere: either an SSH tunnel carries its redirect
//! to the server (`ssh -L 8000:localhost:8000 host`), or `--paste` reads the address the
//! browser ended on, pasted from its address bar, instead of serving the redirect URI
//! ([`Redirect::Paste`]). A redirect port that is taken is an error naming the address, never
//! a silent fallback to another address the browser may not reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use oauth2::url::Url;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::domain::{now_ms, ConnectionId, VehicleId, VehicleInfo};
use crate::smartcar::{RequestCtx, SmartcarClient};
use crate::store::{queries, Store};

/// Smartcar's authorization codes expire after 10 minutes; waiting longer is pointless.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);

/// What a successful connect stored.
#[derive(Debug, Clone)]
pub struct Connected {
    pub connection: ConnectionId,
    pub user_id: String,
    pub vehicles: Vec<(VehicleId, Option<VehicleInfo>)>,
    /// Per vehicle, the endpoints it cannot answer (endpoint, reason), as read at connect;
    /// no entry when they could not be read (the daemon reads them).
    pub unavailable: std::collections::HashMap<VehicleId, Vec<(crate::smartcar::Endpoint, String)>>,
}

/// The Connect URL (smartcar-api.md §1.1). `approval_prompt=force` so a reconnect shows the
/// consent screen again instead of silently reusing an old grant.
pub fn authorize_url(cfg: &Config, redirect_uri: &str, state: &str) -> anyhow::Result<String> {
    let sc = &cfg.smartcar;
    let mut url = Url::parse(&sc.connect_url).context("smartcar.connect_url")?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &sc.client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", &sc.scope.join(" "))
        .append_pair("state", state)
        .append_pair("mode", sc.mode.as_str())
        .append_pair("approval_prompt", "force");
    // Form encoding writes spaces (between scopes) as '+'; Smartcar's SDKs send %20, which every
    // server decodes the same way. A literal '+' was already escaped as %2B, so this is exact.
    let query = url.query().unwrap_or_default().replace('+', "%20");
    url.set_query(Some(&query));
    Ok(url.to_string())
}

/// Where the browser's redirect comes back.
pub enum Redirect {
    /// Served on these listeners (bound on the redirect URI's host and port).
    Serve(Vec<TcpListener>),
    /// Read from this input: the address the browser ended on, pasted by the user (a line).
    Paste(Box<dyn tokio::io::AsyncBufRead + Unpin + Send>),
}

impl From<Vec<TcpListener>> for Redirect {
    fn from(listeners: Vec<TcpListener>) -> Redirect {
        Redirect::Serve(listeners)
    }
}

/// The redirect source a CLI command asked for: stdin with `--paste`, else the redirect URI
/// bound with [`bind_redirect`].
pub async fn redirect_for_cli(cfg: &Config, paste: bool) -> anyhow::Result<Redirect> {
    if paste {
        return Ok(Redirect::Paste(Box::new(tokio::io::BufReader::new(
            tokio::io::stdin(),
        ))));
    }
    Ok(Redirect::Serve(
        bind_redirect(&cfg.smartcar.redirect_uri).await?,
    ))
}

/// What to tell the user about the redirect, after the URL.
pub fn redirect_hint(cfg: &Config, redirect: &Redirect) -> String {
    match redirect {
        Redirect::Serve(_) => format!("waiting on {}", cfg.smartcar.redirect_uri),
        Redirect::Paste(_) => format!(
            "then copy the address your browser ends on (it starts with {}; the page itself may \
             fail to load) and paste it here",
            cfg.smartcar.redirect_uri
        ),
    }
}

/// Binds the host and port of the redirect URI. `localhost` is bound on 127.0.0.1 and, when
/// the machine has IPv6, [::1] too, since a browser may resolve either. An address in use is
/// an error naming it: a browser sent to the other program would never come back here.
pub async fn bind_redirect(redirect_uri: &str) -> anyhow::Result<Vec<TcpListener>> {
    let url = Url::parse(redirect_uri)
        .with_context(|| format!("smartcar.redirect_uri {redirect_uri:?}"))?;
    let host = url
        .host_str()
        .context("smartcar.redirect_uri has no host")?
        .to_string();
    let port = url
        .port_or_known_default()
        .context("smartcar.redirect_uri has no port")?;
    let addrs: Vec<SocketAddr> = if host == "localhost" {
        vec![
            ([127, 0, 0, 1], port).into(),
            (std::net::Ipv6Addr::LOCALHOST, port).into(),
        ]
    } else {
        let h = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let resolved = tokio::net::lookup_host((h.as_str(), port))
            .await
            .with_context(|| format!("resolving the redirect URI host {host}"))?;
        resolved.collect()
    };
    let mut listeners = Vec::new();
    for a in addrs {
        match TcpListener::bind(a).await {
            Ok(l) => listeners.push(l),
            // No IPv6 on this machine: no browser here resolves localhost to [::1] either.
            Err(e)
                if host == "localhost"
                    && a.is_ipv6()
                    && (e.kind() == std::io::ErrorKind::AddrNotAvailable
                        || e.raw_os_error() == Some(97)) =>
            {
                tracing::debug!(addr = %a, error = %e, "no IPv6 loopback; serving the redirect on IPv4 only");
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
                "cannot serve the redirect URI {redirect_uri}: {a} is in use by another program \
                 (another `carpulse connect`?). Stop it, or run `carpulse connect --paste` (no \
                 listener: paste the address the browser ends on), or set smartcar.redirect_uri \
                 to a free port you registered with Smartcar"
            ),
            Err(e) => bail!("cannot serve the redirect URI {redirect_uri} on {a}: {e}"),
        }
    }
    Ok(listeners)
}

/// A code that arrived on the redirect URI, and where to send the page shown in the browser.
struct Callback {
    params: HashMap<String, String>,
    reply: oneshot::Sender<Result<String, String>>,
}

#[derive(Clone)]
struct CallbackState {
    tx: mpsc::Sender<Callback>,
}

/// Runs the whole flow on already-bound redirect listeners. `redirect_uri` is the URI Smartcar
/// redirects to (it must match the one used in the authorize URL and the code exchange);
/// `on_url` is given the authorize URL (the CLI prints it; the demo follows it itself).
pub async fn run(
    cfg: &Config,
    store: &Store,
    redirect: impl Into<Redirect>,
    on_url: impl FnOnce(&str),
    wait: Duration,
) -> anyhow::Result<Connected> {
    run_with(cfg, store, redirect, on_url, wait, &Options::default()).await
}

/// What `carpulse reauth` adds to a plain connect.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The grant must cover this vehicle; otherwise nothing is stored.
    pub must_include: Option<VehicleId>,
    /// Skips Connect's brand selector (the `make` parameter).
    pub make: Option<String>,
}

/// [`run`] with [`Options`].
pub async fn run_with(
    cfg: &Config,
    store: &Store,
    redirect: impl Into<Redirect>,
    on_url: impl FnOnce(&str),
    wait: Duration,
    options: &Options,
) -> anyhow::Result<Connected> {
    // Built here, from this flow's config: the code exchange must name the same redirect URI
    // as the authorize URL did.
    let client = SmartcarClient::new(crate::daemon::client_config(cfg))?;
    let state = random_state();
    let mut url = authorize_url(cfg, &cfg.smartcar.redirect_uri, &state)?;
    if let Some(make) = &options.make {
        let mut u = Url::parse(&url).context("the authorize URL")?;
        u.query_pairs_mut().append_pair("make", make);
        url = u.to_string().replace('+', "%20");
    }
    await_callback(cfg, redirect, &url, &state, on_url, wait, |p| async move {
        // Connect names the user on the redirect, alongside the code or instead of it
        // (smartcar-api.md §10.2; `user_id`, or `userId` in the migration guide).
        let user_hint = p
            .get("user_id")
            .or_else(|| p.get("userId"))
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty());
        let c = match (&cfg.smartcar.api_credentials, cfg.smartcar.app_auth()) {
            (Some(creds), true) => {
                // API Authentication: the code is not exchanged (nothing to keep secret).
                let Some(user) = user_hint else {
                    bail!(
                        "Smartcar's redirect named no user_id, which API Authentication needs \
                         (smartcar.api_client_id is set); run `carpulse doctor`"
                    );
                };
                finish_app(&client, creds, store, &user, options).await?
            }
            _ => {
                let Some(code) = p.get("code").cloned() else {
                    bail!(
                        "Smartcar redirected without a code; without API credentials \
                         (smartcar.api_client_id) carpulse needs one to get tokens"
                    );
                };
                finish(cfg, &client, store, &code, user_hint, options).await?
            }
        };
        let msg = format!(
            "carpulse stored {} vehicle(s) for this account. You can close this tab.",
            c.vehicles.len()
        );
        Ok((c, msg))
    })
    .await
}

/// Serves the redirect URI on `listeners` (or reads pasted addresses), hands `url` to `on_url`,
/// and waits up to `wait` for the redirect that carries this flow's `state` (others are refused
/// and ignored). An `error` redirect ends the flow; otherwise `finish` gets the parameters, and
/// the browser (or, pasted, the terminal) is shown its message or its error.
pub async fn await_callback<T, F, Fut>(
    cfg: &Config,
    redirect: impl Into<Redirect>,
    url: &str,
    state: &str,
    on_url: impl FnOnce(&str),
    wait: Duration,
    finish: F,
) -> anyhow::Result<T>
where
    F: FnOnce(HashMap<String, String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, String)>>,
{
    let listeners = match redirect.into() {
        Redirect::Serve(listeners) => listeners,
        Redirect::Paste(input) => {
            return await_paste(cfg, input, url, state, on_url, wait, finish).await;
        }
    };
    let redirect = Url::parse(&cfg.smartcar.redirect_uri).context("smartcar.redirect_uri")?;
    let path = redirect.path().to_string();
    let (tx, mut rx) = mpsc::channel::<Callback>(4);
    let stop = CancellationToken::new();
    let app = Router::new()
        .route(&path, get(callback))
        .with_state(CallbackState { tx });
    let mut servers = Vec::new();
    for l in listeners {
        let app = app.clone();
        let stop = stop.clone();
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }));
    }
    on_url(url);
    let result = wait_for_callback(cfg, &mut rx, state, wait, finish).await;
    // The browser's answer page is still being written: let the servers finish it (bounded)
    // before the caller, often about to exit, moves on.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), futures_join(servers)).await;
    result
}

/// [`await_callback`] without a listener: each line of `input` is an address the browser
/// ended on (or its query string); the one with this flow's `state` is taken.
async fn await_paste<T, F, Fut>(
    cfg: &Config,
    mut input: Box<dyn tokio::io::AsyncBufRead + Unpin + Send>,
    url: &str,
    state: &str,
    on_url: impl FnOnce(&str),
    wait: Duration,
    finish: F,
) -> anyhow::Result<T>
where
    F: FnOnce(HashMap<String, String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, String)>>,
{
    use tokio::io::AsyncBufReadExt;
    on_url(url);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout_at(deadline, input.read_line(&mut line))
            .await
            .map_err(|_| anyhow::anyhow!("no address pasted within {} s", wait.as_secs()))?
            .context("reading the pasted address")?;
        if n == 0 {
            bail!("the input ended before an address was pasted");
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(params) = pasted_params(line) else {
            eprintln!(
                "that is not the address the browser ended on (it starts with {}); paste it again:",
                cfg.smartcar.redirect_uri
            );
            continue;
        };
        if params.get("state").map(String::as_str) != Some(state) {
            eprintln!(
                "that address belongs to another Connect (its state does not match); paste the address of this one:"
            );
            continue;
        }
        if let Some(err) = params.get("error") {
            // Text from the redirect: scrubbed and cut like any answer's text.
            let err = crate::smartcar::scrub::scrub_field(err, &[]);
            let desc = crate::smartcar::scrub::scrub(
                params.get("error_description").map_or("", String::as_str),
                &[],
            );
            bail!("Smartcar Connect answered {err}: {desc}");
        }
        let (value, msg) = finish(params).await?;
        eprintln!("{msg}");
        return Ok(value);
    }
}

/// The query parameters of a pasted address: a whole URL, or only its query string.
fn pasted_params(text: &str) -> Option<HashMap<String, String>> {
    let query = match Url::parse(text) {
        Ok(u) => u.query()?.to_owned(),
        Err(_) => text.trim_start_matches('?').to_owned(),
    };
    let params: HashMap<String, String> = oauth2::url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    params.contains_key("state").then_some(params)
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

async fn wait_for_callback<T, F, Fut>(
    cfg: &Config,
    rx: &mut mpsc::Receiver<Callback>,
    state: &str,
    wait: Duration,
    finish: F,
) -> anyhow::Result<T>
where
    F: FnOnce(HashMap<String, String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, String)>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let cb = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no answer on {} within {} s",
                    cfg.smartcar.redirect_uri,
                    wait.as_secs()
                )
            })?
            .context("the callback server stopped")?;
        let p = &cb.params;
        if p.get("state").map(String::as_str) != Some(state) {
            // A stray or forged request: refuse it and keep waiting for the real one.
            warn!("a request on the redirect URI had a wrong or missing state; ignored");
            let _ = cb.reply.send(Err(
                "state mismatch: this answer does not belong to this flow".into(),
            ));
            continue;
        }
        if let Some(err) = p.get("error") {
            // Text from the redirect: scrubbed and cut like any answer's text.
            let err = crate::smartcar::scrub::scrub_field(err, &[]);
            let desc = crate::smartcar::scrub::scrub(
                p.get("error_description").map_or("", String::as_str),
                &[],
            );
            let _ = cb
                .reply
                .send(Err(format!("Smartcar Connect answered {err}: {desc}")));
            bail!("Smartcar Connect answered {err}: {desc}");
        }
        return match finish(cb.params).await {
            Ok((value, msg)) => {
                let _ = cb.reply.send(Ok(msg));
                Ok(value)
            }
            Err(e) => {
                let _ = cb.reply.send(Err(format!("{e:#}")));
                Err(e)
            }
        };
    }
}

async fn callback(
    State(s): State<CallbackState>,
    Query(params): Query<HashMap<String, String>>,
) -> (StatusCode, Html<String>) {
    let (reply, answer) = oneshot::channel();
    if s.tx.send(Callback { params, reply }).await.is_err() {
        return (
            StatusCode::GONE,
            page("carpulse connect has already finished."),
        );
    }
    match answer.await {
        Ok(Ok(msg)) => (StatusCode::OK, page(&msg)),
        Ok(Err(msg)) => (StatusCode::BAD_REQUEST, page(&msg)),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            page("carpulse connect stopped."),
        ),
    }
}

fn page(msg: &str) -> Html<String> {
    let escaped = msg
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    Html(format!(
        "<!doctype html><meta charset=utf-8><title>carpulse</title><p style=\"font-family:sans-serif\">{escaped}</p>"
    ))
}

/// Exchange, discover, store. The token pair is committed before vehicles are listed with it.
async fn finish(
    cfg: &Config,
    client: &SmartcarClient,
    store: &Store,
    code: &str,
    user_hint: Option<String>,
    options: &Options,
) -> anyhow::Result<Connected> {
    let tokens = client
        .exchange_code(code)
        .await
        .context("exchanging the authorization code at smartcar.token_url")?;
    // The code is spent: if these fail for good the owner must consent again, so a
    // transient failure is retried first.
    let ids = retried(|| client.list_vehicles(&tokens.access_token))
        .await
        .context("listing the account's vehicles (GET /vehicles)")?;
    if let Some(wanted) = &options.must_include {
        if !ids.contains(wanted) {
            bail!(
                "the account that was approved does not include vehicle {wanted} (it has {} \
                 vehicle(s)); nothing was stored. Log in with the account that owns the vehicle",
                ids.len()
            );
        }
    }
    let user_id = match user_hint {
        Some(u) => u,
        None => match retried(|| client.user_id(&tokens.access_token)).await {
            Ok(u) => u,
            // The user id only keys the connection for reconnects; a server without `/user`
            // should not make Connect fail. The fallback is stable for the same vehicles.
            Err(e) => {
                let fallback = fallback_user_id(&ids);
                warn!(error = %e, user = %fallback, "GET /user failed; keying the connection by its vehicles");
                fallback
            }
        },
    };
    let t = tokens.clone();
    let uid = user_id.clone();
    let connection = store
        .call(move |c| queries::upsert_connection(c, &uid, &t, now_ms()))
        .await
        .context("storing the connection")?;
    let ctx = RequestCtx {
        access_token: &tokens.access_token,
        user_id: Some(user_id.as_str()),
    };
    let mut vehicles = Vec::new();
    let mut unavailable = std::collections::HashMap::new();
    for id in ids {
        let info = match client.vehicle_info(cfg.smartcar.api, &ctx, &id).await {
            Ok(i) => Some(i),
            Err(e) => {
                warn!(vehicle = %id, error = %e, "cannot read make/model/year now; the info job will retry");
                None
            }
        };
        let (vid, inf) = (id.clone(), info.clone());
        store
            .call(move |c| {
                queries::upsert_vehicle(c, connection, &vid, inf.as_ref(), now_ms())?;
                // A new consent may grant what the old one did not: start over.
                queries::clear_blocks(c, &vid, false)
            })
            .await
            .with_context(|| format!("storing vehicle {id}"))?;
        match client.capabilities(cfg.smartcar.api, &ctx, &id).await {
            Ok(caps) => {
                let blocked = caps.unavailable;
                crate::daemon::discovery::save(store, &id, &blocked).await?;
                unavailable.insert(id.clone(), blocked);
            }
            Err(e) => {
                warn!(vehicle = %id, error = %e, "cannot read the vehicle's capabilities now; the daemon will");
            }
        }
        vehicles.push((id, info));
    }
    info!(connection = %connection, user = %user_id, vehicles = vehicles.len(), "connected");
    Ok(Connected {
        connection,
        user_id,
        vehicles,
        unavailable,
    })
}

/// The v3 API Authentication side of [`finish`]: the user's vehicles, their make/model/year
/// and granted permissions from `GET /v3/connections` (no v2.0 call), stored under Smartcar's
/// user id with no token.
async fn finish_app(
    client: &SmartcarClient,
    creds: &crate::smartcar::iam::AppCredentials,
    store: &Store,
    user_id: &str,
    options: &Options,
) -> anyhow::Result<Connected> {
    let token = client
        .app_token(creds)
        .await
        .context("getting an application token at smartcar.iam_url (check api_client_id and the API client secret)")?;
    let listed = retried(|| client.connections(&token.token, Some(user_id)))
        .await
        .context("listing the user's connections (GET /v3/connections)")?;
    if listed.is_empty() {
        bail!(
            "Smartcar lists no connected vehicle for user {user_id} (GET /v3/connections); \
             nothing was stored. Run `carpulse doctor` to see what the account holds"
        );
    }
    if let Some(wanted) = &options.must_include {
        if !listed.iter().any(|c| &c.vehicle_id == wanted) {
            bail!(
                "the account that was approved does not include vehicle {wanted} (it has {} \
                 vehicle(s)); nothing was stored. Log in with the account that owns the vehicle",
                listed.len()
            );
        }
    }
    let uid = user_id.to_owned();
    let connection = store
        .call(move |c| queries::upsert_app_connection(c, &uid, now_ms()))
        .await
        .context("storing the connection")?;
    let mut vehicles = Vec::new();
    let mut unavailable = HashMap::new();
    for conn in listed {
        let id = conn.vehicle_id.clone();
        let (vid, info) = (id.clone(), conn.vehicle.clone());
        store
            .call(move |c| {
                queries::upsert_vehicle(c, connection, &vid, info.as_ref(), now_ms())?;
                // A new consent may grant what the old one did not: start over.
                queries::clear_blocks(c, &vid, false)
            })
            .await
            .with_context(|| format!("storing vehicle {id}"))?;
        let blocked = crate::smartcar::not_granted(&conn.permissions);
        crate::daemon::discovery::save(store, &id, &blocked).await?;
        unavailable.insert(id.clone(), blocked);
        vehicles.push((id, conn.vehicle));
    }
    info!(connection = %connection, user = %user_id, vehicles = vehicles.len(), "connected (API Authentication)");
    Ok(Connected {
        connection,
        user_id: user_id.to_owned(),
        vehicles,
        unavailable,
    })
}

/// Up to 3 tries, 1 s then 2 s apart, while the failure is transient (network, 5xx, rate
/// limit; a `retry-after` up to 10 s is honoured).
async fn retried<T, F, Fut>(mut call: F) -> Result<T, crate::smartcar::ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::smartcar::ApiError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            // Never before a `retry-after` (smartcar-api.md §2.4); a long one ends the try.
            Err(e)
                if e.kind.is_transient()
                    && attempt < 3
                    && e.retry_after.is_none_or(|w| w <= Duration::from_secs(10)) =>
            {
                let wait = e.retry_after.unwrap_or(Duration::from_secs(attempt));
                warn!(attempt, error = %e, wait_s = wait.as_secs(), "Smartcar request failed; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A connection key when Smartcar names no user: derived from the sorted vehicle ids, so the same
/// account connected again finds its old row.
fn fallback_user_id(ids: &[VehicleId]) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(|v| v.0.as_str()).collect();
    sorted.sort_unstable();
    format!("vehicles:{}", sorted.join(","))
}

pub fn random_state() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lines `carpulse connect` prints about what it stored.
pub fn describe(c: &Connected) -> String {
    let mut out = format!(
        "stored connection {} for Smartcar user {} with {} vehicle(s):\n",
        c.connection,
        c.user_id,
        c.vehicles.len()
    );
    for (id, info) in &c.vehicles {
        match info {
            Some(i) => out.push_str(&format!("  {id}  {} {} {}\n", i.year, i.make, i.model)),
            None => out.push_str(&format!("  {id}  (make/model/year not yet known)\n")),
        }
        for (endpoint, reason) in c.unavailable.get(id).into_iter().flatten() {
            out.push_str(&format!("      not polled: {endpoint} ({reason})\n"));
        }
    }
    out
}

/// `carpulse connect` from the command line; `paste`: read the browser's final address from
/// stdin instead of serving the redirect URI.
pub async fn run_cli(cfg: Config, wait: Duration, paste: bool) -> anyhow::Result<()> {
    // Bound first: a taken port fails before a store is created.
    let redirect = redirect_for_cli(&cfg, paste).await?;
    let hint = redirect_hint(&cfg, &redirect);
    let store = Store::open(&cfg.store.path, None)
        .with_context(|| format!("opening the store {}", cfg.store.path.display()))?;
    let result = run(
        &cfg,
        &store,
        redirect,
        |url| {
            eprintln!("Open this URL in a browser and approve access ({hint}):");
            println!("{url}");
        },
        wait,
    )
    .await;
    store.close().await?;
    let connected = result?;
    print!("{}", describe(&connected));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_url_carries_what_smartcar_expects() {
        let text = "[smartcar]\nclient_id = \"cid\"\nclient_secret = \"s\"\nmode = \"simulated\"\n";
        struct NoEnv;
        impl crate::config::Env for NoEnv {
            fn var(&self, _: &str) -> Option<String> {
                None
            }
        }
        let cfg = Config::parse(text, "t.toml", &NoEnv).unwrap();
        let url = authorize_url(&cfg, "http://localhost:8000/exchange", "st4te").unwrap();
        assert!(url.starts_with(
            "https://connect.smartcar.com/oauth/authorize?response_type=code&client_id=cid&"
        ));
        assert!(
            url.contains("&redirect_uri=http%3A%2F%2Flocalhost%3A8000%2Fexchange&"),
            "{url}"
        );
        assert!(url.contains(
            "&scope=read_vehicle_info%20read_vin%20read_battery%20read_charge%20read_odometer&"
        ));
        assert!(
            url.contains("&state=st4te&mode=simulated&approval_prompt=force"),
            "{url}"
        );
        assert!(!url.contains("secret") && !url.contains('+'));
    }

    #[test]
    fn the_fallback_user_key_is_stable() {
        let a = [VehicleId("b".into()), VehicleId("a".into())];
        let b = [VehicleId("a".into()), VehicleId("b".into())];
        assert_eq!(fallback_user_id(&a), "vehicles:a,b");
        assert_eq!(fallback_user_id(&a), fallback_user_id(&b));
    }

    #[test]
    fn states_are_unguessable_and_distinct() {
        let (a, b) = (random_state(), random_state());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn a_pasted_address_or_query_gives_its_parameters() {
        let p = pasted_params("http://localhost:8000/exchange?code=c0de&state=st%3D1&user_id=u")
            .unwrap();
        assert_eq!(p["code"], "c0de");
        assert_eq!(p["state"], "st=1");
        let p = pasted_params("?code=x&state=y").unwrap();
        assert_eq!((p["code"].as_str(), p["state"].as_str()), ("x", "y"));
        assert!(pasted_params("hello").is_none());
        assert!(pasted_params("http://localhost:8000/exchange").is_none());
    }
}
