"""Harness: the real `kvbroker` agent against the real `kvbroker-emulator`, on loopback.

Binaries come from the repository's target/debug (KVBROKER_TARGET_DIR overrides the target
directory); a missing one fails the run, with the command that builds it. Every process a
test starts is stopped in a `finally`. Values are canaries, and no helper here ever puts a
value into an assertion message: compare with `expect_value` and scan with `expect_no_canary`.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
BUILD = "cargo build --workspace --bins --locked"


def pytest_report_header(config):  # type: ignore[no-untyped-def]
    import kvbroker

    return [f"kvbroker package: {Path(kvbroker.__file__).parent}", f"binaries: {target_dir()}"]


def target_dir() -> Path:
    return Path(os.environ.get("KVBROKER_TARGET_DIR", REPO / "target")) / "debug"


def binary(name: str) -> Path:
    path = target_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it with `{BUILD}` in {REPO}", pytrace=False)
    return path


def canary(tag: str) -> str:
    """A value no real text contains; `/`, `+`, `&`, quotes and a space make its encodings
    differ from it (URL, JSON, repr), so each form is tested on its own."""
    return f"kvbcanary-{tag}-{secrets.token_hex(6)}/+&=\"'x y"


def expect_value(actual: object, expected: str, what: str) -> None:
    """Equality without printing either side (they are secret values)."""
    if actual != expected:
        raise AssertionError(f"{what}: the value differs from the canary (not shown)")


def expect_no_canary(text: str, canaries: Iterable[str], where: str) -> None:
    found = [i for i, c in enumerate(canaries) if c in text]
    if found:
        raise AssertionError(f"{where}: canary #{found} appears in the output (not shown)")


def expect_contains(text: str, needle: str, what: str) -> None:
    """`needle in text` without printing `text` (it is output under test, which may leak)."""
    if needle not in text:
        raise AssertionError(f"{what}: {needle!r} not found in the output (output not shown)")


class Proc:
    """A child process with its stdout/stderr in files; `stop()` is idempotent."""

    def __init__(self, args: List[str], log_dir: Path, tag: str, *, env: Optional[Dict[str, str]] = None,
                 preexec_fn=None, quiet_stderr: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.out_path = log_dir / f"{tag}.out"
        self.err_path = log_dir / f"{tag}.err"
        out = open(self.out_path, "wb")
        err = subprocess.DEVNULL if quiet_stderr else open(self.err_path, "wb")
        full_env = dict(os.environ)
        full_env.pop("RUST_LOG", None)
        full_env.update(env or {})
        try:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env,
                                          preexec_fn=preexec_fn)
        finally:
            out.close()
            if err is not subprocess.DEVNULL:
                err.close()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def output(self) -> str:
        text = ""
        for p in (self.out_path, self.err_path):
            if p.exists():
                text += p.read_text(errors="replace")
        return text


def raw_status(sock: Path, path: str) -> int:
    """One GET with the standard library's own parser (not ours); 0 when unreachable."""
    import http.client

    conn = http.client.HTTPConnection("localhost", timeout=5)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(sock))
        conn.sock = s
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


