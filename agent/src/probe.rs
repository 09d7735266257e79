//! One `GET /v1/health` over an agent socket, as a probe: used by the systemd watchdog (a
//! round trip through the agent's own socket proves the runtime, the accept loop and the
//! handler all still work) and by `kvbroker health` (Kubernetes probes, scripts).
//!
//! Health is policy-free and holds nothing secret, so this never sees a value. The answer is
//! read whole (`Connection: close`) and capped at [`MAX_ANSWER`] bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvbroker_proto::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a probe got no HTTP answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ProbeError {
    #[error(
        "{path}: cannot connect: {source} (is the agent running? `systemctl status kvbroker`, or --socket)"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("{path}: no answer within {after:?} (the agent may be overloaded or hung)")]
    Timeout { path: PathBuf, after: Duration },
    #[error("{path}: connection failed mid-request: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: the answer is not HTTP/1.1 (is this a kvbroker agent socket?)")]
    NotHttp { path: PathBuf },
}

/// What the agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The JSON body, when it is a health body.
    pub(crate) health: Option<Health>,
}

impl Answer {
    /// Why the answer is not "ok", for messages: the agent's reasons, or the status.
    pub(crate) fn why_not_ok(&self) -> String {
        match &self.health {
            Some(h) if !h.reasons.is_empty() => format!("{}: {}", h.status, h.reasons.join("; ")),
            Some(h) => format!("{} (HTTP {})", h.status, self.status),
            None => format!("HTTP {}", self.status),
        }
    }
}

/// Largest answer read; a health answer is a few hundred bytes.
const MAX_ANSWER: u64 = 64 * 1024;

/// `GET /v1/health` (with `ready`: `/v1/health?ready`) on `socket`, within `timeout` in all.
pub(crate) async fn health(socket: &Path, ready: bool, timeout: Duration) -> Result<Answer, ProbeError> {
    match tokio::time::timeout(timeout, round_trip(socket, ready)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout { path: socket.to_owned(), after: timeout }),
    }
}

async fn round_trip(socket: &Path, ready: bool) -> Result<Answer, ProbeError> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ProbeError::Connect { path: socket.to_owned(), source })?;
    let target = if ready { "/v1/health?ready" } else { "/v1/health" };
    let request = format!("GET {target} HTTP/1.1\r\nHost: kvbroker\r\nConnection: close\r\n\r\n");
    let io = |source| ProbeError::Io { path: socket.to_owned(), source };
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut bytes = Vec::new();
    (&mut stream).take(MAX_ANSWER).read_to_end(&mut bytes).await.map_err(io)?;
    parse(&bytes).ok_or_else(|| ProbeError::NotHttp { path: socket.to_owned() })
}

/// The status and (if it is one) the health body of an HTTP/1.1 answer.
fn parse(bytes: &[u8]) -> Option<Answer> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let rest = status_line.strip_prefix("HTTP/1.1 ")?;
    let status = rest.get(..3)?.parse::<u16>().ok().filter(|s| (100..600).contains(s))?;
    let health = serde_json::from_slice::<Health>(&bytes[head_end + 4..]).ok();
    Some(Answer { status, health })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ok_and_degraded_answers() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 33\r\n\r\n{\"status\":\"ok\",\"version\":\"0.1.0\"}";
        let a = parse(ok).unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.health.unwrap().status, "ok");
        let bad =
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"status\":\"degraded\",\"reasons\":[\"a\",\"b\"]}";
        let a = parse(bad).unwrap();
        assert_eq!((a.status, a.why_not_ok().as_str()), (503, "degraded: a; b"));
    }

    #[test]
    fn answers_without_a_health_body_keep_their_status() {
        let a = parse(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n\r\n{\"error\":{}}").unwrap();
        assert_eq!((a.status, a.health.is_none(), a.why_not_ok().as_str()), (429, true, "HTTP 429"));
    }

    #[test]
    fn refuses_what_is_not_http() {
        for bytes in
            [&b""[..], b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n"]
        {
            assert!(parse(bytes).is_none(), "{bytes:?}");
        }
    }
}
