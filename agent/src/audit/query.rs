//! `kvbroker audit query` and `kvbroker audit tail`: who read what, when, under which rule.
//! Reads only the records (never writes); prints names, uids, units and reasons — the log
//! holds no values, so neither does this output.

use crate::terminal::{escape, table};
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

/// The columns of `query` and `tail`; `RIGHT` marks the numeric ones.
const COLUMNS: [&str; 8] =
    ["TIME", "EVENT", "OUTCOME", "UID", "PID", "EXE / UNIT", "SECRET", "RULE / REASON"];
const RIGHT: [bool; 8] = [false, false, false, true, true, false, false, false];
/// `tail` streams, so it cannot measure its rows: these widths fit the usual values, and a
/// longer one shifts only the columns to its right. `query` measures every row instead.
const TAIL_WIDTHS: [usize; 7] = [27, 22, 8, 6, 7, 24, 28];

/// One record as printed: every field escaped, so a caller's exe path (or a tampered log)
/// cannot send terminal control sequences.
fn cells(r: &AuditRecord) -> [String; 8] {
    let (uid, pid, who) = match &r.peer {
        Some(p) => {
            (p.uid.to_string(), p.pid.to_string(), p.unit.as_deref().or(p.exe.as_deref()).unwrap_or("-"))
        }
        None => ("-".into(), "-".into(), "-"),
    };
    let secret = r.secret.as_ref().map_or_else(|| "-".to_owned(), |s| format!("{}/{}", s.vault, s.name));
    [
        escape(&r.ts),
        r.event.as_str().to_owned(),
        r.outcome.map_or("-", Outcome::as_str).to_owned(),
        uid,
        pid,
        escape(who),
        escape(&secret),
        escape(&why(r)),
    ]
}

/// The last column: the rule that allowed a read; for a denial the policy's reason (its code
/// is always `PermissionDenied`); for an error its code and message, e.g.
/// `SecretNotFound: secret db in vault default not found`. A denial or error record also names
/// the rule that allowed the read before it failed, but the reason is what a reader wants.
fn why(r: &AuditRecord) -> String {
    match r.count {
        Some(n) => format!("{} (×{n} in one second)", why_one(r)),
        None => why_one(r),
    }
}

fn why_one(r: &AuditRecord) -> String {
    let failed = matches!(r.outcome, Some(Outcome::Denied | Outcome::Error));
    if !failed {
        return r.rule.clone().or_else(|| r.reason.clone()).unwrap_or_else(|| "-".into());
    }
    match (r.error, &r.reason) {
        (Some(kvbroker_proto::ErrorCode::PermissionDenied) | None, Some(reason)) => reason.clone(),
        (Some(code), Some(reason)) => format!("{code}: {reason}"),
        (Some(code), None) => code.to_string(),
        (None, None) => r.rule.clone().unwrap_or_else(|| "-".into()),
    }
}

/// One `tail` line, padded to `TAIL_WIDTHS`.
fn tail_line(cells: &[&str; 8]) -> String {
    let mut out = String::new();
    for (i, w) in TAIL_WIDTHS.iter().enumerate() {
        let c = cells[i];
        let _ = if RIGHT[i] { write!(out, "{c:>w$}  ") } else { write!(out, "{c:<w$}  ") };
    }
    out.push_str(cells[7]);
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

fn header() -> String {
    tail_line(&COLUMNS)
}

fn row(r: &AuditRecord) -> String {
    let c = cells(r);
    tail_line(&[&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6], &c[7]])
}

