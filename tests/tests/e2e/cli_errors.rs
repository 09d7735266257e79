//! What a job user sees when something goes wrong (issue 11, "a first hour with no
//! surprises"): each message says what to do, with its exact text and exit code.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, bin, canary, kvb, raw_get, run, write_mode};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// The request id of the last `secret.read` audit record with this outcome: the id `kvb`
/// quotes at the end of an error, so the whole stderr can be compared exactly.
fn last_request_id(agent: &Agent, outcome: &str) -> String {
    let recs = agent.audit_records();
    let rec = recs
        .iter()
        .rev()
        .find(|r| r["event"] == "secret.read" && r["outcome"] == outcome)
        .unwrap_or_else(|| panic!("no {outcome} secret.read record in {recs:?}"));
    rec["request_id"].as_str().unwrap().to_owned()
}

fn records_with_error(agent: &Agent, code: &str) -> usize {
    agent.audit_records().iter().filter(|r| r["event"] == "secret.read" && r["error"] == code).count()
}

/// A group created for one test and deleted when dropped.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn new() -> Self {
        let name = format!("kvbt{:08x}", fastrand_u32());
        let (code, _, err) = run(Command::new("groupadd").arg(&name));
        assert_eq!(code, 0, "groupadd {name}: {err}");
        let (code, out, _) = run(Command::new("getent").args(["group", &name]));
        assert_eq!(code, 0);
        let gid = out.trim().split(':').nth(2).unwrap().parse().unwrap();
        Self { name, gid }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = run(Command::new("groupdel").arg(&self.name));
    }
}

fn fastrand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// `kvb` as nobody, with exactly these supplementary groups.
fn kvb_as_nobody(socket: &Path, groups: Option<u32>) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={NOBODY}")).arg(format!("--regid={NOBODY}"));
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg(bin("kvb")).env("KVBROKER_SOCKET", socket);
    c
}

/// Issue 11: a user outside the socket's group used to get "agent not reachable …
/// Permission denied (os error 13); is the agent running?", which sent them to restart a
/// healthy agent. Now the message names the file, its mode and the group to join.
#[test]
fn socket_the_user_cannot_open_names_its_mode_and_group() {
    let value = canary("eacces");
    let group = TempGroup::new();
    let agent = Agent::builder("eacces")
        .secret("s", &value)
        .allow_uid(NOBODY)
        .socket_mode("0660")
        .socket_group(&group.name)
        .start();
    let sock = &agent.socket;
    let meta = std::fs::metadata(sock).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, group.gid), "the agent set mode and group");

    let (code, out, err) = run(kvb_as_nobody(sock, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!(
            "kvb: your user cannot open {} (mode 0660, group {}): join that group or ask the operator\n",
            sock.display(),
            group.name
        )
    );
    // Joining the group is indeed the fix.
    let (code, out, member_err) = run(kvb_as_nobody(sock, Some(group.gid)).args(["get", "s"]));
    assert_eq!((code, out.as_str(), member_err.as_str()), (0, value.as_str(), ""));

    // A group this machine cannot name is shown by number.
    std::os::unix::fs::chown(sock, None, Some(4_000_123)).unwrap();
    let (code, _, err_gid) = run(kvb_as_nobody(sock, None).args(["get", "s"]));
    assert_eq!(code, 1);
    assert_eq!(
        err_gid,
        format!(
            "kvb: your user cannot open {} (mode 0660, group 4000123): join that group or ask the operator\n",
            sock.display()
        )
    );

    // A directory on the way that the user may not enter is the one named.
    let dir = agent.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(dir, Some(0), Some(group.gid)).unwrap();
    let (code, _, err_dir) = run(kvb_as_nobody(sock, None).args(["get", "s"]));
    assert_eq!(code, 1);
    assert_eq!(
        err_dir,
        format!(
            "kvb: your user cannot open {} (mode 0750, group {}): join that group or ask the operator\n",
            dir.display(),
            group.name
        )
    );
    agent.assert_no_canary(&[&value], &[&err, &err_gid, &err_dir, &member_err]);
}

/// The cgroup v2 path of this process (inherited by the `kvb` it starts).
fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    text.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line").to_owned()
}

