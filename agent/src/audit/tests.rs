use std::num::NonZeroU64;
use std::time::Duration;

use kvbroker_proto::{Event, Outcome};

use super::verify::{rotated, verify, with_rotated};
use super::*;
use crate::config::Durability;

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
    AuditConfig::for_tests(dir.0.join("audit.jsonl"))
}

fn read(n: u64) -> AuditRecord {
    let mut r = AuditRecord::new(Event::SecretRead);
    r.outcome = Some(Outcome::Allowed);
    r.request_id = Some(format!("req-{n}"));
    r
}

async fn write_n(a: &Auditor, n: u64) {
    for i in 0..n {
        a.append(read(i)).await.unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn one(path: &Path) -> Vec<PathBuf> {
    vec![path.to_owned()]
}

#[tokio::test]
async fn chain_continues_across_reopen() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 3).await;
    drop(a);
    let (a, resumed) = Auditor::open(&c).unwrap();
    assert!(resumed.note.is_none());
    assert_eq!(a.append(read(9)).await.unwrap(), 4);
    let v = verify(&one(&c.path), None).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (4, 1, 4));
}

/// Issue 13: two agents on one log interleaved their chains. The second open is refused,
/// naming the holder's pid, and succeeds once the first writer is gone.
#[tokio::test]
async fn second_writer_on_one_log_is_refused_until_the_first_closes() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    let e = Auditor::open(&c).err().unwrap();
    assert!(
        matches!(&e, AuditError::Locked { holder, .. } if *holder == std::process::id().to_string()),
        "{e}"
    );
    drop(a);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 1).await;
}

#[tokio::test]
async fn concurrent_appends_are_all_chained_in_order() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.durability = Durability::Fsync;
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.append(read(i)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "every record got its own seq");
    assert_eq!(verify(&one(&c.path), None).unwrap().records, 200);
}

/// Issue 19: in `write` mode, records queued while a request writes go out together in one
/// `write(2)`, written by that request before it returns (no hand-off to the writer thread).
#[tokio::test]
async fn records_queued_during_a_write_go_out_in_one_write_by_the_writing_request() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    // Take the writing turn by hand, as a request does on finding nobody writing.
    assert!(a.core.take_lead(), "nobody was writing");
    let tasks: Vec<_> = (1..=10)
        .map(|i| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.append(read(i)).await.unwrap() })
        })
        .collect();
    while a.core.queued().0 < 10 {
        tokio::task::yield_now().await;
    }
    let before = a.core.with_state(|s| s.commits);
    assert_eq!(a.core.lead(&read(0), &a.tx).unwrap(), 1);
    assert_eq!(
        a.core.with_state(|s| s.commits) - before,
        2,
        "its own record, then the ten queued in one write"
    );
    assert_eq!(a.core.queued(), (0, false), "nothing left for the writer thread; nobody leads");
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=11).collect::<Vec<_>>());
    assert_eq!(verify(&one(&c.path), None).unwrap().records, 11);
}

