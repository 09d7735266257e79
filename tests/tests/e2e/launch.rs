//! `kvbroker launch` against the emulator's Azure ML identity endpoint, as an Azure ML job's
//! `command:` line would run it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, Proc, TempDir, bin, canary, kvb, run};
use serde_json::json;

pub(crate) struct Job {
    pub(crate) emu: EmulatorProc,
    dir: TempDir,
    config: PathBuf,
    _agent_dir: TempDir,
}

impl Job {
    pub(crate) fn new(tag: &str, secrets: &[(&str, &str)]) -> Job {
        let emu = EmulatorProc::start(secrets);
        let b = Agent::builder(tag).keyvault(&emu, "azure-ml").allow_uid(0);
        let config = b.write();
        Job { emu, dir: TempDir::new(tag), config, _agent_dir: b.into_dir() }
    }

    pub(crate) fn out(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// `kvbroker launch --config … [extra] -- sh -c SCRIPT`, with kvb on PATH and $OUT set.
    pub(crate) fn command(&self, extra: &[&str], script: &str) -> Command {
        let mut c = Command::new(bin("kvbroker"));
        c.arg("launch").arg("--config").arg(&self.config).arg("--audit-dir").arg(self.out().join("audit"));
        c.args(extra).args(["--", "sh", "-c", script]);
        c.envs(&self.emu.info.identity["azure-ml"].env);
        let path = format!(
            "{}:{}",
            bin("kvb").parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("PATH", path).env("OUT", self.out()).env("AZUREML_RUN_ID", "run-4242").env_remove("RUST_LOG");
        c.stdin(Stdio::null());
        c
    }

    pub(crate) fn audit(&self) -> PathBuf {
        self.out().join("audit/audit.jsonl")
    }

    pub(crate) fn records(&self) -> Vec<serde_json::Value> {
        kvbroker_tests::read_records(&self.audit())
    }
}

fn wait_file(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children and grandchildren read; a same-uid process outside the tree is denied; another
/// uid cannot reach the socket; the command's exit status comes back; everything is cleaned
/// up and audited.
#[test]
fn launch_serves_the_job_tree_only_and_returns_its_status() {
    let value = canary("launch");
    let job = Job::new("launch", &[("db-password", &value)]);
    let script = r#"
set -e
kvb get db-password > "$OUT/a"
sh -c 'kvb get db-password > "$OUT/b"; sh -c "kvb get db-password > \"$OUT/c\""'
echo "$KVBROKER_SOCKET" > "$OUT/socket.tmp" && mv "$OUT/socket.tmp" "$OUT/socket"
while [ ! -e "$OUT/go" ]; do sleep 0.05; done
exit 7
"#;
    let out = job.out();
    let mut cmd = job.command(&[], script);
    cmd.stdout(std::fs::File::create(out.join("stdout")).unwrap())
        .stderr(std::fs::File::create(out.join("stderr")).unwrap());
    let mut launcher = Proc::spawn(&mut cmd);
    wait_file(&out.join("socket"));
    for f in ["a", "b", "c"] {
        assert!(std::fs::read_to_string(out.join(f)).unwrap() == value, "{f}: a descendant read the value");
    }
    let socket = PathBuf::from(std::fs::read_to_string(out.join("socket")).unwrap().trim());
    let dir = socket.parent().unwrap().to_owned();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

    let (code, _, err) = run(kvb(&socket, None).args(["get", "db-password"]));
    assert_eq!(code, 3, "a same-uid process outside the tree is denied");
    assert!(err.contains("not the launched command or one of its descendants"), "{err}");
    let (code, _, err) = run(kvb(&socket, Some(65534)).args(["get", "db-password"]));
    assert_eq!(code, 1, "another uid cannot reach the socket at all");
    assert_eq!(
        err,
        format!(
            "kvb: your user cannot open {} (mode 0700, group root): its group has no access either; ask the operator\n",
            dir.display()
        )
    );

    std::fs::write(out.join("go"), "").unwrap();
    let status = launcher.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(7), "the job's exit status");
    assert!(!socket.exists() && !dir.exists(), "socket and private directory removed");

    let recs = job.records();
    assert_eq!(recs[0]["event"], "agent.start");
    assert_eq!(recs[0]["agent"]["run_id"], "run-4242");
    assert_eq!(recs.last().unwrap()["event"], "agent.stop");
    let allowed = recs.iter().filter(|r| r["outcome"] == "allowed").count();
    assert_eq!(allowed, 3);
    let (code, _, _) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(job.audit()));
    assert_eq!(code, 0);
    let outputs: Vec<String> =
        ["stdout", "stderr"].iter().map(|f| std::fs::read_to_string(out.join(f)).unwrap()).collect();
    for o in &outputs {
        assert!(!o.contains(&value), "no value in the launcher's output");
    }
    assert!(!std::fs::read_to_string(job.audit()).unwrap().contains(&value));
}

/// 32 worker processes reading the same secret make one Key Vault call.
#[test]
fn thirty_two_workers_make_one_vault_call() {
    let job = Job::new("launch32", &[("s", "v")]);
    let script = r#"for i in $(seq 32); do kvb get s > "$OUT/w$i" & done; wait"#;
    let (code, _, err) = run(&mut job.command(&[], script));
    assert_eq!(code, 0, "{err}");
    for i in 1..=32 {
        assert_eq!(std::fs::read_to_string(job.out().join(format!("w{i}"))).unwrap(), "v");
    }
    assert_eq!(job.emu.count("get"), 1);
}

/// `--prefetch` of a missing, disabled or soon-expiring secret fails before the command runs.
#[test]
fn prefetch_fails_fast_with_the_reason() {
    let job = Job::new("prefetch", &[("ok", "v"), ("off", "v"), ("soon", "v")]);
    job.emu.update_secret("off", json!({"enabled": false}));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    job.emu.update_secret("soon", json!({"exp": now + 60}));
    let marker = job.out().join("ran");
    let script = r#"touch "$OUT/ran""#;
    let cases = [
        (
            "ok,missing",
            "prefetch missing: secret missing not found in vault default; the command was not started",
        ),
        ("off", "prefetch off: secret off in vault default is disabled; the command was not started"),
        ("soon", "prefetch soon: expires in "),
    ];
    for (names, want) in cases {
        let (code, _, err) = run(&mut job.command(&["--prefetch", names, "--min-validity", "1h"], script));
        assert_eq!(code, 1, "{names}: {err}");
        assert!(err.contains(want), "{names}: {err}");
        assert!(!marker.exists(), "{names}: the command must not have run");
    }
    let (code, _, err) = run(&mut job.command(&["--prefetch", "ok"], script));
    assert_eq!(code, 0, "{err}");
    assert!(marker.exists());
}

/// SIGTERM to the launcher reaches the command; the launcher exits with its status (128 +
/// signal if the command died of it); no socket remains; the log ends with agent.stop and
/// verifies.
#[test]
fn sigterm_is_forwarded_and_everything_is_cleaned_up() {
    let job = Job::new("sigterm", &[("s", "v")]);
    let out = job.out();
    let script = r#"trap 'echo term > "$OUT/got-term"; exit 5' TERM; echo "$KVBROKER_SOCKET" > "$OUT/sock"; while :; do sleep 0.05; done"#;
    let mut launcher = Proc::spawn(job.command(&[], script).stdout(Stdio::null()).stderr(Stdio::null()));
    wait_file(&out.join("sock"));
    let socket = PathBuf::from(std::fs::read_to_string(out.join("sock")).unwrap().trim());
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(5));
    assert_eq!(std::fs::read_to_string(out.join("got-term")).unwrap(), "term\n");
    assert!(!socket.exists());
    assert_eq!(job.records().last().unwrap()["event"], "agent.stop");
    assert_eq!(run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(job.audit())).0, 0);

    // A command that dies of the signal: 128 + 15.
    let mut launcher =
        Proc::spawn(job.command(&[], r#"echo x > "$OUT/ready2"; exec sleep 30"#).stdout(Stdio::null()));
    wait_file(&out.join("ready2"));
    std::thread::sleep(Duration::from_millis(100));
    launcher.signal(libc::SIGTERM);
    assert_eq!(launcher.wait_timeout(Duration::from_secs(20)).unwrap().code(), Some(143));
}

/// Issue 13: `launch --config F` refused a file without `[audit]` and `[policy]`, which
/// launch supplies itself. Such a file works: the audit log goes to `--audit-dir`, and the
/// policy is launch's own (the job's uid, within its process tree).
#[test]
fn launch_config_needs_no_audit_or_policy_section() {
    let value = canary("launchcfg");
    let job = Job::new("launchcfg", &[("s", &value)]);
    let text = std::fs::read_to_string(&job.config).unwrap();
    let cut = text.find("[audit]").expect("the builder writes [audit]");
    let bare = &text[..cut];
    assert!(!bare.contains("[policy]") && !bare.contains("[audit]"));
    std::fs::write(&job.config, bare).unwrap();
    let (code, out, err) = run(&mut job.command(&[], r#"kvb get s > "$OUT/got""#));
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(std::fs::read_to_string(job.out().join("got")).unwrap() == value, "the job read the value");
    let recs = job.records();
    let read = recs.iter().find(|r| r["event"] == "secret.read").expect("the read is audited");
    assert_eq!((read["outcome"].as_str(), read["rule"].as_str()), (Some("allowed"), Some("launched-job")));
    assert!(!err.contains(&value) && !out.contains(&value));
}
