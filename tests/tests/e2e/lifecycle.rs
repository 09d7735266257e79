//! Starting, restarting and stopping the agent; config checking; `kvbroker dev`.

use std::process::{Command, Stdio};
use std::time::Duration;

use kvbroker_tests::{Agent, Proc, TempDir, bin, canary, kvb, raw_get, run};

/// A socket file left by a killed agent is replaced on restart.
#[test]
fn restart_replaces_stale_socket() {
    let value = canary("restart");
    let mut agent = Agent::builder("restart").secret("s", &value).allow_uid(0).start();
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(agent.socket.exists(), "a killed agent leaves its socket file");
    agent.spawn();
    let (code, out, _) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (0, value.as_str()));
    let starts = agent.audit_records().iter().filter(|r| r["event"] == "agent.start").count();
    assert_eq!(starts, 2);
    agent.assert_no_canary(&[&value], &[]);
}

/// A second agent on a live socket, or on a path that is not a socket, refuses to start and
/// leaves the path alone.
#[test]
fn refuses_live_socket_and_non_socket_path() {
    let agent = Agent::builder("live").secret("s", "v").allow_uid(0).start();
    // Same socket, its own audit log (the same log would be refused first: one writer per log).
    let second = agent.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let audit = format!("path = \"{}\"", agent.audit.display());
    assert!(text.contains(&audit));
    let other = format!("path = \"{}\"", agent.dir.path().join("second.jsonl").display());
    std::fs::write(&second, text.replace(&audit, &other)).unwrap();
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["run", "--config"]).arg(&second));
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "kvbroker: {}: another agent is already listening on this socket; stop it first",
            agent.socket.display()
        )
    );
    assert_eq!(raw_get(&agent.socket, "/v1/health", &[]).unwrap().0, 200, "first agent unharmed");

    let b = Agent::builder("notsock").secret("s", "v").allow_uid(0);
    let config = b.write();
    let dir = b.into_dir();
    let sock = dir.path().join("agent.sock");
    std::fs::write(&sock, "precious").unwrap();
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["run", "--config"]).arg(&config));
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "kvbroker: {}: exists and is not a socket; remove it or choose another [agent] socket",
            sock.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
}

/// SIGTERM: new connections are refused, the in-flight request finishes, `agent.stop` is
/// written after its record, and the socket is removed.
#[test]
fn sigterm_drains_in_flight_requests() {
    let value = canary("drain");
    let mut agent =
        Agent::builder("drain").secret("slow", &value).allow_uid(0).latency("1500ms").grace("10s").start();
    let sock = agent.socket.clone();
    let in_flight = std::thread::spawn(move || raw_get(&sock, "/v1/secrets/slow", &[]).unwrap());
    std::thread::sleep(Duration::from_millis(400));
    agent.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let refused = std::os::unix::net::UnixStream::connect(&agent.socket);
    assert!(refused.is_err(), "a draining agent accepts no new connection");
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(&value));
    let exit = agent.proc.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(exit.success(), "{exit}");
    assert!(!agent.socket.exists(), "socket removed");
    let recs = agent.audit_records();
    let events: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["agent.start", "secret.read", "agent.stop"]);
    assert_eq!(recs[2]["reason"], "SIGTERM");
    agent.assert_no_canary(&[&value], &[]);
}

/// check-config: exit 0 with a summary, or 1 naming file, line and key.
#[test]
fn check_config_reports_file_line_and_key() {
    let b = Agent::builder("check").secret("s", "v").allow_uid(0);
    let config = b.write();
    let dir = b.into_dir();
    let (code, out, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, format!("{}: ok (1 vault(s), 1 policy rule(s))\n", config.display()));

    let text =
        std::fs::read_to_string(&config).unwrap().replace("durability = \"write\"", "durability = \"often\"");
    std::fs::write(&config, text).unwrap();
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!(code, 1);
    let line =
        std::fs::read_to_string(&config).unwrap().lines().position(|l| l.starts_with("durability")).unwrap()
            + 1;
    assert!(
        err.starts_with(&format!(
            "kvbroker: {}:{line}: key `durability`: unknown variant `often`, expected `write` or `fsync`",
            config.display()
        )),
        "{err}"
    );

    // A policy rule with no selector is refused with its line.
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[rule]]\nname = \"all\"\nsecrets = [\"default/*\"]\n").unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace("\"often\"", "\"write\"");
    std::fs::write(&config, text).unwrap();
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "kvbroker: {}:1: rule \"all\": has no selector, so it would match every caller: \
             add uids, gids, exe, exe_sha256, cgroup, systemd_unit, container_id or ancestor_exe\n",
            policy.display()
        )
    );
    // Usage errors exit 2.
    let (code, _, _) = run(Command::new(bin("kvbroker")).args(["check-config"]));
    assert_eq!(code, 2);
}

