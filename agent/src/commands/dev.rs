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
    #[error("{dir}: not a `kvbroker dev` directory (no config.toml): run kvbroker dev --dir {dir} first")]
    NotADevDir { dir: PathBuf },
    #[error("{config}: no local vault aliased \"default\" to rotate in")]
    NoLocalVault { config: PathBuf },
    #[error("{name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("--generate {bytes}: choose 16 to 4096 bytes")]
    GenerateSize { bytes: usize },
    #[error("the new value must be 1 byte to 25 KB (Key Vault's limit)")]
    ValueSize,
    #[error("{path}: {reason}; edit the file by hand")]
    CannotEdit { path: PathBuf, reason: String },
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

/// `kvbroker dev rotate NAME [--value V | --generate N]`: a new version of NAME in the dev
/// vault's file (written beside it and renamed over, mode 0600), then a refresh asked of the
/// running dev agent so its long polls see it at once. Prints the version id, never the value.
pub(crate) fn rotate(
    dir: &Path,
    name: &str,
    value: Option<String>,
    generate: Option<usize>,
) -> Result<(), Error> {
    let config_file = config_path(dir).ok_or_else(|| DevError::NotADevDir { dir: dir.to_owned() })?;
    let config = Config::load(&config_file)?;
    let file = config
        .vaults
        .iter()
        .find_map(|v| match &v.backend {
            crate::config::BackendConfig::Local { file, .. } if v.alias.as_str() == "default" => {
                Some(file.clone())
            }
            _ => None,
        })
        .ok_or_else(|| DevError::NoLocalVault { config: config_file.clone() })?;
    let name: kvbroker_proto::SecretName =
        name.parse().map_err(|e| DevError::BadName { name: name.to_owned(), reason: format!("{e}") })?;
    let value = match (value, generate) {
        (Some(v), _) => zeroize::Zeroizing::new(v),
        (None, n) => {
            let n = n.unwrap_or(32);
            if !(16..=4096).contains(&n) {
                return Err(DevError::GenerateSize { bytes: n }.into());
            }
            super::rotate::generate(n).map_err(|e| io_err("cannot read", Path::new("/dev/urandom"), e))?
        }
    };
    if value.is_empty() || value.len() > 25 * 1024 {
        return Err(DevError::ValueSize.into());
    }
    let version = kvbroker_proto::VersionId::from_bytes(fastrand::u128(..).to_le_bytes());
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(&file).map_err(|e| io_err("cannot read", &file, e))?);
    let new_text = rotated_text(&text, &name, &value, &version)
        .map_err(|reason| DevError::CannotEdit { path: file.clone(), reason })?;
    drop(text);
    replace_private(&file, new_text.as_bytes()).map_err(|e| io_err("cannot write", &file, e))?;
    drop(new_text);
    println!("rotated default/{name}: version {version}");
    // The agent reads the file again at its next fetch; a refresh makes that now.
    let socket = config.agent.admin_socket.clone();
    let asked = super::runtime()?.block_on(crate::admin::client::call(
        &socket,
        http::Method::POST,
        &format!("/v1/refresh?name={name}"),
    ));
    match asked {
        Ok((200, _)) => println!("the dev agent serves it now; watchers and long polls see it at once"),
        Ok((_, v)) => println!(
            "the dev agent will serve it at its next refresh (it refused an immediate one: {})",
            crate::terminal::escape(v["error"].as_str().unwrap_or("no reason given"))
        ),
        Err(_) => println!("the dev agent is not running; it serves the new version when started"),
    }
    Ok(())
}

