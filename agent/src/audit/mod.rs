//! The audit log: one JSON line per event, hash-chained, written before the answer.
//!
//! In `write` mode, `Auditor::append` writes the record itself when no other write is in
//! progress (the common case: one `write(2)`, no thread hop), and then the records other
//! requests queued meanwhile, each batch in one `write(2)`. A request that finds a write in
//! progress queues its record and waits — at most `write_timeout` — for it to be in the file.
//! Under load (`crate::gather`: others on their way) a request queues its record first,
//! takes the writing turn and steps aside once, so the records of requests that arrive
//! together share one `write(2)`. In `fsync` mode every record goes to the writer thread
//! (`writer`), which writes and fsyncs what queued meanwhile as one batch (group commit), so
//! no runtime worker waits on the disk. A hung disk can stall the one request writing at
//! that moment; every other request gives up after `write_timeout` with 503.
//! A record that cannot be written fails its request closed (503 `AuditUnavailable`); a
//! failed write is rolled back to the last whole line, so the chain stays intact, and the
//! writer recovers by itself when writing works again (a removed or replaced file is
//! reopened, with a record saying so).
//!
//! Records never hold a value or a token: the record type has no field that could.

pub(crate) mod chain;
pub mod query;
pub(crate) mod record;
pub(crate) mod refusals;
pub mod verify;
mod writer;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use kvbroker_proto::AuditRecord;
use zeroize::Zeroizing;

use crate::config::AuditConfig;

/// Why a record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error(transparent)]
    Untrusted(#[from] crate::trust::Untrusted),
    #[error("{path}: cannot open audit log: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("{path}: cannot write audit record: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(
        "{path}: audit log was removed or replaced while the agent ran; reopened, this record was not written"
    )]
    Replaced { path: PathBuf },
    #[error("audit writer did not confirm the record within {0:?}")]
    Timeout(std::time::Duration),
    #[error("audit writer has stopped")]
    Stopped,
    #[error("{0}; it was not written")]
    Unwritable(String),
    #[error("{path}: cannot use the audit HMAC key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "{path}: another agent (pid {holder}) is writing this audit log; stop it, or give this agent its own [audit] path"
    )]
    Locked { path: PathBuf, holder: String },
}

/// The audit log. Cheap to share behind an `Arc`.
pub(crate) struct Auditor {
    core: Arc<writer::Core>,
    /// Hands the queue to the writer thread.
    tx: std::sync::mpsc::Sender<()>,
    /// The writer thread, to tell whether it still runs (the systemd watchdog asks).
    writer: std::thread::JoinHandle<()>,
    healthy: Arc<AtomicBool>,
    path: PathBuf,
    wait: std::time::Duration,
    /// `<audit>.lock`, flocked for as long as this agent writes the log: one writer per log.
    _lock: File,
    keyed: bool,
}

/// Where [`Auditor::append_fields`] left a record.
enum Written<'a> {
    Done(Result<u64, AuditError>),
    Queued(tokio::sync::oneshot::Receiver<Result<u64, AuditError>>),
    /// Queued first, with the writing turn if it was free.
    Gather(tokio::sync::oneshot::Receiver<Result<u64, AuditError>>, Option<writer::Turn<'a>>),
}

/// What opening found at the end of an existing log.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// A note for `agent.start` when the tail was damaged and handled.
    pub(crate) note: Option<String>,
}

impl Auditor {
    /// Opens (or creates) the log, continues its chain, and starts the writer thread.
    pub(crate) fn open(cfg: &AuditConfig) -> Result<(Auditor, Resumed), AuditError> {
        let key = match &cfg.hmac_key_file {
            Some(f) => Some(read_key(f)?),
            None => None,
        };
        Self::open_with_key(cfg, key)
    }

