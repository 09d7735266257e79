//! `GET /metrics`: the answer, for the admin socket and for the optional TCP listener
//! (`[metrics] listen`), which serves nothing else.
//!
//! The TCP listener is loopback-only unless the operator said `allow_remote = true` (checked
//! at config load). Anyone who can reach it can read the metrics, which is why they never
//! hold a value, a token or a caller-chosen string. It holds at most [`MAX_CONNS`]
//! connections, each closed after one answer or when its request head is not complete
//! within [`HEADER_TIMEOUT`], so a flood of idle connections costs a few fds and nothing else.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::state::State;

/// Connections the TCP listener holds at once; more are closed at accept.
const MAX_CONNS: usize = 16;
/// A scraper that has not sent its whole request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The metrics text as an HTTP answer.
pub(crate) fn metrics(state: &State) -> Response<Full<Bytes>> {
    let text = crate::metrics::get().render(state.metrics_snapshot());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    let hs = r.headers_mut();
    hs.insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn answer<B>(state: &State, req: &Request<B>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(state),
        (_, "/metrics") => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        _ => plain(StatusCode::NOT_FOUND, "this listener serves only GET /metrics\n"),
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub(crate) async fn serve_tcp(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&room).try_acquire_owned() else {
            tracing::debug!("metrics listener has no room for another connection: closed");
            continue;
        };
        let state = Arc::clone(&state);
        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
            let r = answer(&state, &req);
            async move { Ok::<_, Infallible>(r) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            // Bounded even if the scraper never reads the answer.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}
