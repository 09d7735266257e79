//! Background tasks that must not die quietly: the cache's refresher, the SIGHUP reloader.
//!
//! [`supervise`] runs a task and, if it ever panics or returns, logs it, records the death
//! (so `/v1/health` reports degraded for [`DEGRADED_FOR`]) and starts it again after a
//! back-off (1 s doubling to 1 min), so a task that keeps dying costs no CPU. Aborting the
//! handle [`supervise`] returns stops the task too.
//!
//! Never formats anything but the task's name and its panic message (which, like every
//! message in the agent, carries names only, never a value).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// How long health stays degraded after a background task died.
pub(crate) const DEGRADED_FOR: Duration = Duration::from_secs(60);

/// Deaths of supervised tasks, for `/v1/health`.
#[derive(Default)]
pub(crate) struct Tasks {
    deaths: Mutex<Vec<Death>>,
}

struct Death {
    task: &'static str,
    why: String,
    at: Instant,
    restarts: u32,
}

impl Tasks {
    /// One line per task that died within [`DEGRADED_FOR`].
    pub(crate) fn health_reasons(&self) -> Vec<String> {
        let deaths = self.deaths.lock().unwrap_or_else(PoisonError::into_inner);
        deaths
            .iter()
            .filter(|d| d.at.elapsed() < degraded_for())
            .map(|d| {
                format!(
                    "background task {} {} {}s ago; restarted ({} time(s) since start)",
                    d.task,
                    d.why,
                    d.at.elapsed().as_secs(),
                    d.restarts
                )
            })
            .collect()
    }

    fn died(&self, task: &'static str, why: String) {
        let mut deaths = self.deaths.lock().unwrap_or_else(PoisonError::into_inner);
        match deaths.iter_mut().find(|d| d.task == task) {
            Some(d) => {
                d.why = why;
                d.at = Instant::now();
                d.restarts = d.restarts.saturating_add(1);
            }
            None => deaths.push(Death { task, why, at: Instant::now(), restarts: 1 }),
        }
    }
}

/// Runs `make()` as a task, restarting it whenever it panics or returns.
pub(crate) fn supervise<F, Fut>(tasks: Arc<Tasks>, task: &'static str, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        let mut inject = injected_panic(task);
        loop {
            let mut running = if std::mem::take(&mut inject) {
                AbortOnDrop(tokio::spawn(
                    async move { panic!("injected by KVBROKER_TEST_PANIC_TASK={task}") },
                ))
            } else {
                AbortOnDrop(tokio::spawn(make()))
            };
            let why = match running.await_inner().await {
                Ok(()) => "exited".to_owned(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                Err(_) => "was cancelled".to_owned(),
            };
            tracing::error!(task, why = why.as_str(), restart_in = ?backoff, "background task died; restarting it");
            tasks.died(task, why);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    })
}

/// Fault injection for the e2e tests, in debug builds only (a release build never reads
/// these variables): `KVBROKER_TEST_PANIC_TASK=NAME` makes the first run of task NAME panic,
/// so the whole path — death, log, health, restart — runs in a real agent.
#[cfg(debug_assertions)]
fn injected_panic(task: &str) -> bool {
    std::env::var("KVBROKER_TEST_PANIC_TASK").is_ok_and(|t| t == task)
}

#[cfg(not(debug_assertions))]
fn injected_panic(_task: &str) -> bool {
    false
}

/// [`DEGRADED_FOR`]; debug builds take `KVBROKER_TEST_DEGRADED_FOR_MS` (e2e tests, which
/// cannot wait a minute to see health recover).
#[cfg(debug_assertions)]
fn degraded_for() -> Duration {
    std::env::var("KVBROKER_TEST_DEGRADED_FOR_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEGRADED_FOR, Duration::from_millis)
}

#[cfg(not(debug_assertions))]
fn degraded_for() -> Duration {
    DEGRADED_FOR
}

/// The inner task is aborted when the supervisor is (its handle's future is dropped).
struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    async fn await_inner(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Issue 13: a refresher that panicked was gone for good (values then outlived
    /// `evict_idle`). A supervised task is restarted, and health says what happened.
    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_reported() {
        let tasks = Arc::new(Tasks::default());
        let runs = Arc::new(AtomicU32::new(0));
        let alive = Arc::new(());
        let (r, a) = (Arc::clone(&runs), Arc::clone(&alive));
        let h = supervise(Arc::clone(&tasks), "refresher", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let _alive = Arc::clone(&a);
            async move {
                let _alive = _alive;
                if n == 0 {
                    panic!("boom at first run");
                }
                std::future::pending::<()>().await;
            }
        });
        // The first restart comes after a 1 s back-off (waited for, not timed: CI is busy).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while runs.load(Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once");
        let reasons = tasks.health_reasons();
        assert_eq!(reasons.len(), 1);
        assert!(
            reasons[0].starts_with("background task refresher panicked: boom at first run"),
            "{reasons:?}"
        );
        assert_eq!(Arc::strong_count(&alive), 3, "the test, the closure and the running task");
        h.abort();
        let _ = h.await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(Arc::strong_count(&alive), 1, "aborting the supervisor stopped the task");
    }
}
