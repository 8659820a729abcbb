//! How a Vehicle API request reaches Smartcar and its answer comes back.
//!
//! Two ways, one request type ([`VehicleRequest`]):
//! - **direct**: hyper's pooled HTTP/1 client (the one reqwest itself drives), with rustls and
//!   the same webpki roots, TCP_NODELAY and connect timeout reqwest used. The fleet profile put
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
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::{with_causes, ApiError, ErrorKind};

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

/// An answer read in full: status, headers, body.
pub(crate) type Answer = (u16, HeaderMap, Vec<u8>);

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// hyper's pooled client, configured as reqwest configured it for carpulse.
#[derive(Clone)]
pub(crate) struct Direct {
    client: Client<Connector, Full<Bytes>>,
}

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
        Direct::new(connect_timeout, max_idle).map(Some)
    }

    fn new(connect_timeout: Duration, max_idle: usize) -> anyhow::Result<Direct> {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(max_idle.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Direct { client })
    }

    /// Sends `req` and reads its answer, never more than `limit` bytes of body. No deadline of
    /// its own: the caller's covers the whole exchange.
    pub async fn exchange(&self, req: VehicleRequest, limit: usize) -> Result<Answer, ApiError> {
        req.check()?;
        let uri = uri_of(&req.url)?;
        let mut builder = hyper::Request::builder().method(req.method).uri(uri);
        if let Some(headers) = builder.headers_mut() {
            *headers = req.headers;
            headers
                .entry(USER_AGENT)
                .or_insert(HeaderValue::from_static(AGENT));
        }
        let request = builder
            .body(Full::new(req.body.unwrap_or_default()))
            .map_err(|e| {
                ApiError::new(ErrorKind::Transport, format!("building the request: {e}"))
            })?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| transport_error("sending the request", &e))?;
        let (parts, mut body) = response.into_parts();
        let status = parts.status.as_u16();
        let too_large = || ApiError {
            status: Some(status),
            ..ApiError::new(
                ErrorKind::TooLarge,
                format!("the answer is larger than {limit} bytes; not read"),
            )
        };
        let announced = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(announced.map_or(8 * 1024, |n| n as usize).min(limit));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                // As reqwest classed it: an answer that breaks off is not a usable body.
                let mut e = transport_error("reading the answer's body", &e);
                if e.kind == ErrorKind::Transport {
                    e.kind = ErrorKind::Decode;
                }
                e
            })?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(too_large());
                }
                out.extend_from_slice(&data);
            }
        }
        Ok((status, parts.headers, out))
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
fn transport_error(what: &str, err: &(dyn std::error::Error + 'static)) -> ApiError {
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
