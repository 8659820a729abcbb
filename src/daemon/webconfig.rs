//! `metrics.web_config_file`: TLS and basic auth on the metrics listener, configured in the YAML
//! format of Prometheus' exporter-toolkit (the `--web.config.file` of node_exporter and the
//! Prometheus server), so a file written for them, or checked with `promtool check web-config`,
//! works here:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths: from this file's directory
//!   key_file: server.key
//!   # client_auth_type: RequireAndVerifyClientCert   # with client_ca_file: mutual TLS
//!   # client_ca_file: clients-ca.crt
//!   # min_version: TLS12           # TLS12 or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt (htpasswd -nBC 10 prometheus)
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! ```
//!
//! What carpulse cannot honour is refused by name rather than ignored (a security setting that
//! silently does nothing is worse than an error): TLS 1.0/1.1, cipher and curve lists (rustls
//! chooses only strong ones), and the client-auth modes that accept unverified certificates.
//! The certificate and key are read again when their files change (a renewal needs no restart);
//! the rest of the file is read at start.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The validated web config: TLS (if configured), basic auth users (if any), extra headers.
pub struct WebConfig {
    tls: Option<Arc<rustls::ServerConfig>>,
    auth: Option<Arc<BasicAuth>>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for WebConfig {
    // Never the password hashes or key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field(
                "basic_auth_users",
                &self.auth.as_ref().map(|a| a.users.len()),
            )
            .field("headers", &self.headers.len())
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    #[serde(default)]
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    http_server_config: Option<RawHttp>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    // exporter-toolkit keys carpulse refuses by name (see the module docs).
    cert: Option<serde_yaml_ng::Value>,
    key: Option<serde_yaml_ng::Value>,
    client_ca: Option<serde_yaml_ng::Value>,
    cipher_suites: Option<serde_yaml_ng::Value>,
    curve_preferences: Option<serde_yaml_ng::Value>,
    prefer_server_cipher_suites: Option<serde_yaml_ng::Value>,
    client_allowed_sans: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// carpulse serves HTTP/1.1 only; `http2: true` (the default there) is accepted and means
    /// nothing here, since Prometheus scrapes over HTTP/1.1 as well.
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers exporter-toolkit lets a web config set.
const ALLOWED_HEADERS: [&str; 5] = [
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
];

/// A problem with the web config, phrased for the user (`file: key: what`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WebConfigError(pub String);

impl WebConfig {
    /// Reads and validates the web config at `path`; every file it names is read now.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let file = path.display().to_string();
        let err = |key: &str, msg: String| WebConfigError(format!("{file}: {key}: {msg}"));
        let text = std::fs::read_to_string(path)
            .map_err(|e| WebConfigError(format!("{file}: cannot read the web config: {e}")))?;
        // An empty file is a valid, empty config (plain HTTP, no auth), as in exporter-toolkit.
        let raw: RawWebConfig = if text.trim().is_empty() {
            RawWebConfig::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| WebConfigError(format!("{file}: {e}")))?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };

        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => tls_config(t, &resolve, &err)?,
        };

        let auth = match raw.basic_auth_users {
            None => None,
            Some(users) if users.is_empty() => None,
            Some(users) => {
                for (user, hash) in &users {
                    if user.contains(':') {
                        return Err(err(
                            "basic_auth_users",
                            format!("{user:?}: a user name cannot contain ':'"),
                        ));
                    }
                    hash.parse::<bcrypt::HashParts>().map_err(|_| {
                        err(
                            "basic_auth_users",
                            format!("{user}: not a bcrypt hash ($2y$..., e.g. from `htpasswd -nBC 10 {user}`)"),
                        )
                    })?;
                }
                Some(Arc::new(BasicAuth {
                    users,
                    verified: Mutex::default(),
                    keys: std::collections::hash_map::RandomState::new(),
                }))
            }
        };

        let mut headers = Vec::new();
        let http = raw.http_server_config.unwrap_or_default();
        let _ = http.http2;
        for (name, value) in http.headers.unwrap_or_default() {
            let Some(allowed) = ALLOWED_HEADERS
                .iter()
                .find(|h| h.eq_ignore_ascii_case(&name))
            else {
                return Err(err(
                    "http_server_config.headers",
                    format!(
                        "{name} cannot be set (allowed: {})",
                        ALLOWED_HEADERS.join(", ")
                    ),
                ));
            };
            let value = HeaderValue::from_str(&value).map_err(|_| {
                err(
                    "http_server_config.headers",
                    format!("{name}: not a valid header value"),
                )
            })?;
            headers.push((HeaderName::from_static(static_lower(allowed)), value));
        }
        Ok(WebConfig { tls, auth, headers })
    }

    /// Whether the listener speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether requests need basic auth.
    pub fn basic_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// Wraps `router` with basic auth and the configured headers.
    pub fn layer(&self, router: axum::Router) -> axum::Router {
        let headers = Arc::new(self.headers.clone());
        let mut router = router.layer(axum::middleware::from_fn_with_state(headers, add_headers));
        if let Some(auth) = &self.auth {
            router = router.layer(axum::middleware::from_fn_with_state(
                auth.clone(),
                require_auth,
            ));
        }
        router
    }

    /// The listener to serve on: TLS handshakes done apart from the accept loop when TLS is
    /// configured.
    pub fn listener(&self, listener: TcpListener) -> std::io::Result<Listener> {
        match &self.tls {
            None => Ok(Listener::Plain(listener)),
            Some(cfg) => {
                TlsListener::new(listener, TlsAcceptor::from(cfg.clone())).map(Listener::Tls)
            }
        }
    }
}

fn static_lower(name: &str) -> &'static str {
    match name {
        "Strict-Transport-Security" => "strict-transport-security",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-Frame-Options" => "x-frame-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "content-security-policy",
    }
}

fn tls_config(
    t: RawTls,
    resolve: &dyn Fn(&str) -> PathBuf,
    err: &dyn Fn(&str, String) -> WebConfigError,
) -> Result<Option<Arc<rustls::ServerConfig>>, WebConfigError> {
    for (key, set) in [
        ("cert", t.cert.is_some()),
        ("key", t.key.is_some()),
        ("client_ca", t.client_ca.is_some()),
        ("cipher_suites", t.cipher_suites.is_some()),
        ("curve_preferences", t.curve_preferences.is_some()),
        (
            "prefer_server_cipher_suites",
            t.prefer_server_cipher_suites.is_some(),
        ),
        ("client_allowed_sans", t.client_allowed_sans.is_some()),
    ] {
        if set {
            let why = match key {
                "cert" | "key" | "client_ca" => {
                    "name the PEM files with cert_file, key_file and client_ca_file"
                }
                "cipher_suites" | "curve_preferences" | "prefer_server_cipher_suites" => {
                    "rustls offers only strong suites and curves, in its own order"
                }
                _ => "use a client CA that issues only the clients you trust",
            };
            return Err(err(
                &format!("tls_server_config.{key}"),
                format!("not supported by carpulse: {why}"),
            ));
        }
    }
    let (cert, key) = match (
        t.cert_file.filter(|s| !s.is_empty()),
        t.key_file.filter(|s| !s.is_empty()),
    ) {
        // As exporter-toolkit: no certificate, no TLS.
        (None, None) if t.client_ca_file.is_none() => return Ok(None),
        (Some(c), Some(k)) => (resolve(&c), resolve(&k)),
        (None, _) => {
            return Err(err(
                "tls_server_config.cert_file",
                "missing (TLS needs cert_file and key_file)".into(),
            ))
        }
        (_, None) => {
            return Err(err(
                "tls_server_config.key_file",
                "missing (TLS needs cert_file and key_file)".into(),
            ))
        }
    };
    let version = |v: &Option<String>, key: &str, default| match v.as_deref() {
        None | Some("") => Ok(default),
        Some("TLS13") => Ok(&rustls::version::TLS13),
        Some("TLS12") => Ok(&rustls::version::TLS12),
        Some(other @ ("TLS10" | "TLS11")) => Err(err(
            &format!("tls_server_config.{key}"),
            format!("{other} is not supported (carpulse speaks TLS12 and TLS13)"),
        )),
        Some(other) => Err(err(
            &format!("tls_server_config.{key}"),
            format!("{other:?} is not one of TLS12, TLS13"),
        )),
    };
    let min = version(&t.min_version, "min_version", &rustls::version::TLS12)?;
    let max = version(&t.max_version, "max_version", &rustls::version::TLS13)?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13]
            .into_iter()
            .filter(|v| {
                let rank = |x: &rustls::SupportedProtocolVersion| u16::from(x.version);
                rank(v) >= rank(min) && rank(v) <= rank(max)
            })
            .collect();
    if versions.is_empty() {
        return Err(err(
            "tls_server_config.min_version",
            "is above max_version".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = Arc::new(
        CertFiles::load(cert, key, provider.clone())
            .map_err(|e| err("tls_server_config.cert_file", e))?,
    );
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| err("tls_server_config", e.to_string()))?;
    let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match (auth_type, t.client_ca_file.filter(|s| !s.is_empty())) {
        ("NoClientCert" | "", None) => builder.with_no_client_auth(),
        ("NoClientCert" | "", Some(_)) => {
            return Err(err(
                "tls_server_config.client_ca_file",
                "set, but client_auth_type is NoClientCert: set client_auth_type: RequireAndVerifyClientCert"
                    .into(),
            ))
        }
        (mode @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven"), Some(ca)) => {
            let path = resolve(&ca);
            let pem = std::fs::read(&path).map_err(|e| {
                err(
                    "tls_server_config.client_ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| {
                    err(
                        "tls_server_config.client_ca_file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
                roots.add(c).map_err(|e| {
                    err(
                        "tls_server_config.client_ca_file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            }
            if roots.is_empty() {
                return Err(err(
                    "tls_server_config.client_ca_file",
                    format!("{} holds no certificate", path.display()),
                ));
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if mode == "VerifyClientCertIfGiven" {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| err("tls_server_config.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", None) => {
            return Err(err(
                "tls_server_config.client_ca_file",
                format!("missing: client_auth_type {auth_type} needs the CA that issues the clients' certificates"),
            ))
        }
        (other @ ("RequestClientCert" | "RequireAnyClientCert"), _) => {
            return Err(err(
                "tls_server_config.client_auth_type",
                format!("{other} accepts certificates nobody verified; carpulse supports NoClientCert, VerifyClientCertIfGiven and RequireAndVerifyClientCert"),
            ))
        }
        (other, _) => {
            return Err(err(
                "tls_server_config.client_auth_type",
                format!("{other:?} is not one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
            ))
        }
    };
    let mut cfg = builder.with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(cfg)))
}

/// The certificate chain and key, read again when either file changes, so a renewal (certbot,
/// an ACME client) takes effect at the next handshake. A renewal that does not load keeps the
/// old pair and says why in the log.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// (the files' modification times, the pair read then). A std mutex: held for a stat and,
    /// rarely, a reload; never across an await.
    current: Mutex<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertFiles {
    fn load(
        cert: PathBuf,
        key: PathBuf,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<CertFiles, String> {
        let stamps = (modified(&cert), modified(&key));
        let pair = read_pair(&cert, &key, &provider)?;
        Ok(CertFiles {
            cert,
            key,
            provider,
            current: Mutex::new((stamps.0, stamps.1, pair)),
        })
    }
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    // The key's own error never quotes the key.
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| format!("{} holds no PEM private key", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|_| {
        format!(
            "the key in {} does not belong to the certificate in {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(pair))
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let stamps = (modified(&self.cert), modified(&self.key));
        if (stamps.0, stamps.1) != (current.0, current.1) {
            match read_pair(&self.cert, &self.key, &self.provider) {
                Ok(pair) => {
                    tracing::info!(cert = %self.cert.display(), "metrics listener: certificate reloaded");
                    *current = (stamps.0, stamps.1, pair);
                }
                Err(e) => {
                    // Half-written renewals settle; try again at the next change.
                    tracing::warn!(error = %e, "metrics listener: the changed certificate does not load; keeping the previous one");
                    current.0 = stamps.0;
                    current.1 = stamps.1;
                }
            }
        }
        Some(current.2.clone())
    }
}

/// The basic auth users and the credentials already verified. bcrypt is slow on purpose (tens
/// of milliseconds per check at cost 10), so a scrape every few seconds is verified once and
/// then recognised by a keyed hash of what it sent; the plain password is never kept.
struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<u64>>,
    /// Random per process: the cache key cannot be predicted, so it cannot be matched by a
    /// crafted password.
    keys: std::collections::hash_map::RandomState,
}

/// At most this many verified credentials are remembered (then the cache starts over).
const VERIFIED_MAX: usize = 64;

impl BasicAuth {
    fn key(&self, user: &str, password: &str) -> u64 {
        self.keys.hash_one((user, password))
    }

    /// Whether the `Authorization` header names a user and the right password.
    async fn check(self: &Arc<Self>, header: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let key = self.key(&user, &password);
        if self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return true;
        }
        // Off the async workers: bcrypt takes tens of milliseconds of CPU.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() >= VERIFIED_MAX {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

fn parse_basic(v: &HeaderValue) -> Option<(String, String)> {
    let v = v.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

async fn require_auth(State(auth): State<Arc<BasicAuth>>, req: Request, next: Next) -> Response {
    if auth.check(req.headers().get(header::AUTHORIZATION)).await {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"carpulse\"")],
        "Unauthorized\n",
    )
        .into_response()
}

async fn add_headers(
    State(headers): State<Arc<Vec<(HeaderName, HeaderValue)>>>,
    req: Request,
    next: Next,
) -> Response {
    let mut resp = next.run(req).await;
    for (name, value) in headers.iter() {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past it, new connections wait in the kernel's backlog.
const HANDSHAKES_MAX: usize = 64;

/// The metrics listener: plain TCP, or TLS.
pub enum Listener {
    Plain(TcpListener),
    Tls(TlsListener),
}

/// A TLS listener for `axum::serve`. Handshakes run in their own tasks, so one slow or silent
/// client cannot hold up the others (accepting and handshaking in `accept` would).
pub struct TlsListener {
    addr: std::net::SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, tls: TlsAcceptor) -> std::io::Result<TlsListener> {
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(HANDSHAKES_MAX);
        let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "metrics listener: TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "metrics listener: TLS handshake timed out")
                        }
                    }
                });
            }
        });
        Ok(TlsListener {
            addr,
            ready,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor ended (it only does when aborted): nothing more will come; the
            // server's shutdown signal ends the serve loop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_text(text: &str) -> Result<WebConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "web.yml", text);
        WebConfig::load(&p).map_err(|e| e.0)
    }

    #[test]
    fn empty_and_absent_sections_mean_plain_http_without_auth() {
        for text in ["", "basic_auth_users: {}\n", "tls_server_config: {}\n"] {
            let w = load_text(text).unwrap();
            assert!(!w.tls() && !w.basic_auth(), "{text:?}");
        }
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            ("tls_server_config:\n  cert_file: a.crt\n", "tls_server_config.key_file: missing"),
            (
                "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "tls_server_config.cipher_suites: not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n  min_version: TLS11\n",
                "TLS11 is not supported",
            ),
            ("basic_auth_users:\n  alice: hunter2\n", "alice: not a bcrypt hash"),
            ("basic_auth_user:\n  alice: x\n", "unknown field `basic_auth_user`"),
            (
                "http_server_config:\n  headers:\n    Server: carpulse\n",
                "Server cannot be set",
            ),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
                "cannot read",
            ),
        ];
        for (text, want) in cases {
            let e = load_text(text).err().unwrap_or_default();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_remembers_what_it_verified() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let w = load_text(&format!("basic_auth_users:\n  prom: '{hash}'\n")).unwrap();
        let auth = w.auth.clone().unwrap();
        let basic = |s: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            ))
            .unwrap()
        };
        assert!(auth.check(Some(&basic("prom:s3cret"))).await);
        assert!(auth.check(Some(&basic("prom:s3cret"))).await, "cached");
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
        assert!(!auth.check(Some(&basic("prom:wrong"))).await);
        assert!(!auth.check(Some(&basic("other:s3cret"))).await);
        assert!(!auth.check(None).await);
        assert!(
            !auth
                .check(Some(&HeaderValue::from_static("Bearer abc")))
                .await
        );
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[test]
    fn the_test_fixture_loads_with_tls_and_auth() {
        let w = WebConfig::load(&fixtures().join("web-config.yml")).unwrap();
        assert!(w.tls() && w.basic_auth());
        assert_eq!(w.headers.len(), 1);
        assert!(!format!("{w:?}").contains("$2"), "no hash in Debug");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let tls = fixtures().join("tls");
        let e = load_text(&format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            tls.join("server.crt").display(),
            tls.join("client.key").display()
        ))
        .err()
        .unwrap_or_default();
        assert!(e.contains("does not belong to the certificate"), "{e}");
        assert!(!e.contains("PRIVATE KEY"), "{e}");
        let e = load_text(&format!(
            "tls_server_config:\n  cert_file: {0}\n  key_file: {1}\n  client_ca_file: {0}\n",
            tls.join("server.crt").display(),
            tls.join("server.key").display()
        ))
        .err()
        .unwrap_or_default();
        assert!(e.contains("client_auth_type is NoClientCert"), "{e}");
    }
}
