//! The SQLite store: one owner thread holds the only read-write `rusqlite::Connection`, and
//! async code talks to it through a bounded channel (STYLE habit 9).
//!
//! Why a dedicated thread and not a mutex or `spawn_blocking`: SQLite allows one writer at a
//! time anyway, and a single owner lets the writer batch everything queued into one
//! transaction (DESIGN §1 "one writer"), keeps the vehicle-key cache lock-free and never blocks
//! a tokio worker on disk I/O. Readers elsewhere (CLI, Grafana, sqlite3) use WAL and never
//! block it. Messages are handled in the order they were queued, so a [`Store::call`] sees
//! every write queued before it.
//!
//! Two files (DESIGN §3 "tokens never live in it"): the history at `store.path`, created 0640
//! so that an account in carpulse's group (Grafana) can read it, with its `-wal` and `-shm`
//! kept on disk between runs (a reader without write access to the directory cannot create
//! them); and the token store beside it, 0600 ([`token_store`]), attached to the same
//! connection. Opening refuses a store written by a newer carpulse, snapshots a store before
//! migrating it ([`backup::snapshot_before_migration`]), moves tokens out of an old history
//! and then VACUUMs it so that no page keeps their bytes.

pub mod backup;
pub mod fallback;
pub mod lock;
pub mod migrate;
pub mod queries;
pub mod retention;
pub mod rollup;
pub mod token_store;
mod writer;

pub use writer::{WriteItem, WriteObserver, WriteReport};

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

/// Messages queued before the senders wait (back-pressure). A message is a whole batch of
/// items from one poll (a few hundred bytes), so this is a few MB at most. At 256 a burst of
/// 4,000 polls/s filled the queue while the writer lingered (below), and every poll then
/// waited for a permit the store thread handed back through a wake-up of the runtime: ~230
/// extra wake-ups a second in the fleet bench (strace), ~4 µs per poll.
const QUEUE_CAPACITY: usize = 4096;
/// Upper bound of items per transaction, so one commit never grows without limit while the
/// queue keeps filling.
const MAX_BATCH_ITEMS: usize = 50_000;
/// How long a write waits for more writes to join its transaction. A commit (WAL frames for
/// every page touched) cost more than the rows of a poll in the fleet profile, so polls that
/// answer within a few milliseconds of each other share one; a reading is committed this much
/// later at most. Anything that is not a write ends the wait at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);
/// Batches at least this large are committed without lingering (the writer that queues the
/// item crossing it wakes the owner, see [`Wake`]).
const LINGER_UNTIL_ITEMS: usize = 2_000;
/// Rows kept in memory while the store refuses writes (a user's `sqlite3` holding the write
/// lock past the busy timeout, a full disk): about 20 MB at most, hours of a small fleet's
/// polls. Rows past it are dropped and counted (`carpulse_rows_dropped_total`).
pub const PENDING_MAX: usize = 100_000;
/// How often rows the store refused are offered again (each try waits up to the busy timeout).
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long closing keeps offering refused rows before it drops them (counted): a stop must
/// end within systemd's TimeoutStopSec.
const CLOSE_RETRY: Duration = Duration::from_secs(8);
/// The owner's nap between looks at its queue while rows wait for a retry.
const RETRY_NAP: Duration = Duration::from_millis(50);
/// How often a store that keeps refusing writes is logged again.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the writer knows about the store's health, for `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Since when (unix ms) writes are refused; `None` once a write is committed again.
    pub failing_since: Option<crate::domain::UnixMillis>,
    /// The last refusal (no secrets: SQLite's message and our context).
    pub last_error: Option<String>,
    /// Rows kept in memory for the next try.
    pub pending_rows: usize,
    /// Rows the writer dropped since start (a batch refused for good, or past [`PENDING_MAX`]).
    pub dropped_rows: u64,
    /// When it last dropped any.
    pub last_dropped_at: Option<crate::domain::UnixMillis>,
}