/// Issue 19: while other connections have requests waiting, the records of requests that
/// are ready together on one worker thread share one `write(2)`: the first takes the turn
/// and steps aside once, the others queue behind it.
#[tokio::test(flavor = "current_thread")]
async fn records_of_reads_ready_together_share_one_write() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    let before = a.core.with_state(|s| s.commits);
    let tasks: Vec<_> = (1..=20)
        .map(|i| {
            let a = Arc::clone(&a);
            // As the server does while other connections have requests waiting.
            tokio::spawn(async move { a.append_fields(&read(i), true).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(a.core.with_state(|s| s.commits) - before, 1, "twenty records, one write");
    assert_eq!(
        a.core.with_state(|s| s.last_commit_thread),
        Some(std::thread::current().id()),
        "written by the gathering request, on its own thread"
    );
    assert_eq!(a.core.queued(), (0, false), "nobody leads afterwards");
    assert_eq!(verify(&one(&c.path), None).unwrap().records, 20);
}

/// In `fsync` mode no request writes on its runtime worker: every record goes to the writer
/// thread, which writes and fsyncs what queued meanwhile together.
#[tokio::test(flavor = "current_thread")]
async fn in_fsync_mode_requests_hand_their_records_to_the_writer_thread() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.durability = Durability::Fsync;
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    for gather in [false, true] {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let a = Arc::clone(&a);
                tokio::spawn(async move { a.append_fields(&read(i), gather).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let writer = a.core.with_state(|s| s.last_commit_thread);
        assert!(writer.is_some_and(|t| t != std::thread::current().id()), "written by the writer thread");
    }
    assert_eq!(verify(&one(&c.path), None).unwrap().records, 20);
}

/// A request that took the turn and is cancelled while it steps aside still gets its record
/// (and the queue behind it) written: the writer thread takes over.
#[tokio::test(flavor = "current_thread")]
async fn a_gathering_request_cancelled_midway_leaves_its_records_to_the_writer_thread() {
    let d = TempDir::new();
    let (a, _) = Auditor::open(&cfg(&d)).unwrap();
    let record = read(1);
    let mut append = Box::pin(a.append_fields(&record, true));
    assert!(poll_once(append.as_mut()).is_pending(), "it steps aside once");
    assert_eq!(a.core.queued(), (1, true), "its record queued, the turn held");
    drop(append);
    let t = std::time::Instant::now();
    while a.core.queued() != (0, false) {
        assert!(t.elapsed() < Duration::from_secs(5), "the writer thread did not take over");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        verify(&one(&c_path(&d)), None).unwrap().records,
        1,
        "the cancelled request's record is written"
    );
}

fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx)
}

fn c_path(d: &TempDir) -> PathBuf {
    cfg(d).path
}

/// In `fsync` mode the writing request writes only its own record and hands what queued
/// meanwhile to the writer thread, which writes (and fsyncs) it and then lets go.
#[tokio::test]
async fn in_fsync_mode_the_queue_goes_to_the_writer_thread() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.durability = Durability::Fsync;
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    assert!(a.core.take_lead(), "nobody was writing");
    let tasks: Vec<_> = (1..=5)
        .map(|i| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.append(read(i)).await.unwrap() })
        })
        .collect();
    while a.core.queued().0 < 5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(a.core.lead(&read(0), &a.tx).unwrap(), 1);
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=6).collect::<Vec<_>>(), "the writer thread wrote the queued five");
    let t = std::time::Instant::now();
    while a.core.queued() != (0, false) {
        assert!(t.elapsed() < Duration::from_secs(5), "the writer thread kept the turn");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(a.append(read(7)).await.unwrap(), 7, "the next request writes for itself again");
    assert_eq!(verify(&one(&c.path), None).unwrap().records, 7);
}

#[tokio::test]
async fn partial_last_line_is_kept_aside_and_removed() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 2).await;
    drop(a);
    let mut f = OpenOptions::new().append(true).open(&c.path).unwrap();
    f.write_all(b"{\"seq\":3,\"ts\":\"torn").unwrap();
    drop(f);
    let (a, resumed) = Auditor::open(&c).unwrap();
    let note = resumed.note.unwrap();
    assert!(note.contains("partial line"), "{note}");
    assert_eq!(a.append(read(3)).await.unwrap(), 3);
    verify(&one(&c.path), None).unwrap();
    let kept = std::fs::read_dir(&d.0)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(kept);
}

#[tokio::test]
async fn damaged_tail_starts_a_new_segment() {
    let d = TempDir::new();
    let c = cfg(&d);
    std::fs::write(&c.path, "not a record\n").unwrap();
    let (a, resumed) = Auditor::open(&c).unwrap();
    assert!(resumed.note.unwrap().contains("new chain segment"));
    assert_eq!(a.append(read(0)).await.unwrap(), 1);
    verify(&one(&c.path), None).unwrap();
}

