//! Writing the audit log: group commit (a leading request, or the writer thread, writes the
//! records queued meanwhile in one `write(2)`), rollback of torn writes, size rotation,
//! reopening a removed or replaced file, and periodic checkpoints.
//!
//! **Noticing a removed or replaced file without a syscall per record.** A watcher thread
//! holds an inotify watch on the log's directory and raises a flag when an entry of the log's
//! name is created, deleted or renamed (or the directory itself is removed or moved, or the
//! event queue overflows). Before each batch the writer reads the flag (an atomic load) and,
//! when it is raised, compares the path's device and inode with the open file's. Whatever
//! inotify cannot see (a parent directory renamed, a mount over the directory) is caught by
//! the same comparison made at least every [`RECHECK`]; without a watch (inotify unavailable,
//! or the watch lost) every batch is compared, as before. So no record goes into a removed
//! or replaced file more than [`RECHECK`] after the change, and in practice none after the
//! watcher thread has run once (microseconds).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::AuditError;
use super::record::Fields;
use crate::config::Durability;

pub(super) use state::State;

mod spare;
mod state;
mod watch;

pub(super) struct Job {
    /// The record's fields object ([`Fields`]), serialized by the request that queued it.
    pub(super) fields: Vec<u8>,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

/// Records written in one go, at most.
const MAX_BATCH: usize = 1024;

/// The batch buffer is kept between batches up to this capacity (a burst's larger buffer
/// is let go).
const KEEP_BUF: usize = 64 * 1024;

/// The longest a record may be written without the audit path being compared with the open
/// file (device and inode), whatever the inotify watch saw or missed.
pub(crate) const RECHECK: Duration = Duration::from_millis(100);

/// How many batches a request that found nobody writing writes before it hands the queue to
/// the writer thread: its own record, then what queued meanwhile (in `write` mode). In
/// `fsync` mode requests hand every record to the writer thread ([`Core::hands_off`]),
/// which writes and fsyncs what queued meanwhile as one batch, so no runtime worker blocks
/// on an fsync; one batch is what a request that took the turn by hand (tests) writes.
const LEAD_BATCHES_WRITE: usize = 8;
const LEAD_BATCHES_FSYNC: usize = 1;

/// Records waiting for the request (or the writer thread) that is writing.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Someone is writing and will write `jobs` before it stops.
    leading: bool,
}

/// The writer state and its queue, shared by requests and the writer thread.
pub(super) struct Core {
    state: Mutex<State>,
    queue: Mutex<Queue>,
    lead_batches: usize,
    /// `fsync` mode: see [`Core::hands_off`].
    fsync: bool,
}

impl Core {
    pub(super) fn new(state: State) -> Arc<Self> {
        let fsync = state.durability == Durability::Fsync;
        let lead_batches = if fsync { LEAD_BATCHES_FSYNC } else { LEAD_BATCHES_WRITE };
        Arc::new(Self { state: Mutex::new(state), queue: Mutex::new(Queue::default()), lead_batches, fsync })
    }

    /// Whether records go to the writer thread rather than being written by the request
    /// (`fsync` mode: an fsync would block the runtime worker the request runs on).
    pub(super) fn hands_off(&self) -> bool {
        self.fsync
    }

