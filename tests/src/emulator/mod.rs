//! `kvbroker-emulator`: Azure Key Vault and the managed identity endpoints, on loopback.
//!
//! - A TLS server (a CA generated at start, written to `DIR/ca.pem`) answering as
//!   `kvbroker-emu.vault.azure.net` (the secrets REST subset: get, set, list versions,
//!   update attributes, delete; the 401 bearer challenge; Key Vault's error bodies) and as
//!   `login.microsoftonline.com` (the client-assertion token exchange of workload identity).
//! - A plain HTTP server with the token endpoints of IMDS, App Service, Azure ML and Arc,
//!   and a control API: per-operation call counts, and fault injection (status with
//!   `Retry-After`, latency, dropped connections; per secret or for all).
//!
//! Both bind 127.0.0.1 only. Clients reach the vault's name through a `connect_to` entry,
//! so TLS and Key Vault's challenge verification run as they would against Azure.

pub mod agent_config;
mod identity;
mod keyvault;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub(crate) type Body = Full<Bytes>;

/// What the emulator tells its users (also `DIR/emulator.json` and its first output line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmulatorInfo {
    pub vault_url: String,
    /// `HOST:PORT:ADDR:PORT` entries for the agent's `connect_to`.
    pub connect_to: Vec<String>,
    pub ca_file: PathBuf,
    pub control_url: String,
    /// `DIR/agent.toml`: a config for `kvbroker run` against this emulator.
    pub agent_config: PathBuf,
    /// Per identity source: the environment the agent needs, and extra settings.
    pub identity: HashMap<String, IdentityInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub env: HashMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_dir: Option<PathBuf>,
    /// A user-assigned identity's client id the endpoint also accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_assigned_client_id: Option<String>,
}

/// A fault to inject into vault requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fault {
    /// Only this secret (any case); all secrets if absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// Answer with this status (and Key Vault's error body).
    #[serde(default)]
    pub status: Option<u16>,
    /// `Retry-After` seconds, with `status`.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// Delay before answering.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Close the connection without answering.
    #[serde(default)]
    pub drop: bool,
    /// How many requests it applies to; forever if absent.
    #[serde(default)]
    pub count: Option<u32>,
    /// A known Key Vault refusal, with Key Vault's own body: `firewall` (403
    /// ForbiddenByFirewall), `rbac` (403 ForbiddenByRbac), `access_policy` (403 AccessDenied),
    /// `wrong_tenant` (401 AKV10032), `soft_deleted` (409 ObjectIsDeletedButRecoverable).
    /// For an identity endpoint: `unassigned` (400 "Identity not found").
    #[serde(default)]
    pub kind: Option<String>,
    /// Apply to this identity endpoint (`imds`, `app_service`, `azure_ml`, `azure_arc`)
    /// instead of the vault.
    #[serde(default)]
    pub identity: Option<String>,
    /// `retry-after-ms` / `x-ms-retry-after-ms` milliseconds, with `status`.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub x_ms_retry_after_ms: Option<u64>,
    /// `Retry-After` as an HTTP-date this many seconds ahead, with `status`.
    #[serde(default)]
    pub retry_after_date_in: Option<u64>,
}

