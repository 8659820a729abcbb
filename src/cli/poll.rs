//! `carpulse poll [--vehicle V] [--job battery|info]`: poll now. When a daemon answers on
//! `metrics.listen` (as `status` finds it), the poll is asked of it (`POST /poll`, see
//! [`crate::daemon::control`]), so it goes through the daemon's gates and counts against its
//! budget, and two pollers never ask one car at once; otherwise the same poller code runs
//! in-process on the store. Prints what each poll stored, or why not; fails when any poll
//! did not succeed.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::output::{local, vehicle_label};
use crate::cli::report::{known_vehicles, open_read_only, resolve_vehicle, KnownVehicle};
use crate::config::Config;
use crate::daemon::control::{PollRequest, PollResult, POLL_PATH};

/// Environment variables with the basic auth user and password for a daemon whose
/// `metrics.web_config_file` asks for them (the file holds only bcrypt hashes).
pub const USER_ENV: &str = "CARPULSE_METRICS_USER";
pub const PASSWORD_ENV: &str = "CARPULSE_METRICS_PASSWORD";

/// How long to wait for a daemon to accept the connection before polling in-process.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// `carpulse poll`: resolves `vehicle` against the store (an unknown one lists the stored
/// vehicles), asks the daemon or polls in-process, prints the results to `out`, and fails
/// when a poll did not succeed (the exit code a script checks).
pub async fn run(
    cfg: &Config,
    vehicle: Option<&str>,
    job: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (known, vehicles) = {
        let c = open_read_only(&cfg.store.path)?;
        let known = known_vehicles(&c)?;
        // An unknown name is an error that lists the stored vehicles.
        let vehicles = match vehicle {
            Some(q) => vec![resolve_vehicle(&c, q)?.id],
            None => Vec::new(),
        };
        (known, vehicles)
    };
    let req = PollRequest {
        vehicles,
        jobs: job.map(|j| vec![j.to_owned()]).unwrap_or_default(),
    };
    let addr = crate::cli::report::reach(cfg.metrics.listen);
    let daemon = tokio::net::TcpStream::connect(addr);
    let results = match tokio::time::timeout(PROBE_TIMEOUT, daemon).await {
        Ok(Ok(_)) => {
            let (url, results) = through_daemon(cfg, addr, &req).await?;
            writeln!(out, "polled through the daemon at {url}")?;
            results
        }
        _ => {
            writeln!(
                out,
                "no daemon answers on {addr} (metrics.listen): polling in-process"
            )?;
            in_process(cfg, &req).await?
        }
    };
    print_results(&known, &results, out)?;
    let failed = results.iter().filter(|r| !r.succeeded()).count();
    if results.is_empty() {
        bail!("nothing was polled: the daemon polls no vehicle (see `carpulse status`)");
    }
    if failed > 0 {
        bail!(
            "{failed} of {} poll(s) did not succeed (see above)",
            results.len()
        );
    }
    Ok(())
}

/// Asks the running daemon; its answer, or why it could not be asked.
async fn through_daemon(
    cfg: &Config,
    addr: SocketAddr,
    req: &PollRequest,
) -> anyhow::Result<(String, Vec<PollResult>)> {
    let mut http = reqwest::Client::builder()
        // Two jobs, each a request bounded by poll.timeout plus a token refresh.
        .timeout(cfg.poll.timeout * 3 + Duration::from_secs(30))
        .no_proxy();
    let mut scheme = "http";
    if let Some(cert) = tls_cert_file(cfg)? {
        scheme = "https";
        http = http.use_preconfigured_tls(pinned_tls(&cert)?);
    }
    let http = http.build().context("creating the HTTP client")?;
    let url = format!("{scheme}://{addr}{POLL_PATH}");
    let mut post = http.post(&url).json(req);
    if let Ok(user) = std::env::var(USER_ENV) {
        post = post.basic_auth(user, std::env::var(PASSWORD_ENV).ok());
    }
    let answer = post
        .send()
        .await
        .with_context(|| format!("asking the daemon at {url} to poll"))?;
    let status = answer.status();
    if status.is_success() {
        let results = answer
            .json()
            .await
            .with_context(|| format!("reading the daemon's answer from {url}"))?;
        return Ok((url, results));
    }
    let body = answer.text().await.unwrap_or_default();
    let body: String = body.chars().take(500).collect();
    match status.as_u16() {
        401 => bail!(
            "the daemon at {url} asks for basic auth (metrics.web_config_file): set {USER_ENV} and {PASSWORD_ENV}"
        ),
        404 | 405 => bail!(
            "something answers on {addr} (metrics.listen) but takes no polls: a carpulse older than `carpulse poll`, or another program"
        ),
        _ => bail!("the daemon at {url} answered {status}: {}", body.trim()),
    }
}

