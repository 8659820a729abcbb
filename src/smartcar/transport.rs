//! How a Vehicle API request reaches Smartcar and its answer comes back.
//!
//! Two ways, one request type ([`VehicleRequest`]):
//! - **direct**: carpulse's own HTTP/1.1 exchange ([`super::h1`]) on pooled connections, with
//!   rustls and the same webpki roots, TCP_NODELAY and connect timeout reqwest used. The fleet profile put
//!   ~15 % of a poll's CPU in reqwest's layers above hyper (its redirect and retry services,
//!   the URL's parse and its round trip through `Uri`, the header copies the redirect policy
//!   makes even when redirects are off), for nothing a Vehicle API call uses;
//! - **through reqwest**, whenever a proxy applies to the API's host (`HTTPS_PROXY`,
//!   `ALL_PROXY`, `NO_PROXY`…, read exactly as reqwest reads them): a plain hyper client would
//!   silently ignore the proxy, and an operator behind one must keep reaching Smartcar.
//!
//! Either way the caller gets the same status, headers, body and error kinds (a body that
//! breaks off is a decode error, a timeout anywhere in the chain a timeout), so nothing above
//! this module knows which way a request went.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;

use super::error::{with_causes, ApiError, ErrorKind};
use super::h1::Failure;
use super::pool::{Origin, Pool};

/// What carpulse sends with every Vehicle API request: `user-agent` as reqwest sent it.
const AGENT: &str = concat!("carpulse/", env!("CARGO_PKG_VERSION"));

/// A Vehicle API request: built once by [`SmartcarClient::vehicle_request`], sent by either
/// transport.
///
/// [`SmartcarClient::vehicle_request`]: super::SmartcarClient::vehicle_request
#[derive(Debug)]
pub(crate) struct VehicleRequest {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Why the request cannot be sent (a token or user id that is not header text): it fails
    /// as a transport error without reaching the server, as reqwest failed it, instead of
    /// going out without the header (a 401 would send the connection into a refresh).
    pub unsendable: Option<&'static str>,
}

impl VehicleRequest {
    /// The body as JSON, with its content type (the v2 batch).
    pub fn json<T: serde::Serialize + ?Sized>(mut self, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => {
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                self.body = Some(Bytes::from(bytes));
            }
            // Our own request bodies are maps of strings: this cannot fail; if it ever did,
            // the server's refusal of an empty body says so.
            Err(e) => tracing::error!(error = %e, "could not encode a request body"),
        }
        self
    }

    /// The error of a request that cannot be sent (see `unsendable`).
    pub fn check(&self) -> Result<(), ApiError> {
        match self.unsendable {
            Some(why) => Err(ApiError::new(ErrorKind::Transport, why)),
            None => Ok(()),
        }
    }

    /// The bearer token this request carries (its answer is scrubbed of it).
    pub fn bearer(&self) -> &str {
        self.headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
    }

    /// The same request for reqwest (the proxied way).
    pub fn into_reqwest(self, http: &reqwest::Client) -> Result<reqwest::Request, ApiError> {
        self.check()?;
        let mut req = http.request(self.method, self.url).headers(self.headers);
        if let Some(body) = self.body {
            req = req.body(body);
        }
        req.build().map_err(|e| ApiError::from_reqwest(&e))
    }
}

/// An answer read in full: status, headers, body (a view of the buffer the answer was read
/// into, head and all: not copied out of it).
pub(crate) type Answer = (u16, HeaderMap, Bytes);

/// HTTP/1.1 connections ([`super::h1`]), connected as reqwest connected them for carpulse
/// (hyper-rustls), each used by one request at a time ([`super::pool`]).
#[derive(Clone)]
pub(crate) struct Direct {
    pool: std::sync::Arc<Pool>,
}

/// How long a connection may idle before it is closed (reqwest's and hyper-util's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many connections a request tries that fail to take it (each a reused one the server
/// closed while it idled) before one it opens itself.
const REUSED_TRIES: usize = 4;

