//! The emulator binary as a newcomer meets it (issue 11, "a first hour with no surprises"):
//! its `--help`, and the agent config it writes, used as it is by `kvbroker run`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbroker_tests::{EmulatorProc, Proc, bin, canary, curl, kvb, raw_get, read_records, run};
use serde_json::Value;

/// Issue 11: the emulator took `--dir` and `--secrets` but `--help` printed a one-line usage
/// to stderr and exited 2. Every option must say what it is for.
#[test]
fn emulator_help_explains_every_flag() {
    let (code, out, err) = run(Command::new(bin("kvbroker-emulator")).arg("--help"));
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let options = lines.iter().position(|l| *l == "Options:").expect("an Options: section");
    let mut flags = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(options + 1) {
        let t = line.trim_start();
        if !t.starts_with('-') {
            if !line.is_empty() && !line.starts_with(' ') {
                break; // the text after the options
            }
            continue;
        }
        let flag = t.split([',', ' ']).find(|w| w.starts_with("--")).unwrap().to_owned();
        let doc = lines.get(i + 1).map_or("", |l| l.trim());
        assert!(
            doc.split_whitespace().count() >= 2 && !doc.starts_with('-'),
            "{flag} has no explanation:\n{out}"
        );
        flags.push(flag);
    }
    assert_eq!(flags, ["--dir", "--secrets", "--help", "--version"], "{out}");
    assert!(out.contains("[default: .kvbroker-emulator]"), "--dir names its default:\n{out}");
    assert!(out.contains("Default: none (an empty vault)"), "--secrets names its default:\n{out}");
    assert!(out.contains("kvbroker run --config DIR/agent.toml"), "says what to run next:\n{out}");

    let (code, _, err) = run(Command::new(bin("kvbroker-emulator")).arg("--dri"));
    assert_eq!(code, 2, "bad usage exits 2");
    assert!(err.contains("unexpected argument '--dri'") && err.contains("Usage: kvbroker-emulator"), "{err}");
}

/// Issue 11: connecting an agent to the emulator meant copying a dozen keys out of
/// emulator.json by hand. The emulator now writes DIR/agent.toml, and that file works as is.
#[test]
fn agent_runs_on_the_config_the_emulator_writes() {
    let secret = canary("emucfg");
    let emu = EmulatorProc::start(&[("Db-Password", &secret)]);
    let dir = emu.dir.path();
    assert_eq!(emu.info.agent_config, dir.canonicalize().unwrap().join("agent.toml"));

    let stderr = dir.join("agent.stderr");
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.args(["run", "--config"]).arg(&emu.info.agent_config).env_remove("RUST_LOG");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap());
    let mut agent = Proc::spawn(&mut cmd);
    let socket = dir.join("agent.sock");
    wait_healthy(&socket, &mut agent, &stderr);

    // kvb, as the user who started the emulator (the policy's uid).
    let (code, out, err) = run(kvb(&socket, None).args(["get", "db-password"]));
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out == secret, "kvb printed something other than the secret ({} bytes)", out.len());
    // curl, the same read over the wire.
    let (code, out, _) = curl(&socket, "/v1/secrets/DB-PASSWORD", None, &[]);
    assert_eq!(code, 0);
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "200");
    let v: Value = serde_json::from_str(body).unwrap();
    assert!(v["value"] == secret.as_str(), "wrong value in the answer");
    assert_eq!(v["name"], "Db-Password");
    assert_eq!(v["vault"], "default");

    let audit = dir.join("audit.jsonl");
    let reads: Vec<Value> =
        read_records(&audit).into_iter().filter(|r| r["event"] == "secret.read").collect();
    assert_eq!(reads.len(), 2);
    for r in &reads {
        assert_eq!((r["outcome"].as_str(), r["rule"].as_str()), (Some("allowed"), Some("emulator-user")));
    }
    assert!(emu.count("token_imds") >= 1, "the agent authenticated through the emulator's IMDS");
    agent.signal(libc::SIGTERM);
    let status = agent.wait_timeout(Duration::from_secs(30)).expect("agent stops on SIGTERM");
    assert!(status.success(), "{status}");
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["audit", "verify"]).arg(&audit));
    assert_eq!(code, 0, "{err}");

    // Nothing the agent or the emulator's config files hold carries the value.
    for f in ["agent.stderr", "audit.jsonl", "agent.toml", "policy.toml", "emulator.json"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(!text.contains(&secret), "canary found in {f}");
    }
}

fn wait_healthy(socket: &Path, agent: &mut Proc, stderr: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(raw_get(socket, "/v1/health", &[]), Ok((200, _))) {
        if let Some(status) = agent.wait_timeout(Duration::ZERO) {
            panic!("agent exited ({status}):\n{}", std::fs::read_to_string(stderr).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "agent not ready in 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}
