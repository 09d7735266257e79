//! One module per `kvbroker` subcommand; [`execute`] dispatches a parsed command line to it.
//! Commands print their results; only `main` chooses the exit code for an error.

pub(crate) mod audit;
pub(crate) mod check_config;
pub(crate) mod ctl;
pub(crate) mod dev;
pub(crate) mod doctor;
pub(crate) mod explain;
pub(crate) mod health;
pub(crate) mod launch;
pub(crate) mod rotate;
pub(crate) mod run;

use std::process::ExitCode;

use crate::Error;
use crate::cli::{Cli, Command, PolicyCommand};

/// Runs a parsed command line; returns the exit code for success and explained failures.
pub fn execute(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run { config } => run::run(&config)?,
        Command::Dev { dir, command: None } => dev::dev(&dir)?,
        Command::Dev { dir, command: Some(crate::cli::DevCommand::Rotate { name, value, generate }) } => {
            dev::rotate(&dir, &name, value, generate)?;
        }
        Command::CheckConfig { config } => check_config::check_config(&config)?,
        Command::Ctl { config, socket, dir, command } => {
            return ctl::ctl(ctl::Target { socket, config, dir }, command);
        }
        Command::Rotate(args) => rotate::command(args)?,
        Command::Doctor(args) => return doctor::command(&args),
        Command::Health(args) => return health::command(&args),
        Command::Launch(args) => return launch::command(args),
        Command::Policy { command: PolicyCommand::Explain(args) } => explain::command(args)?,
        Command::Audit { command } => audit::command(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded runtime the agent and the commands that talk to it run on, shaped by
/// the tuning variables of [`RuntimeShape`] (none set: tokio's defaults, a worker per core).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    crate::sys::limit_malloc_arenas();
    let shape = RuntimeShape::from_lookup(|k| std::env::var(k).ok()).map_err(Error::Runtime)?;
    shape.builder().enable_all().build().map_err(Error::Runtime)
}

/// The runtime's shape, read once at start from the environment: tuning knobs for comparing
/// shapes under load (docs/architecture.md, "Runtime"), not configuration.
///
/// - `KVBROKER_WORKER_THREADS=N`: N worker threads (default: one per core).
/// - `KVBROKER_EVENT_INTERVAL=N`: tasks a worker runs between polls of the I/O driver.
/// - `KVBROKER_GLOBAL_QUEUE_INTERVAL=N`: tasks between looks at the shared queue.
///
/// (Turning the LIFO slot off needs a `tokio_unstable` build, so it is not a knob here.)
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RuntimeShape {
    workers: Option<usize>,
    event_interval: Option<u32>,
    global_queue_interval: Option<u32>,
}

impl RuntimeShape {
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> std::io::Result<Self> {
        fn num<T: std::str::FromStr + PartialOrd + From<u8>>(
            get: &impl Fn(&str) -> Option<String>,
            key: &str,
        ) -> std::io::Result<Option<T>> {
            match get(key).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<T>() {
                    Ok(n) if n >= T::from(1) => Ok(Some(n)),
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{key}={v:?} is not a whole number of at least 1: fix or unset it"),
                    )),
                },
            }
        }
        Ok(Self {
            workers: num(&get, "KVBROKER_WORKER_THREADS")?,
            event_interval: num(&get, "KVBROKER_EVENT_INTERVAL")?,
            global_queue_interval: num(&get, "KVBROKER_GLOBAL_QUEUE_INTERVAL")?,
        })
    }

    fn builder(&self) -> tokio::runtime::Builder {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.workers {
            b.worker_threads(n);
        }
        if let Some(n) = self.event_interval {
            b.event_interval(n);
        }
        if let Some(n) = self.global_queue_interval {
            b.global_queue_interval(n);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::RuntimeShape;

    fn shape(vars: &[(&str, &str)]) -> std::io::Result<RuntimeShape> {
        RuntimeShape::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned()))
    }

    #[test]
    fn runtime_shape_is_read_from_its_variables() {
        assert_eq!(shape(&[]).unwrap(), RuntimeShape::default());
        let s = shape(&[
            ("KVBROKER_WORKER_THREADS", "1"),
            ("KVBROKER_EVENT_INTERVAL", " 7 "),
            ("KVBROKER_GLOBAL_QUEUE_INTERVAL", "31"),
        ])
        .unwrap();
        assert_eq!(
            s,
            RuntimeShape { workers: Some(1), event_interval: Some(7), global_queue_interval: Some(31) }
        );
    }

    #[test]
    fn a_bad_runtime_variable_is_named() {
        let e = shape(&[("KVBROKER_WORKER_THREADS", "0")]).unwrap_err().to_string();
        assert!(e.contains("KVBROKER_WORKER_THREADS=\"0\"") && e.contains("unset"), "{e}");
        let e = shape(&[("KVBROKER_EVENT_INTERVAL", "often")]).unwrap_err().to_string();
        assert!(e.starts_with("KVBROKER_EVENT_INTERVAL=\"often\""), "{e}");
    }
}
