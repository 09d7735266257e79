//! systemd: the notify protocol against a fake `NOTIFY_SOCKET`, the unit file under
//! `systemd-analyze`, and `kvbroker health`'s exit codes for probes; `sandbox`: the agent
//! inside the unit's sandbox, rebuilt without systemd.

mod sandbox;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, TempDir, bin, canary, kvb, raw_get, run};

/// What systemd would have received: each datagram's lines, with when it came.
#[derive(Clone, Default)]
pub(super) struct Received(Arc<Mutex<Vec<(Instant, String)>>>);

impl Received {
    /// Binds `path` and records every datagram until the test ends.
    pub(super) fn listen(path: &Path) -> Received {
        let sock = UnixDatagram::bind(path).unwrap();
        // Like systemd's: any uid may send (the sandboxed agent runs as its own user).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let got = Received::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let now = Instant::now();
                sink.0.lock().unwrap().extend(text.lines().map(|l| (now, l.to_owned())));
            }
        });
        got
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    fn pings_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.lines()
            .into_iter()
            .filter(|(t, l)| l == "WATCHDOG=1" && *t >= from && *t <= to)
            .map(|(t, _)| t)
            .collect()
    }

    /// Waits (at most `limit`) for a line that `pred` accepts; returns when it came.
    pub(super) fn wait_for(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((t, _)) = self.lines().into_iter().find(|(_, l)| pred(l)) {
                return Some(t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn text(&self) -> String {
        self.lines().into_iter().map(|(_, l)| l + "\n").collect()
    }
}

/// The agent tells systemd it is ready only once its socket answers, pings the watchdog at
/// WatchdogSec/2 only while it serves (not while stopped, not while its socket is gone),
/// keeps STATUS= current, and says STOPPING=1 at SIGTERM before it exits.
#[test]
fn notify_ready_watchdog_status_and_stopping() {
    let value = canary("notify");
    let dir = TempDir::new("notify-rx");
    let notify = dir.path().join("notify.sock");
    let got = Received::listen(&notify);
    let spawned = Instant::now();
    // WatchdogSec=1s: a ping every 500 ms.
    let mut agent = Agent::builder("notify")
        .secret("s", &value)
        .allow_uid(0)
        .env("NOTIFY_SOCKET", notify.to_str().unwrap())
        .env("WATCHDOG_USEC", "1000000")
        .start();
    let (code, out, _) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (0, value.as_str()));

    let ready = got.wait_for(Duration::from_secs(10), |l| l == "READY=1").expect("READY=1 never came");
    assert!(ready >= spawned);
    let first_ping = got.wait_for(Duration::from_secs(3), |l| l == "WATCHDOG=1").expect("no WATCHDOG=1");
    assert!(first_ping > ready, "a watchdog ping before READY=1:\n{}", got.text());
    let status =
        got.lines().into_iter().find(|(t, l)| *t == ready && l.starts_with("STATUS=")).map(|(_, l)| l);
    assert_eq!(
        status.as_deref(),
        Some(format!("STATUS=serving; 1 rule(s), 1 vault(s), socket {}", agent.socket.display()).as_str()),
        "READY=1 carries the status:\n{}",
        got.text()
    );

    // Cadence: about every 500 ms, never a gap near WatchdogSec.
    let from = Instant::now();
    std::thread::sleep(Duration::from_millis(3000));
    let pings = got.pings_between(from, Instant::now());
    assert!(
        (4..=8).contains(&pings.len()),
        "{} pings in 3 s at WatchdogSec=1s:\n{}",
        pings.len(),
        got.text()
    );
    let widest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(widest < Duration::from_millis(900), "a gap of {widest:?} between pings");

    // A stopped agent sends nothing; resumed, it pings again.
    agent.proc.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(2000));
    let resumed = Instant::now();
    agent.proc.signal(libc::SIGCONT);
    // A datagram sent just before the stop may land a moment after it.
    let during = got.pings_between(stopped + Duration::from_millis(100), resumed);
    assert!(during.is_empty(), "{} ping(s) while the agent was stopped", during.len());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!got.pings_between(resumed, Instant::now()).is_empty(), "no ping after SIGCONT");

    // The pings come through the socket: with the socket file moved away, none; back, again.
    let away = agent.dir.path().join("agent.sock.away");
    std::fs::rename(&agent.socket, &away).unwrap();
    let moved = Instant::now();
    got.wait_for(Duration::from_secs(3), |l| {
        l.starts_with("STATUS=not serving:") && l.contains("cannot connect")
    })
    .unwrap_or_else(|| panic!("no not-serving STATUS:\n{}", got.text()));
    std::thread::sleep(Duration::from_millis(1500));
    let back = Instant::now();
    std::fs::rename(&away, &agent.socket).unwrap();
    let during = got.pings_between(moved + Duration::from_millis(600), back);
    assert!(during.is_empty(), "{} ping(s) while the socket was gone:\n{}", during.len(), got.text());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!got.pings_between(back, Instant::now()).is_empty(), "no ping once the socket was back");
    let serving_again = got.lines().into_iter().filter(|(t, l)| *t > back && l == "STATUS=serving").count();
    assert_eq!(serving_again, 1, "STATUS=serving once, when it changed back:\n{}", got.text());

    // SIGTERM: STOPPING=1 while the agent still runs (it drains after), no ping after it.
    agent.proc.signal(libc::SIGTERM);
    let stopping = got.wait_for(Duration::from_secs(5), |l| l == "STOPPING=1").expect("no STOPPING=1");
    let status = agent.proc.wait_timeout(Duration::from_secs(30)).expect("agent did not stop");
    assert!(status.success(), "{status}");
    assert!(got.pings_between(stopping, Instant::now()).is_empty(), "a ping after STOPPING=1");
    assert!(got.text().contains("STATUS=stopping: draining in-flight requests"));
    agent.assert_no_canary(&[&value], &[&got.text()]);
}

