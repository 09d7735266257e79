"""Exceptions: one class per agent error code, under `KvbrokerError`.

When azure-core is importable, `SecretNotFound` is also an
`azure.core.exceptions.ResourceNotFoundError` and the other agent errors are
`HttpResponseError`s, and `AgentUnreachable` is a `ServiceRequestError` (what azure-core raises
when it cannot reach a service), so `except` clauses written for azure-keyvault-secrets keep
working.
Messages come from the agent (names, versions, reasons) and never hold a value.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple, Type

try:  # pragma: no cover - depends on the environment
    from azure.core.exceptions import HttpResponseError as _AzureHttpError  # type: ignore[import-not-found,unused-ignore]
    from azure.core.exceptions import ResourceNotFoundError as _AzureNotFound  # type: ignore[import-not-found,unused-ignore]
    from azure.core.exceptions import ServiceRequestError as _AzureRequestError  # type: ignore[import-not-found,unused-ignore]

    _HTTP_BASES: Tuple[type, ...] = (_AzureHttpError,)
    _NOT_FOUND_BASES: Tuple[type, ...] = (_AzureNotFound,)
    _REQUEST_BASES: Tuple[type, ...] = (_AzureRequestError,)
except ImportError:  # pragma: no cover
    _HTTP_BASES = ()
    _NOT_FOUND_BASES = ()
    _REQUEST_BASES = ()

__all__ = [
    "KvbrokerError",
    "AgentUnreachable",
    "PermissionDenied",
    "SecretNotFound",
    "SecretNotUsable",
    "TooManyRequests",
    "UpstreamUnavailable",
    "AuditUnavailable",
    "InvalidRequest",
]


class KvbrokerError(Exception):
    """Any failure to get a secret from the agent.

    `message` is the agent's own message; `code` its error code (`"PermissionDenied"`, …,
    or None when the agent was not reached); `request_id` the `X-Request-Id` that the audit
    record carries; `status_code` the HTTP status (None when the agent was not reached).
    """

    code: Optional[str]
    request_id: Optional[str]
    status_code: Optional[int]
    message: str

    def __init__(self, message: str, *, code: Optional[str] = None, request_id: Optional[str] = None,
                 status_code: Optional[int] = None, reason: Optional[str] = None) -> None:
        text = f"{message} (request {request_id})" if request_id else message
        # With azure-core in the MRO this reaches HttpResponseError(message=..., response=None),
        # which sets its own attributes; without it, Exception(text).
        super().__init__(text)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.status_code = status_code
        if _HTTP_BASES and isinstance(self, _HTTP_BASES):
            self.reason = reason  # the HTTP reason phrase, as azure-core's own errors carry

    def __str__(self) -> str:
        return f"{self.message} (request {self.request_id})" if self.request_id else self.message

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Picklable (multiprocessing, concurrent.futures) despite keyword-only arguments.
        return (_rebuild, (type(self), self.message, self.code, self.request_id, self.status_code,
                           getattr(self, "reason", None)))


def _rebuild(cls: Type[KvbrokerError], message: str, code: Optional[str], request_id: Optional[str],
             status_code: Optional[int], reason: Optional[str]) -> KvbrokerError:
    return cls(message, code=code, request_id=request_id, status_code=status_code, reason=reason)


class AgentUnreachable(KvbrokerError, *_REQUEST_BASES):  # type: ignore[misc]
    """The agent's socket could not be opened or the connection failed; `socket` names it."""

    socket: str

    def __init__(self, message: str, *, socket: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.socket = socket

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_unreachable, (self.message, self.socket))


def _rebuild_unreachable(message: str, socket: str) -> AgentUnreachable:
    return AgentUnreachable(message, socket=socket)


class PermissionDenied(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """403: policy does not let this process read the secret (same answer if it does not exist)."""


class SecretNotFound(KvbrokerError, *_NOT_FOUND_BASES):  # type: ignore[misc]
    """404: allowed, but the vault has no such secret or version."""


class SecretNotUsable(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """422: the secret is disabled, not yet valid or expired; the message says which."""


class TooManyRequests(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """429: over the per-caller rate limit, after the client's own retries. `retry_after` in seconds."""

    retry_after: Optional[float] = None


class UpstreamUnavailable(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """502: Key Vault or the identity endpoint failed and no usable cached copy exists."""


class AuditUnavailable(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """503: the agent could not write the audit record, so it served nothing."""


class InvalidRequest(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """400: bad secret name, bad version, unknown vault alias or parameter."""


class _OtherAgentError(KvbrokerError, *_HTTP_BASES):  # type: ignore[misc]
    """Any other answer (unknown path, oversized request, a code this client does not know)."""


_BY_CODE: Dict[str, Type[KvbrokerError]] = {
    "PermissionDenied": PermissionDenied,
    "SecretNotFound": SecretNotFound,
    "SecretNotUsable": SecretNotUsable,
    "TooManyRequests": TooManyRequests,
    "UpstreamUnavailable": UpstreamUnavailable,
    "AuditUnavailable": AuditUnavailable,
    "InvalidRequest": InvalidRequest,
}


def from_response(status: int, reason: str, headers: Dict[str, str], body: bytes) -> KvbrokerError:
    """The exception for a non-2xx answer. Reads only the error body, which holds no value."""
    request_id = headers.get("x-request-id")
    code: Optional[str] = None
    message = f"the agent answered {status} {reason}".rstrip()
    try:
        detail = json.loads(body.decode("utf-8"))["error"]
        code = str(detail["code"])
        message = str(detail.get("message") or message)
        request_id = str(detail.get("request_id") or request_id or "") or None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    cls = _BY_CODE.get(code or "", _OtherAgentError)
    err = cls(message, code=code, request_id=request_id, status_code=status, reason=reason)
    if isinstance(err, TooManyRequests):
        err.retry_after = parse_retry_after(headers)
    return err


def parse_retry_after(headers: Dict[str, str]) -> Optional[float]:
    raw = headers.get("retry-after", "").strip()
    try:
        secs = float(raw)
    except ValueError:
        return None
    return secs if secs >= 0 else None
