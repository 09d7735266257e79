//! `kvbroker ctl`'s side of the admin socket: one request, its JSON answer.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Why `kvbroker ctl` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    #[error("cannot reach the admin socket {path}: {source} (is the agent running, and are you root?)")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("{path}: refused: the admin socket is for root only (run kvbroker ctl as root)")]
    RootOnly { path: PathBuf },
    #[error("{action} failed: {message}")]
    Refused { action: String, message: String },
    #[error(
        "{path} answered as the agent socket (HTTP {status} {code}), not the admin socket: give \
         --socket the [agent] admin_socket path (default /run/kvbroker/admin.sock)"
    )]
    NotAdmin { path: PathBuf, status: u16, code: String },
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
    let json: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| proto(format!("not JSON: {e}")))?;
    // The agent socket's errors are `{"error":{"code":…}}`; the admin socket's never are.
    if let Some(code) = json["error"]["code"].as_str() {
        // Whatever answered chose the code: escaped before it reaches a terminal.
        let code = crate::terminal::escape(code);
        return Err(CtlError::NotAdmin { path: socket.to_owned(), status, code });
    }
    if status == 403 {
        return Err(CtlError::RootOnly { path: socket.to_owned() });
    }
    Ok((status, json))
}
