//! Building answers. The one place that maps failures to [`ErrorCode`]s, and one of the
//! three places a secret value is exposed (to put it in the answer body, and, in
//! `kvbroker launch`, to teach the job's output masker the value being sent).
//!
//! Bodies that carry a value are backed by memory that is wiped when hyper drops them.
//! Error messages never contain a value: they are built from names, codes and reasons.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use kvbroker_proto::{
    CacheState, ErrorBody, ErrorCode, ErrorDetail, Health, SecretName, SecretValue, VaultAlias, VersionId,
};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::vault::{Fetched, VaultError};

pub(crate) type Body = Full<Bytes>;

/// Everything that can go wrong with a request, before it becomes a status and a code.
#[derive(Debug)]
pub(crate) enum Failure {
    BadRequest(String),
    Denied {
        /// For the audit record.
        reason: String,
        /// Set when the policy said no: the caller's own facts, repeated in its answer so it
        /// can see what to change. Telling a caller about itself leaks nothing.
        caller: Option<Box<DeniedRead>>,
        /// For the denials metric.
        why: crate::metrics::DenyReason,
    },
    /// Denied, and the connection must close (the peer's exe changed).
    Reconnect {
        reason: String,
    },
    Vault(VaultError),
    /// A version asked for by id that the vault does not have.
    VersionNotFound {
        vault: VaultAlias,
        name: SecretName,
        version: VersionId,
    },
    NotUsable(String),
    Audit,
    TooMany {
        retry_after: std::time::Duration,
        /// For the rate-limit metric.
        by: crate::metrics::Limit,
        reason: String,
    },
    NoRoute,
    Method,
    BodyTooLarge,
    /// A long poll open when the agent began to stop.
    Stopping,
    /// A rule needed the caller's pod and the kubelet did not say (502): why.
    Kubelet(String),
}

impl Failure {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Failure::BadRequest(_) => ErrorCode::InvalidRequest,
            Failure::Denied { .. } | Failure::Reconnect { .. } => ErrorCode::PermissionDenied,
            Failure::Vault(VaultError::NotFound { .. }) | Failure::VersionNotFound { .. } => {
                ErrorCode::SecretNotFound
            }
            Failure::Vault(VaultError::Disabled { .. }) | Failure::NotUsable(_) => ErrorCode::SecretNotUsable,
            Failure::Vault(VaultError::Unavailable { .. }) => ErrorCode::UpstreamUnavailable,
            Failure::Audit => ErrorCode::AuditUnavailable,
            Failure::TooMany { .. } => ErrorCode::TooManyRequests,
            Failure::NoRoute => ErrorCode::NotFound,
            Failure::Method => ErrorCode::MethodNotAllowed,
            Failure::BodyTooLarge => ErrorCode::PayloadTooLarge,
            Failure::Stopping => ErrorCode::AgentStopping,
            Failure::Kubelet(_) => ErrorCode::UpstreamUnavailable,
        }
    }

    /// What the caller is told (and the audit record's `reason`).
    pub(crate) fn message(&self) -> String {
        match self {
            Failure::BadRequest(m) => m.clone(),
            Failure::Denied { caller: Some(c), .. } => c.to_string(),
            Failure::Denied { reason, caller: None, .. } | Failure::Reconnect { reason } => {
                format!("permission denied: {reason}")
            }
            Failure::VersionNotFound { vault, name, version } => {
                format!("version {version} of {name} not found in vault {vault}")
            }
            Failure::Vault(VaultError::Disabled { vault, name, .. }) => {
                format!("secret {name} in vault {vault} is not usable: disabled")
            }
            Failure::Vault(e) => e.to_string(),
            Failure::NotUsable(m) => m.clone(),
            Failure::Audit => "the audit record could not be written, so nothing was served; \
                 check the audit log's disk and permissions"
                .into(),
            Failure::TooMany { reason, .. } => reason.clone(),
            Failure::NoRoute => "no such path: use /v1/health or /v1/secrets/{name}".into(),
            Failure::Method => "method not allowed: use GET".into(),
            Failure::BodyTooLarge => "requests to the agent carry no body".into(),
            Failure::Stopping => "the agent is stopping: reconnect after the Retry-After seconds and \
                 resume from the last version seen"
                .into(),
            Failure::Kubelet(reason) => reason.clone(),
        }
    }
}

/// A read the policy refused, told back to the caller in its own terms.
#[derive(Debug)]
pub(crate) struct DeniedRead {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) exe: Option<String>,
    pub(crate) cgroup: Option<String>,
    pub(crate) vault: VaultAlias,
    pub(crate) name: SecretName,
}