impl Fault {
    /// The status, error code, inner code and message the fault answers with.
    pub(crate) fn answer(&self) -> (u16, &'static str, Option<&'static str>, &'static str) {
        match self.kind.as_deref() {
            Some("firewall") => (
                403,
                "Forbidden",
                Some("ForbiddenByFirewall"),
                "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.1\r\nCaller: appid=emu;oid=emu\r\nVault: kvbroker-emu;location=local",
            ),
            Some("rbac") => (
                403,
                "Forbidden",
                Some("ForbiddenByRbac"),
                "Caller is not authorized to perform action on resource.\r\nAction: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'\r\nAssignment: (not found)",
            ),
            Some("access_policy") => (
                403,
                "Forbidden",
                Some("AccessDenied"),
                "The user, group or application 'appid=emu;oid=emu' does not have secrets get permission on key vault 'kvbroker-emu;location=local'.",
            ),
            Some("wrong_tenant") => (
                401,
                "Unauthorized",
                None,
                "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/11111111-1111-1111-1111-111111111111/, found https://sts.windows.net/22222222-2222-2222-2222-222222222222/.",
            ),
            Some("soft_deleted") => (
                409,
                "Conflict",
                Some("ObjectIsDeletedButRecoverable"),
                "Secret is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged.",
            ),
            Some("unassigned") => (400, "invalid_request", None, "Identity not found"),
            _ => match self.status.unwrap_or(500) {
                429 => (
                    429,
                    "Throttled",
                    None,
                    "Request was not processed because too many requests were received.",
                ),
                410 => (410, "unavailable", None, "IMDS is being updated (injected)"),
                404 => (404, "not_found", None, "IMDS endpoint is starting (injected)"),
                s => {
                    (s, "InternalServerError", None, "The service encountered an internal error (injected).")
                }
            },
        }
    }

    /// The throttling headers the fault asks for.
    pub(crate) fn headers(&self, r: &mut Response<Body>) {
        let h = r.headers_mut();
        if let Some(ra) = self.retry_after {
            h.insert(http::header::RETRY_AFTER, http::HeaderValue::from(ra));
        }
        if let Some(ms) = self.retry_after_ms {
            h.insert("retry-after-ms", http::HeaderValue::from(ms));
        }
        if let Some(ms) = self.x_ms_retry_after_ms {
            h.insert("x-ms-retry-after-ms", http::HeaderValue::from(ms));
        }
        if let Some(secs) = self.retry_after_date_in {
            let at = std::time::SystemTime::now() + Duration::from_secs(secs);
            if let Ok(v) = http::HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
                h.insert(http::header::RETRY_AFTER, v);
            }
        }
    }
}

pub(crate) struct State {
    pub(crate) vault_url: String,
    pub(crate) secrets: Mutex<keyvault::Store>,
    pub(crate) tokens: Mutex<HashSet<String>>,
    pub(crate) counts: Mutex<HashMap<String, u64>>,
    /// Who asked for tokens: (source, client id).
    pub(crate) token_log: Mutex<Vec<(String, Option<String>)>>,
    pub(crate) faults: Mutex<Vec<Fault>>,
    pub(crate) arc_keys: Mutex<HashSet<String>>,
    pub(crate) secrets_cfg: identity::Secrets,
}

impl State {
    pub(crate) fn count(&self, what: &str) {
        *lock(&self.counts).entry(what.to_owned()).or_default() += 1;
    }

    pub(crate) fn issue_token(&self) -> String {
        let t = format!("emu-token-{:032x}", fastrand::u128(..));
        lock(&self.tokens).insert(t.clone());
        t
    }

