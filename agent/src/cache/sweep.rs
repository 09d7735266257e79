//! What is cached (status, counts) and its upkeep: eviction, retired versions' grace, and
//! the refresh-ahead task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvbroker_proto::{SecretName, VaultAlias};

use super::{Cache, EntryStatus, sweep_tick};
use crate::vault::{Budget, VaultError};

impl Cache {
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
    pub(super) fn sweep(&self) -> Vec<(VaultAlias, SecretName)> {
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
