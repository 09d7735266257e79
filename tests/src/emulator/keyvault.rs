//! The Key Vault secrets REST subset: get (latest, by version), set, list versions (paged
//! with `nextLink`), update attributes, delete — behind the bearer challenge, with Key
//! Vault's error bodies.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Answer, Body, State, json, lock, query, sleep_ms};

pub(crate) const RESOURCE: &str = "https://vault.azure.net";

/// The secrets api-versions the emulator accepts; anything else is a 400, as on Azure.
const API_VERSIONS: [&str; 4] = ["7.4", "7.5", "7.6", "2025-07-01"];

#[derive(Default)]
pub(crate) struct Store {
    /// Keyed by lowercase name.
    secrets: HashMap<String, Entry>,
    /// Soft-deleted names (lowercase): a PUT answers 409 ObjectIsDeletedButRecoverable.
    deleted: std::collections::HashSet<String>,
}

struct Entry {
    name: String,
    /// Oldest first; the last is current.
    versions: Vec<Version>,
}

#[derive(Clone)]
struct Version {
    id: String,
    value: String,
    content_type: Option<String>,
    tags: serde_json::Value,
    attrs: Attrs,
    created: i64,
    updated: i64,
}

/// Settable attributes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Attrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exp: Option<i64>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

impl Store {
    /// Adds a new current version; returns its id.
    pub(crate) fn set(
        &mut self,
        name: &str,
        value: String,
        content_type: Option<String>,
        attrs: Attrs,
    ) -> String {
        self.set_tagged(name, value, content_type, attrs, json!({}))
    }

    /// `set`, with tags.
    pub(crate) fn set_tagged(
        &mut self,
        name: &str,
        value: String,
        content_type: Option<String>,
        attrs: Attrs,
        tags: serde_json::Value,
    ) -> String {
        let id = format!("{:032x}", fastrand::u128(..));
        let t = now();
        let entry = self
            .secrets
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Entry { name: name.to_owned(), versions: Vec::new() });
        entry.versions.push(Version {
            id: id.clone(),
            value,
            content_type,
            tags,
            attrs,
            created: t,
            updated: t,
        });
        id
    }

    /// Updates a version's attributes (the current one if `version` is None).
    pub(crate) fn update(
        &mut self,
        name: &str,
        version: Option<&str>,
        attrs: &Attrs,
        ct: Option<String>,
    ) -> bool {
        let Some(e) = self.secrets.get_mut(&name.to_ascii_lowercase()) else { return false };
        let v = match version {
            Some(id) => e.versions.iter_mut().find(|v| v.id.eq_ignore_ascii_case(id)),
            None => e.versions.last_mut(),
        };
        let Some(v) = v else { return false };
        if attrs.enabled.is_some() {
            v.attrs.enabled = attrs.enabled;
        }
        if attrs.nbf.is_some() {
            v.attrs.nbf = attrs.nbf;
        }
        if attrs.exp.is_some() {
            v.attrs.exp = attrs.exp;
        }
        if ct.is_some() {
            v.content_type = ct;
        }
        v.updated = now();
        true
    }

    /// Soft-deletes a secret: gone for GET, its name refused for PUT.
    pub(crate) fn soft_delete(&mut self, name: &str) -> bool {
        let key = name.to_ascii_lowercase();
        let found = self.secrets.remove(&key).is_some();
        if found {
            self.deleted.insert(key);
        }
        found
    }

    /// A version's metadata, never its value (for the control API).
    pub(crate) fn metadata(&self, base: &str, name: &str) -> Option<serde_json::Value> {
        let (e, v) = self.find(name, None)?;
        Some(bundle(base, e, v, false))
    }

    fn find(&self, name: &str, version: Option<&str>) -> Option<(&Entry, &Version)> {
        let e = self.secrets.get(&name.to_ascii_lowercase())?;
        let v = match version {
            Some(id) => e.versions.iter().find(|v| v.id.eq_ignore_ascii_case(id))?,
            None => e.versions.last()?,
        };
        Some((e, v))
    }
}

