//! The HTTP transport every Azure SDK client and credential of the agent uses: hyper 1 over
//! tokio, TLS by rustls (ring), no OpenSSL, no reqwest.
//!
//! It owns what must be decided in one place:
//! - **Trust**: the system roots plus an optional extra CA (`ca_file`, for emulators and
//!   private endpoints).
//! - **Time**: a connect timeout and a whole-request timeout.
//! - **Where to connect**: a host:port → address:port override table (like curl's
//!   `--connect-to`); TLS still verifies the URL's host name, so an emulator can answer for
//!   `*.vault.azure.net` with challenge verification on.
//! - **Loopback only**: when on (tests, `kvbroker dev`), any address outside 127.0.0.0/8 and
//!   ::1 is refused before a socket is opened. Through a proxy, the target must still map to
//!   loopback and the proxy must be on loopback.
//! - **Proxy**: `https` targets through an HTTP CONNECT tunnel ([`Proxy`]); identity
//!   endpoints, loopback and link-local never.
//!
//! Connections are not reused: each request opens its own, so no pooled buffer keeps a
//! secret between fetches (the cache makes fetches rare; the cost is one handshake each).
//! Never logs bodies.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, HttpClient, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;

mod proxy;

pub(crate) use proxy::Proxy;

/// One `connect_to` entry: requests for `host:port` go to `addr` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTo {
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
}

impl std::str::FromStr for ConnectTo {
    type Err = String;

    /// `HOST:PORT:ADDR:PORT`, e.g. `myvault.vault.azure.net:443:127.0.0.1:8443`
    /// (an IPv6 address in brackets: `[::1]:8443`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid connect_to {s:?}: write HOST:PORT:ADDRESS:PORT, like \"x.vault.azure.net:443:127.0.0.1:8443\""
            )
        };
        let (host, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, addr) = rest.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ConnectTo { host: host.to_ascii_lowercase(), port, addr })
    }
}

/// How a transport is built.
#[derive(Debug, Clone)]
pub(crate) struct TransportConfig {
    pub ca_file: Option<PathBuf>,
    pub connect_to: Vec<ConnectTo>,
    pub loopback_only: bool,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// HTTP CONNECT proxy for `https` targets.
    pub proxy: Option<Proxy>,
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("{path}: cannot read CA file: {source}")]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM certificate in CA file")]
    CaEmpty { path: PathBuf },
    #[error("{path}: CA certificate refused: {reason}")]
    CaBad { path: PathBuf, reason: String },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// The agent's `HttpClient`.
