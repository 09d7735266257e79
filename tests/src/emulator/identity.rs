//! Token endpoints (IMDS, App Service, Azure ML, Arc; Entra's client-assertion exchange on
//! the TLS side) and the control API.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::keyvault::{Attrs, RESOURCE};
use super::{Answer, Body, Fault, IdentityInfo, State, header, json, lock, query};

/// The per-run secrets of the identity endpoints.
pub(crate) struct Secrets {
    app_service_header: String,
    msi_secret: String,
    /// The Azure ML compute's own (system-assigned) client id.
    azure_ml_client_id: String,
    /// A user-assigned identity every endpoint also knows.
    user_assigned_client_id: String,
    arc_dir: PathBuf,
    federated_token_file: PathBuf,
    federated_token: String,
    workload_client_id: String,
    tenant: String,
}

fn rand_hex() -> String {
    format!("{:032x}", fastrand::u128(..))
}

fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Secrets {
    pub(crate) fn create(dir: &Path) -> Result<Self, String> {
        let arc_dir = dir.join("arc-tokens");
        std::fs::create_dir_all(&arc_dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&arc_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        let federated_token_file = dir.join("federated-token");
        let federated_token = format!("eyJ.emu-federated.{}", rand_hex());
        std::fs::write(&federated_token_file, &federated_token).map_err(|e| e.to_string())?;
        Ok(Self {
            app_service_header: rand_hex(),
            msi_secret: rand_hex(),
            azure_ml_client_id: guid(),
            user_assigned_client_id: guid(),
            arc_dir,
            federated_token_file,
            federated_token,
            workload_client_id: guid(),
            tenant: guid(),
        })
    }
}

pub(crate) fn info(
    s: &Secrets,
    http_base: &str,
    tls_port: u16,
    imds_map: &str,
) -> HashMap<String, IdentityInfo> {
    let env = |pairs: &[(&str, String)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let ua = Some(s.user_assigned_client_id.clone());
    HashMap::from([
        (
            "imds".to_owned(),
            IdentityInfo {
                connect_to: vec![imds_map.to_owned()],
                user_assigned_client_id: ua.clone(),
                ..Default::default()
            },
        ),
        (
            "app-service".to_owned(),
            IdentityInfo {
                env: env(&[
                    ("IDENTITY_ENDPOINT", format!("{http_base}/msi/token")),
                    ("IDENTITY_HEADER", s.app_service_header.clone()),
                ]),
                user_assigned_client_id: ua.clone(),
                ..Default::default()
            },
        ),
        (
            "azure-ml".to_owned(),
            IdentityInfo {
                env: env(&[
                    ("MSI_ENDPOINT", format!("{http_base}/azureml/token")),
                    ("MSI_SECRET", s.msi_secret.clone()),
                    ("DEFAULT_IDENTITY_CLIENT_ID", s.azure_ml_client_id.clone()),
                ]),
                user_assigned_client_id: ua.clone(),
                ..Default::default()
            },
        ),
        (
            "azure-arc".to_owned(),
            IdentityInfo {
                env: env(&[
                    ("IDENTITY_ENDPOINT", format!("{http_base}/arc/token")),
                    ("IMDS_ENDPOINT", http_base.to_owned()),
                ]),
                token_dir: Some(s.arc_dir.clone()),
                ..Default::default()
            },
        ),
        (
            "workload-identity".to_owned(),
            IdentityInfo {
                env: env(&[
                    ("AZURE_FEDERATED_TOKEN_FILE", s.federated_token_file.display().to_string()),
                    ("AZURE_CLIENT_ID", s.workload_client_id.clone()),
                    ("AZURE_TENANT_ID", s.tenant.clone()),
                    ("AZURE_AUTHORITY_HOST", format!("https://{}:{tls_port}", super::tls::LOGIN_HOST)),
                ]),
                ..Default::default()
            },
        ),
    ])
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    json(status, &json!({"error": "invalid_request", "error_description": why}))
}

/// Issues a token for `resource`, recording who asked. `numeric_expiry`: Azure ML's form.
fn token(
    state: &State,
    source: &str,
    resource: Option<&String>,
    client_id: Option<&str>,
    numeric_expiry: bool,
) -> Response<Body> {
    let Some(resource) = resource else { return refuse(StatusCode::BAD_REQUEST, "resource is required") };
    state.count(&format!("token_{source}"));
    lock(&state.token_log).push((source.to_owned(), client_id.map(str::to_owned)));
    let t = if resource.trim_end_matches('/') == RESOURCE {
        state.issue_token()
    } else {
        format!("other-{:x}", fastrand::u64(..))
    };
    let expires_on = now() + 3600;
    let expires_on = if numeric_expiry { json!(expires_on) } else { json!(expires_on.to_string()) };
    json(
        StatusCode::OK,
        &json!({
            "access_token": t,
            "expires_in": "3600",
            "expires_on": expires_on,
            "not_before": now().to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id.unwrap_or_default(),
        }),
    )
}

pub(crate) fn handle(state: &State, req: &Request<Bytes>) -> Answer {
    let q = query(req);
    let s = &state.secrets_cfg;
    let known = |id: &str| id == s.user_assigned_client_id;
    let path = req.uri().path();
    let source = match path {
        "/metadata/identity/oauth2/token" => Some("imds"),
        "/msi/token" => Some("app_service"),
        "/azureml/token" => Some("azure_ml"),
        "/arc/token" => Some("azure_arc"),
        _ => None,
    };
    if let Some(f) = source.and_then(|src| state.take_identity_fault(src)) {
        if f.drop {
            state.count("identity_fault_drop");
            return None;
        }
        let (status, code, _, msg) = f.answer();
        state.count(&format!("identity_fault_{status}"));
        let mut r = json(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &json!({"error": code, "error_description": msg}),
        );
        f.headers(&mut r);
        return Some(r);
    }
    Some(match path {
        "/metadata/identity/oauth2/token" => {
            if header(req, "metadata") != Some("true") {
                return Some(refuse(StatusCode::BAD_REQUEST, "Required metadata header not specified"));
            }
            let id = q.get("client_id").map(String::as_str);
            if id.is_some_and(|i| !known(i)) {
                return Some(refuse(StatusCode::BAD_REQUEST, "Identity not found"));
            }
            token(state, "imds", q.get("resource"), id, false)
        }
        "/msi/token" => {
            if header(req, "x-identity-header") != Some(s.app_service_header.as_str()) {
                return Some(refuse(StatusCode::UNAUTHORIZED, "X-IDENTITY-HEADER missing or wrong"));
            }
            let id = q.get("client_id").map(String::as_str);
            if id.is_some_and(|i| !known(i)) {
                return Some(refuse(StatusCode::BAD_REQUEST, "Identity not found"));
            }
            token(state, "app_service", q.get("resource"), id, false)
        }
        "/azureml/token" => {
            if header(req, "secret") != Some(s.msi_secret.as_str()) {
                return Some(refuse(StatusCode::UNAUTHORIZED, "secret header missing or wrong"));
            }
            // Azure ML needs clientid even for the compute's own identity.
            let Some(id) = q.get("clientid") else {
                return Some(refuse(StatusCode::BAD_REQUEST, "clientid is required"));
            };
            if *id != s.azure_ml_client_id && !known(id) {
                return Some(refuse(StatusCode::BAD_REQUEST, "Identity not found"));
            }
            token(state, "azure_ml", q.get("resource"), Some(id), true)
        }
        "/arc/token" => {
            if header(req, "metadata") != Some("true") {
                return Some(refuse(StatusCode::BAD_REQUEST, "Required metadata header not specified"));
            }
            match header(req, "authorization").and_then(|a| a.strip_prefix("Basic ")) {
                Some(key) if lock(&state.arc_keys).remove(key) => {
                    token(state, "azure_arc", q.get("resource"), None, false)
                }
                Some(_) => refuse(StatusCode::UNAUTHORIZED, "challenge key does not match"),
                None => {
                    let key = rand_hex();
                    let file = s.arc_dir.join(format!("{}.key", rand_hex()));
                    if std::fs::write(&file, &key).is_err() {
                        return Some(refuse(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "cannot write challenge file",
                        ));
                    }
                    lock(&state.arc_keys).insert(key);
                    let mut r = refuse(StatusCode::UNAUTHORIZED, "challenge");
                    if let Ok(v) = http::HeaderValue::from_str(&format!("Basic realm={}", file.display())) {
                        r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
                    }
                    r
                }
            }
        }
        p if p.starts_with("/control") => control(state, req, &p["/control".len()..]),
        _ => refuse(StatusCode::NOT_FOUND, "no such endpoint in the emulator"),
    })
}

/// Entra ID's token endpoint, for workload identity's client-assertion exchange.
pub(crate) fn entra(state: &State, req: &Request<Bytes>) -> Answer {
    let s = &state.secrets_cfg;
    if req.method() != Method::POST || req.uri().path() != format!("/{}/oauth2/v2.0/token", s.tenant) {
        return Some(refuse(StatusCode::NOT_FOUND, "unknown tenant or endpoint"));
    }
    let form: HashMap<String, String> = String::from_utf8_lossy(req.body())
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), super::percent_decode(v)))
        .collect();
    if form.get("client_assertion") != Some(&s.federated_token)
        || form.get("client_id") != Some(&s.workload_client_id)
    {
        return Some(refuse(StatusCode::UNAUTHORIZED, "AADSTS700211: assertion or client id does not match"));
    }
    let scope = form.get("scope").map(|sc| sc.trim_end_matches("/.default").to_owned());
    state.count("token_workload_identity");
    lock(&state.token_log).push(("workload_identity".into(), form.get("client_id").cloned()));
    let t = if scope.as_deref() == Some(RESOURCE) {
        state.issue_token()
    } else {
        format!("other-{:x}", fastrand::u64(..))
    };
    Some(json(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": t}),
    ))
}

