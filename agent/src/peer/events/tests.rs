use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;

use super::*;

enum Item {
    Ev(Event),
    Overflow,
    Fail,
}

/// A socket whose queue the test fills: what the kernel would have queued.
#[derive(Default)]
struct Fake {
    queue: Mutex<VecDeque<Item>>,
    recvs: AtomicUsize,
}

impl Fake {
    fn push(&self, item: Item) {
        self.queue.lock().unwrap().push_back(item);
    }

    fn exec(&self, pid: u32) {
        self.push(Item::Ev(Event { what: PROC_EVENT_EXEC, pid, tgid: pid, ack: 0 }));
    }

    fn recvs(&self) -> usize {
        self.recvs.load(Ordering::SeqCst)
    }
}

impl EventSocket for Fake {
    fn recv(&self, each: &mut dyn FnMut(Event)) -> Recv {
        self.recvs.fetch_add(1, Ordering::SeqCst);
        match self.queue.lock().unwrap().pop_front() {
            None => Recv::Empty,
            Some(Item::Ev(e)) => {
                each(e);
                Recv::Got
            }
            Some(Item::Overflow) => Recv::Overflow,
            Some(Item::Fail) => Recv::Failed(io::Error::other("test failure")),
        }
    }

    fn wait(&self, _timeout_ms: i32) -> io::Result<()> {
        Ok(())
    }
}

fn active() -> (Arc<Source>, Arc<Fake>) {
    let source = Arc::new(Source::new());
    let fake = Arc::new(Fake::default());
    source.activate(Arc::clone(&fake) as Arc<dyn EventSocket>);
    (source, fake)
}

/// The reader thread's turn, then a request whose bytes arrived after it.
fn reader_drains(source: &Source) {
    source.wait_and_drain(0).unwrap();
}

#[test]
fn a_clean_watch_vouches_without_a_syscall_once_the_reader_drained_past_the_request() {
    let (source, fake) = active();
    let w = source.watch(4242);
    let mark = w.mark();
    let stamp = now();
    reader_drains(&source);
    let before = fake.recvs();
    assert!(w.vouches(mark, stamp));
    assert_eq!(fake.recvs(), before, "drained_at > stamp: no receive needed");
}

/// The lag (issue 19): the exec event is queued before the new program writes its request,
/// but the reader thread has not read it yet. The request must not be vouched for.
#[test]
fn an_exec_queued_but_not_yet_read_is_not_vouched_for() {
    let (source, fake) = active();
    let w = source.watch(4242);
    let mark = w.mark();
    reader_drains(&source);
    fake.exec(4242);
    let stamp = now();
    assert!(!w.vouches(mark, stamp), "the request drains the queue itself and finds the exec");
    assert!(fake.queue.lock().unwrap().is_empty());
    // Re-checked (by the caller) and marked afresh: vouched for again.
    let mark = w.mark();
    assert!(w.vouches(mark, now()));
}

#[test]
fn a_request_newer_than_the_last_drain_drains_once_and_is_vouched_for() {
    let (source, fake) = active();
    let w = source.watch(7);
    let mark = w.mark();
    let stamp = now();
    let before = fake.recvs();
    assert!(w.vouches(mark, stamp));
    assert_eq!(fake.recvs(), before + 1, "one receive, which found the queue empty");
    assert!(w.vouches(mark, stamp), "covered by that drain now: no second receive");
    assert_eq!(fake.recvs(), before + 1);
}

/// A flood (another process's datagrams, or a storm of forks) costs a request at most
/// [`REQUEST_DRAIN_LIMIT`] receives: past that it is re-checked, and the reader thread
/// drains the rest.
#[test]
fn a_request_drains_at_most_its_limit_then_is_rechecked() {
    let (source, fake) = active();
    let w = source.watch(7);
    let mark = w.mark();
    for _ in 0..REQUEST_DRAIN_LIMIT * 3 {
        fake.exec(8);
    }
    let stamp = now();
    let before = fake.recvs();
    assert!(!w.vouches(mark, stamp), "not drained past the request: re-checked");
    assert_eq!(fake.recvs() - before, REQUEST_DRAIN_LIMIT);
    reader_drains(&source);
    assert!(fake.queue.lock().unwrap().is_empty(), "the reader thread drains everything");
    assert!(w.vouches(mark, stamp), "nothing happened to pid 7");
}

