//! Request handling: route, attest, decide, fetch, audit, answer — in that order. The audit
//! record is written before the answer leaves; if it cannot be, the answer is 503.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Response, header};
use kvbroker_proto::{
    AuditRecord, CacheState, Event, Outcome, SecretName, SecretQuery, SecretRef, Upstream, VaultAlias,
    VersionId,
};

use super::Head;
use super::response::{self, Body, DeniedRead, Failure, Served};
use crate::audit::record::{PeerOut, PeerView, ReadRecord, SecretView};
use crate::config::{RateKey, UnknownVault};
use crate::gather;
use crate::kube::PodLookup;
use crate::metrics::{self, CacheUse, DenyReason, Limit, ReadOutcome};
use crate::peer::{ConnPeer, PeerError, PeerFacts};
use crate::policy::Decision;
use crate::state::State;
use crate::vault::{Fetched, VaultError};

pub(crate) async fn handle<R: Head + Sync>(
    ctx: &State,
    peer: &ConnPeer,
    over_cap: bool,
    req: &R,
) -> Response<Body> {
    let request_id = RequestId::new();
    let request_id = request_id.as_str();
    let path = req.path();
    tracing::trace!(request_id, method = %req.method(), path, "request");
    let r = if path == "/v1/health" {
        if over_cap {
            // Health counts like any request: a caller over its connection cap cannot use
            // health polls to hold connections either.
            metrics::get().limited(Limit::Connections);
            response::failure(&over_cap_failure(peer.uid), request_id)
        } else if req.method() == Method::GET {
            match req.query() {
                None | Some("") => response::health(ctx.health_reasons()),
                Some("ready" | "ready=1" | "ready=true") => response::readiness(ctx.readiness()),
                Some(_) => response::failure(
                    &Failure::BadRequest("/v1/health takes no parameter but ready (/v1/health?ready)".into()),
                    request_id,
                ),
            }
        } else {
            response::failure(&Failure::Method, request_id)
        }
    } else if let Some(name) = path.strip_prefix("/v1/secrets/") {
        if req.method() != Method::GET {
            response::failure(&Failure::Method, request_id)
        } else {
            read_secret(ctx, peer, over_cap, req, name, request_id).await
        }
    } else {
        response::failure(&Failure::NoRoute, request_id)
    };
    let mut r = response::finish(r, request_id);
    if over_cap {
        // Answered, then closed: an over-cap connection is never kept open.
        r.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    r
}

/// The answer to a request head that cannot be parsed (the plain path's; `why` is the
/// parser's reason): `400 InvalidRequest` with its request id, and the connection closed.
/// No decision was made, so there is no audit record (as for an unknown path).
pub(crate) fn malformed(why: &str) -> Response<Body> {
    let request_id = RequestId::new();
    let request_id = request_id.as_str();
    tracing::debug!(request_id, why, "malformed request head: answered 400 and closed");
    let failure = Failure::BadRequest(format!(
        "the request head is not valid HTTP/1.1 ({why}): send a well-formed request"
    ));
    let mut r = response::finish(response::failure(&failure, request_id), request_id);
    r.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    r
}

fn over_cap_failure(uid: u32) -> Failure {
    Failure::TooMany {
        retry_after: Duration::from_secs(1),
        by: Limit::Connections,
        reason: format!(
            "uid {uid} has too many open connections to the agent, all busy: close some, or reuse one"
        ),
    }
}

/// 32 lowercase hex digits (a v4 UUID without hyphens), as in SPEC's examples. Its bits come
/// from the thread's fast generator, not the OS: a request id names, it does not protect, and
/// `getrandom` on every request was a syscall on the hot path. Kept on the stack.
struct RequestId([u8; 32]);

impl RequestId {
    fn new() -> Self {
        let mut buf = [0u8; 32];
        uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
            .into_uuid()
            .simple()
            .encode_lower(&mut buf);
        Self(buf)
    }

    fn as_str(&self) -> &str {
        // Hex digits only.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

async fn read_secret<R: Head + Sync>(
    ctx: &State,
    peer: &ConnPeer,
    over_cap: bool,
    req: &R,
    raw_name: &str,
    request_id: &str,
) -> Response<Body> {
    let mut log = ReadLog::default();
    let mut progress = gather::InProgress::begin();
    let result = decide_and_fetch(ctx, peer, over_cap, req, raw_name, &mut log, &mut progress).await;
    let raw = req.wants_raw();
    let mut cache_use = CacheUse::None;
    let answer = result.and_then(|served| match served {
        Some(served) => {
            if let Some(mask) = &ctx.mask {
                // Before the answer exists: no output can hold the value before the masker
                // knows it.
                response::teach_mask(mask, &served);
            }
            let r = response::secret(&served, raw)?;
            log.cache = Some(served.state);
            cache_use = match served.state {
                CacheState::Hit => CacheUse::Hit,
                CacheState::Miss => CacheUse::Miss,
                CacheState::Stale => CacheUse::Stale,
                _ => CacheUse::None,
            };
            metrics::get().read_of(served.vault.as_str(), served.fetched.name.as_str());
            Ok(r)
        }
        None => {
            log.not_modified = true;
            Ok(response::not_modified())
        }
    });
    tracing::debug!(
        request_id,
        outcome = match &answer {
            Ok(_) => Outcome::Allowed.as_str(),
            Err(f) => refused_outcome(f).as_str(),
        },
        uid = log.facts.as_ref().map_or(peer.uid, |f| f.uid),
        secret = log.name().unwrap_or(""),
        "secret read decided"
    );
    // An allowed read always has its own record — written from borrowed parts, straight into
    // the audit writer's buffer; refusals do while the uid has budget, and are counted into
    // a summary past it (audit::refusals).
    let written = match &answer {
        Ok(_) => {
            let conn_info;
            let peer_out = match &log.facts {
                // A caller's facts are the same at each read of its connection (a change
                // refuses the read): serialized once, at the first. A pod's details come
                // from the kubelet and may change: those are written each time.
                Some(f) => match &log.pod {
                    PodLookup::Found(_) => PeerOut::View(peer_view(f, &log.pod)),
                    _ => peer_json(f).map_or_else(|| PeerOut::View(peer_view(f, &log.pod)), PeerOut::Json),
                },
                // Cannot happen (an allowed read has facts); record the connection's then.
                None => {
                    conn_info = peer.info();
                    PeerOut::View(PeerView::of_info(&conn_info))
                }
            };
            let rec = log.allowed(request_id, peer_out);
            ctx.auditor.append_fields(&rec, progress.others()).await.map(|_| ())
        }
        Err(f) => {
            count_refusal(f);
            ctx.refusals.record(log.refused(peer, request_id, f)).await.map(|_| ())
        }
    };
    if let Err(e) = written {
        tracing::error!(error = %e, request_id, "audit write failed: answering 503");
        metrics::get().read(ReadOutcome::Error, CacheUse::None, Some(Failure::Audit.code()));
        return response::failure(&Failure::Audit, request_id);
    }
    match &answer {
        Ok(_) => metrics::get().read(ReadOutcome::Allowed, cache_use, None),
        Err(f @ (Failure::Denied { .. } | Failure::Reconnect { .. })) => {
            metrics::get().read(ReadOutcome::Denied, CacheUse::None, Some(f.code()));
        }
        Err(f) => metrics::get().read(ReadOutcome::Error, CacheUse::None, Some(f.code())),
    }
    match answer {
        Ok(r) => r,
        Err(f) => response::failure(&f, request_id),
    }
}

/// The reason an allowed read's record gives for a long poll that ended with nothing new.
const NOT_MODIFIED: &str = "not modified (long poll ended with no new version)";

/// What a read's audit record will say, gathered as the request goes. Names and facts are
/// kept as they are (the caller's facts shared with its connection), so an allowed read's
/// record borrows them ([`ReadLog::allowed`]) instead of copying each into a `String`; a
/// refusal's record is built from them ([`ReadLog::refused`]).
struct ReadLog<'a> {
    /// The caller's facts, once established, and its pod if a rule needed it.
    facts: Option<Arc<PeerFacts>>,
    pod: PodLookup,
    /// The secret asked for, once the request named one: vault, name and version as asked.
    /// The vault alias is the configuration's own (`State` outlives the request).
    asked: Option<(&'a VaultAlias, SecretName, Option<VersionId>)>,
    /// The version found, once found (its name as the vault spells it).
    fetched: Option<Arc<Fetched>>,
    rule: Option<Arc<str>>,
    cache: Option<CacheState>,
    not_modified: bool,
    upstream_request_id: Option<String>,
    upstream: Option<Upstream>,
}

impl Default for ReadLog<'_> {
    fn default() -> Self {
        Self {
            facts: None,
            pod: PodLookup::NotAsked,
            asked: None,
            fetched: None,
            rule: None,
            cache: None,
            not_modified: false,
            upstream_request_id: None,
            upstream: None,
        }
    }
}

impl ReadLog<'_> {
    /// The secret's name as the record gives it: as the vault spells it once found.
    fn name(&self) -> Option<&str> {
        match (&self.fetched, &self.asked) {
            (Some(f), Some(_)) => Some(f.name.as_str()),
            (_, Some((_, name, _))) => Some(name.as_str()),
            _ => None,
        }
    }

    fn secret_view(&self) -> Option<SecretView<'_>> {
        let (vault, name, version) = self.asked.as_ref()?;
        Some(match &self.fetched {
            Some(f) => {
                SecretView { vault: vault.as_str(), name: f.name.as_str(), version: Some(f.version.as_str()) }
            }
            None => SecretView {
                vault: vault.as_str(),
                name: name.as_str(),
                version: version.as_ref().map(VersionId::as_str),
            },
        })
    }

    /// The record of an allowed read, borrowing everything.
    fn allowed<'a>(&'a self, request_id: &'a str, peer: PeerOut<'a>) -> ReadRecord<'a> {
        ReadRecord {
            event: Event::SecretRead,
            outcome: Some(Outcome::Allowed),
            request_id: Some(request_id),
            peer: Some(peer),
            secret: self.secret_view(),
            rule: self.rule.as_deref(),
            reason: self.not_modified.then_some(NOT_MODIFIED),
            cache: self.cache,
            upstream_request_id: self.upstream_request_id.as_deref(),
        }
    }

    /// The record of a refused read.
    fn refused(self, conn: &ConnPeer, request_id: &str, f: &Failure) -> AuditRecord {
        let mut rec = AuditRecord::new(Event::SecretRead);
        rec.request_id = Some(request_id.to_owned());
        rec.peer = Some(match &self.facts {
            Some(facts) => {
                // Facts the decision computed (an exe hash, the pod) are recorded too.
                let mut info = facts.info();
                self.pod.annotate(&mut info);
                info
            }
            // Refused before the caller's facts were established: who connected and wrote.
            None => conn.info(),
        });
        rec.secret = self.secret_view().map(|s| SecretRef {
            vault: s.vault.to_owned(),
            name: s.name.to_owned(),
            version: s.version.map(str::to_owned),
            previous_version: None,
        });
        rec.rule = self.rule.as_deref().map(str::to_owned);
        rec.cache = self.cache;
        rec.upstream_request_id = self.upstream_request_id;
        rec.upstream = self.upstream;
        rec.outcome = Some(refused_outcome(f));
        rec.error = Some(f.code());
        rec.reason = Some(match f {
            Failure::Denied { reason, .. } | Failure::Reconnect { reason } => reason.clone(),
            other => other.message(),
        });
        rec
    }
}