/// The vault file's text with NAME's entry replaced by (or, if absent, added as) one line
/// holding the new value and version; the entry's other attributes are kept. `Err`: why the
/// file cannot be edited this way. Never puts a value in the error.
fn rotated_text(
    text: &str,
    name: &kvbroker_proto::SecretName,
    value: &str,
    version: &kvbroker_proto::VersionId,
) -> Result<zeroize::Zeroizing<String>, String> {
    let table: toml::Table =
        toml::from_str(text).map_err(|_| "not a valid TOML file of name = \"value\" lines".to_owned())?;
    let existing = table.iter().find(|(k, _)| k.to_ascii_lowercase() == name.key());
    let existed = existing.is_some();
    let mut attrs = String::new();
    let key = match existing {
        Some((k, toml::Value::Table(t))) => {
            for (a, v) in t {
                match (a.as_str(), v) {
                    ("value" | "version", _) => {}
                    (a, toml::Value::Boolean(b)) => attrs.push_str(&format!(", {a} = {b}")),
                    (a, toml::Value::String(s)) => {
                        attrs.push_str(&format!(", {a} = {}", toml_string(s).as_str()))
                    }
                    (a, _) => {
                        return Err(format!("secret {k}: attribute {a} is neither text nor true/false"));
                    }
                }
            }
            k.clone()
        }
        Some((k, _)) => k.clone(),
        None => name.to_string(),
    };
    // `table` holds every value of the file: wiped before it is dropped.
    wipe_table(table);
    let quoted = toml_string(value);
    let line_len = key.len() + quoted.len() + version.to_string().len() + attrs.len() + 32;
    let mut out = zeroize::Zeroizing::new(String::with_capacity(text.len() + line_len + 1));
    let mut replaced = false;
    for line in text.lines() {
        let starts = line
            .trim_start()
            .strip_prefix(key.as_str())
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if starts && !replaced {
            replaced = true;
            out.push_str(&format!(
                "{key} = {{ value = {}, version = \"{version}\"{attrs} }}\n",
                quoted.as_str()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if existed && !replaced {
        return Err(format!("secret {key} is not written on one `{key} = …` line"));
    }
    if !replaced {
        out.push_str(&format!("{key} = {{ value = {}, version = \"{version}\"{attrs} }}\n", quoted.as_str()));
    }
    // What was written must read back as a vault file (a line that looked like the entry but
    // was inside a multi-line string would not).
    match toml::from_str::<toml::Table>(&out) {
        Ok(t) => wipe_table(t),
        Err(_) => return Err("the edited file would not parse".into()),
    }
    Ok(out)
}

/// `s` as a TOML basic string, quotes included, in wiped memory.
fn toml_string(s: &str) -> zeroize::Zeroizing<String> {
    let mut out = zeroize::Zeroizing::new(String::with_capacity(s.len() * 6 + 2));
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Wipes every string of a parsed vault file.
fn wipe_table(t: toml::Table) {
    use zeroize::Zeroize;
    fn wipe(v: toml::Value) {
        match v {
            toml::Value::String(mut s) => s.zeroize(),
            toml::Value::Table(t) => t.into_iter().for_each(|(_, v)| wipe(v)),
            toml::Value::Array(a) => a.into_iter().for_each(wipe),
            _ => {}
        }
    }
    t.into_iter().for_each(|(_, v)| wipe(v));
}

/// Writes `bytes` to a new 0600 file beside `path` (O_EXCL, unpredictable name), syncs it and
/// renames it over `path`: the agent never reads a half-written vault file.
fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".secrets.toml.{:032x}", fastrand::u128(..)));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let done = f.write_all(bytes).and_then(|()| f.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
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
        format!("  {kvbroker} dev --dir {dir} rotate db-password   # a new version: kvb watch prints it"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `kvbroker dev rotate` edits one line: the value and version change, the other
    /// attributes and secrets stay, and awkward characters round-trip.
    #[test]
    fn rotated_text_replaces_one_entry_and_keeps_its_attributes() {
        let text = "# demo\nDb-Password = { value = \"old\", content_type = \"text/plain\", enabled = true }\nother = \"x\"\n";
        let name: kvbroker_proto::SecretName = "db-password".parse().unwrap();
        let version = kvbroker_proto::VersionId::from_bytes([7; 16]);
        let value = "new \"quoted\" \\ and\nline";
        let out = rotated_text(text, &name, value, &version).unwrap();
        let t: toml::Table = toml::from_str(&out).unwrap();
        let e = t["Db-Password"].as_table().unwrap();
        assert_eq!(e["value"].as_str(), Some(value));
        assert_eq!(e["version"].as_str(), Some(version.to_string().as_str()));
        assert_eq!(e["content_type"].as_str(), Some("text/plain"));
        assert_eq!(e["enabled"].as_bool(), Some(true));
        assert_eq!(t["other"].as_str(), Some("x"));
        assert!(out.starts_with("# demo\n"), "{}", out.as_str());

        let added = rotated_text(text, &"new-one".parse().unwrap(), "v", &version).unwrap();
        let t: toml::Table = toml::from_str(&added).unwrap();
        assert_eq!(t["new-one"]["value"].as_str(), Some("v"));
        assert_eq!(t["Db-Password"]["value"].as_str(), Some("old"));

        let multi = "[db-password]\nvalue = \"old\"\n";
        assert!(rotated_text(multi, &name, "v", &version).is_err(), "a multi-line entry is refused");
    }
}