pub(crate) struct HyperTransport {
    tls: tokio_rustls::TlsConnector,
    cfg: TransportConfig,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// The largest response body accepted from Key Vault or an identity endpoint.
const MAX_RESPONSE: usize = 4 << 20;

impl HyperTransport {
    pub(crate) fn new(cfg: TransportConfig) -> Result<Arc<Self>, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        // System roots: an unreadable one is skipped (the loader reports them, we ignore).
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &cfg.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(Self { tls: tokio_rustls::TlsConnector::from(Arc::new(tls)), cfg }))
    }

    /// Where `host:port` should be reached, after overrides and the loopback guard.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, azure_core::Error> {
        let lower = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let addrs: Vec<SocketAddr> =
            if let Some(o) = self.cfg.connect_to.iter().find(|o| o.host == lower && o.port == port) {
                vec![o.addr]
            } else if let Ok(ip) = lower.parse::<IpAddr>() {
                vec![SocketAddr::new(ip, port)]
            } else if self.cfg.loopback_only && lower != "localhost" {
                // Do not even ask DNS about a name we would refuse to reach.
                return Err(refused(host, port, "no connect_to entry maps it to loopback"));
            } else {
                tokio::net::lookup_host((lower.as_str(), port))
                    .await
                    .map_err(|e| io_error(format!("cannot resolve {host}: {e}")))?
                    .collect()
            };
        if self.cfg.loopback_only
            && let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback())
        {
            return Err(refused(host, port, &format!("it resolves to {}", bad.ip())));
        }
        if addrs.is_empty() {
            return Err(io_error(format!("{host} resolves to no address")));
        }
        Ok(addrs)
    }

    async fn connect(
        &self,
        addrs: &[SocketAddr],
        host: &str,
    ) -> Result<tokio::net::TcpStream, azure_core::Error> {
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.cfg.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = Some(format!("cannot connect to {host} ({addr}): {e}")),
                Err(_) => {
                    last = Some(format!(
                        "connecting to {host} ({addr}) timed out after {:?}",
                        self.cfg.connect_timeout
                    ));
                }
            }
        }
        Err(azure_core::Error::with_message(
            azure_core::error::ErrorKind::Connection,
            last.unwrap_or_else(|| format!("no address to connect to for {host}")),
        ))
    }

    async fn send(&self, request: &Request) -> Result<AsyncRawResponse, azure_core::Error> {
        let url = request.url();
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(io_error(format!("unsupported URL scheme {other}"))),
        };
        let host = url.host_str().ok_or_else(|| io_error("URL has no host".into()))?.to_owned();
        let port = url.port_or_known_default().unwrap_or(if https { 443 } else { 80 });
        let tcp = match self.cfg.proxy.as_ref().filter(|p| https && p.applies(&host, port)) {
            Some(proxy) => {
                if self.cfg.loopback_only {
                    // The guard judges the target too, though the proxy resolves it.
                    self.resolve(&host, port).await?;
                }
                let addrs = self.resolve(proxy.host(), proxy.port()).await?;
                let mut tcp = self.connect(&addrs, proxy.host()).await.map_err(|e| {
                    azure_core::Error::with_message(
                        azure_core::error::ErrorKind::Connection,
                        format!("proxy {}: {e}", proxy.shown()),
                    )
                })?;
                proxy.connect(&mut tcp, &host, port).await.map_err(|(m, permanent)| {
                    // Other, like the loopback guard: retrying a refusal spends the deadline.
                    let kind = if permanent {
                        azure_core::error::ErrorKind::Other
                    } else {
                        azure_core::error::ErrorKind::Connection
                    };
                    azure_core::Error::with_message(kind, m)
                })?;
                tracing::debug!(proxy = %proxy.shown(), target = %host, port, "tunnel open");
                tcp
            }
            None => {
                let addrs = self.resolve(&host, port).await?;
                self.connect(&addrs, &host).await?
            }
        };

        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let mut builder = http::Request::builder()
            .method(request.method().as_str())
            .uri(path)
            .header(http::header::HOST, host_header(&host, port, https));
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = match request.body() {
            azure_core::http::Body::Bytes(b) => b.clone(),
            azure_core::http::Body::SeekableStream(_) => {
                return Err(io_error("streaming request bodies are not supported".into()));
            }
        };
        let req = builder.body(Full::new(body)).map_err(|e| io_error(format!("bad request: {e}")))?;

        if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io_error(format!("bad TLS name {host}: {e}")))?;
            let tls = self.tls.connect(name, tcp).await.map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Connection,
                    format!("TLS with {host} failed: {e} (is its CA trusted? set ca_file for a private CA)"),
                )
            })?;
            exchange(TokioIo::new(tls), req).await
        } else {
            exchange(TokioIo::new(tcp), req).await
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for HyperTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        match tokio::time::timeout(self.cfg.request_timeout, self.send(request)).await {
            Ok(r) => r,
            Err(_) => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Io,
                format!(
                    "request to {} timed out after {:?}",
                    request.url().host_str().unwrap_or("?"),
                    self.cfg.request_timeout
                ),
            )),
        }
    }
}

async fn exchange<I>(io: I, req: http::Request<Full<Bytes>>) -> azure_core::Result<AsyncRawResponse>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| io_error(format!("HTTP handshake failed: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| io_error(format!("request failed: {e}")));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    let status = resp.status().as_u16();
    let mut headers = Headers::new();
    for (name, value) in resp.headers() {
        if let Ok(v) = value.to_str() {
            headers.insert(HeaderName::from(name.as_str().to_owned()), HeaderValue::from(v.to_owned()));
        }
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| io_error(format!("reading response failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_RESPONSE {
                driver.abort();
                return Err(io_error("response larger than 4 MiB".into()));
            }
            buf.extend_from_slice(&data);
        }
    }
    driver.abort();
    Ok(AsyncRawResponse::from_bytes(StatusCode::from(status), headers, buf))
}

fn host_header(host: &str, port: u16, https: bool) -> String {
    if (https && port == 443) || (!https && port == 80) { host.to_owned() } else { format!("{host}:{port}") }
}

fn io_error(message: String) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Io, message)
}