/// A degraded agent (audit disk full: reads fail closed) still serves, so it still pings the
/// watchdog — a restart would not free the disk and would drop the cache — and says why in
/// STATUS=; once space is back, STATUS=serving again.
#[test]
fn degraded_agent_still_pings_and_says_why() {
    let value = canary("degraded");
    let dir = TempDir::new("degraded-rx");
    let got = Received::listen(&dir.path().join("notify.sock"));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (code, _, err) =
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&mnt));
    assert_eq!(code, 0, "mount tmpfs (tests run as root): {err}");
    let _unmount = Unmount(mnt.clone());
    let agent = Agent::builder("degraded")
        .secret("s", &value)
        .allow_uid(0)
        .audit_path(mnt.join("audit.jsonl"))
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock").to_str().unwrap())
        .env("WATCHDOG_USEC", "600000")
        .start();
    got.wait_for(Duration::from_secs(10), |l| l == "READY=1").expect("READY=1");

    // Fill the disk; reads then fail closed (503) and health turns degraded.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[b'x'; 4096]).is_ok() {}
        while f.write_all(b"x").is_ok() {}
    }
    let failed = (0..40).any(|_| raw_get(&agent.socket, "/v1/secrets/s", &[]).unwrap().0 == 503);
    assert!(failed, "audit writes never failed on a full disk");
    let degraded = got
        .wait_for(Duration::from_secs(5), |l| {
            l.starts_with("STATUS=serving, degraded: ") && l.contains("audit log")
        })
        .unwrap_or_else(|| panic!("no degraded STATUS:\n{}", got.text()));
    std::thread::sleep(Duration::from_millis(1500));
    let pings = got.pings_between(degraded, Instant::now()).len();
    assert!(pings >= 3, "{pings} pings in 1.5 s while degraded (one every 300 ms expected)");

    std::fs::remove_file(&filler).unwrap();
    let (code, out, _) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (0, value.as_str()));
    got.wait_for(Duration::from_secs(5), |l| l == "STATUS=serving")
        .filter(|t| *t > degraded)
        .unwrap_or_else(|| panic!("no STATUS=serving after recovery:\n{}", got.text()));
    agent.assert_no_canary(&[&value], &[&got.text()]);
}

/// Unmounts (lazily) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An agent not started by systemd never connects to itself: nothing in the log about it.
#[test]
fn no_notify_socket_no_notifications() {
    let mut agent = Agent::builder("nonotify").secret("s", "v").allow_uid(0).start();
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    assert!(!agent.output().contains("systemd"), "{}", agent.output());
}