/// `audit query`: a table, JSON lines (`json`), or a summary (`summary`).
pub fn query(files: &[PathBuf], filter: &Filter, json: bool, summary: bool) -> Result<String, QueryError> {
    let c = compile(filter)?;
    let selected: Vec<(AuditRecord, String)> =
        records(files)?.into_iter().filter(|(r, _)| c.keeps(r)).collect();
    let mut out = String::new();
    if summary {
        // (secret, uid, unit or exe) → (allowed, denied, errors)
        let mut counts: BTreeMap<(String, u32, String), (u64, u64, u64)> = BTreeMap::new();
        for (r, _) in selected.iter().filter(|(r, _)| r.event == kvbroker_proto::Event::SecretRead) {
            let secret =
                r.secret.as_ref().map_or_else(|| "-".to_owned(), |s| format!("{}/{}", s.vault, s.name));
            let (uid, who) = r.peer.as_ref().map_or((u32::MAX, "-".to_owned()), |p| {
                (p.uid, p.unit.clone().or_else(|| p.exe.clone()).unwrap_or_else(|| "-".into()))
            });
            let e = counts.entry((secret, uid, who)).or_default();
            // A refusal summary record stands for `count` refused requests.
            let n = r.count.unwrap_or(1);
            match r.outcome {
                // A hostile `count` cannot overflow the totals (saturated, as large as can be).
                Some(Outcome::Allowed) => e.0 = e.0.saturating_add(n),
                Some(Outcome::Denied) => e.1 = e.1.saturating_add(n),
                _ => e.2 = e.2.saturating_add(n),
            }
        }
        let rows = counts.iter().map(|((secret, uid, who), (a, d, e))| {
            let uid = if *uid == u32::MAX { "-".to_owned() } else { uid.to_string() };
            [escape(secret), uid, escape(who), a.to_string(), d.to_string(), e.to_string()]
        });
        out.push_str(&table(
            ["SECRET", "UID", "UNIT / EXE", "ALLOWED", "DENIED", "ERRORS"],
            [false, true, false, true, true, true],
            rows,
        ));
        let denials = counts.values().fold(0u64, |t, v| t.saturating_add(v.1));
        let _ = writeln!(
            out,
            "\n{} read(s) by {} caller/secret pair(s); {denials} denied",
            counts.values().fold(0u64, |t, v| t.saturating_add(v.0).saturating_add(v.1).saturating_add(v.2)),
            counts.len()
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
    out.push_str(&table(COLUMNS, RIGHT, selected.iter().map(|(r, _)| cells(r))));
    Ok(out)
}

/// `audit tail`: prints the last `last` records, then follows the file (and its successors
/// across rotation) until interrupted. Only whole lines are shown: a line the agent is
/// still writing, or one it cuts back after a failed write or at its next start, is never
/// shown half; and every file rotated away between two looks is shown, oldest first.
pub fn tail(
    path: &Path,
    last: usize,
    json: bool,
    mut emit: impl FnMut(&str) -> bool,
) -> Result<(), QueryError> {
    let read_err = |e: std::io::Error| QueryError::Read { path: path.to_owned(), reason: e.to_string() };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut ino = file.metadata().map_err(read_err)?.ino();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_err)?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if !json && !emit(&header()) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&bytes[..whole]);
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(last)..] {
        if !emit_line(line, json, &mut emit) {
            return Ok(());
        }
    }
    // The end of the last whole line shown.
    let mut pos = whole as u64;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        // Rotated or replaced: finish the old file, then the files rotated after it, then
        // the new one from its top.
        // Opened first: between a rotation's rename and the new file's creation there is no
        // file yet (look again next time), and the inode kept is the opened file's own.
        if let Ok(m) = std::fs::metadata(path)
            && m.ino() != ino
            && let Ok(new) = std::fs::File::open(path)
            && let Ok(new_ino) = new.metadata().map(|m| m.ino())
        {
            if !drain(&mut file, &mut pos, json, &mut emit) {
                return Ok(());
            }
            for newer in rotated_since(path, ino) {
                let Ok(mut f) = std::fs::File::open(&newer) else { continue };
                // Rotated again since it was opened: it is shown as the live file next.
                if f.metadata().is_ok_and(|m| m.ino() == new_ino) {
                    continue;
                }
                if !drain(&mut f, &mut 0, json, &mut emit) {
                    return Ok(());
                }
            }
            file = new;
            ino = new_ino;
            pos = 0;
        }
        if !drain(&mut file, &mut pos, json, &mut emit) {
            return Ok(());
        }
    }
}