/// A refused read is `denied` when the policy or the caller's facts refused it, else `error`.
fn refused_outcome(f: &Failure) -> Outcome {
    if matches!(f, Failure::Denied { .. } | Failure::Reconnect { .. }) {
        Outcome::Denied
    } else {
        Outcome::Error
    }
}

/// The audit record's view of the caller: its facts and, if looked up, its pod (what
/// [`PeerFacts::info`] and [`PodLookup::annotate`] make, borrowed).
/// The record's `peer` for facts without a pod's details, serialized once per facts (per
/// connection) and per whether `exe_sha256` has been computed. `None` if it cannot be
/// serialized (plain data: not expected), and the borrowed view is written instead.
fn peer_json(f: &PeerFacts) -> Option<&serde_json::value::RawValue> {
    let slot = &f.audit_json[usize::from(f.exe_sha256_if_computed().is_some())];
    if let Some(json) = slot.get() {
        return Some(json);
    }
    let json = serde_json::value::to_raw_value(&peer_view(f, &PodLookup::NotAsked)).ok()?;
    Some(slot.get_or_init(|| json))
}

fn peer_view<'a>(f: &'a PeerFacts, pod: &'a PodLookup) -> PeerView<'a> {
    let mut v = PeerView {
        pid: f.pid,
        uid: f.uid,
        gid: f.gid,
        groups: &f.groups,
        exe: f.exe.as_deref(),
        exe_unverified: f.exe_unverified.as_deref(),
        connected_pid: f.connected_pid,
        exe_sha256: f.exe_sha256_if_computed(),
        cgroup: f.cgroup.as_deref(),
        unit: f.systemd_unit(),
        container_id: f.container_id(),
        k8s_pod_uid: f.pod_uid(),
        ..PeerView::default()
    };
    if let PodLookup::Found(p) = pod {
        v.k8s_namespace = Some(&p.namespace);
        v.k8s_service_account = Some(&p.service_account);
        v.k8s_pod_name = Some(&p.name);
        v.k8s_container_name = v.container_id.and_then(|id| p.container(id)).map(|c| c.name.as_str());
    }
    v
}

