//! The unit's sandbox, rebuilt without systemd (CI has no systemd as PID 1): its user, its
//! capabilities, its read-only filesystem, its `/proc`, its limits; every system call traced
//! and held against its `SystemCallFilter=`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kvbroker_tests::{TempDir, bin, canary, run};

use super::{Received, repo, which};

/// The unit's sandbox, rebuilt without systemd, still serves: the agent runs as a system user
/// of its own with exactly the unit's capabilities (CapabilityBoundingSet=, ambient), a
/// read-only filesystem but its runtime and logs directories (ProtectSystem=strict),
/// no_new_privs, the unit's LimitNOFILE and LimitMEMLOCK and a `/proc` mounted
/// `hidepid=invisible,subset=pid` (ProtectProc=invisible, ProcSubset=pid); another uid reads
/// a secret through an `exe` rule (its /proc/PID/exe read with CAP_SYS_PTRACE alone), and
/// every system call the agent made from start to stop — traced with strace — is one the
/// unit's SystemCallFilter= allows, every socket of a family its RestrictAddressFamilies=
/// allows.
/// The same trace shows READY=1 sent only after the agent wrote its first health answer.
/// Without CAP_SYS_PTRACE the same read is denied: the capability is needed, not decoration.
#[test]
fn agent_serves_inside_the_units_sandbox() {
    let tools = ["systemd-analyze", "strace", "unshare", "setpriv", "prlimit", "useradd"];
    if let Some(missing) = tools.iter().find(|t| which(t).is_none()) {
        eprintln!("SKIPPED agent_serves_inside_the_units_sandbox: {missing} is not installed");
        return;
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/kvbroker.service")).unwrap();
    let caps = unit_values(&unit, "CapabilityBoundingSet");
    assert_eq!(caps, unit_values(&unit, "AmbientCapabilities"), "the unit's ambient set is its bounding set");
    let setpriv_caps: String =
        caps.iter().map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    // LimitNOFILE= and LimitMEMLOCK=, or this machine's hard limits if lower (there may be
    // no CAP_SYS_RESOURCE to go above them): either way soft = hard, as under the unit.
    let nofile = unit_values(&unit, "LimitNOFILE").concat().parse::<u64>().unwrap().min(hard_limit("-n"));
    let memlock = (unit_values(&unit, "LimitMEMLOCK").concat().replace('M', "").parse::<u64>().unwrap()
        << 20)
        .min(hard_limit("-l").saturating_mul(1024));

    let user = TempUser::new();
    let dir = TempDir::new("sandbox");
    let d = dir.path();
    let copy = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = d.join(name);
        std::fs::copy(bin(name), &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let (kvbroker, kvb_copy) = (copy("kvbroker"), copy("kvb"));
    // The agent runs under strace, unshare and setpriv: killing those leaves it running.
    let _reaper = KillOnDrop(kvbroker.clone());
    // As the unit's RuntimeDirectory= and LogsDirectory= make them: owned by its user.
    for (sub, mode) in [("run", 0o755), ("log", 0o750)] {
        std::fs::create_dir(d.join(sub)).unwrap();
        std::os::unix::fs::chown(d.join(sub), Some(user.uid), Some(user.gid)).unwrap();
        std::fs::set_permissions(d.join(sub), std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let value = canary("sandbox");
    kvbroker_tests::write_mode(&d.join("secrets.toml"), &format!("s = {value:?}\n"), 0o600);
    std::os::unix::fs::chown(d.join("secrets.toml"), Some(user.uid), None).unwrap();
    kvbroker_tests::write_mode(
        &d.join("policy.toml"),
        &format!(
            "[[rule]]\nname = \"nobody-kvb\"\nuids = [65534]\nexe = [{:?}]\nsecrets = [\"default/s\"]\n",
            kvb_copy.display()
        ),
        0o644,
    );
    let socket = d.join("run/agent.sock");
    kvbroker_tests::write_mode(
        &d.join("config.toml"),
        &format!(
            "[agent]\nsocket = {socket:?}\nsocket_mode = \"0666\"\nadmin_socket = {admin:?}\nloopback_only = true\n\
             [[vault]]\nalias = \"default\"\nkind = \"local\"\nfile = {secrets:?}\n\
             [audit]\npath = {audit:?}\n[policy]\nfile = {policy:?}\n",
            admin = d.join("run/admin.sock"),
            secrets = d.join("secrets.toml"),
            audit = d.join("log/audit.jsonl"),
            policy = d.join("policy.toml"),
        ),
        0o644,
    );

    let start = |caps: &str, trace: Option<&Path>| -> (kvbroker_tests::Proc, Received) {
        let notify = d.join(format!("notify-{}.sock", fastrand::u32(..)));
        let got = Received::listen(&notify);
        // ProtectSystem=strict: everything read-only but the runtime and logs directories.
        let inner = format!(
            "mount --bind {run} {run} && mount --bind {log} {log} && mount -o remount,bind,ro / && \
             mount -t proc -o hidepid=invisible,subset=pid proc /proc && exec prlimit --nofile={nofile}:{nofile} \
             --memlock={memlock}:{memlock} -- setpriv --reuid={u} --regid={g} --init-groups \
             --inh-caps=-all{caps} --ambient-caps=-all{caps} --bounding-set=-all{caps} --no-new-privs \
             {kvbroker} run --config {config}",
            run = d.join("run").display(),
            log = d.join("log").display(),
            u = user.uid,
            g = user.gid,
            kvbroker = kvbroker.display(),
            config = d.join("config.toml").display(),
        );
        let mut cmd = match trace {
            Some(t) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-qq", "-o"]).arg(t).arg("--");
                c.arg("unshare");
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &inner]);
        cmd.env("NOTIFY_SOCKET", &notify).env("WATCHDOG_USEC", "400000").env_remove("RUST_LOG");
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(d.join("agent.out")).unwrap())
            .stderr(std::fs::File::create(d.join("agent.err")).unwrap());
        let proc = kvbroker_tests::Proc::spawn(&mut cmd);
        let log = || std::fs::read_to_string(d.join("agent.err")).unwrap_or_default();
        got.wait_for(Duration::from_secs(20), |l| l == "READY=1")
            .unwrap_or_else(|| panic!("no READY=1 from the sandboxed agent:\n{}", log()));
        (proc, got)
    };
    let read_as_nobody = || {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&kvb_copy).args(["get", "s"]);
        run(c.env("KVBROKER_SOCKET", &socket))
    };

    let trace = d.join("strace.out");
    let (mut proc, got) = start(&setpriv_caps, Some(&trace));
    let (code, out, err) = read_as_nobody();
    assert_eq!((code, out.as_str()), (0, value.as_str()), "read in the sandbox: {err}");
    got.wait_for(Duration::from_secs(3), |l| l == "WATCHDOG=1").expect("watchdog pings in the sandbox");
    // Checked from outside, as systemd would set them up.
    let agent = pid_running(&kvbroker);
    let status_file = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let field = |k: &str| status_file.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_owned();
    assert_eq!(field("Uid:").split_whitespace().next(), Some(user.uid.to_string().as_str()));
    assert_eq!(field("CapEff:"), field("CapBnd:"));
    assert_eq!(
        field("CapEff:"),
        format!("{:016x}", (1u64 << 19) | (1u64 << 2)),
        "CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    // SIGTERM to the agent itself (strace, the parent, passes it on to nobody).
    assert_eq!(run(Command::new("kill").args(["-TERM", &agent.to_string()])).0, 0);
    let status = proc.wait_timeout(Duration::from_secs(30)).expect("sandboxed agent did not stop");
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(d.join("agent.err")).unwrap());
    assert!(got.text().contains("STOPPING=1"));

    let trace_text = std::fs::read_to_string(&trace).unwrap();
    // READY=1 went out only after the agent had answered a health request on its socket.
    let ready_at = trace_text.lines().position(|l| l.contains("READY=1")).expect("READY=1 in the trace");
    let answered_at = trace_text.lines().position(|l| l.contains("\"HTTP/1.1 200 OK")).unwrap_or_else(|| {
        panic!(
            "no HTTP answer in the trace:\n{}",
            trace_text.lines().filter(|l| l.contains("HTTP")).collect::<Vec<_>>().join("\n")
        )
    });
    assert!(
        answered_at < ready_at,
        "READY=1 (trace line {ready_at}) before the first answer (line {answered_at})"
    );
    let calls = syscalls_after_exec(&trace_text, &kvbroker);
    let used: std::collections::BTreeSet<&str> = calls.iter().map(|(name, _)| *name).collect();
    assert!(
        used.contains("mlock") && used.contains("pidfd_send_signal") && used.contains("recvmsg"),
        "the trace covers a read: {used:?}"
    );
    let allowed = allowed_syscalls(&unit);
    let refused: Vec<&&str> = used.iter().filter(|s| !allowed.contains(**s)).collect();
    assert!(refused.is_empty(), "system calls the unit's SystemCallFilter= refuses: {refused:?}");
    // Every socket it opened is of a family RestrictAddressFamilies= allows.
    let families = unit_values(&unit, "RestrictAddressFamilies");
    for (name, rest) in &calls {
        if ["socket", "socketpair"].contains(name)
            && let Some(family) = rest.split(['(', ',']).nth(1)
        {
            assert!(families.iter().any(|f| f == family), "{name} with {family}: not in {families:?}");
        }
    }
    assert!(calls.iter().any(|(n, r)| *n == "socket" && r.contains("AF_UNIX")), "the trace has socket calls");

    // Without CAP_SYS_PTRACE, the other uid's process cannot be attested: denied.
    let without: String = setpriv_caps
        .split(',')
        .filter(|c| !c.is_empty() && *c != "+sys_ptrace")
        .map(|c| format!(",{c}"))
        .collect();
    assert_ne!(without, setpriv_caps);
    let (mut proc, _got) = start(&without, None);
    let (code, out, _) = read_as_nobody();
    assert_eq!((code, out.as_str()), (3, ""), "denied without CAP_SYS_PTRACE");
    assert_eq!(run(Command::new("kill").args(["-TERM", &pid_running(&kvbroker).to_string()])).0, 0);
    proc.wait_timeout(Duration::from_secs(30)).expect("agent did not stop");
    let audit = std::fs::read_to_string(d.join("log/audit.jsonl")).unwrap();
    assert!(!audit.contains(&value) && !got.text().contains(&value), "no value in audit or notifications");
}

/// A hard limit of this process (children inherit it): `ulimit -H` with `flag`.
fn hard_limit(flag: &str) -> u64 {
    let (code, out, err) = run(Command::new("sh").args(["-c", &format!("ulimit -H {flag}")]));
    assert_eq!(code, 0, "{err}");
    out.trim().parse().unwrap_or(u64::MAX)
}

/// The pid of the one process running `exe`.
fn pid_running(exe: &Path) -> u32 {
    let pids = pids_running(exe);
    assert_eq!(pids.len(), 1, "one process runs {}", exe.display());
    pids[0]
}

fn pids_running(exe: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

/// Kills, when dropped, every process still running this test's copy of a binary.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in pids_running(&self.0) {
            let _ = run(Command::new("kill").args(["-KILL", &pid.to_string()]));
        }
        // userdel refuses a user with processes: wait until they are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pids_running(&self.0).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The space-separated values of `Key=` lines in a unit file (all lines, in order).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// What the unit's SystemCallFilter= lines allow: each line adds its names (or, with a
/// leading `~`, takes them away), groups expanded by `systemd-analyze syscall-filter`.
fn allowed_syscalls(unit: &str) -> std::collections::BTreeSet<String> {
    let (_, listing, _) = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]));
    let mut groups: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
        } else if !line.starts_with(' ') {
            current = None;
        } else if let Some(g) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups.entry(g.clone()).or_default().push(item.to_owned());
            }
        }
    }
    fn expand(name: &str, groups: &std::collections::HashMap<String, Vec<String>>, out: &mut Vec<String>) {
        match groups.get(name) {
            Some(items) => items.iter().for_each(|i| expand(i, groups, out)),
            None => {
                assert!(!name.starts_with('@'), "unknown syscall group {name}");
                out.push(name.to_owned());
            }
        }
    }
    let mut allowed = std::collections::BTreeSet::new();
    let lines: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")).collect();
    assert!(!lines.is_empty(), "the unit has a SystemCallFilter=");
    for line in lines {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut names = Vec::new();
        list.split_whitespace().for_each(|n| expand(n, &groups, &mut names));
        for n in names {
            if deny {
                allowed.remove(&n);
            } else {
                allowed.insert(n);
            }
        }
    }
    allowed
}

