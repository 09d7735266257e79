"""The blocking `SecretClient`: one kept-alive connection to the agent, reopened as needed."""

from __future__ import annotations

import errno
import os
import socket as _socket
import threading
import time
from typing import Dict, Iterator, Optional, Union

from . import _http
from ._errors import AgentUnreachable, KvbrokerError, TooManyRequests, from_response
from ._models import KeyVaultSecret, secret_from_body

DEFAULT_SOCKET = "/run/kvbroker/agent.sock"

# Answers a watch outlives: the agent restarting (502 while the vault is unreachable, 503 while
# audit cannot be written) or a rate limit. Anything else (403, 404, 400) ends the watch.
_TRANSIENT = (429, 502, 503)


def resolve_socket(socket: Union[str, "os.PathLike[str]", None]) -> str:
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get("KVBROKER_SOCKET") or DEFAULT_SOCKET


def unreachable(path: str, err: BaseException) -> AgentUnreachable:
    """An `AgentUnreachable` whose message says what to do about `err`."""
    if isinstance(err, FileNotFoundError):
        why = "no such socket: is the agent running? Set KVBROKER_SOCKET to its socket path"
    elif isinstance(err, ConnectionRefusedError):
        why = "nothing is listening there: the agent is not running (the socket file is stale)"
    elif isinstance(err, PermissionError):
        why = ("this user may not open it: run the job in the socket's group, "
               "or ask the operator (kvbroker ctl status shows the socket's mode and group)")
    elif isinstance(err, (_socket.timeout, TimeoutError)):
        why = "the agent did not answer in time"
    elif isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        why = "the socket path is too long for a Unix socket (108 bytes): use a shorter path"
    else:
        why = f"{type(err).__name__}: {err}"
    return AgentUnreachable(f"cannot reach the kvbroker agent at {path}: {why}", socket=path)


class _Connection:
    """One Unix stream socket with HTTP/1.1 keep-alive; not thread-safe (callers lock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: Optional[_socket.socket] = None
        # The process that opened `_sock`. The agent serves a connection to exactly one
        # writing process (a second writer is refused as a borrowed connection), so a child
        # forked after a read — a PyTorch DataLoader worker, a multiprocessing pool — must
        # open its own connection instead of writing on the inherited one.
        self._pid = 0

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def request(self, path: str, timeout: float, headers: Optional[Dict[str, str]] = None) -> _http.Response:
        """One GET. A kept-alive connection the agent closed (it restarted, or timed the idle
        connection out) is reopened and the GET sent again, once, if no answer byte came back."""
        data = _http.request_bytes(path, headers)
        if self._sock is not None and self._pid != os.getpid():
            # Inherited across fork: closing our copy of the fd leaves the parent's open.
            self.close()
        for attempt in (0, 1):
            if self._sock is None:
                self._open(timeout)
            sock = self._sock
            assert sock is not None
            parser = _http.ResponseParser()
            try:
                sock.settimeout(timeout)
                sock.sendall(data)
                while not parser.done:
                    chunk = sock.recv(65536)
                    if chunk:
                        parser.feed(chunk)
                    else:
                        parser.feed_eof()
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
                self.close()
                if attempt == 0 and not parser.received_any:
                    continue
                raise unreachable(self.path, e) from None
            except (OSError, _socket.timeout) as e:
                self.close()
                raise unreachable(self.path, e) from None
            except _http.ProtocolError as e:
                self.close()
                raise KvbrokerError(f"the agent at {self.path} sent a malformed answer: {e}") from None
            response = parser.response()
            if not response.keep_alive:
                self.close()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _open(self, timeout: float) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise unreachable(self.path, e) from None
        self._sock = sock
        self._pid = os.getpid()


class SecretClient:
    """Reads secrets from the node's kvbroker agent, like azure-keyvault-secrets' `SecretClient`.

    `socket` defaults to `KVBROKER_SOCKET`, else `/run/kvbroker/agent.sock`. A 429 is retried
    after its `Retry-After` (each wait capped at `max_retry_wait` seconds) up to `max_retries`
    times. Safe to share between threads (requests take turns on one connection).
    """

    def __init__(self, socket: Union[str, "os.PathLike[str]", None] = None, *, timeout: float = 30.0,
                 max_retries: int = 3, max_retry_wait: float = 10.0) -> None:
        self.socket = resolve_socket(socket)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._conn = _Connection(self.socket)
        self._lock = threading.Lock()

    def get_secret(self, name: str, version: Optional[str] = None, *,
                   vault: Optional[str] = None) -> KeyVaultSecret:
        """The secret's current value, or `version` (32 hex characters). Raises a `KvbrokerError`."""
        return self._get(_http.secret_path(name, version=version, vault=vault))

    def watch(self, name: str, *, vault: Optional[str] = None, changed_from: Optional[str] = None,
              wait: int = 60) -> Iterator[KeyVaultSecret]:
        """Yields the secret now (unless `changed_from` names a version), then each new version
        as soon as the agent caches it. Survives agent restarts (reconnects with backoff);
        ends with an exception on a lasting error (403, 404, 400). Uses its own connection."""
        if not 1 <= wait <= 300:
            raise ValueError("wait must be 1..300 seconds")
        conn = _Connection(self.socket)
        try:
            current = changed_from
            if current is None:
                first = self.get_secret(name, vault=vault)
                current = first.properties.version
                yield first
            backoff = _Backoff()
            while True:
                path = _http.secret_path(name, vault=vault, changed_from=current, wait=wait)
                try:
                    response = conn.request(path, timeout=wait + self.timeout)
                except AgentUnreachable:
                    time.sleep(backoff.next())
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
                time.sleep(delay)
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "SecretClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvbroker.SecretClient socket={self.socket!r}>"

    def _get(self, path: str) -> KeyVaultSecret:
        attempt = 0
        while True:
            with self._lock:
                response = self._conn.request(path, timeout=self.timeout)
            if response.status == 200:
                try:
                    return secret_from_body(response.body)
                except ValueError as e:
                    raise KvbrokerError(f"the agent at {self.socket}: {e}") from None
            err = from_response(response.status, response.reason, response.headers, response.body)
            if isinstance(err, TooManyRequests) and attempt < self.max_retries:
                attempt += 1
                time.sleep(retry_delay(err, self.max_retry_wait))
                continue
            raise err


def retry_delay(err: TooManyRequests, cap: float) -> float:
    wait = err.retry_after if err.retry_after is not None else 1.0
    return max(0.0, min(wait, cap))


class _Backoff:
    """0.1 s doubling to 5 s, for reconnecting to a restarting agent."""

    def __init__(self) -> None:
        self._next = 0.1

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, 5.0)
        return delay

    def reset(self) -> None:
        self._next = 0.1
