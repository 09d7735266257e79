//! Requests that arrive together, made to meet: a request that finds others on their way
//! steps aside once, so they catch up with it and one system call serves them all — one
//! drain of the exec/exit event queue (`peer::events`), one `write(2)` of audit records
//! (`audit`). With one client nothing is on its way, and nothing waits.
//!
//! "On their way": connections whose socket has become readable and whose task has not read
//! it yet ([`Woken`], counted from the reactor's wake to the read), and secret reads that
//! have been read and not yet recorded ([`InProgress`]; a long poll leaves the count while
//! it waits).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

static WOKEN: AtomicUsize = AtomicUsize::new(0);
static IN_PROGRESS: AtomicUsize = AtomicUsize::new(0);

/// One connection's place in the woken count.
#[derive(Debug)]
pub(crate) struct Woken {
    counted: AtomicBool,
    /// [`WOKEN`]; a test's own counter in tests.
    count: &'static AtomicUsize,
}

impl Default for Woken {
    fn default() -> Self {
        Self { counted: AtomicBool::new(false), count: &WOKEN }
    }
}

impl Woken {
    /// Its socket became readable (called from the reactor's wake).
    pub(crate) fn woken(&self) {
        if !self.counted.swap(true, Ordering::AcqRel) {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Its task reads it now (or it is closed).
    pub(crate) fn read(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub(crate) fn is_counted(&self) -> bool {
        self.counted.load(Ordering::Acquire)
    }
}

/// A wake can race the connection's end (the reactor wakes it as it closes): whatever
/// owns this leaves the count with it, or every later request would step aside for nobody.
impl Drop for Woken {
    fn drop(&mut self) {
        self.read();
    }
}

/// A secret read between its request and its audit record.
#[derive(Debug)]
pub(crate) struct InProgress(bool);

impl InProgress {
    pub(crate) fn begin() -> Self {
        IN_PROGRESS.fetch_add(1, Ordering::Relaxed);
        Self(true)
    }

    /// Leaves the count (a long poll about to wait); for good.
    pub(crate) fn leave(&mut self) {
        if std::mem::take(&mut self.0) {
            IN_PROGRESS.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `fut`, leaving the count for good if it has to wait (a Key Vault fetch, a
    /// kubelet lookup): requests that step aside for this one would wait for nothing.
    pub(crate) async fn unless_waiting<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let polled = fut.as_mut().poll(cx);
            if polled.is_pending() {
                self.leave();
            }
            polled
        })
        .await
    }

    /// Whether requests other than this one are on their way.
    pub(crate) fn others(&self) -> bool {
        WOKEN.load(Ordering::Relaxed) > 0 || IN_PROGRESS.load(Ordering::Relaxed) > usize::from(self.0)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Returns `Pending` once, waking itself: the task goes to the back of its worker's run
/// queue, behind the tasks already ready there, without a system call (the other worker is
/// woken only if it is idle — and requests step aside only while others are on their way,
/// so at one client this is never awaited).
pub(crate) struct StepAside(bool);

impl StepAside {
    pub(crate) fn new() -> Self {
        Self(false)
    }
}

impl Future for StepAside {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_others_not_itself() {
        // Other tests run beside this one and count too: only what this test changes is
        // asserted, through its own guards.
        let mut me = InProgress::begin();
        let other = InProgress::begin();
        assert!(me.others(), "another read in progress");
        drop(other);
        me.leave();
        assert!(!me.0, "left for good");
        me.leave();
        assert!(!me.0, "leaving twice counts once");
        let woken = Woken::default();
        woken.woken();
        woken.woken();
        assert!(woken.is_counted());
        assert!(me.others(), "a woken connection is on its way");
        woken.read();
        assert!(!woken.is_counted());
    }

    #[tokio::test]
    async fn a_read_that_waits_leaves_the_count_and_one_that_does_not_stays() {
        let mut progress = InProgress::begin();
        assert_eq!(progress.unless_waiting(async { 7 }).await, 7);
        assert!(progress.0, "ready at once: still on its way");
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let waiting = tokio::spawn(async move {
            let got = progress.unless_waiting(rx).await.unwrap();
            (progress.0, got)
        });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        assert_eq!(waiting.await.unwrap(), (false, 3), "it had to wait: left for good");
    }

    /// A wake that lands after the connection's stream is gone (the reactor still held
    /// the waker) is given back when the waker's last owner goes.
    #[test]
    fn a_woken_connection_dropped_unread_leaves_the_count() {
        // Its own counter: `WOKEN` is shared with the other tests of this binary.
        let count: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let woken = Woken { counted: AtomicBool::new(false), count };
        woken.woken();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        drop(woken);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
