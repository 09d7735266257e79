//! The agent socket's own path for the request it serves most: a plain `GET
//! /v1/secrets/NAME` on a kept-alive connection. Its head is parsed where it lies in the
//! connection's buffer (`httparse`, the parser hyper uses) and the answer goes out in one
//! vectored write — no header map, no per-request timer, no buffers of hyper's (issue 19:
//! they were a fifth of a cached read's allocations and a tenth of its CPU).
//!
//! A head the parser refuses outright (not a partial one) is answered here, `400
//! InvalidRequest` with a request id as SPEC asks of every answer, and the connection is
//! closed — hyper, which uses the same parser with the same settings, would have refused it
//! too, but with a bare 400.
//!
//! Anything else is hyper's, for the rest of the connection's life: a head that is not whole
//! in what one read returned, another method, path or HTTP version, a body
//! (`Content-Length`, `Transfer-Encoding`), `Expect`, `Upgrade`, `TE`, any `Connection` but
//! `keep-alive`, a long poll (`wait=`: hyper reads on while it waits, and drops the request
//! of a client that hangs up). The connection is then handed to hyper ([`Handover::Hyper`]) with the bytes
//! read so far in front of it ([`Rewind`]), so every edge of HTTP/1.1 — 400s for bad heads,
//! 431 for huge ones, the header-read timeout, bodies, pipelining — stays hyper's, unchanged.
//!
//! Both paths decide a request the same way (`routes::handle`), when its whole head has been
//! read: the sender labels of every byte read so far are what it is decided on.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::response::Body;
use crate::state::limits::Activity;

/// Headers counted per request head; more and it is hyper's.
const MAX_HEADERS: usize = 24;

/// What one read takes, as hyper's first read of a connection does (its initial buffer): a
/// head that is not whole in it goes to hyper with these bytes, which then sees the same
/// reads it would have made itself. (A smaller buffer changed answers: hyper stays silent on
/// a malformed head that reaches it in two reads, so heads of 1-8 KiB with bare CRs, which
/// it answers 400 in one read, went unanswered until the header timeout.)
const READ_BUF: usize = 8192;

/// A kept-alive connection with no request for this long (at least; at most twice it) is
/// closed, as hyper's header timer closed an idle one after 10 s: idle connections do not
/// pile up across uids (the per-uid cap evicts only within a uid).
const IDLE: std::time::Duration = super::HEADER_TIMEOUT;

/// How a connection left the plain path.
pub(super) enum Handover {
    /// Closed (by the client, by an error, or by the agent: shutdown, eviction, a
    /// `Connection: close` answer). Nothing more to do.
    Closed,
    /// A request the plain path does not serve: hyper serves the connection from here, these
    /// bytes first.
    Hyper(Vec<u8>),
}

/// What a plain request asks for, borrowed from the connection's buffer.
#[derive(Debug, PartialEq, Eq)]
struct Plain<'a> {
    /// Bytes of the head, blank line included.
    len: usize,
    /// The request target (`/v1/secrets/NAME?…`).
    target: &'a str,
    /// An `Accept` asks for the raw value, as `Head::wants_raw` reads hyper's request.
    raw: bool,
}

/// Why a head is not plain (tests say which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotPlain {
    Partial,
    /// Refused by the parser, whatever bytes follow (hyper's parser, same settings).
    Malformed(httparse::Error),
    Other,
}

/// Reads `buf`'s head, if it is a whole plain GET of a path under `prefix`.
fn parse<'a>(buf: &'a [u8], prefix: &str) -> Result<Plain<'a>, NotPlain> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(NotPlain::Partial),
        // More headers than counted here: hyper counts up to 100.
        Err(httparse::Error::TooManyHeaders) => return Err(NotPlain::Other),
        Err(e) => return Err(NotPlain::Malformed(e)),
    };
    let (Some("GET"), Some(1), Some(target)) = (req.method, req.version, req.path) else {
        return Err(NotPlain::Other);
    };
    if !target.starts_with(prefix) {
        return Err(NotPlain::Other);
    }
    // A long poll is hyper's: it may wait minutes, and hyper goes on reading the socket
    // meanwhile, so a client that hangs up is noticed and its request dropped.
    let query = target.split_once('?').map_or("", |(_, q)| q);
    if query.split('&').any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == "wait") {
        return Err(NotPlain::Other);
    }
    let mut raw = false;
    for h in req.headers.iter() {
        let name = h.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") || is("transfer-encoding") || is("expect") || is("upgrade") || is("te") {
            return Err(NotPlain::Other);
        }
        if is("connection") && !h.value.eq_ignore_ascii_case(b"keep-alive") {
            return Err(NotPlain::Other);
        }
        if is("accept") {
            raw |= asks_raw(h.value);
        }
    }
    Ok(Plain { len, target, raw })
}