/// `tls_server_config.cert_file` of `metrics.web_config_file`, relative to that file.
fn tls_cert_file(cfg: &Config) -> anyhow::Result<Option<std::path::PathBuf>> {
    let Some(path) = &cfg.metrics.web_config_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics.web_config_file {}", path.display()))?;
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("metrics.web_config_file {}", path.display()))?;
    let cert = yaml
        .get("tls_server_config")
        .and_then(|t| t.get("cert_file"))
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty());
    Ok(cert.map(|c| match path.parent() {
        Some(dir) => dir.join(c),
        None => c.into(),
    }))
}

/// A TLS client that accepts exactly the certificate `metrics.web_config_file` names: the
/// daemon is reached on a loopback address its certificate need not name, and whoever could
/// answer there instead (another local program on a free port) cannot present that
/// certificate's key. The basic auth password is only sent after that check.
fn pinned_tls(cert: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(cert).with_context(|| {
        format!(
            "reading {} (metrics.web_config_file's cert_file)",
            cert.display()
        )
    })?;
    let pinned = CertificateDer::pem_slice_iter(&pem)
        .next()
        .with_context(|| format!("{} holds no PEM certificate", cert.display()))?
        .with_context(|| format!("{}: not a PEM certificate", cert.display()))?
        .into_owned();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Pinned {
            cert: pinned,
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    Ok(cfg)
}

/// See [`pinned_tls`].
#[derive(Debug)]
struct Pinned {
    cert: rustls::pki_types::CertificateDer<'static>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// No daemon: the daemon's own parts, built on the store, poll once and close it.
async fn in_process(cfg: &Config, req: &PollRequest) -> anyhow::Result<Vec<PollResult>> {
    let mut cfg = cfg.clone();
    // Nothing is served: the metrics listener is a throwaway loopback port.
    cfg.metrics.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.metrics.web_config_file = None;
    let daemon = crate::daemon::Daemon::build(cfg).await?;
    daemon.poll_now(req).await
}

fn print_results(
    known: &[KnownVehicle],
    results: &[PollResult],
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for r in results {
        let name = known
            .iter()
            .find(|k| k.id == r.vehicle_id)
            .map(|k| vehicle_label(&k.id, &k.name))
            .unwrap_or_else(|| r.vehicle_id.clone());
        writeln!(out, "{name}  {}: {}", r.job, r.outcome)?;
        if let Some(why) = &r.reason {
            writeln!(out, "  why: {why}")?;
        }
        if !r.events.is_empty() {
            let events: Vec<String> = r
                .events
                .iter()
                .map(|(endpoint, outcome, cause)| match cause {
                    Some(c) => format!("{endpoint} {outcome} ({c})"),
                    None => format!("{endpoint} {outcome}"),
                })
                .collect();
            writeln!(out, "  answers: {}", events.join(", "))?;
        }
        for (what, recorded_at) in &r.stored {
            writeln!(out, "  stored: {what} (reported {})", local(*recorded_at))?;
        }
        if r.stored.is_empty() && r.succeeded() {
            writeln!(
                out,
                "  stored: nothing new (the car reported what is already stored)"
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
