//! Who wrote each request: the kernel labels every run of bytes on the agent socket with its
//! sender (`SO_PASSCRED` → `SCM_CREDENTIALS`, `SO_PASSPIDFD` → `SCM_PIDFD`, both set on the
//! listening socket so accepted sockets inherit them and no byte arrives unlabelled), and
//! never returns bytes of two senders in one `recvmsg`.
//!
//! [`LabelledStream`] reads the socket with `recvmsg` and records each sender in the
//! connection's [`SenderLog`]. A connection serves exactly one writing process: the first
//! process whose bytes arrive is the one every request is decided as — not the process that
//! called `connect()`, which may have handed the socket on (fork, `SCM_RIGHTS`). Bytes from
//! any second process poison the connection: that request and every later one is refused and
//! audited as the intruder, and the connection is closed. (A request is dispatched only when
//! its whole head has been read, so a refused-or-not verdict taken at dispatch covers every
//! byte of that request.)

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use super::events;
use crate::{gather, sys};

/// One process that wrote on a connection.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The sender's pidfd from its first message: it names exactly that process, so `/proc`
    /// facts read by pid can be confirmed against it — and while it is alive, no other
    /// process can have its pid.
    pub(crate) pidfd: Option<OwnedFd>,
}

impl Writer {
    fn from_label(s: sys::Sender) -> Option<Writer> {
        let (pid, uid, gid) = s.cred?;
        Some(Writer { pid, uid, gid, pidfd: s.pidfd })
    }
}

/// What has been seen on one connection so far.
#[derive(Debug, Default)]
enum Seen {
    #[default]
    Nothing,
    One(Arc<Writer>),
    /// A second process wrote: `other` is the first that did.
    Mixed {
        first: Arc<Writer>,
        other: Arc<Writer>,
    },
    /// Bytes arrived without credentials (should not happen with the options set on the
    /// listener; refused rather than guessed).
    Unlabelled,
}

/// The senders of one connection's bytes, and when its last bytes were received.
#[derive(Debug, Default)]
pub(crate) struct SenderLog {
    seen: Mutex<Seen>,
    /// [`events::now`] read after the latest `recvmsg` that returned bytes: every byte of
    /// a request being decided was received before it (the exec/exit events' lag proof).
    received_at: AtomicU64,
}

/// Why a connection's requests cannot be attributed to one process.
#[derive(Debug, Clone)]
pub(crate) enum NotOneWriter {
    /// `other` wrote on a connection `first` had been writing on.
    Mixed {
        first: Arc<Writer>,
        other: Arc<Writer>,
    },
    Unlabelled,
    /// No byte has been read (cannot happen for a dispatched request).
    Nothing,
}

impl SenderLog {
    /// Records who sent a run of bytes; returns whether this was the connection's first.
    pub(crate) fn record(&self, label: sys::Sender) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let first_label = matches!(*seen, Seen::Nothing);
        let next = match std::mem::take(&mut *seen) {
            Seen::Nothing => match Writer::from_label(label) {
                Some(w) => Seen::One(Arc::new(w)),
                None => Seen::Unlabelled,
            },
            Seen::One(first) => match label.cred {
                Some(cred) => {
                    // Same pid, uid and gid: the same process, as long as the first writer
                    // is alive (a live process's pid cannot be another's) — which every
                    // request establishes before it is decided: through its pidfd, or
                    // through an exec/exit watch that vouches no exit of it was reported
                    // (the kernel reports the exit before the pid can be reused).
                    if (first.pid, first.uid, first.gid) == cred {
                        Seen::One(first)
                    } else {
                        match Writer::from_label(label) {
                            Some(other) => Seen::Mixed { first, other: Arc::new(other) },
                            None => Seen::Unlabelled,
                        }
                    }
                }
                None => Seen::Unlabelled,
            },
            // Poisoned for good.
            done => done,
        };
        *seen = next;
        first_label
    }

    /// When the connection's latest bytes were received ([`events::now`]; 0: none yet).
    pub(crate) fn received_at(&self) -> u64 {
        self.received_at.load(Ordering::Acquire)
    }

    /// The one process that has written on this connection.
    pub(crate) fn writer(&self) -> Result<Arc<Writer>, NotOneWriter> {
        match &*self.seen.lock().unwrap_or_else(PoisonError::into_inner) {
            Seen::One(w) => Ok(Arc::clone(w)),
            Seen::Mixed { first, other } => {
                Err(NotOneWriter::Mixed { first: Arc::clone(first), other: Arc::clone(other) })
            }
            Seen::Unlabelled => Err(NotOneWriter::Unlabelled),
            Seen::Nothing => Err(NotOneWriter::Nothing),
        }
    }
}