    /// [`Auditor::open`] with the HMAC key already in hand (e.g. from Key Vault).
    pub(crate) fn open_with_key(
        cfg: &AuditConfig,
        key: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<(Auditor, Resumed), AuditError> {
        let path = cfg.path.clone();
        let open_err = |e: std::io::Error| AuditError::Open { path: path.clone(), reason: e.to_string() };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        // Every key passes here, wherever it was read from; trimming twice changes nothing.
        let key = key
            .map(key_from_bytes)
            .transpose()
            .map_err(|e| AuditError::Key { path: path.clone(), reason: e.to_string() })?;
        let lock = lock_log(&path)?;
        let mut resumed = Resumed::default();
        let mut file = open_append(&path).map_err(open_err)?;
        let (seq, prev, len) =
            match read_tail(&mut file, key.as_ref().map(|k| k.as_slice())).map_err(open_err)? {
                Tail::Empty => after_rotation(&path, key.as_ref().map(|k| k.as_slice()), &mut resumed),
                Tail::Record { seq, hash, end } => (seq, hash, end),
                Tail::Partial { seq, hash, end, total } => {
                    let aside = aside_path(&path, "partial");
                    keep_partial(&mut file, end, total, &aside).map_err(open_err)?;
                    resumed.note = Some(format!(
                        "audit log ended in a partial line ({} bytes), kept at {}; removed from the log",
                        total - end,
                        aside.display()
                    ));
                    (seq, hash, end)
                }
                Tail::Damaged => {
                    let aside = aside_path(&path, "damaged");
                    std::fs::rename(&path, &aside).map_err(open_err)?;
                    file = open_append(&path).map_err(open_err)?;
                    resumed.note = Some(format!(
                        "audit log tail could not be read as a chained record; file kept at {}; \
                     a new chain segment starts here",
                        aside.display()
                    ));
                    (0, chain::GENESIS.to_owned(), 0)
                }
            };
        let healthy = Arc::new(AtomicBool::new(true));
        let keyed = key.is_some();
        let state =
            writer::State::new(cfg, file, len, seq, prev, key, Arc::clone(&healthy)).map_err(open_err)?;
        let core = writer::Core::new(state);
        let (tx, writer) = writer::spawn(Arc::clone(&core)).map_err(open_err)?;
        Ok((
            Auditor { core, tx, writer, healthy, path, wait: cfg.write_timeout, _lock: lock, keyed },
            resumed,
        ))
    }

    /// Writes `record` (filling in `seq`, `ts`, `prev` and `hash`); returns its `seq` once
    /// the record is in the file. Waits at most `write_timeout`.
    pub(crate) async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.append_fields(&record, false).await
    }

    /// [`append`](Self::append) for a record in any [`Fields`](record::Fields) form (an allowed read's
    /// borrowed [`record::ReadRecord`]). The record is written, or serialized into the
    /// queue, before this returns; the future only waits for the queue's writer. With
    /// `others_ready` (other requests are on their way: `gather`), the record waits
    /// for theirs to share its `write(2)`.
    pub(crate) fn append_fields(
        &self,
        record: &dyn record::Fields,
        others_ready: bool,
    ) -> impl Future<Output = Result<u64, AuditError>> + Send + '_ {
        let path = if self.core.hands_off() {
            // `fsync`: the writer thread writes and fsyncs what queues meanwhile as one
            // batch; the runtime worker goes on serving instead of waiting for the disk.
            let (rx, turn) = self.core.enqueue(record, &self.tx);
            drop(turn);
            Written::Queued(rx)
        } else if others_ready {
            // Queue this record and, holding the writing turn, step aside once so the
            // requests this worker thread has ready queue theirs behind it; then one
            // write(2) carries them all.
            let (rx, turn) = self.core.enqueue(record, &self.tx);
            Written::Gather(rx, turn)
        } else {
            // Nobody else is writing: write it here — serialized straight into the writer's
            // buffer, one write(2), no thread hop. Otherwise the record queues for whoever
            // is writing, who writes the queue together.
            match self.core.write_or_queue(record, &self.tx) {
                Ok(written) => Written::Done(written),
                Err(rx) => Written::Queued(rx),
            }
        };
        async move {
            match path {
                Written::Done(written) => written,
                Written::Queued(rx) => self.queued(rx).await,
                Written::Gather(rx, turn) => {
                    if let Some(turn) = turn {
                        crate::gather::StepAside::new().await;
                        turn.write_queued();
                    }
                    self.queued(rx).await
                }
            }
        }
    }

    async fn queued(
        &self,
        rx: tokio::sync::oneshot::Receiver<Result<u64, AuditError>>,
    ) -> Result<u64, AuditError> {
        let mut rx = rx;
        // Often written already (a request that led the gathered write): no timer for it.
        match rx.try_recv() {
            Ok(r) => return r,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return Err(AuditError::Stopped),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => {
                self.healthy.store(false, Ordering::Relaxed);
                crate::metrics::get().audit_failed();
                Err(AuditError::Timeout(self.wait))
            }
        }
    }

    /// False after a failed write, until a write succeeds again.
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// False once the writer thread has ended (it only ends by panicking while the auditor
    /// lives): records queued under contention would then never be written.
    pub(crate) fn writer_alive(&self) -> bool {
        !self.writer.is_finished()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The chain's mode, for `agent.start` (`sha256` or `hmac-sha256`).
    pub(crate) fn chain_mode(&self) -> &'static str {
        chain::mode(self.keyed)
    }
}

