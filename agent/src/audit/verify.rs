//! `kvbroker audit verify`: checks the hash chain across one or more files, in order.
//!
//! Reports the first bad place as `FILE:LINE: KIND: detail`, where KIND is what the damage
//! looks like: `modified` (a line's hash does not fit its body), `removed` (records missing
//! before this one), `reordered` (a record appears after one it should precede), `inserted`
//! (a record that does not continue the chain), `truncated` (a partial last line).

use std::path::{Path, PathBuf};

use kvbroker_proto::AuditRecord;

use super::chain;

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub files: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub head: String,
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {kind}: {detail}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    pub line: usize,
    pub kind: &'static str,
    pub detail: String,
}

/// Verifies `paths` as one chain, in the order given; `key` for logs in keyed (HMAC) mode.
pub fn verify(paths: &[PathBuf], key: Option<&[u8]>) -> Result<Verified, VerifyError> {
    verify_with(paths, key, &|p: &Path| std::fs::read(p))
}

/// [`verify`] over bytes given for one file, without touching the filesystem (the fuzz
/// target `audit_verify`, docs/fuzzing.md). `name` only appears in errors.
pub fn verify_bytes(name: &Path, bytes: &[u8], key: Option<&[u8]>) -> Result<Verified, VerifyError> {
    verify_with(&[name.to_owned()], key, &|_: &Path| Ok(bytes.to_vec()))
}

type Read<'a> = dyn Fn(&Path) -> std::io::Result<Vec<u8>> + 'a;

fn verify_with(paths: &[PathBuf], key: Option<&[u8]>, read: &Read<'_>) -> Result<Verified, VerifyError> {
    let mut v = Verified { records: 0, files: 0, first_seq: 0, last_seq: 0, head: String::new() };
    let mut prev: Option<(u64, String)> = None;
    for path in paths {
        let err = |line: usize, kind: &'static str, detail: String| VerifyError {
            path: path.clone(),
            line,
            kind,
            detail,
        };
        let bytes = read(path).map_err(|e| err(0, "unreadable", e.to_string()))?;
        v.files += 1;
        for (i, raw) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let Some(line) = raw.strip_suffix(b"\n") else {
                return Err(err(n, "truncated", "the last line is incomplete".into()));
            };
            let Some((body, claimed)) = chain::unseal(line) else {
                return Err(err(n, "modified", "the line does not end in a hash field".into()));
            };
            if !chain::same(&chain::hash_of(&body, key), claimed) {
                if key.is_none() && says_keyed(paths, read) {
                    return Err(err(n, "keyed", "this log is keyed: give --key-file".into()));
                }
                return Err(err(n, "modified", "the record's hash does not match its content".into()));
            }
            let rec: AuditRecord = serde_json::from_slice(line)
                .map_err(|e| err(n, "modified", format!("not an audit record: {e}")))?;
            match &prev {
                None => v.first_seq = rec.seq,
                Some((pseq, phash)) => check_link(*pseq, phash, &rec).map_err(|(k, d)| err(n, k, d))?,
            }
            v.records += 1;
            v.last_seq = rec.seq;
            v.head = claimed.to_owned();
            prev = Some((rec.seq, claimed.to_owned()));
        }
    }
    Ok(v)
}

/// Whether any record of `paths` says its chain is keyed (`"chain":"hmac-sha256"` on
/// `agent.start` or `audit.rotated`). Only consulted when a hash fails without a key, to
/// tell "give the key" from "modified"; the records are not trusted for anything else.
fn says_keyed(paths: &[PathBuf], read: &Read<'_>) -> bool {
    paths.iter().any(|p| {
        read(p).is_ok_and(|bytes| {
            bytes.split(|&b| b == b'\n').any(|line| {
                serde_json::from_slice::<AuditRecord>(line)
                    .is_ok_and(|r| r.chain.as_deref() == Some(chain::KEYED))
            })
        })
    })
}

fn check_link(pseq: u64, phash: &str, rec: &AuditRecord) -> Result<(), (&'static str, String)> {
    let expected = pseq + 1;
    if rec.prev == phash && rec.seq == expected {
        return Ok(());
    }
    if rec.prev == chain::GENESIS {
        return Err(("inserted", format!("a new chain starts at seq {} inside the log", rec.seq)));
    }
    Err(match rec.seq {
        s if s > expected => {
            ("removed", format!("expected seq {expected}, found {s}: {} record(s) missing", s - expected))
        }
        s if s < expected => ("reordered", format!("expected seq {expected}, found {s}")),
        s => ("inserted", format!("seq {s} does not continue the chain (prev differs)")),
    })
}

/// The `n`th rotated sibling of the log at `base`: `base.n` (`audit.jsonl.1` is the newest).
pub(crate) fn rotated(base: &Path, n: u32) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Lists `base` and its rotated siblings (`base.1`, `base.2`, …) oldest first.
pub fn with_rotated(base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut n = 1;
    loop {
        let p = rotated(base, n);
        if !p.exists() {
            break;
        }
        out.push(p);
        n += 1;
    }
    out.reverse();
    out.push(base.to_owned());
    out
}