impl Direct {
    /// The direct client, or `None` when a proxy applies to one of `bases` (the Vehicle API's
    /// URLs): then every Vehicle API request goes through reqwest, which honours it.
    pub fn for_bases(
        bases: &[&str],
        proxies: &Matcher,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> anyhow::Result<Option<Direct>> {
        if proxied(bases, proxies) {
            tracing::info!("a proxy applies to the Vehicle API; its requests go through it");
            return Ok(None);
        }
        Direct::new(connect_timeout, max_idle, IDLE_TIMEOUT).map(Some)
    }

    fn new(
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> anyhow::Result<Direct> {
        use hyper_rustls::ConfigBuilderExt as _;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS versions for the Vehicle API client: {e}"))?
            .with_webpki_roots()
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            // HTTP/1.1 only (its ALPN set here), as reqwest built without http2 asked.
            .enable_http1()
            .wrap_connector(http);
        let pool = std::sync::Arc::new(Pool::new(https, max_idle, idle_timeout));
        super::pool::reap_in_background(&pool);
        Ok(Direct { pool })
    }

    /// Sends `req` and reads its answer, never more than `limit` bytes of body. No deadline of
    /// its own: the caller's covers the whole exchange.
    ///
    /// The request goes out on an idle connection to its origin, else a new one. An idle
    /// connection the server closed is dropped when taken; one that could not take the
    /// request (its write failed: the server closed it just then) passes it on to another, up
    /// to [`REUSED_TRIES`] reused ones, then a new one, as hyper-util retried a request never
    /// sent. A request that was written is never sent again (each is billed).
    pub async fn exchange(&self, req: VehicleRequest, limit: usize) -> Result<Answer, ApiError> {
        req.check()?;
        let uri = uri_of(&req.url)?;
        let origin = Origin::of(&uri)?;
        let mut request = Vec::with_capacity(512);
        super::h1::encode_request(
            &mut request,
            &req.method,
            &uri,
            &req.headers,
            req.body.as_deref(),
            AGENT,
        );
        let mut tries = 0;
        loop {
            let idle = if tries < REUSED_TRIES {
                self.pool.checkout(&origin)
            } else {
                None
            };
            let mut conn = match idle {
                Some(conn) => conn,
                None => self.pool.connect(&uri).await?,
            };
            tries += 1;
            match conn.h1.exchange(&request, limit).await {
                Ok(answer) => {
                    if answer.reusable {
                        self.pool.checkin(origin, conn);
                    }
                    return Ok((answer.status, answer.headers, answer.body));
                }
                Err(Failure::Unsent(_)) if conn.reused => continue,
                Err(Failure::Unsent(e)) => return Err(transport_error("sending the request", &e)),
                Err(Failure::Answer(e)) => return Err(e),
            }
        }
    }
}

/// Whether a proxy applies to any of `bases`.
fn proxied(bases: &[&str], proxies: &Matcher) -> bool {
    bases.iter().any(|base| match base.parse::<Uri>() {
        Ok(uri) => proxies.intercept(&uri).is_some(),
        // Not a URI hyper reads: leave it to reqwest, which reads every URL it did before.
        Err(_) => true,
    })
}

/// `url` as hyper's `Uri`; a URL it does not read as is (a character that needs
/// percent-encoding) goes through the URL parser reqwest used, which encodes it.
fn uri_of(url: &str) -> Result<Uri, ApiError> {
    if let Ok(uri) = url.parse::<Uri>() {
        return Ok(uri);
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::new(ErrorKind::Transport, format!("not a URL ({e}): {url}")))?;
    parsed
        .as_str()
        .parse::<Uri>()
        .map_err(|e| ApiError::new(ErrorKind::Transport, format!("not a URL ({e}): {url}")))
}

/// A transport error with its whole chain of causes (as `ApiError::from_reqwest` writes it);
/// a timeout anywhere in the chain (the connect timeout) is a timeout.
pub(crate) fn transport_error(what: &str, err: &(dyn std::error::Error + 'static)) -> ApiError {
    let timeout = std::iter::successors(Some(err), |e| e.source()).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
    });
    let msg = with_causes(format!("{what}: {err}"), err);
    let kind = if timeout {
        ErrorKind::Timeout
    } else {
        ErrorKind::Transport
    };
    ApiError::new(kind, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// How the test server answers each request of a connection.
    #[derive(Clone, Copy)]
    enum Serve {
        /// Keep-alive answers.
        KeepAlive,
        /// Answers the first request, then closes the connection (idle close).
        CloseAfterOne,
        /// `Connection: close` answers.
        SaysClose,
        /// Announces 100 bytes of body, sends 10, closes.
        BreaksOff,
        /// Keep-alive answers; a connection idle for 50 ms after an answer is closed (a
        /// server's keep-alive timeout), counted in the server's `closed`.
        IdleCloses,
        /// Keep-alive answers in chunks (with an extension and a trailer), each after a
        /// `100 Continue`, the head and each chunk written separately.
        Chunked,
        /// HTTP/1.0 answers without a length: the body lasts until the connection closes.
        Http10,
    }

    /// An HTTP/1 server on 127.0.0.1 port 0 answering `{"n":<request number>}`; returns its
    /// URL and the count of connections it accepted.
    async fn server(serve: Serve) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let served = std::sync::Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, shut) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (served, shut) = (served.clone(), shut.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    let mut answered = false;
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let read = s.read(&mut chunk);
                            let read = if matches!(serve, Serve::IdleCloses) && answered {
                                match tokio::time::timeout(Duration::from_millis(50), read).await {
                                    Ok(r) => r,
                                    Err(_) => {
                                        let _ = s.shutdown().await;
                                        drop(s);
                                        shut.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    }
                                }
                            } else {
                                read.await
                            };
                            match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        answered = true;
                        buf.drain(..end + 4);
                        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                        let body = format!("{{\"n\":{n}}}");
                        let head = |extra: &str, len: usize| {
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n{extra}\r\n")
                        };
                        let out = match serve {
                            Serve::KeepAlive | Serve::CloseAfterOne | Serve::IdleCloses => {
                                head("", body.len()) + &body
                            }
                            Serve::SaysClose => head("connection: close\r\n", body.len()) + &body,
                            Serve::BreaksOff => head("", 100) + "0123456789",
                            Serve::Chunked => {
                                let pieces = [
                                    "HTTP/1.1 100 Continue\r\n\r\n".to_owned(),
                                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                        .to_owned(),
                                    format!("3;x=y\r\n{}\r\n", &body[..3]),
                                    format!("{:x}\r\n{}\r\n", body.len() - 3, &body[3..]),
                                    "0\r\nx-trailer: 1\r\n\r\n".to_owned(),
                                ];
                                for piece in pieces {
                                    if s.write_all(piece.as_bytes()).await.is_err() {
                                        return;
                                    }
                                    let _ = s.flush().await;
                                }
                                continue;
                            }
                            Serve::Http10 => format!("HTTP/1.0 200 OK\r\n\r\n{body}"),
                        };
                        if s.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                        if !matches!(serve, Serve::KeepAlive | Serve::IdleCloses) {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted, closed)
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_a_request() {
        let direct = Direct::new(Duration::from_secs(5), 8, Duration::from_millis(100)).unwrap();
        let (url, _, _) = server(Serve::KeepAlive).await;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        let (a, b) = tokio::join!(
            direct.exchange(get(&format!("{url}/")), 1024),
            direct.exchange(get(&format!("{url}/")), 1024)
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(direct.pool.idle_count(&origin), 2);
        // No request follows: the reaper closes both (a tick's thousand connections would
        // otherwise hold their buffers until the next tick).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while direct.pool.idle_count(&origin) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "idle connections kept"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn get(url: &str) -> VehicleRequest {
        VehicleRequest {
            method: Method::GET,
            url: url.to_owned(),
            headers: HeaderMap::new(),
            body: None,
            unsendable: None,
        }
    }

    #[tokio::test]
    async fn connections_are_reused_and_a_closed_one_is_replaced() {
        let direct = Direct::new(Duration::from_secs(5), 8, IDLE_TIMEOUT).unwrap();
        // Keep-alive: three requests, one connection, each answer its own.
        let (url, accepted, _) = server(Serve::KeepAlive).await;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        for n in 1..=3 {
            let (status, _, body) = direct
                .exchange(get(&format!("{url}/v3/x")), 1024)
                .await
                .unwrap();
            assert_eq!((status, body), (200, Bytes::from(format!("{{\"n\":{n}}}"))));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(direct.pool.idle_count(&origin), 1);

        // The server closes each connection after one answer, while it idles here: every next
        // request finds it closed and goes out on a new one, without an error.
        let (url, accepted, _) = server(Serve::CloseAfterOne).await;
        for n in 1..=3 {
            let (_, _, body) = direct
                .exchange(get(&format!("{url}/")), 1024)
                .await
                .unwrap();
            assert_eq!(body, Bytes::from(format!("{{\"n\":{n}}}")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        // `connection: close`: not used again.
        let (url, accepted, _) = server(Serve::SaysClose).await;
        for _ in 0..2 {
            direct
                .exchange(get(&format!("{url}/")), 1024)
                .await
                .unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // An answer that breaks off is a decode error, and its connection is not reused.
        let (url, accepted, _) = server(Serve::BreaksOff).await;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        for _ in 0..2 {
            let e = direct
                .exchange(get(&format!("{url}/")), 1024)
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Decode, "{e}");
        }
        assert_eq!(direct.pool.idle_count(&origin), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The server ends a connection that idled here past its keep-alive timeout: the next
        // request finds it closed when it takes it and goes out on a new one, at once (a
        // dispatcher kept after that quiet close took the request and never answered).
        let (url, accepted, closed) = server(Serve::IdleCloses).await;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        direct
            .exchange(get(&format!("{url}/")), 1024)
            .await
            .unwrap();
        assert_eq!(direct.pool.idle_count(&origin), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while closed.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the server never closed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            direct.exchange(get(&format!("{url}/")), 1024),
        )
        .await
        .expect("a request on a connection the server closed while idle must not hang")
        .unwrap();
        assert_eq!(second.2, &b"{\"n\":2}"[..]);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // A chunked answer after an informational one: the body whole, the connection reused.
        let (url, accepted, _) = server(Serve::Chunked).await;
        for n in 1..=2 {
            let (status, headers, body) = direct
                .exchange(get(&format!("{url}/")), 1024)
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert_eq!(headers["transfer-encoding"], "chunked");
            assert_eq!(body, Bytes::from(format!("{{\"n\":{n}}}")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // ... and one over the limit is refused as too large.
        let e = direct
            .exchange(get(&format!("{url}/")), 4)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");

        // HTTP/1.0 without a length: the body is what comes until the close; not reused.
        let (url, accepted, _) = server(Serve::Http10).await;
        let origin = Origin::of(&url.parse().unwrap()).unwrap();
        for n in 1..=2 {
            let (_, _, body) = direct
                .exchange(get(&format!("{url}/")), 1024)
                .await
                .unwrap();
            assert_eq!(body, Bytes::from(format!("{{\"n\":{n}}}")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(direct.pool.idle_count(&origin), 0);

        // Nobody listening: a transport error, nothing pooled.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = format!("http://{}/", closed.local_addr().unwrap());
        drop(closed);
        let e = direct.exchange(get(&gone), 1024).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transport, "{e}");
    }

    #[test]
    fn a_proxy_for_the_api_host_sends_requests_through_reqwest() {
        let none = Matcher::builder().build();
        let https = Matcher::builder().https("http://127.0.0.1:3128").build();
        let excepted = Matcher::builder()
            .https("http://127.0.0.1:3128")
            .no("vehicle.api.smartcar.com")
            .build();
        let bases = [
            "https://api.smartcar.com/v2.0",
            "https://vehicle.api.smartcar.com/v3",
        ];
        assert!(!proxied(&bases, &none));
        assert!(proxied(&bases, &https));
        // One base proxied is enough: both APIs share the client.
        assert!(proxied(&bases, &excepted));
        let both = Matcher::builder()
            .https("http://127.0.0.1:3128")
            .no("vehicle.api.smartcar.com,api.smartcar.com")
            .build();
        assert!(!proxied(&bases, &both));
        // The simulator's plain-HTTP base is not caught by an HTTPS proxy.
        assert!(!proxied(&["http://127.0.0.1:8000/v3"], &https));
    }

    #[test]
    fn urls_hyper_cannot_read_are_encoded_as_reqwest_encoded_them() {
        let plain =
            uri_of("https://vehicle.api.smartcar.com/v3/vehicles/abc/signals?pageSize=50").unwrap();
        assert_eq!(plain.path(), "/v3/vehicles/abc/signals");
        let odd = uri_of("http://127.0.0.1:1/v3/vehicles/a b\"c/signals").unwrap();
        assert_eq!(odd.path(), "/v3/vehicles/a%20b%22c/signals");
        assert!(uri_of("not a url").is_err());
    }

    #[test]
    fn a_timeout_anywhere_in_the_chain_is_a_timeout() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("tcp connect error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let timed_out = Outer(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ));
        let e = transport_error("sending the request", &timed_out);
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(
            e.to_string().contains("tcp connect error: timed out"),
            "{e}"
        );
        let refused = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert_eq!(
            transport_error("sending the request", &refused).kind,
            ErrorKind::Transport
        );
    }
}
