//! Request handling: route, attest, decide, fetch, audit, answer — in that order. The audit
//! record is written before the answer leaves; if it cannot be, the answer is 503.

use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, header};
use kvbroker_proto::{AuditRecord, CacheState, Event, Outcome, SecretName, SecretQuery, SecretRef};

use super::response::{self, Body, DeniedRead, Failure, Served};
use crate::config::{RateKey, UnknownVault};
use crate::kube::PodLookup;
use crate::metrics::{self, CacheUse, DenyReason, Limit, ReadOutcome};
use crate::peer::{ConnPeer, PeerError};
use crate::policy::Decision;
use crate::state::State;
use crate::vault::VaultError;

pub(crate) async fn handle<B>(
    ctx: &State,
    peer: &ConnPeer,
    over_cap: bool,
    req: Request<B>,
) -> Response<Body> {
    let request_id = new_request_id();
    let path = req.uri().path();
    tracing::trace!(request_id, method = %req.method(), path, "request");
    let r = if path == "/v1/health" {
        if over_cap {
            // Health counts like any request: a caller over its connection cap cannot use
            // health polls to hold connections either.
            metrics::get().limited(Limit::Connections);
            response::failure(&over_cap_failure(peer.uid), &request_id)
        } else if req.method() == Method::GET {
            match req.uri().query() {
                None | Some("") => response::health(ctx.health_reasons()),
                Some("ready" | "ready=1" | "ready=true") => response::readiness(ctx.readiness()),
                Some(_) => response::failure(
                    &Failure::BadRequest("/v1/health takes no parameter but ready (/v1/health?ready)".into()),
                    &request_id,
                ),
            }
        } else {
            response::failure(&Failure::Method, &request_id)
        }
    } else if let Some(name) = path.strip_prefix("/v1/secrets/") {
        if req.method() != Method::GET {
            response::failure(&Failure::Method, &request_id)
        } else {
            read_secret(ctx, peer, over_cap, &req, name, &request_id).await
        }
    } else {
        response::failure(&Failure::NoRoute, &request_id)
    };
    let mut r = response::finish(r, &request_id);
    if over_cap {
        // Answered, then closed: an over-cap connection is never kept open.
        r.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
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
/// `getrandom` on every request was a syscall on the hot path.
fn new_request_id() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid().simple().to_string()
}

async fn read_secret<B>(
    ctx: &State,
    peer: &ConnPeer,
    over_cap: bool,
    req: &Request<B>,
    raw_name: &str,
    request_id: &str,
) -> Response<Body> {
    let mut rec = AuditRecord::new(Event::SecretRead);
    rec.request_id = Some(request_id.to_owned());
    rec.peer = Some(peer.info());
    let result = decide_and_fetch(ctx, peer, over_cap, req, raw_name, &mut rec).await;
    let raw = wants_raw(req);
    let mut cache_use = CacheUse::None;
    let answer = result.and_then(|served| match served {
        Some(served) => {
            if let Some(mask) = &ctx.mask {
                // Before the answer exists: no output can hold the value before the masker
                // knows it.
                response::teach_mask(mask, &served);
            }
            let r = response::secret(&served, raw)?;
            rec.cache = Some(served.state);
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
            rec.reason = Some("not modified (long poll ended with no new version)".into());
            Ok(response::not_modified())
        }
    });
    match &answer {
        Ok(_) => rec.outcome = Some(Outcome::Allowed),
        Err(f) => {
            count_refusal(f);
            rec.outcome = Some(if matches!(f, Failure::Denied { .. } | Failure::Reconnect { .. }) {
                Outcome::Denied
            } else {
                Outcome::Error
            });
            rec.error = Some(f.code());
            rec.reason = Some(match f {
                Failure::Denied { reason, .. } | Failure::Reconnect { reason } => reason.clone(),
                other => other.message(),
            });
        }
    }
    tracing::debug!(
        request_id,
        outcome = rec.outcome.map_or("", |o| o.as_str()),
        uid = rec.peer.as_ref().map_or(0, |p| p.uid),
        secret = rec.secret.as_ref().map_or("", |s| s.name.as_str()),
        "secret read decided"
    );
    // An allowed read always has its own record; refusals do while the uid has budget, and
    // are counted into a summary past it (audit::refusals).
    let written = if rec.outcome == Some(Outcome::Allowed) {
        ctx.auditor.append(rec).await.map(|_| ())
    } else {
        ctx.refusals.record(rec).await.map(|_| ())
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
async fn decide_and_fetch<B>(
    ctx: &State,
    peer: &ConnPeer,
    over_cap: bool,
    req: &Request<B>,
    raw_name: &str,
    rec: &mut AuditRecord,
) -> Result<Option<Served>, Failure> {
    if has_body(req) {
        return Err(Failure::BodyTooLarge);
    }
    let name: SecretName = raw_name.parse().map_err(|e| Failure::BadRequest(format!("{e}")))?;
    let query = SecretQuery::parse(req.uri().query().unwrap_or(""))
        .map_err(|e| Failure::BadRequest(e.to_string()))?;
    if query.changed_from.is_some() && query.version.is_some() {
        return Err(Failure::BadRequest(
            "version and changed_from cannot be combined: a pinned version never changes".into(),
        ));
    }
    let vault = ctx.cache.vaults().resolve(query.vault.as_ref()).cloned().ok_or_else(|| {
        let unknown = match &query.vault {
            Some(v) => UnknownVault::Alias(v.clone()),
            None => UnknownVault::NoDefault,
        };
        Failure::BadRequest(unknown.to_string())
    })?;
    rec.secret = Some(SecretRef {
        vault: vault.to_string(),
        name: name.to_string(),
        version: query.version.as_ref().map(ToString::to_string),
        previous_version: None,
    });

    if over_cap {
        return Err(over_cap_failure(peer.uid));
    }
    let limited = |key: &str, who: String| {
        ctx.limits.take(key).map_err(|retry_after| Failure::TooMany {
            retry_after,
            by: Limit::Rate,
            reason: format!("{who} is over its read rate limit; retry after the Retry-After seconds"),
        })
    };
    if ctx.limits.key() == RateKey::Uid {
        limited(&peer.uid.to_string(), format!("uid {}", peer.uid))?;
    }

    let policy = ctx.policy();
    let facts = peer.facts(policy.uses_cgroup()).map_err(|e| match e {
        PeerError::ExeChanged | PeerError::CgroupChanged | PeerError::SecondWriter { .. } => {
            Failure::Reconnect { reason: e.to_string() }
        }
        e => Failure::Denied { reason: e.to_string(), caller: None, why: DenyReason::Unattested },
    })?;
    rec.peer = Some(facts.info());
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
    let mut pod = PodLookup::NotAsked;
    let mut decision = policy.decide_with(&facts, &pod, vault.as_str(), name.key());
    if decision == Decision::NeedPod {
        // Only now, and only for a pod caller: rules without k8s selectors never wait.
        pod = match (&ctx.kube, facts.pod_uid()) {
            (Some(kube), Some(uid)) => kube.lookup(uid).await,
            _ => PodLookup::Unavailable("no [kubernetes] section in the agent config".into()),
        };
        decision = policy.decide_with(&facts, &pod, vault.as_str(), name.key());
    }
    let peer_info = || {
        let mut info = facts.info();
        pod.annotate(&mut info);
        info
    };
    match decision {
        Decision::Allow { rule } => {
            if ctx.limits.key() == RateKey::Rule {
                limited(&rule, format!("rule {rule:?}"))?;
            }
            rec.rule = Some(rule);
        }
        Decision::NeedPod => {
            // Decided again with the pod: a second NeedPod cannot happen. Fail closed.
            rec.peer = Some(peer_info());
            return Err(Failure::Kubelet("the caller's pod could not be looked up".into()));
        }
        Decision::KubeletUnavailable { reason } => {
            rec.peer = Some(peer_info());
            return Err(Failure::Kubelet(reason));
        }
        Decision::Deny { reason } if facts.pod_uid().is_some() && matches!(pod, PodLookup::NotFound) => {
            rec.peer = Some(peer_info());
            return Err(Failure::Denied { reason, caller: None, why: DenyReason::Policy });
        }
        Decision::Deny { reason } => {
            // Facts the decision computed (an exe hash) are recorded for denials too.
            rec.peer = Some(peer_info());
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
    // Facts the decision computed (the exe hash, the pod) go to the audit record too.
    rec.peer = Some(peer_info());

    let looked_up = match (&query.changed_from, query.wait) {
        (Some(from), Some(wait)) => {
            let wait = Duration::from_secs(u64::from(wait));
            // A stop answers open long polls at once (503, Retry-After) instead of holding
            // the drain for up to `shutdown_grace`; the watcher reconnects to the next agent.
            tokio::select! {
                r = ctx.cache.wait_change(&vault, &name, from, wait) => r,
                () = ctx.stopping() => return Err(Failure::Stopping),
            }
        }
        _ => ctx.cache.get(&vault, &name, query.version.as_ref()).await.map(Some),
    };
    let looked_up = match looked_up {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(e) => {
            rec.upstream_request_id = e.upstream_request_id().map(str::to_owned);
            rec.upstream = e.upstream().cloned();
            return Err(match (e, &query.version) {
                (VaultError::NotFound { .. }, Some(version)) => {
                    Failure::VersionNotFound { vault, name, version: version.clone() }
                }
                (e, _) => Failure::Vault(e),
            });
        }
    };
    let fetched = looked_up.fetched;
    if looked_up.state == CacheState::Miss {
        rec.upstream_request_id = fetched.upstream_request_id.as_deref().map(str::to_owned);
    }
    if let Some(s) = rec.secret.as_mut() {
        s.name = fetched.name.to_string();
        s.version = Some(fetched.version.to_string());
    }
    check_usable(&fetched, &vault)?;
    Ok(Some(Served { vault, fetched, state: looked_up.state }))
}

/// `enabled`, `nbf` and `exp`, enforced by the agent: Key Vault returns expired secrets.
fn check_usable(f: &crate::vault::Fetched, vault: &kvbroker_proto::VaultAlias) -> Result<(), Failure> {
    match f.unusable(SystemTime::now()) {
        Some(w) => Err(Failure::NotUsable(format!("secret {} in vault {vault} is not usable: {w}", f.name))),
        None => Ok(()),
    }
}

fn wants_raw<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("application/octet-stream")))
}

fn has_body<B>(req: &Request<B>) -> bool {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    matches!(len, Some(n) if n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_lowercase_hex_and_fresh() {
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        assert_ne!(new_request_id(), id);
    }
}
