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
    // Every poll is in: 100 connections with a request in flight (the agent's own gauge; an
    // accepted connection whose request was not read yet would be closed by the stop, not
    // answered, so counting sockets alone raced on a loaded machine).
    wait_for("100 open long polls", Duration::from_secs(20), || busy_conns(&agent) >= 100);
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

/// `kvbroker_connections{state="busy"}` from the admin socket's `/metrics`.
fn busy_conns(agent: &Agent) -> usize {
    let Ok((200, _, text)) = raw_request(&agent.dir.path().join("admin.sock"), "GET", "/metrics", &[]) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("kvbroker_connections{state=\"busy\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
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

fn sha16(value: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("printf %s \"$V\" | sha256sum | cut -c1-16")
        .env("V", value)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn rotating_agent(tag: &str, secrets: &[(&str, &str)]) -> (EmulatorProc, Agent) {
    let emu = EmulatorProc::start(secrets);
    let agent = Agent::builder(tag)
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .cache("refresh_interval = \"1s\"")
        .start();
    (emu, agent)
}

/// Issue 17: `kvb get -o FILE --follow` keeps FILE current. A reader looping on FILE sees
/// only whole versions (never a torn or empty file) while it is rewritten; `--on-change`
/// runs after each rewrite (and after the first write, because FILE held an old value);
/// FILE keeps its owner, is mode 0600, and no temporary file is left.
#[test]
fn follow_rewrites_the_file_atomically_and_runs_on_change() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let a = canary("fa");
    // Large values make a torn write likely to be seen if the rewrite were in place.
    let b = format!("{}{}", canary("fb"), "b".repeat(20_000));
    let c = format!("{}{}", canary("fc"), "c".repeat(24_000));
    let (emu, agent) = rotating_agent("follow", &[("tls-key", &a)]);
    let dir = TempDir::new("follow-out");
    let out = dir.path().join("key.pem");
    let changes = dir.path().join("changes");
    std::fs::write(&out, "old").unwrap();
    std::os::unix::fs::chown(&out, Some(65534), Some(65534)).unwrap();

    let mut cmd = kvbroker_tests::kvb(&agent.socket, None);
    cmd.args(["get", "tls-key", "-o"]).arg(&out).arg("--follow").arg("--on-change");
    cmd.arg(format!("echo \"$KVB_VERSION\" >> {}", changes.display()));
    let stderr = dir.path().join("kvb.err");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap());
    let _follower = Proc::spawn(&mut cmd);
    wait_for("the first write", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t == a)
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (out, stop) = (out.clone(), std::sync::Arc::clone(&stop));
        let allowed = [a.clone(), b.clone(), c.clone()];
        std::thread::spawn(move || {
            let (mut reads, mut bad) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::fs::read_to_string(&out).unwrap_or_default();
                reads += 1;
                if !allowed.contains(&t) {
                    bad += 1;
                }
            }
            (reads, bad)
        })
    };
    let vb = emu.set_secret("tls-key", &b, json!({}));
    wait_for("version b", Duration::from_secs(10), || std::fs::read_to_string(&out).is_ok_and(|t| t == b));
    let vc = emu.set_secret("tls-key", &c, json!({}));
    wait_for("version c", Duration::from_secs(10), || std::fs::read_to_string(&out).is_ok_and(|t| t == c));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, bad) = reader.join().unwrap();
    eprintln!("reader: {reads} reads, {bad} torn or empty");
    assert!(reads > 100, "the reader ran ({reads} reads)");
    assert_eq!(bad, 0, "a reader saw a torn or empty file");

    wait_for("three on-change runs", Duration::from_secs(5), || {
        std::fs::read_to_string(&changes).is_ok_and(|t| t.lines().count() >= 3)
    });
    let ran = std::fs::read_to_string(&changes).unwrap();
    let ran: Vec<&str> = ran.lines().collect();
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert_eq!(&ran[1..], [vb.as_str(), vc.as_str()]);
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "owner kept");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "only key.pem, changes and kvb.err: {left:?}");
    let err = std::fs::read_to_string(&stderr).unwrap();
    agent.assert_no_canary(&[&a, &b[..30], &c[..30]], &[&err]);
}

