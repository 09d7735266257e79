"""`kvbroker.SecretClient` against the real agent: fields, errors, retries, reconnects."""

from __future__ import annotations

import os
import pickle
import re
import time
from datetime import datetime, timezone

import pytest

import kvbroker
from conftest import Stack, canary, expect_no_canary, expect_value


def test_get_secret_fills_every_field_like_azure_keyvault_secrets(stack: Stack) -> None:
    value = canary("fields")
    nbf, exp = 1_700_000_000, 4_102_444_800  # 2023-11-14T22:13:20Z, 2100-01-01T00:00:00Z
    version = stack.emu.set_secret("field-Secret", value, content_type="text/plain", nbf=nbf, exp=exp)
    client = kvbroker.SecretClient(stack.socket)
    try:
        # Names are case-insensitive; the answer spells it as the vault does.
        secret = client.get_secret("FIELD-secret")
    finally:
        client.close()
    expect_value(secret.value, value, "value")
    assert secret.name == "field-Secret"
    props = secret.properties
    assert props.name == "field-Secret"
    assert props.version == version and re.fullmatch(r"[0-9a-f]{32}", version)
    assert props.vault == "default"
    assert props.content_type == "text/plain"
    assert props.not_before == datetime.fromtimestamp(nbf, timezone.utc)
    assert props.expires_on == datetime(2100, 1, 1, tzinfo=timezone.utc)
    assert props.not_before.tzinfo is not None and props.expires_on.tzinfo is not None
    assert props.stale is False
    assert props.enabled is True
    assert props.fetched_at is not None and abs(
        (datetime.now(timezone.utc) - props.fetched_at).total_seconds()) < 120
    assert secret.id == props.id == f"kvbroker://default/secrets/field-Secret/{version}"
    stack.assert_no_canary([value])


def test_repr_and_str_never_show_the_value(stack: Stack) -> None:
    with kvbroker.SecretClient(stack.socket) as client:
        secret = client.get_secret("db-password")
    value = stack.values["db-password"]
    for text in (repr(secret), str(secret), f"{secret}", repr(secret.properties), str([secret]),
                 str({"s": secret})):
        expect_no_canary(text, [value], "repr/str of a secret")
        assert "db-password" in text
    # azure-keyvault-secrets' objects pickle; so do ours (for multiprocessing), value included.
    expect_value(pickle.loads(pickle.dumps(secret)).value, value, "pickled value")


