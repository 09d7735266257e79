"""`kvbroker.redact`: values received from the agent never reach a log, in any common encoding.

Each scenario runs in a fresh interpreter (`python -c`) whose stderr is the captured log, so
logging state never leaks between tests. Assertions scan for the canary in every form and
never print what they scanned.
"""

from __future__ import annotations

import base64
import json
import textwrap
from typing import List
from urllib.parse import quote, quote_plus

from conftest import Stack, expect_contains, expect_no_canary, run_python

PREAMBLE = """
import asyncio, base64, json, logging, sys, urllib.parse
import kvbroker, kvbroker.aio
from kvbroker import redact
SOCK = {sock!r}
"""


def forms(value: str) -> List[str]:
    """The value as it may leak, computed here independently of the package."""
    raw = value.encode()
    out = [value, repr(value)[1:-1], json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value), quote(value)]
    for b in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        out += [b.decode(), b.decode().rstrip("=")]
    return out


def run_scenario(stack: Stack, body: str, env=None):  # type: ignore[no-untyped-def]
    code = PREAMBLE.format(sock=stack.socket) + textwrap.dedent(body)
    result = run_python(code, env=env)
    if result.returncode != 0:
        # stderr is the log under test: show only its last line's exception name, never the text.
        last = result.stderr.strip().splitlines()[-1:] or [""]
        raise AssertionError(f"scenario exited {result.returncode}: {last[0].split(':')[0]}")
    return result.stdout + result.stderr


def secret_forms(stack: Stack) -> List[str]:
    return forms(stack.values["db-password"]) + forms(stack.values["api-token"])


def test_config_dict_exception_and_encodings_are_masked(stack: Stack) -> None:
    out = run_scenario(stack, """
        client = kvbroker.SecretClient(SOCK)
        secret = client.get_secret("db-password")
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
        redact.install()
        config = {"user": "admin", "password": secret.value, "retries": 3}
        logging.info(f"config: {config}")                         # the common insecure pattern
        logging.info("config: %s", config)                          # args
        logging.info("config: %r", [config])                        # nested repr
        logging.getLogger("app.db").warning("json: %s", json.dumps(config))   # a child logger
        raw = secret.value.encode()
        logging.info("b64 %s", base64.b64encode(raw).decode())
        logging.info("b64url %s", base64.urlsafe_b64encode(raw).decode().rstrip("="))
        logging.info("url https://db.example/?pw=%s", urllib.parse.quote(secret.value, safe=""))
        logging.info("form %s", urllib.parse.quote_plus(secret.value))
        logging.info("bytes %r", raw)
        try:
            raise ConnectionError(f"login failed for admin with password {secret.value}")
        except ConnectionError:
            logging.exception("could not connect")                  # exception text
        try:
            int(secret.value)                                        # ValueError quotes it (repr)
        except ValueError as e:
            logging.error("parse failed", exc_info=e)
        logging.info("unrelated: kvbcanary-unrelated-0123 and admin stay as they are")
        logging.info("prefix only: %s", secret.value[:12])          # not the value: untouched
        print("MARK done", file=sys.stderr)
    """)
    expect_no_canary(out, secret_forms(stack), "log output")
    masks = out.count("***")
    assert masks == 11, masks
    expect_contains(out, "unrelated: kvbcanary-unrelated-0123 and admin stay as they are", "unrelated text")
    expect_contains(out, "config: {'user': 'admin', 'password': '***', 'retries': 3}", "the rest of the dict")
    expect_contains(out, "ConnectionError: login failed for admin with password ***", "exception text")
    expect_contains(out, "Traceback (most recent call last)", "traceback kept")
    prefix = stack.values["db-password"][:12]
    expect_contains(out, f"prefix only: {prefix}\n", "exact values only: a part of one is not masked")
    expect_contains(out, "MARK done", "scenario ran to the end")


def test_without_install_the_same_log_leaks(stack: Stack) -> None:
    """The control: the scenario above can fail, because without redaction the value is there."""
    out = run_scenario(stack, """
        secret = kvbroker.SecretClient(SOCK).get_secret("db-password")
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        logging.info(f"config: {{'password': {secret.value!r}}}")
    """)
    leaked = any(f in out for f in forms(stack.values["db-password"]))
    assert leaked, "without redact.install() the value should have been logged"


def test_env_var_installs_on_import_and_covers_later_handlers_and_async_values(stack: Stack) -> None:
    out = run_scenario(stack, """
        async def fetch():
            async with kvbroker.aio.SecretClient(SOCK) as c:
                return await c.get_secret("api-token")
        token = asyncio.run(fetch())                    # received by the async client
        sync = kvbroker.SecretClient(SOCK).get_secret("db-password")
        # Handlers configured after import (install ran at import, before they existed).
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
        logging.getLogger("late").addHandler(handler)
        logging.getLogger("late").propagate = False
        logging.getLogger("late").warning("token=%s pw=%s", token.value, sync.value)
        logging.basicConfig(stream=sys.stderr)
        logging.warning("Authorization: Bearer " + base64.b64encode(token.value.encode()).decode())
    """, env={"KVBROKER_REDACT": "1"})
    expect_no_canary(out, secret_forms(stack), "log output")
    expect_contains(out, "late token=*** pw=***", "a handler added after install")
    expect_contains(out, "Authorization: Bearer ***", "base64 in a root record")


def test_redact_function_masks_only_registered_values() -> None:
    out = run_python(textwrap.dedent("""
        from kvbroker import redact
        import json
        v = "kvbcanary-direct-" + "9f8e7d/+\\"'"
        before = redact.redact("x " + v)
        redact.register(v)
        print(json.dumps([before == "x " + v, redact.redact("x " + v + " y"), redact.redact(repr([v])),
                          redact.redact("kvbcanary-direct-"), redact.redact("")]))
    """))
    assert out.returncode == 0, "redact scenario failed"
    before_ok, plain, in_repr, prefix, empty = json.loads(out.stdout)
    assert before_ok is True
    assert plain == "x *** y"
    assert in_repr == "['***']"
    assert prefix == "kvbcanary-direct-"
    assert empty == ""
