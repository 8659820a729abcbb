//! The read-mostly CLI commands `vehicles list`, `vehicles enable/disable` and `status`
//! (`vehicles remove` is in `admin`), and how every read command names a vehicle
//! ([`resolve_vehicle`]). They read the store through their own read-only connection (WAL lets
//! them run beside the daemon), never create a store that isn't there, and need no Smartcar
//! credentials. Output goes to a `&mut dyn Write` (see [`crate::cli::output`]).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use crate::cli::output::{local, short_id, vehicle_label, vehicle_name};
use crate::config::Config;
use crate::domain::{now_ms, UnixMillis, VehicleId};
use crate::smartcar::Endpoint;
use crate::store::{queries, Store};

/// Opens an existing store read-only.
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    if !path.exists() {
        bail!(
            "no store at {} (store.path, or --db): run `carpulse connect` first, or name the store with --db PATH",
            path.display()
        );
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    // Its tables and views may mean something else: refuse, as the daemon does (exit 73).
    crate::store::migrate::refuse_newer(&c).map_err(|e| {
        e.context(crate::exit::Permanent::Store {
            path: path.to_path_buf(),
        })
    })?;
    Ok(c)
}

/// "3 min ago", "in 1 h 20 min": times relative to now for humans.
pub fn ago(at: UnixMillis, now: UnixMillis) -> String {
    let d = (now - at) / 1000;
    let (abs, future) = (d.unsigned_abs(), d < 0);
    let s = if abs < 90 {
        format!("{abs} s")
    } else if abs < 90 * 60 {
        format!("{} min", abs / 60)
    } else if abs < 48 * 3600 {
        format!("{} h {} min", abs / 3600, (abs % 3600) / 60)
    } else {
        format!("{} days", abs / 86400)
    };
    if future {
        format!("in {s}")
    } else {
        format!("{s} ago")
    }
}

/// A stored vehicle as the read commands name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownVehicle {
    pub id: String,
    /// "TESLA Model 3 2021", or "" when not known yet.
    pub name: String,
}