/// Issue 17: `kvb exec --restart-on-change` restarts the command exactly once per rotation,
/// with the new value in its environment, and exits with the command's own status when it
/// exits by itself.
#[test]
fn restart_on_change_restarts_once_per_rotation_with_the_new_env() {
    let (a, b, c) = (canary("ra"), canary("rb"), canary("rc"));
    let (emu, agent) = rotating_agent("restart", &[("db-password", &a)]);
    let dir = TempDir::new("restart-out");
    let (log, stop) = (dir.path().join("starts"), dir.path().join("stop"));
    let script = format!(
        "printf %s \"$DB\" | sha256sum | cut -c1-16 >> {log}; trap 'exit 0' TERM; \
         while [ ! -e {stop} ]; do sleep 0.05; done; exit 7",
        log = log.display(),
        stop = stop.display()
    );
    let mut cmd = kvbroker_tests::kvb(&agent.socket, None);
    cmd.args([
        "exec",
        "--restart-on-change",
        "--grace",
        "5s",
        "--env",
        "DB=db-password",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let stderr = dir.path().join("kvb.err");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap());
    let mut kvb = Proc::spawn(&mut cmd);
    let starts =
        || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
    wait_for("the first start", Duration::from_secs(10), || starts().len() == 1);
    emu.set_secret("db-password", &b, json!({}));
    wait_for("a restart", Duration::from_secs(10), || starts().len() == 2);
    emu.set_secret("db-password", &c, json!({}));
    wait_for("another restart", Duration::from_secs(10), || starts().len() == 3);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(starts(), [sha16(&a), sha16(&b), sha16(&c)], "one start per version, each with its value");
    std::fs::write(&stop, "").unwrap();
    let status = kvb.wait_timeout(Duration::from_secs(10)).expect("kvb exits with the command");
    assert_eq!(status.code(), Some(7), "the command's own status");
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(err.matches("restarting sh").count(), 2, "{err}");
    agent.assert_no_canary(&[&a, &b, &c], &[&err]);
}

/// Issue 17: `kvb exec --file-env VAR=NAME` gives the command a path to a sealed memfd:
/// the content is the value, nothing is written to disk, the value is not in the command's
/// environment, the file cannot be written, and only kvb holds the fd: neither the command
/// nor a grandchild it starts has it open (so none can pass it on by inheritance).
#[test]
fn file_env_gives_a_sealed_memfd_path_and_no_value_in_environ() {
    let value = canary("fileenv");
    let (_emu, agent) = rotating_agent("fileenv", &[("tls-key", &value)]);
    let dir = TempDir::new("fileenv-out");
    let o = |f: &str| dir.path().join(f).display().to_string();
    let script = format!(
        "printf %s \"$KEYFILE\" > {path}; printf %s \"$(sha256sum < \"$KEYFILE\" | cut -c1-16)\" > {hash}; \
         readlink \"$KEYFILE\" > {link}; tr '\\0' '\\n' < /proc/$$/environ > {environ}; \
         readlink /proc/$$/fd/* > {cmdfds}; sh -c 'readlink /proc/$$/fd/*' > {gcfds}; \
         (printf x >> \"$KEYFILE\") 2>/dev/null; echo $? > {write}; touch {ready}; \
         while [ ! -e {stop} ]; do sleep 0.05; done",
        path = o("path"),
        hash = o("hash"),
        link = o("link"),
        environ = o("environ"),
        cmdfds = o("cmdfds"),
        gcfds = o("gcfds"),
        write = o("write"),
        ready = o("ready"),
        stop = o("stop"),
    );
    let mut cmd = kvbroker_tests::kvb(&agent.socket, None);
    cmd.args(["exec", "--file-env", "KEYFILE=tls-key", "--", "sh", "-c", &script]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut kvb = Proc::spawn(&mut cmd);
    wait_for("the command", Duration::from_secs(10), || dir.path().join("ready").exists());
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert!(read("path").starts_with(&format!("/proc/{}/fd/", kvb.pid())), "{}", read("path"));
    assert_eq!(read("hash"), sha16(&value), "the file holds the value");
    assert!(read("link").starts_with("/memfd:kvb-tls-key"), "an in-memory file: {}", read("link"));
    assert_ne!(read("write").trim(), "0", "the sealed file refused a write");
    assert!(!read("environ").contains(&value), "no value in the environment");
    let kvb_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", kvb.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(kvb_fds.iter().any(|l| l.contains("memfd:kvb-tls-key")), "kvb holds the file: {kvb_fds:?}");
    for (who, f) in [("the command", "cmdfds"), ("a grandchild", "gcfds")] {
        let fds = read(f);
        assert!(fds.contains("pipe:") || fds.contains("/dev/null"), "{who}'s fds were listed: {fds}");
        assert!(!fds.contains("memfd"), "{who} holds the memfd: {fds}");
    }
    std::fs::write(dir.path().join("stop"), "").unwrap();
    assert_eq!(kvb.wait_timeout(Duration::from_secs(10)).unwrap().code(), Some(0));
    let on_disk =
        Command::new("grep").args(["-rl", &value]).arg(dir.path()).arg(agent.dir.path()).output().unwrap();
    assert!(on_disk.stdout.is_empty(), "value found on disk: {}", String::from_utf8_lossy(&on_disk.stdout));
    agent.assert_no_canary(&[&value], &[]);
}

/// Issue 17: `kvb render --follow` fills a template with two secrets (SPEC's
/// `{{ secret "NAME" }}` form and the call form) and renders it again when either rotates.
/// A missing secret fails naming the template's file and line and writes nothing.
#[test]
fn render_follow_rerenders_when_either_secret_rotates() {
    let (user1, pw1, pw2, user2) = (canary("ru1"), canary("rp1"), canary("rp2"), canary("ru2"));
    let (emu, agent) = rotating_agent("render", &[("db-user", &user1), ("db-password", &pw1)]);
    let dir = TempDir::new("render-out");
    let template = dir.path().join("pgpass.tmpl");
    std::fs::write(
        &template,
        "# rendered by kvb\ndb:5432:app:{{ secret \"db-user\" }}:{{ secret(\"db-password\") }}\n",
    )
    .unwrap();
    let out = dir.path().join("pgpass");
    let changes = dir.path().join("changes");
    let mut cmd = kvbroker_tests::kvb(&agent.socket, None);
    cmd.arg("render").arg(&template).arg("-o").arg(&out).arg("--follow");
    cmd.arg("--on-change").arg(format!("echo x >> {}", changes.display()));
    let stderr = dir.path().join("kvb.err");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap());
    let _renderer = Proc::spawn(&mut cmd);
    let expect = |u: &str, p: &str| format!("# rendered by kvb\ndb:5432:app:{u}:{p}\n");
    let out_ref = &out;
    let is = |want: String| move || std::fs::read_to_string(out_ref).is_ok_and(|t| t == want);
    wait_for("the first render", Duration::from_secs(10), is(expect(&user1, &pw1)));
    emu.set_secret("db-password", &pw2, json!({}));
    wait_for("a render after db-password rotated", Duration::from_secs(10), is(expect(&user1, &pw2)));
    emu.set_secret("db-user", &user2, json!({}));
    wait_for("a render after db-user rotated", Duration::from_secs(10), is(expect(&user2, &pw2)));
    let runs = || std::fs::read_to_string(&changes).unwrap_or_default().lines().count();
    wait_for("two on-change runs", Duration::from_secs(5), || runs() == 2);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(runs(), 2, "one on-change run per rotation");

    // A secret that does not exist: file and line named, nothing written.
    let bad = dir.path().join("bad.tmpl");
    std::fs::write(&bad, "user={{ secret \"db-user\" }}\npw={{ secret \"no-such-secret\" }}\n").unwrap();
    let bad_out = dir.path().join("bad.out");
    let (code, stdout, err) =
        run(kvbroker_tests::kvb(&agent.socket, None).arg("render").arg(&bad).arg("-o").arg(&bad_out));
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(err.starts_with(&format!("kvb: {}:2: ", bad.display())), "{err}");
    assert!(err.contains("no-such-secret"), "{err}");
    assert!(!bad_out.exists(), "nothing written");
    // A template error: the same.
    std::fs::write(&bad, "ok\n{{ secret(\"db-user\") | upper }}\n").unwrap();
    let (code, _, err) =
        run(kvbroker_tests::kvb(&agent.socket, None).arg("render").arg(&bad).arg("-o").arg(&bad_out));
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with(&format!("kvb: {}:2: ", bad.display())), "{err}");
    assert!(!bad_out.exists(), "nothing written");
    let logged = std::fs::read_to_string(&stderr).unwrap();
    agent.assert_no_canary(&[&user1, &pw1, &pw2, &user2], &[&logged, &err, &stdout]);
}

