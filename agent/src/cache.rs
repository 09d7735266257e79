//! The secret cache: one Key Vault call per secret per node, however many callers ask.
//!
//! - **Single flight**: concurrent misses for the same (vault, name, version) share one
//!   fetch (a `OnceCell` per key); its result or error goes to every waiter.
//! - **Refresh ahead**: a background task refreshes every cached secret each
//!   `refresh_interval` (± 10 % jitter, so a fleet does not refresh in lockstep). A read
//!   never waits for the vault once a value is cached.
//! - **Stale means stale**: a value is fresh for `refresh_interval` (with its jitter) after its
//!   last good fetch; the refresh starts a little before that (`refresh_lead`), so a working
//!   vault never lets a value go stale. Past it — a refresh failed, or is still retrying — the
//!   value is served marked stale; past `max_stale` since the last good fetch reads get 502,
//!   whether or not a refresh is still in flight. A 404 or a disabled secret is not
//!   transient: the value stops being served at once. Failing entries back off
//!   (1 s, 2 s, 4 s … capped at `refresh_interval`), so many failing secrets cause no storm.
//! - **Versions**: a new current version found by a refresh writes
//!   `secret.version_changed`, wakes long polls, and keeps the previous version readable by
//!   id for `version_grace`. Pinned versions are immutable and served from cache.
//! - **Memory**: values live only in `SecretValue` behind `Arc`; an evicted or replaced
//!   value is zeroized when its last reader drops it. Idle entries go after `evict_idle`.
//!   An entry is small (issue 19: ≤ 16 MiB RSS with 10,000 cached secrets): the current
//!   version and four timestamps, keyed by the lowercase name under its vault's alias (stored
//!   once per vault); what few entries need — a 404, a failing refresh, retired or pinned
//!   versions, a long poll's channel — sits behind one optional box, dropped again once
//!   empty. The name, version and metadata live once, in the shared `Fetched` (for a `local`
//!   vault, the very one its table holds).
//!
//! Never logs values; the audit records it writes carry names, versions and request ids.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, CacheState, Event, Outcome, SecretName, SecretRef, VaultAlias, VersionId};
use tokio::sync::{OnceCell, watch};

use crate::audit::Auditor;
use crate::config::CacheConfig;
use crate::metrics::VaultStatus;
use crate::vault::{Budget, Fetched, VaultError, Vaults};

/// Entries by vault alias, then by lowercase name.
type Entries = HashMap<VaultAlias, Names>;

/// One vault's entries, found by lowercase name. A `HashTable` rather than a map keyed by
/// the name: an entry's name is its current version's (`Fetched::name`), so most entries
/// store no name of their own (issue 19).
#[derive(Default)]
struct Names {
    table: hashbrown::HashTable<Entry>,
    hasher: std::collections::hash_map::RandomState,
}

impl Names {
    fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        let hash = self.hasher.hash_one(key);
        self.table.find_mut(hash, |e| e.key() == key)
    }

    /// The entry for `key`, made if there is none.
    fn get_or_insert(&mut self, key: &str, now: Tick) -> &mut Entry {
        let hasher = &self.hasher;
        match self.table.entry(hasher.hash_one(key), |e| e.key() == key, |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(o) => o.into_mut(),
            hashbrown::hash_table::Entry::Vacant(v) => v.insert(Entry::new(now, key)).into_mut(),
        }
    }
}
type FlightKey = (VaultAlias, String, Option<VersionId>, Budget);
type Flight = Arc<OnceCell<Result<Arc<Fetched>, VaultError>>>;

/// A value as served, and how.
pub(crate) struct Lookup {
    pub(crate) fetched: Arc<Fetched>,
    pub(crate) state: CacheState,
}

#[derive(Clone)]
pub(crate) struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<Entries>,
    flights: Mutex<HashMap<FlightKey, Flight>>,
    cfg: CacheConfig,
    /// Where [`Tick`]s count from.
    epoch: Instant,
    vaults: Arc<Vaults>,
    auditor: Arc<Auditor>,
}

struct Entry {
    /// The current version; `None` after a 404/disabled, or for pinned-only entries.
    current: Option<Arc<Fetched>>,
    last_read: Tick,
    last_good: Tick,
    /// `last_good` + the jittered `refresh_interval`: served as fresh until then.
    fresh_until: Tick,
    next_refresh: Tick,
    /// What most entries never need; `None` whenever all of it is empty.
    rare: Option<Box<Rare>>,
}

