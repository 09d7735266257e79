//! The agent's Prometheus metrics (docs/metrics.md lists every one), in OpenMetrics text.
//!
//! One process-wide [`Metrics`] ([`get`]): the parts that count (server, cache, audit,
//! identity) sit on different layers, and a shared instance spares threading a handle through
//! each of them. The hot path is a few relaxed atomic adds: every counter a read can touch is
//! created at startup and held in an array indexed by a fixed enum, so a read never takes a
//! lock, looks up a label set or allocates (the one exception is `[metrics] per_secret`,
//! which is off by default and documented as costing a lookup per read).
//!
//! Label values come only from fixed sets (the enums below, [`ErrorCode`], identity source
//! names) or from the configuration (vault aliases). Never a value, a token, or a string a
//! caller chose: a secret name becomes a label only with `per_secret`, and only once the
//! vault has served it (so it names a secret that exists and policy allowed).
//!
//! Never depends on another module of the crate: everything above it may count into it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use kvbroker_proto::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process's metrics.
pub(crate) fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// How a secret read ended (the audit record's outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOutcome {
    Allowed,
    Denied,
    Error,
}

/// Where the answer to a read came from; `None` when no lookup happened (denied, bad request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheUse {
    Hit,
    Miss,
    Stale,
    None,
}

/// Why a read was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenyReason {
    /// No policy rule allows the caller this secret.
    Policy,
    /// The caller's facts could not be read or trusted (pid 0, `/proc` unreadable, …).
    Unattested,
    /// The caller changed under the connection (exe replaced, another writer): reconnect.
    PeerChanged,
    /// `kvbroker launch`: not the launched command or one of its descendants.
    NotLaunched,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The per-uid or per-rule read rate (`[limits] rate_per_second`, `burst`).
    Rate,
    /// The per-uid connection cap (`[limits] connections_per_uid`) or the global budget.
    Connections,
}

/// How a vault call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaultStatus {
    Ok,
    NotFound,
    Disabled,
    /// Key Vault or the identity endpoint failed (5xx, 429, network, token).
    Unavailable,
}