#[test]
fn events_of_other_processes_and_other_kinds_do_not_dirty() {
    let (source, fake) = active();
    let w = source.watch(10);
    let mark = w.mark();
    fake.exec(11);
    fake.push(Item::Ev(Event { what: 0x1, pid: 10, tgid: 10, ack: 0 })); // fork of the watched pid
    fake.push(Item::Ev(Event { what: 0x200, pid: 10, tgid: 10, ack: 0 })); // comm
    assert!(w.vouches(mark, now()));
}

#[test]
fn exit_of_any_thread_and_id_changes_dirty() {
    for what in [PROC_EVENT_EXIT, PROC_EVENT_UID, PROC_EVENT_GID, PROC_EVENT_EXEC] {
        let (source, fake) = active();
        let w = source.watch(10);
        let mark = w.mark();
        fake.push(Item::Ev(Event { what, pid: 12, tgid: 10, ack: 0 }));
        assert!(!w.vouches(mark, now()), "{what:#x}");
    }
}

#[test]
fn an_overflow_dirties_every_watch_once() {
    let (source, fake) = active();
    let (a, b) = (source.watch(1), source.watch(2));
    let (ma, mb) = (a.mark(), b.mark());
    fake.push(Item::Overflow);
    assert!(!a.vouches(ma, now()));
    assert!(!b.vouches(mb, now()), "every watch, not only the one whose request drained");
    assert!(source.active(), "events flow again after an overflow");
    let ma = a.mark();
    assert!(a.vouches(ma, now()), "checked again after the overflow: vouched for");
}

#[test]
fn a_lost_source_vouches_for_nothing_until_a_new_check_under_the_next_subscription() {
    let (source, _fake) = active();
    let w = source.watch(3);
    let old = w.mark();
    source.lose();
    assert!(!source.active());
    assert!(!w.vouches(old, now()));
    let while_lost = w.mark();
    assert!(!w.vouches(while_lost, now()), "a check made with no subscription proves nothing later");
    source.activate(Arc::new(Fake::default()));
    assert!(!w.vouches(old, now()), "the old subscription's check is not trusted again");
    assert!(!w.vouches(while_lost, now()));
    let fresh = w.mark();
    assert!(w.vouches(fresh, now()));
}

#[test]
fn a_failing_socket_makes_the_source_inactive() {
    let (source, fake) = active();
    let w = source.watch(3);
    let mark = w.mark();
    fake.push(Item::Fail);
    assert!(!w.vouches(mark, now()));
    assert!(!source.active());
    assert!(source.wait_and_drain(0).is_err(), "the reader thread learns it must re-subscribe");
}

#[test]
fn a_source_never_activated_vouches_for_nothing() {
    let source = Arc::new(Source::new());
    let w = source.watch(3);
    assert!(!w.vouches(w.mark(), now()));
}

#[test]
fn watches_are_shared_per_pid_and_unregistered_with_the_last() {
    let (source, fake) = active();
    let (a, b) = (source.watch(5), source.watch(5));
    let (ma, mb) = (a.mark(), b.mark());
    fake.exec(5);
    assert!(!a.vouches(ma, now()));
    assert!(!b.vouches(mb, now()), "both connections of the process see its exec");
    drop(a);
    assert!(source.pids.read().unwrap().contains_key(&5));
    drop(b);
    assert!(source.pids.read().unwrap().is_empty());
}

#[test]
fn an_event_during_the_check_counts_against_it() {
    let (source, fake) = active();
    let w = source.watch(9);
    let mark = w.mark(); // taken before the check
    fake.exec(9); // the exec lands while /proc is being read
    reader_drains(&source);
    assert!(!w.vouches(mark, now()));
}

