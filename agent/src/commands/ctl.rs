//! `kvbroker ctl status | refresh | reload`: talk to a running agent's admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use http::Method;
use kvbroker_proto::{ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET};

use crate::Error;
use crate::admin::client::{self, CtlError};
use crate::cli::CtlCommand;
use crate::config::Config;
use crate::terminal::{escape, table};

/// Where the admin socket is, as the user said it (first given wins, in this order).
pub(crate) struct Target {
    pub(crate) socket: Option<PathBuf>,
    pub(crate) config: Option<PathBuf>,
    /// A `kvbroker dev` directory.
    pub(crate) dir: Option<PathBuf>,
}

impl Target {
    /// `--socket`, else the `--config`'s `admin_socket`, else `--dir`'s `admin.sock` (a
    /// `kvbroker dev` directory), else `KVBROKER_ADMIN_SOCKET`, else the default path.
    fn resolve(self) -> Result<PathBuf, Error> {
        Ok(match self {
            Target { socket: Some(s), .. } => s,
            Target { config: Some(c), .. } => Config::load(&c)?.agent.admin_socket,
            Target { dir: Some(d), .. } => super::dev::config_path(&d)
                .map(|c| Config::load(&c).map(|c| c.agent.admin_socket))
                .unwrap_or_else(|| Ok(d.join("admin.sock")))?,
            _ => std::env::var_os(ADMIN_SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET), PathBuf::from),
        })
    }
}

pub(crate) fn ctl(target: Target, command: CtlCommand) -> Result<ExitCode, Error> {
    let socket = target.resolve()?;
    super::runtime()?.block_on(async {
        match command {
            CtlCommand::Status { json } => {
                let (status, v) = client::call(&socket, Method::GET, "/v1/status").await?;
                if status != 200 {
                    let message = escape(v["error"].as_str().unwrap_or("no reason given"));
                    return Err(CtlError::Refused { action: "status".into(), message }.into());
                }
                if json {
                    println!("{v}");
                } else {
                    print!("{}", render_status(&v));
                }
            }
            CtlCommand::Refresh { name, vault } => {
                let mut path = format!("/v1/refresh?name={name}");
                if let Some(v) = vault {
                    path.push_str(&format!("&vault={v}"));
                }
                let (status, v) = client::call(&socket, Method::POST, &path).await?;
                if status != 200 {
                    let message = v["error"].as_str().unwrap_or("no reason given").to_owned();
                    return Err(CtlError::Refused { action: format!("refresh {name}"), message }.into());
                }
                println!(
                    "refreshed {}/{}: version {}",
                    v["vault"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?")
                );
            }
            CtlCommand::Reload => {
                let (status, v) = client::call(&socket, Method::POST, "/v1/reload").await?;
                let message = v["message"].as_str().unwrap_or("?").to_owned();
                if status != 200 {
                    return Err(CtlError::Refused { action: "policy reload".into(), message }.into());
                }
                println!("policy reloaded: {message}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `kvbroker ctl status` as text: a summary line, then one aligned row per cached secret.
/// Every string from the agent is escaped (names and errors can come from Key Vault).
fn render_status(v: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| escape(v.as_str().unwrap_or("?"));
    let mut out = format!(
        "agent {} (pid {}, up {}s)  audit {} ({})  policy {} ({} rule(s))\n",
        text(&v["agent"]["version"]),
        v["agent"]["pid"],
        v["agent"]["uptime_secs"],
        text(&v["audit"]["path"]),
        if v["audit"]["healthy"].as_bool() == Some(true) { "ok" } else { "NOT WRITABLE" },
        text(&v["policy"]["file"]),
        v["policy"]["rules"],
    );
    let secrets = v["secrets"].as_array().map(Vec::as_slice).unwrap_or_default();
    if secrets.is_empty() {
        out.push_str("no secrets cached\n");
        return out;
    }
    let secs = |v: &serde_json::Value| v.as_u64().map_or_else(|| "-".to_owned(), |n| format!("{n}s"));
    let rows = secrets.iter().map(|s| {
        let state = match (s["stale"].as_bool(), s["last_error"].as_str()) {
            (Some(true), Some(e)) => format!("stale: {}", escape(e)),
            (_, Some(e)) => format!("error: {}", escape(e)),
            _ => "fresh".to_owned(),
        };
        let version = s["version"].as_str().map_or_else(|| "-".to_owned(), escape);
        [text(&s["vault"]), text(&s["name"]), version, secs(&s["age_secs"]), secs(&s["idle_secs"]), state]
    });
    out.push('\n');
    out.push_str(&table(
        ["VAULT", "NAME", "VERSION", "AGE", "IDLE", "STATE"],
        [false, false, false, true, true, false],
        rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_lines_up_and_escapes() {
        let v = serde_json::json!({
            "agent": {"version": "0.1.0", "pid": 7, "uptime_secs": 3},
            "audit": {"path": "/var/log/a.jsonl", "healthy": true},
            "policy": {"file": "/etc/p.toml", "rules": 2},
            "secrets": [
                {"vault": "default", "name": "db-password", "version": "ab", "age_secs": 5, "idle_secs": 125},
                {"vault": "a-much-longer-alias", "name": "x", "version": null, "age_secs": 12345,
                 "idle_secs": 1, "stale": true, "last_error": "vault said \u{1b}[2J"},
            ],
        });
        let out = render_status(&v);
        let rows: Vec<&str> = out.lines().skip(2).collect();
        assert_eq!(rows.len(), 3, "{out}");
        assert!(rows[0].starts_with("VAULT  ") && rows[1].starts_with("default  "), "{out}");
        let name_col = rows[0].find("NAME").unwrap();
        assert_eq!(rows[1].find("db-password"), Some(name_col), "{out}");
        assert_eq!(rows[2].find("x "), Some(name_col), "{out}");
        let idle_col = rows[0].find("IDLE").unwrap() + "IDLE".len();
        assert_eq!(&rows[1][..idle_col].trim_end()[idle_col - 4..], "125s", "IDLE is right-aligned: {out}");
        assert!(rows[2].ends_with("stale: vault said \\u{1b}[2J"), "{out}");
        assert!(!out.contains('\u{1b}'), "no raw escape reaches the terminal");
    }
}
