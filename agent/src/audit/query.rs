//! `kvbroker audit query` and `kvbroker audit tail`: who read what, when, under which rule.
//! Reads only the records (never writes); prints names, uids, units and reasons — the log
//! holds no values, so neither does this output.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kvbroker_proto::{AuditRecord, Outcome};

/// What to select.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// `NAME` or `VAULT/NAME`, case-insensitive; `*` and `?` allowed.
    pub secret: Option<String>,
    pub uid: Option<u32>,
    pub outcome: Option<String>,
    /// RFC 3339 time, or a duration back from now (`1h`, `30m`).
    pub since: Option<String>,
}

/// Why a query could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}: not an audit record: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error(
        "--since {0:?}: give an RFC 3339 time (2026-11-22T10:00:00Z) or a duration back from now (1h, 30m)"
    )]
    Since(String),
    #[error("--outcome {0:?}: one of allowed, denied, error, ok, failed")]
    Outcome(String),
}

struct Compiled {
    secret: Option<crate::policy::Glob>,
    uid: Option<u32>,
    outcome: Option<Outcome>,
    since: Option<SystemTime>,
}

fn compile(f: &Filter) -> Result<Compiled, QueryError> {
    let since = match &f.since {
        None => None,
        Some(s) => Some(match humantime::parse_rfc3339_weak(s) {
            Ok(t) => t,
            Err(_) => {
                let d = crate::config::parse_duration(s).map_err(|_| QueryError::Since(s.clone()))?;
                SystemTime::now().checked_sub(d).ok_or_else(|| QueryError::Since(s.clone()))?
            }
        }),
    };
    let outcome = match f.outcome.as_deref() {
        None => None,
        Some(o) => Some(
            serde_json::from_value::<Outcome>(serde_json::Value::String(o.to_ascii_lowercase()))
                .map_err(|_| QueryError::Outcome(o.to_owned()))?,
        ),
    };
    let secret = f.secret.as_ref().map(|s| {
        let s = s.to_ascii_lowercase();
        crate::policy::Glob::new(&if s.contains('/') { s } else { format!("*/{s}") })
    });
    Ok(Compiled { secret, uid: f.uid, outcome, since })
}

impl Compiled {
    fn keeps(&self, r: &AuditRecord) -> bool {
        if let Some(g) = &self.secret {
            match &r.secret {
                Some(s) => {
                    if !g.matches(&format!("{}/{}", s.vault, s.name).to_ascii_lowercase()) {
                        return false;
                    }
                }
                None => return false,
            }
        }
        if self.uid.is_some() && r.peer.as_ref().map(|p| p.uid) != self.uid {
            return false;
        }
        if self.outcome.is_some() && r.outcome != self.outcome {
            return false;
        }
        if let Some(since) = self.since {
            match humantime::parse_rfc3339_weak(&r.ts) {
                Ok(t) if t >= since => {}
                _ => return false,
            }
        }
        true
    }
}