/// How long rows dropped by the store keep `/healthz` at 503.
pub const DROPPED_HEALTH_WINDOW_MS: i64 = 15 * 60 * 1000;

/// The `/healthz` lines for a store's health at `now` (see [`Store::problems`]).
pub fn health_problems(
    h: &StoreHealth,
    path: &Path,
    now: crate::domain::UnixMillis,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(since) = h.failing_since {
        out.push(format!(
            "the store {} refuses writes for {} s ({}); {} row(s) are kept in memory and tried again every {} s (at most {PENDING_MAX}; past that they are dropped)",
            path.display(),
            (now - since).max(0) / 1000,
            h.last_error.as_deref().unwrap_or("no detail"),
            h.pending_rows,
            RETRY_EVERY.as_secs(),
        ));
    }
    if let Some(at) = h
        .last_dropped_at
        .filter(|at| now - at < DROPPED_HEALTH_WINDOW_MS)
    {
        out.push(format!(
            "the store dropped rows {} s ago ({} since start, carpulse_rows_dropped_total); this clears {} min after the last drop",
            (now - at).max(0) / 1000,
            h.dropped_rows,
            DROPPED_HEALTH_WINDOW_MS / 60_000,
        ));
    }
    out
}

type SharedHealth = std::sync::Arc<std::sync::Mutex<StoreHealth>>;

/// How senders end the owner thread's linger early. The owner lingers parked
/// (`std::thread::park_timeout` until the linger's deadline), not in a loop of short sleeps:
/// the 2 ms naps it took before were ~50 wake-ups per batch, 1.6 % of the daemon's CPU in the
/// fleet profile. A write wakes it only when it brings the items queued since the batch began
/// to [`LINGER_UNTIL_ITEMS`]; anything that is not a write wakes it at once (it ends the
/// batch). A wake-up is never lost: `unpark` before `park` makes the park return at once, and
/// the count is raised before the message is sent. A spurious one costs one look at the queue.
struct Wake {
    /// Items sent and not yet taken into a batch the owner has finished gathering.
    unbatched: std::sync::atomic::AtomicUsize,
    /// The owner thread, set once it is spawned.
    owner: std::sync::OnceLock<std::thread::Thread>,
}

impl Wake {
    fn unpark(&self) {
        if let Some(t) = self.owner.get() {
            t.unpark();
        }
    }

    /// Counts `n` items about to be queued; true if they complete a batch, and the sender
    /// should wake the owner once they are sent (so it finds them when it looks).
    fn queued(&self, n: usize) -> bool {
        let before = self
            .unbatched
            .fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        before < LINGER_UNTIL_ITEMS && before + n >= LINGER_UNTIL_ITEMS
    }

    /// Takes `n` items out of the count (queued ones the owner gathered, or a send that failed).
    fn taken(&self, n: usize) {
        self.unbatched
            .fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

fn lock_health(h: &SharedHealth) -> std::sync::MutexGuard<'_, StoreHealth> {
    // Held only to copy or set a few fields; a poisoned one still holds valid data.
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether SQLite refused a write for a reason that may pass (a lock, a full disk, an I/O or
/// read-only error), so the batch is kept and retried rather than dropped.
fn retryable(e: &anyhow::Error) -> bool {
    use rusqlite::ErrorCode::*;
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, DatabaseBusy | DatabaseLocked | DiskFull | SystemIoFailure | ReadOnly)
        )
    })
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Msg {
    Write(Vec<WriteItem>),
    Control(Control),
}

/// Everything that is not a write: it ends the current batch.
enum Control {
    Call(Job),
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<anyhow::Result<()>>),
}

/// Handle to the owner thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Msg>,
    wake: std::sync::Arc<Wake>,
    health: SharedHealth,
    /// The history's path (the token store and the fallback file are named after it).
    path: std::sync::Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("closed", &self.tx.is_closed())
            .finish()
    }
}

