//! The admin socket (`[agent] admin_socket`, mode 0600, and the peer's uid must be 0) and
//! `kvbroker ctl`, its client. Status shows names, versions, ages and errors — never values.
//!
//! | request | does |
//! | --- | --- |
//! | `GET /v1/status` | agent, audit, policy and cache state as JSON |
//! | `POST /v1/refresh?vault=A&name=N` | refresh one secret now |
//! | `POST /v1/reload` | reload the policy (as SIGHUP does) |

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kvbroker_proto::{SecretName, SecretQuery};
use serde_json::json;
use tokio::net::UnixListener;

use crate::peer::ConnPeer;
use crate::server::Ctx;

/// Serves the admin socket until the task is aborted.
pub(crate) fn spawn(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    policy_file: PathBuf,
) -> tokio::task::JoinHandle<()> {
    let started = Instant::now();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let root = ConnPeer::of(&stream).is_ok_and(|p| p.uid == 0);
            let (ctx, policy_file) = (Arc::clone(&ctx), policy_file.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                let (ctx, policy_file) = (Arc::clone(&ctx), policy_file.clone());
                async move {
                    let r = if root {
                        handle(&ctx, &policy_file, started, req).await
                    } else {
                        reply(StatusCode::FORBIDDEN, json!({"error": "the admin socket is for root only"}))
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

async fn handle(
    ctx: &Ctx,
    policy_file: &Path,
    started: Instant,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
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
            let (ok, message) = crate::app::reload_policy(ctx, policy_file).await;
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

/// Why `kvbroker ctl` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    #[error("cannot reach the admin socket {path}: {source} (is the agent running, and are you root?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
}

/// One request to the admin socket: (status, JSON body).
pub(crate) async fn call(
    socket: &Path,
    method: Method,
    path: &str,
) -> Result<(u16, serde_json::Value), CtlError> {
    let proto = |message: String| CtlError::Protocol { path: socket.to_owned(), message };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CtlError::Connect { path: socket.to_owned(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "kvbroker-admin")
        .body(Empty::<Bytes>::new())
        .map_err(|e| proto(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| proto(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| proto(e.to_string()))?.to_bytes();
    let json = serde_json::from_slice(&body).map_err(|e| proto(format!("not JSON: {e}")))?;
    if status == 403 {
        return Err(CtlError::Refused(format!(
            "{}: refused: the admin socket is for root only",
            socket.display()
        )));
    }
    Ok((status, json))
}

/// `kvbroker ctl status` as a table.
pub(crate) fn render_status(v: &serde_json::Value) -> String {
    let mut out = format!(
        "agent {} (pid {}, up {}s)  audit {} ({})  policy {} ({} rule(s))\n",
        v["agent"]["version"].as_str().unwrap_or("?"),
        v["agent"]["pid"],
        v["agent"]["uptime_secs"],
        v["audit"]["path"].as_str().unwrap_or("?"),
        if v["audit"]["healthy"].as_bool() == Some(true) { "ok" } else { "NOT WRITABLE" },
        v["policy"]["file"].as_str().unwrap_or("?"),
        v["policy"]["rules"],
    );
    let secrets = v["secrets"].as_array().cloned().unwrap_or_default();
    if secrets.is_empty() {
        out.push_str("no secrets cached\n");
        return out;
    }
    out.push_str(&format!(
        "{:<12} {:<32} {:<32} {:>6} {:>6}  {}\n",
        "VAULT", "NAME", "VERSION", "AGE", "IDLE", "STATE"
    ));
    for s in secrets {
        let state = match (s["stale"].as_bool(), s["last_error"].as_str()) {
            (Some(true), Some(e)) => format!("stale: {e}"),
            (_, Some(e)) => format!("error: {e}"),
            _ => "fresh".to_owned(),
        };
        out.push_str(&format!(
            "{:<12} {:<32} {:<32} {:>5}s {:>5}s  {}\n",
            s["vault"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("?"),
            s["version"].as_str().unwrap_or("-"),
            s["age_secs"],
            s["idle_secs"],
            state
        ));
    }
    out
}