/// The rotated siblings of `path` newer than the file with inode `old`: if that file is now
/// `path.K`, then `path.K-1` … `path.1`, oldest first. None if it is not a sibling (it was
/// replaced, or rotated out of the kept files).
fn rotated_since(path: &Path, old: u64) -> Vec<PathBuf> {
    let sibling = |n: u32| super::verify::rotated(path, n);
    let mut n = 1;
    loop {
        match std::fs::metadata(sibling(n)) {
            Ok(m) if m.ino() == old => return (1..n).rev().map(sibling).collect(),
            Ok(_) => n += 1,
            Err(_) => return Vec::new(),
        }
    }
}

/// Shows the whole lines after `pos` and moves `pos` past them; a last line without its
/// newline waits for the next look. A file cut short below `pos` is followed from its end.
fn drain(file: &mut std::fs::File, pos: &mut u64, json: bool, emit: &mut impl FnMut(&str) -> bool) -> bool {
    let Ok(len) = file.metadata().map(|m| m.len()) else { return true };
    if len < *pos {
        *pos = len;
        if !json && !emit("(the file was cut short below the records shown; following on from its end)\n") {
            return false;
        }
    }
    // Read from the newline before `pos`: if it is not there, the file was cut back below
    // `pos` and grew past it again between two looks, and `pos` is inside a line: go on
    // from that line's end.
    let from = pos.saturating_sub(1);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut buf).is_err() {
        return true;
    }
    let skip = if *pos == 0 {
        0
    } else if buf.first() == Some(&b'\n') {
        1
    } else {
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => return true,
        }
    };
    let rest = &buf[skip..];
    let whole = rest.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for line in String::from_utf8_lossy(&rest[..whole]).lines() {
        if !emit_line(line, json, emit) {
            return false;
        }
    }
    *pos = from + (skip + whole) as u64;
    true
}

