"""The asyncio twin of `kvbroker.SecretClient` (standard library only)."""

from ._client import SecretClient

__all__ = ["SecretClient"]
