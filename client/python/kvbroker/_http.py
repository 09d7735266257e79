"""HTTP/1.1 on the agent socket, without I/O: request bytes out, response bytes in.

The sync and async clients share this parser; each only moves bytes. The agent (hyper) answers
with `Content-Length` bodies; chunked bodies and read-to-EOF bodies are handled too, so a
proxy in between cannot confuse us. Nothing here logs or formats a body: it may be a value.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlencode

# A response head larger than this is not the agent's (its heads are a few hundred bytes).
MAX_HEAD = 64 * 1024
# The largest Key Vault secret is 25 KiB; JSON escaping can grow it 6x. Generous, but bounded.
MAX_BODY = 4 * 1024 * 1024


class ProtocolError(Exception):
    """The bytes on the socket are not an HTTP/1.1 answer we can trust."""


class Response:
    """A parsed answer. `body` may hold a secret value: never format it."""

    __slots__ = ("status", "reason", "headers", "body", "keep_alive")

    def __init__(self, status: int, reason: str, headers: Dict[str, str], body: bytes, keep_alive: bool):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason!r} ({len(self.body)} body bytes)>"


def secret_path(name: str, *, version: Optional[str] = None, vault: Optional[str] = None,
                changed_from: Optional[str] = None, wait: Optional[int] = None) -> str:
    """`/v1/secrets/NAME?...`; the agent checks the name, so any string is escaped, not refused."""
    query: List[Tuple[str, str]] = []
    if vault is not None:
        query.append(("vault", vault))
    if version is not None:
        query.append(("version", version))
    if changed_from is not None:
        query.append(("changed_from", changed_from))
    if wait is not None:
        query.append(("wait", str(wait)))
    path = "/v1/secrets/" + quote(name, safe="")
    if query:
        path += "?" + urlencode(query)
    return path


def request_bytes(path: str, headers: Optional[Mapping[str, str]] = None) -> bytes:
    """A GET with no body, keep-alive (HTTP/1.1's default)."""
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "User-Agent: kvbroker-python"]
    for key, value in (headers or {}).items():
        if "\r" in key + value or "\n" in key + value:
            raise ValueError("header names and values cannot contain line breaks")
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseParser:
    """Feed it bytes with `feed()` (and `feed_eof()` at EOF) until `done`; then `response()`.

    `method_is_head` is not needed: we only send GET.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: Optional[Tuple[int, str, Dict[str, str], bool]] = None
        self._body = bytearray()
        self._mode = "head"  # head | length | chunked | eof | done
        self._remaining = 0
        self._chunk_state = "size"  # size | data | data_crlf | trailer
        self.received_any = False
        self.done = False

    def feed(self, data: bytes) -> None:
        if data:
            self.received_any = True
        self._buf += data
        self._advance()

    def feed_eof(self) -> None:
        """The peer closed. Completes a read-to-EOF body; anything else unfinished is an error."""
        if self.done:
            return
        if self._mode == "eof":
            self._body += self._buf
            self._buf.clear()
            self._finish()
            return
        if not self.received_any:
            raise ConnectionResetError("the agent closed the connection before answering")
        raise ProtocolError("the agent closed the connection in the middle of an answer")

    def response(self) -> Response:
        if not self.done or self._head is None:
            raise ProtocolError("incomplete response")
        status, reason, headers, keep_alive = self._head
        return Response(status, reason, headers, bytes(self._body), keep_alive)

    # === the state machine ===

    def _advance(self) -> None:
        progressed = True
        while progressed and not self.done:
            progressed = False
            if self._mode == "head":
                progressed = self._parse_head()
            elif self._mode == "length":
                take = min(self._remaining, len(self._buf))
                if take:
                    self._body += self._buf[:take]
                    del self._buf[:take]
                    self._remaining -= take
                if self._remaining == 0:
                    self._finish()
            elif self._mode == "chunked":
                progressed = self._parse_chunk()
            elif self._mode == "eof":
                self._body += self._buf
                self._buf.clear()
                self._check_body_size()

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError("response head too large")
            return False
        raw = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        lines = raw.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        http10 = parts[0] == "HTTP/1.0"
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if line[:1] in (" ", "\t"):
                raise ProtocolError("obsolete header line folding")
            key, sep, value = line.partition(":")
            if not sep or not key or key != key.strip():
                raise ProtocolError(f"malformed header line: {line[:80]!r}")
            key = key.lower()
            value = value.strip(" \t")
            if key in headers:
                if key == "content-length" and headers[key] != value:
                    raise ProtocolError("conflicting Content-Length headers")
                headers[key] = value if key == "content-length" else headers[key] + ", " + value
            else:
                headers[key] = value
        if 100 <= status < 200:
            # An interim answer (the agent sends none): skip it and read the real one.
            return True
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in connection and (not http10 or "keep-alive" in connection)
        self._head = (status, reason, headers, keep_alive)
        te = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            self._finish()
        elif te:
            if te.split(",")[-1].strip() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {te!r}")
            self._mode = "chunked"
        elif "content-length" in headers:
            cl = headers["content-length"]
            if not cl.isdigit():
                raise ProtocolError(f"bad Content-Length {cl[:40]!r}")
            self._remaining = int(cl)
            if self._remaining > MAX_BODY:
                raise ProtocolError("response body too large")
            self._mode = "length"
        else:
            self._mode = "eof"
            self._head = (status, reason, headers, False)
        return True

    def _parse_chunk(self) -> bool:
        if self._chunk_state == "size":
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > 1024:
                    raise ProtocolError("chunk size line too long")
                return False
            line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
            del self._buf[: end + 2]
            try:
                size = int(line, 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size < 0:
                raise ProtocolError("bad chunk size")
            if size == 0:
                self._chunk_state = "trailer"
            else:
                self._remaining = size
                self._chunk_state = "data"
            return True
        if self._chunk_state == "data":
            take = min(self._remaining, len(self._buf))
            if take == 0:
                return False
            self._body += self._buf[:take]
            del self._buf[:take]
            self._remaining -= take
            self._check_body_size()
            if self._remaining == 0:
                self._chunk_state = "data_crlf"
            return True
        if self._chunk_state == "data_crlf":
            if len(self._buf) < 2:
                return False
            if self._buf[:2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del self._buf[:2]
            self._chunk_state = "size"
            return True
        # trailer: header lines until an empty line
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError("chunk trailer too large")
            return False
        del self._buf[: end + 2]
        if end == 0:
            self._finish()
        return True

    def _check_body_size(self) -> None:
        if len(self._body) > MAX_BODY:
            raise ProtocolError("response body too large")

    def _finish(self) -> None:
        self._mode = "done"
        self.done = True
        if self._buf and self._head is not None:
            # Bytes after the answer to our one request: the connection cannot be trusted.
            status, reason, headers, _ = self._head
            self._head = (status, reason, headers, False)