/// `kvbroker dev` starts a working agent and tells the user what to run next.
#[test]
fn dev_mode_serves_demo_secrets_to_the_invoking_user() {
    let dir = TempDir::new("dev");
    let dev_dir = dir.path().join("dev");
    let out_path = dir.path().join("dev.out");
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.arg("dev").arg("--dir").arg(&dev_dir).env_remove("RUST_LOG");
    cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::null());
    let mut proc = Proc::spawn(&mut cmd);
    let sock = dev_dir.join("agent.sock");
    let mut tries = 0;
    while raw_get(&sock, "/v1/health", &[]).map(|r| r.0).unwrap_or(0) != 200 {
        tries += 1;
        assert!(tries < 500, "dev agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let banner = std::fs::read_to_string(&out_path).unwrap();
    assert!(banner.contains("Not for production"), "{banner}");
    assert!(banner.contains(&format!("export KVBROKER_SOCKET={}", sock.display())), "{banner}");
    assert!(banner.contains("get db-password"), "{banner}");
    let (code, out, err) = run(kvb(&sock, None).args(["get", "db-password"]));
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.starts_with("demo-") && out.len() == 37, "demo value shape");
    assert!(!banner.contains(&out), "the banner never shows a value");
    proc.signal(libc::SIGTERM);
    assert!(proc.wait_timeout(Duration::from_secs(10)).unwrap().success());
}

/// `socket_mode` and `socket_group` decide who may connect at all: a member of the group
/// reaches the agent (and is then judged by policy), anyone else cannot connect.
#[test]
fn socket_mode_and_group_gate_who_can_connect() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let agent = Agent::builder("group")
        .secret("s", "v")
        .allow_uid(0)
        .socket_mode("0660")
        .socket_group("nogroup")
        .start();
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534, "socket group is nogroup");
    // uid 65534 / gid 65534 is in the group: it connects, and policy denies it (exit 3).
    let (code, _, err) = run(kvb(&agent.socket, Some(65534)).args(["get", "s"]));
    assert_eq!(code, 3, "{err}");
    // uid/gid 4242 is not: it cannot even connect (exit 1, naming the socket and the group).
    let (code, _, err) = run(kvb(&agent.socket, Some(4242)).args(["get", "s"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "kvb: your user cannot open {} (mode 0660, group nogroup): join that group or ask the operator\n",
            agent.socket.display()
        )
    );
}

/// Issue 13: check-config said ok to configs `run` refuses (a 1-byte or world-readable HMAC
/// key, a socket group that does not exist, an unsafe socket directory) or that crashed it (a
/// `refresh_interval` so large the first read panicked). Each is refused by both, with the
/// same message, before anything starts.
#[test]
fn check_config_refuses_what_run_refuses() {
    use std::os::unix::fs::PermissionsExt;
    let b = Agent::builder("checkall").secret("s", "v").allow_uid(0);
    let config = b.write();
    let dir = b.into_dir();
    let d = dir.path();
    let original = std::fs::read_to_string(&config).unwrap();
    let short_key = d.join("short.key");
    std::fs::write(&short_key, "k\n").unwrap();
    std::fs::set_permissions(&short_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_key = d.join("open.key");
    std::fs::write(&open_key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_dir = d.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let line_of = |text: &str, prefix: &str| text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1;

    /// The expected stderr, given the config text.
    type Want<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let cases: Vec<(&str, String, Want<'_>)> = vec![
        (
            "missing socket group",
            original.replace(
                "loopback_only = true\n",
                "loopback_only = true\nsocket_group = \"kvb-no-such-group\"\n",
            ),
            Box::new(|_| "kvbroker: socket_group \"kvb-no-such-group\": no such group\n".to_owned()),
        ),
        (
            "world-writable socket directory",
            original.replace(
                &format!("socket = \"{}\"", d.join("agent.sock").display()),
                &format!("socket = \"{}\"", open_dir.join("agent.sock").display()),
            ),
            Box::new(|_| {
                format!(
                    "kvbroker: {p}: the socket's directory is writable by group or others (mode 0777): run `chmod go-w {p}`\n",
                    p = open_dir.display()
                )
            }),
        ),
        (
            "1-byte HMAC key",
            original.replace(
                "durability = \"write\"\n",
                &format!("durability = \"write\"\nhmac_key_file = {short_key:?}\n"),
            ),
            Box::new(|_| {
                format!(
                    "kvbroker: {}: cannot use the audit HMAC key: the HMAC key is shorter than 16 bytes: use at least 16 random bytes\n",
                    short_key.display()
                )
            }),
        ),
        (
            "HMAC key readable by others",
            original.replace(
                "durability = \"write\"\n",
                &format!("durability = \"write\"\nhmac_key_file = {open_key:?}\n"),
            ),
            Box::new(|_| {
                format!(
                    "kvbroker: {}: cannot use the audit HMAC key: readable by group or others: run chmod 600 on it\n",
                    open_key.display()
                )
            }),
        ),
        (
            "duration past 10 years",
            original.replace("[cache]\n", "[cache]\nrefresh_interval = \"11years\"\n"),
            Box::new(|text| {
                format!(
                    "kvbroker: {}:{}: key `refresh_interval`: duration \"11years\" is longer than 10 years: write a shorter one\n",
                    config.display(),
                    line_of(text, "refresh_interval")
                )
            }),
        ),
    ];
    for (what, text, want) in &cases {
        assert_ne!(text, &original, "{what}: the edit applied");
        std::fs::write(&config, text).unwrap();
        let want = want(text);
        for cmd in ["check-config", "run"] {
            // `timeout`: a `run` that wrongly starts must not hang the test.
            let (code, out, err) = run(Command::new("timeout")
                .arg("20")
                .arg(bin("kvbroker"))
                .args([cmd, "--config"])
                .arg(&config));
            assert_eq!((code, out.as_str(), err.as_str()), (1, "", want.as_str()), "{what}: {cmd}");
        }
    }
    assert!(!d.join("agent.sock").exists() && !open_dir.join("agent.sock").exists(), "nothing was served");
}
