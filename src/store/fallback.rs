//! The fallback file for rotated token pairs the token store refused (a full disk, a lock
//! held too long): `<store>.unsaved-tokens.json` beside the history, mode 0600.
//!
//! Why a file at all: Smartcar invalidates a used refresh token within about a minute, so a
//! rotated pair that exists only in the daemon's memory is the only key to that connection.
//! When the store still refuses it at shutdown, the daemon writes it here (a small file in
//! a fresh inode often fits where a SQLite transaction does not: no WAL frame, no journal), and
//! every read-write open of the store ([`super::Store::open`]) merges it into the token store
//! before anything reads a token, then removes it. Until the merge succeeds the file stays, and
//! the store refuses to open (a restartable error), so the old, invalidated refresh token is
//! never used in its place.
//!
//! The merge goes through [`queries::save_rotated`]: a pair is saved only while the store
//! still holds the refresh token it replaced, so a newer grant from a reconnect is never
//! overwritten by a stale fallback.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rusqlite::Connection;
use serde_json::{json, Value};

use super::queries;
use crate::domain::{now_ms, ConnectionId, Secret, TokenPair};

/// The file's mode: it holds refresh tokens, like the token store.
pub const MODE: u32 = 0o600;

/// One rotated pair the store refused.
#[derive(Clone, Debug)]
pub struct Unsaved {
    pub connection_id: ConnectionId,
    pub user_id: String,
    /// The refresh token the token store still holds for this connection (the pair replaces
    /// it).
    pub replaces: Secret,
    pub tokens: TokenPair,
}

/// Where the fallback file of the history at `history` lives: beside it, named after it
/// (`carpulse.db` → `carpulse.unsaved-tokens.json`).
pub fn path_for(history: &Path) -> PathBuf {
    let stem = history
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "carpulse".into());
    history.with_file_name(format!("{stem}.unsaved-tokens.json"))
}

fn to_json(u: &Unsaved) -> Value {
    json!({
        "connection_id": u.connection_id.0,
        "user_id": u.user_id,
        "replaces": u.replaces.expose(),
        "access_token": u.tokens.access_token.expose(),
        "refresh_token": u.tokens.refresh_token.expose(),
        "access_expires_at": u.tokens.access_expires_at,
        "refresh_expires_at": u.tokens.refresh_expires_at,
    })
}

fn from_json(v: &Value) -> Option<Unsaved> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let i = |k: &str| v.get(k).and_then(Value::as_i64);
    Some(Unsaved {
        connection_id: ConnectionId(i("connection_id")?),
        user_id: s("user_id")?,
        replaces: Secret::new(s("replaces")?),
        tokens: TokenPair {
            access_token: Secret::new(s("access_token")?),
            refresh_token: Secret::new(s("refresh_token")?),
            access_expires_at: i("access_expires_at")?,
            refresh_expires_at: i("refresh_expires_at")?,
        },
    })
}

/// Reads the fallback file; `None` if there is none.
pub fn read(path: &Path) -> anyhow::Result<Option<Vec<Unsaved>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the JSON carpulse writes", path.display()))?;
    let Some(entries) = doc.get("pairs").and_then(Value::as_array) else {
        bail!("{}: no `pairs` list", path.display());
    };
    entries
        .iter()
        .enumerate()
        .map(|(n, e)| {
            from_json(e).with_context(|| format!("{}: pair {n} is incomplete", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

/// Writes `entries` (merged over what the file already holds, per connection) durably: a
/// temporary file created 0600, synced, renamed over the file, and the directory synced.
pub fn write(path: &Path, entries: &[Unsaved]) -> anyhow::Result<()> {
    let mut all = read(path).unwrap_or_default().unwrap_or_default();
    all.retain(|old| !entries.iter().any(|e| e.connection_id == old.connection_id));
    all.extend(entries.iter().cloned());
    let doc = json!({
        "what": "OAuth token pairs carpulse could not save in its token store; the next start merges them, then removes this file",
        "written_at": now_ms(),
        "pairs": all.iter().map(to_json).collect::<Vec<_>>(),
    });
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(MODE)
        .open(&tmp)
        .with_context(|| format!("creating {} (mode 600)", tmp.display()))?;
    let write = (|| {
        file.write_all(doc.to_string().as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = write {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    drop(file);
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    sync_dir(path)
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Merges the fallback file beside the history at `history` into the token store attached to
/// `c`, then removes it. Returns how many pairs were saved (a pair a reconnect superseded is
/// dropped: the newer grant wins). An error leaves the file in place.
pub fn merge(c: &mut Connection, history: &Path) -> anyhow::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let path = path_for(history);
    let Some(entries) = read(&path)? else {
        return Ok(0);
    };
    // Whoever copied it around: it holds tokens, so it is private again before anything else.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(MODE))
        .with_context(|| format!("setting the mode of {} to 600", path.display()))?;
    let mut saved = 0;
    for u in &entries {
        let now = now_ms();
        match queries::save_rotated(c, u.connection_id, &u.replaces, &u.tokens, now) {
            Ok(queries::Rotation::Saved) => saved += 1,
            Ok(queries::Rotation::Superseded(r)) => {
                if r.tokens.refresh_token == u.tokens.refresh_token {
                    saved += 1; // already there
                } else {
                    tracing::info!(connection = %u.connection_id, "the fallback pair is older than the grant the store holds (a reconnect); keeping the store's");
                }
            }
            Err(e) => {
                // A connection removed since: nothing to save it to.
                if queries::load_connections(c)?
                    .iter()
                    .any(|r| r.id == u.connection_id)
                {
                    return Err(e).with_context(|| {
                        format!(
                            "saving the pair of connection {} from {}",
                            u.connection_id,
                            path.display()
                        )
                    });
                }
                tracing::warn!(connection = %u.connection_id, "the fallback file holds a pair of a connection no longer stored; dropping it");
            }
        }
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    sync_dir(&path)?;
    tracing::info!(
        file = %path.display(),
        pairs = saved,
        "merged the token pairs saved at the last stop into the token store"
    );
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsaved(id: i64, refresh: &str) -> Unsaved {
        Unsaved {
            connection_id: ConnectionId(id),
            user_id: format!("user-{id}"),
            replaces: Secret::new(format!("old-{id}")),
            tokens: TokenPair {
                access_token: Secret::new(format!("a-{refresh}")),
                refresh_token: Secret::new(refresh),
                access_expires_at: 1,
                refresh_expires_at: 2,
            },
        }
    }

    #[test]
    fn the_file_is_named_after_the_history() {
        assert_eq!(
            path_for(Path::new("/var/lib/carpulse/carpulse.db")),
            Path::new("/var/lib/carpulse/carpulse.unsaved-tokens.json")
        );
    }

    #[test]
    fn a_write_is_private_and_merges_per_connection() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("carpulse.db"));
        write(&path, &[unsaved(1, "r1"), unsaved(2, "r2")]).unwrap();
        write(&path, &[unsaved(2, "r2b")]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = read(&path).unwrap().unwrap();
        let got: Vec<_> = back
            .iter()
            .map(|u| {
                (
                    u.connection_id.0,
                    u.tokens.refresh_token.expose().to_owned(),
                )
            })
            .collect();
        assert_eq!(got, vec![(1, "r1".to_owned()), (2, "r2b".to_owned())]);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn an_unwritable_place_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("carpulse.db"));
        // A non-empty directory where the file should go: the rename fails even for root.
        std::fs::create_dir_all(path.join("x")).unwrap();
        assert!(write(&path, &[unsaved(1, "r1")]).is_err());
    }
}