    /// The vault fault that applies to a request for `secret`, consuming one use of it.
    pub(crate) fn take_fault(&self, secret: Option<&str>) -> Option<Fault> {
        self.take_where(|f| {
            f.identity.is_none()
                && match (&f.secret, secret) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                }
        })
    }

    /// The fault for identity endpoint `source`, consuming one use of it.
    pub(crate) fn take_identity_fault(&self, source: &str) -> Option<Fault> {
        self.take_where(|f| f.identity.as_deref() == Some(source))
    }

    fn take_where(&self, fits: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(fits)?;
        let f = faults[i].clone();
        if let Some(n) = faults[i].count.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        Some(f)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running emulator.
pub struct Emulator {
    pub info: EmulatorInfo,
}

impl Emulator {
    /// Starts both servers on 127.0.0.1 and writes `DIR/ca.pem`, `DIR/emulator.json`, and an
    /// agent config (`DIR/agent.toml`, `DIR/policy.toml`). `secrets` are loaded as each
    /// secret's first version.
    pub async fn start(dir: &Path, secrets: Vec<(String, String)>) -> Result<Emulator, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Absolute, so every path written (and the agent config) works from any directory.
        let dir = &dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        let tls = tls::generate()?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &tls.ca_pem).map_err(|e| format!("{}: {e}", ca_file.display()))?;

        let tls_listener = bind_loopback().await?;
        let http_listener = bind_loopback().await?;
        let tls_port = tls_listener.local_addr().map_err(|e| e.to_string())?.port();
        let http_port = http_listener.local_addr().map_err(|e| e.to_string())?.port();

        let secrets_cfg = identity::Secrets::create(dir)?;
        let vault_url = format!("https://{}:{tls_port}", tls::VAULT_HOST);
        let mut store = keyvault::Store::default();
        for (name, value) in secrets {
            store.set(&name, value, None, keyvault::Attrs::default());
        }
        let state = Arc::new(State {
            vault_url: vault_url.clone(),
            secrets: Mutex::new(store),
            tokens: Mutex::new(HashSet::new()),
            counts: Mutex::new(HashMap::new()),
            token_log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            arc_keys: Mutex::new(HashSet::new()),
            secrets_cfg,
        });

        let http_base = format!("http://127.0.0.1:{http_port}");
        let imds_map = format!("169.254.169.254:80:127.0.0.1:{http_port}");
        let info = EmulatorInfo {
            vault_url,
            connect_to: vec![
                format!("{}:{tls_port}:127.0.0.1:{tls_port}", tls::VAULT_HOST),
                format!("{}:{tls_port}:127.0.0.1:{tls_port}", tls::LOGIN_HOST),
            ],
            ca_file,
            control_url: format!("{http_base}/control"),
            agent_config: dir.join(agent_config::CONFIG),
            identity: identity::info(&state.secrets_cfg, &http_base, tls_port, &imds_map),
        };
        let json = serde_json::to_string(&info).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("emulator.json"), &json).map_err(|e| e.to_string())?;
        agent_config::write(dir, &info)?;

        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
        let s = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = tls_listener.accept().await else { continue };
                let (acceptor, s) = (acceptor.clone(), Arc::clone(&s));
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        serve(TokioIo::new(stream), s, true).await;
                    }
                });
            }
        });
        let s = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = http_listener.accept().await else { continue };
                tokio::spawn(serve(TokioIo::new(tcp), Arc::clone(&s), false));
            }
        });
        Ok(Emulator { info })
    }
}

async fn bind_loopback() -> Result<TcpListener, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    TcpListener::bind(addr).await.map_err(|e| format!("cannot bind 127.0.0.1: {e}"))
}

/// An answer, or `None` to drop the connection.
pub(crate) type Answer = Option<Response<Body>>;

async fn serve<I>(io: I, state: Arc<State>, tls: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let req = Request::from_parts(parts, body);
            let answer = if tls {
                if req.uri().path().contains("/oauth2/") {
                    identity::entra(&state, &req)
                } else {
                    keyvault::handle(&state, &req).await
                }
            } else {
                identity::handle(&state, &req)
            };
            // Dropping: an error makes hyper close the connection without an answer.
            answer.ok_or(DropConnection)
        }
    });
    let _ =
        hyper::server::conn::http1::Builder::new().timer(TokioTimer::new()).serve_connection(io, svc).await;
}

#[derive(Debug)]
struct DropConnection;
impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injection: connection dropped")
    }
}
impl std::error::Error for DropConnection {}

pub(crate) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

pub(crate) fn query(req: &Request<Bytes>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

/// A query or form value: `+` is a space, `%XX` a byte. Lenient like a real server (a bad
/// escape stays as text), since the emulator only checks what it is sent.
pub(crate) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

pub(crate) fn header<'a>(req: &'a Request<Bytes>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn sleep_ms(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}
