//! Refused reads, without letting one caller flood the log.
//!
//! Every allowed read has its own record (written before the answer, fail-closed). A refusal
//! (denied, not found, bad request, 429 …) is written as its own record too while its uid
//! has budget left: a token bucket of [`PER_SECOND`] records a second with a burst of
//! [`BURST`]. Past that, refusals are counted instead, per (uid, pid, outcome, error,
//! reason, secret), and once a second each count becomes one summary record with `count`,
//! so every refused request is still accounted for while the bytes a uid can add to the log
//! per second stay bounded. A uid gets at most [`KINDS_PER_UID`] distinct summaries a
//! second; refusals of any further kind go into one catch-all summary of that uid.
//!
//! Never holds a value: records carry names and reasons only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvbroker_proto::{AuditRecord, ErrorCode, Outcome};

use super::{AuditError, Auditor};
use crate::rate::TokenBucket;

/// Individual refusal records a second, per uid, sustained.
pub(crate) const PER_SECOND: u32 = 20;
/// Individual refusal records a uid may cause at once.
pub(crate) const BURST: u32 = 200;
/// Distinct summaries a uid may have in one second; more kinds share one catch-all.
pub(crate) const KINDS_PER_UID: usize = 16;
/// How often counted refusals are written as summaries.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Refusals {
    auditor: Arc<Auditor>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    buckets: HashMap<u32, TokenBucket>,
    /// Counted refusals per uid since the last summary.
    pending: HashMap<u32, Pending>,
}

#[derive(Default)]
struct Pending {
    kinds: HashMap<Kind, (AuditRecord, u64)>,
    /// Refusals past `KINDS_PER_UID` distinct kinds: the first of them, and how many.
    other: Option<(AuditRecord, u64)>,
}

#[derive(PartialEq, Eq, Hash)]
struct Kind {
    pid: u32,
    outcome: Option<Outcome>,
    error: Option<ErrorCode>,
    reason: Option<String>,
    secret: Option<(String, String, Option<String>)>,
}

impl Kind {
    fn of(r: &AuditRecord) -> Self {
        Self {
            pid: r.peer.as_ref().map_or(0, |p| p.pid),
            outcome: r.outcome,
            error: r.error,
            reason: r.reason.clone(),
            secret: r.secret.as_ref().map(|s| (s.vault.clone(), s.name.clone(), s.version.clone())),
        }
    }
}

impl Refusals {
    pub(crate) fn new(auditor: Arc<Auditor>) -> Arc<Self> {
        Arc::new(Self { auditor, inner: Mutex::new(Inner::default()) })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a refused read's record, or counts it for the next summary when its uid is
    /// over budget. `Ok(true)`: written now; `Ok(false)`: counted.
    pub(crate) async fn record(&self, rec: AuditRecord) -> Result<bool, AuditError> {
        let uid = rec.peer.as_ref().map_or(u32::MAX, |p| p.uid);
        let now = Instant::now();
        {
            let mut inner = self.inner();
            if inner.buckets.len() > 65_536 {
                inner.buckets.retain(|_, b| now.duration_since(b.last_used()) < Duration::from_secs(60));
            }
            let bucket =
                inner.buckets.entry(uid).or_insert_with(|| TokenBucket::full(PER_SECOND, BURST, now));
            if bucket.try_take(now).is_err() {
                let pending = inner.pending.entry(uid).or_default();
                let kind = Kind::of(&rec);
                if let Some((_, n)) = pending.kinds.get_mut(&kind) {
                    *n += 1;
                } else if pending.kinds.len() < KINDS_PER_UID {
                    pending.kinds.insert(kind, (rec, 1));
                } else {
                    pending.other.get_or_insert((rec, 0)).1 += 1;
                }
                return Ok(false);
            }
        }
        self.auditor.append(rec).await.map(|_| true)
    }

    /// Writes every count as a summary record. A summary that cannot be written is kept
    /// and retried at the next flush, so no refusal goes unaccounted.
    pub(crate) async fn flush(&self) {
        let pending = std::mem::take(&mut self.inner().pending);
        let mut failed = Vec::new();
        for (uid, p) in pending {
            let kinds = p.kinds.into_values().map(|(r, n)| (r, n, false));
            for (first, n, other) in kinds.chain(p.other.map(|(r, n)| (r, n, true))) {
                let rec = summary(&first, n, other);
                if let Err(e) = self.auditor.append(rec).await {
                    tracing::error!(error = %e, uid, count = n, "cannot write a refusal summary; will retry");
                    failed.push((uid, first, n, other));
                }
            }
        }
        if !failed.is_empty() {
            let mut inner = self.inner();
            for (uid, first, n, other) in failed {
                let p = inner.pending.entry(uid).or_default();
                if other {
                    p.other.get_or_insert((first, 0)).1 += n;
                } else {
                    p.kinds.entry(Kind::of(&first)).or_insert((first, 0)).1 += n;
                }
            }
        }
    }

    /// Writes summaries every [`SUMMARY_EVERY`], forever (run supervised).
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SUMMARY_EVERY).await;
            self.flush().await;
        }
    }
}

