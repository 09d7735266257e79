//! Signals: SIGTERM and SIGINT stop the agent (after draining); SIGHUP reloads the policy.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves with the signal's name when SIGTERM or SIGINT arrives.
pub(crate) async fn terminate() -> &'static str {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            tracing::error!("cannot install signal handlers: the agent will only stop when killed");
            std::future::pending().await
        }
    }
}

/// A stream of SIGHUPs, if the handler could be installed.
pub(crate) fn hangups() -> Option<tokio::signal::unix::Signal> {
    signal(SignalKind::hangup()).ok()
}