/// Whether an `Accept` value names `application/octet-stream` as `Head::wants_raw` reads
/// it: only a value of visible ASCII counts (`HeaderValue::to_str`), any of its
/// comma-separated types.
fn asks_raw(value: &[u8]) -> bool {
    let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible
        && std::str::from_utf8(value)
            .is_ok_and(|v| v.split(',').any(|t| t.trim().starts_with("application/octet-stream")))
}

/// The head as the routes read it, in place — for a target of characters a `Uri` takes as
/// they are ([`Plain::in_place`]); any other target is parsed into a `Uri` as hyper's path
/// does ([`Plain::request`]), so both paths read every target alike.
impl super::Head for Plain<'_> {
    fn method(&self) -> &http::Method {
        &http::Method::GET
    }

    fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    fn wants_raw(&self) -> bool {
        self.raw
    }

    fn has_body(&self) -> bool {
        false
    }
}

impl Plain<'_> {
    /// Whether the target can be read in place: only characters a `Uri` keeps as they are
    /// and splits only at the first `?` (no `#`, which would end it; nothing a `Uri`
    /// refuses). Checked by `a_target_read_in_place_reads_as_its_uri` against `Uri` itself.
    fn in_place(&self) -> bool {
        self.target.bytes().all(|b| b.is_ascii_alphanumeric() || b"/?=&%-._~:@!$'()*+,;".contains(&b))
    }

    /// The request the routes see: method, target and, for a raw answer, `Accept` — all
    /// the read route reads of a head without a body (see `routes::Head`).
    fn request(&self) -> Option<Request<()>> {
        let mut r = Request::new(());
        *r.uri_mut() = Uri::try_from(self.target).ok()?;
        if self.raw {
            r.headers_mut()
                .insert(header::ACCEPT, http::HeaderValue::from_static("application/octet-stream"));
        }
        Some(r)
    }
}

/// Serves plain requests on `io` until the connection closes or asks for hyper.
pub(super) async fn serve<H: super::Handler>(
    h: &H,
    conn: &H::Conn,
    io: &mut H::Io,
    prefix: &str,
    closing: &mut tokio::sync::watch::Receiver<bool>,
    activity: Option<&Arc<Activity>>,
) -> Handover {
    // Made once for the connection: waiting on it registers with the shutdown and eviction
    // notifiers once, not at every request.
    let close = async {
        match activity {
            Some(a) => tokio::select! {
                _ = closing.wait_for(|c| *c) => {}
                () = a.evicted() => tracing::debug!("idle connection closed to make room for a newer one"),
            },
            None => {
                let _ = closing.wait_for(|c| *c).await;
            }
        }
    };
    let mut close = std::pin::pin!(close);
    // One timer for the connection's idle limit, moved on only when half of it has passed
    // since it was last set: no timer operation per request.
    let mut idle_set = tokio::time::Instant::now();
    let mut idle = std::pin::pin!(tokio::time::sleep_until(idle_set + IDLE * 2));
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
    let mut head: Vec<u8> = Vec::with_capacity(256);
    let mut first = true;
    loop {
        if buf.is_empty() {
            let now = tokio::time::Instant::now();
            if now.duration_since(idle_set) >= IDLE {
                idle_set = now;
                idle.as_mut().reset(now + IDLE * 2);
            }
            match read_more(io, &mut buf, first, close.as_mut(), idle.as_mut()).await {
                Some(n) if n > 0 => {}
                _ => return Handover::Closed,
            }
        }
        first = false;
        let plain = match parse(&buf, prefix) {
            Ok(p) => p,
            Err(NotPlain::Malformed(e)) => {
                if let Some(resp) = h.malformed(&e.to_string()) {
                    // Closed after the answer, as hyper closes after its 400: what follows a
                    // head that cannot be read has no known start.
                    let written = tokio::select! {
                        biased;
                        r = write_response(io, &mut head, resp) => r.is_ok(),
                        () = close.as_mut() => false,
                    };
                    if written {
                        let _ = io.shutdown().await;
                    }
                    return Handover::Closed;
                }
                return Handover::Hyper(buf);
            }
            Err(_) => return Handover::Hyper(buf),
        };
        let len = plain.len;
        let resp = if plain.in_place() {
            let busy = activity.map(Activity::begin);
            let resp = h.handle(conn, &plain).await;
            drop(busy);
            resp
        } else {
            let Some(req) = plain.request() else { return Handover::Hyper(buf) };
            let busy = activity.map(Activity::begin);
            let resp = h.handle(conn, &req).await;
            drop(busy);
            resp
        };
        let close_after = resp
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        // A client that does not read its answers blocks the write: a shutdown or an
        // eviction (the connection counts as idle now) still closes it.
        let written = tokio::select! {
            biased;
            r = write_response(io, &mut head, resp) => r.is_ok(),
            () = close.as_mut() => false,
        };
        if !written {
            return Handover::Closed;
        }
        buf.drain(..len);
        // A shutdown or an eviction that came while the request was served: close now, as
        // hyper's graceful shutdown does after the request in flight.
        if close_after || poll_once(close.as_mut()).await {
            let _ = io.shutdown().await;
            return Handover::Closed;
        }
        if buf.len() >= READ_BUF {
            return Handover::Hyper(buf);
        }
    }
}

