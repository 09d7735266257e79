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

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, Event, Outcome};
use zeroize::Zeroizing;

use super::record::{self, Fields};
use super::{AuditError, chain, open_append};
use crate::config::{AuditConfig, Durability};

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

/// The inotify watch of the log's directory, as the writer sees it.
struct Watch {
    /// Raised by the watcher thread when an entry of the log's name changed.
    changed: Arc<AtomicBool>,
    /// False when no watcher thread runs: then every batch compares the path.
    live: Arc<AtomicBool>,
}

impl Watch {
    /// Starts a watcher thread on `path`'s directory; without inotify, a watch that is not live.
    fn start(path: &Path) -> Self {
        let changed = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicBool::new(false));
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let Some(name) = path.file_name().map(|n| n.as_encoded_bytes().to_vec()) else {
            return Self { changed, live };
        };
        let fd = match crate::sys::watch_dir_entries(&dir) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot watch the audit directory with inotify: the audit path is checked before every write instead"
                );
                return Self { changed, live };
            }
        };
        live.store(true, Ordering::Release);
        let (weak, live2) = (Arc::downgrade(&changed), Arc::clone(&live));
        let spawned = std::thread::Builder::new()
            .name("kvbroker-audit-watch".into())
            .spawn(move || watch_loop(&fd, &name, &weak, &live2));
        if spawned.is_err() {
            live.store(false, Ordering::Release);
        }
        Self { changed, live }
    }

    /// Not watching: every batch compares the path (tests use this to force either path).
    #[cfg(test)]
    fn none() -> Self {
        Self { changed: Arc::new(AtomicBool::new(false)), live: Arc::new(AtomicBool::new(false)) }
    }
}

