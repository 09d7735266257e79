//! Issue 17: a rotation reaches every job. Watchers survive agent restarts, a stop answers
//! open long polls at once, `kvbroker dev rotate` makes a new version, and `kvb` delivers
//! new versions to files, templates and supervised processes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, Proc, bin, canary, raw_get, raw_request};
use serde_json::{Value, json};

/// Lines of a child's stdout, read on a thread so a test can wait with a deadline.
pub(crate) struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub(crate) fn of(out: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    pub(crate) fn next(&self, what: &str, limit: Duration) -> String {
        self.0.recv_timeout(limit).unwrap_or_else(|e| panic!("no line for {what} within {limit:?}: {e}"))
    }

    /// Asserts nothing more arrives within `quiet`.
    pub(crate) fn none_within(&self, what: &str, quiet: Duration) {
        if let Ok(l) = self.0.recv_timeout(quiet) {
            panic!("unexpected line ({what}): {l}");
        }
    }
}

pub(crate) fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kvb_watch(socket: &std::path::Path, name: &str) -> (Proc, Lines) {
    let mut cmd = Command::new(bin("kvb"));
    cmd.args(["watch", name]).env("KVBROKER_SOCKET", socket).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let lines = Lines::of(child.stdout.take().unwrap());
    (Proc::adopt(child), lines)
}

/// Issue 17: `kvb watch` died when the agent restarted. It now reconnects and resumes from
/// the last version it printed: a version made while the agent was down is printed once,
/// the next one too, and nothing is printed twice.
#[test]
fn kvb_watch_across_an_agent_restart_prints_each_version_once() {
    let (v1, v2, v3) = (canary("w1"), canary("w2"), canary("w3"));
    let emu = EmulatorProc::start(&[("db-password", &v1)]);
    let mut agent = Agent::builder("watch-restart")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .cache("refresh_interval = \"1s\"")
        .start();
    let (_watcher, lines) = kvb_watch(&agent.socket, "db-password");
    let first = lines.next("the current version", Duration::from_secs(10));
    assert_eq!(first.len(), 32, "{first}");

    let stopped = Instant::now();
    agent.stop();
    let stop_took = stopped.elapsed();
    let id2 = emu.set_secret("db-password", &v2, json!({}));
    std::thread::sleep(Duration::from_millis(300));
    agent.spawn();
    assert_eq!(lines.next("the version made while down", Duration::from_secs(15)), id2);
    let id3 = emu.set_secret("db-password", &v3, json!({}));
    assert_eq!(lines.next("the next rotation", Duration::from_secs(10)), id3);
    lines.none_within("no duplicate", Duration::from_millis(2500));
    assert!(stop_took < Duration::from_secs(2), "a stop with one watcher took {stop_took:?}");
    agent.assert_no_canary(&[&v1, &v2, &v3], &[]);
}

/// Issue 17: a stop with watchers open waited out the whole `shutdown_grace`. Now every open
/// long poll is answered 503 `AgentStopping` with `Retry-After` at once, and 100 of them
/// stop in well under a second.
#[test]
fn stop_with_100_open_long_polls_takes_under_a_second() {
    let value = canary("stop100");
    let mut agent = Agent::builder("stop100").secret("s", &value).allow_uid(0).grace("12s").start();
    let (_, body) = raw_get(&agent.socket, "/v1/secrets/s", &[]).unwrap();
    let version = serde_json::from_str::<Value>(&body).unwrap()["version"].as_str().unwrap().to_owned();
    let polls: Vec<_> = (0..100)
        .map(|_| {
            let (sock, v) = (agent.socket.clone(), version.clone());
            std::thread::spawn(move || {
                raw_request(&sock, "GET", &format!("/v1/secrets/s?changed_from={v}&wait=60"), &[]).unwrap()
            })
        })
        .collect();
    // Every poll is in: the agent has audited nothing for them yet, but 100 connections are open.
    wait_for("100 open long polls", Duration::from_secs(10), || open_conns(agent.proc.pid()) >= 100);
    let t = Instant::now();
    agent.stop();
    let took = t.elapsed();
    for p in polls {
        let (status, head, body) = p.join().unwrap();
        assert_eq!(status, 503, "{head}\n{body}");
        assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "AgentStopping");
    }
    eprintln!("stop with 100 open long polls took {took:?}");
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    agent.assert_no_canary(&[&value], &[]);
}

/// Unix sockets the process holds (its listening sockets included).
fn open_conns(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}
