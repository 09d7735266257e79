"""kvbroker: read secrets from the node's kvbroker agent, like azure-keyvault-secrets.

    from kvbroker import SecretClient
    secret = SecretClient().get_secret("db-password")   # KVBROKER_SOCKET or the default path

See docs/python.md in the kvbroker repository. `KVBROKER_REDACT=1` installs log redaction
(`kvbroker.redact.install()`) on import.
"""

import os as _os

from . import redact
from ._client import DEFAULT_SOCKET, SecretClient
from ._errors import (
    AgentUnreachable,
    AuditUnavailable,
    InvalidRequest,
    KvbrokerError,
    PermissionDenied,
    SecretNotFound,
    SecretNotUsable,
    TooManyRequests,
    UpstreamUnavailable,
)
from ._models import KeyVaultSecret, SecretProperties

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "SecretClient",
    "KeyVaultSecret",
    "SecretProperties",
    "KvbrokerError",
    "AgentUnreachable",
    "PermissionDenied",
    "SecretNotFound",
    "SecretNotUsable",
    "TooManyRequests",
    "UpstreamUnavailable",
    "AuditUnavailable",
    "InvalidRequest",
    "redact",
]

if _os.environ.get("KVBROKER_REDACT") == "1":
    redact.install()