/// The watcher thread: raises `changed` on events about the log's name; on losing the watch
/// (the directory removed or moved, an error) marks it not live and ends. Ends too, within
/// a second, once the writer state (the only strong holder of `changed`) is gone.
fn watch_loop(fd: &std::os::fd::OwnedFd, name: &[u8], changed: &Weak<AtomicBool>, live: &AtomicBool) {
    use std::os::fd::AsFd;
    const LOST: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED | libc::IN_UNMOUNT;
    loop {
        let events = crate::sys::read_dir_events(fd.as_fd(), 1000);
        let Some(flag) = changed.upgrade() else { return };
        match events {
            Ok(events) => {
                for e in events {
                    if e.mask & LOST != 0 {
                        live.store(false, Ordering::Release);
                        flag.store(true, Ordering::Release);
                        return;
                    }
                    if e.mask & libc::IN_Q_OVERFLOW != 0 || e.name == name {
                        flag.store(true, Ordering::Release);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit directory watch failed: the audit path is checked before every write instead");
                live.store(false, Ordering::Release);
                flag.store(true, Ordering::Release);
                return;
            }
        }
    }
}

pub(super) struct State {
    path: PathBuf,
    durability: Durability,
    rotate_bytes: u64,
    rotate_keep: u32,
    checkpoint_every: Duration,
    file: File,
    /// (device, inode) of the file we opened, to notice it being replaced.
    id: (u64, u64),
    len: u64,
    seq: u64,
    /// The last record's hash (lowercase hex).
    prev: [u8; 64],
    key: Option<Zeroizing<Vec<u8>>>,
    /// The lines of the batch being written, reused from batch to batch (audit lines hold
    /// no value, so nothing needs wiping between batches).
    buf: Vec<u8>,
    healthy: Arc<AtomicBool>,
    last_checkpoint: Instant,
    /// Set when the file was replaced: the next batch reopens it first.
    reopen: bool,
    watch: Watch,
    /// Writes made (tests count batches with it).
    #[cfg(test)]
    pub(super) commits: u64,
    /// The thread that made the last write (tests).
    #[cfg(test)]
    pub(super) last_commit_thread: Option<std::thread::ThreadId>,
    /// When the path was last compared with the open file.
    last_check: Instant,
    recheck: Duration,
}

impl State {
    pub(super) fn new(
        cfg: &AuditConfig,
        file: File,
        len: u64,
        seq: u64,
        prev: String,
        key: Option<Zeroizing<Vec<u8>>>,
        healthy: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            path: cfg.path.clone(),
            durability: cfg.durability,
            rotate_bytes: cfg.rotate_bytes.get(),
            rotate_keep: cfg.rotate_keep,
            checkpoint_every: cfg.checkpoint_interval,
            file,
            id: (m.dev(), m.ino()),
            len,
            seq,
            prev: hex64(&prev),
            key,
            buf: Vec::new(),
            healthy,
            last_checkpoint: Instant::now(),
            reopen: false,
            watch: Watch::start(&cfg.path),
            #[cfg(test)]
            commits: 0,
            #[cfg(test)]
            last_commit_thread: None,
            last_check: Instant::now(),
            recheck: RECHECK,
        })
    }

    /// Tests: an inotify watch for `watched` (our own path, another, or none), and the path
    /// compared at least every `recheck`.
    #[cfg(test)]
    pub(super) fn set_watch(&mut self, watched: Option<&Path>, recheck: Duration) {
        self.watch = watched.map_or_else(Watch::none, Watch::start);
        self.recheck = recheck;
    }

    /// Tests: whether a watcher thread runs.
    #[cfg(test)]
    pub(super) fn watch_live(&self) -> bool {
        self.watch.live.load(Ordering::Acquire)
    }

    /// Tests: whether the watcher thread has raised its flag.
    #[cfg(test)]
    pub(super) fn change_seen(&self) -> bool {
        self.watch.changed.load(Ordering::Acquire)
    }

    /// Whether this batch must compare the path with the open file: the watch saw the name
    /// change, or there is no watch, or the last comparison is `recheck` old.
    fn check_due(&mut self) -> bool {
        let now = Instant::now();
        let changed =
            self.watch.changed.load(Ordering::Acquire) && self.watch.changed.swap(false, Ordering::AcqRel);
        if changed
            || !self.watch.live.load(Ordering::Acquire)
            || now.duration_since(self.last_check) >= self.recheck
        {
            self.last_check = now;
            return true;
        }
        false
    }

    fn err(&self, e: &std::io::Error) -> AuditError {
        AuditError::Write { path: self.path.clone(), reason: e.to_string() }
    }

    /// The last record's hash.
    fn prev(&self) -> &str {
        std::str::from_utf8(&self.prev).unwrap_or(chain::GENESIS)
    }

    /// Seals `n` records (the `i`th written by `fields(i, …)`) into lines continuing the
    /// chain, in `buf`; the state advances only on commit. Returns the last `seq` and hash;
    /// a record that cannot be serialized fails them all, and nothing is written.
    fn seal(&mut self, n: usize, mut fields: impl FnMut(usize, &mut Vec<u8>) -> FieldsResult) -> Sealed {
        let (mut seq, mut prev) = (self.seq, self.prev);
        let key = self.key.as_ref().map(|k| k.as_slice());
        self.buf.clear();
        for i in 0..n {
            seq += 1;
            let start = self.buf.len();
            let ts = humantime::format_rfc3339_micros(std::time::SystemTime::now());
            let prev_hex = std::str::from_utf8(&prev).unwrap_or(chain::GENESIS);
            if let Err(e) = record::body(&mut self.buf, seq, ts, |out| fields(i, out), prev_hex) {
                self.buf.clear();
                return Err(AuditError::Unwritable(e.to_string()));
            }
            prev = chain::seal_in_place(&mut self.buf, start, key);
        }
        Ok((seq, prev))
    }

    /// Writes the sealed lines in `buf`; on failure cuts the file back to its last whole
    /// record.
    fn commit(&mut self, seq: u64, prev: [u8; 64]) -> Result<(), AuditError> {
        let started = Instant::now();
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| if self.durability == Durability::Fsync { self.file.sync_data() } else { Ok(()) });
        let written = self.buf.len();
        if self.buf.capacity() > KEEP_BUF {
            self.buf = Vec::new();
        }
        if let Err(e) = result {
            let _ = self.file.set_len(self.len);
            return Err(self.err(&e));
        }
        crate::metrics::get().audit_written(seq - self.seq, written, started.elapsed());
        self.len += written as u64;
        #[cfg(test)]
        {
            self.commits += 1;
            self.last_commit_thread = Some(std::thread::current().id());
        }
        self.seq = seq;
        self.prev = prev;
        Ok(())
    }

    /// Writes an internal record (rotation, checkpoint, reopen) on its own.
    fn write_own(&mut self, record: &AuditRecord) -> Result<(), AuditError> {
        let (seq, prev) = self.seal(1, |_, out| record.write_fields(out))?;
        self.commit(seq, prev)
    }

    fn same_file(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// The file was removed or replaced behind our back: open the path again and say so.
    fn reopen(&mut self) -> Result<(), AuditError> {
        let file = open_append(&self.path).map_err(|e| self.err(&e))?;
        let m = file.metadata().map_err(|e| self.err(&e))?;
        self.file = file;
        self.id = (m.dev(), m.ino());
        self.len = m.len();
        let mut rec = AuditRecord::new(Event::AuditRotated);
        rec.outcome = Some(Outcome::Failed);
        rec.reason = Some(
            "the audit file was removed or replaced outside the agent; reopened, and the chain \
             continues from the last record this agent wrote"
                .into(),
        );
        self.reopen = false;
        if !self.watch.live.load(Ordering::Acquire) {
            // The watch was lost (its directory removed or moved): watch the directory again.
            self.watch = Watch::start(&self.path);
        }
        self.write_own(&rec)
    }

    /// Size rotation: audit.jsonl → .1 → .2 …, keeping `rotate_keep` old files, then an
    /// `audit.rotated` record opening the new file (its `prev` links to the old file's last).
    fn rotate(&mut self) -> Result<(), AuditError> {
        let name = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let oldest = name(self.rotate_keep);
        // The oldest kept file is about to go: say which records leave the node with it.
        let dropped = std::fs::metadata(&oldest).ok().map(|_| seq_range(&oldest));
        let _ = std::fs::remove_file(&oldest);
        if let Some(range) = &dropped {
            tracing::warn!(
                file = %oldest.display(),
                records = range.as_str(),
                "audit rotation deleted the oldest kept file: ship audit files off the node before rotate_keep is reached"
            );
        }
        for n in (1..self.rotate_keep).rev() {
            let _ = std::fs::rename(name(n), name(n + 1));
        }
        std::fs::rename(&self.path, name(1)).map_err(|e| self.err(&e))?;
        let file = open_append(&self.path).map_err(|e| self.err(&e))?;
        let m = file.metadata().map_err(|e| self.err(&e))?;
        let old_len = self.len;
        self.file = file;
        self.id = (m.dev(), m.ino());
        self.len = 0;
        let mut rec = AuditRecord::new(Event::AuditRotated);
        rec.outcome = Some(Outcome::Ok);
        // Each file opens saying its chain's mode, so a verifier without the key knows why.
        rec.chain = Some(chain::mode(self.key.is_some()).to_owned());
        let mut reason = format!(
            "previous file {} ({old_len} bytes) ends with seq {} hash {}",
            name(1).display(),
            self.seq,
            self.prev()
        );
        if let Some(range) = dropped {
            reason.push_str(&format!(
                "; deleted {} (rotate_keep = {}): records {range} have left the node",
                oldest.display(),
                self.rotate_keep
            ));
        }
        rec.reason = Some(reason);
        self.write_own(&rec)
    }

    /// A checkpoint: the chain head, in the log and in the agent's own log, so truncation of
    /// the newest records shows against a copy shipped off the node.
    fn checkpoint(&mut self) {
        let mut rec = AuditRecord::new(Event::AuditCheckpoint);
        rec.outcome = Some(Outcome::Ok);
        rec.reason = Some(format!("chain head before this record: seq {} hash {}", self.seq, self.prev()));
        match self.write_own(&rec) {
            Ok(()) => tracing::info!(seq = self.seq, head = self.prev(), "audit checkpoint"),
            Err(e) => tracing::error!(error = %e, "cannot write audit checkpoint"),
        }
        self.last_checkpoint = Instant::now();
    }

    /// Writes `n` records in one go (the `i`th written by `fields(i, …)`); returns the first
    /// one's `seq`.
    fn write(
        &mut self,
        n: usize,
        fields: impl FnMut(usize, &mut Vec<u8>) -> FieldsResult,
    ) -> Result<u64, AuditError> {
        let result = self.prepare().and_then(|()| {
            let (seq, prev) = self.seal(n, fields)?;
            let first = self.seq + 1;
            self.commit(seq, prev).map(|()| first)
        });
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            crate::metrics::get().audit_failed();
        }
        result
    }

    /// Writes one record, serialized straight into the batch buffer.
    pub(super) fn write_one(&mut self, record: &dyn Fields) -> Result<u64, AuditError> {
        self.write(1, |_, out| record.write_fields(out))
    }

    fn handle(&mut self, batch: Vec<Job>) {
        let result = self.write(batch.len(), |i, out| batch[i].fields.write_fields(out));
        for (i, job) in batch.into_iter().enumerate() {
            let _ = job.reply.send(result.clone().map(|first| first + i as u64));
        }
    }

    /// Before a batch: reopen a replaced file, rotate a full one.
    fn prepare(&mut self) -> Result<(), AuditError> {
        if self.reopen {
            self.reopen()?;
        }
        if self.check_due() && !self.same_file() {
            self.reopen = true;
            return Err(AuditError::Replaced { path: self.path.clone() });
        }
        if self.len >= self.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }
}