impl std::fmt::Display for DeniedRead {
    /// Names the caller's facts and the `policy explain` command that replays this decision
    /// without the process (which may have exited). Never says whether the secret exists.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { uid, gid, groups, exe, cgroup, vault, name } = self;
        let exe_shown = exe.as_deref().unwrap_or("unknown");
        write!(f, "no rule allows uid {uid} (exe {}) to read {vault}/{name}", exe_shown.escape_debug())?;
        write!(f, "; to see why, run: kvbroker policy explain --config CONFIG --uid {uid} --gid {gid}")?;
        if !groups.is_empty() {
            let list: Vec<String> = groups.iter().map(ToString::to_string).collect();
            write!(f, " --groups {}", list.join(","))?;
        }
        if let Some(e) = exe {
            write!(f, " --exe {}", ShellWord(e))?;
        }
        if let Some(c) = cgroup {
            write!(f, " --cgroup {}", ShellWord(c))?;
        }
        write!(f, " {vault}/{name}")
    }
}

/// A path as one shell word: bare if it holds only safe characters, else single-quoted
/// (control characters escaped, since the caller chose the path).
struct ShellWord<'a>(&'a str);

impl std::fmt::Display for ShellWord<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
        if !self.0.is_empty() && self.0.chars().all(safe) {
            return f.write_str(self.0);
        }
        f.write_str("'")?;
        for c in self.0.chars() {
            match c {
                '\'' => f.write_str("'\\''")?,
                c if c.is_control() => write!(f, "{}", c.escape_default())?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("'")
    }
}