/// The parts of an entry that only a 404, a failing vault, a rotation, a read by version or
/// a long poll fill in.
#[derive(Default)]
struct Rare {
    /// The lowercase name the entry is filed under, when `current` does not hold it (no
    /// current version, or one the vault spelled differently).
    name: Option<Box<str>>,
    /// Why the secret is no longer served (404 or disabled), until a refresh finds it again.
    gone: Option<VaultError>,
    /// Versions replaced by a rotation, with when; readable by id until `version_grace`.
    retired: Vec<(Arc<Fetched>, Instant)>,
    /// Versions read by id.
    pinned: Vec<Arc<Fetched>>,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    failures: u32,
    /// Wakes long polls; created by the first long poll.
    changed: Option<watch::Sender<Option<VersionId>>>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.gone.is_none()
            && self.retired.is_empty()
            && self.pinned.is_empty()
            && self.failing_since.is_none()
            && self.last_error.is_none()
            && self.failures == 0
            && self.changed.is_none()
    }
}

impl Entry {
    fn new(now: Tick, key: &str) -> Self {
        let rare = Rare { name: Some(key.into()), ..Rare::default() };
        Self {
            current: None,
            last_read: now,
            last_good: now,
            fresh_until: now,
            next_refresh: now,
            rare: Some(Box::new(rare)),
        }
    }

    /// The lowercase name the entry is filed under. Never changes while it is filed: the
    /// name is kept in `rare` before `current` is cleared or holds another spelling.
    fn key(&self) -> &str {
        match (self.rare.as_ref().and_then(|r| r.name.as_deref()), &self.current) {
            (Some(name), _) => name,
            (None, Some(f)) => f.name.key(),
            (None, None) => "",
        }
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Drops the rare parts once none is in use (the name too, once `current` holds it).
    fn tidy(&mut self) {
        if let (Some(r), Some(f)) = (&mut self.rare, &self.current)
            && r.name.as_deref() == Some(f.name.key())
        {
            r.name = None;
        }
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    fn gone(&self) -> Option<&VaultError> {
        self.rare.as_ref()?.gone.as_ref()
    }

    fn failing_since(&self) -> Option<Instant> {
        self.rare.as_ref()?.failing_since
    }

    fn last_error(&self) -> Option<&String> {
        self.rare.as_ref()?.last_error.as_ref()
    }

    fn retired_count(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.retired.len())
    }

    /// Served marked stale: a refresh failed, or none has succeeded in time.
    fn is_stale(&self, now: Tick) -> bool {
        self.current.is_some() && (self.failing_since().is_some() || now > self.fresh_until)
    }

    fn find_version(&self, v: &VersionId) -> Option<&Arc<Fetched>> {
        let (retired, pinned) = match &self.rare {
            Some(r) => (&r.retired[..], &r.pinned[..]),
            None => (&[][..], &[][..]),
        };
        self.current
            .iter()
            .chain(retired.iter().map(|(f, _)| f))
            .chain(pinned.iter())
            .find(|f| f.version == *v)
    }
}

/// One cached secret, for `kvbroker ctl status`. Never a value.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EntryStatus {
    pub(crate) vault: String,
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    pub(crate) age_secs: u64,
    pub(crate) idle_secs: u64,
    pub(crate) stale: bool,
    pub(crate) retired_versions: usize,
    pub(crate) last_error: Option<String>,
}

fn jitter(d: Duration) -> Duration {
    // ±10 %, so refreshes across a fleet spread out. Checked: no configured duration may
    // panic a task (config bounds durations, and this holds even without that bound).
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.9 + fastrand::f64() * 0.2)).unwrap_or(d)
}

/// A point in time as nanoseconds since the cache was made: 8 bytes where an `Instant` takes
/// 16, for the four timestamps of every entry (issue 19). Lasts 584 years; arithmetic
/// saturates instead of panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(u64);

impl Tick {
    /// `self + d`.
    fn after(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }

