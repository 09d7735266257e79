//! The kubelet's authenticated API: `GET /pods` over TLS, verified against `ca_file` only
//! (never the system roots: the kubelet's serving certificate comes from the cluster's CA),
//! with the service account's bearer token, read again from `token_file` at every call so
//! a rotated token is used as soon as the kubelet writes it.
//!
//! The answer is capped at [`MAX_ANSWER`], read into a buffer that is wiped after parsing
//! (it holds every pod's spec, env values included). The token is never logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use super::pod::{Pod, parse_pod_list};
use crate::config::KubernetesConfig;

/// The largest `/pods` answer accepted (a node of 250 pods answers a few MiB).
pub(crate) const MAX_ANSWER: usize = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the kubelet client could not be set up (at start, from the config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    #[error(
        "[kubernetes] ca_file {path}: cannot read: {source} (mount the service account's ca.crt, or set ca_file)"
    )]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("[kubernetes] ca_file {path}: {reason}")]
    CaBad { path: PathBuf, reason: String },
    #[error("[kubernetes] cannot set up TLS: {0}")]
    Tls(String),
}

/// Asks one kubelet for its pods.
pub(crate) struct KubeletClient {
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    token_file: PathBuf,
    loopback_only: bool,
}

impl KubeletClient {
    pub(crate) fn new(cfg: &KubernetesConfig, loopback_only: bool) -> Result<Self, KubeletError> {
        let roots = ca_roots(&cfg.ca_file)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeletError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            host: cfg.host.clone(),
            port: cfg.port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            token_file: cfg.token_file.clone(),
            loopback_only,
        })
    }

    async fn pods(&self) -> Result<Vec<Pod>, String> {
        let token = read_token(&self.token_file)?;
        let tcp = self.connect().await?;
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("kubelet host {} is not a TLS name: {e}", self.host))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| {
            format!(
                "TLS with the kubelet at {}:{} failed: {e} (its serving certificate must chain to [kubernetes] ca_file)",
                self.host, self.port
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with the kubelet failed: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut auth = http::HeaderValue::from_str(&Zeroizing::new(format!("Bearer {}", token.as_str())))
            .map_err(|_| {
                format!("{}: the token holds characters a header cannot carry", self.token_file.display())
            })?;
        auth.set_sensitive(true);
        let req = http::Request::get("/pods")
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::AUTHORIZATION, auth)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the kubelet request: {e}"))?;
        let answer = async {
            let resp =
                sender.send_request(req).await.map_err(|e| format!("the kubelet request failed: {e}"))?;
            let status = resp.status();
            if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
                return Err(format!(
                    "the kubelet answered {status} to GET /pods: the agent's service account needs get on \
                     nodes/pods (or nodes/proxy), and a current token in {}",
                    self.token_file.display()
                ));
            }
            if !status.is_success() {
                return Err(format!("the kubelet answered {status} to GET /pods"));
            }
            let body = read_capped(resp.into_body(), MAX_ANSWER).await?;
            parse_pod_list(&body).map_err(|e| e.to_string())
        }
        .await;
        driver.abort();
        answer
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, String> {
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((bare, self.port))
                .await
                .map_err(|e| format!("cannot resolve the kubelet's host {bare}: {e}"))?
                .collect(),
        };
        if self.loopback_only
            && let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback())
        {
            return Err(format!("loopback-only mode refused the kubelet at {a} before connecting"));
        }
        let mut last = format!("the kubelet's host {bare} resolves to no address");
        for a in &addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = format!("cannot connect to the kubelet at {a}: {e}"),
                Err(_) => last = format!("connecting to the kubelet at {a} timed out"),
            }
        }
        Err(last)
    }
}

#[async_trait::async_trait]
impl super::FetchPods for KubeletClient {
    async fn fetch(&self) -> Result<Vec<Pod>, String> {
        self.pods().await
    }
}

/// The token, trimmed, read again at every call (projected tokens rotate in place).
fn read_token(path: &Path) -> Result<Zeroizing<String>, String> {
    let raw = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read [kubernetes] token_file {}: {e}", path.display()))?,
    );
    let token = Zeroizing::new(raw.trim().to_owned());
    if token.is_empty() {
        return Err(format!("[kubernetes] token_file {} is empty", path.display()));
    }
    Ok(token)
}

/// Reads a body of at most `cap` bytes into a buffer wiped when dropped; a longer one is an
/// error, found without reading more than `cap` plus one frame.
pub(crate) async fn read_capped<B>(mut body: B, cap: usize) -> Result<Zeroizing<Vec<u8>>, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = Zeroizing::new(Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the kubelet's answer failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > cap {
                return Err(format!("the kubelet's /pods answer is larger than {} MiB: refused", cap >> 20));
            }
            // Grow by hand: a reallocation by `extend` would leave an unwiped copy behind.
            if buf.capacity() < buf.len() + data.len() {
                let mut bigger =
                    Zeroizing::new(Vec::with_capacity((buf.len() + data.len()).max(buf.capacity() * 2)));
                bigger.extend_from_slice(&buf);
                buf = bigger;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, KubeletError> {
    let bad = |reason: String| KubeletError::CaBad { path: path.to_owned(), reason };
    let bytes =
        std::fs::read(path).map_err(|source| KubeletError::CaFile { path: path.to_owned(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots.add(cert).map_err(|e| bad(format!("certificate refused: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of zero-filled chunks of the given sizes.
    struct Chunks(std::collections::VecDeque<usize>);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            let next = self.0.pop_front().map(|n| Ok(hyper::body::Frame::data(Bytes::from(vec![b' '; n]))));
            std::task::Poll::Ready(next)
        }
    }

    fn chunks(sizes: &[usize]) -> Chunks {
        Chunks(sizes.iter().copied().collect())
    }

    /// Issue 18: an answer past the cap is refused, one at the cap is read whole.
    #[tokio::test]
    async fn answers_are_capped() {
        let at_cap = read_capped(chunks(&[1 << 20; 16]), MAX_ANSWER).await.unwrap();
        assert_eq!(at_cap.len(), MAX_ANSWER);
        let e =
            read_capped(chunks(&[1 << 20; 16].iter().copied().chain([1]).collect::<Vec<_>>()), MAX_ANSWER)
                .await
                .unwrap_err();
        assert_eq!(e, "the kubelet's /pods answer is larger than 16 MiB: refused");
        let one = read_capped(http_body_util::Full::new(Bytes::from_static(b"{}")), 2).await.unwrap();
        assert_eq!(one.as_slice(), b"{}");
        assert!(read_capped(http_body_util::Full::new(Bytes::from_static(b"{} ")), 2).await.is_err());
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("kvb-kube-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ca.crt");
        std::fs::write(&f, "not a certificate\n").unwrap();
        assert!(ca_roots(&f).unwrap_err().to_string().contains("no PEM certificate"));
        assert!(ca_roots(&dir.join("missing")).unwrap_err().to_string().contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_are_trimmed_and_never_empty() {
        let dir = std::env::temp_dir().join(format!("kvb-kube-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc.def\n").unwrap();
        assert_eq!(read_token(&f).unwrap().as_str(), "abc.def");
        std::fs::write(&f, " \n").unwrap();
        assert!(read_token(&f).unwrap_err().contains("is empty"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
