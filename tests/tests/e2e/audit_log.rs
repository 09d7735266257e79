//! The audit log as a security reviewer reads it, and failing closed when it can't be written.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvbroker_tests::{Agent, Proc, TempDir, bin, canary, curl, kvb, raw_get, run};
use serde_json::Value;

/// After a run, the records say exactly what happened, chain-verify, and hold no value.
#[test]
fn records_match_what_happened() {
    let value = canary("audit");
    let mut agent =
        Agent::builder("auditrec").secret("db-password", &value).allow_uid(0).socket_mode("0666").start();
    let sock = agent.socket.clone();
    assert_eq!(run(kvb(&sock, None).args(["get", "DB-Password"])).0, 0);
    assert_eq!(run(kvb(&sock, Some(65534)).args(["get", "db-password"])).0, 3);
    assert_eq!(run(kvb(&sock, None).args(["get", "missing"])).0, 1);
    assert!(agent.stop().success());

    let recs = agent.audit_records();
    let events: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["agent.start", "secret.read", "secret.read", "secret.read", "agent.stop"]);
    assert_eq!(recs[0]["chain"], "sha256", "agent.start states the chain mode");
    let (ok, denied, missing) = (&recs[1], &recs[2], &recs[3]);
    assert_eq!(ok["outcome"], "allowed");
    assert_eq!(ok["peer"]["uid"], 0);
    assert_eq!(ok["rule"], "uid-0");
    assert_eq!(ok["secret"]["name"], "db-password");
    assert_eq!(ok["secret"]["version"].as_str().unwrap().len(), 32);
    assert!(ok["peer"]["exe"].as_str().unwrap().ends_with("/kvb"), "{ok}");
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["peer"]["uid"], 65534);
    assert_eq!(denied["error"], "PermissionDenied");
    assert_eq!(denied["secret"]["name"], "db-password");
    assert!(denied.get("rule").is_none());
    assert_eq!(missing["outcome"], "error");
    assert_eq!(missing["error"], "SecretNotFound");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["hash"].as_str().unwrap().len(), 64);
        if i > 0 {
            assert_eq!(r["prev"], recs[i - 1]["hash"]);
        }
        assert!(r["request_id"].is_string() || !r["event"].as_str().unwrap().starts_with("secret."));
    }
    let (code, out, err) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&agent.audit));
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("ok: 5 record(s) in 1 file(s), seq 1..5, head "), "{out}");
    agent.assert_no_canary(&[&value], &[&out]);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let (code, _, err) =
            run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at));
        assert_eq!(code, 0, "mount tmpfs (tests run as root): {err}");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![b'x'; 4096];
    while f.write_all(&chunk).is_ok() {}
    // Fill the last partial page too.
    while f.write_all(b"x").is_ok() {}
    p
}

/// Disk full: reads fail closed with 503 and no value, health says degraded, the agent keeps
/// running, and everything works again (chain intact) once space is freed.
#[test]
fn full_disk_fails_closed_and_recovers() {
    let value = canary("full");
    let tmp = TempDir::new("full");
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), "64k");
    let audit = mnt.0.join("audit.jsonl");
    let mut agent =
        Agent::builder("full").secret("db-password", &value).allow_uid(0).audit_path(audit.clone()).start();
    let sock = agent.socket.clone();
    assert_eq!(run(kvb(&sock, None).args(["get", "db-password"])).1, value);

    let filler = fill(&mnt.0);
    // The audit file's own last page may still hold a few records; then writes must fail.
    let mut answered = 1;
    let out = loop {
        let out = curl(&sock, "/v1/secrets/db-password", None, &[]).1;
        if out.ends_with("\n503") {
            break out;
        }
        assert!(out.ends_with("\n200"), "{out}");
        answered += 1;
        assert!(answered < 40, "audit writes never failed on a full disk");
    };
    let err = String::new();
    let (body, _) = out.rsplit_once('\n').unwrap();
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "AuditUnavailable");
    let (code, kvb_out, kvb_err) = run(kvb(&sock, None).args(["get", "db-password"]));
    assert_eq!((code, kvb_out.as_str()), (1, ""));
    assert!(kvb_err.starts_with("kvb: audit unavailable: "), "{kvb_err}");
    let (hs, hbody) = raw_get(&sock, "/v1/health", &[]).unwrap();
    assert_eq!(hs, 503);
    assert!(hbody.contains("\"status\":\"degraded\""), "{hbody}");
    assert!(agent.proc.wait_timeout(std::time::Duration::ZERO).is_none(), "agent still running");

    std::fs::remove_file(filler).unwrap();
    assert_eq!(run(kvb(&sock, None).args(["get", "db-password"])).1, value);
    assert_eq!(raw_get(&sock, "/v1/health", &[]).unwrap().0, 200);
    assert!(agent.stop().success());
    let (code, out, verr) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&audit));
    assert_eq!(code, 0, "{out}{verr}");
    let reads: Vec<Value> =
        agent.audit_records().into_iter().filter(|r| r["event"] == "secret.read").collect();
    assert_eq!(reads.len(), answered + 1, "every answered read has its record, and only those");
    agent.assert_no_canary(&[&value], &[&out, &err, body, &kvb_err]);
}

