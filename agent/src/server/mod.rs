//! The agent socket: bind it safely, accept connections, serve HTTP/1.1, drain on shutdown.
//!
//! Each connection gets its caller's kernel credentials at accept ([`ConnPeer`]) and one
//! tracing span. On shutdown the listener closes first, in-flight requests get a bounded
//! grace period, and the socket file is removed last.

mod head;
mod plain;
pub(crate) mod response;
mod routes;

pub(crate) use head::Head;

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::peer::ConnPeer;
use crate::peer::sender::{LabelledStream, SenderLog};
use crate::state::State;
use crate::state::limits::{Activity, Admit, ConnSlot};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    #[error("{path}: another agent is already listening on this socket; stop it first")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; remove it or choose another [agent] socket")]
    NotASocket { path: PathBuf },
    #[error(transparent)]
    Untrusted(#[from] crate::trust::Untrusted),
    #[error("socket_group {group:?}: no such group")]
    NoGroup { group: String },
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("[metrics] listen {addr}: cannot listen: {source} (is another process using the port?)")]
    MetricsListen { addr: std::net::SocketAddr, source: io::Error },
}

/// The socket file of a bound listener; removed when this is dropped. Kept apart from the
/// listener so the agent can stop accepting (close the listener) at once on shutdown, and
/// remove the file only after the drain and `agent.stop`.
pub(crate) struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket at `path` with `mode` and `group`, replacing a stale socket file but
/// never a live agent's socket or a file that is not a socket.
///
/// With `label_senders` (the agent socket), every byte it will carry is labelled with its
/// sender ([`crate::sys::pass_sender_credentials`]): the options are set before `listen()`,
/// so no connection can be accepted without them (accepted sockets inherit them).
pub(crate) fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    label_senders: bool,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let io_err = |what, source| SocketError::Io { path: path.to_owned(), what, source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err("cannot set directory mode", e))?;
    }
    crate::trust::check_dir_chain(dir, "the socket's directory")?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::InUse { path: path.to_owned() });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket from an agent that is gone");
                std::fs::remove_file(path).map_err(|e| io_err("cannot remove stale socket", e))?;
            }
            Err(e) => return Err(io_err("cannot probe existing socket", e)),
        },
        Ok(_) => {
            return Err(SocketError::NotASocket { path: path.to_owned() });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", e)),
    }
    let (std_listener, file) = listen_on(path, label_senders, mode, group)?;
    std_listener.set_nonblocking(true).map_err(|e| io_err("cannot set non-blocking", e))?;
    let listener = UnixListener::from_std(std_listener).map_err(|e| io_err("cannot register", e))?;
    Ok((listener, file))
}

/// A listening socket at `path`: sender labelling switched on, then bound, then given its
/// mode and group, and only then `listen()`ing — before that a `connect()` is refused, so no
/// connection is ever accepted unlabelled or through a mode wider than configured.
fn listen_on(
    path: &Path,
    label_senders: bool,
    mode: u32,
    group: Option<&str>,
) -> Result<(std::os::unix::net::UnixListener, SocketFile), SocketError> {
    let io_err = |what, source| SocketError::Io { path: path.to_owned(), what, source };
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(|e| io_err("cannot create socket", e))?;
    if label_senders {
        match crate::sys::pass_sender_credentials(std::os::fd::AsFd::as_fd(&socket)) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "this kernel has no SO_PASSPIDFD (Linux 6.5+): senders are pinned by pid and start time"
            ),
            Err(e) => return Err(io_err("cannot enable sender credentials (SO_PASSCRED)", e)),
        }
    }
    let addr = socket2::SockAddr::unix(path).map_err(|e| io_err("cannot use as a socket path", e))?;
    socket.bind(&addr).map_err(|e| io_err("cannot bind", e))?;
    // From here on the file is ours: removed if anything below fails.
    let file = SocketFile(path.to_owned());
    // The directory is trusted (no one else can swap the path); still, never chmod through
    // a symlink.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        _ => return Err(SocketError::NotASocket { path: path.to_owned() }),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("cannot set socket mode", e))?;
    if let Some(g) = group {
        let gid = socket_gid(path, g)?;
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| io_err("cannot set socket group", e))?;
    }
    socket.listen(1024).map_err(|e| io_err("cannot listen", e))?;
    Ok((socket.into(), file))
}

/// The gid of `socket_group` (a name or a number); `path` is the socket, for messages.
pub(crate) fn socket_gid(path: &Path, group: &str) -> Result<u32, SocketError> {
    match group.parse::<u32>() {
        Ok(n) => Ok(n),
        Err(_) => crate::sys::group_id(group)
            .map_err(|source| SocketError::Io {
                path: path.to_owned(),
                what: "cannot look up socket_group",
                source,
            })?
            .ok_or_else(|| SocketError::NoGroup { group: group.to_owned() }),
    }
}