fn closed() -> anyhow::Error {
    anyhow!("the store is closed")
}

impl Store {
    /// Creates (history 0640, tokens 0600) / opens, sets pragmas, migrates, starts the owner
    /// thread. `on_write` is called on the owner thread after each committed write batch (the
    /// daemon feeds its metrics from it); a failed batch is reported too, with every row
    /// dropped. An error carries [`crate::exit::Permanent::Store`] (exit 73) unless the file
    /// was only busy.
    pub fn open(path: &Path, on_write: Option<WriteObserver>) -> anyhow::Result<Store> {
        let mut conn = open_connection(path).map_err(|e| {
            e.context(crate::exit::Permanent::Store {
                path: path.to_path_buf(),
            })
        })?;
        // Before anyone reads a token: the pairs the daemon could only save beside the store
        // at its last stop. Not a permanent failure (exit 1, so systemd tries again): the
        // file stays until the store takes them, and the stale pairs are never used.
        fallback::merge(&mut conn, path).with_context(|| {
            format!(
                "merging the token pairs saved at the last stop ({}) into the token store; they stay in that file until it works",
                fallback::path_for(path).display()
            )
        })?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let health = SharedHealth::default();
        let wake = std::sync::Arc::new(Wake {
            unbatched: std::sync::atomic::AtomicUsize::new(0),
            owner: std::sync::OnceLock::new(),
        });
        let owner = Owner {
            conn,
            writer: writer::Writer::default(),
            on_write,
            path: path.to_path_buf(),
            pending: Vec::new(),
            retry_at: std::time::Instant::now(),
            logged_at: None,
            health: health.clone(),
            wake: wake.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("carpulse-store".into())
            .spawn(move || owner.run(rx))
            .context("starting the store's owner thread")?;
        let _ = wake.owner.set(thread.thread().clone());
        Ok(Store {
            tx,
            wake,
            health,
            path: std::sync::Arc::new(path.to_path_buf()),
        })
    }

    /// The writer's view of the store's health: refused writes, rows waiting, rows dropped.
    pub fn health(&self) -> StoreHealth {
        lock_health(&self.health).clone()
    }

    /// What `/healthz` should say about the store at `now`: writes refused (with the rows kept
    /// for a retry), and rows dropped within [`DROPPED_HEALTH_WINDOW_MS`].
    pub fn problems(&self, now: crate::domain::UnixMillis) -> Vec<String> {
        health_problems(&self.health(), &self.path, now)
    }

    /// The history's path, as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the owner thread (for reads and small writes like token saves), after every
    /// write queued before it. A panic in `f` is caught there and returned as an error.
    pub async fn call<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |c| {
            let _ = reply.send(f(c));
        });
        self.control(Control::Call(job)).await?;
        answer
            .await
            .map_err(|_| anyhow!("the store call panicked on the owner thread"))?
    }

    /// Queues items for the writer, which batches everything queued into one transaction.
    /// Bounded channel: waits when the writer is behind (back-pressure), errors only if the
    /// store is closed.
    pub async fn write(&self, items: Vec<WriteItem>) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let n = items.len();
        // Counted before it is sent, so the owner never takes more than was counted.
        let full = self.wake.queued(n);
        if self.tx.send(Msg::Write(items)).await.is_err() {
            self.wake.taken(n);
            return Err(closed());
        }
        if full {
            self.wake.unpark();
        }
        Ok(())
    }

    /// Queues a message that is not a write, and wakes the owner if it lingers over a batch:
    /// such a message ends the batch.
    async fn control(&self, c: Control) -> anyhow::Result<()> {
        self.tx.send(Msg::Control(c)).await.map_err(|_| closed())?;
        self.wake.unpark();
        Ok(())
    }

    /// Resolves when everything queued before it is committed, reported dropped, or kept for
    /// a retry because the store refuses writes (see [`Store::health`]).
    pub async fn flush(&self) -> anyhow::Result<()> {
        let (reply, done) = oneshot::channel();
        self.control(Control::Flush(reply)).await?;
        done.await.map_err(|_| closed())
    }

    /// Flushes, stops the owner thread and closes the connection (checkpoints WAL). Anything
    /// other handles queued before the close is still processed; after it they get errors.
    /// Closing a store that is already closed is a no-op.
    pub async fn close(self) -> anyhow::Result<()> {
        let (reply, done) = oneshot::channel();
        if self.control(Control::Close(reply)).await.is_err() {
            return Ok(());
        }
        done.await.map_err(|_| closed())?
    }
}

