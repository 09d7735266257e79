//! The agent configuration the emulator writes beside `emulator.json`, so that
//! `kvbroker run --config DIR/agent.toml` reads from this emulator as it stands: the vault's
//! URL, CA and `connect_to`, IMDS reached through `connect_to`, a socket and audit log in DIR,
//! and a policy letting the user who started the emulator read every secret.
//!
//! Rewritten on every start, because the ports change. Holds no secret value: the secrets stay
//! in the emulator, and the agent fetches them with a token like any Key Vault client.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::EmulatorInfo;

/// The agent's config file name in DIR.
pub const CONFIG: &str = "agent.toml";
/// The policy file that config names.
pub const POLICY: &str = "policy.toml";

/// Writes `DIR/agent.toml` and `DIR/policy.toml` (mode 0644: the agent refuses a policy
/// others can write; neither holds a secret). `dir` must be absolute. Returns the config path.
pub fn write(dir: &Path, info: &EmulatorInfo) -> Result<PathBuf, String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    // Whoever owns the files we write is who started us: the uid the policy lets in.
    let uid = std::fs::metadata(&info.ca_file).map_err(|e| io(&info.ca_file, e))?.uid();
    let policy = dir.join(POLICY);
    let policy_text = format!(
        "# Written by kvbroker-emulator (rewritten at each start): uid {uid}, who started the\n\
         # emulator, may read every secret of its vault. Only for trying kvbroker out.\n\
         [[rule]]\nname = \"emulator-user\"\nuids = [{uid}]\nsecrets = [\"default/*\"]\n"
    );
    write_file(&policy, &policy_text).map_err(|e| io(&policy, e))?;

    let imds = info.identity.get("imds").map(|i| i.connect_to.clone()).unwrap_or_default();
    let path = |p: &Path| quote(&p.display().to_string());
    let list = |v: &[String]| format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "));
    let config = dir.join(CONFIG);
    let text = format!(
        "# Written by kvbroker-emulator (rewritten at each start, as the ports change).\n\
         # Run: kvbroker run --config {config_path}\n\
         [agent]\n\
         socket = {socket}\n\
         socket_mode = \"0600\"\n\
         admin_socket = {admin}\n\
         # The emulator is on 127.0.0.1: refuse any other address.\n\
         loopback_only = true\n\n\
         # The managed identity: IMDS, whose address 169.254.169.254 is sent to the emulator.\n\
         [identity]\n\
         source = \"imds\"\n\
         connect_to = {imds}\n\n\
         [[vault]]\n\
         alias = \"default\"\n\
         url = {url}\n\
         ca_file = {ca}\n\
         connect_to = {vault_connect}\n\n\
         [audit]\n\
         path = {audit}\n\n\
         [policy]\n\
         file = {policy}\n",
        config_path = config.display(),
        socket = path(&dir.join("agent.sock")),
        admin = path(&dir.join("admin.sock")),
        imds = list(&imds),
        url = quote(&info.vault_url),
        ca = path(&info.ca_file),
        vault_connect = list(&info.connect_to),
        audit = path(&dir.join("audit.jsonl")),
        policy = path(&policy),
    );
    write_file(&config, &text).map_err(|e| io(&config, e))?;
    Ok(config)
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quotes_paths_as_toml_reads_them() {
        for s in ["/tmp/plain", "/tmp/with \"quotes\" and \\", "/tmp/tab\there\u{1b}"] {
            let doc = format!("k = {}", quote(s));
            let t: toml::Table = toml::from_str(&doc).unwrap();
            assert_eq!(t["k"].as_str(), Some(s), "{doc}");
        }
    }
}
