//! `carpulse reauth VEHICLE`: get a vehicle polled again after its owner's consent or login
//! broke, keeping its history (the vehicle row, and every reading keyed by it, stays).
//!
//! Two flows, as Smartcar has them (smartcar-api.md §0, §1.1, §1.2):
//! - **connect**: Connect again for the vehicle's account (`approval_prompt=force`, its make
//!   preselected). For a connection that `needs_reauth` (its refresh token is dead) or a
//!   permission the old consent did not grant. The new grant must cover the vehicle, or
//!   nothing is stored; the account's connection row is updated in place.
//! - **reauthenticate**: `/oauth/reauthenticate?response_type=vehicle_id`, for a vehicle paused
//!   by CONNECTED_SERVICES_ACCOUNT (the owner's manufacturer login changed). The tokens stay
//!   valid; the redirect carries `vehicle_id`, and the pause is lifted.

use std::time::Duration;

use anyhow::{bail, Context};
use oauth2::url::Url;

use crate::cli::connect::{await_callback, Options};
use crate::config::Config;
use crate::domain::{ConnectionStatus, VehicleId};
use crate::store::{queries, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flow {
    Connect,
    Reauthenticate,
}

/// The re-auth URL: Connect's host, path `/oauth/reauthenticate`.
pub fn reauthenticate_url(
    cfg: &Config,
    vehicle: &VehicleId,
    state: &str,
) -> anyhow::Result<String> {
    let sc = &cfg.smartcar;
    let mut url = Url::parse(&sc.connect_url).context("smartcar.connect_url")?;
    let path = match url.path().rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/reauthenticate"),
        None => "/oauth/reauthenticate".to_owned(),
    };
    url.set_path(&path);
    url.set_query(None);
    url.query_pairs_mut()
        .append_pair("response_type", "vehicle_id")
        .append_pair("client_id", &sc.client_id)
        .append_pair("vehicle_id", &vehicle.0)
        .append_pair("redirect_uri", &sc.redirect_uri)
        .append_pair("state", state);
    Ok(url.to_string())
}

/// What the store says about the vehicle, to pick a flow and to explain it.
struct Known {
    make: Option<String>,
    connection_status: ConnectionStatus,
    paused_by_account: bool,
}

async fn look_up(store: &Store, vehicle: &VehicleId) -> anyhow::Result<Known> {
    let id = vehicle.clone();
    store
        .call(move |c| {
            let Some(v) = queries::load_vehicles(c)?
                .into_iter()
                .find(|v| v.vehicle_id == id)
            else {
                bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
            };
            let connection_status = queries::load_connections(c)?
                .into_iter()
                .find(|k| k.id == v.connection_id)
                .map(|k| k.status)
                .unwrap_or(ConnectionStatus::NeedsReauth);
            let paused_by_account = queries::load_blocks(c)?.iter().any(|b| {
                b.vehicle_id == id
                    && b.scope == crate::domain::BlockScope::Vehicle
                    && b.reason.starts_with("CONNECTED_SERVICES_ACCOUNT")
            });
            Ok(Known {
                make: v.make,
                connection_status,
                paused_by_account,
            })
        })
        .await
}

/// Runs the flow on bound redirect listeners; returns what to tell the user.
pub async fn run(
    cfg: &Config,
    store: &Store,
    redirect: impl Into<crate::cli::connect::Redirect>,
    on_url: impl FnOnce(&str),
    wait: Duration,
    vehicle: &VehicleId,
    flow: Option<Flow>,
) -> anyhow::Result<String> {
    let known = look_up(store, vehicle).await?;
    let flow = flow.unwrap_or(
        if known.paused_by_account && known.connection_status == ConnectionStatus::Active {
            Flow::Reauthenticate
        } else {
            Flow::Connect
        },
    );
    match flow {
        Flow::Connect => {
            let options = Options {
                must_include: Some(vehicle.clone()),
                make: known.make.clone(),
            };
            let c =
                crate::cli::connect::run_with(cfg, store, redirect, on_url, wait, &options).await?;
            Ok(format!(
                "{}vehicle {vehicle} is re-authorized through connection {}; its history is kept. \
                 A running daemon picks this up within a minute (or now: systemctl reload carpulse)\n",
                crate::cli::connect::describe(&c),
                c.connection
            ))
        }
        Flow::Reauthenticate => {
            let state = crate::cli::connect::random_state();
            let url = reauthenticate_url(cfg, vehicle, &state)?;
            await_callback(cfg, redirect, &url, &state, on_url, wait, |p| async move {
                match p.get("vehicle_id") {
                    Some(v) if v == &vehicle.0 => {}
                    Some(other) => bail!("Smartcar re-authenticated vehicle {other}, not {vehicle}"),
                    None => bail!("the re-authentication redirect carried no vehicle_id"),
                }
                let id = vehicle.clone();
                let lifted = store
                    .call(move |c| queries::lift_pause(c, &id, "CONNECTED_SERVICES_ACCOUNT"))
                    .await
                    .with_context(|| format!("lifting the pause of vehicle {vehicle}"))?;
                let msg = format!(
                    "vehicle {vehicle}: the owner's login is fixed; lifted {lifted} block(s). A running \
                     daemon polls it again within a minute (or now: systemctl reload carpulse)\n"
                );
                Ok((msg, "carpulse will poll this vehicle again. You can close this tab.".into()))
            })
            .await
        }
    }
}

