//! Connection budgets (issue 13): at systemd's default fd limit, one uid holding many
//! connections starved the agent, and one worker leaking idle connections locked its uid's
//! other processes out.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, Proc, TempDir, bin, canary, kvb, raw_get, run};

const NOBODY: u32 = 65534;

/// `kvbroker-connhold` as `uid`, holding `count` connections until dropped; returns it and
/// its report (`held N ok M`).
/// A copy of a built binary that `uid` can run: the checkout may sit in a directory only
/// root can enter (a fresh CI clone under `mktemp -d`), which another uid cannot exec from.
fn runnable_by_anyone(dir: &TempDir, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path().join(name);
    std::fs::copy(bin(name), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn hold(socket: &std::path::Path, uid: u32, count: usize, request: bool) -> (Proc, String, TempDir) {
    let bins = TempDir::new("connhold-bin");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).arg("--clear-groups");
    // Its own fd limit, above what it opens.
    cmd.arg("prlimit")
        .arg("--nofile=4096:4096")
        .arg("--")
        .arg(runnable_by_anyone(&bins, "kvbroker-connhold"));
    cmd.arg(socket).arg(count.to_string());
    if request {
        cmd.arg("--request");
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn kvbroker-connhold");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc::adopt(child);
    // Bounded: the holder gives up on each connection after 5 s; 1,100 of them answered at
    // once take well under a minute even on a loaded machine.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).expect("kvbroker-connhold reported in time");
    (proc, line.trim().to_owned(), bins)
}

fn held(report: &str) -> (usize, usize) {
    let w: Vec<&str> = report.split_whitespace().collect();
    assert_eq!((w.len(), w[0], w[2]), (4, "held", "ok"), "{report}");
    (w[1].parse().unwrap(), w[3].parse().unwrap())
}

/// Another uid holding 1,100 keep-alive connections (each polling `/v1/health`) against an
/// agent at a 1,024-fd limit: root still reads within a second; the holder keeps at most
/// its cap, and over-cap connections were answered 429 and closed, not kept.
#[test]
fn another_uids_1100_connections_leave_room_for_root() {
    let value = canary("fds");
    let agent =
        Agent::builder("fds").secret("db", &value).allow_uid(0).socket_mode("0666").nofile(1024).start();
    let (holder, report, _bins) = hold(&agent.socket, NOBODY, 1100, true);
    let (open, ok) = held(&report);
    let t = Instant::now();
    let answer = raw_get(&agent.socket, "/v1/secrets/db", &[]);
    let took = t.elapsed();
    let (status, body) = answer.unwrap_or_else(|e| panic!("root's read failed after {took:?}: {e}"));
    assert_eq!(status, 200, "root's read, with {report}");
    assert!(body.contains(&value), "root's read returned the value");
    assert!(took < Duration::from_secs(1), "root's read took {took:?}");
    assert!(open <= 256, "the uid holds at most its cap: {report}");
    assert!(ok >= 200, "its connections up to the cap are served: {report}");
    let (code, _, _) = run(kvb(&agent.socket, None).args(["get", "db"]).stdout(Stdio::null()));
    assert_eq!(code, 0);
    eprintln!("root read with {open} held by uid {NOBODY}: {took:?}");
    drop(holder);
    // The agent is still well and serving after the holder goes.
    assert_eq!(raw_get(&agent.socket, "/v1/health", &[]).unwrap().0, 200);
    agent.assert_no_canary(&[&value], &[]);
}

/// A worker leaking 1,000 idle connections does not lock out its own uid: a fresh read by
/// another process of that uid is served (the longest-idle connection gives way).
#[test]
fn idle_connections_of_a_uid_give_way_to_a_fresh_read() {
    let value = canary("idle");
    let agent = Agent::builder("idle")
        .secret("db", &value)
        .allow_uid(NOBODY)
        .socket_mode("0666")
        .nofile(1024)
        .start();
    let (_holder, report, bins) = hold(&agent.socket, NOBODY, 1000, true);
    let (open, ok) = held(&report);
    let t = Instant::now();
    let mut as_nobody = Command::new("setpriv");
    as_nobody.arg(format!("--reuid={NOBODY}")).arg(format!("--regid={NOBODY}")).arg("--clear-groups");
    as_nobody.arg(runnable_by_anyone(&bins, "kvb")).env("KVBROKER_SOCKET", &agent.socket);
    let (code, out, err) = run(as_nobody.args(["get", "db"]));
    let took = t.elapsed();
    assert!(
        code == 0 && out.trim_end() == value,
        "kvb get as uid {NOBODY} with {report}: exit {code}, {err}"
    );
    assert!(took < Duration::from_secs(1), "the fresh read took {took:?}");
    assert!(open >= 100, "the leaked connections are held: {report}");
    assert_eq!(ok, 1000, "each of them was served in turn: {report}");
    eprintln!("fresh read by uid {NOBODY} with {open} idle connections held: {took:?}");
    agent.assert_no_canary(&[&value], &[&err]);
}

/// A served connection's count in `kvbroker_connections` (idle + busy), from the admin socket.
fn served_connections(agent: &Agent) -> f64 {
    let admin = agent.dir.path().join("admin.sock");
    let (status, _, text) = kvbroker_tests::raw_request(&admin, "GET", "/metrics", &[]).unwrap();
    assert_eq!(status, 200, "{text}");
    ["idle", "busy"]
        .iter()
        .map(|s| {
            let key = format!("kvbroker_connections{{state=\"{s}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum()
}

/// A connection evicted while its client does not read its answers (hyper's path: pipelined
/// requests, the agent's write blocked) is dropped within the limit. Its place went to the
/// newer connection at once, so kept open it let a uid hold any number of connections past
/// its cap, each one taking from the budget every uid shares.
#[test]
fn an_evicted_connection_that_does_not_read_is_dropped() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let value = canary("unread");
    let agent =
        Agent::builder("unread").secret("db", &value).allow_uid(0).limits("connections_per_uid = 2").start();
    // A: pipelined health requests whose answers are never read, until the agent's write
    // blocks and then the test's own.
    let a = UnixStream::connect(&agent.socket).unwrap();
    a.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let (sent, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (mut a, sent, ended) = (a.try_clone().unwrap(), Arc::clone(&sent), Arc::clone(&ended));
        std::thread::spawn(move || {
            let batch = b"GET /v1/health HTTP/1.1\r\nHost: kvbroker\r\n\r\n".repeat(64);
            while a.write_all(&batch).is_ok() {
                sent.fetch_add(batch.len(), Ordering::Relaxed);
            }
            ended.store(true, Ordering::Release);
        })
    };
    // Blocked when nothing more goes out for half a second.
    let mut last = usize::MAX;
    while sent.load(Ordering::Relaxed) != last {
        last = sent.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!ended.load(Ordering::Acquire), "the agent closed the unread connection before any eviction");
    let read_on = |s: &mut UnixStream| {
        s.write_all(b"GET /v1/secrets/db HTTP/1.1\r\nHost: kvbroker\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    };
    // B, then C: C's arrival puts the uid over its cap of 2, and A, idle longest, gives way.
    let mut b = UnixStream::connect(&agent.socket).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_on(&mut b);
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_on(&mut c);
    let evicted = Instant::now();
    // The agent drops A within its limit (10 s): the test's blocked write then fails.
    while !ended.load(Ordering::Acquire) && evicted.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = evicted.elapsed();
    assert!(ended.load(Ordering::Acquire), "the evicted, unread connection was still open after {took:?}");
    writer.join().unwrap();
    eprintln!("evicted unread connection dropped after {took:?}");
    assert_eq!(served_connections(&agent), 2.0, "B and C are served; A's place is gone with it");
    read_on(&mut b);
    read_on(&mut c);
    drop(a);
    agent.assert_no_canary(&[&value], &[]);
}