/// Issue 11: a denial said only "permission denied: no rule matches". Now it names the
/// caller's own facts and a `policy explain` command that replays the decision after the
/// caller has exited; the command, run, says why. The answer does not depend on whether the
/// secret exists.
#[test]
fn denial_names_the_callers_facts_and_the_explain_command() {
    let value = canary("deny-facts");
    let agent =
        Agent::builder("denyfacts").secret("db-password", &value).allow_uid(0).socket_mode("0666").start();
    let exe = std::fs::canonicalize(bin("kvb")).unwrap();
    let cgroup = own_cgroup();
    let expected = |name: &str, request_id: &str| {
        format!(
            "kvb: no rule allows uid 65534 (exe {exe}) to read default/{name}; to see why, run: \
             kvbroker policy explain --config CONFIG --uid 65534 --gid 65534 --exe {exe} --cgroup {cgroup} \
             default/{name} (request {request_id})\n",
            exe = exe.display(),
        )
    };

    let (code, out, err) = run(kvb_as_nobody(&agent.socket, None).args(["get", "db-password"]));
    assert_eq!((code, out.as_str()), (3, ""));
    assert_eq!(err, expected("db-password", &last_request_id(&agent, "denied")));
    let (code, _, err_missing) = run(kvb_as_nobody(&agent.socket, None).args(["get", "no-such-secret"]));
    assert_eq!(code, 3);
    assert_eq!(err_missing, expected("no-such-secret", &last_request_id(&agent, "denied")));

    // The suggested command works as printed, with the agent's config filled in.
    let suggested = err.split_once("run: ").unwrap().1.split(" (request ").next().unwrap();
    let args: Vec<&str> = suggested.split_whitespace().collect();
    assert_eq!(args[..5], ["kvbroker", "policy", "explain", "--config", "CONFIG"]);
    let (code, explained, explain_err) =
        run(Command::new(bin("kvbroker")).args(&args[1..4]).arg(&agent.config).args(&args[5..]));
    assert_eq!((code, explain_err.as_str()), (0, ""));
    assert!(explained.contains("  uid           65534\n"), "{explained}");
    assert!(explained.contains("  uids          no   uid 65534"), "{explained}");
    assert!(explained.ends_with("decision: denied (no rule matches)\n"), "{explained}");

    // The audit record keeps the short reason.
    let denied: Vec<Value> = agent.audit_records().into_iter().filter(|r| r["outcome"] == "denied").collect();
    assert_eq!(denied.len(), 2);
    assert!(denied.iter().all(|r| r["reason"] == "no rule matches"), "{denied:?}");
    agent.assert_no_canary(&[&value], &[&err, &err_missing, &explained]);
}

/// Issue 11: `kvb get --version` with an id the vault lacks said "secret db-password not
/// found", which reads as if the whole secret were gone.
#[test]
fn unknown_version_is_named_in_the_not_found_message() {
    let value = canary("version");
    let agent = Agent::builder("version").secret("db-password", &value).allow_uid(0).start();
    let v = "0123456789abcdef0123456789abcdef";
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "db-password", "--version", v]));
    assert_eq!((code, out.as_str()), (1, ""));
    let rid = last_request_id(&agent, "error");
    assert_eq!(err, format!("kvb: version {v} of db-password not found in vault default (request {rid})\n"));
    assert_eq!(records_with_error(&agent, "SecretNotFound"), 1);

    // A missing secret still says so, without a redundant prefix.
    let (code, _, err_name) = run(kvb(&agent.socket, None).args(["get", "nope"]));
    assert_eq!(code, 1);
    let rid = last_request_id(&agent, "error");
    assert_eq!(err_name, format!("kvb: secret nope not found in vault default (request {rid})\n"));
    agent.assert_no_canary(&[&value], &[&err, &err_name]);
}

/// Issue 11: a 429 made `kvb` fail at once. It now waits `Retry-After` and tries again.
#[test]
fn rate_limited_read_is_retried_after_retry_after() {
    let value = canary("retry");
    let agent = Agent::builder("retry")
        .secret("s", &value)
        .allow_uid(0)
        .limits("rate_per_second = 1\nburst = 1")
        .start();
    // Spend this second's only read, so kvb's first try is refused.
    assert_eq!(raw_get(&agent.socket, "/v1/secrets/s", &[]).unwrap().0, 200);
    let started = Instant::now();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, value.as_str(), ""));
    assert!(started.elapsed() >= Duration::from_secs(1), "waited for Retry-After");
    assert_eq!(records_with_error(&agent, "TooManyRequests"), 1, "refused once, then served");
    agent.assert_no_canary(&[&value], &[&err]);
}