/// A removed or replaced file fails that request closed, then the writer reopens the path
/// and says so in the log; the chain goes on from the last record the agent wrote.
#[tokio::test]
async fn replaced_file_fails_closed_then_recovers() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 2).await;
    let moved = d.0.join("moved.jsonl");
    std::fs::rename(&c.path, &moved).unwrap();
    // Detection is bounded by `RECHECK` (the inotify watch is usually far quicker).
    tokio::time::sleep(writer::RECHECK + Duration::from_millis(20)).await;
    assert!(matches!(a.append(read(2)).await, Err(AuditError::Replaced { .. })));
    assert!(!a.healthy());
    assert_eq!(a.append(read(3)).await.unwrap(), 4, "the reopen notice took seq 3");
    assert!(a.healthy());
    let recs = lines(&c.path);
    assert!(
        recs[0].contains("\"event\":\"audit.rotated\"") && recs[0].contains("removed or replaced"),
        "{}",
        recs[0]
    );
    verify(&[moved, c.path.clone()], None).unwrap();
}

/// Issue 19: the inotify watch alone notices a replaced file (the periodic comparison is
/// pushed out of the way), and long before `RECHECK`; no per-record `statx` is involved.
#[tokio::test]
async fn inotify_watch_notices_a_replaced_file() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    a.core.with_state(|s| s.set_watch(Some(&c.path), Duration::from_secs(3600)));
    write_n(&a, 2).await;
    // Our own writes raise nothing (IN_MODIFY is not watched).
    assert!(!a.core.with_state(|s| s.change_seen()));
    std::fs::write(d.0.join("other.txt"), b"x").unwrap();
    let replacement = d.0.join("new.jsonl");
    std::fs::write(&replacement, b"").unwrap();
    std::fs::rename(&replacement, &c.path).unwrap();
    let t = std::time::Instant::now();
    while !a.core.with_state(|s| s.change_seen()) {
        assert!(t.elapsed() < Duration::from_secs(5), "the watch never saw the rename");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(matches!(a.append(read(2)).await, Err(AuditError::Replaced { .. })));
    assert_eq!(a.append(read(3)).await.unwrap(), 4, "the reopen notice took seq 3");
}

/// Without the watch, the periodic comparison still bounds how long records go to a removed
/// file: at most `recheck` after the removal.
#[tokio::test]
async fn periodic_check_notices_a_removed_file_without_the_watch() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 1).await;
    // A live watch that cannot see our file (it watches another directory), so only the
    // periodic comparison, every 50 ms, can notice.
    let elsewhere = TempDir::new();
    a.core.with_state(|s| s.set_watch(Some(&elsewhere.0.join("x")), Duration::from_millis(50)));
    write_n(&a, 1).await;
    std::fs::remove_file(&c.path).unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(matches!(a.append(read(2)).await, Err(AuditError::Replaced { .. })));
}

/// Without a live watch (inotify unavailable or lost), every batch is compared: the first
/// record after the rename already fails closed.
#[tokio::test]
async fn without_a_watch_every_batch_is_checked() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    a.core.with_state(|s| s.set_watch(None, Duration::from_secs(3600)));
    write_n(&a, 2).await;
    std::fs::rename(&c.path, d.0.join("moved.jsonl")).unwrap();
    assert!(matches!(a.append(read(2)).await, Err(AuditError::Replaced { .. })));
}

/// The watch is lost when its directory goes; the reopen after the directory is back
/// watches it again.
#[tokio::test]
async fn watch_is_rearmed_after_its_directory_returns() {
    let d = TempDir::new();
    let sub = d.0.join("logs");
    std::fs::create_dir_all(&sub).unwrap();
    let c = AuditConfig::for_tests(sub.join("audit.jsonl"));
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 1).await;
    std::fs::rename(&sub, d.0.join("logs.old")).unwrap();
    std::fs::create_dir_all(&sub).unwrap();
    let t = std::time::Instant::now();
    while a.core.with_state(|s| s.watch_live()) {
        assert!(t.elapsed() < Duration::from_secs(5), "the watch never saw its directory move");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(matches!(a.append(read(1)).await, Err(AuditError::Replaced { .. })));
    a.append(read(2)).await.unwrap();
    assert!(a.core.with_state(|s| s.watch_live()), "the reopen watches the directory again");
}

