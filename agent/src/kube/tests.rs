use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A kubelet stand-in: counts calls, answers after `delay`, or fails.
struct Fake {
    calls: AtomicUsize,
    delay: Duration,
    pods: Mutex<Result<Vec<Pod>, String>>,
}

#[async_trait::async_trait]
impl FetchPods for Fake {
    async fn fetch(&self) -> Result<Vec<Pod>, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.pods.lock().unwrap().clone()
    }
}

fn pod(uid: &str) -> Pod {
    Pod {
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: "ml-prod".into(),
        service_account: "trainer".into(),
        labels: BTreeMap::new(),
        containers: vec![],
    }
}

fn fake(delay_ms: u64, pods: Result<Vec<Pod>, String>) -> Arc<Fake> {
    Arc::new(Fake {
        calls: AtomicUsize::new(0),
        delay: Duration::from_millis(delay_ms),
        pods: Mutex::new(pods),
    })
}

/// Concurrent misses share one kubelet call.
#[tokio::test]
async fn concurrent_misses_share_one_call() {
    let f = fake(100, Ok(vec![pod("a"), pod("b")]));
    let pods = Arc::new(Pods::new(f.clone(), Duration::from_secs(60)));
    let mut tasks = Vec::new();
    for uid in ["a", "b", "a", "c", "b", "a", "c", "a"] {
        let pods = Arc::clone(&pods);
        tasks.push(tokio::spawn(async move { pods.lookup(uid).await }));
    }
    let mut found = 0;
    for t in tasks {
        match t.await.unwrap() {
            PodLookup::Found(_) => found += 1,
            PodLookup::NotFound => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(found, 6);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    // Fresh, known: no call.
    assert!(matches!(pods.lookup("b").await, PodLookup::Found(_)));
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

/// An unknown UID refreshes once the list is older than the miss interval; a stale list is
/// refreshed; within the interval a miss is answered from the list.
#[tokio::test]
async fn a_miss_refreshes_at_most_once_a_second() {
    let f = fake(0, Ok(vec![pod("a")]));
    let pods = Pods::new(f.clone(), Duration::from_secs(60));
    assert!(matches!(pods.lookup("a").await, PodLookup::Found(_)));
    assert!(matches!(pods.lookup("new").await, PodLookup::NotFound));
    assert_eq!(f.calls.load(Ordering::SeqCst), 1, "a miss right after a refresh");
    *f.pods.lock().unwrap() = Ok(vec![pod("a"), pod("new")]);
    tokio::time::sleep(MISS_INTERVAL).await;
    assert!(matches!(pods.lookup("new").await, PodLookup::Found(_)), "a pod started since is found");
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);

    let short = Pods::new(f.clone(), Duration::from_millis(50));
    short.lookup("a").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    short.lookup("a").await;
    assert_eq!(f.calls.load(Ordering::SeqCst), 4, "past the TTL a known pod is asked again");
}

/// A kubelet that does not answer: the lookup gives up after its wait, and fails closed.
#[tokio::test]
async fn a_slow_kubelet_fails_closed_within_the_wait() {
    let f = fake(5_000, Ok(vec![pod("a")]));
    let pods = Pods::new(f.clone(), Duration::from_secs(60));
    let started = Instant::now();
    let got = pods.lookup_within("a", Duration::from_millis(200)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1_000), "{took:?}");
    match got {
        PodLookup::Unavailable(why) => assert!(why.contains("did not answer within"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// A failed refresh is reported, and not retried for the miss interval.
#[tokio::test]
async fn a_failed_refresh_is_unavailable_and_not_hammered() {
    let f = fake(0, Err("kubelet answered 401".into()));
    let pods = Pods::new(f.clone(), Duration::from_secs(60));
    for _ in 0..5 {
        match pods.lookup("a").await {
            PodLookup::Unavailable(why) => assert_eq!(why, "kubelet answered 401"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    *f.pods.lock().unwrap() = Ok(vec![pod("a")]);
    tokio::time::sleep(MISS_INTERVAL).await;
    assert!(matches!(pods.lookup("a").await, PodLookup::Found(_)));
}