#[derive(serde::Deserialize)]
struct SetSecret {
    name: String,
    value: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    tags: Option<serde_json::Value>,
    #[serde(flatten)]
    attrs: Attrs,
}

fn control(state: &State, req: &Request<Bytes>, path: &str) -> Response<Body> {
    match (req.method().clone(), path) {
        (Method::GET, "/counts") => json(StatusCode::OK, &*lock(&state.counts)),
        (Method::POST, "/counts/reset") => {
            lock(&state.counts).clear();
            json(StatusCode::OK, &json!({}))
        }
        (Method::GET, "/tokens") => {
            let log: Vec<_> =
                lock(&state.token_log).iter().map(|(s, c)| json!({"source": s, "client_id": c})).collect();
            json(StatusCode::OK, &log)
        }
        (Method::POST, "/faults") => match serde_json::from_slice::<Fault>(req.body()) {
            Ok(f) => {
                lock(&state.faults).push(f);
                json(StatusCode::OK, &json!({}))
            }
            Err(e) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::DELETE, "/faults") => {
            lock(&state.faults).clear();
            json(StatusCode::OK, &json!({}))
        }
        (Method::POST, "/secrets") => match serde_json::from_slice::<SetSecret>(req.body()) {
            Ok(b) => {
                let tags = b.tags.unwrap_or_else(|| json!({}));
                let id = lock(&state.secrets).set_tagged(&b.name, b.value, b.content_type, b.attrs, tags);
                json(StatusCode::OK, &json!({ "version": id }))
            }
            Err(e) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        (Method::GET, p) if p.starts_with("/secrets/") => {
            match lock(&state.secrets).metadata(&state.vault_url, &p["/secrets/".len()..]) {
                Some(m) => json(StatusCode::OK, &m),
                None => refuse(StatusCode::NOT_FOUND, "no such secret"),
            }
        }
        (Method::DELETE, p) if p.starts_with("/secrets/") => {
            if lock(&state.secrets).soft_delete(&p["/secrets/".len()..]) {
                json(StatusCode::OK, &json!({}))
            } else {
                refuse(StatusCode::NOT_FOUND, "no such secret")
            }
        }
        (Method::PATCH, p) if p.starts_with("/secrets/") => match serde_json::from_slice::<Attrs>(req.body())
        {
            Ok(a) => {
                let name = &p["/secrets/".len()..];
                if lock(&state.secrets).update(name, None, &a, None) {
                    json(StatusCode::OK, &json!({}))
                } else {
                    refuse(StatusCode::NOT_FOUND, "no such secret")
                }
            }
            Err(e) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        _ => refuse(
            StatusCode::NOT_FOUND,
            "control: GET counts, POST counts/reset, GET tokens, POST/DELETE faults, POST secrets, PATCH secrets/NAME",
        ),
    }
}