/// System calls in an `strace -f` log made by the process that exec'd `exe` (from that
/// exec on) and by every thread or child it started: (name, the rest of the line).
fn syscalls_after_exec<'a>(trace: &'a str, exe: &Path) -> Vec<(&'a str, &'a str)> {
    let exec = format!("execve(\"{}\"", exe.display());
    let mut ours = std::collections::HashSet::new();
    let mut used = Vec::new();
    for line in trace.lines() {
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        if ours.is_empty() {
            if rest.starts_with(&exec) && rest.trim_end().ends_with("= 0") {
                ours.insert(pid.to_owned());
            }
            continue;
        }
        if !ours.contains(pid) || rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        let name = match rest.strip_prefix("<... ") {
            Some(r) => r.split_whitespace().next().unwrap_or(""),
            None => rest.split('(').next().unwrap_or(""),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if ["clone", "clone3", "fork", "vfork"].contains(&name)
            && let Some(child) = rest.rsplit("= ").next().and_then(|r| r.trim().parse::<u32>().ok())
        {
            ours.insert(child.to_string());
        }
        used.push((name, rest));
    }
    assert!(!ours.is_empty(), "no {exec} in the trace");
    used
}

/// A system user and group made for one test (as the package makes `kvbroker`), removed
/// when dropped.
struct TempUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TempUser {
    fn new() -> Self {
        let name = format!("kvbt{:08x}", fastrand::u32(..));
        let (code, _, err) = run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ]));
        assert_eq!(code, 0, "useradd {name}: {err}");
        // Made first, so it is removed even if the look-ups below fail.
        let mut user = TempUser { name, uid: 0, gid: 0 };
        let id = |flag: &str, name: &str| {
            run(Command::new("id").arg(flag).arg(name)).1.trim().parse::<u32>().unwrap()
        };
        user.uid = id("-u", &user.name);
        user.gid = id("-g", &user.name);
        user
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = run(Command::new("userdel").arg(&self.name));
        let _ = run(Command::new("groupdel").arg(&self.name));
    }
}
