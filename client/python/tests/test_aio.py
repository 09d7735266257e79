"""`kvbroker.aio.SecretClient`: the asyncio twin, against the real agent."""

from __future__ import annotations

import asyncio

import pytest

import kvbroker
import kvbroker.aio
from conftest import Stack, canary, expect_value


def test_async_get_secret_fields_errors_and_keep_alive(stack: Stack) -> None:
    async def main() -> None:
        async with kvbroker.aio.SecretClient(stack.socket) as client:
            secret = await client.get_secret("db-password")
            expect_value(secret.value, stack.values["db-password"], "async value")
            assert secret.name == "db-password" and secret.properties.vault == "default"
            stream = client._conn._streams
            assert stream is not None
            # Concurrent reads take turns on the one connection.
            both = await asyncio.gather(client.get_secret("api-token"), client.get_secret("DB-PASSWORD"))
            expect_value(both[0].value, stack.values["api-token"], "concurrent 1")
            expect_value(both[1].value, stack.values["db-password"], "concurrent 2")
            assert client._conn._streams is stream
            with pytest.raises(kvbroker.PermissionDenied) as denied:
                await client.get_secret("payroll-key")
            assert denied.value.request_id and denied.value.status_code == 403
            with pytest.raises(kvbroker.SecretNotFound):
                await client.get_secret("nowhere-async")
            with pytest.raises(kvbroker.InvalidRequest):
                await client.get_secret("no spaces")
        with pytest.raises(kvbroker.AgentUnreachable) as info:
            await kvbroker.aio.SecretClient(stack.socket + ".missing").get_secret("db-password")
        assert info.value.socket == stack.socket + ".missing"

    asyncio.run(main())


def test_async_watch_and_reconnect_across_restart(workdir) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = canary("a1"), canary("a2")
    stack = Stack(workdir, {"rot-key": v1})

    async def main() -> None:
        client = kvbroker.aio.SecretClient(stack.socket)
        watch = client.watch("rot-key", wait=2)
        first = await asyncio.wait_for(watch.__anext__(), 20)
        expect_value(first.value, v1, "async watch first")
        # The next long poll is pending while the agent restarts and the secret rotates.
        pending = asyncio.ensure_future(watch.__anext__())
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, stack.agent.restart)
        version2 = await asyncio.get_running_loop().run_in_executor(None, stack.emu.set_secret, "rot-key", v2)
        second = await asyncio.wait_for(pending, 20)
        expect_value(second.value, v2, "async watch after restart")
        assert second.properties.version == version2
        # The kept-alive get_secret connection died with the old agent: reopened transparently.
        expect_value((await client.get_secret("rot-key")).value, v2, "async read after restart")
        await watch.aclose()
        await client.close()

    try:
        asyncio.run(main())
        stack.assert_no_canary([v2])
    finally:
        stack.stop()


def test_async_429_retry(workdir) -> None:  # type: ignore[no-untyped-def]
    value = canary("arate")
    stack = Stack(workdir, {"db-password": value}, extra="\n[limits]\nrate_per_second = 1\nburst = 1\n")

    async def main() -> None:
        patient = kvbroker.aio.SecretClient(stack.socket)
        impatient = kvbroker.aio.SecretClient(stack.socket, max_retries=0)
        expect_value((await patient.get_secret("db-password")).value, value, "first")
        with pytest.raises(kvbroker.TooManyRequests):
            await impatient.get_secret("db-password")
        expect_value((await patient.get_secret("db-password")).value, value, "after Retry-After")
        await patient.close()
        await impatient.close()

    try:
        asyncio.run(main())
    finally:
        stack.stop()
