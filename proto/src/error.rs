//! The error body of the agent socket and its codes (SPEC.md, "Errors").

use serde::{Deserialize, Serialize};

/// Every error code the agent answers with, and its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: bad secret name, version, vault alias or parameter.
    InvalidRequest,
    /// 403: policy said no (the same answer whether or not the secret exists).
    PermissionDenied,
    /// 404: allowed, but the vault has no such secret or version.
    SecretNotFound,
    /// 404: unknown path.
    NotFound,
    /// 405: unknown method.
    MethodNotAllowed,
    /// 408: the request was not received in time.
    RequestTimeout,
    /// 413: the request carried a body larger than allowed.
    PayloadTooLarge,
    /// 431: the request headers were too large.
    HeadersTooLarge,
    /// 422: disabled, not yet valid, or expired.
    SecretNotUsable,
    /// 429: per-caller rate limit; see `Retry-After`.
    TooManyRequests,
    /// 502: Key Vault or the identity endpoint failed and no usable cached copy exists.
    UpstreamUnavailable,
    /// 503: the audit record could not be written; nothing was served.
    AuditUnavailable,
    /// 503: the agent is stopping (a long poll answered at shutdown); retry after
    /// `Retry-After`, when a new agent will be listening. Not in SPEC.md's table: added for
    /// watchers that reconnect (docs/api.md).
    AgentStopping,
}

impl ErrorCode {
    /// All codes, in SPEC.md's table order.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::PermissionDenied,
        ErrorCode::SecretNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::HeadersTooLarge,
        ErrorCode::SecretNotUsable,
        ErrorCode::TooManyRequests,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::AuditUnavailable,
        ErrorCode::AgentStopping,
    ];

    /// The HTTP status this code is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::SecretNotFound | ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::SecretNotUsable => 422,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::UpstreamUnavailable => 502,
            ErrorCode::AuditUnavailable | ErrorCode::AgentStopping => 503,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "InvalidRequest",
            ErrorCode::PermissionDenied => "PermissionDenied",
            ErrorCode::SecretNotFound => "SecretNotFound",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::MethodNotAllowed => "MethodNotAllowed",
            ErrorCode::RequestTimeout => "RequestTimeout",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::HeadersTooLarge => "HeadersTooLarge",
            ErrorCode::SecretNotUsable => "SecretNotUsable",
            ErrorCode::TooManyRequests => "TooManyRequests",
            ErrorCode::UpstreamUnavailable => "UpstreamUnavailable",
            ErrorCode::AuditUnavailable => "AuditUnavailable",
            ErrorCode::AgentStopping => "AgentStopping",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"error":{"code":…,"message":…,"request_id":…}}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What failed and what to do; never a value.
    pub message: String,
    /// The request id, also in `X-Request-Id` and the audit record.
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drift test: SPEC.md's error table, row by row.
    #[test]
    fn codes_match_spec_table() {
        let spec = [
            (400, "InvalidRequest"),
            (403, "PermissionDenied"),
            (404, "SecretNotFound"),
            (404, "NotFound"),
            (405, "MethodNotAllowed"),
            (408, "RequestTimeout"),
            (413, "PayloadTooLarge"),
            (431, "HeadersTooLarge"),
            (422, "SecretNotUsable"),
            (429, "TooManyRequests"),
            (502, "UpstreamUnavailable"),
            (503, "AuditUnavailable"),
            // docs/api.md's addition to the SPEC table (issue 17).
            (503, "AgentStopping"),
        ];
        assert_eq!(spec.len(), ErrorCode::ALL.len());
        for (code, (status, name)) in ErrorCode::ALL.iter().zip(spec) {
            assert_eq!(code.status(), status);
            assert_eq!(code.as_str(), name);
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
        }
    }
}