/// Reads every record of `files`, in order, with its raw line.
fn records(files: &[PathBuf]) -> Result<Vec<(AuditRecord, String)>, QueryError> {
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| QueryError::Read { path: path.clone(), reason: e.to_string() })?;
        for (i, line) in text.lines().enumerate() {
            let r: AuditRecord = serde_json::from_str(line).map_err(|e| QueryError::Parse {
                path: path.clone(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            out.push((r, line.to_owned()));
        }
    }
    Ok(out)
}

fn header() -> String {
    format!(
        "{:<27} {:<22} {:<8} {:>6} {:>7}  {:<24} {:<28} {}\n",
        "TIME", "EVENT", "OUTCOME", "UID", "PID", "EXE / UNIT", "SECRET", "RULE / REASON"
    )
}

fn row(r: &AuditRecord) -> String {
    let (uid, pid, who) = match &r.peer {
        Some(p) => (
            p.uid.to_string(),
            p.pid.to_string(),
            p.unit.clone().or_else(|| p.exe.clone()).unwrap_or_else(|| "-".into()),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    let secret = r.secret.as_ref().map_or_else(|| "-".to_owned(), |s| format!("{}/{}", s.vault, s.name));
    let why = r.rule.clone().or_else(|| r.reason.clone()).unwrap_or_else(|| "-".into());
    format!(
        "{:<27} {:<22} {:<8} {:>6} {:>7}  {:<24} {:<28} {}\n",
        r.ts,
        r.event.as_str(),
        r.outcome.map_or("-", Outcome::as_str),
        uid,
        pid,
        who,
        secret,
        why
    )
}

/// `audit query`: a table, JSON lines (`json`), or a summary (`summary`).
pub fn query(files: &[PathBuf], filter: &Filter, json: bool, summary: bool) -> Result<String, QueryError> {
    let c = compile(filter)?;
    let selected: Vec<(AuditRecord, String)> =
        records(files)?.into_iter().filter(|(r, _)| c.keeps(r)).collect();
    let mut out = String::new();
    if summary {
        // (secret, uid, unit or exe) → (allowed, denied, errors)
        let mut table: BTreeMap<(String, u32, String), (u64, u64, u64)> = BTreeMap::new();
        for (r, _) in selected.iter().filter(|(r, _)| r.event == kvbroker_proto::Event::SecretRead) {
            let secret =
                r.secret.as_ref().map_or_else(|| "-".to_owned(), |s| format!("{}/{}", s.vault, s.name));
            let (uid, who) = r.peer.as_ref().map_or((u32::MAX, "-".to_owned()), |p| {
                (p.uid, p.unit.clone().or_else(|| p.exe.clone()).unwrap_or_else(|| "-".into()))
            });
            let e = table.entry((secret, uid, who)).or_default();
            match r.outcome {
                Some(Outcome::Allowed) => e.0 += 1,
                Some(Outcome::Denied) => e.1 += 1,
                _ => e.2 += 1,
            }
        }
        let _ = writeln!(
            out,
            "{:<28} {:>6}  {:<32} {:>8} {:>7} {:>7}",
            "SECRET", "UID", "UNIT / EXE", "ALLOWED", "DENIED", "ERRORS"
        );
        for ((secret, uid, who), (a, d, e)) in &table {
            let _ = writeln!(out, "{secret:<28} {uid:>6}  {who:<32} {a:>8} {d:>7} {e:>7}");
        }
        let denials: u64 = table.values().map(|v| v.1).sum();
        let _ = writeln!(
            out,
            "\n{} read(s) by {} caller/secret pair(s); {denials} denied",
            table.values().map(|v| v.0 + v.1 + v.2).sum::<u64>(),
            table.len()
        );
        return Ok(out);
    }
    if json {
        for (_, line) in &selected {
            out.push_str(line);
            out.push('\n');
        }
        return Ok(out);
    }
    out.push_str(&header());
    for (r, _) in &selected {
        out.push_str(&row(r));
    }
    Ok(out)
}

/// `audit tail`: prints the last `last` records, then follows the file (and its successors
/// across rotation) until interrupted.
pub fn tail(
    path: &Path,
    last: usize,
    json: bool,
    mut emit: impl FnMut(&str) -> bool,
) -> Result<(), QueryError> {
    let read_err = |e: std::io::Error| QueryError::Read { path: path.to_owned(), reason: e.to_string() };
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    if !json && !emit(&header()) {
        return Ok(());
    }
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(last)..] {
        if !emit_line(line, json, &mut emit) {
            return Ok(());
        }
    }
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut pos = text.len() as u64;
    let mut ino = file.metadata().map_err(read_err)?.ino();
    let mut pending = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Rotated or replaced: finish the old file, then start on the new one from its top.
        if let Ok(m) = std::fs::metadata(path) {
            if m.ino() != ino {
                if !drain(&mut file, &mut pos, &mut pending, json, &mut emit) {
                    return Ok(());
                }
                file = std::fs::File::open(path).map_err(read_err)?;
                ino = m.ino();
                pos = 0;
            }
        }
        if !drain(&mut file, &mut pos, &mut pending, json, &mut emit) {
            return Ok(());
        }
    }
}

fn drain(
    file: &mut std::fs::File,
    pos: &mut u64,
    pending: &mut String,
    json: bool,
    emit: &mut impl FnMut(&str) -> bool,
) -> bool {
    let mut buf = String::new();
    if file.seek(SeekFrom::Start(*pos)).is_err() || file.read_to_string(&mut buf).is_err() {
        return true;
    }
    *pos += buf.len() as u64;
    pending.push_str(&buf);
    while let Some(i) = pending.find('\n') {
        let line: String = pending.drain(..=i).collect();
        if !emit_line(line.trim_end(), json, emit) {
            return false;
        }
    }
    true
}

fn emit_line(line: &str, json: bool, emit: &mut impl FnMut(&str) -> bool) -> bool {
    if json {
        return emit(&format!("{line}\n"));
    }
    match serde_json::from_str::<AuditRecord>(line) {
        Ok(r) => emit(&row(&r)),
        Err(_) => emit(&format!("(unreadable line) {}\n", line.chars().take(80).collect::<String>())),
    }
}
