//! Exit codes (sysexits.h) and the errors that choose them, so that systemd can tell a failure
//! a restart may cure from one it cannot: the unit lists the permanent ones in
//! `RestartPreventExitStatus=` and the journal names the file or address at fault.
//!
//! | code | when |
//! |---|---|
//! | 78 EX_CONFIG | the config file is missing, unreadable or invalid ([`crate::config::ConfigError`]) |
//! | 73 EX_CANTCREAT | the store cannot be created, opened or migrated (permissions, a newer schema, a corrupt file, a full disk) |
//! | 69 EX_UNAVAILABLE | `metrics.listen` cannot be bound (in use, not an address of this host, not allowed) |
//! | 75 EX_TEMPFAIL | another `carpulse run` holds the store (the message names its pid) |
//! | 1 | anything else, including a store that was only busy (another process held its lock): a restart may cure those |

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::config::EX_CONFIG;

/// sysexits' EX_UNAVAILABLE: a service the daemon needs (its listening address) is unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// sysexits' EX_CANTCREAT: the store cannot be created or used.
pub const EX_CANTCREAT: u8 = 73;
/// sysexits' EX_TEMPFAIL: another `carpulse run` holds the store ([`crate::store::lock`]);
/// trying again once it has stopped may work.
pub const EX_TEMPFAIL: u8 = 75;

/// A failure a restart cannot cure, attached as context to the error that caused it.
#[derive(Debug, thiserror::Error)]
pub enum Permanent {
    #[error("opening the store {}", path.display())]
    Store { path: PathBuf },
    #[error("metrics.listen: cannot listen on {addr}")]
    Listener { addr: SocketAddr },
}

/// Whether SQLite only said the file was busy or locked (another process migrating it).
fn only_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    })
}

/// The exit code for an error that ended a command.
pub fn code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        return EX_CONFIG;
    }
    if e.is::<crate::store::lock::AlreadyRunning>() {
        return EX_TEMPFAIL;
    }
    match e.downcast_ref::<Permanent>() {
        Some(Permanent::Store { .. }) if !only_busy(e) => EX_CANTCREAT,
        Some(Permanent::Listener { .. }) => EX_UNAVAILABLE,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_permanent_failure_has_its_code_through_any_context() {
        let store: anyhow::Result<()> = Err(anyhow::anyhow!("permission denied"))
            .context(Permanent::Store {
                path: "/var/lib/carpulse/carpulse.db".into(),
            })
            .context("starting the daemon");
        let e = store.unwrap_err();
        assert_eq!(code(&e), EX_CANTCREAT);
        assert!(format!("{e:#}").contains("opening the store /var/lib/carpulse/carpulse.db"));

        let listen: anyhow::Result<()> = Err(std::io::Error::from(std::io::ErrorKind::AddrInUse))
            .context(Permanent::Listener {
                addr: "127.0.0.1:9841".parse().unwrap(),
            });
        let e = listen.unwrap_err();
        assert_eq!(code(&e), EX_UNAVAILABLE);
        assert!(format!("{e:#}").contains("cannot listen on 127.0.0.1:9841"));

        let config = anyhow::Error::from(crate::config::ConfigError("c.toml:1: x: bad".into()));
        assert_eq!(code(&config), EX_CONFIG);
        assert_eq!(code(&anyhow::anyhow!("a network hiccup")), 1);
    }

    #[test]
    fn a_busy_store_may_be_retried() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        );
        let e: anyhow::Result<()> = Err(busy).context(Permanent::Store {
            path: "x.db".into(),
        });
        assert_eq!(code(&e.unwrap_err()), 1);
    }
}