/// The unit as shipped: exposure <= 2.0 under `systemd-analyze security --offline=yes`, and
/// `systemd-analyze verify` has nothing to say (run on a copy naming the built binary, as
/// the unit's /usr/bin/kvbroker exists only once the package is installed).
#[test]
fn unit_is_hardened_and_verifies() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED unit_is_hardened_and_verifies: systemd-analyze is not installed");
        return;
    };
    let unit = repo().join("deploy/systemd/kvbroker.service");
    let (code, out, err) =
        run(Command::new(&analyze).args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    assert_eq!(code, 0, "{out}{err}");
    let text = out + &err;
    let level = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for kvbroker.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");

    let dir = TempDir::new("unit-verify");
    let copy = dir.path().join("kvbroker.service");
    let body = std::fs::read_to_string(&unit).unwrap();
    assert!(body.contains("/usr/bin/kvbroker "), "the unit runs /usr/bin/kvbroker");
    std::fs::write(&copy, body.replace("/usr/bin/kvbroker ", &format!("{} ", bin("kvbroker").display())))
        .unwrap();
    let (code, out, err) = run(Command::new(&analyze).args(["verify", "--man=no"]).arg(&copy));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""), "systemd-analyze verify");
}

/// `kvbroker health`: 0 for a healthy agent (and --ready), 1 with the reason for a degraded
/// answer, no agent, a socket that never answers, or one that does not speak HTTP.
#[test]
fn health_exit_codes() {
    let agent = Agent::builder("health").secret("s", "v").allow_uid(0).start();
    let health = |args: &[&str]| run(Command::new(bin("kvbroker")).arg("health").args(args));
    let sock = agent.socket.to_str().unwrap();
    assert_eq!(health(&["--socket", sock]), (0, format!("{sock}: healthy\n"), String::new()));
    assert_eq!(health(&["--socket", sock, "--ready"]), (0, format!("{sock}: ready\n"), String::new()));
    let (code, out, _) = run(Command::new(bin("kvbroker")).arg("health").env("KVBROKER_SOCKET", sock));
    assert_eq!((code, out), (0, format!("{sock}: healthy\n")), "KVBROKER_SOCKET is used");

    let dir = TempDir::new("health-fakes");
    let degraded = fake_server(&dir.path().join("degraded.sock"), |_| {
        let body = r#"{"status":"degraded","reasons":["audit log /x is not writable","1 cached secret(s) served stale"]}"#;
        format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    });
    let (code, out, err) = health(&["--socket", degraded.to_str().unwrap()]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!(
            "kvbroker health: {}: not healthy: degraded: audit log /x is not writable; 1 cached secret(s) served stale\n",
            degraded.display()
        )
    );
    // --ready asks /v1/health?ready; an answer that is not 200 is "not ready".
    let not_ready = fake_server(&dir.path().join("notready.sock"), |req| {
        assert!(req.starts_with("GET /v1/health?ready HTTP/1.1\r\n"), "{req}");
        let body = r#"{"status":"starting","reasons":["prefetch pending"]}"#;
        format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    });
    let (code, _, err) = health(&["--socket", not_ready.to_str().unwrap(), "--ready"]);
    assert_eq!(
        (code, err),
        (1, format!("kvbroker health: {}: not ready: starting: prefetch pending\n", not_ready.display()))
    );

    let missing = dir.path().join("missing.sock");
    let (code, _, err) = health(&["--socket", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("kvbroker health: {}: cannot connect: ", missing.display())), "{err}");

    let silent_path = dir.path().join("silent.sock");
    let _silent = UnixListener::bind(&silent_path).unwrap(); // accepts (backlog), never answers
    let started = Instant::now();
    let (code, _, err) = health(&["--socket", silent_path.to_str().unwrap(), "--timeout", "300ms"]);
    assert_eq!(code, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err,
        format!(
            "kvbroker health: {}: no answer within 300ms (the agent may be overloaded or hung)\n",
            silent_path.display()
        )
    );

    let not_http = fake_server(&dir.path().join("nothttp.sock"), |_| "SSH-2.0-OpenSSH_9.2\r\n\r\n".into());
    let (code, _, err) = health(&["--socket", not_http.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("the answer is not HTTP/1.1"), "{err}");

    let (code, _, err) = health(&["--socket", sock, "--timeout", "soon"]);
    assert_eq!(code, 2, "bad usage: {err}");
    assert_eq!(raw_get(&agent.socket, "/v1/health", &[]).unwrap().0, 200);
}

/// A socket answering each connection with `answer(request)`; returns its path.
fn fake_server(path: &Path, answer: impl Fn(&str) -> String + Send + 'static) -> PathBuf {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = vec![0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer(&String::from_utf8_lossy(&req)).as_bytes());
        }
    });
    path.to_owned()
}

pub(super) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

pub(super) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}