/// With `RUST_LOG=trace` (hyper's and ours), no path writes a value anywhere.
#[test]
fn canary_never_appears_even_at_trace() {
    let value = canary("trace");
    let agent = Agent::builder("trace")
        .secret("db-password", &value)
        .secret_with("expired", &value, "expires_on = \"2001-01-01T00:00:00Z\"")
        .allow_uid(0)
        .socket_mode("0666")
        .env("RUST_LOG", "trace")
        .start();
    let sock = &agent.socket;
    let mut outs = Vec::new();
    for args in [&["get", "db-password"][..], &["get", "expired"], &["get", "missing"], &["get", "bad_name"]]
    {
        let (_, _, err) = run(kvb(sock, None).args(args));
        outs.push(err);
    }
    outs.push(run(kvb(sock, Some(65534)).args(["get", "db-password"])).2);
    outs.push(
        curl(
            sock,
            "/v1/secrets/db-password",
            None,
            &["-H", "Accept: application/octet-stream", "-o", "/dev/null"],
        )
        .2,
    );
    outs.push(curl(sock, "/v1/secrets/db-password?bogus=1", None, &[]).1);
    let output = agent.output();
    assert!(output.contains("TRACE"), "trace logging is on");
    let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
    agent.assert_no_canary(&[&value], &refs);
}

/// The standard-library Python verifier in docs/audit.md accepts a log the agent wrote and
/// rejects a tampered copy: the documented construction is the real one.
#[test]
fn docs_python_verifier_checks_a_real_log() {
    let doc = include_str!("../../../docs/audit.md");
    let script = doc.split("```python\n").nth(1).and_then(|s| s.split("```").next()).expect("python block");
    let mut agent = Agent::builder("pyverify").secret("s", "v").allow_uid(0).start();
    for _ in 0..3 {
        assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).0, 0);
    }
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "nope"])).0, 1);
    assert!(agent.stop().success());
    let script_path = agent.dir.path().join("verify.py");
    std::fs::write(&script_path, script).unwrap();
    let (code, out, err) = run(Command::new("python3").arg(&script_path).arg(&agent.audit));
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.starts_with("ok: 6 records, head "), "{out}");

    let tampered = agent.dir.path().join("tampered.jsonl");
    let text = std::fs::read_to_string(&agent.audit).unwrap().replacen("\"uid\":0", "\"uid\":1", 1);
    std::fs::write(&tampered, text).unwrap();
    let (code, _, err) = run(Command::new("python3").arg(&script_path).arg(&tampered));
    assert_eq!(code, 1);
    assert!(err.contains("tampered.jsonl:2: modified"), "{err}");
}

