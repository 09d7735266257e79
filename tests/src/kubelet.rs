//! A stand-in for a node's kubelet (`GET /pods` on its authenticated port), on 127.0.0.1.
//!
//! TLS with its own CA (generated here, written to `ca.crt`), a bearer-token check (the token
//! it accepts can be swapped, as a rotation would), a `/pods` answer from a fixture shaped
//! like a real kubelet's `PodList`, a call count, and faults: an oversized answer, a kubelet
//! that accepts connections and never answers, and a stopped one (connections refused).
//! It runs on its own runtime thread inside the test process and stops when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{TempDir, write_mode};

/// How the stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeletMode {
    /// The fixture, to a caller with the current token.
    Serve,
    /// A `/pods` answer of 17 MiB (over the agent's 16 MiB cap).
    Oversize,
    /// Accept the connection and never answer.
    Hang,
}

struct Shared {
    token: Mutex<String>,
    pods: String,
    mode: Mutex<KubeletMode>,
    calls: AtomicU64,
    refused: AtomicU64,
}

/// A running stand-in kubelet.
pub struct Kubelet {
    pub url: String,
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    /// The agent's token file (0600), holding the token the stand-in accepts at start.
    pub token_file: PathBuf,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: TempDir,
}

impl Kubelet {
    /// Starts serving `fixture` (a `PodList` JSON text), accepting `token`.
    pub fn start(fixture: &str, token: &str) -> Kubelet {
        serde_json::from_str::<serde_json::Value>(fixture).expect("the fixture is JSON");
        let dir = TempDir::new("kubelet");
        let (ca_pem, server) = tls();
        let ca_file = dir.path().join("ca.crt");
        write_mode(&ca_file, &ca_pem, 0o644);
        let token_file = dir.path().join("token");
        write_mode(&token_file, token, 0o600);
        let shared = Arc::new(Shared {
            token: Mutex::new(token.to_owned()),
            pods: fixture.to_owned(),
            mode: Mutex::new(KubeletMode::Serve),
            calls: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let s = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, s) = (acceptor.clone(), Arc::clone(&s));
                tokio::spawn(async move {
                    if *s.mode.lock().unwrap() == KubeletMode::Hang {
                        // Hold the connection open without a TLS handshake, as a wedged
                        // kubelet would.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(tcp);
                        return;
                    }
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = service_fn(move |req| {
                        let s = Arc::clone(&s);
                        async move { Ok::<_, std::convert::Infallible>(answer(&s, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Kubelet {
            url: format!("https://{addr}"),
            addr,
            ca_file,
            token_file,
            shared,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    /// The `[kubernetes]` section for an agent using this stand-in.
    pub fn config_section(&self, pod_cache_ttl: &str) -> String {
        format!(
            "[kubernetes]\nkubelet_url = {:?}\nca_file = {:?}\ntoken_file = {:?}\npod_cache_ttl = {pod_cache_ttl:?}\n",
            self.url, self.ca_file, self.token_file
        )
    }

    /// `/pods` requests answered with pods (a good token).
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// `/pods` requests refused for their token.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// From now on only `token` is accepted (the token file is left as it is).
    pub fn accept_only(&self, token: &str) {
        *self.shared.token.lock().unwrap() = token.to_owned();
    }

    /// Writes `token` to the agent's token file, as the kubelet rotates a projected token.
    pub fn write_token_file(&self, token: &str) {
        write_mode(&self.token_file, token, 0o600);
    }

    pub fn set_mode(&self, mode: KubeletMode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Stops listening: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(s: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        r
    };
    let want = format!("Bearer {}", s.token.lock().unwrap());
    let got = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if got != Some(want.as_str()) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return reply(StatusCode::UNAUTHORIZED, Bytes::from_static(b"Unauthorized"));
    }
    if req.method() != http::Method::GET || req.uri().path() != "/pods" {
        return reply(StatusCode::NOT_FOUND, Bytes::from_static(b"404 page not found"));
    }
    s.calls.fetch_add(1, Ordering::SeqCst);
    match *s.mode.lock().unwrap() {
        KubeletMode::Oversize => {
            // A valid PodList start, padded past 16 MiB with whitespace.
            let mut body = b"{\"kind\":\"PodList\",\"items\":[] ".to_vec();
            body.resize(17 << 20, b' ');
            body.push(b'}');
            reply(StatusCode::OK, Bytes::from(body))
        }
        _ => reply(StatusCode::OK, Bytes::from(s.pods.clone())),
    }
}

/// A CA and a serving certificate for 127.0.0.1 (as a kubelet's is for its node).
fn tls() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kubelet stand-in test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca_cert.pem(), Arc::new(server))
}

/// The fixture at `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
