//! A newcomer's first hour: every command README.md marks as tested, and every step the
//! `kvbroker dev` banner prints, run as pasted against a real `kvbroker dev`.
//!
//! Guards issue 11: README examples named secrets the dev vault did not have, and the banner
//! pointed `kvbroker ctl` at a socket a dev user could not reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbroker_tests::{Proc, TempDir, bin, raw_get, run};

/// How long a command that follows forever (`watch`, `tail`) runs before it is stopped; it
/// must have printed something and not have failed by then.
const FOLLOW_FOR: Duration = Duration::from_secs(3);

/// A running `kvbroker dev` in a fresh directory, the way the README starts it.
struct Dev {
    cwd: TempDir,
    proc: Proc,
    banner: PathBuf,
}

impl Dev {
    fn start(tag: &str) -> Dev {
        let cwd = TempDir::new(tag);
        let banner = cwd.path().join("banner.out");
        let mut cmd = Command::new(bin("kvbroker"));
        cmd.arg("dev").current_dir(cwd.path()).env_remove("RUST_LOG");
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&banner).unwrap()).stderr(Stdio::null());
        let proc = Proc::spawn(&mut cmd);
        let dev = Dev { cwd, proc, banner };
        let deadline = Instant::now() + Duration::from_secs(20);
        while raw_get(&dev.socket(), "/v1/health", &[]).map(|r| r.0).unwrap_or(0) != 200 {
            assert!(Instant::now() < deadline, "kvbroker dev did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        dev
    }

    fn socket(&self) -> PathBuf {
        self.cwd.path().join(".kvbroker-dev/agent.sock")
    }

    /// `sh -c LINE` in the dev's working directory, with the built binaries first on PATH and
    /// the exports seen so far.
    fn shell(&self, exports: &[String], line: &str) -> Command {
        let bins = bin("kvbroker").parent().unwrap().to_owned();
        let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap_or_default());
        let script = exports.iter().map(|e| format!("{e}\n")).collect::<String>() + line;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(self.cwd.path())
            .env("PATH", path)
            .env_remove("KVBROKER_SOCKET");
        cmd
    }

    /// Runs each line as a user would paste it; panics naming the first that fails.
    fn run_lines(&self, origin: &str, lines: &[String]) {
        let mut exports = Vec::new();
        for line in lines {
            if line.starts_with("export ") {
                exports.push(line.clone());
                continue;
            }
            if line.starts_with("cargo ") {
                // What built the binaries this test already runs; building again from inside
                // a test would contend for the build lock.
                continue;
            }
            if line.contains("Ctrl-C") {
                self.follow(origin, &exports, line);
                continue;
            }
            let (code, out, err) = run(&mut self.shell(&exports, line));
            // stdout may hold a (demo) value: only its size is shown.
            assert_eq!(code, 0, "{origin}: `{line}` failed\nstdout: {} bytes\nstderr: {err}", out.len());
        }
    }

    /// A command that runs until stopped: it must still be running after [`FOLLOW_FOR`],
    /// having printed at least one line.
    fn follow(&self, origin: &str, exports: &[String], line: &str) {
        let out_path = self.cwd.path().join("follow.out");
        let mut cmd = self.shell(exports, &format!("exec {line}"));
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd);
        let ended = proc.wait_timeout(FOLLOW_FOR);
        assert!(ended.is_none(), "{origin}: `{line}` ended early: {ended:?}");
        proc.signal(libc::SIGINT);
        let out = std::fs::read_to_string(&out_path).unwrap();
        assert!(!out.trim().is_empty(), "{origin}: `{line}` printed nothing");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        let _ = self.proc.wait_timeout(Duration::from_secs(10));
    }
}

/// The fenced blocks of README.md that follow a `<!-- e2e: run against kvbroker dev -->`
/// marker: (language, lines with comments and continuations resolved).
fn readme_blocks() -> Vec<(String, Vec<String>)> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- e2e: run against kvbroker dev -->" {
            continue;
        }
        let fence = lines.next().expect("a fenced block follows the marker");
        let lang = fence.strip_prefix("```").expect("the marker is right above a fence").to_owned();
        let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
        let commands = if lang == "sh" { shell_lines(&body) } else { vec![body.join("\n")] };
        blocks.push((lang, commands));
    }
    blocks
}

/// Shell lines with trailing `# comments` dropped (the comment's words kept aside: a
/// "Ctrl-C" in it marks a command that follows forever) and `\` continuations joined.
fn shell_lines(body: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut pending = String::new();
    for raw in body {
        let (code, comment) = match raw.find("  #").or_else(|| raw.starts_with('#').then_some(0)) {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (*raw, ""),
        };
        let code = code.trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        let mut line = std::mem::take(&mut pending).trim().to_owned();
        if line.is_empty() {
            continue;
        }
        if comment.contains("Ctrl-C") {
            line.push_str("  # Ctrl-C");
        }
        out.push(line);
    }
    out
}