/// Whether `fut` is done, polled once (it must not be polled again if it is).
async fn poll_once(fut: Pin<&mut impl Future<Output = ()>>) -> bool {
    let mut fut = fut;
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await
}

/// Waits for the next bytes, or for `close` (the connection is idle: a shutdown or an
/// eviction closes it), or for `idle` (see [`IDLE`]); `None` when it is to close. A new
/// connection's first head must arrive within hyper's header timeout.
async fn read_more<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut Vec<u8>,
    first: bool,
    close: Pin<&mut impl Future<Output = ()>>,
    idle: Pin<&mut tokio::time::Sleep>,
) -> Option<usize> {
    let read = async {
        if first {
            tokio::time::timeout(super::HEADER_TIMEOUT, io.read_buf(buf)).await.ok()?.ok()
        } else {
            io.read_buf(buf).await.ok()
        }
    };
    tokio::select! {
        // The read first: woken for its bytes (the usual wake-up), the notifiers and the
        // timer are not polled again. A close is not starved: `serve` polls it after each
        // answer.
        biased;
        n = read => n,
        () = close => None,
        () = idle => None,
    }
}

/// Writes `resp` as hyper would (status line, its headers, `content-length` and `date`),
/// head and body in one vectored write; the body is not copied.
async fn write_response<I: AsyncWrite + Unpin>(
    io: &mut I,
    head: &mut Vec<u8>,
    resp: Response<Body>,
) -> std::io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    // A `Full` body: one frame, ready at once.
    let data = match body.frame().await {
        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    };
    head.clear();
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // No body for 304 and 204 (nor a length), as hyper does.
    let bodiless = matches!(parts.status, StatusCode::NOT_MODIFIED | StatusCode::NO_CONTENT);
    if !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        head.extend_from_slice(b"content-length: ");
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        head.extend_from_slice(super::routes::decimal(len, &mut [0u8; 20]).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    date::now(|d| head.extend_from_slice(d));
    head.extend_from_slice(b"\r\n\r\n");
    super::response::give_back(parts.headers);
    let body: &[u8] = if bodiless { &[] } else { &data };
    let mut slices = [IoSlice::new(head), IoSlice::new(body)];
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The `date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub(super) fn now(f: impl FnOnce(&[u8])) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != secs {
                *text = httpdate::fmt_http_date(now);
                *at = secs;
            }
            f(text.as_bytes());
        });
    }
}

/// A connection handed to hyper: `pre` (bytes the plain path read) is read first.
pub(super) struct Rewind<I> {
    pre: Vec<u8>,
    at: usize,
    inner: I,
}

impl<I> Rewind<I> {
    pub(super) fn new(pre: Vec<u8>, inner: I) -> Self {
        Self { pre, at: 0, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.pre.len() {
            let n = (this.pre.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.pre[this.at..this.at + n]);
            this.at += n;
            if this.at == this.pre.len() {
                this.pre = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