/// `kill -9` during a load of reads: after a restart the chain verifies, and every read that
/// got an answer has its record (the record is written before the answer is sent).
#[test]
fn kill_dash_nine_under_load_loses_no_answered_read() {
    use std::sync::{Arc, Mutex};
    let mut agent = Agent::builder("kill9").secret("s", "v").allow_uid(0).start();
    let answered: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (sock, answered, stop) = (agent.socket.clone(), Arc::clone(&answered), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok((200, head, _)) = kvbroker_tests::raw_request(&sock, "GET", "/v1/secrets/s", &[])
                    else {
                        continue;
                    };
                    let rid = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("x-request-id: ").map(str::to_owned)
                        })
                        .unwrap();
                    answered.lock().unwrap().push(rid);
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(700));
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_timeout(std::time::Duration::from_secs(5)).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 50, "the load ran: {} answered reads", answered.len());
    agent.spawn();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).0, 0);
    assert!(agent.stop().success());
    let (code, out, err) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&agent.audit));
    assert_eq!(code, 0, "{out}{err}");
    let recorded: std::collections::HashSet<String> =
        agent.audit_records().iter().filter_map(|r| r["request_id"].as_str().map(str::to_owned)).collect();
    let missing: Vec<&String> = answered.iter().filter(|r| !recorded.contains(*r)).collect();
    assert!(missing.is_empty(), "{} answered reads have no record", missing.len());
    eprintln!("kill -9 under load: {} answered reads, all recorded; chain verifies", answered.len());
}

/// Keyed mode from the config: `audit verify` needs --key-file.
#[test]
fn keyed_audit_log_verifies_only_with_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let b = Agent::builder("keyed").secret("s", "v").allow_uid(0);
    let config = b.write();
    let key = config.parent().unwrap().join("audit.key");
    std::fs::write(&key, "kvbroker-test-key-0123456789abcdef").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[audit]\n", &format!("[audit]\nhmac_key_file = {key:?}\n"));
    std::fs::write(&config, text).unwrap();
    let mut agent = b.start_written();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).0, 0);
    assert!(agent.stop().success());
    let verify = |with_key: bool| {
        let mut c = Command::new(bin("kvbroker"));
        c.args(["audit", "verify"]).arg(&agent.audit);
        if with_key {
            c.arg("--key-file").arg(&key);
        }
        run(&mut c)
    };
    assert_eq!(verify(true).0, 0);
    // Issue 13: without the key, a keyed log looked "modified". It says it is keyed
    // (agent.start records the chain mode), and verify says what to do.
    let recs = agent.audit_records();
    assert_eq!(recs[0]["chain"], "hmac-sha256");
    let (code, _, err) = verify(false);
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            format!("kvbroker: {}:1: keyed: this log is keyed: give --key-file\n", agent.audit.display())
                .as_str()
        )
    );
}

/// `audit query` (table, filters, --json, --summary) and `audit tail` on a real log.
#[test]
fn query_summary_and_tail() {
    let mut agent = Agent::builder("query")
        .secret("db-password", "v")
        .secret("api-token", "v")
        .allow_uid(0)
        .socket_mode("0666")
        .start();
    let sock = agent.socket.clone();
    assert_eq!(run(kvb(&sock, None).args(["get", "db-password"])).0, 0);
    assert_eq!(run(kvb(&sock, None).args(["get", "DB-Password"])).0, 0);
    assert_eq!(run(kvb(&sock, None).args(["get", "api-token"])).0, 0);
    assert_eq!(run(kvb(&sock, Some(65534)).args(["get", "db-password"])).0, 3);

    let q = |args: &[&str]| {
        run(Command::new(bin("kvbroker")).args(["audit", "query"]).arg(&agent.audit).args(args))
    };
    let (code, out, err) = q(&["--secret", "db-password"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("TIME"), "{out}");
    assert_eq!(rows.len(), 4, "header + 3 reads of db-password: {out}");
    assert!(
        rows.iter().any(|r| r.contains("denied") && r.contains("65534") && r.contains("no rule matches")),
        "{out}"
    );
    let (_, out, _) = q(&["--outcome", "denied", "--json"]);
    let denied: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["peer"]["uid"], 65534);
    let (_, out, _) = q(&["--uid", "0", "--since", "1h", "--json"]);
    assert_eq!(out.lines().filter(|l| l.contains("secret.read")).count(), 3);
    let (_, out, _) = q(&["--summary"]);
    assert!(out.contains("default/db-password") && out.contains("default/api-token"), "{out}");
    assert!(out.trim_end().ends_with("4 read(s) by 3 caller/secret pair(s); 1 denied"), "{out}");
    let (code, _, err) = q(&["--since", "yesterday-ish"]);
    assert_eq!(code, 1);
    assert!(err.contains("--since \"yesterday-ish\""), "{err}");

    // tail: the existing records, then a new read as it happens.
    let mut tail = Command::new(bin("kvbroker"));
    tail.args(["audit", "tail", "-n", "2"]).arg(&agent.audit).stdout(std::process::Stdio::piped());
    let mut child = tail.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let _guard = Proc::adopt(child);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    assert!(lines.next().unwrap().unwrap().starts_with("TIME"));
    lines.next().unwrap().unwrap();
    lines.next().unwrap().unwrap();
    assert_eq!(run(kvb(&sock, None).args(["get", "api-token"])).0, 0);
    let live = lines.next().unwrap().unwrap();
    assert!(live.contains("secret.read") && live.contains("default/api-token"), "{live}");
    assert!(agent.stop().success());
}