/// The banner's "Try it" lines: everything indented under that heading, up to a blank line.
fn banner_lines(banner: &str) -> Vec<String> {
    let mut lines = banner.lines().skip_while(|l| !l.starts_with("Try it from another terminal"));
    lines.next().expect("the banner has a \"Try it\" section");
    let body: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).collect();
    assert!(body.iter().all(|l| l.starts_with("  ")), "{body:?}");
    shell_lines(&body.iter().map(|l| l.trim_start()).collect::<Vec<_>>())
}

/// Every command README.md marks as tested succeeds against `kvbroker dev`, as written.
#[test]
fn readme_commands_work_against_kvbroker_dev() {
    let dev = Dev::start("readme");
    let blocks = readme_blocks();
    assert!(blocks.len() >= 4, "README.md has the marked blocks: {blocks:?}");
    let exports = vec![format!("export KVBROKER_SOCKET={}", dev.socket().display())];
    for (i, (lang, lines)) in blocks.iter().enumerate() {
        let origin = format!("README.md block {} ({lang})", i + 1);
        match lang.as_str() {
            "sh" => {
                // Later blocks assume the "Try it" exports, as a reader who followed it has.
                let mut all = exports.clone();
                all.extend(lines.iter().cloned());
                dev.run_lines(&origin, &all);
            }
            "python" => {
                // The README's Python uses the `kvbroker` package: pure Python, importable
                // from the source tree as if `pip install ./client/python` had run.
                let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/python");
                let mut cmd = Command::new("python3");
                cmd.arg("-c").arg(&lines[0]).env("KVBROKER_SOCKET", dev.socket()).env("PYTHONPATH", package);
                let (code, out, err) = run(&mut cmd);
                assert_eq!(code, 0, "{origin} failed\nstdout: {} bytes\nstderr: {err}", out.len());
            }
            other => panic!("{origin}: no runner for {other}"),
        }
    }
    let _ = std::fs::remove_file("/dev/shm/db.pw");
}

/// Every step the dev banner prints succeeds, pasted as printed.
#[test]
fn dev_banner_steps_work_as_printed() {
    let dev = Dev::start("banner");
    let banner = std::fs::read_to_string(&dev.banner).unwrap();
    let lines = banner_lines(&banner);
    for expected in
        ["get db-password", "watch db-password", "curl ", "python3 ", "ctl --dir ", "policy explain"]
    {
        assert!(lines.iter().any(|l| l.contains(expected)), "banner lacks {expected:?}: {banner}");
    }
    for expected in ["audit verify", "audit query", "audit tail"] {
        assert!(lines.iter().any(|l| l.contains(expected)), "banner lacks {expected:?}: {banner}");
    }
    dev.run_lines("banner", &lines);
}

/// A second `kvbroker dev` on a directory whose agent is running fails before it prints a
/// banner (which would point at the other agent) and leaves that agent serving.
#[test]
fn second_dev_on_a_busy_dir_fails_before_the_banner() {
    let dev = Dev::start("busy");
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.arg("dev").current_dir(dev.cwd.path()).env_remove("RUST_LOG");
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 1);
    assert_eq!(out, "", "no banner");
    assert_eq!(
        err.trim_end(),
        format!(
            "kvbroker: {}: another `kvbroker dev` is already running there; use it, stop it, or give \
             another --dir",
            ".kvbroker-dev"
        )
    );
    assert_eq!(raw_get(&dev.socket(), "/v1/health", &[]).unwrap().0, 200, "the first agent is unharmed");
}

/// `policy explain` names an unknown vault alias with the agent's own 400 words.
#[test]
fn explain_unknown_vault_says_what_the_agent_says() {
    let dev = Dev::start("explain-vault");
    let config = dev.cwd.path().join(".kvbroker-dev/config.toml");
    let (code, _, err) = run(Command::new(bin("kvbroker"))
        .args(["policy", "explain", "--config"])
        .arg(&config)
        .args(["--uid", "0", "prod/db-password"]));
    assert_eq!(code, 1);
    let said = "unknown vault prod: check the vault parameter against [[vault]] alias";
    assert_eq!(
        err.trim_end(),
        format!("kvbroker: policy explain: the agent would answer 400 InvalidRequest: {said}")
    );
    let (status, body) = raw_get(&dev.socket(), "/v1/secrets/db-password?vault=prod", &[]).unwrap();
    assert_eq!(status, 400);
    assert!(body.contains(said), "{body}");
}

/// `check-config` prints its one line, not the Azure SDK's set-up logs.
#[test]
fn check_config_prints_only_its_verdict() {
    let dir = TempDir::new("check-quiet");
    let config = dir.path().join("config.toml");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[rule]]\nname = \"r\"\nuids = [0]\nsecrets = [\"*/*\"]\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "[agent]\nsocket = \"a.sock\"\nloopback_only = true\n[identity]\nsource = \"imds\"\n\
             [[vault]]\nalias = \"default\"\nurl = \"https://example.vault.azure.net\"\n\
             [audit]\npath = \"audit.jsonl\"\n[policy]\nfile = {policy:?}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = run(Command::new(bin("kvbroker"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG"));
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(out, format!("{}: ok (1 vault(s), 1 policy rule(s))\n", config.display()));
}
