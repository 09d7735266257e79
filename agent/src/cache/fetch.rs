//! Reading: a value from cache or through one single-flight fetch, installing what the
//! fetch brings (a new version audited, long polls woken).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, CacheState, Event, Outcome, SecretName, SecretRef, VaultAlias, VersionId};
use tokio::sync::watch;

use super::{Cache, Entry, Lookup, jitter, refresh_lead};
use crate::metrics::VaultStatus;
use crate::vault::{Budget, Fetched, VaultError};

impl Cache {
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
    pub(super) async fn fetch(
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
}
