//! `kvbroker dev`: a working agent in one command, for someone trying kvbroker out.
//!
//! Writes (once) a local vault of demo secrets, a policy that lets only the invoking user
//! read them, and a config, all under one private directory; prints what to run next. The
//! banner names the secrets, never their values.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;
use crate::app::{self, RunInfo};
use crate::config::Config;

/// The demo vault's secrets: the names README.md and docs use, so their examples work
/// pasted as they are against `kvbroker dev`.
const DEMO_SECRETS: [&str; 3] = ["db-password", "api-token", "storage-key"];

/// Why `kvbroker dev` could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error(
        "{dir}: another `kvbroker dev` is already running there; use it, stop it, or give \
         another --dir"
    )]
    Busy { dir: PathBuf },
}

/// `kvbroker dev [--dir DIR]`: prepare DIR, print the banner, run until Ctrl-C.
pub(crate) fn dev(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", dir, e))?;
    // Held until the agent stops: a second `kvbroker dev` on this directory fails here,
    // before it touches the files or prints a banner that would point at another agent.
    let lock_path = dir.join("dev.lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io_err("cannot create", &lock_path, e))?;
    if lock.try_lock().is_err() {
        return Err(DevError::Busy { dir: dir.to_owned() }.into());
    }
    let path = prepare(dir)?;
    let config = Config::load(&path)?;
    println!("{}", banner(&config));
    let ran = super::runtime()?.block_on(app::run(config, RunInfo::default()));
    drop(lock);
    ran
}

/// The config file of a `kvbroker dev` directory, if it has one.
pub(crate) fn config_path(dir: &Path) -> Option<PathBuf> {
    Some(dir.join("config.toml")).filter(|p| p.is_file())
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> DevError {
    DevError::Io { path: path.to_owned(), what, source }
}

/// Prepares `dir` and returns the path of its config file.
pub(crate) fn prepare(dir: &Path) -> Result<PathBuf, DevError> {
    let io = |what: &'static str, p: &Path, e: std::io::Error| io_err(what, p, e);
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create directory", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("cannot set mode 0700", dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io("cannot resolve", dir, e))?;
    // We just created (or own) the directory: its owner is who we are.
    let uid = std::fs::metadata(&dir).map_err(|e| io("cannot inspect", &dir, e))?.uid();

    let secrets = dir.join("secrets.toml");
    if !secrets.exists() {
        let mut text = zeroize::Zeroizing::new(String::from(
            "# Demo secrets for `kvbroker dev`. Values are random; not for production.\n",
        ));
        for name in DEMO_SECRETS {
            text.push_str(&format!("{name} = \"demo-{:032x}\"\n", fastrand::u128(..)));
        }
        write_private(&secrets, text.as_bytes()).map_err(|e| io("cannot write", &secrets, e))?;
    }
    let policy = dir.join("policy.toml");
    let policy_text = format!(
        "# Written by `kvbroker dev`: only uid {uid} may read the demo vault.\n\
         [[rule]]\nname = \"dev-user\"\nuids = [{uid}]\nsecrets = [\"default/*\"]\n"
    );
    write_private(&policy, policy_text.as_bytes()).map_err(|e| io("cannot write", &policy, e))?;
    let config = dir.join("config.toml");
    let config_text = "# Written by `kvbroker dev`: for trying kvbroker out, not for production.\n\
         [agent]\nsocket = \"agent.sock\"\nsocket_mode = \"0600\"\nadmin_socket = \"admin.sock\"\nloopback_only = true\n\n\
         [[vault]]\nalias = \"default\"\nkind = \"local\"\nfile = \"secrets.toml\"\n\n\
         [audit]\npath = \"audit.jsonl\"\n\n[policy]\nfile = \"policy.toml\"\n";
    write_private(&config, config_text.as_bytes()).map_err(|e| io("cannot write", &config, e))?;
    Ok(config)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// What to print before the agent starts: every next step, with paths filled in, ready to
/// paste. Names the secrets, never their values.
fn banner(config: &Config) -> String {
    let sock = config.agent.socket.display();
    let dir = config.path.parent().unwrap_or(Path::new(".")).display();
    let here = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_owned));
    let tool = |bin: &str, pkg: &str| match here.as_ref().map(|d| d.join(bin)).filter(|p| p.exists()) {
        Some(p) => p.display().to_string(),
        None => format!("cargo run -q -p {pkg} --bin {bin} --"),
    };
    let kvb = tool("kvb", "kvbroker-client");
    let kvbroker = tool("kvbroker", "kvbroker-agent");
    let names = DEMO_SECRETS.join(", ");
    let audit = config.audit.path.display();
    let config_file = config.path.display();
    let python = format!(
        "python3 -c 'import http.client as h, json, socket; c = h.HTTPConnection(\"localhost\"); \
         c.sock = socket.socket(socket.AF_UNIX); c.sock.connect(\"{sock}\"); \
         c.request(\"GET\", \"/v1/secrets/db-password\"); s = json.loads(c.getresponse().read()); \
         print(s[\"name\"], s[\"version\"], len(s[\"value\"]), \"chars\")'"
    );
    [
        String::new(),
        "kvbroker dev: a local agent for TRYING kvbroker OUT. Not for production: its secrets are".into(),
        "demo values in a plain file, and its policy lets only you read them.".into(),
        String::new(),
        format!("  socket     {sock}"),
        format!("  vault      default (local file {dir}/secrets.toml): {names}"),
        format!("  policy     {dir}/policy.toml"),
        format!("  audit log  {audit}"),
        String::new(),
        "Try it from another terminal (as the same user):".into(),
        format!("  export KVBROKER_SOCKET={sock}"),
        format!("  {kvb} get db-password"),
        format!("  {kvb} watch db-password                # prints each new version id; Ctrl-C to stop"),
        format!("  curl -s --unix-socket {sock} http://localhost/v1/secrets/db-password"),
        format!("  {python}"),
        format!("  {kvbroker} ctl --dir {dir} status"),
        format!("  {kvbroker} policy explain --config {config_file} --pid $$ db-password"),
        format!("  {kvbroker} audit verify {audit}"),
        format!("  {kvbroker} audit query {audit}"),
        format!("  {kvbroker} audit tail {audit}             # follows the log; Ctrl-C to stop"),
        String::new(),
        "Stop it with Ctrl-C.".into(),
    ]
    .join("\n")
}