/// `--follow --signal SIG --pid-file F` signals the process F names after each rewrite, and
/// `--restart-on-change` kills a command that ignores the stop signal once `--grace` is over.
#[test]
fn follow_signals_a_pid_file_and_restart_kills_after_grace() {
    let (a, b) = (canary("sa"), canary("sb"));
    let (emu, agent) = rotating_agent("signal", &[("tls-key", &a)]);
    let dir = TempDir::new("signal-out");
    let (got, pid_file, out) = (dir.path().join("got"), dir.path().join("app.pid"), dir.path().join("key"));
    let mut app = Command::new("sh");
    app.arg("-c").arg(format!(
        "trap 'echo usr1 >> {got}' USR1; echo $$ > {pid}; while :; do sleep 0.05; done",
        got = got.display(),
        pid = pid_file.display()
    ));
    let _app = Proc::spawn(app.stdin(Stdio::null()));
    wait_for("the app's pid file", Duration::from_secs(5), || pid_file.exists());
    let mut cmd = kvbroker_tests::kvb(&agent.socket, None);
    cmd.args(["get", "tls-key", "-o"])
        .arg(&out)
        .args(["--follow", "--signal", "USR1", "--pid-file"])
        .arg(&pid_file);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let _follower = Proc::spawn(&mut cmd);

    // A command that ignores TERM: killed after the grace, then started again.
    let starts = dir.path().join("starts");
    let script = format!("trap '' TERM; echo start >> {}; while :; do sleep 0.05; done", starts.display());
    let mut sup = kvbroker_tests::kvb(&agent.socket, None);
    sup.args([
        "exec",
        "--restart-on-change",
        "--grace",
        "300ms",
        "--env",
        "K=tls-key",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let sup_err = dir.path().join("sup.err");
    sup.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&sup_err).unwrap());
    let _sup = Proc::spawn_group(&mut sup);
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default().lines().count();
    wait_for("the first write and start", Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t == a) && lines(&starts) == 1
    });
    assert_eq!(lines(&got), 0, "no signal for the first write of a new file");
    emu.set_secret("tls-key", &b, json!({}));
    wait_for("the signal", Duration::from_secs(10), || lines(&got) == 1);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), b);
    wait_for("a restart after SIGKILL", Duration::from_secs(10), || lines(&starts) == 2);
    let err = std::fs::read_to_string(&sup_err).unwrap();
    assert!(err.contains("did not stop within 300ms: killing it"), "{err}");
    agent.assert_no_canary(&[&a, &b], &[&err]);
}
