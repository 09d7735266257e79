//! Issue 17: a rotation reaches every job. Watchers survive agent restarts, a stop answers
//! open long polls at once, `kvbroker dev rotate` makes a new version, and `kvb` delivers
//! new versions to files, templates and supervised processes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use kvbroker_tests::{Agent, EmulatorProc, Proc, TempDir, bin, canary, raw_get, raw_request, run};
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

/// A running `kvbroker dev` in its own directory; stopped when dropped.
struct DevAgent {
    dir: TempDir,
    proc: Proc,
}

impl DevAgent {
    fn start(tag: &str) -> DevAgent {
        let dir = TempDir::new(tag);
        let mut cmd = Command::new(bin("kvbroker"));
        cmd.args(["dev", "--dir"]).arg(dir.path().join("dev")).env_remove("RUST_LOG");
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(dir.path().join("dev.out")).unwrap());
        cmd.stderr(std::fs::File::create(dir.path().join("dev.err")).unwrap());
        let proc = Proc::spawn(&mut cmd);
        let dev = DevAgent { dir, proc };
        wait_for("kvbroker dev", Duration::from_secs(20), || {
            raw_get(&dev.socket(), "/v1/health", &[]).map(|r| r.0).unwrap_or(0) == 200
        });
        dev
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("dev/agent.sock")
    }

    fn kvbroker(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(bin("kvbroker"));
        cmd.args(["dev", "--dir"]).arg(self.dir.path().join("dev")).args(args).env_remove("RUST_LOG");
        run(&mut cmd)
    }

    fn texts(&self) -> Vec<String> {
        ["dev.out", "dev.err", "dev/audit.jsonl"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        let _ = self.proc.wait_timeout(Duration::from_secs(10));
    }
}

/// Issue 17: `kvbroker dev` had no way to rotate, and `ctl refresh` re-read nothing. `dev
/// rotate` makes a new version that `kvb watch` prints at once; a hand edit of the vault
/// file is served after `ctl refresh`. No value is printed or logged.
#[test]
fn dev_rotate_is_seen_by_kvb_watch_and_ctl_refresh_rereads_the_file() {
    let (new, edited) = (canary("devrot"), canary("devedit"));
    let dev = DevAgent::start("devrot");
    let (_watcher, lines) = kvb_watch(&dev.socket(), "db-password");
    let first = lines.next("the current version", Duration::from_secs(10));

    let (code, out, err) = dev.kvbroker(&["rotate", "db-password", "--value", &new]);
    assert_eq!(code, 0, "{out}{err}");
    let version = out.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(out.lines().next().unwrap(), format!("rotated default/db-password: version {version}"));
    assert!(out.contains("serves it now"), "{out}");
    let seen = lines.next("the rotated version", Duration::from_secs(5));
    assert_eq!(seen, version);
    assert_ne!(seen, first);
    let (_, got, _) = run(kvbroker_tests::kvb(&dev.socket(), None).args(["get", "db-password"]));
    assert_eq!(got, new);

    let (code, out, err) = dev.kvbroker(&["rotate", "db-password", "--generate", "24"]);
    assert_eq!(code, 0, "{out}{err}");
    let generated = lines.next("the generated version", Duration::from_secs(5));
    assert!(out.contains(&generated), "{out}");
    let (_, got, _) = run(kvbroker_tests::kvb(&dev.socket(), None).args(["get", "db-password"]));
    assert_eq!(got.len(), 32, "24 bytes as base64url");
    lines.none_within("no other version", Duration::from_millis(500));

    // A hand edit, then `ctl refresh`: the file is read again.
    let file = dev.dir.path().join("dev/secrets.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("api-token") { format!("api-token = \"{edited}\"\n") } else { format!("{l}\n") }
        })
        .collect();
    std::fs::write(&file, text).unwrap();
    let mut ctl = Command::new(bin("kvbroker"));
    ctl.args(["ctl", "--dir"]).arg(dev.dir.path().join("dev")).args(["refresh", "api-token"]);
    let (code, out, err) = run(&mut ctl);
    assert_eq!(code, 0, "{out}{err}");
    let (_, got, _) = run(kvbroker_tests::kvb(&dev.socket(), None).args(["get", "api-token"]));
    assert_eq!(got, edited);

    let (code, _, err) = dev.kvbroker(&["rotate", "db-password", "--generate", "8"]);
    assert_eq!((code, err.trim()), (1, "kvbroker: --generate 8: choose 16 to 4096 bytes"));
    for t in dev.texts() {
        assert!(!t.contains(&new) && !t.contains(&edited), "a value in the dev agent's output or audit log");
    }
}
