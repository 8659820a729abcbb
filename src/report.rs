//! The read-mostly CLI commands `vehicles list`, `vehicles enable/disable` and `status`
//! (`vehicles remove` is in `admin`). They read the store through their own read-only
//! connection (WAL lets them run beside the daemon) and never create a store that isn't there.

use std::path::Path;

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use crate::config::Config;
use crate::domain::{now_ms, UnixMillis, VehicleId};
use crate::store::{queries, Store};

/// Opens an existing store read-only.
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    if !path.exists() {
        bail!(
            "no store at {} (store.path): run `carpulse connect` first, or point --config at the right file",
            path.display()
        );
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
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

pub async fn vehicles_list(cfg: &Config) -> anyhow::Result<()> {
    let c = open_read_only(&cfg.store.path)?;
    let rows = queries::vehicle_summaries(&c)?;
    if rows.is_empty() {
        println!("no vehicles stored: run `carpulse connect`");
        return Ok(());
    }
    let now = now_ms();
    println!(
        "{:<38} {:<28} {:<12} {:<8} {:>7} {:>9} {:<14} LAST READING",
        "VEHICLE", "MAKE MODEL YEAR", "CONNECTION", "ENABLED", "SOC %", "RANGE KM", "CHARGE"
    );
    for s in rows {
        let v = &s.vehicle;
        let name = format!(
            "{} {} {}",
            v.make.as_deref().unwrap_or("?"),
            v.model.as_deref().unwrap_or("?"),
            v.year.map(|y| y.to_string()).unwrap_or_default()
        );
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
            .map(|b| ago(b.stamp.recorded_at, now))
            .unwrap_or("never".into());
        println!(
            "{:<38} {:<28} {:<12} {:<8} {:>7} {:>9} {:<14} {}",
            v.vehicle_id,
            name,
            s.connection_status.as_str(),
            if v.enabled { "yes" } else { "no" },
            soc,
            range,
            charge,
            last
        );
    }
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
            let lifted = if enabled {
                queries::clear_blocks(c, &vid, true)?
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
            "lifted {lifted} block(s) that earlier answers had set (a pause or disabled endpoints)"
        );
    }
    Ok(())
}

pub async fn status(cfg: &Config) -> anyhow::Result<()> {
    let c = open_read_only(&cfg.store.path)?;
    let now = now_ms();
    let conns = queries::load_connections(&c)?;
    println!("store: {}", cfg.store.path.display());
    let app_auth = cfg.smartcar.app_auth();
    println!(
        "connections: {} ({})",
        conns.len(),
        if app_auth {
            "v3 API Authentication: one application token, kept in memory"
        } else {
            "per-user Connect tokens"
        }
    );
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
        println!(
            "  {:>4}  user {}  {}  {tokens}",
            k.id.0,
            k.user_id,
            k.status.as_str(),
        );
        // Why a connection's vehicles are not polled, in words.
        if k.status == crate::domain::ConnectionStatus::Revoked {
            println!("        revoked: Smartcar no longer lists it (the owner disconnected carpulse); its vehicles are not polled. Fix: `carpulse connect` as that account");
        } else if app_auth && !crate::domain::is_real_user_id(&k.user_id) {
            println!("        not polled: no Smartcar user id, which API Authentication sends as sc-user-id. Fix: `carpulse connect` as that account again");
        } else if !app_auth && k.tokens.refresh_expires_at == 0 {
            println!("        not polled: made with API Authentication, so it holds no per-user token. Fix: set smartcar.api_client_id and its secret again, or `carpulse connect` without them");
        }
    }
    let rows = queries::vehicle_summaries(&c)?;
    // A store not yet migrated by this version has no blocks or billed calls to show.
    let blocks = queries::load_blocks(&c).unwrap_or_default();
    let month = queries::calls_since(&c, crate::gate::month_start(now), cfg.smartcar.api)
        .unwrap_or_default();
    let budget = cfg
        .budget
        .calls_per_vehicle_month
        .map(|b| format!(" of {b}"))
        .unwrap_or_default();
    println!("vehicles: {}", rows.len());
    for s in rows {
        let last = match &s.last_poll {
            Some(p) => format!(
                "last poll {} {} {}{}",
                ago(p.at, now),
                p.endpoint,
                p.outcome,
                match (&p.error_type, &p.error_code) {
                    (Some(t), Some(c)) => format!(" ({t}:{c})"),
                    (Some(t), None) => format!(" ({t})"),
                    _ => String::new(),
                }
            ),
            None => "never polled".into(),
        };
        println!(
            "  {}  {}  {}; {} calls this month{budget}",
            s.vehicle.vehicle_id,
            if s.vehicle.enabled {
                "enabled"
            } else {
                "disabled"
            },
            last,
            month.get(&s.vehicle.vehicle_id).copied().unwrap_or(0)
        );
        for b in blocks
            .iter()
            .filter(|b| b.vehicle_id == s.vehicle.vehicle_id)
        {
            let what = match (b.endpoint.as_str(), b.until) {
                ("*", _) => "paused".to_owned(),
                ("~", Some(until)) if until <= now => continue,
                ("~", Some(until)) if b.reason == "no_data" => format!(
                    "Smartcar holds no signals for it (an empty listing; likely not subscribed to a webhook: subscribe it in Smartcar's dashboard); asked again {}",
                    ago(until, now)
                ),
                ("~", Some(until)) => format!("not called until {}", ago(until, now)),
                (endpoint, _) => format!("not polled: {endpoint}"),
            };
            println!("      {what} ({}; from {})", b.reason, b.source);
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
    println!("recent errors (24 h): {}", errors.len());
    for (v, at, ep, outcome, t, code) in errors {
        println!(
            "  {}  {v}  {ep}  {outcome}  {}{}",
            ago(at, now),
            t.unwrap_or_default(),
            code.map(|c| format!(":{c}")).unwrap_or_default()
        );
    }
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
}