    /// Tests: the writer state, locked.
    #[cfg(test)]
    pub(super) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state())
    }

    /// Tests: (records queued, whether someone leads).
    #[cfg(test)]
    pub(super) fn queued(&self) -> (usize, bool) {
        let q = self.queue();
        (q.jobs.len(), q.leading)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `record` here and now if nobody is writing (see [`Core::lead`]); otherwise
    /// queues it for whoever is, and gives the channel its answer comes on.
    pub(super) fn write_or_queue(
        &self,
        record: &dyn Fields,
        kick: &Sender<()>,
    ) -> Result<Result<u64, AuditError>, tokio::sync::oneshot::Receiver<Result<u64, AuditError>>> {
        let mut q = self.queue();
        if q.leading {
            drop(q);
            // Serialized outside the queue's lock; written by whoever leads.
            let mut fields = spare::take();
            if let Err(e) = record.write_fields(&mut fields) {
                // Give the turn back to nobody: we do not hold it.
                return Ok(Err(AuditError::Unwritable(e.to_string())));
            }
            let (reply, rx) = tokio::sync::oneshot::channel();
            let mut q = self.queue();
            if q.leading {
                q.jobs.push(Job { fields, reply });
                return Err(rx);
            }
            // The writer finished meanwhile: lead after all.
            q.leading = true;
            drop(q);
            return Ok(self.lead(&fields, kick));
        }
        q.leading = true;
        drop(q);
        Ok(self.lead(record, kick))
    }

    /// Tests: takes the writing turn as a request that found nobody writing does.
    #[cfg(test)]
    pub(super) fn take_lead(&self) -> bool {
        !std::mem::replace(&mut self.queue().leading, true)
    }

    /// Writes `record` now (one `write(2)`), then, in `write` mode, up to a few batches of
    /// what other requests queued meanwhile, each in one `write(2)`; whatever is still
    /// queued then goes to the writer thread (`kick`). Synchronous, so a cancelled request
    /// cannot leave the queue without a writer.
    /// Called only by whoever set `leading`.
    pub(super) fn lead(&self, record: &dyn Fields, kick: &Sender<()>) -> Result<u64, AuditError> {
        let _lead = Leadership { core: self, kick };
        let mine = self.state().write_one(record);
        for _ in 1..self.lead_batches {
            let batch = self.take();
            if batch.is_empty() {
                break;
            }
            self.state().handle(batch);
        }
        mine
    }

    /// Queues `record` and takes the writing turn if nobody has it, so records of requests
    /// that arrive together can share one `write(2)`: the caller lets them queue behind its
    /// own, then writes the queue with [`Turn::write_queued`]. Returns where the record's
    /// answer comes, and the turn if it was free.
    pub(super) fn enqueue<'a>(
        &'a self,
        record: &dyn Fields,
        kick: &'a Sender<()>,
    ) -> (tokio::sync::oneshot::Receiver<Result<u64, AuditError>>, Option<Turn<'a>>) {
        let mut fields = spare::take();
        let (reply, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = record.write_fields(&mut fields) {
            // Answered at once, and the turn is not taken.
            let _ = reply.send(Err(AuditError::Unwritable(e.to_string())));
            return (rx, None);
        }
        let mut q = self.queue();
        q.jobs.push(Job { fields, reply });
        let lead = !std::mem::replace(&mut q.leading, true);
        drop(q);
        (rx, lead.then(|| Turn(Leadership { core: self, kick })))
    }

    /// The queue's next batch (empty if none), leadership kept.
    fn take(&self) -> Vec<Job> {
        let mut q = self.queue();
        let n = q.jobs.len().min(MAX_BATCH);
        q.jobs.drain(..n).collect()
    }

    /// The queue's next batch; when it is empty, leadership ends in the same step.
    fn take_or_release(&self) -> Vec<Job> {
        let mut q = self.queue();
        if q.jobs.is_empty() {
            q.leading = false;
            return Vec::new();
        }
        let n = q.jobs.len().min(MAX_BATCH);
        q.jobs.drain(..n).collect()
    }
}

/// The writing turn of a request that queued its own record first ([`Core::enqueue`]).
/// Dropped unused (the request was cancelled), it hands the queue to the writer thread, so
/// every queued record is still written.
pub(super) struct Turn<'a>(Leadership<'a>);

impl Turn<'_> {
    /// Writes what is queued — the turn's own record among it — one `write(2)` per batch,
    /// up to a few batches; the rest goes to the writer thread.
    pub(super) fn write_queued(self) {
        let core = self.0.core;
        for _ in 0..core.lead_batches {
            let batch = core.take();
            if batch.is_empty() {
                break;
            }
            core.state().handle(batch);
        }
    }
}

/// The leading writer's turn; ending it (also by unwinding) either finds the queue empty
/// and ends leadership, or hands the queue to the writer thread, which leads on.
struct Leadership<'a> {
    core: &'a Core,
    kick: &'a Sender<()>,
}

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        let mut q = self.core.queue();
        if q.jobs.is_empty() {
            q.leading = false;
            return;
        }
        drop(q);
        if self.kick.send(()).is_err() {
            // No writer thread: nobody will write what is queued. Dropping the jobs answers
            // their requests with `Stopped` (503) instead of leaving them to time out.
            let mut q = self.core.queue();
            q.jobs.clear();
            q.leading = false;
        }
    }
}

pub(super) fn spawn(core: Arc<Core>) -> std::io::Result<(Sender<()>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new().name("kvbroker-audit".into()).spawn(move || run(&core, &rx))?;
    Ok((tx, thread))
}

/// The writer thread: checkpoints on time, and leads when a request hands it the queue.
fn run(core: &Core, rx: &Receiver<()>) {
    loop {
        let wait = {
            let s = core.state();
            s.checkpoint_every.saturating_sub(s.last_checkpoint.elapsed())
        };
        match rx.recv_timeout(wait) {
            Ok(()) => loop {
                let batch = core.take_or_release();
                if batch.is_empty() {
                    break;
                }
                core.state().handle(batch);
            },
            Err(RecvTimeoutError::Timeout) => core.state().checkpoint(),
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