/// Reads an HMAC key file, refusing one that group or others can read.
pub(crate) fn read_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, AuditError> {
    let key_err = |reason: String| AuditError::Key { path: path.to_owned(), reason };
    crate::trust::check_file(path, "HMAC key file")?;
    let meta = std::fs::metadata(path).map_err(|e| key_err(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(key_err("readable by group or others: run chmod 600 on it".into()));
    }
    // At most 64 KiB: a key is tens of bytes; a FIFO or a device is refused, not read.
    let key =
        Zeroizing::new(crate::trust::read_regular_bytes(path, 64 << 10).map_err(|e| key_err(e.to_string()))?);
    key_from_bytes(key).map_err(|e| key_err(e.to_string()))
}

/// The shortest HMAC key accepted, in bytes (after trimming).
const MIN_KEY_BYTES: usize = 16;

/// An HMAC key read from a file or a vault was too short to protect the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the HMAC key is shorter than {MIN_KEY_BYTES} bytes: use at least {MIN_KEY_BYTES} random bytes")]
pub(crate) struct KeyTooShort;

/// Makes raw key bytes (a key file's contents, a vault secret) into the chain key: trailing
/// whitespace is dropped (editors and `echo` add a newline), and a short key is refused.
/// The key's bytes are never copied, so the one zeroizing buffer is all there is.
pub(crate) fn key_from_bytes(mut key: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, KeyTooShort> {
    while key.last().is_some_and(u8::is_ascii_whitespace) {
        key.pop();
    }
    if key.len() < MIN_KEY_BYTES {
        return Err(KeyTooShort);
    }
    Ok(key)
}

/// Takes the log's writer lock: `flock(LOCK_EX|LOCK_NB)` on `<audit>.lock`, which then
/// holds our pid so that a second agent can name us. The kernel drops the lock when the
/// process dies, so a stale file (after `kill -9`) never blocks a restart.
fn lock_log(path: &Path) -> Result<File, AuditError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let open_err = |e: std::io::Error| AuditError::Open { path: lock_path.clone(), reason: e.to_string() };
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&lock_path)
        .map_err(open_err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder =
                if !holder.is_empty() && holder.len() <= 10 && holder.bytes().all(|b| b.is_ascii_digit()) {
                    holder.to_owned()
                } else {
                    "unknown".to_owned()
                };
            return Err(AuditError::Locked { path: path.to_owned(), holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(open_err(e)),
    }
    lock.set_len(0).and_then(|()| writeln!(lock, "{}", std::process::id())).map_err(open_err)?;
    Ok(lock)
}

pub(crate) fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).append(true).create(true).mode(0o640).open(path)
}

