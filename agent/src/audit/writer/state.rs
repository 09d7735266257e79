//! The writer state: the open file, the chain head, sealing and committing batches,
//! reopening a replaced file, rotation and checkpoints.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, Event, Outcome};
use zeroize::Zeroizing;

use super::watch::Watch;
use super::{Job, KEEP_BUF, RECHECK};
use crate::audit::record::{self, Fields};
use crate::audit::{AuditError, chain, open_append};
use crate::config::{AuditConfig, Durability};

pub(in crate::audit) struct State {
    path: PathBuf,
    pub(super) durability: Durability,
    rotate_bytes: u64,
    rotate_keep: u32,
    pub(super) checkpoint_every: Duration,
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
    pub(super) last_checkpoint: Instant,
    /// Set when the file was replaced: the next batch reopens it first.
    reopen: bool,
    watch: Watch,
    /// Writes made (tests count batches with it).
    #[cfg(test)]
    pub(in crate::audit) commits: u64,
    /// The thread that made the last write (tests).
    #[cfg(test)]
    pub(in crate::audit) last_commit_thread: Option<std::thread::ThreadId>,
    /// When the path was last compared with the open file.
    last_check: Instant,
    recheck: Duration,
}

impl State {
    pub(in crate::audit) fn new(
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
    pub(in crate::audit) fn set_watch(&mut self, watched: Option<&Path>, recheck: Duration) {
        self.watch = watched.map_or_else(Watch::none, Watch::start);
        self.recheck = recheck;
    }

    /// Tests: whether a watcher thread runs.
    #[cfg(test)]
    pub(in crate::audit) fn watch_live(&self) -> bool {
        self.watch.live.load(Ordering::Acquire)
    }

    /// Tests: whether the watcher thread has raised its flag.
    #[cfg(test)]
    pub(in crate::audit) fn change_seen(&self) -> bool {
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
        // A file put in the log's place since the last check is not ours to rotate: taking
        // it as `.1` would say our records end there. It is a replacement like any other
        // (fail closed, reopen at the next batch); one `stat` per rotation.
        if !self.same_file() {
            self.reopen = true;
            return Err(AuditError::Replaced { path: self.path.clone() });
        }
        let name = |n: u32| super::super::verify::rotated(&self.path, n);
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
    pub(super) fn checkpoint(&mut self) {
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

    pub(super) fn handle(&mut self, batch: Vec<Job>) {
        let result = self.write(batch.len(), |i, out| batch[i].fields.write_fields(out));
        for (i, job) in batch.into_iter().enumerate() {
            let _ = job.reply.send(result.clone().map(|first| first + i as u64));
            super::spare::give_back(job.fields);
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