/// A caller that stays limited gets three retries, one `Retry-After` apart, then a message
/// that says it was rate limited (exit 1), not an endless loop.
#[test]
fn rate_limited_read_gives_up_after_three_retries() {
    let value = canary("giveup");
    let agent =
        Agent::builder("giveup").secret("s", &value).allow_uid(0).limits("connections_per_uid = 1").start();
    // Hold uid 0's one connection busy with a long poll: every request on another connection
    // gets 429 (an idle one would give way). The harness's readiness probes may still be
    // closing, so ask until this one is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let _held = loop {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let version = text.split("\"version\":\"").nth(1).and_then(|v| v.get(..32)).map(str::to_owned);
        if let (true, Some(v)) = (text.starts_with("HTTP/1.1 200"), version) {
            let poll = format!("GET /v1/secrets/s?changed_from={v}&wait=60 HTTP/1.1\r\nHost: x\r\n\r\n");
            s.write_all(poll.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            if raw_get(&agent.socket, "/v1/secrets/s", &[]).unwrap().0 == 429 {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "could not hold the only connection");
        std::thread::sleep(Duration::from_millis(100));
    };
    let before = records_with_error(&agent, "TooManyRequests");
    let started = Instant::now();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    let took = started.elapsed();
    assert_eq!((code, out.as_str()), (1, ""));
    let rid = last_request_id(&agent, "error");
    assert_eq!(
        err,
        format!(
            "kvb: gave up after 3 retries: rate limited by the agent: uid 0 has too many open connections \
             to the agent, all busy: close some, or reuse one (request {rid})\n"
        )
    );
    assert_eq!(records_with_error(&agent, "TooManyRequests") - before, 4, "one try and three retries");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(10), "waited 3 x 1 s: {took:?}");
    agent.assert_no_canary(&[&value], &[&err]);
}

/// Issue 11: `kvb exec` exited 1 for a command that does not exist, so scripts could not tell
/// it from a failed read. Now it exits as a shell does: 127 not found.
#[test]
fn exec_of_a_missing_command_exits_127() {
    let value = canary("exec127");
    let agent = Agent::builder("exec127").secret("s", &value).allow_uid(0).start();
    let (code, out, err) =
        run(kvb(&agent.socket, None).args(["exec", "--env", "S=s", "--", "kvbt-no-such-command", "x"]));
    assert_eq!((code, out.as_str()), (127, ""));
    assert_eq!(err, "kvb: kvbt-no-such-command: command not found in PATH\n");
    let missing = agent.dir.path().join("no-such-file");
    let (code, _, err_path) =
        run(kvb(&agent.socket, None).args(["exec", "--env", "S=s", "--"]).arg(&missing));
    assert_eq!(code, 127);
    assert_eq!(err_path, format!("kvb: {}: no such file or directory\n", missing.display()));
    agent.assert_no_canary(&[&value], &[&err, &err_path]);
}

/// … and 126 for a file that exists but cannot be executed (no execute bit, or a directory).
#[test]
fn exec_of_a_file_that_cannot_run_exits_126() {
    let value = canary("exec126");
    let agent = Agent::builder("exec126").secret("s", &value).allow_uid(0).start();
    let script = agent.dir.path().join("job.sh");
    write_mode(&script, "#!/bin/sh\necho started\n", 0o644);
    let (code, out, err) = run(kvb(&agent.socket, None).args(["exec", "--env", "S=s", "--"]).arg(&script));
    assert_eq!((code, out.as_str()), (126, ""));
    assert_eq!(
        err,
        format!(
            "kvb: {}: permission denied (is it a directory, or missing the execute bit?)\n",
            script.display()
        )
    );
    let dir = agent.dir.path();
    let (code, _, err_dir) = run(kvb(&agent.socket, None).args(["exec", "--env", "S=s", "--"]).arg(dir));
    assert_eq!(code, 126);
    assert_eq!(
        err_dir,
        format!(
            "kvb: {}: permission denied (is it a directory, or missing the execute bit?)\n",
            dir.display()
        )
    );
    // With the bit set, the same file runs.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, out, _) = run(kvb(&agent.socket, None).args(["exec", "--env", "S=s", "--"]).arg(&script));
    assert_eq!((code, out.as_str()), (0, "started\n"));
    agent.assert_no_canary(&[&value], &[&err, &err_dir]);
}

/// `kvb get` into a pipe writes the value's bytes and nothing more (a script's `$(kvb get
/// s)` or `| sha256sum` must see the value itself); on a terminal it ends the line.
#[test]
fn piped_get_adds_no_trailing_newline() {
    let value = canary("pipe");
    let with_newline = format!("{}\n", canary("pipe-nl"));
    let agent = Agent::builder("pipe").secret("s", &value).secret("nl", &with_newline).allow_uid(0).start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, value, "no newline added");
    let (code, out, _) = run(kvb(&agent.socket, None).args(["get", "nl"]));
    assert_eq!((code, out.as_str()), (0, with_newline.as_str()), "the value's own newline, and only it");

    // On a terminal (script(1) gives kvb a pty, which turns \n into \r\n).
    let cmd = format!("{} get s", bin("kvb").display());
    let (code, tty_out, _) = run(Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("KVBROKER_SOCKET", &agent.socket));
    assert_eq!(code, 0);
    assert_eq!(tty_out, format!("{value}\r\n"));
    agent.assert_no_canary(&[&value, &with_newline], &[&err]);
}
