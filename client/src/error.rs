//! The client's error type: one variant per agent error code, plus "agent not reachable"
//! and "not allowed to open the socket".

use std::path::PathBuf;
use std::time::Duration;

use kvbroker_proto::ErrorCode;

/// What the agent said about a failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The agent's explanation (never contains a value).
    pub message: String,
    /// The request id, to find the audit record.
    pub request_id: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (request {})", self.message, self.request_id)
    }
}

/// A file's group: its name when this machine can resolve it, else its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The numeric gid.
    pub gid: u32,
    /// The name from `/etc/group`, if listed there.
    pub name: Option<String>,
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.gid),
        }
    }
}

impl Group {
    /// Looks `gid` up in `/etc/group`. Groups served only by NSS modules (LDAP, sssd) are
    /// not found and are shown by number: this crate reads files, it does not link libc's resolver.
    pub(crate) fn lookup(gid: u32) -> Group {
        let name = std::fs::read_to_string("/etc/group").ok().and_then(|t| group_name(&t, gid));
        Group { gid, name }
    }
}

/// The name of `gid` in `/etc/group`-format text.
fn group_name(text: &str, gid: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let (name, _, id) = (f.next()?, f.next()?, f.next()?);
        (id.parse() == Ok(gid) && !name.is_empty()).then(|| name.to_owned())
    })
}

/// What a user refused by file permissions can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Remedy {
    /// The file's group has the access this user lacks.
    JoinGroup,
    /// Its group has no access either: only the operator can change that.
    AskOperator,
}

impl std::fmt::Display for Remedy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Remedy::JoinGroup => "join that group or ask the operator",
            Remedy::AskOperator => "its group has no access either; ask the operator",
        })
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent socket could not be reached.
    #[error(
        "kvbroker agent not reachable at {path}: {source}; is the agent running, and does \
         KVBROKER_SOCKET name its socket?"
    )]
    Unreachable {
        /// The socket path tried.
        path: PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// Connecting was refused by file permissions (`EACCES`): this user may not open the
    /// socket, or may not enter a directory on its path. `path` is the file or directory
    /// that refused, with its mode and group, so the message can say which group to join.
    #[error("your user cannot open {path} (mode {mode:04o}, group {group}): {remedy}")]
    NoAccess {
        /// The socket, or the directory above it that refused.
        path: PathBuf,
        /// Its permission bits (`0o660`).
        mode: u32,
        /// Its group.
        group: Group,
        /// Whether joining the group would help.
        remedy: Remedy,
    },
    /// 400: bad name, version, vault alias or parameter.
    #[error("invalid request: {0}")]
    InvalidRequest(ApiError),
    /// 403: policy does not allow this process to read the secret.
    #[error("{0}")]
    PermissionDenied(ApiError),
    /// 404: the vault has no such secret or version.
    #[error("{0}")]
    SecretNotFound(ApiError),
    /// 422: disabled, not yet valid, or expired.
    #[error("{0}")]
    SecretNotUsable(ApiError),
    /// 429: this caller is over its rate limit.
    #[error("rate limited by the agent: {error}")]
    TooManyRequests {
        /// What the agent said.
        error: ApiError,
        /// When to try again, from `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// 502: Key Vault or the identity endpoint failed and no cached copy could be served.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(ApiError),
    /// 503: the agent could not write its audit record, so it served nothing.
    #[error("audit unavailable: {0}")]
    AuditUnavailable(ApiError),
    /// 503: the agent is stopping; a new one may be listening after `retry_after`.
    #[error("the agent is stopping: {error}")]
    AgentStopping {
        /// What the agent said.
        error: ApiError,
        /// When to try again, from `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// 404: the agent does not know the path (client and agent versions differ?).
    #[error("unknown path: {0}")]
    NotFound(ApiError),
    /// 405: the agent refused the method.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(ApiError),
    /// 408: the request was too slow.
    #[error("request timeout: {0}")]
    RequestTimeout(ApiError),
    /// 413: the request carried a body.
    #[error("payload too large: {0}")]
    PayloadTooLarge(ApiError),
    /// 431: the request headers were too large.
    #[error("headers too large: {0}")]
    HeadersTooLarge(ApiError),
    /// The agent answered something this client does not understand.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

impl Error {
    /// The agent's error code, if the agent answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::SecretNotFound(_) => ErrorCode::SecretNotFound,
            Error::SecretNotUsable(_) => ErrorCode::SecretNotUsable,
            Error::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            Error::UpstreamUnavailable(_) => ErrorCode::UpstreamUnavailable,
            Error::AuditUnavailable(_) => ErrorCode::AuditUnavailable,
            Error::AgentStopping { .. } => ErrorCode::AgentStopping,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            Error::RequestTimeout(_) => ErrorCode::RequestTimeout,
            Error::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Error::HeadersTooLarge(_) => ErrorCode::HeadersTooLarge,
            Error::Unreachable { .. } | Error::NoAccess { .. } | Error::Protocol(_) => return None,
        })
    }

    pub(crate) fn from_code(code: ErrorCode, e: ApiError, retry_after: Option<Duration>) -> Error {
        match code {
            ErrorCode::InvalidRequest => Error::InvalidRequest(e),
            ErrorCode::PermissionDenied => Error::PermissionDenied(e),
            ErrorCode::SecretNotFound => Error::SecretNotFound(e),
            ErrorCode::SecretNotUsable => Error::SecretNotUsable(e),
            ErrorCode::TooManyRequests => Error::TooManyRequests { error: e, retry_after },
            ErrorCode::UpstreamUnavailable => Error::UpstreamUnavailable(e),
            ErrorCode::AuditUnavailable => Error::AuditUnavailable(e),
            ErrorCode::AgentStopping => Error::AgentStopping { error: e, retry_after },
            ErrorCode::NotFound => Error::NotFound(e),
            ErrorCode::MethodNotAllowed => Error::MethodNotAllowed(e),
            ErrorCode::RequestTimeout => Error::RequestTimeout(e),
            ErrorCode::PayloadTooLarge => Error::PayloadTooLarge(e),
            ErrorCode::HeadersTooLarge => Error::HeadersTooLarge(e),
            other => Error::Protocol(format!("unknown error code {other}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_come_from_etc_group_format() {
        let text = "root:x:0:\nmljobs:x:2000:alice,bob\n# comment\nbad line\n";
        assert_eq!(group_name(text, 2000).as_deref(), Some("mljobs"));
        assert_eq!(group_name(text, 0).as_deref(), Some("root"));
        assert_eq!(group_name(text, 2001), None);
        let unnamed = Group { gid: 2001, name: None };
        assert_eq!(unnamed.to_string(), "2001");
    }

    #[test]
    fn no_access_says_what_to_do() {
        let e = Error::NoAccess {
            path: "/run/kvbroker/agent.sock".into(),
            mode: 0o660,
            group: Group { gid: 2000, name: Some("mljobs".into()) },
            remedy: Remedy::JoinGroup,
        };
        assert_eq!(
            e.to_string(),
            "your user cannot open /run/kvbroker/agent.sock (mode 0660, group mljobs): join that group or ask the operator"
        );
    }

    #[test]
    fn every_code_has_its_own_variant() {
        for code in ErrorCode::ALL {
            let e = Error::from_code(code, ApiError { message: "m".into(), request_id: "r".into() }, None);
            assert_eq!(e.code(), Some(code), "{e}");
        }
    }
}
