//! Test harness for kvbroker: find the real binaries, start agents in private directories,
//! and scan everything they wrote for canary values.
//!
//! Every process started here is killed when its handle drops, and every directory is
//! removed, so a failing test leaves nothing behind. Nothing here talks to any address but
//! loopback: agents listen on Unix sockets inside the test's own directory, and the stand-ins
//! (the emulator, [`kubelet::Kubelet`]) bind 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test harness: a failure should panic loudly")]

pub mod emulator;
pub mod kubelet;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use emulator::{EmulatorInfo, Fault};

/// The path of a workspace binary, next to the running test's profile directory.
/// Panics (rather than guessing) if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps/, other binaries in target/<profile>/.
    let dir = exe.parent().expect("binary has a directory");
    let profile = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    let p = profile.join(name);
    assert!(
        p.exists(),
        "binary {} not found: build it first with `cargo build --workspace --bins` (add --release for benchmarks)",
        p.display()
    );
    p
}

/// A fresh value no other test uses, to search for in outputs.
pub fn canary(tag: &str) -> String {
    format!("CANARY-{tag}-{:016x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// A directory removed on drop. Mode 0755, so a test can let another uid reach a socket.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kvb-e2e-{tag}-{:x}", fastrand_u64()));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped — with every process of its
/// process group when spawned by [`Proc::spawn_group`].
pub struct Proc(Option<Child>, bool);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))), false)
    }

    /// Spawns `cmd` in a process group of its own and, when dropped, kills the whole group:
    /// for a supervisor (`kvb exec`) whose child would outlive a SIGKILL of the supervisor.
    pub fn spawn_group(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Self(Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))), true)
    }

    /// Takes ownership of an already spawned child.
    pub fn adopt(child: Child) -> Self {
        Self(Some(child), false)
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("process was started").id()
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) on a pid we spawned and have not reaped, so it is still ours.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Waits for exit, up to `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.0.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if self.1
                && let Ok(pgid) = libc::pid_t::try_from(c.id())
            {
                // SAFETY: kill(2) of the process group our unreaped child leads.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One secret of a local vault: a plain value, or a TOML inline table with attributes.
pub enum LocalSecret {
    Plain(String),
    Table(String),
}

/// Builds an agent configuration in a private directory.
pub struct AgentBuilder {
    dir: TempDir,
    secrets: Vec<(String, LocalSecret)>,
    rules: Vec<String>,
    socket_mode: String,
    socket_group: Option<String>,
    durability: &'static str,
    audit_path: Option<PathBuf>,
    latency: Option<&'static str>,
    env: Vec<(String, String)>,
    grace: Option<&'static str>,
    keyvault: Option<KeyVaultSetup>,
    cache: String,
    limits: String,
    nofile: Option<u64>,
    audit_extra: String,
    sections: String,
}

/// A Key Vault at an emulator, reached with one identity source.
struct KeyVaultSetup {
    info: EmulatorInfo,
    source: String,
    client_id: Option<String>,
    extra_vault: String,
}

/// A running agent; killed when dropped.
pub struct Agent {
    pub proc: Proc,
    pub socket: PathBuf,
    pub audit: PathBuf,
    pub config: PathBuf,
    pub policy: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
    /// Last, so processes are killed before their directory goes.
    pub dir: TempDir,
}

impl Agent {
    pub fn builder(tag: &str) -> AgentBuilder {
        AgentBuilder {
            dir: TempDir::new(tag),
            secrets: Vec::new(),
            rules: Vec::new(),
            socket_mode: "0660".into(),
            socket_group: None,
            durability: "write",
            audit_path: None,
            latency: None,
            env: Vec::new(),
            grace: None,
            keyvault: None,
            cache: String::new(),
            limits: String::new(),
            nofile: None,
            audit_extra: String::new(),
            sections: String::new(),
        }
    }
}

impl AgentBuilder {
    pub fn secret(mut self, name: &str, value: &str) -> Self {
        self.secrets.push((name.into(), LocalSecret::Plain(value.into())));
        self
    }

    /// A secret with attributes: `attrs` is the inside of an inline table after `value`.
    pub fn secret_with(mut self, name: &str, value: &str, attrs: &str) -> Self {
        self.secrets.push((name.into(), LocalSecret::Table(format!("{{ value = {value:?}, {attrs} }}"))));
        self
    }

    /// A policy rule, as the TOML lines after `[[rule]]`.
    pub fn rule(mut self, body: &str) -> Self {
        self.rules.push(body.into());
        self
    }

    /// Allows `uid` to read every secret of the default vault.
    pub fn allow_uid(self, uid: u32) -> Self {
        self.rule(&format!("name = \"uid-{uid}\"\nuids = [{uid}]\nsecrets = [\"default/*\"]"))
    }

    pub fn socket_mode(mut self, mode: &str) -> Self {
        self.socket_mode = mode.into();
        self
    }

    pub fn socket_group(mut self, group: &str) -> Self {
        self.socket_group = Some(group.into());
        self
    }

    pub fn durability(mut self, d: &'static str) -> Self {
        self.durability = d;
        self
    }

    pub fn audit_path(mut self, p: PathBuf) -> Self {
        self.audit_path = Some(p);
        self
    }

    /// Adds latency to every local vault read (to hold requests in flight).
    pub fn latency(mut self, l: &'static str) -> Self {
        self.latency = Some(l);
        self
    }

    pub fn grace(mut self, g: &'static str) -> Self {
        self.grace = Some(g);
        self
    }

    /// Reads from the emulator's Key Vault (instead of a local vault), authenticating with
    /// identity `source` (`imds`, `app-service`, `azure-ml`, `azure-arc`,
    /// `workload-identity`), whose environment comes from the emulator.
    pub fn keyvault(mut self, emu: &EmulatorProc, source: &str) -> Self {
        let info = emu.info.clone();
        if let Some(id) = info.identity.get(source) {
            for (k, v) in &id.env {
                self.env.push((k.clone(), v.clone()));
            }
        }
        self.keyvault =
            Some(KeyVaultSetup { info, source: source.into(), client_id: None, extra_vault: String::new() });
        self
    }

    /// `[limits]` lines, e.g. `rate_per_second = 20`.
    pub fn limits(mut self, lines: &str) -> Self {
        self.limits.push_str(lines);
        self.limits.push('\n');
        self
    }

    /// `[cache]` lines, e.g. `refresh_interval = "1s"`.
    pub fn cache(mut self, lines: &str) -> Self {
        self.cache.push_str(lines);
        self.cache.push('\n');
        self
    }

    /// Uses a user-assigned identity's client id (`[identity] client_id`).
    pub fn client_id(mut self, id: &str) -> Self {
        if let Some(kv) = self.keyvault.as_mut() {
            kv.client_id = Some(id.into());
        }
        self
    }

    /// Extra `[[vault]]` lines for the Key Vault (e.g. `deadline = "2s"`).
    pub fn vault_extra(mut self, lines: &str) -> Self {
        if let Some(kv) = self.keyvault.as_mut() {
            kv.extra_vault.push_str(lines);
            kv.extra_vault.push('\n');
        }
        self
    }

    /// Extra `[audit]` lines, e.g. `rotate_bytes = 1048576`.
    pub fn audit_extra(mut self, lines: &str) -> Self {
        self.audit_extra.push_str(lines);
        self.audit_extra.push('\n');
        self
    }

    /// Runs the agent under `prlimit --nofile=N:N` (soft and hard fd limit N).
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Whole sections appended to the config, e.g. `"[metrics]\nlisten = \"127.0.0.1:9464\""`.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self.sections.push_str("\n\n");
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Writes config, policy and secrets into the directory; returns the config path.
    pub fn write(&self) -> PathBuf {
        let d = self.dir.path();
        let mut text = String::new();
        for (name, s) in &self.secrets {
            match s {
                LocalSecret::Plain(v) => text.push_str(&format!("{name} = {v:?}\n")),
                LocalSecret::Table(t) => text.push_str(&format!("{name} = {t}\n")),
            }
        }
        write_mode(&d.join("secrets.toml"), &text, 0o600);
        let rules: String = self.rules.iter().map(|r| format!("[[rule]]\n{r}\n\n")).collect();
        write_mode(&d.join("policy.toml"), &rules, 0o644);
        let latency = self.latency.map(|l| format!("latency = \"{l}\"\n")).unwrap_or_default();
        let mut agent_extra = self.grace.map(|g| format!("shutdown_grace = \"{g}\"\n")).unwrap_or_default();
        if let Some(g) = &self.socket_group {
            agent_extra.push_str(&format!("socket_group = {g:?}\n"));
        }
        let config = d.join("config.toml");
        let vault = match &self.keyvault {
            None => format!(
                "[[vault]]\nalias = \"default\"\nkind = \"local\"\nfile = \"secrets.toml\"\n{latency}\n"
            ),
            Some(kv) => {
                let id = kv.info.identity.get(&kv.source);
                let mut identity = format!("[identity]\nsource = {:?}\n", kv.source);
                if let Some(c) = &kv.client_id {
                    identity.push_str(&format!("client_id = {c:?}\n"));
                }
                let mut id_connect: Vec<String> = id.map(|i| i.connect_to.clone()).unwrap_or_default();
                id_connect.extend(kv.info.connect_to.iter().cloned());
                identity.push_str(&format!("connect_to = {id_connect:?}\nca_file = {:?}\n", kv.info.ca_file));
                if let Some(dir) = id.and_then(|i| i.token_dir.as_ref()) {
                    identity.push_str(&format!("arc_token_dir = {dir:?}\n"));
                }
                format!(
                    "{identity}\n[[vault]]\nalias = \"default\"\nurl = {:?}\nca_file = {:?}\nconnect_to = {:?}\n{}\n",
                    kv.info.vault_url, kv.info.ca_file, kv.info.connect_to, kv.extra_vault
                )
            }
        };
        // Tests never leave loopback: the agent refuses any other address.
        let text = format!(
            "[agent]\nsocket = \"{sock}\"\nsocket_mode = \"{mode}\"\nadmin_socket = \"{admin}\"\nloopback_only = true\n{agent_extra}\n\
             {vault}\
             [cache]\n{cache}\n\
             [limits]\n{limits}\n\
             [audit]\npath = \"{audit}\"\ndurability = \"{dur}\"\n{audit_extra}\n\
             [policy]\nfile = \"policy.toml\"\n\n{sections}",
            sock = d.join("agent.sock").display(),
            admin = d.join("admin.sock").display(),
            mode = self.socket_mode,
            audit = self.audit().display(),
            dur = self.durability,
            cache = self.cache,
            limits = self.limits,
            audit_extra = self.audit_extra,
            sections = self.sections,
        );
        write_mode(&config, &text, 0o644);
        config
    }

    fn audit(&self) -> PathBuf {
        self.audit_path.clone().unwrap_or_else(|| self.dir.path().join("audit.jsonl"))
    }

    /// The directory, for tests that only need the files.
    pub fn into_dir(self) -> TempDir {
        self.dir
    }

    /// Writes the files and starts `kvbroker run`, waiting until it answers health.
    pub fn start(self) -> Agent {
        self.write();
        self.start_written()
    }

    /// Starts `kvbroker run` on files already written (and perhaps edited by the test).
    pub fn start_written(self) -> Agent {
        let config = self.dir.path().join("config.toml");
        let d = self.dir.path().to_owned();
        let mut agent = Agent {
            proc: Proc(None, false),
            socket: d.join("agent.sock"),
            audit: self.audit(),
            config,
            policy: d.join("policy.toml"),
            stdout: d.join("agent.stdout"),
            stderr: d.join("agent.stderr"),
            env: self.env,
            nofile: self.nofile,
            dir: self.dir,
        };
        agent.spawn();
        agent
    }
}

impl Agent {
    /// Starts (another) `kvbroker run` on this agent's config and waits until it is ready.
    pub fn spawn(&mut self) {
        let mut cmd = match self.nofile {
            // prlimit execs the agent: the pid is the agent's.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin("kvbroker"));
                c
            }
            None => Command::new(bin("kvbroker")),
        };
        cmd.args(["run", "--config"]).arg(&self.config);
        cmd.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let append = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        cmd.stdin(Stdio::null()).stdout(append(&self.stdout)).stderr(append(&self.stderr));
        self.proc = Proc::spawn(&mut cmd);
        wait_ready(&self.socket, &mut self.proc, &self.stderr);
    }

    /// `kvbroker run` on this config without waiting: for tests of refused starts.
    pub fn run_again(&self) -> (i32, String, String) {
        run(Command::new(bin("kvbroker")).args(["run", "--config"]).arg(&self.config))
    }
}

/// Writes a file with the given mode (tests run as root: modes are set explicitly).
pub fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn wait_ready(socket: &Path, proc: &mut Proc, stderr: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proc.wait_timeout(Duration::ZERO) {
            panic!(
                "agent exited during startup ({status}):\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        if let Ok((200, _)) = raw_get(socket, "/v1/health", &[]) {
            return;
        }
        assert!(Instant::now() < deadline, "agent did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 GET over a Unix socket: (status, body). Independent of the client
/// crate, so tests can check the wire itself.
pub fn raw_get(socket: &Path, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    let (status, _, body) = raw_request(socket, "GET", path, headers)?;
    Ok((status, body))
}

/// A raw request returning (status, header block, body).
pub fn raw_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: kvbroker\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

impl Agent {
    /// The agent's audit records, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        read_records(&self.audit)
    }

    /// The agent's audit records once `done` holds of them — for records the agent writes
    /// in the background (a version change, found by a refresh) — or, after 10 s, as they
    /// are (the caller's assertion then says what is missing).
    pub fn audit_records_once(&self, done: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
        let t = Instant::now();
        loop {
            let records = self.audit_records();
            if done(&records) || t.elapsed() > Duration::from_secs(10) {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the agent printed.
    pub fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        s
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait_timeout(Duration::from_secs(30)).expect("agent did not stop after SIGTERM")
    }

    /// Asserts no canary appears in the agent's output, audit log, or `extra` texts.
    pub fn assert_no_canary(&self, canaries: &[&str], extra: &[&str]) {
        let audit = std::fs::read_to_string(&self.audit).unwrap_or_default();
        let mut texts = vec![("agent output", self.output()), ("audit log", audit)];
        texts.extend(extra.iter().map(|t| ("test output", (*t).to_owned())));
        for (what, text) in &texts {
            for c in canaries {
                assert!(!text.contains(c), "canary {c} found in {what}");
            }
        }
    }
}

pub fn read_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A last line without its newline is a record being written as we read: not yet there.
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l}: {e}")))
        .collect()
}

/// Runs a command to completion: (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kvb` with the socket set, optionally as another uid via setpriv.
pub fn kvb(socket: &Path, as_uid: Option<u32>) -> Command {
    let mut cmd = match as_uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).arg("--clear-groups");
            c.arg(bin("kvb"));
            c
        }
        None => Command::new(bin("kvb")),
    };
    cmd.env("KVBROKER_SOCKET", socket);
    cmd
}