fn bundle(base: &str, e: &Entry, v: &Version, with_value: bool) -> serde_json::Value {
    let mut attrs = json!({
        "enabled": v.attrs.enabled.unwrap_or(true),
        "created": v.created,
        "updated": v.updated,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    });
    if let Some(n) = v.attrs.nbf {
        attrs["nbf"] = json!(n);
    }
    if let Some(x) = v.attrs.exp {
        attrs["exp"] = json!(x);
    }
    let mut b = json!({
        "id": format!("{base}/secrets/{}/{}", e.name, v.id),
        "attributes": attrs,
        "tags": v.tags,
    });
    if with_value {
        b["value"] = json!(v.value);
    }
    if let Some(ct) = &v.content_type {
        b["contentType"] = json!(ct);
    }
    b
}

pub(crate) fn kv_error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Response<Body> {
    let mut err = json!({"code": code, "message": message});
    if let Some(i) = inner {
        err["innererror"] = json!({"code": i});
    }
    json(status, &json!({ "error": err }))
}

fn challenge() -> Response<Body> {
    let mut r = kv_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "AKV10000: Request is missing a Bearer or PoP token.",
        None,
    );
    let v = format!(
        "Bearer authorization=\"https://{}/72f988bf-86f1-41af-91ab-2d7cd011db47\", resource=\"{RESOURCE}\"",
        super::tls::LOGIN_HOST
    );
    if let Ok(v) = http::HeaderValue::from_str(&v) {
        r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    r
}