/// The summary of `n` refusals like `first`.
fn summary(first: &AuditRecord, n: u64, other: bool) -> AuditRecord {
    let mut rec = first.clone();
    rec.seq = 0;
    rec.request_id = None;
    rec.count = Some(n);
    if other {
        rec.secret = None;
        rec.error = None;
        rec.reason = Some(format!(
            "refusals of more than {KINDS_PER_UID} kinds in one second; the first: {}",
            first.reason.as_deref().unwrap_or("no reason")
        ));
    }
    rec
}

#[cfg(test)]
mod tests {
    use kvbroker_proto::{Event, PeerInfo, SecretRef};

    use super::*;
    use crate::config::AuditConfig;

    fn refusal(uid: u32, secret: &str) -> AuditRecord {
        let mut r = AuditRecord::new(Event::SecretRead);
        r.outcome = Some(Outcome::Denied);
        r.error = Some(ErrorCode::PermissionDenied);
        r.reason = Some("no rule matches".into());
        r.peer = Some(PeerInfo { pid: 42, uid, gid: uid, ..PeerInfo::default() });
        r.secret = Some(SecretRef {
            vault: "default".into(),
            name: secret.into(),
            version: None,
            previous_version: None,
        });
        r
    }

    /// Issue 13: one uid making refused requests wrote one record each and pushed earlier
    /// records out of every kept file. Past its budget, refusals become per-kind summaries:
    /// few records, and their counts add up to every refused request.
    #[tokio::test]
    async fn refusals_past_the_budget_are_summarized_and_all_counted() {
        let dir = std::env::temp_dir().join(format!("kvb-refusals-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = AuditConfig::for_tests(dir.join("audit.jsonl"));
        let (auditor, _) = Auditor::open(&cfg).unwrap();
        let refusals = Refusals::new(Arc::new(auditor));
        let total = 5_000u64;
        let mut written = 0;
        for i in 0..total {
            // Two common kinds, and a tail of 40 distinct names (more than KINDS_PER_UID).
            let name = if i % 100 < 60 { format!("n{}", i % 2) } else { format!("x{}", i % 40) };
            written += u64::from(refusals.record(refusal(1000, &name)).await.unwrap());
        }
        assert!(refusals.record(refusal(2000, "other-uid")).await.unwrap(), "another uid has its own budget");
        refusals.flush().await;
        let text = std::fs::read_to_string(&cfg.path).unwrap();
        let recs: Vec<AuditRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let mine: Vec<&AuditRecord> = recs.iter().filter(|r| r.peer.as_ref().unwrap().uid == 1000).collect();
        let counted: u64 = mine.iter().map(|r| r.count.unwrap_or(1)).sum();
        assert_eq!(counted, total);
        let summaries = mine.iter().filter(|r| r.count.is_some()).count();
        assert!(written >= u64::from(BURST) && written < u64::from(BURST) + 50, "{written}");
        assert!(summaries <= KINDS_PER_UID + 1, "{summaries}");
        assert_eq!(mine.len() as u64, written + summaries as u64);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