class Emulator:
    def __init__(self, dir: Path, secrets_toml: Dict[str, str]) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        seed = dir / "seed.toml"
        seed.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in secrets_toml.items()))
        seed.chmod(0o600)
        self.proc = Proc([str(binary("kvbroker-emulator")), "--dir", str(dir / "emu"), "--secrets", str(seed)],
                         dir, "emulator")
        info = dir / "emu" / "emulator.json"
        deadline = time.monotonic() + 20
        while True:
            if info.exists():
                try:
                    self.info = json.loads(info.read_text())
                    break
                except ValueError:
                    pass
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"kvbroker-emulator did not start:\n{self.proc.output()[-2000:]}")
            time.sleep(0.05)
        self.control = self.info["control_url"]
        host = urllib.request.urlparse(self.control).hostname
        if host != "127.0.0.1":
            self.proc.stop()
            raise RuntimeError(f"the emulator is not on loopback: {host}")

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.control + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
        with opener.open(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else {}

    def set_secret(self, name: str, value: str, **attrs: object) -> str:
        """A new version; returns its id."""
        return str(self._call("POST", "/secrets", {"name": name, "value": value, **attrs})["version"])

    def fault(self, **spec: object) -> None:
        self._call("POST", "/faults", spec)

    def counts(self) -> dict:
        return self._call("GET", "/counts")

    def stop(self) -> None:
        self.proc.stop()


class Agent:
    """`kvbroker run` on a config written from the emulator's description."""

    def __init__(self, dir: Path, emu: Emulator, *, allow: List[str], extra: str = "",
                 vault_extra: str = "", fsize_limit: Optional[int] = None) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.socket = dir / "agent.sock"
        self.audit = dir / "audit.jsonl"
        self.config = dir / "agent.toml"
        info = emu.info
        policy = dir / "policy.toml"
        policy.write_text(
            f'[[rule]]\nname = "pytest"\nuids = [{os.getuid()}]\nsecrets = {json.dumps(allow)}\n'
        )
        policy.chmod(0o600)
        self.config.write_text(
            f"""[agent]
socket = {json.dumps(str(self.socket))}
socket_mode = "0600"
admin_socket = {json.dumps(str(dir / "admin.sock"))}
loopback_only = true

[identity]
source = "imds"
connect_to = {json.dumps(info["identity"]["imds"]["connect_to"])}

[[vault]]
alias = "default"
url = {json.dumps(info["vault_url"])}
ca_file = {json.dumps(info["ca_file"])}
connect_to = {json.dumps(info["connect_to"])}
{vault_extra}

[cache]
refresh_interval = "1s"

[audit]
path = {json.dumps(str(self.audit))}

[policy]
file = {json.dumps(str(policy))}
{extra}
"""
        )
        self.fsize_limit = fsize_limit
        self.proc: Optional[Proc] = None
        self.runs = 0
        self.start()

    def start(self) -> None:
        self.runs += 1
        preexec = None
        if self.fsize_limit is not None:
            limit = self.fsize_limit

            def preexec() -> None:  # in the child: files it writes stop growing at `limit` bytes
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        self.proc = Proc([str(binary("kvbroker")), "run", "--config", str(self.config)], self.dir,
                         f"agent-{self.runs}", preexec_fn=preexec, quiet_stderr=self.fsize_limit is not None)
        deadline = time.monotonic() + 20
        while raw_status(self.socket, "/v1/health") != 200:
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"kvbroker run did not start:\n{self.proc.output()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def logs(self) -> str:
        text = ""
        for i in range(1, self.runs + 1):
            for suffix in ("out", "err"):
                p = self.dir / f"agent-{i}.{suffix}"
                if p.exists():
                    text += p.read_text(errors="replace")
        if self.audit.exists():
            text += self.audit.read_text(errors="replace")
        return text


class Stack:
    """An emulator and an agent on it, with the canaries seeded."""

    def __init__(self, dir: Path, values: Dict[str, str], *, allow: Optional[List[str]] = None, **agent_kw) -> None:  # type: ignore[no-untyped-def]
        self.values = values
        self.emu = Emulator(dir / "e", values)
        try:
            self.agent = Agent(dir / "a", self.emu, allow=allow or ["default/*"], **agent_kw)
        except BaseException:
            self.emu.stop()
            raise
        self.socket = str(self.agent.socket)

    def stop(self) -> None:
        try:
            self.agent.stop()
        finally:
            self.emu.stop()

    def assert_no_canary(self, extra: Iterable[str] = ()) -> None:
        canaries = list(self.values.values()) + list(extra)
        expect_no_canary(self.agent.logs(), canaries, "agent logs and audit")
        expect_no_canary(self.emu.proc.output(), canaries, "emulator output")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: a Unix socket path has at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="kvbpy-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A shared stack for read-only tests. Policy allows every name but `payroll-*`."""
    d = Path(tempfile.mkdtemp(prefix="kvbpy-", dir="/tmp"))
    values = {"db-password": canary("db"), "api-token": canary("api"), "payroll-key": canary("payroll")}
    try:
        s = Stack(d, values, allow=["default/db-*", "default/api-*", "default/field-*", "default/off-*",
                                    "default/old-*", "default/later-*", "default/nowhere-*", "default/rot-*"])
        try:
            yield s
            s.assert_no_canary()
        finally:
            s.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_python(code: str, *, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -c CODE` with this interpreter (the venv with the package installed)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
