//! The audit writer thread: group commit, rollback of torn writes, size rotation, reopening
//! a removed or replaced file, and periodic checkpoints.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, Event, Outcome};
use zeroize::Zeroizing;

use super::{AuditError, chain, now_rfc3339, open_append};
use crate::config::{AuditConfig, Durability};

pub(super) struct Job {
    pub(super) record: AuditRecord,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

/// Records written in one go, at most.
const MAX_BATCH: usize = 1024;

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
    prev: String,
    key: Option<Zeroizing<Vec<u8>>>,
    healthy: Arc<AtomicBool>,
    last_checkpoint: Instant,
    /// Set when the file was replaced: the next batch reopens it first.
    reopen: bool,
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
            prev,
            key,
            healthy,
            last_checkpoint: Instant::now(),
            reopen: false,
        })
    }

    fn err(&self, e: &std::io::Error) -> AuditError {
        AuditError::Write { path: self.path.clone(), reason: e.to_string() }
    }

    /// Seals `records` into lines continuing the chain; the state advances only on commit.
    fn seal(&self, records: &mut [AuditRecord]) -> (Vec<u8>, u64, String) {
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        let mut buf = Vec::with_capacity(records.len() * 512);
        for r in records.iter_mut() {
            seq += 1;
            r.seq = seq;
            r.ts = now_rfc3339();
            r.prev = prev;
            r.hash = None;
            let body = serde_json::to_vec(&*r).unwrap_or_default();
            let (line, hash) = chain::seal(body, self.key.as_ref().map(|k| k.as_slice()));
            buf.extend_from_slice(&line);
            prev = hash;
        }
        (buf, seq, prev)
    }

    /// Writes sealed lines; on failure cuts the file back to its last whole record.
    fn commit(&mut self, buf: &[u8], seq: u64, prev: String) -> Result<(), AuditError> {
        let started = Instant::now();
        let result = self
            .file
            .write_all(buf)
            .and_then(|()| if self.durability == Durability::Fsync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = result {
            let _ = self.file.set_len(self.len);
            return Err(self.err(&e));
        }
        crate::metrics::get().audit_written(seq - self.seq, buf.len(), started.elapsed());
        self.len += buf.len() as u64;
        self.seq = seq;
        self.prev = prev;
        Ok(())
    }

    /// Writes internal records (rotation, checkpoint, reopen) on their own.
    fn write_own(&mut self, mut records: Vec<AuditRecord>) -> Result<(), AuditError> {
        let (buf, seq, prev) = self.seal(&mut records);
        self.commit(&buf, seq, prev)
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
        self.write_own(vec![rec])
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
            self.prev
        );
        if let Some(range) = dropped {
            reason.push_str(&format!(
                "; deleted {} (rotate_keep = {}): records {range} have left the node",
                oldest.display(),
                self.rotate_keep
            ));
        }
        rec.reason = Some(reason);
        self.write_own(vec![rec])
    }

    /// A checkpoint: the chain head, in the log and in the agent's own log, so truncation of
    /// the newest records shows against a copy shipped off the node.
    fn checkpoint(&mut self) {
        let mut rec = AuditRecord::new(Event::AuditCheckpoint);
        rec.outcome = Some(Outcome::Ok);
        rec.reason = Some(format!("chain head before this record: seq {} hash {}", self.seq, self.prev));
        match self.write_own(vec![rec]) {
            Ok(()) => tracing::info!(seq = self.seq, head = self.prev.as_str(), "audit checkpoint"),
            Err(e) => tracing::error!(error = %e, "cannot write audit checkpoint"),
        }
        self.last_checkpoint = Instant::now();
    }

    /// Writes `records` in one go; returns the first one's `seq`.
    pub(super) fn write(&mut self, mut records: Vec<AuditRecord>) -> Result<u64, AuditError> {
        let result = self.prepare().and_then(|()| {
            let (buf, seq, prev) = self.seal(&mut records);
            let first = self.seq + 1;
            self.commit(&buf, seq, prev).map(|()| first)
        });
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            crate::metrics::get().audit_failed();
        }
        result
    }

    fn handle(&mut self, mut batch: Vec<Job>) {
        let records = batch
            .iter_mut()
            .map(|j| std::mem::replace(&mut j.record, AuditRecord::new(Event::AgentStart)))
            .collect();
        let result = self.write(records);
        for (i, job) in batch.into_iter().enumerate() {
            let _ = job.reply.send(result.clone().map(|first| first + i as u64));
        }
    }

    /// Before a batch: reopen a replaced file, rotate a full one.
    fn prepare(&mut self) -> Result<(), AuditError> {
        if self.reopen {
            self.reopen()?;
        }
        if !self.same_file() {
            self.reopen = true;
            return Err(AuditError::Replaced { path: self.path.clone() });
        }
        if self.len >= self.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }
}

/// `seq A..B` of a log file's first and last whole records (read from its two ends), or
/// what could not be read.
fn seq_range(path: &std::path::Path) -> String {
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

pub(super) type Shared = Arc<std::sync::Mutex<State>>;

pub(super) fn spawn(state: Shared) -> std::io::Result<(Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let thread = std::thread::Builder::new().name("kvbroker-audit".into()).spawn(move || run(&state, &rx))?;
    Ok((tx, thread))
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(state: &Shared, rx: &Receiver<Job>) {
    loop {
        let wait = {
            let s = lock(state);
            s.checkpoint_every.saturating_sub(s.last_checkpoint.elapsed())
        };
        let first = match rx.recv_timeout(wait) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => {
                lock(state).checkpoint();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        lock(state).handle(batch);
    }
}