fn tamper(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut l = lines(path);
    edit(&mut l);
    std::fs::write(path, l.join("\n") + "\n").unwrap();
}

async fn six(d: &TempDir) -> PathBuf {
    let c = cfg(d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 6).await;
    c.path
}

#[tokio::test]
async fn verify_names_the_damage() {
    type Edit = Box<dyn FnOnce(&mut Vec<String>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|l| l[2] = l[2].replace("req-2", "req-X")),
            ":3: modified: the record's hash does not match its content",
        ),
        (
            Box::new(|l| {
                l.remove(3);
            }),
            ":4: removed: expected seq 4, found 5",
        ),
        (Box::new(|l| l.swap(1, 2)), ":2: removed: expected seq 2, found 3"),
        (
            Box::new(|l| {
                let dup = l[1].clone();
                l.insert(3, dup);
            }),
            ":4: reordered: expected seq 4, found 2",
        ),
    ];
    for (edit, want) in cases {
        let d = TempDir::new();
        let p = six(&d).await;
        tamper(&p, edit);
        let e = verify(&one(&p), None).unwrap_err().to_string();
        assert!(e.contains(want), "{e} (wanted {want})");
    }
}

#[tokio::test]
async fn verify_reports_truncated_last_line() {
    let d = TempDir::new();
    let p = six(&d).await;
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"{\"seq\":7").unwrap();
    let e = verify(&one(&p), None).unwrap_err().to_string();
    assert!(e.ends_with(":7: truncated: the last line is incomplete"), "{e}");
}

/// Issue 13: rotation deleted the oldest kept file silently. The `audit.rotated` record that
/// follows a deletion names the sequence range that left the node.
#[tokio::test]
async fn rotation_that_deletes_a_file_names_the_records_that_left() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.rotate_bytes = NonZeroU64::new(2048).unwrap();
    c.rotate_keep = 2;
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 60).await;
    let files = with_rotated(&c.path);
    assert_eq!(files.len(), 3, "{files:?}");
    let rotated: Vec<AuditRecord> = files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str::<AuditRecord>(&l).unwrap())
        .filter(|r| r.event == Event::AuditRotated)
        .collect();
    let last = rotated
        .iter()
        .filter_map(|r| r.reason.as_deref())
        .rfind(|r| r.contains("have left the node"))
        .unwrap_or_else(|| panic!("no rotation says what it deleted: {rotated:?}"));
    // `… records seq A..B have left the node`: B is the last record before the oldest kept one.
    let range = last.split("records seq ").nth(1).and_then(|r| r.split(' ').next()).unwrap();
    let (from, to) = range.split_once("..").unwrap();
    let (from, to): (u64, u64) = (from.parse().unwrap(), to.parse().unwrap());
    let kept_min = files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str::<AuditRecord>(&l).unwrap().seq)
        .min()
        .unwrap();
    assert!(from < to && to + 1 == kept_min, "{last} (oldest kept seq {kept_min})");
}

/// Rotation renames the live file and then writes the new file's first record: an agent
/// stopped (or a disk that filled) in between leaves an empty live file beside `.1`. The
/// next start goes on with `.1`'s chain instead of starting a new one, which `audit verify`
/// read as a chain inserted into the log (found by an attack review: a crash under load,
/// and a full tmpfs, each did it).
#[tokio::test]
async fn an_empty_log_after_a_rotation_goes_on_from_the_rotated_file() {
    let d = TempDir::new();
    let c = cfg(&d);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 3).await;
    drop(a);
    let rotated = rotated(&c.path, 1);
    std::fs::rename(&c.path, &rotated).unwrap();
    std::fs::write(&c.path, b"").unwrap();
    let (a, resumed) = Auditor::open(&c).unwrap();
    let note = resumed.note.expect("the start says where the chain goes on from");
    assert!(note.contains("goes on from") && note.contains("(seq 3)"), "{note}");
    assert_eq!(a.append(read(3)).await.unwrap(), 4);
    let v = verify(&with_rotated(&c.path), None).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (4, 1, 4));
    drop(a);
    // A new log (no `.1`) still starts at the beginning.
    let fresh = TempDir::new();
    let (a, resumed) = Auditor::open(&cfg(&fresh)).unwrap();
    assert!(resumed.note.is_none());
    assert_eq!(a.append(read(0)).await.unwrap(), 1);
}

