"""`kvbroker.aio.SecretClient`: the same requests over `asyncio.open_unix_connection`."""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Optional, Tuple, Union

from .. import _http
from .._client import _TRANSIENT, _Backoff, resolve_socket, retry_delay, unreachable
from .._errors import AgentUnreachable, KvbrokerError, TooManyRequests, from_response
from .._models import KeyVaultSecret, secret_from_body


class _Connection:
    """One kept-alive stream; callers serialise requests on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._streams: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def request(self, path: str, timeout: float) -> _http.Response:
        """As the blocking client: one transparent retry when a kept-alive connection was
        closed before any answer byte."""
        data = _http.request_bytes(path)
        for attempt in (0, 1):
            if self._streams is None:
                try:
                    self._streams = await asyncio.wait_for(asyncio.open_unix_connection(self.path), timeout)
                except (OSError, asyncio.TimeoutError) as e:
                    raise unreachable(self.path, e if isinstance(e, OSError) else TimeoutError()) from None
            reader, writer = self._streams
            parser = _http.ResponseParser()
            try:
                await asyncio.wait_for(self._exchange(reader, writer, data, parser), timeout)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
                await self.close()
                if attempt == 0 and not parser.received_any:
                    continue
                raise unreachable(self.path, e) from None
            except asyncio.TimeoutError:
                await self.close()
                raise unreachable(self.path, TimeoutError()) from None
            except OSError as e:
                await self.close()
                raise unreachable(self.path, e) from None
            except _http.ProtocolError as e:
                await self.close()
                raise KvbrokerError(f"the agent at {self.path} sent a malformed answer: {e}") from None
            except asyncio.CancelledError:
                # The connection is mid-exchange: it cannot carry the next request.
                await self.close()
                raise
            response = parser.response()
            if not response.keep_alive:
                await self.close()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                        parser: _http.ResponseParser) -> None:
        writer.write(data)
        await writer.drain()
        while not parser.done:
            chunk = await reader.read(65536)
            if chunk:
                parser.feed(chunk)
            else:
                parser.feed_eof()


class SecretClient:
    """The asyncio `SecretClient`: `await client.get_secret(name)`, `async for s in client.watch(name)`."""

    def __init__(self, socket: Union[str, "os.PathLike[str]", None] = None, *, timeout: float = 30.0,
                 max_retries: int = 3, max_retry_wait: float = 10.0) -> None:
        self.socket = resolve_socket(socket)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._conn = _Connection(self.socket)
        self._lock: Optional[asyncio.Lock] = None

    async def get_secret(self, name: str, version: Optional[str] = None, *,
                         vault: Optional[str] = None) -> KeyVaultSecret:
        """The secret's current value, or `version`. Raises a `KvbrokerError`."""
        path = _http.secret_path(name, version=version, vault=vault)
        attempt = 0
        while True:
            async with self._get_lock():
                response = await self._conn.request(path, self.timeout)
            if response.status == 200:
                try:
                    return secret_from_body(response.body)
                except ValueError as e:
                    raise KvbrokerError(f"the agent at {self.socket}: {e}") from None
            err = from_response(response.status, response.reason, response.headers, response.body)
            if isinstance(err, TooManyRequests) and attempt < self.max_retries:
                attempt += 1
                await asyncio.sleep(retry_delay(err, self.max_retry_wait))
                continue
            raise err

    async def watch(self, name: str, *, vault: Optional[str] = None, changed_from: Optional[str] = None,
                    wait: int = 60) -> AsyncIterator[KeyVaultSecret]:
        """As `kvbroker.SecretClient.watch`, as an async generator."""
        if not 1 <= wait <= 300:
            raise ValueError("wait must be 1..300 seconds")
        conn = _Connection(self.socket)
        try:
            current = changed_from
            if current is None:
                first = await self.get_secret(name, vault=vault)
                current = first.properties.version
                yield first
            backoff = _Backoff()
            while True:
                path = _http.secret_path(name, vault=vault, changed_from=current, wait=wait)
                try:
                    response = await conn.request(path, wait + self.timeout)
                except AgentUnreachable:
                    await asyncio.sleep(backoff.next())
                    continue
                if response.status == 304:
                    backoff.reset()
                    continue
                if response.status == 200:
                    backoff.reset()
                    secret = secret_from_body(response.body)
                    if secret.properties.version != current:
                        current = secret.properties.version
                        yield secret
                    continue
                err = from_response(response.status, response.reason, response.headers, response.body)
                if response.status not in _TRANSIENT:
                    raise err
                delay = backoff.next()
                if isinstance(err, TooManyRequests) and err.retry_after is not None:
                    delay = min(max(err.retry_after, delay), self.max_retry_wait)
                await asyncio.sleep(delay)
        finally:
            await conn.close()

    async def close(self) -> None:
        async with self._get_lock():
            await self._conn.close()

    async def __aenter__(self) -> "SecretClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<kvbroker.aio.SecretClient socket={self.socket!r}>"

    def _get_lock(self) -> asyncio.Lock:
        # Created on first use, inside the running loop (Python 3.9 binds a Lock to a loop).
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock
