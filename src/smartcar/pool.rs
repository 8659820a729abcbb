//! Vehicle API connections, each driven by the request that uses it.
//!
//! hyper-util's pooled client runs every connection as a task of its own: a request hands its
//! message to that task through a channel, the task writes it, reads the answer and hands the
//! head back through a oneshot and the body through another channel, waking the request's
//! task at each step; the pool's checkout and checkin go through its own bookkeeping (a keyed
//! map of idle lists, waiters, a reaper task), and each answer gets the connection's address
//! put into its extensions (two allocations). In the fleet profile that client layer and the
//! extra task's scheduling were ~8 % of a poll's CPU.
//!
//! Here a connection is hyper's HTTP/1 state machine ([`hyper::client::conn::http1`]) held by
//! whichever request uses it: the request polls the connection and its own response in one
//! task ([`Driver::drive`]), so nothing crosses tasks. Between requests a connection waits,
//! unpolled, on a per-origin stack; the next request to take it polls it first (`ready`),
//! which is where a connection the server closed while idle is found and dropped. What the
//! legacy client did that a Vehicle API call relies on is kept: the `Host` header and the
//! origin-form request target, a request the connection could not take sent again on a new
//! connection when the one it tried was a reused one (and only then, as hyper-util did), an
//! idle timeout and a cap on idle connections per origin.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::{Authority, Scheme};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service as _;

use super::error::{ApiError, ErrorKind};

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type Body = Full<Bytes>;

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

/// Makes `req` what an HTTP/1 origin server expects: a `Host` header (with the port when it is
/// not the scheme's default) unless one is set, and the target in origin form (path and
/// query), as hyper-util's client did for a connection without a proxy. `uri` is the
/// request's own (the caller keeps it for the connection's origin).
pub(crate) fn for_origin(req: &mut hyper::Request<Body>, uri: &Uri) {
    if !req.headers().contains_key(HOST) {
        if let Some(authority) = uri.authority() {
            let host = authority.host();
            let default = match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            };
            let value = match uri.port_u16().filter(|p| *p != default) {
                Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
                None => HeaderValue::from_str(host),
            };
            if let Ok(value) = value {
                req.headers_mut().insert(HOST, value);
            }
        }
    }
    let target = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => {
            let mut parts = hyper::http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
    *req.uri_mut() = target;
}

/// A connection's state machine, until it ends.
pub(crate) struct Driver {
    /// `None` once the connection ended (closed by either side, or broken). It is dropped
    /// then, not kept: hyper fails a request still queued for it, and the `SendRequest`'s
    /// `ready` says closed, only when its dispatcher is dropped. A dispatcher kept after a
    /// quiet close (the server ended an idle keep-alive connection) would take a request and
    /// never answer it.
    conn: Option<http1::Connection<Io, Body>>,
}

impl Driver {
    /// The connection ended.
    pub fn ended(&self) -> bool {
        self.conn.is_none()
    }

    /// Runs `fut` (a step of a request on this connection) to its end while polling the
    /// connection, which does the reading and writing the step waits for. When the connection
    /// ends first, `fut` still runs to its end: hyper fails it (the request was not sent, or
    /// the answer broke off).
    pub async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if let Some(conn) = &mut self.conn {
                if let Poll::Ready(r) = Pin::new(conn).poll(cx) {
                    self.conn = None;
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "a Vehicle API connection ended");
                    }
                }
            }
            fut.as_mut().poll(cx)
        })
        .await
    }
}

/// One HTTP/1 connection: where requests are sent and the state machine they drive.
pub(crate) struct Conn {
    pub sender: http1::SendRequest<Body>,
    pub driver: Driver,
    /// It answered a request before (a failure to take a request is then worth a new
    /// connection: the server may have closed it while it was idle).
    pub reused: bool,
    idle_since: Instant,
}

/// A connection, boxed: hyper's connection state is ~1.8 KB held inline, which a
/// checkout, a checkin and every move of a request's future would otherwise copy (`memcpy`
/// in the fleet profile).
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

    /// The newest idle connection to `origin` that has not timed out, if any (the ones that
    /// did are closed).
    pub fn checkout(&self, origin: &Origin) -> Option<Boxed> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle();
            let list = idle.iter_mut().find(|(o, _)| o == origin)?;
            let mut found = None;
            while let Some(c) = list.1.pop() {
                if c.driver.ended() || now.duration_since(c.idle_since) > self.idle_timeout {
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

    /// Puts a connection whose last answer was read in full back for the next request to
    /// `origin`, unless it ended or the origin has `max_idle` idle already. Those that idled
    /// past the timeout are closed (the oldest are at the bottom).
    pub fn checkin(&self, origin: Origin, mut conn: Boxed) {
        if conn.driver.ended() || conn.sender.is_closed() {
            return;
        }
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

    /// A new connection to `uri`'s origin: TCP (with the connect timeout), TLS for https,
    /// then HTTP/1's handshake.
    pub async fn connect(&self, uri: &Uri) -> Result<Boxed, ApiError> {
        let mut connector = self.connector.clone();
        let io = async {
            poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(uri.clone()).await
        }
        .await
        .map_err(|e| super::transport::transport_error("connecting", &*e))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| super::transport::transport_error("connecting", &e))?;
        Ok(Box::new(Conn {
            sender,
            driver: Driver { conn: Some(conn) },
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
    fn a_request_gets_its_host_and_an_origin_form_target() {
        let req = |uri: &str| {
            let mut r = hyper::Request::builder()
                .uri(uri)
                .body(Body::default())
                .unwrap();
            let uri = r.uri().clone();
            for_origin(&mut r, &uri);
            (
                r.uri().to_string(),
                r.headers()
                    .get(HOST)
                    .map(|h| h.to_str().unwrap().to_owned()),
            )
        };
        assert_eq!(
            req("https://vehicle.api.smartcar.com/v3/vehicles/a/signals?pageSize=100"),
            (
                "/v3/vehicles/a/signals?pageSize=100".to_owned(),
                Some("vehicle.api.smartcar.com".to_owned())
            )
        );
        assert_eq!(
            req("http://127.0.0.1:8000/v2.0/batch"),
            ("/v2.0/batch".to_owned(), Some("127.0.0.1:8000".to_owned()))
        );
        assert_eq!(req("https://h:443"), ("/".to_owned(), Some("h".to_owned())));
        assert_eq!(
            req("http://h:80/x"),
            ("/x".to_owned(), Some("h".to_owned()))
        );
        assert_eq!(
            req("http://[::1]:9/x"),
            ("/x".to_owned(), Some("[::1]:9".to_owned()))
        );
        // A Host the caller set is kept.
        let mut r = hyper::Request::builder()
            .uri("http://h:81/x")
            .header(HOST, "other")
            .body(Body::default())
            .unwrap();
        let uri = r.uri().clone();
        for_origin(&mut r, &uri);
        assert_eq!(r.headers()[HOST], "other");
    }

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
