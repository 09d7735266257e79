//! systemd's notify protocol (`Type=notify`, sd_notify(3)): datagrams to `$NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace).
//!
//! - `READY=1` only once the agent socket has answered a `GET /v1/health` sent through the
//!   socket itself: systemd (and units ordered after kvbroker) start callers when the socket
//!   serves, not merely when it is bound.
//! - `WATCHDOG=1` every `WatchdogSec`/2 (`$WATCHDOG_USEC`), each one earned by the same round
//!   trip through the agent's own socket (the runtime, the accept loop and the handler all
//!   work) and a live audit writer thread. A wedged runtime sends nothing, and systemd kills
//!   and restarts the agent. A *degraded* agent still pings: restarting on a Key Vault outage
//!   would throw away the cache that serves stale values through it.
//! - `STATUS=` when what the agent is doing changes (serving, degraded and why, not serving
//!   and why, stopping), and `STOPPING=1` as soon as a stop begins.
//!
//! Sends states and health reasons (names and paths) only, never a value. Without
//! `$NOTIFY_SOCKET` nothing here runs and the agent never connects to itself.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::probe;
use crate::state::State;

/// A bad `$NOTIFY_SOCKET` or `$WATCHDOG_USEC`: logged, and that part is off.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum NotifyEnvError {
    #[error(
        "NOTIFY_SOCKET={0:?} is neither an absolute path nor @name: systemd notifications are off \
         (vsock is not supported)"
    )]
    Socket(String),
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds: the watchdog is off")]
    Usec(String),
}

/// Where notifications go, and the watchdog period systemd asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Setup {
    target: Target,
    /// `WatchdogSec`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
}

#[derive(Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Reads the protocol's variables (given, not read here, so tests need no environment).
/// `Ok(None)`: not started by systemd with `Type=notify`. The watchdog is on only when
/// `WATCHDOG_PID` is unset or names `me` (systemd's rule: a forked helper must not ping).
pub(crate) fn parse_env(
    notify_socket: Option<&OsStr>,
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    me: u32,
) -> Result<Option<Setup>, NotifyEnvError> {
    let Some(raw) = notify_socket.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let bytes = raw.as_encoded_bytes();
    let target = if let Some(name) = bytes.strip_prefix(b"@") {
        Target::Abstract(name.to_vec())
    } else if bytes.starts_with(b"/") {
        Target::Path(PathBuf::from(raw))
    } else {
        return Err(NotifyEnvError::Socket(raw.to_string_lossy().into_owned()));
    };
    let for_me = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().is_ok_and(|p| p == me));
    let watchdog = match watchdog_usec.filter(|_| for_me) {
        None => None,
        Some(u) => match u.trim().parse::<u64>() {
            Ok(n) if n > 0 => Some(Duration::from_micros(n)),
            _ => return Err(NotifyEnvError::Usec(u.to_owned())),
        },
    };
    Ok(Some(Setup { target, watchdog }))
}

/// Sends notifications to systemd. Sending never blocks: a full receive queue drops the
/// message (and logs it) rather than stall the runtime.
pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    warned: std::sync::atomic::AtomicBool,
}

impl Notifier {
    /// From this process's environment; `None` when systemd is not listening (or the
    /// variables are unusable, which is logged).
    pub(crate) fn from_env() -> Option<Notifier> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let setup = match parse_env(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        ) {
            Ok(s) => s?,
            Err(e @ NotifyEnvError::Usec(_)) => {
                tracing::warn!(error = %e, "systemd watchdog");
                // Notifications still work without the watchdog.
                parse_env(std::env::var_os("NOTIFY_SOCKET").as_deref(), None, None, 0).ok()??
            }
            Err(e) => {
                tracing::warn!(error = %e, "systemd notify");
                return None;
            }
        };
        match Self::new(setup) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up systemd notifications");
                None
            }
        }
    }

    fn new(setup: Setup) -> std::io::Result<Notifier> {
        let addr = match &setup.target {
            Target::Path(p) => SocketAddr::from_pathname(p)?,
            Target::Abstract(name) => SocketAddr::from_abstract_name(name)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { sock, addr, watchdog: setup.watchdog, warned: Default::default() })
    }

    /// Sends one message (`KEY=VALUE` lines). A failure is logged as a warning once, then
    /// at debug level: a watchdog ping that cannot be sent would otherwise log every period.
    pub(crate) fn send(&self, message: &str) {
        if let Err(e) = self.sock.send_to_addr(message.as_bytes(), &self.addr) {
            if self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(error = %e, "cannot notify systemd");
            } else {
                tracing::warn!(error = %e, "cannot notify systemd (further failures are logged at debug level)");
            }
        }
    }

    /// How often the serving path is checked: half the watchdog period (systemd's advice),
    /// else [`STATUS_EVERY`] to keep `STATUS=` current.
    fn period(&self) -> Duration {
        self.watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(MIN_PERIOD))
    }
}