/// What a record's [`Fields::write_fields`] returns.
type FieldsResult = Result<(), record::Unwritable>;

/// Sealed lines' last `seq` and hash.
type Sealed = Result<(u64, [u8; 64]), AuditError>;

/// A hash as the state keeps it; anything but 64 hex digits (cannot happen: it comes from
/// a verified line or is the genesis value) starts from genesis.
fn hex64(hash: &str) -> [u8; 64] {
    let mut out = [b'0'; 64];
    if hash.len() == 64 {
        out.copy_from_slice(hash.as_bytes());
    }
    out
}

/// `seq A..B` of a log file's first and last whole records (read from its two ends), or
/// what could not be read.
fn seq_range(path: &Path) -> String {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let seq_of = |line: &[u8]| serde_json::from_slice::<AuditRecord>(line).ok().map(|r| r.seq);
    let Ok(mut f) = File::open(path) else { return "seq unknown (unreadable file)".into() };
    let mut first = Vec::new();
    let _ = std::io::BufReader::new(&mut f).read_until(b'\n', &mut first);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024))).and_then(|_| f.read_to_end(&mut tail));
    let last = tail.strip_suffix(b"\n").unwrap_or(&tail).rsplit(|&b| b == b'\n').next().unwrap_or(&[]);
    match (seq_of(first.strip_suffix(b"\n").unwrap_or(&first)), seq_of(last)) {
        (Some(a), Some(b)) => format!("seq {a}..{b}"),
        _ => "seq unknown (unparsable file)".into(),
    }
}

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
            let mut fields = Vec::with_capacity(512);
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
        let mut fields = Vec::with_capacity(512);
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