/// The agent socket's connection as hyper sees it: reads go through `recvmsg` and label the
/// connection's [`SenderLog`]; writes go straight through.
///
/// A read shorter than the buffer does not by itself mean the socket is drained: `recvmsg`
/// stops at a change of sender, and the other sender's bytes may already be queued (with
/// edge-triggered readiness, no new event would come for them). So readiness is kept after
/// a short read — the next read finds those bytes or `EAGAIN` — except when the bytes read
/// end a request head (`\r\n\r\n`; requests carry no body). Then hyper has a whole
/// request to dispatch, labelled by this read, and the `EAGAIN` read is saved (one system
/// call per request): bytes of another sender queued right behind it are read, labelled and
/// refused at the connection's next wake-up — the next write by anyone on it, or its close
/// — instead of at once. No byte is ever decided as a sender other than the one the kernel
/// named for it.
pub(crate) struct LabelledStream {
    inner: AsyncFd<std::os::unix::net::UnixStream>,
    log: Arc<SenderLog>,
    /// Given to the reactor instead of the task's own waker, to count this connection in
    /// [`gather::Woken`] from the moment its socket is readable until its task reads it.
    wake: Arc<ReadWake>,
    waker: Waker,
}

/// A connection's read waker: counts it as on its way ([`gather::Woken`]), then wakes its
/// task.
#[derive(Default)]
struct ReadWake {
    task: Mutex<Option<Waker>>,
    woken: gather::Woken,
}

#[cfg(test)]
impl ReadWake {
    fn wake_by_ref_for_test(self: &Arc<Self>) {
        std::task::Wake::wake_by_ref(self);
    }
}

impl std::task::Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.woken();
        if let Some(task) = self.task.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            task.wake_by_ref();
        }
    }
}

impl LabelledStream {
    pub(crate) fn new(inner: UnixStream, log: Arc<SenderLog>) -> io::Result<Self> {
        let wake = Arc::new(ReadWake::default());
        let waker = Waker::from(Arc::clone(&wake));
        // tokio's stream cannot clear read readiness after a successful read; an `AsyncFd`
        // can.
        Ok(Self { inner: sys::register_stream(inner.into_std()?)?, log, wake, waker })
    }
}

impl Drop for LabelledStream {
    fn drop(&mut self) {
        self.wake.woken.read();
    }
}

/// Whether a read that stopped short of the buffer can be taken as the end of what is
/// queued: it ends a request head.
fn ends_request_head(read: &[u8]) -> bool {
    read.ends_with(b"\r\n\r\n")
}

