"""The HTTP/1.1 response parser alone (the agent sends Content-Length; the rest is defence)."""

from __future__ import annotations

import pytest

from kvbroker import _http


def parse(data: bytes, *, step: int = 1, eof: bool = False) -> _http.Response:
    p = _http.ResponseParser()
    for i in range(0, len(data), step):  # byte by byte: every split point is exercised
        p.feed(data[i:i + step])
    if eof:
        p.feed_eof()
    assert p.done
    return p.response()


def test_content_length_body_split_anywhere() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: ab\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\nhello"
    r = parse(raw)
    assert (r.status, r.reason, r.body, r.keep_alive) == (200, "OK", b"hello", True)
    assert r.headers["x-request-id"] == "ab" and r.headers["x-dup"] == "1, 2"


def test_chunked_body_with_extensions_and_trailer() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nT: 1\r\n\r\n"
    assert parse(raw).body == b"hello"


def test_no_body_statuses_interim_answers_and_close() -> None:
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n").body == b""
    r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
    assert (r.status, r.body, r.keep_alive) == (200, b"x", False)
    r = parse(b"HTTP/1.1 200 OK\r\n\r\nuntil eof", eof=True)
    assert (r.body, r.keep_alive) == (b"until eof", False)


def test_eof_and_garbage() -> None:
    p = _http.ResponseParser()
    with pytest.raises(ConnectionResetError):
        p.feed_eof()  # nothing received: the caller may retry
    p = _http.ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")
    with pytest.raises(_http.ProtocolError):
        p.feed_eof()  # mid-answer: never retried
    for bad in (b"SSH-2.0-x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"):
        with pytest.raises(_http.ProtocolError):
            _http.ResponseParser().feed(bad)


def test_request_escapes_names_and_refuses_header_injection() -> None:
    assert _http.secret_path("a/b c", vault="v", changed_from="0" * 32, wait=5) == (
        "/v1/secrets/a%2Fb%20c?vault=v&changed_from=" + "0" * 32 + "&wait=5")
    assert _http.request_bytes("/x").startswith(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    with pytest.raises(ValueError):
        _http.request_bytes("/x", {"A": "b\r\nEvil: 1"})