/// One netlink message holding a proc event, as the kernel sends it.
fn datagram(what: u32, pid: u32, tgid: u32) -> Vec<u8> {
    let mut m = vec![0u8; DATA_AT + 24];
    let len = u32::try_from(m.len()).unwrap();
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
    m[16..20].copy_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
    m[20..24].copy_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
    m[EVENT_AT..EVENT_AT + 4].copy_from_slice(&what.to_ne_bytes());
    m[DATA_AT..DATA_AT + 4].copy_from_slice(&pid.to_ne_bytes());
    m[DATA_AT + 4..DATA_AT + 8].copy_from_slice(&tgid.to_ne_bytes());
    m
}

#[test]
fn parses_every_message_of_a_datagram_and_skips_junk() {
    let mut d = datagram(PROC_EVENT_EXEC, 7, 7);
    d.extend(datagram(PROC_EVENT_EXIT, 8, 7));
    let mut got = Vec::new();
    parse(&d, &mut |e| got.push(e));
    assert_eq!(
        got,
        [
            Event { what: PROC_EVENT_EXEC, pid: 7, tgid: 7, ack: 0 },
            Event { what: PROC_EVENT_EXIT, pid: 8, tgid: 7, ack: 0 }
        ]
    );
    let mut other = datagram(PROC_EVENT_EXEC, 7, 7);
    other[16] = 9; // another connector index
    let mut n = 0;
    parse(&other, &mut |_| n += 1);
    parse(&d[..30], &mut |_| n += 1);
    parse(&[0xff; 8], &mut |_| n += 1);
    parse(&[], &mut |_| n += 1);
    assert_eq!(n, 0);
}

#[test]
fn listen_message_is_a_connector_message_with_the_filter() {
    let m = listen_message(true, 77);
    assert_eq!(u32_at(&m, 0), Some(u32::try_from(m.len()).unwrap()));
    assert_eq!(u32_at(&m, 16), Some(libc::CN_IDX_PROC));
    assert_eq!(&m[32..34], &8u16.to_ne_bytes(), "proc_input: op and event mask");
    assert_eq!(u32_at(&m, EVENT_AT), Some(1), "PROC_CN_MCAST_LISTEN");
    assert_eq!(u32_at(&m, EVENT_AT + 4), Some(WATCHED));
    assert_eq!(u32_at(&m, 28), Some(77), "the ack number the kernel answers with, plus one");
    assert_eq!(listen_message(false, 77).len(), EVENT_AT + 4);
}

/// With the real proc connector (as root, in the initial namespaces; skipped elsewhere): a
/// child's exec is counted against a watch on it.
#[test]
fn the_kernel_reports_a_watched_childs_exec() {
    let socket = match subscribe() {
        Ok(s) => s,
        Err(Unusable::ForGood(why) | Unusable::ForNow(why)) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let source = Arc::new(Source::new());
    source.activate(socket);
    let mut child = std::process::Command::new("sh")
        .args(["-c", "read x; exec sleep 0"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let w = source.watch(child.id());
    // The child's own exec of `sh` (done when spawn returns) may still be queued: counted
    // now, conservatively.
    let _ = w.vouches(w.mark(), now());
    let mark = w.mark();
    assert!(w.vouches(mark, now()), "nothing happened to it since");
    drop(child.stdin.take()); // EOF: the shell execs
    child.wait().unwrap();
    assert!(!w.vouches(mark, now()), "its exec (and exit) were reported");
}

/// The connector socket is connected to the kernel: another local socket's datagram to its
/// port is refused, so no process can fill the queue requests drain (as root; skipped
/// without `CAP_NET_ADMIN`).
#[test]
fn another_process_cannot_send_to_the_connector_socket() {
    let ours = match sys::proc_connector_socket(1 << 16) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let port = sys::netlink_port(ours.as_fd()).unwrap();
    assert_ne!(port, 0);
    // A stand-in for a hostile process: any other netlink socket of this family.
    let theirs = sys::proc_connector_socket(1 << 16).unwrap();
    let err = sys::netlink_send(theirs.as_fd(), &datagram(PROC_EVENT_EXEC, 1, 1), port).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
    // Events may arrive (another test's subscription makes the kernel send them to the
    // group); none from another port.
    let mut buf = [0u8; 4096];
    loop {
        match sys::netlink_recv(ours.as_fd(), &mut buf) {
            Ok((_, from)) => assert_eq!(from, 0, "a datagram from port {from} was queued"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
