//! The audit log: one JSON line per event, hash-chained, written before the answer.
//!
//! `Auditor::append` returns only once the record is in the file (and fsynced in `fsync`
//! mode); the caller sends its answer after that, so a record that cannot be written fails
//! the request closed (503 `AuditUnavailable`). A failed write is rolled back to the last
//! whole line, so the file never holds a torn record and the chain stays intact.
//!
//! Records never hold a value or a token: the record type has no field that could.

pub(crate) mod chain;
pub mod verify;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use kvbroker_proto::AuditRecord;

use crate::config::{AuditConfig, Durability};

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("{path}: cannot open audit log: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot write audit record: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: audit log was removed or replaced while the agent ran")]
    Replaced { path: PathBuf },
    #[error("cannot serialize audit record: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// The audit log writer. Cheap to share behind an `Arc`.
pub(crate) struct Auditor {
    path: PathBuf,
    durability: Durability,
    state: Mutex<State>,
    healthy: AtomicBool,
}

struct State {
    file: File,
    /// (device, inode) of the file we opened, to notice it being replaced.
    id: (u64, u64),
    /// Length of the file up to the last whole record we wrote.
    len: u64,
    seq: u64,
    prev: String,
}

/// What opening found at the end of an existing log.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// A note for `agent.start` when the tail was damaged and handled.
    pub(crate) note: Option<String>,
}

impl Auditor {
    /// Opens (or creates) the log and continues its chain.
    pub(crate) fn open(cfg: &AuditConfig) -> Result<(Auditor, Resumed), AuditError> {
        let path = cfg.path.clone();
        let open_err = |source| AuditError::Open { path: path.clone(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let mut resumed = Resumed::default();
        let mut file = open_append(&path).map_err(open_err)?;
        let (seq, prev, len) = match read_tail(&mut file).map_err(open_err)? {
            Tail::Empty => (0, chain::GENESIS.to_owned(), 0),
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
        let meta = file.metadata().map_err(open_err)?;
        let state = State { file, id: (meta.dev(), meta.ino()), len, seq, prev };
        let auditor = Auditor {
            path,
            durability: cfg.durability,
            state: Mutex::new(state),
            healthy: AtomicBool::new(true),
        };
        Ok((auditor, resumed))
    }

    /// Writes `record` (filling in `seq`, `ts`, `prev` and `hash`); returns its `seq`.
    pub(crate) fn append(&self, mut record: AuditRecord) -> Result<u64, AuditError> {
        let result = self.append_inner(&mut record);
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    fn append_inner(&self, record: &mut AuditRecord) -> Result<u64, AuditError> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.check_same_file(&st)?;
        record.seq = st.seq + 1;
        record.ts = now_rfc3339();
        record.prev = st.prev.clone();
        record.hash = None;
        let body = serde_json::to_vec(&*record)?;
        let (line, hash) = chain::seal(body);
        let write_err = |source| AuditError::Write { path: self.path.clone(), source };
        if let Err(e) = st.file.write_all(&line) {
            // Roll back a torn write so the next record starts on a line of its own.
            let _ = st.file.set_len(st.len);
            return Err(write_err(e));
        }
        if self.durability == Durability::Fsync {
            if let Err(e) = st.file.sync_data() {
                let _ = st.file.set_len(st.len);
                return Err(write_err(e));
            }
        }
        st.len += line.len() as u64;
        st.seq = record.seq;
        st.prev = hash;
        Ok(record.seq)
    }

    fn check_same_file(&self, st: &State) -> Result<(), AuditError> {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == st.id => Ok(()),
            _ => Err(AuditError::Replaced { path: self.path.clone() }),
        }
    }

    /// False after a failed write, until a write succeeds again.
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).append(true).create(true).mode(0o640).open(path)
}

/// RFC 3339 in UTC with microseconds, as in SPEC.md.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
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

/// Reads the last whole record of the file (looking at most 1 MiB back).
fn read_tail(file: &mut File) -> std::io::Result<Tail> {
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
    let parsed = if complete == 0 { None } else { parse_chained(last) };
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
fn parse_chained(line: &[u8]) -> Option<(u64, String)> {
    let (body, claimed) = chain::unseal(line)?;
    if chain::hash_of(&body) != claimed {
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