/// What [`bind`] checks before touching anything, for `check-config`: the socket's
/// directory (or, if it does not exist yet, the nearest existing one above it) is trusted,
/// and `group` exists.
pub(crate) fn check_bind(path: &Path, group: Option<&str>) -> Result<(), SocketError> {
    let mut dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    while !dir.exists() {
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p,
            _ => break,
        }
    }
    crate::trust::check_dir_chain(dir, "the socket's directory")?;
    if let Some(g) = group {
        socket_gid(path, g)?;
    }
    Ok(())
}

/// Largest request head (request line + headers) accepted; larger gets 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A client that has not sent its whole request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an evicted connection on hyper's path may take to finish writing its last
/// answer before it is dropped (the plain path drops an evicted connection at once, even in
/// the middle of a write).
const EVICTED_WRITE_LIMIT: Duration = HEADER_TIMEOUT;

/// One kind of socket the agent serves: the agent socket or the admin socket. The accept
/// loop, timeouts, limits on request heads and the drain on shutdown are the same for both
/// ([`serve`]); what differs is what is learned about a connection and how it is answered.
pub(crate) trait Handler: Send + Sync + 'static {
    /// What is learned at accept (the caller's kernel credentials) and kept while the
    /// connection lives; dropped when it closes.
    type Conn: Send + Sync + 'static;
    /// What hyper reads and writes (the stream itself, or a wrapper that labels reads).
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Facts for a new connection and its I/O, or `None` to close it at once.
    fn accept(&self, stream: tokio::net::UnixStream) -> Option<(Self::Conn, Self::Io)>;
    /// The tracing span every event of the connection is recorded in.
    fn span(&self, conn: &Self::Conn) -> tracing::Span;
    /// The connection's activity, when it may be closed to make room for a newer one (an
    /// idle connection of a uid at its cap). A request in flight is always finished first.
    fn activity(&self, _conn: &Self::Conn) -> Option<Arc<Activity>> {
        None
    }
    /// Answers one request (hyper's, body and all; or a head the plain path read in place).
    fn handle<R: Head + Sync>(
        &self,
        conn: &Self::Conn,
        req: &R,
    ) -> impl Future<Output = hyper::Response<response::Body>> + Send;
    /// The answer to a request head the parser refuses (`why`: the parser's reason, no byte
    /// of the head), written before the connection is closed; `None`: hyper answers it.
    fn malformed(&self, _why: &str) -> Option<hyper::Response<response::Body>> {
        None
    }
    /// Requests under this path that the plain path serves before hyper ([`plain`]);
    /// `None`: hyper serves every request.
    fn plain_prefix(&self) -> Option<&'static str> {
        None
    }
}