macro_rules! label_set {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            const ALL: [$t; [$($s),+].len()] = [$(<$t>::$v),+];
            pub(crate) fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),+ }
            }
        }
    };
}
label_set!(ReadOutcome { Allowed => "allowed", Denied => "denied", Error => "error" });
label_set!(CacheUse { Hit => "hit", Miss => "miss", Stale => "stale", None => "none" });
label_set!(DenyReason {
    Policy => "policy",
    Unattested => "unattested",
    PeerChanged => "peer_changed",
    NotLaunched => "not_launched",
});
label_set!(Limit { Rate => "rate", Connections => "connections" });
label_set!(VaultStatus {
    Ok => "ok",
    NotFound => "not_found",
    Disabled => "disabled",
    Unavailable => "unavailable",
});

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReadLabels {
    outcome: &'static str,
    cache: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OneLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VaultLabel {
    vault: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VaultCallLabels {
    vault: String,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SecretLabels {
    vault: String,
    secret: String,
}

/// Seconds buckets for Key Vault calls: 1 ms (a loopback emulator) to 30 s (deadline + retries).
const VAULT_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Seconds buckets for audit writes: 50 µs (page cache) to 5 s (`write_timeout`'s default).
const AUDIT_BUCKETS: [f64; 12] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0];

/// What one vault's calls look like, made once per configured vault.
pub(crate) struct VaultStats {
    calls: [Counter; 4],
    latency: Histogram,
    /// Nanoseconds after [`Metrics::epoch`] + 1 of the last success; 0 = none yet.
    last_success: AtomicU64,
    /// Nanoseconds after the epoch + 1 of the first failure since the last success; 0 = not failing.
    failing_since: AtomicU64,
    /// Nanoseconds after the epoch + 1 of the last call, whatever its outcome.
    last_attempt: AtomicU64,
}

/// A vault whose fetches have failed with no success since.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct FailingVault {
    pub(crate) vault: String,
    /// Since the first failure.
    pub(crate) failing_for: Duration,
    /// Since the last attempt (nothing retries a vault no cached secret needs).
    pub(crate) last_attempt: Duration,
}

/// Every metric of the agent, and the registry that renders them.
pub(crate) struct Metrics {
    registry: Registry,
    epoch: Instant,
    reads: [[Counter; 4]; 3],
    read_errors: [Counter; ErrorCode::ALL.len()],
    denials: [Counter; 4],
    limited: [Counter; 2],
    conns_served: Gauge,
    conns_busy: Gauge,
    conns_refusing: Gauge,
    connections: Family<StateLabel, Gauge>,
    cache_entries: Gauge,
    cache_stale: Gauge,
    vault_calls: Family<VaultCallLabels, Counter>,
    vault_latency: Family<VaultLabel, Histogram, fn() -> Histogram>,
    vault_since_success: Family<VaultLabel, Gauge<f64, AtomicU64>>,
    vault_failing: Family<VaultLabel, Gauge<f64, AtomicU64>>,
    vaults: RwLock<HashMap<String, Arc<VaultStats>>>,
    tokens: Family<TokenLabels, Counter>,
    audit_records: Counter,
    audit_bytes: Counter,
    audit_seconds: Histogram,
    audit_failures: Counter,
    per_secret: AtomicBool,
    secret_reads: Family<SecretLabels, Counter>,
    exec_events_active: Gauge,
    exec_events_lost: Counter,
    peer_rechecks: Counter,
}

/// Gauges read from the agent's state at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Snapshot {
    pub(crate) cache_entries: usize,
    pub(crate) stale_entries: usize,
}

fn vault_histogram() -> Histogram {
    Histogram::new(VAULT_BUCKETS)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut r = Registry::with_prefix("kvbroker");
        let reads = Family::<ReadLabels, Counter>::default();
        r.register("secret_reads", "Secret reads by outcome and where the value came from", reads.clone());
        let read = |o: ReadOutcome| {
            CacheUse::ALL
                .map(|c| reads.get_or_create(&ReadLabels { outcome: o.as_str(), cache: c.as_str() }).clone())
        };
        let reads = ReadOutcome::ALL.map(read);
        let errors = Family::<CodeLabel, Counter>::default();
        r.register("secret_read_errors", "Refused or failed secret reads by error code", errors.clone());
        let read_errors =
            ErrorCode::ALL.map(|c| errors.get_or_create(&CodeLabel { code: c.as_str() }).clone());
        let denials = Family::<OneLabel, Counter>::default();
        r.register("denials", "Secret reads denied, by reason", denials.clone());
        let denials =
            DenyReason::ALL.map(|d| denials.get_or_create(&OneLabel { reason: d.as_str() }).clone());
        let limited = Family::<LimitLabel, Counter>::default();
        r.register(
            "rate_limited",
            "Requests refused with 429, by the limit that refused them",
            limited.clone(),
        );
        let limited = Limit::ALL.map(|l| limited.get_or_create(&LimitLabel { limit: l.as_str() }).clone());
        let connections = Family::<StateLabel, Gauge>::default();
        r.register(
            "connections",
            "Open agent-socket connections: idle, busy (a request in flight), refusing (over the uid's cap, being answered 429)",
            connections.clone(),
        );
        for s in ["idle", "busy", "refusing"] {
            let _ = connections.get_or_create(&StateLabel { state: s });
        }
        let cache_entries = Gauge::default();
        r.register("cache_entries", "Secrets in the cache", cache_entries.clone());
        let cache_stale = Gauge::default();
        r.register(
            "cache_stale_entries",
            "Cached secrets served stale now (refresh failing or overdue)",
            cache_stale.clone(),
        );
        let vault_calls = Family::<VaultCallLabels, Counter>::default();
        r.register("vault_calls", "Vault fetches by vault and how they ended", vault_calls.clone());
        let vault_latency =
            Family::<VaultLabel, Histogram, fn() -> Histogram>::new_with_constructor(vault_histogram);
        r.register(
            "vault_call_duration_seconds",
            "Vault fetch latency, retries included",
            vault_latency.clone(),
        );
        let vault_since_success = Family::<VaultLabel, Gauge<f64, AtomicU64>>::default();
        r.register(
            "vault_seconds_since_success",
            "Seconds since the vault last answered a fetch (since the agent started, if never)",
            vault_since_success.clone(),
        );
        let vault_failing = Family::<VaultLabel, Gauge<f64, AtomicU64>>::default();
        r.register(
            "vault_failing_seconds",
            "Seconds the vault's fetches have been failing without a success; 0 when the last one worked",
            vault_failing.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        r.register(
            "token_acquisitions",
            "Access tokens obtained from the identity endpoint, by source and result",
            tokens.clone(),
        );
        let audit_records = Counter::default();
        r.register("audit_records", "Audit records written", audit_records.clone());
        let audit_bytes = Counter::default();
        r.register("audit_bytes", "Bytes written to the audit log", audit_bytes.clone());
        let audit_seconds = Histogram::new(AUDIT_BUCKETS);
        r.register(
            "audit_write_duration_seconds",
            "Time to write (and fsync, in fsync mode) one batch of audit records",
            audit_seconds.clone(),
        );
        let audit_failures = Counter::default();
        r.register(
            "audit_write_failures",
            "Audit writes that failed or timed out (each failed its request closed with 503)",
            audit_failures.clone(),
        );
        r.register("build", "The agent's version", Info::new([("version", env!("CARGO_PKG_VERSION"))]));
        let secret_reads = Family::<SecretLabels, Counter>::default();
        r.register(
            "secret_reads_by_name",
            "Allowed reads per secret (only with [metrics] per_secret = true)",
            secret_reads.clone(),
        );
        let exec_events_active = Gauge::default();
        r.register(
            "exec_events_active",
            "1 while the kernel's exec/exit events (proc connector) vouch for kept-alive callers, else 0",
            exec_events_active.clone(),
        );
        let exec_events_lost = Counter::default();
        r.register(
            "exec_events_lost",
            "Times the proc connector dropped events (each makes every kept-alive caller be re-checked once)",
            exec_events_lost.clone(),
        );
        let peer_rechecks = Counter::default();
        r.register(
            "peer_rechecks",
            "Requests on a kept-alive connection whose caller was re-checked through /proc and its pidfd \
             (no exec/exit event watch vouched for it)",
            peer_rechecks.clone(),
        );
        Self {
            registry: r,
            epoch: Instant::now(),
            reads,
            read_errors,
            denials,
            limited,
            conns_served: Gauge::default(),
            conns_busy: Gauge::default(),
            conns_refusing: Gauge::default(),
            connections,
            cache_entries,
            cache_stale,
            vault_calls,
            vault_latency,
            vault_since_success,
            vault_failing,
            vaults: RwLock::new(HashMap::new()),
            tokens,
            audit_records,
            audit_bytes,
            audit_seconds,
            audit_failures,
            per_secret: AtomicBool::new(false),
            secret_reads,
            exec_events_active,
            exec_events_lost,
            peer_rechecks,
        }
    }

    /// `[metrics] per_secret`: count allowed reads per secret name too.
    pub(crate) fn set_per_secret(&self, on: bool) {
        self.per_secret.store(on, Ordering::Relaxed);
    }

    /// One secret read, with how it ended and (for an error) its code.
    pub(crate) fn read(&self, outcome: ReadOutcome, cache: CacheUse, code: Option<ErrorCode>) {
        self.reads[outcome as usize][cache as usize].inc();
        if let Some(code) = code
            && let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code)
        {
            self.read_errors[i].inc();
        }
    }

    /// An allowed read of `vault/secret`, when `per_secret` is on. `secret` is the name as the
    /// vault spells it (a secret that exists), never the caller's spelling.
    pub(crate) fn read_of(&self, vault: &str, secret: &str) {
        if self.per_secret.load(Ordering::Relaxed) {
            let labels = SecretLabels { vault: vault.to_owned(), secret: secret.to_ascii_lowercase() };
            self.secret_reads.get_or_create(&labels).inc();
        }
    }

    pub(crate) fn denied(&self, why: DenyReason) {
        self.denials[why as usize].inc();
    }

    pub(crate) fn limited(&self, by: Limit) {
        self.limited[by as usize].inc();
    }

    /// A connection of the agent socket opened (`refusing`: being answered 429); `closed`
    /// undoes it.
    pub(crate) fn conn_opened(&self, refusing: bool) {
        if refusing { &self.conns_refusing } else { &self.conns_served }.inc();
    }

    pub(crate) fn conn_closed(&self, refusing: bool) {
        if refusing { &self.conns_refusing } else { &self.conns_served }.dec();
    }

    /// A request started (`true`) or finished on a served connection.
    pub(crate) fn busy(&self, started: bool) {
        if started {
            self.conns_busy.inc();
        } else {
            self.conns_busy.dec();
        }
    }

    /// Makes `alias`'s series exist (at 0) from startup, before its first call.
    pub(crate) fn register_vault(&self, alias: &str) {
        self.vault(alias);
    }

    fn vault(&self, alias: &str) -> Arc<VaultStats> {
        if let Some(v) = self.vaults.read().unwrap_or_else(PoisonError::into_inner).get(alias) {
            return Arc::clone(v);
        }
        let mut vaults = self.vaults.write().unwrap_or_else(PoisonError::into_inner);
        let stats = vaults.entry(alias.to_owned()).or_insert_with(|| {
            let calls = VaultStatus::ALL.map(|s| {
                let labels = VaultCallLabels { vault: alias.to_owned(), status: s.as_str() };
                self.vault_calls.get_or_create(&labels).clone()
            });
            let latency = self.vault_latency.get_or_create(&VaultLabel { vault: alias.to_owned() }).clone();
            Arc::new(VaultStats {
                calls,
                latency,
                last_success: AtomicU64::new(0),
                failing_since: AtomicU64::new(0),
                last_attempt: AtomicU64::new(0),
            })
        });
        Arc::clone(stats)
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1).saturating_add(1)
    }

    fn since_mark(&self, mark: u64) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(mark.saturating_sub(1)))
    }

    /// A vault fetch that took `took` and ended with `status`. Only `Unavailable` counts as
    /// the vault failing: a 404 or a disabled secret is the vault answering.
    pub(crate) fn vault_call(&self, alias: &str, status: VaultStatus, took: Duration) {
        let v = self.vault(alias);
        v.calls[status as usize].inc();
        v.latency.observe(took.as_secs_f64());
        v.last_attempt.store(self.now_mark(), Ordering::Relaxed);
        if status == VaultStatus::Unavailable {
            let _ = v.failing_since.compare_exchange(0, self.now_mark(), Ordering::AcqRel, Ordering::Relaxed);
        } else {
            v.last_success.store(self.now_mark(), Ordering::Relaxed);
            v.failing_since.store(0, Ordering::Relaxed);
        }
    }

    /// Vaults whose fetches have failed, with no success, for at least `limit`.
    pub(crate) fn vaults_failing_for(&self, limit: Duration) -> Vec<FailingVault> {
        let vaults = self.vaults.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = vaults
            .iter()
            .filter_map(|(alias, v)| match v.failing_since.load(Ordering::Relaxed) {
                0 => None,
                mark => Some(FailingVault {
                    vault: alias.clone(),
                    failing_for: self.since_mark(mark),
                    last_attempt: self.since_mark(v.last_attempt.load(Ordering::Relaxed)),
                }),
            })
            .filter(|f| f.failing_for >= limit)
            .collect();
        out.sort();
        out
    }

    /// A token request to the identity endpoint of `source` (an `[identity] source` name).
    pub(crate) fn token(&self, source: &'static str, ok: bool) {
        let labels = TokenLabels { source, result: if ok { "ok" } else { "error" } };
        self.tokens.get_or_create(&labels).inc();
    }

    /// A batch of `records` audit records, `bytes` long, written in `took`.
    pub(crate) fn audit_written(&self, records: u64, bytes: usize, took: Duration) {
        self.audit_records.inc_by(records);
        self.audit_bytes.inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
        self.audit_seconds.observe(took.as_secs_f64());
    }

    /// Whether the kernel's exec/exit events are in use.
    pub(crate) fn exec_events_active(&self, on: bool) {
        self.exec_events_active.set(i64::from(on));
    }

    pub(crate) fn exec_events_lost(&self) {
        self.exec_events_lost.inc();
    }

    /// A kept-alive connection's caller re-checked through `/proc` and its pidfd.
    pub(crate) fn peer_recheck(&self) {
        self.peer_rechecks.inc();
    }

    pub(crate) fn audit_failed(&self) {
        self.audit_failures.inc();
    }

    /// The OpenMetrics text of every metric, with the gauges read from `snap` now.
    pub(crate) fn render(&self, snap: Snapshot) -> String {
        self.cache_entries.set(gauge(snap.cache_entries));
        self.cache_stale.set(gauge(snap.stale_entries));
        let (served, busy) = (self.conns_served.get(), self.conns_busy.get());
        self.connections.get_or_create(&StateLabel { state: "busy" }).set(busy);
        self.connections.get_or_create(&StateLabel { state: "idle" }).set((served - busy).max(0));
        self.connections.get_or_create(&StateLabel { state: "refusing" }).set(self.conns_refusing.get());
        for (alias, v) in self.vaults.read().unwrap_or_else(PoisonError::into_inner).iter() {
            let label = VaultLabel { vault: alias.clone() };
            let since = match v.last_success.load(Ordering::Relaxed) {
                0 => self.epoch.elapsed(),
                mark => self.since_mark(mark),
            };
            self.vault_since_success.get_or_create(&label).set(since.as_secs_f64());
            let failing = match v.failing_since.load(Ordering::Relaxed) {
                0 => Duration::ZERO,
                mark => self.since_mark(mark),
            };
            self.vault_failing.get_or_create(&label).set(failing.as_secs_f64());
        }
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests;