#[derive(Deserialize)]
struct SetBody {
    value: String,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    #[serde(default)]
    attributes: Attrs,
    #[serde(default)]
    tags: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct UpdateBody {
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    #[serde(default)]
    attributes: Attrs,
}

pub(crate) async fn handle(state: &State, req: &Request<Bytes>) -> Answer {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let secret = match parts.as_slice() {
        ["secrets", name, ..] => Some((*name).to_owned()),
        _ => None,
    };
    state.count("vault_requests");
    let token =
        super::header(req, "authorization").and_then(|h| h.strip_prefix("Bearer ")).map(str::to_owned);
    let authorized = token.is_some_and(|t| lock(&state.tokens).contains(&t));
    if !authorized {
        state.count("challenge");
        return Some(challenge());
    }
    if let Some(f) = state.take_fault(secret.as_deref()) {
        if let Some(ms) = f.latency_ms {
            sleep_ms(ms).await;
        }
        if f.drop {
            state.count("fault_drop");
            return None;
        }
        if f.status.is_some() || f.kind.is_some() {
            let (status, code, inner, msg) = f.answer();
            state.count(&format!("fault_{status}"));
            let st = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = kv_error(st, code, msg, inner);
            f.headers(&mut r);
            return Some(r);
        }
    }
    match query(req).get("api-version").map(String::as_str) {
        None => {
            return Some(kv_error(StatusCode::BAD_REQUEST, "BadParameter", "api-version is required", None));
        }
        // Strict, as Key Vault is: the versions kvbroker and its SDK may send (FACTS.md: 7.4+).
        Some(v) if !API_VERSIONS.contains(&v) => {
            return Some(kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "The specified version ({v}) is not recognized. Consider using the latest supported version (2025-07-01)."
                ),
                None,
            ));
        }
        Some(_) => {}
    }
    let base = &state.vault_url;
    let not_found = |name: &str| {
        kv_error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
            None,
        )
    };
    let method = req.method().clone();
    Some(match (method, parts.as_slice()) {
        (Method::GET, ["secrets", name, "versions"]) => {
            state.count("list_versions");
            list_versions(state, req, name)
        }
        (Method::GET, ["secrets", name]) | (Method::GET, ["secrets", name, ""]) => {
            state.count("get");
            state.count(&format!("get:{}", name.to_ascii_lowercase()));
            get(state, name, None).unwrap_or_else(|| not_found(name))
        }
        (Method::GET, ["secrets", name, version]) => {
            state.count("get");
            state.count(&format!("get:{}", name.to_ascii_lowercase()));
            get(state, name, Some(version)).unwrap_or_else(|| not_found(name))
        }
        (Method::PUT, ["secrets", name]) => {
            state.count("set");
            let Ok(b) = serde_json::from_slice::<SetBody>(req.body()) else {
                return Some(kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    "body must be {\"value\": …}",
                    None,
                ));
            };
            let mut store = lock(&state.secrets);
            if store.deleted.contains(&name.to_ascii_lowercase()) {
                return Some(kv_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged."
                    ),
                    Some("ObjectIsDeletedButRecoverable"),
                ));
            }
            let id = store.set_tagged(
                name,
                b.value,
                b.content_type,
                b.attributes,
                b.tags.unwrap_or_else(|| json!({})),
            );
            match store.find(name, Some(&id)) {
                Some((e, v)) => json(StatusCode::OK, &bundle(base, e, v, true)),
                None => not_found(name),
            }
        }
        (Method::PATCH, ["secrets", name, rest @ ..]) => {
            state.count("update");
            let Ok(b) = serde_json::from_slice::<UpdateBody>(req.body()) else {
                return Some(kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    "body must be {\"attributes\": …}",
                    None,
                ));
            };
            let version = rest.first().copied().filter(|v| !v.is_empty());
            let mut store = lock(&state.secrets);
            if !store.update(name, version, &b.attributes, b.content_type) {
                return Some(not_found(name));
            }
            match store.find(name, version) {
                Some((e, v)) => json(StatusCode::OK, &bundle(base, e, v, false)),
                None => not_found(name),
            }
        }
        (Method::DELETE, ["secrets", name]) => {
            state.count("delete");
            let mut store = lock(&state.secrets);
            match store.secrets.remove(&name.to_ascii_lowercase()) {
                Some(e) => {
                    let Some(v) = e.versions.last() else { return Some(not_found(name)) };
                    let mut b = bundle(base, &e, v, false);
                    b["recoveryId"] = json!(format!("{base}/deletedsecrets/{}", e.name));
                    b["deletedDate"] = json!(now());
                    b["scheduledPurgeDate"] = json!(now() + 90 * 86400);
                    json(StatusCode::OK, &b)
                }
                None => not_found(name),
            }
        }
        _ => kv_error(StatusCode::NOT_FOUND, "NotFound", "no such operation in the emulator", None),
    })
}

fn get(state: &State, name: &str, version: Option<&str>) -> Option<Response<Body>> {
    let store = lock(&state.secrets);
    let (e, v) = store.find(name, version)?;
    if v.attrs.enabled == Some(false) {
        return Some(kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        ));
    }
    Some(json(StatusCode::OK, &bundle(&state.vault_url, e, v, true)))
}

fn list_versions(state: &State, req: &Request<Bytes>, name: &str) -> Response<Body> {
    let q = query(req);
    let page: usize = q.get("maxresults").and_then(|m| m.parse().ok()).unwrap_or(25).clamp(1, 25);
    let skip: usize = q.get("$skiptoken").and_then(|s| s.parse().ok()).unwrap_or(0);
    let store = lock(&state.secrets);
    let Some(e) = store.secrets.get(&name.to_ascii_lowercase()) else {
        return kv_error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
            None,
        );
    };
    let base = &state.vault_url;
    let items: Vec<serde_json::Value> =
        e.versions.iter().skip(skip).take(page).map(|v| bundle(base, e, v, false)).collect();
    let next = (skip + page < e.versions.len()).then(|| {
        format!(
            "{base}/secrets/{}/versions?api-version={}&$skiptoken={}&maxresults={page}",
            e.name,
            q.get("api-version").map_or("7.6", String::as_str),
            skip + page
        )
    });
    json(StatusCode::OK, &json!({ "value": items, "nextLink": next }))
}
