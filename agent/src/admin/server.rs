//! The admin socket's server side: status, refresh and reload for root. Shows names,
//! versions, ages and errors — never values.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use kvbroker_proto::{SecretName, SecretQuery};
use serde_json::json;
use tokio::net::UnixStream;

use crate::server::Handler;
use crate::state::State;

/// The admin socket: root only, served by the same accept loop (header timeout, accept
/// back-off, drain) as the agent socket.
pub(crate) struct AdminSocket {
    pub(crate) state: Arc<State>,
    pub(crate) policy_file: PathBuf,
    pub(crate) started: Instant,
}

impl Handler for AdminSocket {
    /// Whether the caller is root (or the agent's own user).
    type Conn = bool;
    type Io = UnixStream;

    fn accept(&self, stream: UnixStream) -> Option<(bool, UnixStream)> {
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let allowed = uid.is_some_and(|u| u == 0 || u == crate::sys::effective_uid());
        Some((allowed, stream))
    }

    fn span(&self, root: &bool) -> tracing::Span {
        tracing::debug_span!("admin", root = *root)
    }

    async fn handle(&self, root: &bool, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if *root {
            handle(self, req).await
        } else {
            reply(StatusCode::FORBIDDEN, json!({"error": "the admin socket is for root only"}))
        }
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

async fn handle(admin: &AdminSocket, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (ctx, policy_file, started) = (&admin.state, &admin.policy_file, admin.started);
    let q: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/status") => reply(
            StatusCode::OK,
            json!({
                "agent": {"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id(), "uptime_secs": started.elapsed().as_secs()},
                "audit": {"path": ctx.auditor.path().display().to_string(), "healthy": ctx.auditor.healthy()},
                "policy": {"file": policy_file.display().to_string(), "rules": ctx.policy().len()},
                "secrets": ctx.cache.status(),
            }),
        ),
        (Method::POST, "/v1/refresh") => {
            let name: Option<SecretName> = q.get("name").and_then(|n| n.parse().ok());
            let Some(name) = name else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "name=NAME (a valid secret name) is required"}),
                );
            };
            let asked = q
                .get("vault")
                .and_then(|v| SecretQuery::parse(&format!("vault={v}")).ok())
                .and_then(|q| q.vault);
            let Some(vault) = ctx.cache.vaults().resolve(asked.as_ref()).cloned() else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "unknown vault"}));
            };
            match ctx.cache.refresh_now(&vault, &name).await {
                Ok(v) => reply(
                    StatusCode::OK,
                    json!({"vault": vault.as_str(), "name": name.as_str(), "version": v.as_str()}),
                ),
                Err(e) => reply(StatusCode::BAD_GATEWAY, json!({"error": e.to_string()})),
            }
        }
        (Method::POST, "/v1/reload") => {
            let (ok, message) = ctx.reload_policy(policy_file).await;
            reply(
                if ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY },
                json!({"ok": ok, "message": message}),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "GET /v1/status, POST /v1/refresh, POST /v1/reload"}),
        ),
    }
}