/// A file put in the log's place after the last check and before a rotation is not rotated
/// as ours (it became `.1`, and the rotation record said our records ended there): it is
/// handled as any replacement, reopened and said so.
#[tokio::test]
async fn a_file_put_in_place_just_before_a_rotation_is_not_rotated_as_ours() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.rotate_bytes = NonZeroU64::new(1024).unwrap();
    let (a, _) = Auditor::open(&c).unwrap();
    // A live watch that cannot see our file, checked hourly: nothing notices the swap
    // before the rotation does.
    let elsewhere = TempDir::new();
    a.core.with_state(|s| s.set_watch(Some(&elsewhere.0.join("x")), Duration::from_secs(3600)));
    // Full, not yet rotated: the next batch rotates.
    let mut n = 0;
    while std::fs::metadata(&c.path).unwrap().len() < 1024 {
        a.append(read(n)).await.unwrap();
        n += 1;
    }
    let rotated = rotated(&c.path, 1);
    assert!(!rotated.exists());
    let impostor = d.0.join("impostor.jsonl");
    std::fs::write(&impostor, b"{\"not\":\"ours\"}\n").unwrap();
    std::fs::rename(&impostor, &c.path).unwrap();
    assert!(matches!(a.append(read(n)).await, Err(AuditError::Replaced { .. })), "fails closed");
    assert!(!rotated.exists(), "the impostor was rotated as ours: {:?}", std::fs::read_to_string(&rotated));
    a.append(read(n + 1)).await.unwrap();
    let live = lines(&c.path);
    assert!(live.iter().any(|l| l.contains("removed or replaced outside the agent")), "{live:?}");
}