fn aside_path(path: &Path, what: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}-{stamp}"));
    path.with_file_name(name)
}

enum Tail {
    Empty,
    Record {
        seq: u64,
        hash: String,
        end: u64,
    },
    /// Whole records up to `end`, then `total - end` bytes of a line never finished.
    Partial {
        seq: u64,
        hash: String,
        end: u64,
        total: u64,
    },
    Damaged,
}

/// Where the chain of an empty live file starts. Beside a rotated `.1` it goes on from that
/// file's last record: rotation renames the live file first and writes the new file's first
/// record after, so an agent stopped (or a disk that filled) in between leaves the live file
/// empty — starting a new chain then would read, to `audit verify`, as a chain inserted into
/// the log. Without a readable `.1` (a new log) it starts at genesis.
fn after_rotation(path: &Path, key: Option<&[u8]>, resumed: &mut Resumed) -> (u64, String, u64) {
    let rotated = verify::rotated(path, 1);
    // Only a regular file: a FIFO put there would hold the start forever.
    match crate::trust::open_regular(&rotated).and_then(|(mut f, _)| read_tail(&mut f, key)) {
        Ok(Tail::Record { seq, hash, .. } | Tail::Partial { seq, hash, .. }) if seq > 0 => {
            resumed.note = Some(format!(
                "the audit log was empty, as a rotation leaves it when the agent stops or the disk \
                 fills before the new file's first record; its chain goes on from {} (seq {seq})",
                rotated.display()
            ));
            (seq, hash, 0)
        }
        _ => (0, chain::GENESIS.to_owned(), 0),
    }
}

/// Reads the last whole record of the file (looking at most 1 MiB back).
fn read_tail(file: &mut File, key: Option<&[u8]>) -> std::io::Result<Tail> {
    let total = file.metadata()?.len();
    if total == 0 {
        return Ok(Tail::Empty);
    }
    let window = total.min(1 << 20);
    file.seek(SeekFrom::Start(total - window))?;
    let mut buf = Vec::with_capacity(usize::try_from(window).unwrap_or(0));
    file.read_to_end(&mut buf)?;
    let complete = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if window == total => 0,
        None => return Ok(Tail::Damaged),
    };
    let end = total - window + complete as u64;
    let whole = &buf[..complete];
    let last = whole[..whole.len().saturating_sub(1)].rsplit(|&b| b == b'\n').next().unwrap_or(&[]);
    let parsed = if complete == 0 { None } else { parse_chained(last, key) };
    match (parsed, end == total) {
        (Some((seq, hash)), true) => Ok(Tail::Record { seq, hash, end }),
        (Some((seq, hash)), false) => Ok(Tail::Partial { seq, hash, end, total }),
        (None, false) if complete == 0 => {
            Ok(Tail::Partial { seq: 0, hash: chain::GENESIS.to_owned(), end: 0, total })
        }
        (None, _) => Ok(Tail::Damaged),
    }
}

/// `seq` and `hash` of a line whose hash is right for its body.
fn parse_chained(line: &[u8], key: Option<&[u8]>) -> Option<(u64, String)> {
    let (body, claimed) = chain::unseal(line)?;
    if chain::hash_of(&body, key) != claimed {
        return None;
    }
    let rec: AuditRecord = serde_json::from_slice(line).ok()?;
    Some((rec.seq, claimed.to_owned()))
}

fn keep_partial(file: &mut File, end: u64, total: u64, aside: &Path) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(end))?;
    let mut partial = Vec::with_capacity(usize::try_from(total - end).unwrap_or(0));
    file.read_to_end(&mut partial)?;
    let mut out = OpenOptions::new().write(true).create_new(true).mode(0o640).open(aside)?;
    out.write_all(&partial)?;
    out.sync_all()?;
    file.set_len(end)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