/// Keyed mode with the key held in Key Vault (`hmac_key_secret`): the agent fetches it at
/// start through its managed identity; the log verifies with that key and not without.
#[test]
fn keyed_audit_log_with_the_key_in_key_vault() {
    use std::os::unix::fs::PermissionsExt;
    let key = "audit-chain-key-0123456789abcdefghij";
    let emu = kvbroker_tests::EmulatorProc::start(&[("audit-key", key), ("s", "v")]);
    let b = Agent::builder("kvkey").keyvault(&emu, "azure-ml").allow_uid(0);
    let config = b.write();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[audit]\n", "[audit]\nhmac_key_secret = \"default/audit-key\"\n");
    std::fs::write(&config, text).unwrap();
    let mut agent = b.start_written();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).0, 0);
    assert!(agent.stop().success());
    let key_file = agent.dir.path().join("key");
    std::fs::write(&key_file, key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = run(Command::new(bin("kvbroker"))
        .args(["audit", "verify", "--key-file"])
        .arg(&key_file)
        .arg(&agent.audit));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&agent.audit)).0, 1);
    agent.assert_no_canary(&[key], &[&out, &err]);
}

/// Issue 13: a second agent with another socket and the same audit path started, and the
/// two interleaved their chains. The log is flocked; the second agent refuses, naming the
/// holder's pid, and the first one's chain stays whole.
#[test]
fn second_agent_on_the_same_log_refuses_to_start() {
    let first = Agent::builder("lock1").secret("db", "v").allow_uid(0).start();
    let second = Agent::builder("lock2").secret("db", "v").allow_uid(0).audit_path(first.audit.clone());
    let config = second.write();
    let dir = second.into_dir();
    let stderr = dir.path().join("second.stderr");
    let mut proc = Proc::spawn(
        Command::new(bin("kvbroker"))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap()),
    );
    let status = proc.wait_timeout(std::time::Duration::from_secs(10));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.is_some(), "the second agent is running on the same log:\n{err}");
    let code = status.unwrap().code().unwrap_or(-1);
    let want = format!(
        "kvbroker: {}: another agent (pid {}) is writing this audit log; stop it, or give this agent its own [audit] path\n",
        first.audit.display(),
        first.proc.pid()
    );
    assert_eq!((code, err.as_str()), (1, want.as_str()));
    assert!(!dir.path().join("agent.sock").exists(), "the refused agent bound no socket");
    assert_eq!(raw_get(&first.socket, "/v1/health", &[]).unwrap().0, 200);
    let starts = first.audit_records().iter().filter(|r| r["event"] == "agent.start").count();
    assert_eq!(starts, 1);
    let (code, out, _) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&first.audit));
    assert_eq!(code, 0, "{out}");
}