def test_a_pinned_version_and_defaults(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBROKER_SOCKET", stack.socket)
    client = kvbroker.SecretClient()
    assert client.socket == stack.socket
    monkeypatch.delenv("KVBROKER_SOCKET")
    assert kvbroker.SecretClient().socket == "/run/kvbroker/agent.sock"
    first = stack.emu.set_secret("rot-pinned", canary("pin1"))
    try:
        current = client.get_secret("rot-pinned", vault="default")
        assert current.properties.version == first
        pinned = client.get_secret("rot-pinned", first)
        assert pinned.properties.version == first
    finally:
        client.close()


def test_each_agent_error_code_raises_its_class(stack: Stack) -> None:
    stack.emu.set_secret("off-switch", canary("off"), enabled=False)
    stack.emu.set_secret("old-cert", canary("old"), exp=1_000_000_000)  # 2001
    stack.emu.set_secret("later-key", canary("later"), nbf=4_102_444_800)  # 2100
    cases = [
        ("payroll-key", {}, kvbroker.PermissionDenied, 403, "PermissionDenied"),  # exists, not allowed
        ("nowhere-to-be-found", {}, kvbroker.SecretNotFound, 404, "SecretNotFound"),
        ("db-password", {"version": "0123456789abcdef0123456789abcdef"}, kvbroker.SecretNotFound, 404,
         "SecretNotFound"),
        ("off-switch", {}, kvbroker.SecretNotUsable, 422, "SecretNotUsable"),
        ("old-cert", {}, kvbroker.SecretNotUsable, 422, "SecretNotUsable"),
        ("later-key", {}, kvbroker.SecretNotUsable, 422, "SecretNotUsable"),
        ("bad_name!", {}, kvbroker.InvalidRequest, 400, "InvalidRequest"),
        ("db-password", {"vault": "nope"}, kvbroker.InvalidRequest, 400, "InvalidRequest"),
        ("db-password", {"version": "not-hex"}, kvbroker.InvalidRequest, 400, "InvalidRequest"),
    ]
    with kvbroker.SecretClient(stack.socket) as client:
        for name, kwargs, cls, status, code in cases:
            with pytest.raises(cls) as info:
                client.get_secret(name, **kwargs)
            err = info.value
            assert isinstance(err, kvbroker.KvbrokerError)
            assert (err.status_code, err.code) == (status, code), name
            assert re.fullmatch(r"[0-9a-f]{32}", err.request_id or ""), name
            assert err.message and err.request_id in str(err)
            # The request id is the audit record's.
            assert f'"request_id":"{err.request_id}"' in stack.agent.audit.read_text()
    # The connection survived every error answer.
    stack.assert_no_canary([])


def test_not_usable_says_which(stack: Stack) -> None:
    stack.emu.set_secret("off-which", canary("offw"), enabled=False)
    with kvbroker.SecretClient(stack.socket) as client:
        with pytest.raises(kvbroker.SecretNotUsable) as info:
            client.get_secret("off-which")
    assert "disabled" in info.value.message


def test_unreachable_names_the_socket(workdir) -> None:  # type: ignore[no-untyped-def]
    missing = str(workdir / "no-agent.sock")
    with pytest.raises(kvbroker.AgentUnreachable) as info:
        kvbroker.SecretClient(missing).get_secret("db-password")
    assert info.value.socket == missing
    assert missing in str(info.value) and "KVBROKER_SOCKET" in str(info.value)
    assert isinstance(info.value, kvbroker.KvbrokerError)
    # A stale socket file with nothing listening.
    import socket as s

    stale = workdir / "stale.sock"
    sock = s.socket(s.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(kvbroker.AgentUnreachable, match="not running"):
        kvbroker.SecretClient(stale).get_secret("db-password")


def test_keeps_one_connection_alive_across_reads(stack: Stack) -> None:
    with kvbroker.SecretClient(stack.socket) as client:
        client.get_secret("db-password")
        first = client._conn._sock
        assert first is not None
        client.get_secret("api-token")
        with pytest.raises(kvbroker.SecretNotFound):
            client.get_secret("nowhere-else")
        client.get_secret("db-password")
        assert client._conn._sock is first


def test_a_forked_child_opens_its_own_connection(stack: Stack) -> None:
    """The agent refuses a second process writing on a connection (a borrowed connection);
    a child forked after the parent's read (DataLoader workers, multiprocessing) must not
    reuse the inherited socket, and the parent's connection must survive the child."""
    with kvbroker.SecretClient(stack.socket) as client:
        client.get_secret("db-password")
        first = client._conn._sock
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                client.get_secret("db-password")
                if client._conn._sock is first:
                    code = 3
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.get_secret("db-password")
        assert client._conn._sock is first, "the parent keeps its own connection"


def test_reconnects_transparently_after_an_agent_restart(workdir) -> None:  # type: ignore[no-untyped-def]
    value = canary("restart")
    stack = Stack(workdir, {"db-password": value})
    try:
        client = kvbroker.SecretClient(stack.socket)
        expect_value(client.get_secret("db-password").value, value, "before restart")
        old = client._conn._sock
        stack.agent.restart()
        # The kept-alive connection is dead; the client reopens it without an error.
        expect_value(client.get_secret("db-password").value, value, "after restart")
        assert client._conn._sock is not old
        # While the agent is down: AgentUnreachable, naming the socket; then it works again.
        stack.agent.stop()
        with pytest.raises(kvbroker.AgentUnreachable) as info:
            client.get_secret("db-password")
        assert info.value.socket == stack.socket
        stack.agent.start()
        expect_value(client.get_secret("db-password").value, value, "after second start")
        client.close()
        stack.assert_no_canary()
    finally:
        stack.stop()


def test_429_is_retried_after_retry_after_then_raised(workdir) -> None:  # type: ignore[no-untyped-def]
    value = canary("rate")
    stack = Stack(workdir, {"db-password": value}, extra="\n[limits]\nrate_per_second = 1\nburst = 1\n")
    try:
        patient = kvbroker.SecretClient(stack.socket)
        impatient = kvbroker.SecretClient(stack.socket, max_retries=0)
        expect_value(patient.get_secret("db-password").value, value, "first read")
        with pytest.raises(kvbroker.TooManyRequests) as info:
            impatient.get_secret("db-password")
        assert info.value.status_code == 429 and info.value.retry_after is not None
        assert info.value.retry_after >= 1
        # Over the limit again: the patient client waits Retry-After and gets the value.
        with pytest.raises(kvbroker.TooManyRequests):
            impatient.get_secret("db-password")
        start = time.monotonic()
        expect_value(patient.get_secret("db-password").value, value, "after retry")
        assert time.monotonic() - start >= 0.5, "it waited for Retry-After"
        # Bounded: with a 0 s cap and 1 retry it gives up instead of waiting forever.
        bounded = kvbroker.SecretClient(stack.socket, max_retries=1, max_retry_wait=0.0)
        with pytest.raises(kvbroker.TooManyRequests):
            for _ in range(3):
                bounded.get_secret("db-password")
        for c in (patient, impatient, bounded):
            c.close()
        stack.assert_no_canary()
    finally:
        stack.stop()


def test_upstream_unavailable_when_the_vault_is_gone_and_nothing_is_cached(workdir) -> None:  # type: ignore[no-untyped-def]
    values = {"db-password": canary("up1"), "api-token": canary("up2")}
    stack = Stack(workdir, values, vault_extra='deadline = "2s"')
    try:
        with kvbroker.SecretClient(stack.socket) as client:
            expect_value(client.get_secret("db-password").value, values["db-password"], "cached")
            stack.emu.stop()
            with pytest.raises(kvbroker.UpstreamUnavailable) as info:
                client.get_secret("api-token")  # never fetched: no cached copy
            assert info.value.status_code == 502 and info.value.request_id
            # The cached one is still served; once refresh has failed it is marked stale.
            deadline = time.monotonic() + 15
            while True:
                secret = client.get_secret("db-password")
                expect_value(secret.value, values["db-password"], "stale copy")
                if secret.properties.stale or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert secret.properties.stale is True
        stack.assert_no_canary()
    finally:
        stack.stop()


def test_audit_unavailable_when_the_audit_log_cannot_grow(workdir) -> None:  # type: ignore[no-untyped-def]
    value = canary("audit")
    # The agent's files stop growing at 8 KiB (RLIMIT_FSIZE): audit writes then fail.
    stack = Stack(workdir, {"db-password": value}, fsize_limit=8192)
    try:
        with kvbroker.SecretClient(stack.socket) as client:
            for _ in range(60):
                try:
                    expect_value(client.get_secret("db-password").value, value, "while audit works")
                except kvbroker.AuditUnavailable as err:
                    assert err.status_code == 503 and err.code == "AuditUnavailable"
                    break
            else:
                pytest.fail("audit writes never failed at the file size limit")
        stack.assert_no_canary()
    finally:
        stack.stop()


def test_works_without_azure_core() -> None:
    try:
        import azure.core  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("azure-core is installed here: test_azure_core.py covers this venv")
    assert kvbroker.SecretNotFound.__mro__[1:] == (kvbroker.KvbrokerError, Exception, BaseException, object)
    err = kvbroker.PermissionDenied("no", code="PermissionDenied", request_id="r1", status_code=403)
    assert str(err) == "no (request r1)" and err.status_code == 403