/// Mode of the history file (and so of its `-wal` and `-shm`, which SQLite creates with the
/// database file's mode): readable by carpulse's group, never by others.
pub const HISTORY_MODE: u32 = 0o640;

/// Creates `path` with exactly `mode` (whatever the umask) if it does not exist; true if it
/// was created. Run as root in a directory another account owns (`sudo carpulse connect` in
/// `/var/lib/carpulse`), the new file is given to that account, as SQLite does with the
/// journals it creates, so the daemon can still open it.
pub(crate) fn create_private_file(path: &Path, mode: u32) -> anyhow::Result<bool> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("creating {} (mode {mode:o})", path.display()))
        }
    };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {} to {mode:o}", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(me), Ok(owner)) = (file.metadata(), std::fs::metadata(dir)) {
        if me.uid() == 0 && owner.uid() != 0 {
            std::os::unix::fs::fchown(&file, Some(owner.uid()), Some(owner.gid())).with_context(
                || {
                    format!(
                        "giving {} to the owner of {}",
                        path.display(),
                        dir.display()
                    )
                },
            )?;
        }
    }
    Ok(true)
}

/// Takes away every permission bit of `path` (and of its `-wal` and `-shm`) outside `allowed`,
/// so a store file made 0644 by hand, a `cp` or an old umask is corrected at every open
/// (issue 11); a stricter mode is kept. Files that do not exist are skipped.
pub(crate) fn tighten_modes(path: &Path, allowed: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & !allowed != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & allowed))
                .with_context(|| {
                    format!(
                        "correcting the mode of {} from {mode:o} to {:o}",
                        file.display(),
                        mode & allowed
                    )
                })?;
            tracing::warn!(
                file = %file.display(),
                from = format!("{mode:o}"),
                to = format!("{:o}", mode & allowed),
                "corrected the mode of a store file"
            );
        }
    }
    Ok(())
}

/// Keeps the `-wal` and `-shm` files when the last connection closes (SQLITE_FCNTL_PERSIST_WAL),
/// so that a reader who may not create files in the directory (Grafana, in carpulse's group)
/// can open the history while the daemon is stopped.
fn persist_wal(c: &Connection) -> anyhow::Result<()> {
    let mut on: std::os::raw::c_int = 1;
    // SAFETY: the handle is valid while `c` lives; SQLITE_FCNTL_PERSIST_WAL reads and writes
    // the one int it is given, which outlives the call.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            c.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::os::raw::c_int).cast(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        bail!("keeping the WAL files between runs (SQLITE_FCNTL_PERSIST_WAL) failed: code {rc}");
    }
    Ok(())
}

