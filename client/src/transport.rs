//! HTTP/1.1 over the agent's Unix socket, with a small pool of kept-alive connections.
//! Bodies are collected into buffers that are wiped when dropped.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use zeroize::Zeroizing;

use crate::Error;
use crate::error::{Group, Remedy};

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;
/// The largest answer accepted (Key Vault values are at most 25 KB).
const MAX_BODY: usize = 1 << 20;

pub(crate) struct Transport {
    socket: PathBuf,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Zeroizing<Vec<u8>>,
}

impl Transport {
    pub(crate) fn new(socket: PathBuf) -> Self {
        Self { socket, idle: Mutex::new(Vec::new()) }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) async fn get(&self, path_and_query: &str, accept: &str) -> Result<Answer, Error> {
        let req = Request::get(path_and_query)
            .header(http::header::HOST, "kvbroker")
            .header(http::header::ACCEPT, accept)
            .body(Empty::new())
            .map_err(|e| Error::Protocol(format!("cannot build request: {e}")))?;
        let mut sender = self.sender().await?;
        let resp = sender.send_request(req).await.map_err(|e| Error::Protocol(e.to_string()))?;
        let (parts, mut body) = resp.into_parts();
        let hint = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_BODY);
        // Reserved up front so the buffer never reallocates (which would leave an unwiped copy).
        let mut buf = Zeroizing::new(Vec::with_capacity(hint));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_BODY {
                    return Err(Error::Protocol("answer larger than 1 MiB".into()));
                }
                if buf.capacity() < buf.len() + data.len() {
                    let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + data.len()) * 2));
                    bigger.extend_from_slice(&buf);
                    buf = bigger;
                }
                buf.extend_from_slice(&data);
            }
        }
        self.give_back(sender);
        Ok(Answer { status: parts.status, headers: parts.headers, body: buf })
    }

    async fn sender(&self) -> Result<SendRequest<Empty<Bytes>>, Error> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            match pooled {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Some(_) => continue,
                None => break,
            }
        }
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied
                && let Some(e) = no_access(&self.socket)
            {
                return e;
            }
            Error::Unreachable { path: self.socket.clone(), source }
        })?;
        let (sender, conn) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| Error::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn give_back(&self, sender: SendRequest<Empty<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

/// Which file refused a connect with `EACCES`: the socket itself if this user can stat it
/// (write permission on it is missing), else the nearest directory above it that it can
/// stat (search permission below it is missing). `None` if nothing on the path can be read.
fn no_access(socket: &Path) -> Option<Error> {
    use std::os::unix::fs::MetadataExt;
    socket.ancestors().find_map(|p| {
        let m = std::fs::metadata(p).ok()?;
        let mode = m.mode() & 0o7777;
        // Connecting needs write on the socket; reaching it needs search on each directory.
        let group_bit = if m.is_dir() { 0o010 } else { 0o020 };
        let remedy = if mode & group_bit != 0 { Remedy::JoinGroup } else { Remedy::AskOperator };
        Some(Error::NoAccess { path: p.to_owned(), mode, group: Group::lookup(m.gid()), remedy })
    })
}