/// Size rotation keeps the chain across files; 100,000 records over several files verify;
/// damage at the boundary names the right file and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_one_chain_and_verifies_100k_records() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.rotate_bytes = NonZeroU64::new(4 << 20).unwrap();
    c.rotate_keep = 20;
    let (a, _) = Auditor::open(&c).unwrap();
    let a = Arc::new(a);
    // Concurrent writers, so group commit batches them.
    let tasks: Vec<_> = (0..8u64)
        .map(|w| {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                for i in 0..12_500 {
                    a.append(read(w * 100_000 + i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let files = with_rotated(&c.path);
    assert!(files.len() >= 4, "{files:?}");
    let v = verify(&files, None).unwrap();
    let rotations = (files.len() - 1) as u64;
    assert_eq!(v.records, 100_000 + rotations, "100,000 reads plus one audit.rotated per rotation");
    assert!(lines(&c.path)[0].contains("\"event\":\"audit.rotated\""));

    // Remove the first record of the newest file (the rotation notice): the boundary breaks.
    let newest = files.last().unwrap().clone();
    tamper(&newest, |l| {
        l.remove(0);
    });
    let e = verify(&files, None).unwrap_err();
    assert_eq!(e.path, newest);
    assert_eq!((e.line, e.kind), (1, "removed"));
    // Or truncate the older file at its end: the next file's first record no longer links.
    let d2 = TempDir::new();
    let mut c2 = cfg(&d2);
    c2.rotate_bytes = NonZeroU64::new(2048).unwrap();
    let (a2, _) = Auditor::open(&c2).unwrap();
    write_n(&a2, 40).await;
    let files2 = with_rotated(&c2.path);
    assert!(files2.len() >= 3);
    tamper(&files2[files2.len() - 2], |l| {
        l.pop();
    });
    let e = verify(&files2, None).unwrap_err();
    assert_eq!((e.path.clone(), e.line, e.kind), (files2[files2.len() - 1].clone(), 1, "removed"), "{e}");
}

/// Keyed mode: the chain verifies with the key, fails without it, and a record rewritten
/// with a recomputed plain SHA-256 (what an attacker without the key can do) is caught.
#[tokio::test]
async fn keyed_chain_needs_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new();
    let key_file = d.0.join("audit.key");
    std::fs::write(&key_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = cfg(&d);
    c.hmac_key_file = Some(key_file.clone());
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 3).await;
    drop(a);
    let key = read_key(&key_file).unwrap();
    verify(&one(&c.path), Some(&key)).unwrap();
    assert!(verify(&one(&c.path), None).is_err(), "unkeyed verification fails");
    // Reopen continues the keyed chain.
    let (a, resumed) = Auditor::open(&c).unwrap();
    assert!(resumed.note.is_none());
    write_n(&a, 1).await;
    drop(a);
    verify(&one(&c.path), Some(&key)).unwrap();
    // Rewrite record 2 and recompute its hash without the key.
    tamper(&c.path, |l| {
        let edited = l[1].replace("req-1", "req-X");
        let (body, _) = chain::unseal(edited.as_bytes()).unwrap();
        let (line, _) = chain::seal(body, None);
        l[1] = String::from_utf8(line).unwrap().trim_end().to_owned();
    });
    let e = verify(&one(&c.path), Some(&key)).unwrap_err().to_string();
    assert!(e.contains(":2: modified"), "{e}");
    // A group-readable key is refused.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(read_key(&key_file), Err(AuditError::Key { .. })));
}

#[tokio::test]
async fn checkpoints_carry_the_chain_head() {
    let d = TempDir::new();
    let mut c = cfg(&d);
    c.checkpoint_interval = Duration::from_millis(200);
    let (a, _) = Auditor::open(&c).unwrap();
    write_n(&a, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(a);
    let l = lines(&c.path);
    let cp = l.iter().find(|x| x.contains("\"event\":\"audit.checkpoint\"")).expect("a checkpoint");
    let second: AuditRecord = serde_json::from_str(&l[1]).unwrap();
    assert!(cp.contains(&format!("seq 2 hash {}", second.hash.unwrap())), "{cp}");
    verify(&one(&c.path), None).unwrap();
}

#[test]
fn key_from_bytes_trims_the_end_and_needs_16_bytes() {
    let key = |b: &[u8]| key_from_bytes(Zeroizing::new(b.to_vec()));
    assert_eq!(key(b"0123456789abcdef\r\n \t").unwrap().as_slice(), b"0123456789abcdef");
    assert_eq!(
        key(b" 0123456789 abcdef").unwrap().as_slice(),
        b" 0123456789 abcdef",
        "only the end is trimmed"
    );
    assert_eq!(key(b"0123456789abcde\n"), Err(KeyTooShort));
    assert_eq!(key(b"\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n"), Err(KeyTooShort));
    assert_eq!(key(b""), Err(KeyTooShort));
}

/// A key handed in from a vault goes through the same check as a key file.
#[test]
fn open_with_key_refuses_a_short_key() {
    let d = TempDir::new();
    let short = Zeroizing::new(b"0123456789abcde\n".to_vec());
    let e = Auditor::open_with_key(&cfg(&d), Some(short)).err().unwrap();
    assert!(matches!(&e, AuditError::Key { .. }), "{e}");
    assert!(e.to_string().contains("shorter than 16 bytes"), "{e}");
}

/// Property tests of the chain: any one change to a sealed log is caught by `verify`.
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// `n` chained lines as the writer seals them, with or without a key.
    fn log(n: u64, key: Option<&[u8]>) -> Vec<Vec<u8>> {
        let mut prev = chain::GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let mut r = read(i);
                r.seq = i;
                r.ts = format!("2026-11-22T10:00:{:02}.000000Z", i % 60);
                r.prev = prev.clone();
                let (line, hash) = chain::seal(serde_json::to_vec(&r).unwrap(), key);
                prev = hash;
                line
            })
            .collect()
    }

    fn check(lines: &[Vec<u8>], key: Option<&[u8]>) -> Result<verify::Verified, verify::VerifyError> {
        verify::verify_bytes(Path::new("audit.jsonl"), &lines.concat(), key)
    }

    /// One way to damage a log. Cutting records off either end is not among them: a chain
    /// cannot see its own ends cut off. `verify` prints the first and last `seq` it saw, and
    /// checkpoints kept off the node catch a cut (docs/audit.md).
    #[derive(Debug, Clone)]
    enum Damage {
        /// Replace byte `at` (mod the line's length, newline excluded) of line `line` by `xor`.
        Flip { line: usize, at: usize, xor: u8 },
        /// Remove line `line` (never the first or the last).
        Remove { line: usize },
        /// Swap line `line` with the next.
        Swap { line: usize },
        /// Insert a copy of line `from` before line `at`.
        Duplicate { from: usize, at: usize },
        /// Insert a freshly sealed record (a forger without the key) before line `at`.
        Forge { at: usize },
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<usize>(), any::<usize>(), 1..=255u8).prop_map(|(line, at, xor)| Damage::Flip {
                line,
                at,
                xor
            }),
            any::<usize>().prop_map(|line| Damage::Remove { line }),
            any::<usize>().prop_map(|line| Damage::Swap { line }),
            (any::<usize>(), any::<usize>()).prop_map(|(from, at)| Damage::Duplicate { from, at }),
            any::<usize>().prop_map(|at| Damage::Forge { at }),
        ]
    }

    fn apply(lines: &mut Vec<Vec<u8>>, d: &Damage, key: Option<&[u8]>) {
        let n = lines.len();
        match *d {
            Damage::Flip { line, at, xor } => {
                let l = &mut lines[line % n];
                let i = at % (l.len() - 1);
                l[i] ^= xor;
            }
            Damage::Remove { line } => {
                lines.remove(1 + line % (n - 2));
            }
            Damage::Swap { line } => lines.swap(line % (n - 1), line % (n - 1) + 1),
            Damage::Duplicate { from, at } => {
                let dup = lines[from % n].clone();
                lines.insert(at % n, dup);
            }
            Damage::Forge { at } => {
                // A forger who can write the log recomputes an unkeyed hash over a record
                // that claims to continue the line before.
                let at = at % n;
                let prev_line = if at == 0 { None } else { Some(&lines[at - 1]) };
                let mut r = read(999);
                r.seq = at as u64 + 1;
                r.prev = prev_line.map_or_else(
                    || chain::GENESIS.to_owned(),
                    |l| chain::unseal(&l[..l.len() - 1]).unwrap().1.to_owned(),
                );
                let forger_key = key.map(|_| b"not-the-key-0123456789".as_slice());
                let (line, _) = chain::seal(serde_json::to_vec(&r).unwrap(), forger_key);
                lines.insert(at, line);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// An intact log verifies; one damaged anywhere (a changed byte, a removed, swapped,
        /// duplicated or forged record) does not, keyed or not. A forged record is always
        /// followed by a real one here, whose `prev` no longer fits.
        #[test]
        fn any_single_damage_is_detected(n in 3u64..12, d in damage(), keyed in any::<bool>()) {
            let key: Option<&[u8]> = keyed.then_some(b"0123456789abcdef-audit-key".as_slice());
            let mut lines = log(n, key);
            prop_assert!(check(&lines, key).is_ok());
            let before = lines.clone();
            apply(&mut lines, &d, key);
            prop_assume!(lines != before);
            prop_assert!(check(&lines, key).is_err(), "undetected: {:?}", d);
        }
    }
}