/// Counts a refused read's denial reason or limit (its outcome is counted once audited).
fn count_refusal(f: &Failure) {
    match f {
        Failure::Denied { why, .. } => metrics::get().denied(*why),
        Failure::Reconnect { .. } => metrics::get().denied(DenyReason::PeerChanged),
        Failure::TooMany { by, .. } => metrics::get().limited(*by),
        _ => {}
    }
}

/// Everything up to the answer, filling in the audit record as facts become known.
/// `Ok(None)`: a long poll that ended with no new version (304).
async fn decide_and_fetch<'a, R: Head + Sync>(
    ctx: &'a State,
    peer: &ConnPeer,
    over_cap: bool,
    req: &R,
    raw_name: &str,
    log: &mut ReadLog<'a>,
    progress: &mut gather::InProgress,
) -> Result<Option<Served<'a>>, Failure> {
    if req.has_body() {
        return Err(Failure::BodyTooLarge);
    }
    let name: SecretName = raw_name.parse().map_err(|e| Failure::BadRequest(format!("{e}")))?;
    let query =
        SecretQuery::parse(req.query().unwrap_or("")).map_err(|e| Failure::BadRequest(e.to_string()))?;
    if query.changed_from.is_some() && query.version.is_some() {
        return Err(Failure::BadRequest(
            "version and changed_from cannot be combined: a pinned version never changes".into(),
        ));
    }
    let vault = ctx.cache.vaults().resolve(query.vault.as_ref()).ok_or_else(|| {
        let unknown = match &query.vault {
            Some(v) => UnknownVault::Alias(v.clone()),
            None => UnknownVault::NoDefault,
        };
        Failure::BadRequest(unknown.to_string())
    })?;
    // The record's copy of the name is the one the rest of the read uses: no copy per read.
    let name = &log.asked.insert((vault, name, query.version.clone())).1;

    if over_cap {
        return Err(over_cap_failure(peer.uid));
    }
    // `who` is formatted only for a caller over its limit.
    let limited = |key: &str, who: &dyn std::fmt::Display| {
        ctx.limits.take(key).map_err(|retry_after| Failure::TooMany {
            retry_after,
            by: Limit::Rate,
            reason: format!("{who} is over its read rate limit; retry after the Retry-After seconds"),
        })
    };
    if ctx.limits.key() == RateKey::Uid {
        let mut key = [0u8; 20];
        limited(decimal(u64::from(peer.uid), &mut key), &format_args!("uid {}", peer.uid))?;
    }

    let policy = ctx.policy();
    if progress.others() && crate::peer::events::global().is_some_and(|s| s.active()) {
        // Let the requests on their way reach this point too: the first of them to check
        // its caller drains the exec/exit event queue once for all (`peer::events`).
        gather::StepAside::new().await;
    }
    let facts = peer.facts(policy.uses_cgroup()).map_err(|e| match e {
        PeerError::ExeChanged
        | PeerError::CgroupChanged
        | PeerError::IdsChanged
        | PeerError::SecondWriter { .. } => Failure::Reconnect { reason: e.to_string() },
        e => Failure::Denied { reason: e.to_string(), caller: None, why: DenyReason::Unattested },
    })?;
    log.facts = Some(Arc::clone(&facts));
    if let Some(root) = &ctx.launch_root {
        match root.get() {
            Some((pid, start)) if facts.descends_from(*pid, *start) => {}
            Some(_) => {
                return Err(Failure::Denied {
                    reason: "not the launched command or one of its descendants".into(),
                    caller: None,
                    why: DenyReason::NotLaunched,
                });
            }
            None => {
                return Err(Failure::Denied {
                    reason: "the launched command has not started yet".into(),
                    caller: None,
                    why: DenyReason::NotLaunched,
                });
            }
        }
    }
    let mut decision = policy.decide_with(&facts, &log.pod, vault.as_str(), name.key());
    if decision == Decision::NeedPod {
        // Only now, and only for a pod caller: rules without k8s selectors never wait.
        log.pod = match (&ctx.kube, facts.pod_uid()) {
            (Some(kube), Some(uid)) => progress.unless_waiting(kube.lookup(uid)).await,
            _ => PodLookup::Unavailable("no [kubernetes] section in the agent config".into()),
        };
        decision = policy.decide_with(&facts, &log.pod, vault.as_str(), name.key());
    }
    // The record takes the caller's facts as they are when it is written: with what the
    // decision computed (the exe hash) and the pod, for denials too.
    match decision {
        Decision::Allow { rule } => {
            if ctx.limits.key() == RateKey::Rule {
                limited(&rule, &format_args!("rule {rule:?}"))?;
            }
            log.rule = Some(rule);
        }
        Decision::NeedPod => {
            // Decided again with the pod: a second NeedPod cannot happen. Fail closed.
            return Err(Failure::Kubelet("the caller's pod could not be looked up".into()));
        }
        Decision::KubeletUnavailable { reason } => {
            return Err(Failure::Kubelet(reason));
        }
        Decision::Deny { reason } if facts.pod_uid().is_some() && matches!(log.pod, PodLookup::NotFound) => {
            return Err(Failure::Denied { reason, caller: None, why: DenyReason::Policy });
        }
        Decision::Deny { reason } => {
            let caller = DeniedRead {
                uid: facts.uid,
                gid: facts.gid,
                groups: facts.groups.clone(),
                exe: facts.exe.clone(),
                cgroup: facts.cgroup.clone(),
                vault: vault.clone(),
                name: name.clone(),
            };
            return Err(Failure::Denied { reason, caller: Some(Box::new(caller)), why: DenyReason::Policy });
        }
    }

    let looked_up = match (&query.changed_from, query.wait) {
        (Some(from), Some(wait)) => {
            let wait = Duration::from_secs(u64::from(wait));
            // A stop answers open long polls at once (503, Retry-After) instead of holding
            // the drain for up to `shutdown_grace`; the watcher reconnects to the next agent.
            // Waiting, it is no longer on its way: others do not wait for it.
            progress.leave();
            tokio::select! {
                r = ctx.cache.wait_change(vault, name, from, wait) => r,
                () = ctx.stopping() => return Err(Failure::Stopping),
            }
        }
        // A hit is ready at once; a miss waits for Key Vault, and leaves the gathering.
        _ => progress.unless_waiting(ctx.cache.get(vault, name, query.version.as_ref())).await.map(Some),
    };
    let looked_up = match looked_up {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(e) => {
            log.upstream_request_id = e.upstream_request_id().map(str::to_owned);
            log.upstream = e.upstream().cloned();
            return Err(match (e, &query.version) {
                (VaultError::NotFound { .. }, Some(version)) => Failure::VersionNotFound {
                    vault: vault.clone(),
                    name: name.clone(),
                    version: version.clone(),
                },
                (e, _) => Failure::Vault(e),
            });
        }
    };
    let fetched = looked_up.fetched;
    if looked_up.state == CacheState::Miss {
        log.upstream_request_id = fetched.upstream_request_id.as_deref().map(str::to_owned);
    }
    log.fetched = Some(Arc::clone(&fetched));
    check_usable(&fetched, vault)?;
    Ok(Some(Served { vault, fetched, state: looked_up.state }))
}