pub(crate) fn failure(f: &Failure, request_id: &str) -> Response<Body> {
    let code = f.code();
    let body =
        ErrorBody { error: ErrorDetail { code, message: f.message(), request_id: request_id.to_owned() } };
    let mut r = json(code_status(code), &body);
    if matches!(f, Failure::Method) {
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    if matches!(f, Failure::Reconnect { .. }) {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Failure::TooMany { retry_after, .. } = f {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if matches!(f, Failure::Stopping) {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn code_status(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub(crate) fn health(reasons: Vec<String>) -> Response<Body> {
    let ok = reasons.is_empty();
    let body = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        reasons,
    };
    json(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// `/v1/health?ready`: 200 once able to serve, 503 `starting` before, 503 `degraded` when
/// nothing can be served.
pub(crate) fn readiness(r: crate::state::Readiness) -> Response<Body> {
    use crate::state::Readiness;
    let (status, code, reasons) = match r {
        Readiness::Ready => ("ready", StatusCode::OK, Vec::new()),
        Readiness::Starting(why) => ("starting", StatusCode::SERVICE_UNAVAILABLE, vec![why]),
        Readiness::Degraded(why) => ("degraded", StatusCode::SERVICE_UNAVAILABLE, vec![why]),
    };
    let body = Health { status: status.into(), version: Some(env!("CARGO_PKG_VERSION").into()), reasons };
    json(code, &body)
}

/// A written answer's header map, for the next answer on this thread (see `spare`).
pub(crate) fn give_back(headers: HeaderMap) {
    spare::give_back(headers);
}

/// A 200 answer with `body`, its header map a spare one if this thread has one.
fn response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.headers_mut() = spare::take();
    r
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = response(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A served secret, ready to answer; the vault alias is the configuration's.
pub(crate) struct Served<'a> {
    pub(crate) vault: &'a VaultAlias,
    pub(crate) fetched: Arc<Fetched>,
    pub(crate) state: CacheState,
}

impl Served<'_> {
    fn stale(&self) -> bool {
        self.state == CacheState::Stale
    }
}

/// The end of a long poll with no new version.
pub(crate) fn not_modified() -> Response<Body> {
    let mut r = response(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    r
}

/// The JSON answer, borrowing everything from the cache entry.
#[derive(Serialize)]
struct SecretJson<'a> {
    vault: &'a VaultAlias,
    name: &'a SecretName,
    version: &'a VersionId,
    #[serde(serialize_with = "serialize_value")]
    value: &'a SecretValue,
    content_type: Option<&'a str>,
    not_before: Option<String>,
    expires_on: Option<String>,
    fetched_at: String,
    stale: bool,
}

fn serialize_value<S: serde::Serializer>(v: &&SecretValue, s: S) -> Result<S::Ok, S::Error> {
    kvbroker_proto::value::serialize_exposed(v, s)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A writer that only counts what it is given: the exact size of an answer before it is
/// written into zeroizing memory.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body owner for raw answers: shares the cached value, no copy.
struct Exposed(Arc<SecretValue>);

impl AsRef<[u8]> for Exposed {
    fn as_ref(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

/// `kvbroker launch`: the job's output masker learns a value about to be served.
pub(crate) fn teach_mask(mask: &kvbroker_proto::mask::MaskValues, s: &Served<'_>) {
    mask.learn(s.fetched.value.expose_secret());
}

pub(crate) fn secret(s: &Served<'_>, raw: bool) -> Result<Response<Body>, Failure> {
    let f = &s.fetched;
    if raw {
        let mut r = response(Full::new(Bytes::from_owner(Exposed(Arc::clone(&f.value)))));
        let hs = r.headers_mut();
        hs.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let mut put = |name: HeaderName, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                hs.insert(name, v);
            }
        };
        put(names::VAULT, s.vault.as_str());
        put(names::NAME, f.name.as_str());
        put(names::VERSION, f.version.as_str());
        put(names::FETCHED_AT, &rfc3339(f.fetched_at));
        put(names::STALE, if s.stale() { "true" } else { "false" });
        if let Some(ct) = f.content_type.as_deref() {
            put(names::CONTENT_TYPE, ct);
        }
        if let Some(t) = f.not_before {
            put(names::NOT_BEFORE, &rfc3339(t));
        }
        if let Some(t) = f.expires_on {
            put(names::EXPIRES_ON, &rfc3339(t));
        }
        return Ok(r);
    }
    let build = || {
        let body = SecretJson {
            vault: s.vault,
            name: &f.name,
            version: &f.version,
            value: &f.value,
            content_type: f.content_type.as_deref(),
            not_before: f.not_before.map(rfc3339),
            expires_on: f.expires_on.map(rfc3339),
            fetched_at: rfc3339(f.fetched_at),
            stale: s.stale(),
        };
        // Counted first, then written into a buffer of exactly that size: a buffer that grew
        // would leave an unwiped copy of the value in freed memory, and one sized for the
        // worst case (every byte escaped as \uXXXX, plus slack) cost 1.3 KB per cached
        // version of a 50-byte secret: 13 MiB of locked memory at 10,000 secrets (issue 19).
        let mut counted = Counted(0);
        serde_json::to_writer(&mut counted, &body).ok()?;
        let mut buf = Zeroizing::new(Vec::with_capacity(counted.0));
        serde_json::to_writer(&mut *buf, &body).ok()?;
        debug_assert_eq!(buf.len(), buf.capacity(), "the answer buffer never grows");
        Some(Bytes::from_owner(buf))
    };
    let not_text = || {
        Failure::NotUsable(format!(
            "secret {} is not UTF-8 text: request it with Accept: application/octet-stream",
            f.name
        ))
    };
    // A fresh hit shares the version's answer, built at its first hit; a stale answer (rare:
    // Key Vault failing) is built each time, since it says `"stale": true`.
    let body = if s.stale() {
        build().ok_or_else(not_text)?
    } else {
        f.answer
            .get_or_build(|| {
                let b = build()?;
                if let Err(e) = crate::sys::lock_and_hide(&b) {
                    tracing::debug!(error = %e, "cannot mlock a cached answer");
                }
                Some(b)
            })
            .ok_or_else(not_text)?
    };
    let mut r = response(Full::new(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// The API's header names (`kvbroker_proto::api::headers`) as `HeaderName`s, made at
/// compile time: inserting one copies nothing, where a `&str` name outside the standard set
/// is copied into a new buffer at every insert (issue 19: one allocation per read).
mod names {
    use http::HeaderName;
    use kvbroker_proto::api::headers as h;

    pub(super) const VAULT: HeaderName = HeaderName::from_static(h::VAULT);
    pub(super) const NAME: HeaderName = HeaderName::from_static(h::NAME);
    pub(super) const VERSION: HeaderName = HeaderName::from_static(h::VERSION);
    pub(super) const FETCHED_AT: HeaderName = HeaderName::from_static(h::FETCHED_AT);
    pub(super) const STALE: HeaderName = HeaderName::from_static(h::STALE);
    pub(super) const CONTENT_TYPE: HeaderName = HeaderName::from_static(h::CONTENT_TYPE);
    pub(super) const NOT_BEFORE: HeaderName = HeaderName::from_static(h::NOT_BEFORE);
    pub(super) const EXPIRES_ON: HeaderName = HeaderName::from_static(h::EXPIRES_ON);
    pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static(h::REQUEST_ID);
}

/// Headers every answer carries.
pub(crate) fn finish(mut r: Response<Body>, request_id: &str) -> Response<Body> {
    let hs = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        hs.insert(names::REQUEST_ID, v);
    }
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Header maps the plain path gives back once their answer is written ([`give_back`]), kept
/// per thread for the next answers: a map's first insert allocates its tables, two
/// allocations per answer (issue 19). Hyper's path drops its maps, as before.
mod spare {
    use std::cell::RefCell;

    use http::HeaderMap;

    thread_local! {
        static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    }

    /// Maps kept per thread, at most; and the largest kept (an answer's few headers fit).
    const KEEP: usize = 8;
    const KEEP_CAPACITY: usize = 32;

    pub(super) fn take() -> HeaderMap {
        MAPS.with_borrow_mut(Vec::pop).unwrap_or_default()
    }

    pub(super) fn give_back(mut map: HeaderMap) {
        if map.capacity() > KEEP_CAPACITY {
            return;
        }
        map.clear();
        MAPS.with_borrow_mut(|maps| {
            if maps.len() < KEEP {
                maps.push(map);
            }
        });
    }

    /// Tests: how many maps this thread keeps.
    #[cfg(test)]
    pub(super) fn kept() -> usize {
        MAPS.with_borrow(Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::ShellWord;

    /// A written answer's header map serves the next answer on the thread, emptied — its
    /// tables kept, so the next answer's headers need no allocation; a few per thread, and no
    /// map grown large.
    #[test]
    fn header_maps_given_back_are_emptied_and_reused() {
        use http::header;
        let before = super::spare::kept();
        let mut r = super::not_modified();
        r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        let capacity = r.headers().capacity();
        super::give_back(r.into_parts().0.headers);
        assert_eq!(super::spare::kept(), before + 1);
        let next = super::not_modified();
        assert!(next.headers().is_empty(), "a reused map holds no header of the last answer");
        assert_eq!(next.headers().capacity(), capacity, "its tables are kept");
        assert_eq!(super::spare::kept(), before);
        let mut big = http::HeaderMap::new();
        for i in 0..100u32 {
            big.insert(http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(), i.into());
        }
        super::give_back(big);
        assert_eq!(super::spare::kept(), before, "a large map is let go");
        for _ in 0..20 {
            super::give_back(http::HeaderMap::with_capacity(4));
        }
        assert!(super::spare::kept() <= 8, "a few per thread");
    }

    /// Issue 19: a cached answer is written into a buffer of exactly its size (a debug
    /// assertion checks it never grows or has slack), escapes and all, and says what a
    /// plain serialization says.
    #[test]
    fn an_answer_is_exactly_sized_and_matches_plain_json() {
        use std::sync::Arc;
        let value = "canary-\"q\\\n\u{1}é-end";
        let fetched = Arc::new(crate::vault::Fetched {
            name: "Db".parse().unwrap(),
            version: kvbroker_proto::VersionId::from_bytes([7; 16]),
            value: Arc::new(kvbroker_proto::SecretValue::from_slice(value.as_bytes())),
            content_type: Some("text/plain".into()),
            enabled: true,
            not_before: None,
            expires_on: None,
            fetched_at: std::time::UNIX_EPOCH,
            upstream_request_id: None,
            answer: crate::vault::Answer::default(),
        });
        let vault = "default".parse().unwrap();
        let served = super::Served { vault: &vault, fetched, state: kvbroker_proto::CacheState::Hit };
        let body = super::secret(&served, false).unwrap().into_body();
        let bytes = futures_body(body);
        let got: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(got["value"], value);
        assert_eq!(got["name"], "Db");
        assert_eq!(got["content_type"], "text/plain");
        assert_eq!(got["stale"], false);
    }

    fn futures_body(body: super::Body) -> bytes::Bytes {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(http_body_util::BodyExt::collect(body)).unwrap().to_bytes()
    }

    #[test]
    fn paths_in_the_suggested_command_are_one_shell_word() {
        assert_eq!(ShellWord("/usr/bin/python3.11").to_string(), "/usr/bin/python3.11");
        assert_eq!(ShellWord("/opt/my job/run").to_string(), "'/opt/my job/run'");
        assert_eq!(ShellWord("/tmp/it's").to_string(), r"'/tmp/it'\''s'");
        assert_eq!(ShellWord("/tmp/\x1b[2J").to_string(), r"'/tmp/\u{1b}[2J'");
        assert_eq!(ShellWord("").to_string(), "''");
    }
}
