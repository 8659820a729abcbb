//! Vehicle API connections: each used by one request at a time, idle ones kept per origin.
//!
//! hyper-util's pooled client ran every connection as a task of its own, with channels
//! between it and the request and a pool's bookkeeping around it (~8 % of a poll's CPU in the
//! fleet profile); then hyper's connection state machine driven by the request itself (its
//! buffers and request channel ~33 KB per connection). Now a connection is [`h1::Connection`]:
//! the request writes and reads on it in its own task. Between requests a connection waits on
//! a per-origin stack; the next request to take it first looks whether the server closed it
//! meanwhile ([`h1::Connection::is_quiet`]). What the legacy client did that a Vehicle API
//! call relies on is kept: the `Host` header and the origin-form request target
//! ([`h1::encode_request`]), a request that a reused connection could not take sent again on
//! another, an idle timeout and a cap on idle connections per origin.

use std::future::poll_fn;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::http::uri::{Authority, Scheme};
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service as _;

use super::error::{ApiError, ErrorKind};
use super::h1;

/// Where a connection goes: scheme and authority (host and port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    /// The origin of `uri`, which must be absolute.
    pub fn of(uri: &Uri) -> Result<Origin, ApiError> {
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => Ok(Origin {
                scheme: scheme.clone(),
                authority: authority.clone(),
            }),
            _ => Err(ApiError::new(
                ErrorKind::Transport,
                format!("not an absolute URL: {uri}"),
            )),
        }
    }
}

/// One HTTP/1 connection and what the pool knows of it.
pub(crate) struct Conn {
    pub h1: h1::Connection,
    /// It answered a request before (a failure to take a request is then worth a new
    /// connection: the server may have closed it while it was idle).
    pub reused: bool,
    idle_since: Instant,
}

/// A connection, boxed: a TLS connection's state is held inline (rustls's, ~1 KB), which a
/// checkout, a checkin and every move of a request's future would otherwise copy.
pub(crate) type Boxed = Box<Conn>;

/// The idle connections of every origin (the Vehicle API has one or two), newest last.
pub(crate) struct Pool {
    connector: HttpsConnector<HttpConnector>,
    idle: Mutex<Vec<(Origin, Vec<Boxed>)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Pool {
        Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
            idle_timeout,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(Origin, Vec<Boxed>)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle connection to `origin` that has not timed out and that the server has
    /// not closed, if any (the others are closed).
    pub fn checkout(&self, origin: &Origin) -> Option<Boxed> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle();
            let list = idle.iter_mut().find(|(o, _)| o == origin)?;
            let mut found = None;
            while let Some(c) = list.1.pop() {
                if now.duration_since(c.idle_since) > self.idle_timeout || !c.h1.is_quiet() {
                    stale.push(c);
                } else {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        // Closed outside the lock.
        drop(stale);
        found
    }

    /// Puts a connection whose last answer was read in full (and allowed another request)
    /// back for the next request to `origin`, unless the origin has `max_idle` idle already.
    /// Those that idled past the timeout are closed (the oldest are at the bottom).
    pub fn checkin(&self, origin: Origin, mut conn: Boxed) {
        let now = Instant::now();
        conn.reused = true;
        conn.idle_since = now;
        let mut expired = Vec::new();
        let refused = {
            let mut idle = self.idle();
            let i = match idle.iter().position(|(o, _)| *o == origin) {
                Some(i) => i,
                None => {
                    idle.push((origin, Vec::new()));
                    idle.len() - 1
                }
            };
            let list = &mut idle[i].1;
            expired.extend(self.expired(list, now));
            if list.len() < self.max_idle {
                list.push(conn);
                None
            } else {
                Some(conn)
            }
        };
        drop(expired);
        drop(refused);
    }

    /// A new connection to `uri`'s origin: TCP (with the connect timeout), then TLS for
    /// https.
    pub async fn connect(&self, uri: &Uri) -> Result<Boxed, ApiError> {
        let mut connector = self.connector.clone();
        let io = async {
            poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(uri.clone()).await
        }
        .await
        .map_err(|e| super::transport::transport_error("connecting", &*e))?;
        Ok(Box::new(Conn {
            h1: h1::Connection::new(TokioIo::new(io)),
            reused: false,
            idle_since: Instant::now(),
        }))
    }

    /// Takes the connections of `list` that idled past the timeout at `now` (its oldest, at the
    /// bottom), for the caller to close outside the lock.
    fn expired<'l>(&self, list: &'l mut Vec<Boxed>, now: Instant) -> std::vec::Drain<'l, Boxed> {
        let old = list
            .iter()
            .take_while(|c| now.duration_since(c.idle_since) > self.idle_timeout)
            .count();
        list.drain(..old)
    }

    /// Closes the connections that idled past the timeout (the oldest of each origin are at
    /// the bottom of its stack).
    pub fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<Boxed> = {
            let mut idle = self.idle();
            let mut out = Vec::new();
            for (_, list) in idle.iter_mut() {
                out.extend(self.expired(list, now));
            }
            out
        };
        drop(expired);
    }

    /// Idle connections to `origin` (for tests).
    #[cfg(test)]
    pub fn idle_count(&self, origin: &Origin) -> usize {
        self.idle()
            .iter()
            .find(|(o, _)| o == origin)
            .map_or(0, |(_, l)| l.len())
    }
}

/// Closes `pool`'s connections that idled past its timeout, every half timeout, for as long as
/// the pool lives: between two ticks nothing else takes or returns a connection, and a tick's
/// thousand connections would hold their buffers (and file descriptors) until the next one.
/// Without a runtime (a client built outside one) connections are still closed when taken.
pub(crate) fn reap_in_background(pool: &std::sync::Arc<Pool>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pool = std::sync::Arc::downgrade(pool);
    let every = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            match pool.upgrade() {
                Some(p) => p.reap(),
                None => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_needs_an_absolute_url() {
        let a = Origin::of(&"http://127.0.0.1:1/v3".parse().unwrap()).unwrap();
        let b = Origin::of(&"http://127.0.0.1:1/v2.0/x?y".parse().unwrap()).unwrap();
        assert_eq!(a, b);
        let c = Origin::of(&"https://127.0.0.1:1/v3".parse().unwrap()).unwrap();
        assert_ne!(a, c);
        assert!(Origin::of(&"/v3".parse().unwrap()).is_err());
    }
}
