//! `kvbroker ctl status | refresh | reload`: talk to a running agent's admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use http::Method;
use kvbroker_proto::{ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET};

use crate::Error;
use crate::admin::client::{self, CtlError};
use crate::cli::CtlCommand;
use crate::config::Config;

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
                let (_, v) = client::call(&socket, Method::GET, "/v1/status").await?;
                if json {
                    println!("{v}");
                } else {
                    print!("{}", client::render_status(&v));
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