/// A refusal by the loopback guard. `Other`, not `Connection`: it is a configuration fact,
/// and retry policies (the SDK's and ours) must not spend the caller's deadline on it.
fn refused(host: &str, port: u16, why: &str) -> azure_core::Error {
    azure_core::Error::with_message(
        azure_core::error::ErrorKind::Other,
        format!("loopback-only mode refused {host}:{port} before connecting: {why}"),
    )
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), TransportError> {
    let bytes =
        std::fs::read(path).map_err(|source| TransportError::CaFile { path: path.to_owned(), source })?;
    let mut n = 0;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&bytes) {
        let cert =
            cert.map_err(|e| TransportError::CaBad { path: path.to_owned(), reason: e.to_string() })?;
        roots
            .add(cert)
            .map_err(|e| TransportError::CaBad { path: path.to_owned(), reason: e.to_string() })?;
        n += 1;
    }
    if n == 0 {
        return Err(TransportError::CaEmpty { path: path.to_owned() });
    }
    Ok(())
}

/// How long a throttled answer asks us to wait, in every form Azure uses:
/// `retry-after-ms`, `x-ms-retry-after-ms` (milliseconds), `Retry-After` (seconds or an
/// HTTP-date). Capped at 5 minutes so a bad header cannot stop a vault for good.
pub(crate) fn retry_after(headers: &Headers, now: SystemTime) -> Option<Duration> {
    let get = |n: &'static str| headers.get_optional_str(&HeaderName::from_static(n)).map(str::trim);
    let ms = get("retry-after-ms")
        .or_else(|| get("x-ms-retry-after-ms"))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let d = ms.or_else(|| {
        let v = get("retry-after")?;
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let at = azure_core::time::parse_rfc7231(v).ok()?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.unix_timestamp()).ok()?);
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    })?;
    Some(d.min(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(loopback_only: bool, connect_to: Vec<ConnectTo>) -> Arc<HyperTransport> {
        HyperTransport::new(TransportConfig {
            ca_file: None,
            connect_to,
            loopback_only,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            proxy: None,
        })
        .unwrap()
    }

    #[test]
    fn parses_connect_to() {
        let c: ConnectTo = "X.vault.azure.net:443:127.0.0.1:8443".parse().unwrap();
        assert_eq!(c.host, "x.vault.azure.net");
        assert_eq!(c.addr, "127.0.0.1:8443".parse().unwrap());
        let v6: ConnectTo = "h:80:[::1]:9".parse().unwrap();
        assert_eq!(v6.addr, "[::1]:9".parse().unwrap());
        assert!("h:80:127.0.0.1".parse::<ConnectTo>().is_err());
        assert!(":80:127.0.0.1:1".parse::<ConnectTo>().is_err());
    }

    /// The guard refuses before any socket exists: IMDS, a public name, a private address.
    #[tokio::test]
    async fn loopback_only_refuses_other_addresses_before_connecting() {
        let t = transport(true, vec![]);
        for (host, port) in [("169.254.169.254", 80), ("myvault.vault.azure.net", 443), ("10.0.0.1", 443)] {
            let e = t.resolve(host, port).await.unwrap_err().to_string();
            assert!(e.contains("loopback-only mode refused"), "{e}");
        }
        assert_eq!(t.resolve("127.0.0.1", 80).await.unwrap(), vec!["127.0.0.1:80".parse().unwrap()]);
        let mapped = transport(true, vec!["169.254.169.254:80:127.0.0.1:9999".parse().unwrap()]);
        assert_eq!(
            mapped.resolve("169.254.169.254", 80).await.unwrap(),
            vec!["127.0.0.1:9999".parse().unwrap()]
        );
        // A mapping to a non-loopback address is refused too.
        let escape = transport(true, vec!["a:1:10.1.1.1:1".parse().unwrap()]);
        assert!(escape.resolve("a", 1).await.is_err());
    }

    /// Through a proxy the guard still judges the target: an unmapped Azure host is refused
    /// before the proxy is even contacted.
    #[tokio::test]
    async fn loopback_only_refuses_unmapped_targets_through_a_proxy() {
        let proxy = Proxy::from_settings(Some("http://127.0.0.1:9"), &[], &|_| None).unwrap();
        let t = HyperTransport::new(TransportConfig {
            ca_file: None,
            connect_to: vec![],
            loopback_only: true,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            proxy,
        })
        .unwrap();
        let url = azure_core::http::Url::parse("https://myvault.vault.azure.net/secrets/s").unwrap();
        let req = Request::new(url, azure_core::http::Method::Get);
        let e = t.execute_request(&req).await.unwrap_err().to_string();
        assert!(e.contains("loopback-only mode refused myvault.vault.azure.net:443"), "{e}");
    }
}