/// Serves `listener` with `handler` until `shutdown` resolves, then drains in-flight
/// requests for at most `grace`. Accept errors (out of fds) back off instead of spinning.
pub(crate) async fn serve<H: Handler, T>(
    listener: UnixListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = T>,
    grace: Duration,
) -> T {
    // Connections watch `closing` to finish their request in flight and close; each holds a
    // clone of `live`, so the drain knows when the last one is gone.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let (live, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    let why = loop {
        let stream = tokio::select! {
            why = &mut shutdown => break why,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some((conn, io)) = handler.accept(stream) else { continue };
        let conn = Arc::new(conn);
        let span = handler.span(&conn);
        let activity = handler.activity(&conn);
        let h = Arc::clone(&handler);
        let (mut closing, live) = (closing.clone(), live.clone());
        tokio::spawn(
            async move {
                let mut io = io;
                // Plain reads first, while the connection asks only for them; then hyper.
                let pre = match h.plain_prefix() {
                    Some(prefix) => {
                        match plain::serve(&*h, &conn, &mut io, prefix, &mut closing, activity.as_ref()).await
                        {
                            plain::Handover::Closed => {
                                drop(live);
                                return;
                            }
                            plain::Handover::Hyper(pre) => pre,
                        }
                    }
                    None => Vec::new(),
                };
                let svc = {
                    let activity = activity.clone();
                    service_fn(move |req: hyper::Request<Incoming>| {
                        let (h, conn) = (Arc::clone(&h), Arc::clone(&conn));
                        let busy = activity.as_ref().map(Activity::begin);
                        async move {
                            let r = h.handle(&conn, &req).await;
                            drop(busy);
                            Ok::<_, Infallible>(r)
                        }
                    })
                };
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .serve_connection(TokioIo::new(plain::Rewind::new(pre, io)), svc);
                let mut conn = std::pin::pin!(conn);
                let mut asked = false;
                let result = loop {
                    // True: evicted; false: the agent is stopping.
                    let close = async {
                        match &activity {
                            Some(a) => tokio::select! {
                                _ = closing.wait_for(|c| *c) => false,
                                () = a.evicted() => true,
                            },
                            None => {
                                let _ = closing.wait_for(|c| *c).await;
                                false
                            }
                        }
                    };
                    tokio::select! {
                        r = conn.as_mut() => break r,
                        evicted = close, if !asked => {
                            // Finish a request in flight, then close; an idle connection
                            // closes now.
                            asked = true;
                            conn.as_mut().graceful_shutdown();
                            if evicted {
                                tracing::debug!("idle connection closed to make room for a newer one");
                                // Its place went to the newer connection at once: an answer
                                // its client does not read must not keep it open (a uid could
                                // hold any number of connections past its cap so).
                                match tokio::time::timeout(EVICTED_WRITE_LIMIT, conn.as_mut()).await {
                                    Ok(r) => break r,
                                    Err(_) => {
                                        tracing::debug!("evicted connection dropped: its answer was not read in time");
                                        break Ok(());
                                    }
                                }
                            }
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(live);
            }
            .instrument(span),
        );
    };
    // Closing the listener makes new connections fail at once instead of queueing.
    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    let _ = closing_tx.send(true);
    drop(live);
    if tokio::time::timeout(grace, all_closed.recv()).await.is_err() {
        tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over: closing remaining connections");
    }
    why
}

/// How long the accept loop waits after a failed `accept` (e.g. EMFILE) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The agent socket: every request is attested, decided by policy and audited.
pub(crate) struct AgentSocket(pub(crate) Arc<State>);

/// A connection to the agent socket.
pub(crate) struct AgentConn {
    peer: ConnPeer,
    /// Its place in the connection budget, released when the connection closes.
    slot: ConnSlot,
    /// Over its uid's cap with every one of its connections busy: each request is answered
    /// 429 (and audited) with `Connection: close`, so the caller learns why and the
    /// connection goes at once.
    refused: bool,
}

/// Written to a connection closed at accept for want of room (best effort: the socket is
/// closed right after, whatever the client sent).
const NO_ROOM: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nCache-Control: no-store\r\n\
Connection: close\r\nContent-Type: application/json\r\nContent-Length: 124\r\n\r\n\
{\"error\":{\"code\":\"TooManyRequests\",\"message\":\"the agent has no room for more connections: close idle ones\",\"request_id\":\"\"}}";

impl Handler for AgentSocket {
    type Conn = AgentConn;
    type Io = LabelledStream;

    fn accept(&self, stream: tokio::net::UnixStream) -> Option<(AgentConn, LabelledStream)> {
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials: closing connection");
                return None;
            }
        };
        // Admitted before the pidfd is opened: a connection with no room costs one fd, briefly.
        let (slot, refused) = match self.0.limits.open(uid) {
            Admit::Served(slot) => (slot, false),
            Admit::Refused(slot) => (slot, true),
            Admit::Closed => {
                crate::metrics::get().limited(crate::metrics::Limit::Connections);
                let _ = stream.try_write(NO_ROOM);
                tracing::debug!(uid, "no room for another connection: closed");
                return None;
            }
        };
        let senders = Arc::new(SenderLog::default());
        match ConnPeer::of(&stream, Arc::clone(&senders), crate::peer::events::global()) {
            Ok(peer) => match LabelledStream::new(stream, senders) {
                Ok(io) => Some((AgentConn { peer, slot, refused }, io)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register an accepted connection: closing it");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials: closing connection");
                None
            }
        }
    }

    fn activity(&self, c: &AgentConn) -> Option<Arc<Activity>> {
        c.slot.activity().cloned()
    }

    fn span(&self, c: &AgentConn) -> tracing::Span {
        tracing::debug_span!("conn", pid = c.peer.pid, uid = c.peer.uid)
    }

    async fn handle<R: Head + Sync>(&self, c: &AgentConn, req: &R) -> hyper::Response<response::Body> {
        routes::handle(&self.0, &c.peer, c.refused, req).await
    }

    fn malformed(&self, why: &str) -> Option<hyper::Response<response::Body>> {
        Some(routes::malformed(why))
    }

    fn plain_prefix(&self) -> Option<&'static str> {
        Some("/v1/secrets/")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use super::*;

    /// The agent socket labels senders from its very first connection: the option is set
    /// before `listen()`, not after (a client that connected in between was refused as
    /// unlabelled). The admin socket does not label.
    #[tokio::test]
    async fn the_agent_socket_labels_its_first_connection() {
        let dir = std::env::temp_dir().join(format!("kvbroker-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, label) in [("agent.sock", true), ("admin.sock", false)] {
            let path = dir.join(name);
            let (listener, _file) = bind(&path, 0o600, None, label).unwrap();
            let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
            client.write_all(b"GET").unwrap();
            let (conn, _) = listener.accept().await.unwrap();
            conn.readable().await.unwrap();
            let mut buf = [0u8; 8];
            let mut read = tokio::io::ReadBuf::new(&mut buf);
            let sender = crate::sys::recv_labelled(conn.as_fd(), &mut read).unwrap();
            assert_eq!(read.filled(), b"GET");
            assert_eq!(
                sender.cred.map(|(pid, _, _)| pid),
                label.then_some(std::process::id()),
                "{name}: labelled from the first connection on"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