/// `curl` over the Unix socket, printing the status code on the last line.
pub fn curl(socket: &Path, path: &str, as_uid: Option<u32>, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = match as_uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).arg("--clear-groups").arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-s", "-w", "\n%{http_code}", "--unix-socket"]).arg(socket).args(extra);
    cmd.arg(format!("http://localhost{path}"));
    run(&mut cmd)
}

/// A running `kvbroker-emulator` process; killed when dropped.
pub struct EmulatorProc {
    pub proc: Proc,
    pub info: EmulatorInfo,
    pub dir: TempDir,
    control: std::net::SocketAddr,
}

impl EmulatorProc {
    /// Starts the emulator binary with these secrets (first versions).
    pub fn start(secrets: &[(&str, &str)]) -> EmulatorProc {
        use std::io::BufRead;
        let dir = TempDir::new("emu");
        let secrets_file = dir.path().join("secrets.toml");
        let text: String = secrets.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
        std::fs::write(&secrets_file, text).unwrap();
        let mut cmd = Command::new(bin("kvbroker-emulator"));
        cmd.arg("--dir").arg(dir.path()).arg("--secrets").arg(&secrets_file);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn kvbroker-emulator");
        let stdout = child.stdout.take().unwrap();
        let proc = Proc(Some(child), false);
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        let info: EmulatorInfo =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("emulator said {line:?}: {e}"));
        let control = loopback_addr(&info.control_url);
        EmulatorProc { proc, info, dir, control }
    }

    fn control(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.control).unwrap();
        let req = format!(
            "{method} /control{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "control {method} {path}: {head}\n{body}");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }

    /// Calls per operation: `get`, `get:NAME`, `set`, `token_imds`, `challenge`, …
    pub fn count(&self, what: &str) -> u64 {
        self.control("GET", "/counts", "")[what].as_u64().unwrap_or(0)
    }

    pub fn reset_counts(&self) {
        self.control("POST", "/counts/reset", "");
    }

    /// (source, client id) of every token issued.
    pub fn tokens(&self) -> Vec<serde_json::Value> {
        self.control("GET", "/tokens", "").as_array().cloned().unwrap_or_default()
    }

    pub fn fault(&self, f: &Fault) {
        self.control("POST", "/faults", &serde_json::to_string(f).unwrap());
    }

    /// The current version's metadata (id, attributes, contentType, tags; never the value).
    pub fn secret_metadata(&self, name: &str) -> serde_json::Value {
        self.control("GET", &format!("/secrets/{name}"), "")
    }

    /// Soft-deletes a secret: its name then answers 409 to a PUT.
    pub fn soft_delete(&self, name: &str) {
        self.control("DELETE", &format!("/secrets/{name}"), "");
    }

    pub fn clear_faults(&self) {
        self.control("DELETE", "/faults", "");
    }

    /// Adds a new current version; returns its id.
    pub fn set_secret(&self, name: &str, value: &str, attrs: serde_json::Value) -> String {
        let mut body = serde_json::json!({"name": name, "value": value});
        if let (Some(b), Some(a)) = (body.as_object_mut(), attrs.as_object()) {
            b.extend(a.clone());
        }
        self.control("POST", "/secrets", &body.to_string())["version"].as_str().unwrap().to_owned()
    }

    /// Sets attributes (`enabled`, `nbf`, `exp`) of the current version.
    pub fn update_secret(&self, name: &str, attrs: serde_json::Value) {
        self.control("PATCH", &format!("/secrets/{name}"), &attrs.to_string());
    }
}

/// `http://127.0.0.1:PORT/...` → the address; panics on anything but loopback.
fn loopback_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.strip_prefix("http://").expect("control url is http");
    let hostport = rest.split('/').next().unwrap();
    let addr: std::net::SocketAddr =
        hostport.parse().unwrap_or_else(|_| panic!("control url {url} is not IP:PORT"));
    assert!(addr.ip().is_loopback(), "refusing to talk to non-loopback {addr}");
    addr
}