/// `carpulse reauth VEHICLE` from the command line.
pub async fn run_cli(
    cfg: Config,
    vehicle: &str,
    flow: Option<Flow>,
    wait: Duration,
    paste: bool,
) -> anyhow::Result<()> {
    crate::cli::report::open_read_only(&cfg.store.path)?; // never create a store to re-authorize in
    let redirect = crate::cli::connect::redirect_for_cli(&cfg, paste).await?;
    let hint = crate::cli::connect::redirect_hint(&cfg, &redirect);
    let store = Store::open(&cfg.store.path, None)
        .with_context(|| format!("opening the store {}", cfg.store.path.display()))?;
    let result = run(
        &cfg,
        &store,
        redirect,
        |url| {
            eprintln!("Open this URL in a browser, as the vehicle's owner ({hint}):");
            println!("{url}");
        },
        wait,
        &VehicleId(vehicle.to_owned()),
        flow,
    )
    .await;
    store.close().await?;
    print!("{}", result?);
    Ok(())
}

/// `carpulse reauth VEHICLE --retry`: tries the grant on file once more (one refresh with
/// the stored refresh token). On success the rotated pair is saved before anything else and
/// the connection is active again; a running daemon adopts it at its next reload. Only for a
/// connection marked `needs_reauth`: refreshing an active one here would race the daemon's own
/// single-flight refresh.
pub async fn retry_stored_grant(
    cfg: &Config,
    store: &Store,
    vehicle: &VehicleId,
) -> anyhow::Result<String> {
    let id = vehicle.clone();
    let record = store
        .call(move |c| {
            let Some(v) = queries::load_vehicles(c)?
                .into_iter()
                .find(|v| v.vehicle_id == id)
            else {
                bail!("no vehicle {id} in the store (see `carpulse vehicles list`)");
            };
            queries::load_connections(c)?
                .into_iter()
                .find(|k| k.id == v.connection_id)
                .with_context(|| format!("vehicle {id}: its connection is not in the store"))
        })
        .await?;
    let conn = record.id;
    if record.status != ConnectionStatus::NeedsReauth {
        return Ok(format!(
            "connection {conn} of vehicle {vehicle} is {}, not needs_reauth: nothing to retry\n",
            record.status.as_str()
        ));
    }
    let client = crate::smartcar::SmartcarClient::new(crate::daemon::app::client_config(cfg))
        .context("creating the Smartcar client")?;
    let old = record.tokens.refresh_token.clone();
    let pair = match client.refresh(&old).await {
        Ok(pair) => pair,
        Err(e) if e.needs_reauth() => bail!(
            "Smartcar refused the grant on file again ({e}): the owner must reconnect; run              `carpulse reauth {vehicle}` without --retry"
        ),
        Err(e) => bail!(
            "the token endpoint could not be reached or refused carpulse itself ({e}); the              connection stays needs_reauth; try again later"
        ),
    };
    let saved = store
        .call(move |c| {
            let r = queries::save_rotated(c, conn, &old, &pair, crate::domain::now_ms())?;
            if matches!(r, queries::Rotation::Saved) {
                queries::set_connection_status(
                    c,
                    conn,
                    ConnectionStatus::Active,
                    crate::domain::now_ms(),
                )?;
            }
            Ok(r)
        })
        .await
        .with_context(|| format!("saving the refreshed tokens of connection {conn}"))?;
    match saved {
        queries::Rotation::Saved => Ok(format!(
            "connection {conn} of vehicle {vehicle}: Smartcar accepted the grant on file; the \
             connection is active again. A running daemon picks this up within a minute (or \
             now: systemctl reload carpulse)\n"
        )),
        queries::Rotation::Superseded(_) => Ok(format!(
            "connection {conn} of vehicle {vehicle}: a newer grant was stored meanwhile (a \
             reconnect); it is kept\n"
        )),
    }
}

/// `carpulse reauth VEHICLE --retry` from the command line.
pub async fn retry_cli(cfg: Config, vehicle: &str) -> anyhow::Result<()> {
    crate::cli::report::open_read_only(&cfg.store.path)?; // never create a store here
    let store = Store::open(&cfg.store.path, None)
        .with_context(|| format!("opening the store {}", cfg.store.path.display()))?;
    let result = retry_stored_grant(&cfg, &store, &VehicleId(vehicle.to_owned())).await;
    store.close().await?;
    print!("{}", result?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reauthenticate_url_is_smartcars() {
        struct NoEnv;
        impl crate::config::Env for NoEnv {
            fn var(&self, _: &str) -> Option<String> {
                None
            }
        }
        let cfg = Config::parse(
            "[smartcar]\nclient_id = \"cid\"\nclient_secret = \"s\"\n",
            "c.toml",
            &NoEnv,
        )
        .unwrap();
        let url = reauthenticate_url(&cfg, &VehicleId("v-1".into()), "st").unwrap();
        assert_eq!(
            url,
            "https://connect.smartcar.com/oauth/reauthenticate?response_type=vehicle_id&client_id=cid\
             &vehicle_id=v-1&redirect_uri=http%3A%2F%2Flocalhost%3A8000%2Fexchange&state=st"
        );
    }
}
