//! The SQLite store. One owner thread holds the only read-write connection (SQLite allows one
//! writer; a thread of its own keeps blocking I/O off the async runtime), and everything else
//! talks to it over a bounded channel: `call` for queries and token saves, `write` for the
//! writer, which folds whatever is queued into one transaction. Readers elsewhere (the CLI,
//! Grafana, sqlite3) use WAL and never block it.

pub mod migrate;
pub mod queries;
pub mod writer;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::domain::{PollEvent, Reading, VehicleId, VehicleInfo};

/// Called on the owner thread after each committed write batch (the daemon feeds its row
/// counters from it).
pub type WriteObserver = Arc<dyn Fn(&WriteReport) + Send + Sync>;

/// One thing for the writer to store.
#[derive(Clone, Debug)]
pub enum WriteItem {
    Reading(VehicleId, Reading),
    Event(PollEvent),
    /// Updates make/model/year.
    Info(VehicleId, VehicleInfo),
    Vin(VehicleId, String),
}

/// What one write batch came to, per table label (`battery`, `charge`, `odometer`,
/// `poll_events`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteReport {
    pub written: Vec<(&'static str, u64)>,
    /// Rows not stored because that vehicle's reading at that `recorded_at` already was.
    pub duplicates: Vec<(&'static str, u64)>,
    /// Rows that could not be stored (unknown vehicle, failed transaction). Never silent.
    pub dropped: Vec<(&'static str, u64)>,
}

/// Messages queued for the owner thread; a bound so that a stalled disk slows the pollers
/// down instead of growing memory without limit.
const QUEUE: usize = 1024;
/// At most this many items go into one transaction.
const MAX_BATCH: usize = 20_000;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Msg {
    Call(Job),
    Write(Vec<WriteItem>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the owner thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Msg>,
    path: Arc<PathBuf>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Creates the file with mode 0600 (it holds OAuth tokens) before SQLite touches it; SQLite
/// gives its -wal and -shm files the same mode.
fn create_private(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        // Created by someone else in between: fine, SQLite opens it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Opens a read-write connection with the daemon's pragmas and migrates it.
pub fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    create_private(path)?;
    let mut c = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "the store could not switch to WAL; readers may block the writer"
        );
    }
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    migrate::migrate(&mut c).with_context(|| format!("store {}", path.display()))?;
    Ok(c)
}

impl Store {
    /// Creates (0600) or opens the file, sets pragmas, migrates, starts the owner thread.
    pub fn open(path: &Path, on_write: Option<WriteObserver>) -> anyhow::Result<Store> {
        let conn = open_connection(path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("carpulse-store".into())
            .spawn(move || owner(conn, rx, on_write))
            .context("starting the store thread")?;
        Ok(Store {
            tx,
            path: Arc::new(path.to_path_buf()),
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn closed(&self) -> anyhow::Error {
        anyhow!("the store {} is closed", self.path.display())
    }

    /// Runs `f` on the owner thread (reads, token saves, small writes).
    pub async fn call<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |c| {
            // A panic in a query must not take the owner thread (and every later write) down.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)))
                .unwrap_or_else(|_| Err(anyhow!("a store query panicked")));
            let _ = reply.send(r);
        });
        self.tx
            .send(Msg::Call(job))
            .await
            .map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    /// Queues items for the writer. Waits when the writer is behind (back-pressure); fails
    /// only when the store is closed.
    pub async fn write(&self, items: Vec<WriteItem>) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Msg::Write(items))
            .await
            .map_err(|_| self.closed())
    }

    /// Resolves when everything queued before it is committed.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Flush(reply))
            .await
            .map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())
    }

    /// Flushes and, when this is the last handle, stops the owner thread, which checkpoints
    /// the WAL and closes the connection.
    pub async fn close(self) -> anyhow::Result<()> {
        self.flush().await?;
        let Store { tx, thread, .. } = self;
        drop(tx);
        let handle = match Arc::try_unwrap(thread) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            // Other handles are alive; the thread stops when the last one goes.
            Err(_) => return Ok(()),
        };
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| anyhow!("joining the store thread: {e}"))?
                .map_err(|_| anyhow!("the store thread panicked"))?;
        }
        Ok(())
    }
}

fn owner(mut conn: Connection, mut rx: mpsc::Receiver<Msg>, on_write: Option<WriteObserver>) {
    let mut cache = writer::KeyCache::new();
    let mut pending: Option<Msg> = None;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match rx.blocking_recv() {
                Some(m) => m,
                None => break,
            },
        };
        match msg {
            Msg::Call(job) => {
                job(&mut conn);
                // The call may have removed or re-keyed vehicles.
                cache.clear();
            }
            Msg::Flush(reply) => {
                let _ = reply.send(());
            }
            Msg::Write(mut items) => {
                // Fold everything already queued into this transaction; stop at the first
                // non-write so calls and flushes keep their order.
                while items.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Write(more)) => items.extend(more),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let report = writer::apply(&mut conn, &mut cache, &items);
                if let Some(observe) = &on_write {
                    observe(&report);
                }
            }
        }
    }
    if let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(error = %e, "WAL checkpoint at close failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the store");
    }
}

#[cfg(test)]
mod tests;
