//! `kvbroker health [--socket S] [--ready] [--timeout D]`: one `GET /v1/health` (with
//! `--ready`, `/v1/health?ready`) for probes and scripts. Exit 0 when the agent answers 200,
//! 1 otherwise (degraded, not ready, no answer), with the reason on stderr.
//!
//! Kubernetes liveness and readiness probes run it (`deploy/k8s/base/daemonset.yaml`); it
//! needs only the socket, no config, and prints nothing secret (health never holds a value).

use std::process::ExitCode;

use crate::Error;
use crate::cli::HealthArgs;
use crate::probe;
use crate::terminal::escape;

pub(crate) fn command(args: &HealthArgs) -> Result<ExitCode, Error> {
    let socket = args.socket.clone().unwrap_or_else(|| {
        std::env::var_os(kvbroker_proto::SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| kvbroker_proto::DEFAULT_SOCKET.into(), Into::into)
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    let what = if args.ready { "ready" } else { "healthy" };
    Ok(match rt.block_on(probe::health(&socket, args.ready, args.timeout)) {
        Ok(a) if a.status == 200 => {
            println!("{}: {what}", socket.display());
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("kvbroker health: {}: not {what}: {}", socket.display(), escape(&a.why_not_ok()));
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("kvbroker health: {e}");
            ExitCode::from(1)
        }
    })
}