fn emit_line(line: &str, json: bool, emit: &mut impl FnMut(&str) -> bool) -> bool {
    if json {
        return emit(&format!("{line}\n"));
    }
    match serde_json::from_str::<AuditRecord>(line) {
        Ok(r) => emit(&row(&r)),
        Err(_) => {
            emit(&format!("(unreadable line) {}\n", escape(&line.chars().take(80).collect::<String>())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvbroker_proto::{ErrorCode, Event, PeerInfo, SecretRef};

    fn read(uid: u32, exe: &str, secret: &str, outcome: Outcome) -> AuditRecord {
        let mut r = AuditRecord::new(Event::SecretRead);
        r.ts = "2026-11-22T10:00:00.123456Z".into();
        r.outcome = Some(outcome);
        r.peer = Some(PeerInfo { pid: 4242, uid, gid: uid, exe: Some(exe.into()), ..PeerInfo::default() });
        r.secret = Some(SecretRef {
            vault: "default".into(),
            name: secret.into(),
            version: None,
            previous_version: None,
        });
        r.rule = Some("train-jobs".into());
        r
    }

    /// Writes `records` to a fresh log and runs `audit query` on it.
    fn query_of(records: &[AuditRecord], summary: bool) -> String {
        let path = std::env::temp_dir().join(format!("kvb-query-{}.jsonl", fastrand::u64(..)));
        let text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(&path, text).unwrap();
        let out = query(std::slice::from_ref(&path), &Filter::default(), false, summary);
        let _ = std::fs::remove_file(&path);
        out.unwrap()
    }

    /// A hostile `count` (a tampered log) cannot overflow the summary's totals: they stop
    /// at the largest number (a debug build panicked, a release build wrapped around).
    #[test]
    fn summary_totals_saturate_on_a_hostile_count() {
        let mut a = read(1000, "/usr/bin/python3", "db", Outcome::Denied);
        a.count = Some(u64::MAX);
        let out = query_of(&[a.clone(), a], true);
        assert!(out.contains(&u64::MAX.to_string()), "{out}");
        assert!(out.contains(&format!("{} denied", u64::MAX)), "{out}");
    }

    /// Follows `path` with `audit tail --json` on a thread; its lines come on the channel.
    fn follow(path: &Path) -> std::sync::mpsc::Receiver<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || tail(&path, 100, true, |l| tx.send(l.trim_end().to_owned()).is_ok()));
        rx
    }

    fn line(n: u64) -> String {
        let mut r = AuditRecord::new(Event::SecretRead);
        r.seq = n;
        serde_json::to_string(&r).unwrap() + "\n"
    }

    fn seqs(rx: &std::sync::mpsc::Receiver<String>, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let l = rx.recv_timeout(Duration::from_secs(5)).expect("tail showed no more lines");
                serde_json::from_str::<AuditRecord>(&l).unwrap_or_else(|e| panic!("{e}: {l}")).seq
            })
            .collect()
    }

    /// `audit tail` never shows half a line, also when the agent cuts a partial line back
    /// and writes on (a failed write's rollback, or its next start), and it shows every file
    /// rotated away between two of its looks (it skipped all but the newest).
    #[test]
    fn tail_shows_whole_lines_and_every_rotated_file() {
        let dir = std::env::temp_dir().join(format!("kvb-tail-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let partial = &line(99)[..20];
        std::fs::write(&path, line(1) + &line(2) + partial).unwrap();
        let rx = follow(&path);
        assert_eq!(seqs(&rx, 2), [1, 2]);
        // Cut back to the last whole record, then the next record.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len((line(1) + &line(2)).len() as u64).unwrap();
        drop(f);
        let append = |p: &Path, text: &str| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        };
        append(&path, &line(3));
        assert_eq!(seqs(&rx, 1), [3], "the record after the cut, whole");
        // Cut back below what was shown and grown past it again between two looks, with
        // longer lines: what was shown is not shown again, and no fragment of a line is.
        let shown = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(line(1).len() as u64).unwrap();
        drop(f);
        append(&path, &(line(44) + &line(55) + &line(66)));
        assert!(std::fs::metadata(&path).unwrap().len() > shown);
        assert_eq!(seqs(&rx, 1), [66], "from the first whole line past what was shown");
        // Two rotations between two looks (200 ms apart).
        let sibling = |n: u32| dir.join(format!("audit.jsonl.{n}"));
        append(&path, &line(4));
        std::fs::rename(&path, sibling(1)).unwrap();
        append(&path, &line(5));
        std::fs::rename(sibling(1), sibling(2)).unwrap();
        std::fs::rename(&path, sibling(1)).unwrap();
        append(&path, &line(6));
        assert_eq!(seqs(&rx, 3), [4, 5, 6]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 11: a long exe path pushed every later column of its row out of line.
    #[test]
    fn table_stays_aligned_with_a_long_exe_path() {
        let long = format!("/opt/conda/envs/{}/bin/python3.11", "very-long-environment-name".repeat(3));
        let out = query_of(
            &[
                read(1000, "/usr/bin/python3", "db", Outcome::Allowed),
                read(7, &long, "api-token", Outcome::Allowed),
            ],
            false,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let col = |line: &str, text: &str| line.find(text).unwrap_or_else(|| panic!("{text} not in {line}"));
        let secret_at = col(lines[0], "SECRET");
        assert_eq!(col(lines[1], "default/db"), secret_at, "{out}");
        assert_eq!(col(lines[2], "default/api-token"), secret_at, "{out}");
        assert_eq!(col(lines[2], &long), col(lines[0], "EXE / UNIT"), "{out}");
        // Numbers stay right-aligned: the UID column ends where its header ends.
        let uid_end = col(lines[0], "UID") + 3;
        assert_eq!(col(lines[1], "1000") + 4, uid_end, "{out}");
        assert_eq!(col(lines[2], " 7 ") + 2, uid_end, "{out}");
        let summary = query_of(&[read(7, &long, "api-token", Outcome::Allowed)], true);
        let s: Vec<&str> = summary.lines().collect();
        assert_eq!(s[1].find(&long), s[0].find("UNIT / EXE"), "{summary}");
        assert_eq!(s[1].find("     1"), s[0].find("ALLOWED").map(|i| i + 1), "{summary}");
    }

    /// Issue 11: a denied or failed read showed the rule name, hiding why it failed.
    #[test]
    fn denials_and_errors_show_the_reason_not_the_rule() {
        let mut denied = read(65534, "/usr/bin/curl", "db", Outcome::Denied);
        (denied.rule, denied.error, denied.reason) =
            (None, Some(ErrorCode::PermissionDenied), Some("no rule matches".into()));
        let mut missing = read(1000, "/usr/bin/python3", "gone", Outcome::Error);
        missing.error = Some(ErrorCode::SecretNotFound);
        missing.reason = Some("secret gone not found in vault default".into());
        let out = query_of(&[read(1000, "/usr/bin/python3", "db", Outcome::Allowed), denied, missing], false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].ends_with("  train-jobs"), "{out}");
        assert!(lines[2].ends_with("  no rule matches"), "{out}");
        assert!(lines[3].ends_with("  SecretNotFound: secret gone not found in vault default"), "{out}");
        assert!(!lines[3].contains("train-jobs"), "{out}");
    }

    /// SECURITY: the exe path is the caller's choice; printed raw, `\x1b]…` or `\r` could
    /// rewrite the operator's terminal or hide the row.
    #[test]
    fn control_characters_are_escaped_in_query_and_tail() {
        let evil = "/tmp/\u{1b}[2J\u{1b}]0;owned\u{7}\rok\u{202e}fdp.exe\\u{1b}";
        let mut r = read(1000, evil, "db", Outcome::Denied);
        r.reason = Some("no rule matches\n\u{9b}31m".into());
        let want = r"/tmp/\u{1b}[2J\u{1b}]0;owned\u{7}\u{d}ok\u{202e}fdp.exe\\u{1b}";
        for out in
            [query_of(std::slice::from_ref(&r), false), query_of(std::slice::from_ref(&r), true), row(&r)]
        {
            let raw = |l: &str| l.chars().any(|c| c.is_control() || c == '\u{202e}');
            assert!(!out.lines().any(raw), "{out:?}");
            assert!(out.contains(want), "{out}");
        }
        assert!(row(&r).contains(r"no rule matches\u{a}\u{9b}31m"));
        let mut lines = Vec::new();
        emit_line("{\"not\u{1b}json", false, &mut |s: &str| {
            lines.push(s.to_owned());
            true
        });
        assert_eq!(lines, ["(unreadable line) {\"not\\u{1b}json\n"]);
    }

    /// Issue 13: a refusal summary stands for `count` requests; counting it once hid a flood
    /// from `--summary`.
    #[test]
    fn summary_adds_up_the_counts_of_refusal_summaries() {
        let mut flood = read(65534, "/usr/bin/curl", "db", Outcome::Denied);
        (flood.rule, flood.error, flood.reason, flood.count) =
            (None, Some(ErrorCode::PermissionDenied), Some("no rule matches".into()), Some(19_800));
        let mut single = flood.clone();
        single.count = None;
        let out =
            query_of(&[read(65534, "/usr/bin/curl", "db", Outcome::Allowed), single, flood.clone()], true);
        assert!(out.contains("19802 read(s) by 1 caller/secret pair(s); 19801 denied"), "{out}");
        let table = query_of(&[flood], false);
        assert!(table.lines().nth(1).unwrap().ends_with("no rule matches (×19800 in one second)"), "{table}");
    }

    #[test]
    fn tail_rows_line_up_with_the_header() {
        let out = row(&read(1000, "/usr/bin/python3", "db", Outcome::Allowed));
        let h = header();
        assert_eq!(out.find("default/db"), h.find("SECRET"), "{h}{out}");
        assert_eq!(out.find("/usr/bin/python3"), h.find("EXE / UNIT"), "{h}{out}");
    }
}
