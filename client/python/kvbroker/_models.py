"""`KeyVaultSecret` and `SecretProperties`, shaped like azure-keyvault-secrets' classes.

`repr()` and `str()` of both name the secret and its version, never the value.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Mapping, Optional

from . import redact

__all__ = ["KeyVaultSecret", "SecretProperties"]


class SecretProperties:
    """A secret's metadata as the agent served it (no value)."""

    __slots__ = ("_vault", "_name", "_version", "_content_type", "_not_before", "_expires_on",
                 "_fetched_at", "_stale")

    def __init__(self, *, vault: str, name: str, version: str, content_type: Optional[str] = None,
                 not_before: Optional[datetime] = None, expires_on: Optional[datetime] = None,
                 fetched_at: Optional[datetime] = None, stale: bool = False) -> None:
        self._vault = vault
        self._name = name
        self._version = version
        self._content_type = content_type
        self._not_before = not_before
        self._expires_on = expires_on
        self._fetched_at = fetched_at
        self._stale = stale

    @property
    def id(self) -> str:
        """`kvbroker://VAULT/secrets/NAME/VERSION` (the agent does not expose the vault URL)."""
        return f"kvbroker://{self._vault}/secrets/{self._name}/{self._version}"

    @property
    def name(self) -> str:
        """The name as the vault spells it."""
        return self._name

    @property
    def version(self) -> str:
        """The version id (32 hex characters)."""
        return self._version

    @property
    def vault(self) -> str:
        """The agent's alias for the vault (`vault=` in requests), e.g. `default`."""
        return self._vault

    @property
    def content_type(self) -> Optional[str]:
        return self._content_type

    @property
    def not_before(self) -> Optional[datetime]:
        """Timezone-aware (UTC), or None."""
        return self._not_before

    @property
    def expires_on(self) -> Optional[datetime]:
        """Timezone-aware (UTC), or None."""
        return self._expires_on

    @property
    def fetched_at(self) -> Optional[datetime]:
        """When the agent last fetched this version from the vault (UTC)."""
        return self._fetched_at

    @property
    def stale(self) -> bool:
        """True when the vault is failing and this is the agent's last good copy."""
        return self._stale

    @property
    def enabled(self) -> bool:
        """Always True: the agent serves only enabled secrets (422 otherwise)."""
        return True

    def __repr__(self) -> str:
        return f"<SecretProperties [{self.id}]>"


class KeyVaultSecret:
    """A secret: `properties` and `value`. Its repr/str never show the value."""

    __slots__ = ("_properties", "_value")

    def __init__(self, properties: SecretProperties, value: Optional[str]) -> None:
        self._properties = properties
        self._value = value

    @property
    def name(self) -> str:
        return self._properties.name

    @property
    def id(self) -> str:
        return self._properties.id

    @property
    def properties(self) -> SecretProperties:
        return self._properties

    @property
    def value(self) -> Optional[str]:
        """The secret value. A Python `str` cannot be wiped: see docs/python.md."""
        return self._value

    def __repr__(self) -> str:
        return f"<KeyVaultSecret [{self.id}], value redacted>"

    __str__ = __repr__


_TS = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$"
)


def parse_time(raw: Optional[str]) -> Optional[datetime]:
    """RFC 3339 to an aware datetime (UTC), up to nanosecond digits (truncated to microseconds)."""
    if raw is None or raw == "":
        return None
    m = _TS.match(raw)
    if not m:
        raise ValueError(f"not an RFC 3339 timestamp: {raw[:40]!r}")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    if m.group(8):
        tz = timezone.utc
    else:
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = timezone(offset if m.group(9) == "+" else -offset)
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(timezone.utc)


def properties_from(doc: Mapping[str, Any]) -> SecretProperties:
    return SecretProperties(
        vault=str(doc["vault"]),
        name=str(doc["name"]),
        version=str(doc["version"]),
        content_type=doc.get("content_type"),
        not_before=parse_time(doc.get("not_before")),
        expires_on=parse_time(doc.get("expires_on")),
        fetched_at=parse_time(doc.get("fetched_at")),
        stale=bool(doc.get("stale", False)),
    )


def secret_from_body(body: bytes) -> KeyVaultSecret:
    """Parses a 200 answer and registers its value for redaction before anyone can log it."""
    try:
        doc: Dict[str, Any] = json.loads(body.decode("utf-8"))
        value = doc["value"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        # Never quote the body: it may hold the value.
        raise ValueError("the agent's answer is not a secret document") from None
    if isinstance(value, str):
        redact.register(value)
    return KeyVaultSecret(properties_from(doc), value)
