use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

use kvbroker_proto::{SecretName, SecretValue};

use super::*;
use crate::config::AuditConfig;
use crate::vault::{Backend, BoxFuture, Budget};

/// A vault whose answer the test sets, counting calls.
struct Scripted {
    calls: AtomicU32,
    /// The budget of each call, in order.
    budgets: Mutex<Vec<Budget>>,
    answer: Mutex<Result<(VersionId, &'static str), VaultError>>,
}

impl Backend for Scripted {
    fn get<'a>(
        &'a self,
        name: &'a SecretName,
        _v: Option<&'a VersionId>,
        budget: Budget,
    ) -> BoxFuture<'a, Result<Fetched, VaultError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.budgets.lock().unwrap().push(budget);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let answer = self.answer.lock().unwrap().clone();
            answer.map(|(version, value)| Fetched {
                name: name.clone(),
                version,
                value: Arc::new(SecretValue::from_slice(value.as_bytes())),
                content_type: None,
                enabled: true,
                not_before: None,
                expires_on: None,
                fetched_at: SystemTime::now(),
                upstream_request_id: None,
                answer: crate::vault::Answer::default(),
            })
        })
    }
}

fn v(n: u8) -> VersionId {
    VersionId::from_bytes([n; 16])
}

struct Fixture {
    cache: Cache,
    backend: Arc<Scripted>,
    dir: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(refresh: Duration, max_stale: Duration) -> Fixture {
    let dir = std::env::temp_dir().join(format!("kvb-cache-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let (auditor, _) = Auditor::open(&AuditConfig::for_tests(dir.join("audit.jsonl"))).unwrap();
    let backend = Arc::new(Scripted {
        calls: AtomicU32::new(0),
        budgets: Mutex::new(Vec::new()),
        answer: Mutex::new(Ok((v(1), "one"))),
    });
    let vaults =
        Vaults::from_backends(vec![("default".parse().unwrap(), backend.clone() as Arc<dyn Backend>)]);
    let cfg = CacheConfig {
        refresh_interval: refresh,
        max_stale,
        evict_idle: Duration::from_secs(3600),
        version_grace: Duration::from_secs(3600),
    };
    Fixture { cache: Cache::new(cfg, Arc::new(vaults), Arc::new(auditor)), backend, dir }
}

fn alias() -> VaultAlias {
    "default".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_call() {
    let f = fixture(Duration::from_secs(300), Duration::from_secs(60));
    let name: SecretName = "Db".parse().unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (c, n) =
                (f.cache.clone(), if i % 2 == 0 { "db" } else { "DB" }.parse::<SecretName>().unwrap());
            tokio::spawn(async move { c.get(&alias(), &n, None).await.map(|l| l.fetched.version.clone()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), v(1));
    }
    assert_eq!(f.backend.calls.load(Ordering::SeqCst), 1);
    let hit = f.cache.get(&alias(), &name, None).await.unwrap();
    assert_eq!(hit.state, CacheState::Hit);
    assert_eq!(f.backend.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failed_refresh_serves_stale_until_max_stale_then_errors_then_recovers() {
    let f = fixture(Duration::from_secs(1), Duration::from_millis(300));
    let name: SecretName = "db".parse().unwrap();
    f.cache.get(&alias(), &name, None).await.unwrap();
    *f.backend.answer.lock().unwrap() = Err(VaultError::Unavailable {
        vault: alias(),
        reason: "down".into(),
        upstream_request_id: None,
        upstream: None,
    });
    f.cache.fetch(&alias(), &name, None, Budget::Background).await.unwrap_err();
    assert_eq!(f.cache.get(&alias(), &name, None).await.unwrap().state, CacheState::Stale);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = f.cache.get(&alias(), &name, None).await.err().unwrap().to_string();
    assert!(e.contains("past max_stale"), "{e}");
    *f.backend.answer.lock().unwrap() = Ok((v(1), "one"));
    f.cache.fetch(&alias(), &name, None, Budget::Background).await.unwrap();
    assert_eq!(f.cache.get(&alias(), &name, None).await.unwrap().state, CacheState::Hit);
}

#[tokio::test]
async fn not_found_on_refresh_stops_serving_at_once() {
    let f = fixture(Duration::from_secs(300), Duration::from_secs(3600));
    let name: SecretName = "db".parse().unwrap();
    f.cache.get(&alias(), &name, None).await.unwrap();
    *f.backend.answer.lock().unwrap() =
        Err(VaultError::NotFound { vault: alias(), name: "db".into(), upstream_request_id: None });
    f.cache.fetch(&alias(), &name, None, Budget::Background).await.unwrap_err();
    assert!(matches!(f.cache.get(&alias(), &name, None).await, Err(VaultError::NotFound { .. })));
}

#[tokio::test]
async fn rotation_keeps_old_version_by_id_and_wakes_long_polls() {
    let f = fixture(Duration::from_secs(300), Duration::from_secs(3600));
    let name: SecretName = "db".parse().unwrap();
    f.cache.get(&alias(), &name, None).await.unwrap();
    let waiter = {
        let c = f.cache.clone();
        let n = name.clone();
        tokio::spawn(async move { c.wait_change(&alias(), &n, &v(1), Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    *f.backend.answer.lock().unwrap() = Ok((v(2), "two"));
    f.cache.fetch(&alias(), &name, None, Budget::Background).await.unwrap();
    let woke = waiter.await.unwrap().unwrap().unwrap();
    assert_eq!(woke.fetched.version, v(2));
    let old = f.cache.get(&alias(), &name, Some(&v(1))).await.unwrap();
    assert_eq!(old.state, CacheState::Hit);
    assert_eq!(old.fetched.value.expose_secret(), b"one");
    // No change within the wait: None.
    let none = f.cache.wait_change(&alias(), &name, &v(2), Duration::from_millis(100)).await.unwrap();
    assert!(none.is_none());
    let audit = std::fs::read_to_string(f.dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"event\":\"secret.version_changed\""), "{audit}");
    assert!(!audit.contains("\"one\"") && !audit.contains("\"two\""));
}

#[tokio::test]
async fn idle_entries_are_evicted() {
    let mut f = fixture(Duration::from_secs(300), Duration::from_secs(3600));
    let cfg = CacheConfig {
        refresh_interval: Duration::from_secs(300),
        max_stale: Duration::from_secs(3600),
        evict_idle: Duration::from_millis(100),
        version_grace: Duration::from_secs(3600),
    };
    f.cache = Cache::new(cfg, Arc::clone(&f.cache.inner.vaults), Arc::clone(&f.cache.inner.auditor));
    let name: SecretName = "db".parse().unwrap();
    let got = f.cache.get(&alias(), &name, None).await.unwrap();
    let weak = Arc::downgrade(&got.fetched);
    drop(got);
    assert_eq!(f.cache.status().len(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.cache.sweep();
    assert!(f.cache.status().is_empty());
    assert!(weak.upgrade().is_none(), "the evicted value was dropped (and so wiped)");
    f.cache.get(&alias(), &name, None).await.unwrap();
    assert_eq!(f.backend.calls.load(Ordering::SeqCst), 2, "an evicted secret is fetched again");
}

/// Issue 15: a refresh-ahead had only a caller's deadline, so an IMDS update (70 s of 410)
/// failed it and values went stale. Refreshes run under the background budget, a caller's
/// miss under the caller's, and the two never share a flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_run_under_the_background_budget_and_reads_under_the_callers() {
    let f = fixture(Duration::from_secs(2), Duration::from_secs(60));
    let name: SecretName = "db".parse().unwrap();
    f.cache.get(&alias(), &name, None).await.unwrap();
    let refresher = tokio::spawn(f.cache.refresher());
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.backend.calls.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refresher.abort();
    let budgets = f.backend.budgets.lock().unwrap().clone();
    assert!(budgets.len() >= 2, "no refresh within 10 s: {budgets:?}");
    assert_eq!(budgets[0], Budget::Caller);
    assert!(budgets[1..].iter().all(|b| *b == Budget::Background), "{budgets:?}");
    assert_eq!(Budget::Caller.deadline(Duration::from_secs(15)), Duration::from_secs(15));
    assert_eq!(Budget::Background.deadline(Duration::from_secs(15)), crate::vault::BACKGROUND_BUDGET);
    assert_eq!(Budget::Background.deadline(Duration::from_secs(120)), Duration::from_secs(120));
}

/// Issue 19: entries carry no key string of their own; one with no current version (a 404,
/// or only versions read by id) is filed under a name kept for it, so it is still found and
/// answered without another vault call.
#[tokio::test]
async fn entries_without_a_current_version_are_still_found() {
    let f = fixture(Duration::from_secs(300), Duration::from_secs(3600));
    let pinned: SecretName = "Pinned".parse().unwrap();
    f.cache.get(&alias(), &pinned, Some(&v(1))).await.unwrap();
    let hit = f.cache.get(&alias(), &"PINNED".parse().unwrap(), Some(&v(1))).await.unwrap();
    assert_eq!(hit.state, CacheState::Hit);
    assert_eq!(f.backend.calls.load(Ordering::SeqCst), 1);

    let name: SecretName = "db".parse().unwrap();
    f.cache.get(&alias(), &name, None).await.unwrap();
    *f.backend.answer.lock().unwrap() =
        Err(VaultError::NotFound { vault: alias(), name: "db".into(), upstream_request_id: None });
    f.cache.fetch(&alias(), &name, None, Budget::Background).await.unwrap_err();
    let calls = f.backend.calls.load(Ordering::SeqCst);
    assert!(matches!(f.cache.get(&alias(), &name, None).await, Err(VaultError::NotFound { .. })));
    assert_eq!(f.backend.calls.load(Ordering::SeqCst), calls, "answered from the entry");
    assert_eq!(f.cache.counts().0, 2);
}