/// Every stored vehicle, in the order they were added.
pub fn known_vehicles(c: &Connection) -> anyhow::Result<Vec<KnownVehicle>> {
    let mut stmt = c
        .prepare("SELECT vehicle_id, make, model, year FROM vehicles ORDER BY rowid")
        .context("listing the stored vehicles")?;
    let rows = stmt.query_map([], |r| {
        Ok(KnownVehicle {
            id: r.get(0)?,
            name: vehicle_name(
                r.get::<_, Option<String>>(1)?.as_deref(),
                r.get::<_, Option<String>>(2)?.as_deref(),
                r.get(3)?,
            ),
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading a vehicle row")
}

/// The stored vehicle `query` names: its id, a unique id prefix, or words of its make, model
/// and year ("tesla", "model 3", "tesla model 3 2021"), case-insensitively. No match, or
/// several, is an error that lists the candidates.
pub fn resolve_vehicle(c: &Connection, query: &str) -> anyhow::Result<KnownVehicle> {
    let known = known_vehicles(c)?;
    pick_vehicle(&known, query)
}

fn pick_vehicle(known: &[KnownVehicle], query: &str) -> anyhow::Result<KnownVehicle> {
    let q = query.trim().to_lowercase();
    let list = |vs: &[&KnownVehicle]| -> String {
        vs.iter()
            .map(|v| {
                format!(
                    "\n  {}  {}",
                    v.id,
                    if v.name.is_empty() {
                        "(make/model not known yet)"
                    } else {
                        &v.name
                    }
                )
            })
            .collect()
    };
    if q.is_empty() {
        bail!("--vehicle is empty");
    }
    if let Some(v) = known.iter().find(|v| v.id.to_lowercase() == q) {
        return Ok(v.clone());
    }
    let words: Vec<&str> = q.split_whitespace().collect();
    let by_prefix: Vec<&KnownVehicle> = known
        .iter()
        .filter(|v| v.id.to_lowercase().starts_with(&q))
        .collect();
    let by_name: Vec<&KnownVehicle> = known
        .iter()
        .filter(|v| {
            let name = v.name.to_lowercase();
            let have: Vec<&str> = name.split_whitespace().collect();
            !have.is_empty() && words.iter().all(|w| have.contains(w))
        })
        .collect();
    let matches = if by_prefix.is_empty() {
        by_name
    } else {
        by_prefix
    };
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] if known.is_empty() => bail!("no vehicle matches {query:?}: the store has no vehicles (run `carpulse connect`)"),
        [] => bail!(
            "no vehicle matches {query:?}; the store has:{}\nname one by its id, an id prefix (e.g. {}) or its make and model",
            list(&known.iter().collect::<Vec<_>>()),
            short_id(&known[0].id)
        ),
        several => bail!(
            "{query:?} matches {} vehicles:{}\nname one by a longer id prefix",
            several.len(),
            list(several)
        ),
    }
}

pub async fn vehicles_list(cfg: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    let c = open_read_only(&cfg.store.path)?;
    let rows = queries::vehicle_summaries(&c)?;
    if rows.is_empty() {
        writeln!(out, "no vehicles stored: run `carpulse connect`")?;
        return Ok(());
    }
    let now = now_ms();
    writeln!(
        out,
        "{:<38} {:<28} {:<12} {:<8} {:>7} {:>9} {:<14} LAST READING",
        "VEHICLE", "MAKE MODEL YEAR", "CONNECTION", "ENABLED", "SOC %", "RANGE KM", "CHARGE"
    )?;
    for s in rows {
        let v = &s.vehicle;
        let name = vehicle_name(v.make.as_deref(), v.model.as_deref(), v.year);
        let soc = s
            .last_battery
            .as_ref()
            .map(|b| format!("{:.1}", b.soc_percent))
            .unwrap_or("-".into());
        let range = s
            .last_battery
            .as_ref()
            .and_then(|b| b.range_km)
            .map(|r| format!("{r:.1}"))
            .unwrap_or("-".into());
        let charge = s
            .last_charge
            .as_ref()
            .map(|c| c.state.as_str())
            .unwrap_or("-");
        let last = s
            .last_battery
            .as_ref()
            .map(|b| {
                format!(
                    "{} ({})",
                    local(b.stamp.recorded_at),
                    ago(b.stamp.recorded_at, now)
                )
            })
            .unwrap_or("never".into());
        writeln!(
            out,
            "{:<38} {:<28} {:<12} {:<8} {:>7} {:>9} {:<14} {}",
            v.vehicle_id,
            if name.is_empty() {
                "?".to_owned()
            } else {
                name
            },
            s.connection_status.as_str(),
            if v.enabled { "yes" } else { "no" },
            soc,
            range,
            charge,
            last
        )?;
    }
    out.flush()?;
    Ok(())
}

pub async fn vehicles_enable(cfg: &Config, id: &str, enabled: bool) -> anyhow::Result<()> {
    open_read_only(&cfg.store.path)?; // refuses to create a store just to change it
    let store = Store::open(&cfg.store.path, None)?;
    let vid = VehicleId(id.to_string());
    let changed = store
        .call(move |c| {
            if !queries::set_vehicle_enabled(c, &vid, enabled)? {
                return Ok(None);
            }
            // Enabling says the owner fixed what stopped it (billing, an account, a
            // permission): what answers blocked is asked again.
            // A wait (retry-after, backoff) too: the operator asks for a poll now.
            let lifted = if enabled {
                queries::clear_blocks(c, &vid, true)? + queries::clear_wait(c, &vid)?
            } else {
                0
            };
            Ok(Some(lifted))
        })
        .await;
    store.close().await?;
    let Some(lifted) = changed? else {
        bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
    };
    println!(
        "vehicle {id} {}; a running daemon picks this up within a minute (or now: systemctl reload carpulse)",
        if enabled { "enabled" } else { "disabled" }
    );
    if lifted > 0 {
        println!(
            "lifted {lifted} block(s) that earlier answers had set (a pause, disabled endpoints or a wait)"
        );
    }
    Ok(())
}

/// Where a daemon listening on `listen` (`metrics.listen`) is reached from this host: a
/// wildcard listener on loopback.
pub fn reach(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}

/// Whether a daemon answers on the metrics address, in words.
fn daemon_line(cfg: &Config) -> String {
    let addr = reach(cfg.metrics.listen);
    let tls = cfg.metrics.web_config_file.is_some();
    let whose = if cfg.source.is_some() {
        "metrics.listen"
    } else {
        "the default metrics.listen: no config read"
    };
    match probe(addr, tls) {
        Probe::Nothing => format!("not running (nothing listens on {addr}, {whose})"),
        Probe::Carpulse { version, health } => format!(
            "running: carpulse {version} answers on http://{addr} ({whose}); /healthz: {health}"
        ),
        Probe::Auth => format!(
            "running: something answers on {addr} ({whose}) and asks for basic auth (metrics.web_config_file)"
        ),
        Probe::Listening => format!(
            "something listens on {addr} ({whose}){}",
            if tls {
                " with TLS (metrics.web_config_file): most likely the daemon"
            } else {
                ", but it does not answer as carpulse"
            }
        ),
    }
}

enum Probe {
    Nothing,
    Listening,
    Auth,
    Carpulse { version: String, health: String },
}

/// Asks the metrics listener, briefly, who it is (GET /metrics) and how it is (GET /healthz).
fn probe(addr: SocketAddr, tls: bool) -> Probe {
    let timeout = Duration::from_millis(800);
    if std::net::TcpStream::connect_timeout(&addr, timeout).is_err() {
        return Probe::Nothing;
    }
    if tls {
        return Probe::Listening;
    }
    let Some((status, body)) = http_get(addr, "/metrics", timeout) else {
        return Probe::Listening;
    };
    if status == 401 {
        return Probe::Auth;
    }
    let Some(version) = body
        .lines()
        .find(|l| l.starts_with("carpulse_build_info{"))
        .and_then(|l| l.split("version=\"").nth(1))
        .and_then(|v| v.split('"').next())
    else {
        return Probe::Listening;
    };
    let health = match http_get(addr, "/healthz", timeout) {
        Some((200, _)) => "ok".to_owned(),
        Some((_, body)) => format!(
            "{} problem(s): {}",
            body.lines().count(),
            body.lines().collect::<Vec<_>>().join("; ")
        ),
        None => "no answer".to_owned(),
    };
    Probe::Carpulse {
        version: version.to_owned(),
        health,
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status, body), or None.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.take(4 << 20).read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The endpoints whose last outcome `status` shows.
const STATUS_ENDPOINTS: [Endpoint; 6] = [
    Endpoint::Battery,
    Endpoint::Charge,
    Endpoint::Odometer,
    Endpoint::Info,
    Endpoint::Vin,
    Endpoint::Capabilities,
];

/// How far back `status` looks for an endpoint's last outcome.
const STATUS_LOOKBACK_MS: i64 = 35 * 86_400_000;

/// Each endpoint's last outcome for a vehicle: (endpoint, at, outcome, error type, code).
type Last = (Endpoint, UnixMillis, String, Option<String>, Option<String>);

fn last_outcomes(c: &Connection, vehicle: &str, now: UnixMillis) -> anyhow::Result<Vec<Last>> {
    let mut out = Vec::new();
    for endpoint in STATUS_ENDPOINTS {
        let row = queries::last_outcome(c, vehicle, endpoint.as_str(), now - STATUS_LOOKBACK_MS)
            .with_context(|| format!("reading the last {endpoint} outcome of {vehicle}"))?;
        if let Some((at, outcome, t, code)) = row {
            out.push((endpoint, at, outcome, t, code));
        }
    }
    Ok(out)
}

pub async fn status(cfg: &Config, out: &mut dyn Write) -> anyhow::Result<()> {
    let c = open_read_only(&cfg.store.path)?;
    let now = now_ms();
    let rows = queries::vehicle_summaries(&c)?;
    let last_write = rows
        .iter()
        .filter_map(|s| s.last_poll.as_ref().map(|p| p.at))
        .max();
    writeln!(
        out,
        "store: {} (last poll recorded {})",
        cfg.store.path.display(),
        last_write
            .map(|at| format!("{}, {}", ago(at, now), local(at)))
            .unwrap_or_else(|| "never".into())
    )?;
    writeln!(out, "daemon: {}", daemon_line(cfg))?;
    let conns = queries::load_connections(&c)?;
    // Without a config (`--db` alone), the store tells: connections made with API
    // Authentication hold no token.
    let guessed = cfg.source.is_none();
    let app_auth = if guessed {
        conns.iter().any(|k| k.tokens.refresh_expires_at == 0)
    } else {
        cfg.smartcar.app_auth()
    };
    writeln!(
        out,
        "connections: {} ({}{})",
        conns.len(),
        if app_auth {
            "v3 API Authentication: one application token, kept in memory"
        } else {
            "per-user Connect tokens"
        },
        if guessed {
            "; no config read, so as the store suggests"
        } else {
            ""
        }
    )?;
    // Why each connection's vehicles are not polled, if they are not.
    let mut holds = std::collections::HashMap::new();
    for k in &conns {
        let tokens = if k.tokens.refresh_expires_at == 0 {
            "no token stored (API Authentication)".to_owned()
        } else {
            format!(
                "access token expires {}, refresh token {}",
                ago(k.tokens.access_expires_at, now),
                ago(k.tokens.refresh_expires_at, now)
            )
        };
        writeln!(
            out,
            "  {:>4}  user {}  {}  {tokens}",
            k.id.0,
            k.user_id,
            k.status.as_str(),
        )?;
        let hold = if k.status == crate::domain::ConnectionStatus::Revoked {
            writeln!(out, "        revoked: Smartcar no longer lists it (the owner disconnected carpulse); its vehicles are not polled. Fix: `carpulse connect` as that account")?;
            Some("connection revoked by the owner: `carpulse connect` as that account")
        } else if app_auth && !crate::domain::is_real_user_id(&k.user_id) {
            writeln!(out, "        not polled: no Smartcar user id, which API Authentication sends as sc-user-id. Fix: `carpulse connect` as that account again")?;
            Some("its connection has no Smartcar user id: `carpulse connect` as that account again")
        } else if !app_auth && k.tokens.refresh_expires_at == 0 {
            writeln!(out, "        not polled: made with API Authentication, so it holds no per-user token. Fix: set smartcar.api_client_id and its secret again, or `carpulse connect` without them")?;
            Some("its connection holds no per-user token (made with API Authentication)")
        } else if !app_auth && k.status == crate::domain::ConnectionStatus::NeedsReauth {
            Some("its connection needs re-authorization: `carpulse reauth VEHICLE`")
        } else {
            None
        };
        holds.insert(k.id, hold);
    }
    // A store not yet migrated by this version has no blocks or billed calls to show.
    let blocks = queries::load_blocks(&c).unwrap_or_default();
    let month = queries::calls_since(&c, crate::daemon::gate::month_start(now), cfg.smartcar.api)
        .unwrap_or_default();
    let budget = cfg
        .budget
        .calls_per_vehicle_month
        .map(|b| format!(" of {b}"))
        .unwrap_or_default();
    writeln!(
        out,
        "vehicles: {}; Smartcar calls billed this month: {}{}",
        rows.len(),
        month.values().sum::<u64>(),
        if budget.is_empty() {
            String::new()
        } else {
            format!(" (budget{budget} per vehicle)")
        }
    )?;
    for s in rows {
        let v = &s.vehicle;
        let id = v.vehicle_id.0.as_str();
        let name = vehicle_name(v.make.as_deref(), v.model.as_deref(), v.year);
        let mut blocked: Vec<String> = Vec::new();
        if !v.enabled {
            blocked.push("disabled: `carpulse vehicles enable ID` to poll it again".into());
        }
        if let Some(Some(why)) = holds.get(&v.connection_id) {
            blocked.push((*why).to_owned());
        }
        for b in blocks.iter().filter(|b| b.vehicle_id == v.vehicle_id) {
            use crate::domain::BlockScope;
            let what = match (&b.scope, b.until) {
                (BlockScope::Vehicle, _) => format!("paused ({}): `carpulse reauth ID` or `carpulse vehicles enable ID` once fixed", b.reason),
                (BlockScope::Wait, Some(until)) if until <= now => continue,
                (BlockScope::Wait, Some(until)) if b.reason == "no_data" => format!(
                    "Smartcar holds no signals for it (an empty listing; likely not subscribed to a webhook: subscribe it in Smartcar's dashboard); asked again {}",
                    ago(until, now)
                ),
                (BlockScope::Wait, Some(until)) => format!("waiting ({}): not called until {}", b.reason, ago(until, now)),
                (scope, _) => format!("not polled: {} ({}; from {})", scope.column(), b.reason, b.source),
            };
            blocked.push(what);
        }
        let polled = v.enabled && !matches!(holds.get(&v.connection_id), Some(Some(_)));
        writeln!(
            out,
            "  {}  {}  {}; {} calls billed this month{budget}",
            vehicle_label(id, &name),
            id,
            if polled { "polled" } else { "NOT POLLED" },
            month.get(&v.vehicle_id).copied().unwrap_or(0)
        )?;
        for b in &blocked {
            writeln!(out, "      {b}")?;
        }
        let last = last_outcomes(&c, id, now)?;
        if last.is_empty() {
            match &s.last_poll {
                Some(p) => writeln!(
                    out,
                    "      last polled {} ({}: {})",
                    ago(p.at, now),
                    p.endpoint,
                    p.outcome
                )?,
                None => writeln!(out, "      never polled")?,
            }
        }
        for (endpoint, at, outcome, t, code) in last {
            let why = match (t, code) {
                (Some(t), Some(c)) => format!(" ({t}:{c})"),
                (Some(t), None) => format!(" ({t})"),
                _ => String::new(),
            };
            writeln!(
                out,
                "      {endpoint:<12} {:<16} {}{why}",
                outcome,
                ago(at, now)
            )?;
        }
    }
    let mut stmt = c.prepare(
        "SELECT vehicle_id, at, endpoint, outcome, error_type, error_code FROM poll_events
         WHERE outcome <> 'ok' AND at > ?1 ORDER BY at DESC LIMIT 10",
    )?;
    type ErrorRow = (String, i64, String, String, Option<String>, Option<String>);
    let errors: Vec<ErrorRow> = stmt
        .query_map([now - 24 * 3600 * 1000], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    writeln!(out, "recent errors (24 h): {}", errors.len())?;
    for (v, at, ep, outcome, t, code) in errors {
        writeln!(
            out,
            "  {}  {}  {ep}  {outcome}  {}{}",
            ago(at, now),
            short_id(&v),
            t.unwrap_or_default(),
            code.map(|c| format!(":{c}")).unwrap_or_default()
        )?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ago;

    #[test]
    fn relative_times() {
        assert_eq!(ago(0, 30_000), "30 s ago");
        assert_eq!(ago(0, 600_000), "10 min ago");
        assert_eq!(ago(0, 5_400_000), "1 h 30 min ago");
        assert_eq!(ago(3_600_000 * 3, 0), "in 3 h 0 min");
        assert_eq!(ago(0, 86_400_000 * 3), "3 days ago");
    }

    #[test]
    fn vehicles_by_id_prefix_or_make_and_model() {
        use super::{pick_vehicle, KnownVehicle};
        let v = |id: &str, name: &str| KnownVehicle {
            id: id.into(),
            name: name.into(),
        };
        let known = [
            v("5f2d4a21-aaaa", "TESLA Model 3 2021"),
            v("5f2d9999-bbbb", "TESLA Model Y 2022"),
            v("c0ffee00-cccc", "VOLKSWAGEN ID.4 2023"),
        ];
        let pick = |q: &str| {
            pick_vehicle(&known, q)
                .map(|k| k.id)
                .map_err(|e| e.to_string())
        };
        assert_eq!(pick("c0ffee00-cccc").unwrap(), "c0ffee00-cccc");
        assert_eq!(pick("C0FF").unwrap(), "c0ffee00-cccc");
        assert_eq!(pick("model 3").unwrap(), "5f2d4a21-aaaa");
        assert_eq!(pick("tesla model y").unwrap(), "5f2d9999-bbbb");
        assert_eq!(pick("id.4").unwrap(), "c0ffee00-cccc");
        let e = pick("tesla").unwrap_err();
        assert!(
            e.contains("matches 2 vehicles") && e.contains("5f2d9999-bbbb"),
            "{e}"
        );
        let e = pick("5f2d").unwrap_err();
        assert!(e.contains("matches 2 vehicles"), "{e}");
        let e = pick("typo").unwrap_err();
        assert!(
            e.contains("no vehicle matches \"typo\"")
                && e.contains("c0ffee00-cccc  VOLKSWAGEN ID.4 2023"),
            "{e}"
        );
        assert!(pick_vehicle(&[], "x")
            .unwrap_err()
            .to_string()
            .contains("no vehicles"));
    }
}