/// Creates the history 0640 (and its directory), opens it, refuses a newer schema, sets the
/// pragmas, attaches the token store, snapshots and migrates an older schema.
fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the directory {}", parent.display()))?;
    }
    // Created by us, not by SQLite, so the mode is right from the first byte; SQLite gives its
    // -wal and -shm files the database file's mode.
    if create_private_file(path, HISTORY_MODE)? {
        tracing::info!(path = %path.display(), "created a new store");
    } else if let Err(e) = tighten_modes(path, HISTORY_MODE) {
        // The history holds no secret: a mode we may not change is worth a warning, not a
        // refusal to run (the token store's is refused, see token_store::attach).
        tracing::warn!(
            error = format!("{e:#}"),
            "the history's mode could not be corrected"
        );
    }
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .context("opening the SQLite file")?;
    conn.busy_timeout(Duration::from_millis(5000))
        .context("setting busy_timeout")?;
    // Before any pragma that could rewrite the header: a newer store must stay untouched.
    migrate::refuse_newer(&conn)?;
    let from = migrate::current_version(&conn)?;
    if from == 0 {
        // Only takes effect before the first table: a new store frees pruned pages with
        // `PRAGMA incremental_vacuum` (retention); an older one gets it from the VACUUM below.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .context("setting auto_vacuum=INCREMENTAL")?;
    }
    let mode: String = conn
        .pragma_update_and_check(Some("main"), "journal_mode", "WAL", |r| r.get(0))
        .context("setting journal_mode=WAL")?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("the store could not be switched to WAL (journal_mode is {mode})");
    }
    persist_wal(&conn)?;
    conn.pragma_update(Some("main"), "synchronous", "NORMAL")
        .context("setting synchronous=NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)
        .context("setting foreign_keys=ON")?;
    token_store::attach(&conn, &token_store::path_for(path))?;
    if from > 0 && from < migrate::latest_version() {
        let snapshot = backup::snapshot_before_migration(&conn, path, from)
            .context("snapshotting the store before migrating it")?;
        tracing::info!(
            snapshot = %snapshot.display(),
            from,
            to = migrate::latest_version(),
            "snapshot taken before migrating the store (restore it with an older carpulse to go back)"
        );
    }
    let moved = token_store::import_from_history(&mut conn)?;
    if moved > 0 {
        tracing::info!(
            connections = moved,
            tokens = %token_store::path_for(path).display(),
            "moved OAuth tokens out of the history into the token store"
        );
    }
    migrate::migrate(&mut conn).context("migrating the schema")?;
    if from > 0 && from < migrate::FIRST_WITHOUT_TOKENS {
        scrub_after_token_move(&conn, path)?;
    }
    Ok(conn)
}

/// After the tokens left an old history: VACUUM (so no free page or WAL frame keeps their
/// bytes, and auto_vacuum=INCREMENTAL takes effect), empty the WAL, and open the files to the
/// group as a new store would be.
fn scrub_after_token_move(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .context("setting auto_vacuum=INCREMENTAL")?;
    conn.execute_batch("VACUUM main")
        .context("VACUUM after moving the tokens out of the history")?;
    let busy: i64 = conn
        .query_row("PRAGMA main.wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .context("emptying the WAL after moving the tokens out")?;
    if busy != 0 {
        tracing::warn!(
            path = %path.display(),
            "a reader kept the WAL from being emptied; it is emptied at the next checkpoint"
        );
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.permissions().mode() & 0o777 == 0o600 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(HISTORY_MODE))
                .with_context(|| format!("making {} group-readable", file.display()))?;
        }
    }
    tracing::info!(path = %path.display(), "the history holds no token any more: it is now group-readable (0640)");
    Ok(())
}

/// State of the owner thread.
struct Owner {
    conn: Connection,
    writer: writer::Writer,
    on_write: Option<WriteObserver>,
    path: PathBuf,
    /// Rows the store refused for a reason that may pass, oldest first, at most
    /// [`PENDING_MAX`]; offered again every [`RETRY_EVERY`]. A [`Store::call`] does not see
    /// them until they are committed.
    pending: Vec<WriteItem>,
    retry_at: std::time::Instant,
    /// When the refusal was last logged (once a minute while it lasts).
    logged_at: Option<std::time::Instant>,
    health: SharedHealth,
    wake: std::sync::Arc<Wake>,
}