impl AsyncRead for LabelledStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut task = this.wake.task.lock().unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut counting = Context::from_waker(&this.waker);
        loop {
            let mut ready = ready!(this.inner.poll_read_ready(&mut counting))?;
            this.wake.woken.read();
            let room = buf.remaining();
            let before = buf.filled().len();
            match ready.try_io(|fd| sys::recv_labelled(fd.as_fd(), buf)) {
                Ok(Ok(label)) => {
                    // After the recvmsg returned: an event the kernel queued before these
                    // bytes were sent is older than this stamp.
                    this.log.received_at.store(events::now(), Ordering::Release);
                    let n = label.len;
                    if n > 0 && this.log.record(label) {
                        // The first writer's pidfd is kept; later messages need only their
                        // credentials (compared by pid while the process is known alive: by
                        // that pidfd, or by an exec/exit watch that saw no exit), so the
                        // kernel need not make a pidfd for each one.
                        if let Err(e) = sys::stop_passing_pidfds(this.inner.as_fd()) {
                            tracing::debug!(error = %e, "cannot turn off SO_PASSPIDFD on a connection");
                        }
                    }
                    if n > 0 && n < room && ends_request_head(&buf.filled()[before..]) {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `EAGAIN`: readiness cleared; wait for the next edge.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for LabelledStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.inner.poll_write_ready(cx))?;
            if let Ok(r) = ready.try_io(|fd| fd.get_ref().write(buf)) {
                return Poll::Ready(r);
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut ready = ready!(this.inner.poll_write_ready(cx))?;
            if let Ok(r) = ready.try_io(|fd| fd.get_ref().write_vectored(bufs)) {
                return Poll::Ready(r);
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(pid: u32) -> sys::Sender {
        sys::Sender { cred: Some((pid, 1000, 1000)), pidfd: None, len: 1 }
    }

    #[test]
    fn one_writer_then_a_second_poisons_for_good() {
        let log = SenderLog::default();
        assert!(matches!(log.writer(), Err(NotOneWriter::Nothing)));
        assert!(log.record(label(u32::MAX - 1)), "the first label");
        assert!(!log.record(label(u32::MAX - 1)));
        assert_eq!(log.writer().map(|w| w.pid).ok(), Some(u32::MAX - 1), "same credentials: one writer");
        log.record(label(u32::MAX - 2));
        assert!(matches!(log.writer(), Err(NotOneWriter::Mixed { .. })));
        log.record(label(u32::MAX - 1));
        assert!(matches!(log.writer(), Err(NotOneWriter::Mixed { .. })), "stays poisoned");
    }

    /// Two senders' bytes queued at once: the first read returns only the first sender's
    /// request. When those bytes end a request head, readiness is cleared (no `EAGAIN` read)
    /// and the second sender's bytes wait for the next wake-up; otherwise they are read at
    /// once. Either way they are labelled as the second sender and poison the connection.
    #[tokio::test]
    async fn a_second_senders_bytes_are_labelled_as_theirs_now_or_at_the_next_wake_up() {
        use tokio::io::AsyncReadExt;
        const HEAD: &[u8] = b"GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\n\r\n";
        let me = std::process::id();
        for (first, ends_head) in [(HEAD, true), (&HEAD[..20], false)] {
            let (a, b) = UnixStream::pair().unwrap();
            assert!(sys::pass_sender_credentials(a.as_fd()).is_ok());
            sys::send_as_pid(b.as_fd(), first, me).unwrap();
            // pid 1 (init) stands in for a second process writing on the same connection.
            sys::send_as_pid(b.as_fd(), b"XY", 1).unwrap();
            let log = Arc::new(SenderLog::default());
            let mut stream = LabelledStream::new(a, Arc::clone(&log)).unwrap();
            let mut got = vec![0u8; 4096];
            let n = stream.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], first, "a read never spans two senders");
            assert_eq!(log.writer().unwrap().pid, me);
            let second =
                tokio::time::timeout(std::time::Duration::from_millis(200), stream.read(&mut got)).await;
            if ends_head {
                assert!(second.is_err(), "after a whole head, the next read waits for a wake-up");
                assert_eq!(log.writer().unwrap().pid, me, "nothing of the second sender read yet");
                // The next write by anyone wakes the connection: the queued bytes come first.
                sys::send_as_pid(b.as_fd(), b"Z", me).unwrap();
                let n = stream.read(&mut got).await.unwrap();
                assert_eq!(&got[..n], b"XY");
            } else {
                assert_eq!(&got[..second.unwrap().unwrap()], b"XY", "a partial head reads on at once");
            }
            assert!(
                matches!(log.writer(), Err(NotOneWriter::Mixed { ref other, .. }) if other.pid == 1),
                "the second sender's bytes poison the connection"
            );
        }
    }

    /// A connection counts as waiting from the moment its socket is readable until its task
    /// reads it (the audit writer gathers records while some wait), and not after it closes.
    #[tokio::test]
    async fn a_readable_connection_counts_as_waiting_until_its_task_reads() {
        use tokio::io::AsyncReadExt;
        let (a, b) = UnixStream::pair().unwrap();
        assert!(sys::pass_sender_credentials(a.as_fd()).is_ok());
        let mut stream = LabelledStream::new(a, Arc::new(SenderLog::default())).unwrap();
        let wake = Arc::clone(&stream.wake);
        let counted = || wake.woken.is_counted();
        let mut got = [0u8; 64];
        let reader = tokio::spawn(async move {
            let n = stream.read(&mut got).await.unwrap();
            (stream, n)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!counted(), "nothing to read: not waiting");
        sys::send_as_pid(b.as_fd(), b"GET / HTTP/1.1\r\n\r\n", std::process::id()).unwrap();
        let (stream, n) = reader.await.unwrap();
        assert_eq!(n, 18);
        assert!(!counted(), "read: no longer waiting");
        // Readable again, and dropped before its task reads: the count is given back.
        sys::send_as_pid(b.as_fd(), b"GET / HTTP/1.1\r\n\r\n", std::process::id()).unwrap();
        stream.wake.wake_by_ref_for_test();
        assert!(counted());
        drop(stream);
        assert!(!counted(), "a dropped connection does not stay counted");
    }

    #[test]
    fn unlabelled_bytes_are_refused() {
        let log = SenderLog::default();
        log.record(sys::Sender { cred: None, pidfd: None, len: 3 });
        assert!(matches!(log.writer(), Err(NotOneWriter::Unlabelled)));
    }
}