/// `n` in decimal, in `buf` (a rate-limit key, an answer's length: no allocation).
pub(super) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// `enabled`, `nbf` and `exp`, enforced by the agent: Key Vault returns expired secrets.
fn check_usable(f: &Fetched, vault: &VaultAlias) -> Result<(), Failure> {
    match f.unusable(SystemTime::now) {
        Some(w) => Err(Failure::NotUsable(format!("secret {} in vault {vault} is not usable: {w}", f.name))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_lowercase_hex_and_fresh() {
        let id = RequestId::new();
        let id = id.as_str();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        assert_ne!(RequestId::new().as_str(), id);
    }

    #[test]
    fn decimal_keys_match_to_string() {
        for n in [0, 7, 10, 1000, 65_534, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string());
        }
    }

    /// The allowed read's borrowed view of the caller writes what `PeerFacts::info` (the
    /// refusal's record) writes, so both kinds of record describe a caller the same way.
    #[test]
    fn peer_json_is_the_peer_view_serialized_once() {
        let mut f = PeerFacts::given(1000, 100, vec![4, 27], Some("/opt/a \"b\"/python3".into()), None);
        f.pid = 42;
        f.set_cgroup_trusted("/system.slice/train.service");
        let first = peer_json(&f).unwrap();
        assert_eq!(first.get(), serde_json::to_string(&peer_view(&f, &PodLookup::NotAsked)).unwrap());
        assert!(std::ptr::eq(first, peer_json(&f).unwrap()), "made once, then shared");
        // Facts changed by hand (tests) are serialized again, not served from before.
        f.set_cgroup_trusted("/system.slice/eval.service");
        assert!(peer_json(&f).unwrap().get().contains("eval.service"), "the old cgroup was kept");
    }

    #[test]
    fn peer_view_writes_what_peer_info_writes() {
        let mut f = PeerFacts::given(1000, 100, vec![4, 27], Some("/usr/bin/python3".into()), None);
        f.pid = 42;
        f.connected_pid = Some(41);
        f.exe_unverified = Some("mount namespace".into());
        f.set_cgroup_trusted(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f0e0d0c_0b0a_0908_0706_050403020100.slice/cri-containerd-\
             aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope",
        );
        let pod = PodLookup::NotAsked;
        let info = f.info();
        assert!(info.k8s_pod_uid.is_some() && info.container_id.is_some(), "{info:?}");
        assert_eq!(
            serde_json::to_string(&peer_view(&f, &pod)).unwrap(),
            serde_json::to_string(&info).unwrap()
        );
        let bare = PeerFacts::given(0, 0, Vec::new(), None, None);
        assert_eq!(
            serde_json::to_string(&peer_view(&bare, &pod)).unwrap(),
            serde_json::to_string(&bare.info()).unwrap()
        );
    }
}