impl Owner {
    /// Serves messages until every handle is dropped or a close is asked for. Consecutive
    /// writes are merged into one batch; any other message first commits the batch before it,
    /// so order is kept.
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut closers = Vec::new();
        loop {
            let first = if self.pending.is_empty() {
                match rx.blocking_recv() {
                    Some(m) => m,
                    None => break,
                }
            } else {
                // Rows wait for a retry: look at the queue between tries instead of blocking.
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let now = std::time::Instant::now();
                        if now >= self.retry_at {
                            self.retry_pending();
                        } else {
                            std::thread::sleep((self.retry_at - now).min(RETRY_NAP));
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            };
            let (batch, other) = self.gather(first, &mut rx);
            if !batch.is_empty() {
                self.write(batch);
            }
            match other {
                None => {}
                Some(Control::Call(job)) => self.run_call(job),
                Some(Control::Flush(reply)) => {
                    let _ = reply.send(());
                }
                Some(Control::Close(reply)) => {
                    // Refuse new messages, but still serve what was queued before the close
                    // (the loop ends when the queue is empty), so nothing is lost silently.
                    rx.close();
                    closers.push(reply);
                }
            }
        }
        let result = self.shutdown();
        if closers.is_empty() {
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "closing the store failed");
            }
        }
        let mut result = Some(result);
        for reply in closers {
            let r = match result.take() {
                Some(r) => r,
                None => Ok(()),
            };
            let _ = reply.send(r);
        }
    }

    /// The batch that starts with `first`: every write queued after it, lingering up to
    /// [`LINGER`] (parked, see [`Wake`]) while it is smaller than [`LINGER_UNTIL_ITEMS`], and
    /// the first message that is not a write, which ends it.
    fn gather(
        &mut self,
        first: Msg,
        rx: &mut mpsc::Receiver<Msg>,
    ) -> (Vec<WriteItem>, Option<Control>) {
        let mut batch = Vec::new();
        let mut other = None;
        match first {
            Msg::Write(items) => batch = items,
            Msg::Control(c) => other = Some(c),
        }
        let linger_until = std::time::Instant::now() + LINGER;
        while other.is_none() && batch.len() < MAX_BATCH_ITEMS {
            match rx.try_recv() {
                Ok(Msg::Write(items)) => batch.extend(items),
                Ok(Msg::Control(c)) => other = Some(c),
                Err(mpsc::error::TryRecvError::Empty)
                    if !batch.is_empty() && batch.len() < LINGER_UNTIL_ITEMS =>
                {
                    let now = std::time::Instant::now();
                    if now >= linger_until {
                        break;
                    }
                    // A dedicated thread: parked until the deadline, a batch's worth of
                    // items, or a message that is not a write.
                    std::thread::park_timeout(linger_until - now);
                }
                Err(_) => break,
            }
        }
        self.wake.taken(batch.len());
        (batch, other)
    }

    /// Runs a [`Store::call`] job; a panic in it is contained so the owner keeps serving (the
    /// caller sees its reply channel dropped and gets an error).
    fn run_call(&mut self, job: Job) {
        if catch_unwind(AssertUnwindSafe(|| job(&mut self.conn))).is_err() {
            tracing::error!("a store call panicked; the store keeps running");
        }
    }

    /// Writes a batch; while earlier rows wait for a retry, it joins them (and is tried with
    /// them when the retry is due).
    fn write(&mut self, batch: Vec<WriteItem>) {
        if self.pending.is_empty() {
            self.attempt(batch);
            return;
        }
        self.keep(batch);
        if std::time::Instant::now() >= self.retry_at {
            self.retry_pending();
        }
    }

    fn retry_pending(&mut self) {
        let rows = std::mem::take(&mut self.pending);
        if !rows.is_empty() {
            self.attempt(rows);
        }
    }

    /// One transaction for `rows`. Refused for a reason that may pass: kept for a retry (not
    /// dropped after the busy timeout, DESIGN §2.4). Refused for good: dropped and counted.
    fn attempt(&mut self, rows: Vec<WriteItem>) {
        match self.writer.try_write(&mut self.conn, &rows) {
            Ok(report) => {
                let was = {
                    let mut h = lock_health(&self.health);
                    h.pending_rows = 0;
                    h.last_error = None;
                    h.failing_since.take()
                };
                if let Some(since) = was {
                    tracing::info!(
                        path = %self.path.display(),
                        rows = rows.len(),
                        refused_for_s = (crate::domain::now_ms() - since) / 1000,
                        "the store accepts writes again; the rows kept meanwhile are stored"
                    );
                    self.logged_at = None;
                }
                self.observe(&report);
            }
            Err(e) if retryable(&e) => {
                let error = format!("{e:#}");
                let now = std::time::Instant::now();
                if self
                    .logged_at
                    .is_none_or(|at| now.duration_since(at) >= REFUSED_LOG_EVERY)
                {
                    tracing::warn!(
                        path = %self.path.display(),
                        error,
                        rows = rows.len(),
                        retry_every_s = RETRY_EVERY.as_secs(),
                        max_rows = PENDING_MAX,
                        "the store refuses writes; keeping the rows in memory and trying again"
                    );
                    self.logged_at = Some(now);
                }
                {
                    let mut h = lock_health(&self.health);
                    h.failing_since.get_or_insert_with(crate::domain::now_ms);
                    h.last_error = Some(error);
                }
                self.retry_at = now + RETRY_EVERY;
                self.keep(rows);
            }
            Err(e) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = format!("{e:#}"),
                    rows = rows.len(),
                    "store write batch failed; all of its rows are dropped"
                );
                self.drop_rows(&rows);
            }
        }
    }

    /// Adds rows to those waiting for a retry, up to [`PENDING_MAX`]; the newest past it are
    /// dropped and counted.
    fn keep(&mut self, mut rows: Vec<WriteItem>) {
        let room = PENDING_MAX.saturating_sub(self.pending.len());
        if rows.len() > room {
            let over = rows.split_off(room);
            tracing::error!(
                rows = over.len(),
                max_rows = PENDING_MAX,
                "too many rows wait for the store; dropping the newest"
            );
            self.drop_rows(&over);
        }
        self.pending.extend(rows);
        lock_health(&self.health).pending_rows = self.pending.len();
    }

    fn drop_rows(&mut self, rows: &[WriteItem]) {
        {
            let mut h = lock_health(&self.health);
            h.dropped_rows += rows.len() as u64;
            h.last_dropped_at = Some(crate::domain::now_ms());
        }
        self.observe(&writer::dropped(rows));
    }

    fn observe(&self, report: &WriteReport) {
        if let Some(observer) = &self.on_write {
            if catch_unwind(AssertUnwindSafe(|| observer(report))).is_err() {
                tracing::error!("the store's write observer panicked");
            }
        }
    }

    /// Offers rows still waiting for a last [`CLOSE_RETRY`], then checkpoints the WAL into the
    /// main file and closes the connection.
    fn shutdown(mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + CLOSE_RETRY;
        while !self.pending.is_empty() && std::time::Instant::now() < deadline {
            let wait = self
                .retry_at
                .saturating_duration_since(std::time::Instant::now());
            std::thread::sleep(
                wait.min(deadline.saturating_duration_since(std::time::Instant::now())),
            );
            self.retry_pending();
        }
        if !self.pending.is_empty() {
            let rows = std::mem::take(&mut self.pending);
            tracing::error!(
                path = %self.path.display(),
                rows = rows.len(),
                "the store still refuses writes at shutdown; dropping the rows kept for it"
            );
            self.drop_rows(&rows);
        }
        let path = self.path;
        self.conn
            .query_row("PRAGMA main.wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .with_context(|| format!("checkpointing the WAL of {}", path.display()))?;
        self.conn
            .close()
            .map_err(|(_, e)| e)
            .with_context(|| format!("closing the store {}", path.display()))?;
        tracing::debug!(path = %path.display(), "store closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
