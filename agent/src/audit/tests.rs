use std::num::NonZeroU64;

use kvbroker_proto::{Event, Outcome};

use super::verify::verify;
use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("kvb-audit-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg(dir: &TempDir) -> AuditConfig {
    AuditConfig {
        path: dir.0.join("audit.jsonl"),
        durability: Durability::Write,
        rotate_bytes: NonZeroU64::new(1 << 30).unwrap(),
    }
}

fn read(n: u64) -> AuditRecord {
    let mut r = AuditRecord::new(Event::SecretRead);
    r.outcome = Some(Outcome::Allowed);
    r.request_id = Some(format!("req-{n}"));
    r
}

fn write_n(a: &Auditor, n: u64) {
    for i in 0..n {
        a.append(read(i)).unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn chain_continues_across_reopen() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 3);
    drop(a);
    let (a, resumed) = Auditor::open(&c).unwrap();
    assert!(resumed.note.is_none());
    assert_eq!(a.append(read(9)).unwrap(), 4);
    let v = verify(std::slice::from_ref(&c.path)).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (4, 1, 4));
}

#[test]
fn partial_last_line_is_kept_aside_and_removed() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 2);
    drop(a);
    let mut f = OpenOptions::new().append(true).open(&c.path).unwrap();
    f.write_all(b"{\"seq\":3,\"ts\":\"torn").unwrap();
    drop(f);
    let (a, resumed) = Auditor::open(&c).unwrap();
    let note = resumed.note.unwrap();
    assert!(note.contains("partial line"), "{note}");
    assert_eq!(a.append(read(3)).unwrap(), 3);
    verify(std::slice::from_ref(&c.path)).unwrap();
    let kept = std::fs::read_dir(&d.0)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(kept);
}

#[test]
fn damaged_tail_starts_a_new_segment() {
    let d = TempDir::new();
    let c = cfg(&d);
    std::fs::write(&c.path, "not a record\n").unwrap();
    let (a, resumed) = Auditor::open(&c).unwrap();
    assert!(resumed.note.unwrap().contains("new chain segment"));
    assert_eq!(a.append(read(0)).unwrap(), 1);
    verify(std::slice::from_ref(&c.path)).unwrap();
}

#[test]
fn replaced_file_fails_closed() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 1);
    std::fs::rename(&c.path, d.0.join("moved")).unwrap();
    std::fs::write(&c.path, "").unwrap();
    assert!(matches!(a.append(read(1)), Err(AuditError::Replaced { .. })));
    assert!(!a.healthy());
}

fn tamper(edit: impl FnOnce(&mut Vec<String>)) -> String {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 6);
    let mut l = lines(&c.path);
    edit(&mut l);
    std::fs::write(&c.path, l.join("\n") + "\n").unwrap();
    verify(std::slice::from_ref(&c.path)).unwrap_err().to_string()
}

#[test]
fn verify_names_the_damage() {
    let e = tamper(|l| l[2] = l[2].replace("req-2", "req-X"));
    assert!(e.ends_with(":3: modified: the record's hash does not match its content"), "{e}");
    let e = tamper(|l| {
        l.remove(3);
    });
    assert!(e.contains(":4: removed: expected seq 4, found 5"), "{e}");
    let e = tamper(|l| l.swap(1, 2));
    assert!(e.contains(":2: removed") || e.contains(":2: reordered"), "{e}");
    let e = tamper(|l| {
        let dup = l[1].clone();
        l.insert(3, dup);
    });
    assert!(e.contains(":4: reordered: expected seq 4, found 2"), "{e}");
}

#[test]
fn verify_reports_truncated_last_line() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 2);
    let mut f = OpenOptions::new().append(true).open(&c.path).unwrap();
    f.write_all(b"{\"seq\":3").unwrap();
    let e = verify(std::slice::from_ref(&c.path)).unwrap_err().to_string();
    assert!(e.ends_with(":3: truncated: the last line is incomplete"), "{e}");
}