    /// How long after `earlier` this is (zero if it is not after it).
    fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// How long before a value goes stale its refresh starts: one sweep tick and a second for the
/// call itself, but at most half the interval.
fn refresh_lead(interval: Duration) -> Duration {
    (sweep_tick(interval) + Duration::from_secs(1)).min(interval / 2)
}

/// How often the refresher sweeps: a tenth of the interval, 0.1–1 s.
fn sweep_tick(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

impl Cache {
    pub(crate) fn new(cfg: CacheConfig, vaults: Arc<Vaults>, auditor: Arc<Auditor>) -> Self {
        let inner = Inner {
            entries: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            cfg,
            epoch: Instant::now(),
            vaults,
            auditor,
        };
        Self { inner: Arc::new(inner) }
    }

    pub(crate) fn vaults(&self) -> &Vaults {
        &self.inner.vaults
    }

    /// Now, as a [`Tick`].
    fn now(&self) -> Tick {
        Tick(u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A secret's current version, or `version`, from cache or (once) from the vault.
    pub(crate) async fn get(
        &self,
        vault: &VaultAlias,
        name: &SecretName,
        version: Option<&VersionId>,
    ) -> Result<Lookup, VaultError> {
        let now = self.now();
        {
            let mut entries = self.entries();
            if let Some(e) = entries.get_mut(vault).and_then(|names| names.get_mut(name.key())) {
                e.last_read = now;
                match version {
                    Some(v) => {
                        if let Some(f) = e.find_version(v) {
                            return Ok(Lookup { fetched: Arc::clone(f), state: CacheState::Hit });
                        }
                    }
                    None => {
                        if let Some(gone) = e.gone() {
                            return Err(gone.clone());
                        }
                        if let Some(cur) = &e.current {
                            if !e.is_stale(now) {
                                return Ok(Lookup { fetched: Arc::clone(cur), state: CacheState::Hit });
                            }
                            let age = now.since(e.last_good);
                            if age <= self.inner.cfg.max_stale {
                                return Ok(Lookup { fetched: Arc::clone(cur), state: CacheState::Stale });
                            }
                            let why = match (e.last_error(), e.failing_since()) {
                                (Some(err), Some(since)) => {
                                    format!("failing for {}s: {err}", since.elapsed().as_secs())
                                }
                                _ => "a refresh is still in progress".to_owned(),
                            };
                            return Err(VaultError::Unavailable {
                                vault: vault.clone(),
                                reason: format!(
                                    "the cached value is {}s old, past max_stale ({}s), and {why}",
                                    age.as_secs(),
                                    self.inner.cfg.max_stale.as_secs(),
                                ),
                                upstream_request_id: None,
                                upstream: None,
                            });
                        }
                    }
                }
            }
        }
        let fetched = self.fetch(vault, name, version, Budget::Caller).await?;
        Ok(Lookup { fetched, state: CacheState::Miss })
    }

    /// Fetches through the single flight for (vault, name, version, budget), installing the
    /// result. A caller never joins a background refresh's flight, which may retry for longer
    /// than a caller's deadline: at worst one of each runs at once.
    async fn fetch(
        &self,
        vault: &VaultAlias,
        name: &SecretName,
        version: Option<&VersionId>,
        budget: Budget,
    ) -> Result<Arc<Fetched>, VaultError> {
        let fkey = (vault.clone(), name.key().to_owned(), version.cloned(), budget);
        let flight = {
            let mut flights = self.inner.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(flights.entry(fkey.clone()).or_default())
        };
        let result = flight
            .get_or_init(|| async {
                let backend = self.inner.vaults.get(vault).ok_or_else(|| VaultError::Unavailable {
                    vault: vault.clone(),
                    reason: "no such vault".into(),
                    upstream_request_id: None,
                    upstream: None,
                })?;
                let started = Instant::now();
                let result = backend.get_shared(name, version, budget).await;
                if !backend.counts_own_calls() {
                    let status = result.as_ref().map_or_else(VaultStatus::of, |_| VaultStatus::Ok);
                    crate::metrics::get().vault_call(vault.as_str(), status, started.elapsed());
                }
                // Installed before the flight ends, so no later reader misses it.
                self.install(vault, name, version.is_some(), &result);
                result
            })
            .await
            .clone();
        let mut flights = self.inner.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights.get(&fkey).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&fkey);
        }
        result
    }

    /// Records a fetch's outcome in the entry (creating it on success).
    fn install_locked(f: &Fetched) {
        if let Err(e) = crate::sys::lock_and_hide(f.value.expose_secret()) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e, "cannot mlock cached secrets (raise RLIMIT_MEMLOCK or run as root); continuing without");
            });
        }
    }

    fn install(
        &self,
        vault: &VaultAlias,
        name: &SecretName,
        pinned: bool,
        result: &Result<Arc<Fetched>, VaultError>,
    ) {
        let (at, now) = (Instant::now(), self.now());
        let cfg = &self.inner.cfg;
        let mut entries = self.entries();
        let names = entries.entry(vault.clone()).or_default();
        if let Ok(f) = result {
            Self::install_locked(f);
        }
        let changed = match result {
            Ok(f) if pinned => {
                let e = names.get_or_insert(name.key(), now);
                let pinned = &mut e.rare_mut().pinned;
                pinned.retain(|p| p.version != f.version);
                pinned.push(Arc::clone(f));
                None
            }
            Ok(f) => {
                let e = names.get_or_insert(name.key(), now);
                if e.rare.as_ref().is_none_or(|r| r.name.is_none()) && f.name.key() != name.key() {
                    // Filed under the name asked for, whatever the vault's spelling.
                    e.rare_mut().name = Some(name.key().into());
                }
                let previous = e.current.replace(Arc::clone(f));
                if let Some(r) = &mut e.rare {
                    r.gone = None;
                    r.failing_since = None;
                    r.last_error = None;
                    r.failures = 0;
                }
                e.last_good = now;
                let fresh_for = jitter(cfg.refresh_interval);
                e.fresh_until = now.after(fresh_for);
                e.next_refresh = now.after(fresh_for.saturating_sub(refresh_lead(cfg.refresh_interval)));
                let wake = |e: &Entry| {
                    if let Some(tx) = e.rare.as_ref().and_then(|r| r.changed.as_ref()) {
                        tx.send_replace(Some(f.version.clone()));
                    }
                };
                let changed = match previous {
                    Some(p) if p.version != f.version => {
                        e.rare_mut().retired.push((p.clone(), at));
                        wake(e);
                        Some((p, Arc::clone(f)))
                    }
                    None => {
                        wake(e);
                        None
                    }
                    Some(_) => None,
                };
                e.tidy();
                changed
            }
            Err(err @ (VaultError::NotFound { .. } | VaultError::Disabled { .. })) if !pinned => {
                if let Some(e) = names.get_mut(name.key()) {
                    // Not transient: stop serving the value now (it is wiped once unused).
                    let key: Box<str> = e.key().into();
                    e.rare_mut().name.get_or_insert(key);
                    e.current = None;
                    let r = e.rare_mut();
                    r.gone = Some(err.clone());
                    r.failing_since = None;
                    e.next_refresh = now.after(jitter(cfg.refresh_interval));
                }
                None
            }
            Err(err) if !pinned => {
                if let Some(e) = names.get_mut(name.key()) {
                    let r = e.rare_mut();
                    r.failing_since.get_or_insert(at);
                    r.last_error = Some(err.to_string());
                    r.failures = r.failures.saturating_add(1);
                    let backoff = Duration::from_secs(1u64 << r.failures.min(6)).min(cfg.refresh_interval);
                    e.next_refresh = now.after(jitter(backoff));
                }
                None
            }
            Err(_) => None,
        };
        drop(entries);
        if let Some((old, new)) = changed {
            self.audit_version_change(vault, &old, &new);
        }
    }

    fn audit_version_change(&self, vault: &VaultAlias, old: &Fetched, new: &Fetched) {
        let mut rec = AuditRecord::new(Event::SecretVersionChanged);
        rec.outcome = Some(Outcome::Ok);
        rec.secret = Some(SecretRef {
            vault: vault.to_string(),
            name: new.name.to_string(),
            version: Some(new.version.to_string()),
            previous_version: Some(old.version.to_string()),
        });
        rec.upstream_request_id = new.upstream_request_id.as_deref().map(str::to_owned);
        tracing::info!(vault = %vault, secret = %new.name, version = %new.version, "new version cached");
        // Called while installing a fetch (no await there): the writer orders it.
        let auditor = Arc::clone(&self.inner.auditor);
        tokio::spawn(async move {
            if let Err(e) = auditor.append(rec).await {
                tracing::error!(error = %e, "cannot write secret.version_changed");
            }
        });
    }

    /// Waits up to `wait` for the current version to differ from `from`. `Ok(None)`: it did
    /// not change in time.
    pub(crate) async fn wait_change(
        &self,
        vault: &VaultAlias,
        name: &SecretName,
        from: &VersionId,
        wait: Duration,
    ) -> Result<Option<Lookup>, VaultError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = self.get(vault, name, None).await?;
            if now.fetched.version != *from {
                return Ok(Some(now));
            }
            let mut rx = {
                let mut entries = self.entries();
                match entries.get_mut(vault).and_then(|names| names.get_mut(name.key())) {
                    Some(e) => e.rare_mut().changed.get_or_insert_with(|| watch::channel(None).0).subscribe(),
                    None => continue,
                }
            };
            rx.mark_unchanged();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(_) => continue,
                Err(_) => return Ok(None),
            }
        }
    }

    /// Refreshes one secret now (`kvbroker ctl refresh`).
    pub(crate) async fn refresh_now(
        &self,
        vault: &VaultAlias,
        name: &SecretName,
    ) -> Result<VersionId, VaultError> {
        self.fetch(vault, name, None, Budget::Caller).await.map(|f| f.version.clone())
    }

    /// What is cached, without values.
    pub(crate) fn status(&self) -> Vec<EntryStatus> {
        let now = self.now();
        let entries = self.entries();
        let mut out: Vec<EntryStatus> = entries
            .iter()
            .flat_map(|(vault, names)| names.table.iter().map(move |e| (vault, e)))
            .map(|(vault, e)| EntryStatus {
                vault: vault.to_string(),
                name: e.current.as_ref().map_or_else(|| e.key().to_owned(), |f| f.name.to_string()),
                version: e.current.as_ref().map(|f| f.version.to_string()),
                age_secs: now.since(e.last_good).as_secs(),
                idle_secs: now.since(e.last_read).as_secs(),
                stale: e.is_stale(now),
                retired_versions: e.retired_count(),
                last_error: e.last_error().cloned().or_else(|| e.gone().map(ToString::to_string)),
            })
            .collect();
        out.sort_by(|a, b| (&a.vault, &a.name).cmp(&(&b.vault, &b.name)));
        out
    }

    /// Cached values being served stale now (for `/v1/health`).
    pub(crate) fn stale_count(&self) -> usize {
        let now = self.now();
        self.entries().values().flat_map(|names| names.table.iter()).filter(|e| e.is_stale(now)).count()
    }

    /// `[cache] max_stale`, for health.
    pub(crate) fn max_stale(&self) -> Duration {
        self.inner.cfg.max_stale
    }

    /// (entries, stale entries), for the metrics.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let now = self.now();
        let entries = self.entries();
        let all = || entries.values().flat_map(|names| names.table.iter());
        (all().count(), all().filter(|e| e.is_stale(now)).count())
    }

    /// Drops every cached value (each is wiped once no request holds it).
    pub(crate) fn clear(&self) {
        self.entries().clear();
    }

    /// Evicts idle entries and retired versions past their grace; returns the due refreshes.
    fn sweep(&self) -> Vec<(VaultAlias, SecretName)> {
        let (at, now) = (Instant::now(), self.now());
        let cfg = &self.inner.cfg;
        let mut entries = self.entries();
        for names in entries.values_mut() {
            names.table.retain(|e| now.since(e.last_read) <= cfg.evict_idle);
        }
        entries.retain(|_, names| !names.table.is_empty());
        let mut due = Vec::new();
        for (vault, e) in
            entries.iter_mut().flat_map(|(vault, names)| names.table.iter_mut().map(move |e| (&*vault, e)))
        {
            if let Some(r) = &mut e.rare {
                r.retired.retain(|(_, retired)| at.duration_since(*retired) <= cfg.version_grace);
            }
            e.tidy();
            let tracked = e.current.as_ref().map(|f| f.name.clone()).or_else(|| match e.gone() {
                Some(VaultError::NotFound { name, .. } | VaultError::Disabled { name, .. }) => {
                    name.parse().ok()
                }
                _ => None,
            });
            if let Some(name) = tracked
                && e.next_refresh <= now
            {
                // Not due again until this refresh reports back.
                e.next_refresh = now.after(cfg.refresh_interval);
                due.push((vault.clone(), name));
            }
        }
        due
    }

    /// Refresh-ahead and eviction, forever (run under `supervise`, which restarts it).
    pub(crate) fn refresher(&self) -> impl Future<Output = ()> + Send + use<> {
        let cache = self.clone();
        let tick = sweep_tick(cache.inner.cfg.refresh_interval);
        async move {
            // At most this many refreshes in flight; the vault's own limiter paces the calls.
            let permits = Arc::new(tokio::sync::Semaphore::new(4));
            loop {
                tokio::time::sleep(tick).await;
                for (vault, name) in cache.sweep() {
                    let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                    let c = cache.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c.fetch(&vault, &name, None, Budget::Background).await {
                            tracing::warn!(vault = %vault, secret = %name, error = %e, "refresh failed");
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
