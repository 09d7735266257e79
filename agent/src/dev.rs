//! `kvbroker dev`: a working agent in one command, for someone trying kvbroker out.
//!
//! Writes (once) a local vault of demo secrets, a policy that lets only the invoking user
//! read them, and a config, all under one private directory; prints what to run next. The
//! banner names the secrets, never their values.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

const DEMO_SECRETS: [&str; 3] = ["demo-db-password", "demo-api-token", "demo-storage-key"];

/// Prepares `dir` and returns the path of its config file.
pub fn prepare(dir: &Path) -> Result<PathBuf, Error> {
    let io = |what: &str, p: &Path, e: std::io::Error| Error::Dev(format!("{}: {what}: {e}", p.display()));
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

/// What to print before the agent starts.
pub fn banner(config: &crate::config::Config) -> String {
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
        "Try it from another terminal:".into(),
        format!("  export KVBROKER_SOCKET={sock}"),
        format!("  {kvb} get demo-db-password"),
        format!("  curl -s --unix-socket {sock} http://localhost/v1/secrets/demo-db-password"),
        format!("  {kvbroker} audit verify {audit}"),
        String::new(),
        "Stop it with Ctrl-C.".into(),
    ]
    .join("\n")
}
