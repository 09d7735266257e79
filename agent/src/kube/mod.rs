//! Pods on this node, from the node's kubelet (`GET /pods`), for the `k8s_*` selectors.
//!
//! The list is cached for `pod_cache_ttl`. A pod UID the cache does not hold (or a stale
//! cache) triggers one refresh, shared by every request that misses meanwhile (single
//! flight), and a request waits for it at most [`LOOKUP_WAIT`]; then it fails closed
//! ([`PodLookup::Unavailable`], a 502). A refresh runs in its own task, so one caller giving
//! up does not cancel it for the others. After a failed refresh, or a miss answered by a
//! refresh less than [`MISS_INTERVAL`] old, no new call is made for that long: a caller
//! cannot make the agent hammer the kubelet.
//!
//! Never logs the token, and never any pod field but names (the answer holds env values).

mod client;
mod pod;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvbroker_proto::PeerInfo;
use tokio::sync::watch;

pub(crate) use client::{KubeletClient, KubeletError};
pub(crate) use pod::{Container, Pod};

/// The longest a request waits for the kubelet before failing closed.
pub(crate) const LOOKUP_WAIT: Duration = Duration::from_secs(3);
/// How soon after a refresh (or a failed one) a miss may cause another.
const MISS_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one refresh may run in the background, answered or not.
const FETCH_LIMIT: Duration = Duration::from_secs(10);

/// What the kubelet said about the caller's pod, for one decision.
#[derive(Debug, Clone)]
pub(crate) enum PodLookup {
    /// Not asked: no rule needed it (yet).
    NotAsked,
    Found(Arc<Pod>),
    /// The kubelet's fresh list has no pod with that UID.
    NotFound,
    /// The kubelet could not be asked, or did not answer in time: why.
    Unavailable(String),
}

impl PodLookup {
    /// Adds the pod's names to an audit record's peer (`container_id`: the caller's).
    pub(crate) fn annotate(&self, info: &mut PeerInfo) {
        if let PodLookup::Found(p) = self {
            info.k8s_namespace = Some(p.namespace.clone());
            info.k8s_service_account = Some(p.service_account.clone());
            info.k8s_pod_name = Some(p.name.clone());
            let container = info.container_id.as_deref().and_then(|id| p.container(id));
            info.k8s_container_name = container.map(|c| c.name.clone());
        }
    }
}

/// Where pod lists come from: the kubelet ([`KubeletClient`]), or a stand-in in unit tests.
#[async_trait::async_trait]
pub(crate) trait FetchPods: Send + Sync + 'static {
    async fn fetch(&self) -> Result<Vec<Pod>, String>;
}

/// The pod cache in front of a [`FetchPods`].
pub(crate) struct Pods {
    shared: Arc<Shared>,
}

struct Shared {
    fetcher: Arc<dyn FetchPods>,
    ttl: Duration,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    pods: HashMap<String, Arc<Pod>>,
    /// When the list in `pods` was asked for (it is at least that fresh).
    fetched: Option<Instant>,
    /// The last refresh that failed: when it ended, and why.
    failed: Option<(Instant, String)>,
    /// The refresh in flight: its result (`None` until it ends).
    inflight: Option<watch::Receiver<Option<Result<(), String>>>>,
}

impl Pods {
    pub(crate) fn new(fetcher: Arc<dyn FetchPods>, ttl: Duration) -> Self {
        Self { shared: Arc::new(Shared { fetcher, ttl, state: Mutex::new(CacheState::default()) }) }
    }

    /// The pod with `uid`, waiting at most [`LOOKUP_WAIT`] for a refresh.
    pub(crate) async fn lookup(&self, uid: &str) -> PodLookup {
        self.lookup_within(uid, LOOKUP_WAIT).await
    }

    async fn lookup_within(&self, uid: &str, wait: Duration) -> PodLookup {
        let mut rx = {
            let mut st = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let fresh = st.fetched.is_some_and(|t| now.duration_since(t) < self.shared.ttl);
            if fresh && let Some(p) = st.pods.get(uid) {
                return PodLookup::Found(Arc::clone(p));
            }
            match &st.inflight {
                Some(rx) => rx.clone(),
                None => {
                    if let Some((at, why)) = &st.failed
                        && now.duration_since(*at) < MISS_INTERVAL
                    {
                        return PodLookup::Unavailable(why.clone());
                    }
                    if fresh && st.fetched.is_some_and(|t| now.duration_since(t) < MISS_INTERVAL) {
                        return PodLookup::NotFound;
                    }
                    let rx = self.start_refresh();
                    st.inflight = Some(rx.clone());
                    rx
                }
            }
        };
        let ended = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        let outcome = match ended {
            Err(_) => {
                return PodLookup::Unavailable(format!(
                    "the kubelet did not answer within {}s",
                    wait.as_secs_f32()
                ));
            }
            Ok(Err(_)) => {
                return PodLookup::Unavailable("the pod list refresh ended without a result".into());
            }
            Ok(Ok(v)) => v.clone(),
        };
        match outcome {
            Some(Ok(())) => {
                let st = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                st.pods.get(uid).map_or(PodLookup::NotFound, |p| PodLookup::Found(Arc::clone(p)))
            }
            Some(Err(why)) => PodLookup::Unavailable(why),
            None => PodLookup::Unavailable("the pod list refresh ended without a result".into()),
        }
    }

    /// Starts a refresh task; the receiver sees its result.
    fn start_refresh(&self) -> watch::Receiver<Option<Result<(), String>>> {
        let (tx, rx) = watch::channel(None);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let asked = Instant::now();
            let got = match tokio::time::timeout(FETCH_LIMIT, shared.fetcher.fetch()).await {
                Ok(r) => r,
                Err(_) => Err(format!("the kubelet did not answer within {}s", FETCH_LIMIT.as_secs())),
            };
            let result = {
                let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                st.inflight = None;
                match got {
                    Ok(pods) => {
                        st.pods = pods.into_iter().map(|p| (p.uid.clone(), Arc::new(p))).collect();
                        st.fetched = Some(asked);
                        st.failed = None;
                        Ok(())
                    }
                    Err(why) => {
                        tracing::warn!(reason = why.as_str(), "kubelet pod list refresh failed");
                        st.failed = Some((Instant::now(), why.clone()));
                        Err(why)
                    }
                }
            };
            let _ = tx.send(Some(result));
        });
        rx
    }
}

#[cfg(test)]
mod tests;
