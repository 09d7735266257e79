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

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

use super::events;
use crate::sys;

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
                    // request checks through its pidfd before it is decided.
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
/// Unlike tokio's own stream, a read shorter than the buffer does not mean the socket is
/// drained: `recvmsg` stops at a change of sender, and the other sender's bytes may already
/// be queued (with edge-triggered readiness, no new event would come for them). So readiness
/// is cleared only by `EAGAIN` — one more `recvmsg` per request than a plain read loop.
pub(crate) struct LabelledStream {
    inner: UnixStream,
    log: Arc<SenderLog>,
}

impl LabelledStream {
    pub(crate) fn new(inner: UnixStream, log: Arc<SenderLog>) -> Self {
        Self { inner, log }
    }
}

impl AsyncRead for LabelledStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_fd();
            match this.inner.try_io(Interest::READABLE, || sys::recv_labelled(fd, buf)) {
                Ok(label) => {
                    // After the recvmsg returned: an event the kernel queued before these
                    // bytes were sent is older than this stamp.
                    this.log.received_at.store(events::now(), Ordering::Release);
                    if label.len > 0 && this.log.record(label) {
                        // The first writer's pidfd is kept; later messages need only their
                        // credentials (compared by pid while that pidfd proves the process
                        // alive), so the kernel need not make a pidfd for each one.
                        if let Err(e) = sys::stop_passing_pidfds(fd) {
                            tracing::debug!(error = %e, "cannot turn off SO_PASSPIDFD on a connection");
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for LabelledStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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

    #[test]
    fn unlabelled_bytes_are_refused() {
        let log = SenderLog::default();
        log.record(sys::Sender { cred: None, pidfd: None, len: 3 });
        assert!(matches!(log.writer(), Err(NotOneWriter::Unlabelled)));
    }
}