/// Sends `n` requests for `path` on one keep-alive connection; returns the statuses seen.
fn flood(socket: &Path, path: &str, n: usize) -> std::collections::BTreeMap<u16, usize> {
    use std::io::{BufRead, BufReader, Read, Write};
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut seen = std::collections::BTreeMap::new();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..n {
        w.write_all(req.as_bytes()).unwrap();
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        *seen.entry(code).or_default() += 1;
    }
    seen
}

/// The log and its rotated files, oldest first.
fn kept_files(audit: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for suffix in [".3", ".2", ".1", ""] {
        let mut p = audit.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if p.exists() {
            files.push(p);
        }
    }
    files
}

fn audit_bytes(audit: &Path) -> u64 {
    let mut total = 0;
    for suffix in ["", ".1", ".2", ".3"] {
        let mut p = audit.as_os_str().to_owned();
        p.push(suffix);
        total += std::fs::metadata(PathBuf::from(p)).map(|m| m.len()).unwrap_or(0);
    }
    total
}

/// Issue 13: one uid making refused requests (one record each, ~33 MB/s) rotated the record
/// of an earlier read out of every kept file in seconds. Now 20,000 refusals under
/// `rotate_bytes = 1 MiB, rotate_keep = 2` leave the earlier read's record in the kept
/// files, and the refusal records' counts add up to exactly 20,000.
#[test]
fn refusal_flood_keeps_earlier_reads_and_counts_every_refusal() {
    let value = canary("flood");
    let mut agent = Agent::builder("flood")
        .secret("db", &value)
        .allow_uid(0)
        .audit_extra("rotate_bytes = 1048576\nrotate_keep = 2")
        .start();
    let (status, head, _) = kvbroker_tests::raw_request(&agent.socket, "GET", "/v1/secrets/db", &[]).unwrap();
    assert_eq!(status, 200);
    let read_id = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id:").map(|v| v.trim().to_owned()))
        .unwrap();
    let seq_before = agent.audit_records().iter().filter_map(|r| r["seq"].as_u64()).max().unwrap_or(0);
    let t = std::time::Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let sock = agent.socket.clone();
            std::thread::spawn(move || flood(&sock, "/v1/secrets/no-such-secret", 5_000))
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for th in threads {
        for (k, v) in th.join().unwrap() {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    let took = t.elapsed();
    // Rotation may have deleted files: count the records written by their seq, and their
    // bytes by the mean line length of those kept.
    let last_seq = |recs: &[Value]| recs.iter().filter_map(|r| r["seq"].as_u64()).max().unwrap_or(0);
    let seq_after = last_seq(&agent.audit_records());
    let kept = audit_bytes(&agent.audit);
    let kept_lines: usize =
        kept_files(&agent.audit).iter().map(|f| kvbroker_tests::read_records(f).len()).sum();
    let written = seq_after - seq_before;
    let bytes = written as f64 * kept as f64 / kept_lines.max(1) as f64;
    eprintln!(
        "20,000 refusals in {took:?}: {written} records, ~{bytes:.0} bytes, ~{:.0} bytes/s; statuses {statuses:?}",
        bytes / took.as_secs_f64()
    );
    assert_eq!(statuses.values().sum::<usize>(), 20_000);
    assert!(statuses.keys().all(|s| *s == 404 || *s == 429), "{statuses:?}");
    assert!(agent.stop().success());

    let files = kept_files(&agent.audit);
    let recs: Vec<Value> = files.iter().flat_map(|f| kvbroker_tests::read_records(f)).collect();
    assert!(
        recs.iter().any(|r| r["request_id"] == read_id.as_str() && r["outcome"] == "allowed"),
        "the earlier read's record is still in the kept files"
    );
    let counted: u64 = recs
        .iter()
        .filter(|r| r["event"] == "secret.read" && r["outcome"] != "allowed")
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(counted, 20_000, "every refused request is accounted for");
    let summaries = recs.iter().filter(|r| r["count"].is_u64()).count();
    assert!(summaries >= 1, "past the budget, refusals are summarized");
    let (code, out, _) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).args(&files));
    assert_eq!(code, 0, "{out}");
    agent.assert_no_canary(&[&value], &[&out]);
}