/// Without a watchdog, how often `STATUS=` is brought up to date.
const STATUS_EVERY: Duration = Duration::from_secs(30);
/// The shortest check period, whatever `WatchdogSec` says.
const MIN_PERIOD: Duration = Duration::from_millis(50);
/// Before `READY=1`: how long to wait between round trips that fail.
const READY_RETRY: Duration = Duration::from_millis(50);

/// Sends `READY=1` once `socket` answers health, then keeps `STATUS=` current and, with a
/// watchdog, pings it after each check that passes. Runs until aborted.
pub(crate) async fn serve(notifier: Arc<Notifier>, socket: PathBuf, state: Arc<State>, summary: String) {
    let period = notifier.period();
    let mut told = String::new();
    // Not ready until a health request has gone through the socket and back.
    loop {
        match check(&socket, &state, period).await {
            Ok(status) => {
                notifier.send(&format!("READY=1\nSTATUS={status}; {summary}"));
                tracing::info!(status = status.as_str(), "told systemd the agent is ready");
                told = status;
                break;
            }
            Err(why) => {
                let status = format!("starting: {why}");
                if status != told {
                    notifier.send(&format!("STATUS={status}"));
                    told = status;
                }
                tokio::time::sleep(READY_RETRY).await;
            }
        }
    }
    let mut tick = tokio::time::interval(period);
    // After a stop (SIGSTOP, a stalled host) check once, not once per missed period.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let status = match check(&socket, &state, period).await {
            Ok(status) => {
                if notifier.watchdog.is_some() {
                    notifier.send("WATCHDOG=1");
                }
                status
            }
            Err(why) => {
                if notifier.watchdog.is_some() {
                    tracing::error!(why = why.as_str(), "not serving: withholding the systemd watchdog ping");
                }
                format!("not serving: {why}")
            }
        };
        if status != told {
            notifier.send(&format!("STATUS={status}"));
            told = status;
        }
    }
}

/// One check of the serving path: `Ok` with a status line when the socket answered health
/// and the audit writer runs; `Err` with why not.
async fn check(socket: &Path, state: &State, timeout: Duration) -> Result<String, String> {
    if !state.auditor.writer_alive() {
        return Err("the audit writer thread has stopped".into());
    }
    let answer = probe::health(socket, false, timeout).await.map_err(|e| e.to_string())?;
    Ok(match answer.status {
        200 => "serving".to_owned(),
        _ => format!("serving, {}", answer.why_not_ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 4242;

    fn parse(
        sock: Option<&str>,
        usec: Option<&str>,
        pid: Option<&str>,
    ) -> Result<Option<Setup>, NotifyEnvError> {
        parse_env(sock.map(OsStr::new), usec, pid, ME)
    }

    #[test]
    fn no_socket_means_no_systemd() {
        assert_eq!(parse(None, Some("1000000"), None), Ok(None));
        assert_eq!(parse(Some(""), None, None), Ok(None));
    }

    #[test]
    fn takes_paths_and_abstract_names() {
        let s = parse(Some("/run/systemd/notify"), None, None).unwrap().unwrap();
        assert_eq!(s, Setup { target: Target::Path("/run/systemd/notify".into()), watchdog: None });
        let s = parse(Some("@/org/freedesktop/systemd1/notify/1"), None, None).unwrap().unwrap();
        assert_eq!(s.target, Target::Abstract(b"/org/freedesktop/systemd1/notify/1".to_vec()));
    }

    #[test]
    fn refuses_relative_paths_and_vsock() {
        for bad in ["notify.sock", "vsock:2:1234"] {
            assert_eq!(parse(Some(bad), None, None), Err(NotifyEnvError::Socket(bad.into())));
        }
    }

    #[test]
    fn watchdog_only_for_this_pid_and_a_positive_period() {
        let wd = |usec, pid| parse(Some("/n"), usec, pid).map(|s| s.unwrap().watchdog);
        assert_eq!(wd(Some("3000000"), None), Ok(Some(Duration::from_secs(3))));
        assert_eq!(wd(Some("3000000"), Some("4242")), Ok(Some(Duration::from_secs(3))));
        assert_eq!(wd(Some("3000000"), Some("1")), Ok(None), "another process's watchdog");
        assert_eq!(wd(None, Some("4242")), Ok(None));
        for bad in ["0", "-5", "3s", ""] {
            assert_eq!(wd(Some(bad), None), Err(NotifyEnvError::Usec(bad.into())));
        }
    }

    #[test]
    fn sends_to_an_abstract_socket_without_blocking() {
        let name = format!("kvbroker-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let setup = parse(Some(&format!("@{name}")), Some("2000000"), None).unwrap().unwrap();
        let n = Notifier::new(setup).unwrap();
        assert_eq!(n.period(), Duration::from_secs(1));
        n.send("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        // Nobody reads: the queue fills, and sending still returns at once.
        for _ in 0..10_000 {
            n.send("WATCHDOG=1");
        }
    }
}
