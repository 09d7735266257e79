//! The admin socket's server side: status, refresh and reload for root. Shows names,
//! versions, ages and errors — never values.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use kvbroker_proto::{SecretName, SecretQuery};
use serde_json::json;
use tokio::net::UnixStream;

use crate::server::{Handler, Head};
use crate::state::State;

/// The admin socket: root only, served by the same accept loop (header timeout, accept
/// back-off, drain) as the agent socket, with its own small connection budget.
pub(crate) struct AdminSocket {
    pub(crate) state: Arc<State>,
    pub(crate) policy_file: PathBuf,
    pub(crate) started: Instant,
    /// Connections open now (at most [`ADMIN_CONNS`]).
    pub(crate) open: Arc<AtomicUsize>,
}

/// Connections the admin socket holds at once; more are closed at accept, so a flood of
/// them (from root, the only one it serves, or anyone who can reach it) costs few fds.
const ADMIN_CONNS: usize = 16;

/// An admin connection: whether its caller is root (or the agent's own user), and its place
/// in the budget.
pub(crate) struct AdminConn {
    root: bool,
    _slot: AdminSlot,
}

struct AdminSlot(Arc<AtomicUsize>);

impl Drop for AdminSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler for AdminSocket {
    type Conn = AdminConn;
    type Io = UnixStream;

    fn accept(&self, stream: UnixStream) -> Option<(AdminConn, UnixStream)> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= ADMIN_CONNS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("admin socket has no room for another connection: closed");
            return None;
        }
        let slot = AdminSlot(Arc::clone(&self.open));
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let root = uid.is_some_and(|u| u == 0 || u == crate::sys::effective_uid());
        Some((AdminConn { root, _slot: slot }, stream))
    }

    fn span(&self, c: &AdminConn) -> tracing::Span {
        tracing::debug_span!("admin", root = c.root)
    }

    async fn handle<R: Head + Sync>(&self, c: &AdminConn, req: &R) -> Response<Full<Bytes>> {
        if c.root {
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

async fn handle<R: Head>(admin: &AdminSocket, req: &R) -> Response<Full<Bytes>> {
    let (ctx, policy_file, started) = (&admin.state, &admin.policy_file, admin.started);
    let q: std::collections::HashMap<String, String> = req
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    match (req.method().clone(), req.path()) {
        (Method::GET, "/v1/status") => reply(
            StatusCode::OK,
            json!({
                "agent": {"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id(), "uptime_secs": started.elapsed().as_secs()},
                "audit": {"path": ctx.auditor.path().display().to_string(), "healthy": ctx.auditor.healthy()},
                "policy": {"file": policy_file.display().to_string(), "rules": ctx.policy().len()},
                "secrets": ctx.cache.status(),
                "exec_events": {"active": crate::peer::events::global().is_some_and(|e| e.active())},
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
        (Method::GET, "/metrics") => super::scrape::metrics(ctx),
        (Method::POST, "/v1/reload") => {
            let (ok, message) = ctx.reload_policy(policy_file).await;
            reply(
                if ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY },
                json!({"ok": ok, "message": message}),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "GET /v1/status, GET /metrics, POST /v1/refresh, POST /v1/reload"}),
        ),
    }
}
