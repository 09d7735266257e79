"""`SecretClient.watch` (long poll) through rotations and agent restarts."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import pytest

import kvbroker
from conftest import Stack, canary, expect_value


class Watcher:
    """Runs `client.watch(name)` in a thread, handing each secret (or the error) to a queue."""

    def __init__(self, client: kvbroker.SecretClient, name: str, **kw: object) -> None:
        self.items: "queue.Queue[object]" = queue.Queue()
        self._gen: Iterator[kvbroker.KeyVaultSecret] = client.watch(name, wait=2, **kw)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for secret in self._gen:
                self.items.put(secret)
        except BaseException as e:  # handed to the test
            self.items.put(e)

    def next(self, timeout: float = 20) -> kvbroker.KeyVaultSecret:
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"watch yielded nothing within {timeout} s") from None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, kvbroker.KeyVaultSecret)
        return item

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.items.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def test_watch_yields_the_current_secret_then_each_rotation(workdir) -> None:  # type: ignore[no-untyped-def]
    v1, v2, v3 = canary("w1"), canary("w2"), canary("w3")
    stack = Stack(workdir, {"rot-key": v1})
    try:
        client = kvbroker.SecretClient(stack.socket)
        w = Watcher(client, "rot-key")
        first = w.next()
        expect_value(first.value, v1, "current value")
        # Long polls that end with 304 (wait=2) yield nothing.
        assert w.nothing_for(3), "no rotation, nothing yielded"
        version2 = stack.emu.set_secret("rot-key", v2)
        second = w.next()
        expect_value(second.value, v2, "rotated value")
        assert second.properties.version == version2 != first.properties.version
        version3 = stack.emu.set_secret("rot-key", v3)
        third = w.next()
        expect_value(third.value, v3, "second rotation")
        assert third.properties.version == version3
        # The watch used its own connection: the client's is free for reads meanwhile.
        expect_value(client.get_secret("rot-key").value, v3, "read during watch")
        stack.assert_no_canary([v2, v3])
    finally:
        stack.stop()


def test_watch_from_a_known_version_resumes_across_an_agent_restart(workdir) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = canary("r1"), canary("r2")
    stack = Stack(workdir, {"rot-key": v1})
    try:
        client = kvbroker.SecretClient(stack.socket)
        start = client.get_secret("rot-key").properties.version
        w = Watcher(client, "rot-key", changed_from=start)
        assert w.nothing_for(1), "changed_from the current version: nothing yet"
        stack.agent.stop()
        assert w.nothing_for(1.5), "the agent is down: the watch waits, it does not fail"
        version2 = stack.emu.set_secret("rot-key", v2)
        stack.agent.start()
        second = w.next()
        expect_value(second.value, v2, "value after restart")
        assert second.properties.version == version2
        stack.assert_no_canary([v2])
    finally:
        stack.stop()


def test_watch_ends_with_the_error_when_the_secret_is_denied(stack: Stack) -> None:
    client = kvbroker.SecretClient(stack.socket)
    with pytest.raises(kvbroker.PermissionDenied):
        next(iter(client.watch("payroll-key", wait=1)))
    w = Watcher(client, "payroll-key", changed_from="0" * 32)
    with pytest.raises(kvbroker.PermissionDenied):
        w.next()
    with pytest.raises(ValueError):
        next(iter(client.watch("db-password", wait=0)))
