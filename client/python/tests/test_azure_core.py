"""With azure-core installed, kvbroker's errors are azure-core's too (CI: a second venv).

Without azure-core these tests skip, unless KVBROKER_REQUIRE_AZURE_CORE=1 (set by CI in the
venv where it installed azure-core), where a missing azure-core fails them.
"""

from __future__ import annotations

import os
import pickle

import pytest

import kvbroker
from conftest import Stack

if os.environ.get("KVBROKER_REQUIRE_AZURE_CORE") == "1":
    import azure.core.exceptions as az  # noqa: F401 - must be importable here
else:
    az = pytest.importorskip("azure.core.exceptions",
                             reason="azure-core is not installed in this venv (CI runs this file in a second one)")

AGENT_CLASSES = [
    (kvbroker.PermissionDenied, 403, "PermissionDenied"),
    (kvbroker.SecretNotFound, 404, "SecretNotFound"),
    (kvbroker.SecretNotUsable, 422, "SecretNotUsable"),
    (kvbroker.TooManyRequests, 429, "TooManyRequests"),
    (kvbroker.UpstreamUnavailable, 502, "UpstreamUnavailable"),
    (kvbroker.AuditUnavailable, 503, "AuditUnavailable"),
    (kvbroker.InvalidRequest, 400, "InvalidRequest"),
]


def test_real_agent_errors_are_caught_by_azure_core_except_clauses(stack: Stack) -> None:
    client = kvbroker.SecretClient(stack.socket)
    try:
        client.get_secret("nowhere-azure")
    except az.ResourceNotFoundError as e:  # what azure-keyvault-secrets raises for a missing secret
        assert isinstance(e, kvbroker.SecretNotFound)
        assert e.status_code == 404 and e.reason == "Not Found"
        assert "nowhere-azure" in e.message and e.request_id in str(e)
    else:
        pytest.fail("no error raised")
    for name in ("payroll-key", "bad_name!"):
        try:
            client.get_secret(name)
        except az.HttpResponseError as e:
            assert isinstance(e, (kvbroker.PermissionDenied, kvbroker.InvalidRequest))
            assert e.status_code in (403, 400) and e.request_id and e.message
            assert e.request_id in str(e)
        else:
            pytest.fail("no error raised")
    try:
        kvbroker.SecretClient(stack.socket + ".missing").get_secret("db-password")
    except az.ServiceRequestError as e:
        assert isinstance(e, kvbroker.AgentUnreachable)
    client.close()


@pytest.mark.parametrize("cls,status,code", AGENT_CLASSES)
def test_every_class_constructs_as_an_azure_error(cls, status, code) -> None:  # type: ignore[no-untyped-def]
    err = cls("the agent's words", code=code, request_id="ab" * 16, status_code=status, reason="Why")
    expected = az.ResourceNotFoundError if cls is kvbroker.SecretNotFound else az.HttpResponseError
    assert isinstance(err, expected) and isinstance(err, az.AzureError)
    assert isinstance(err, kvbroker.KvbrokerError)
    assert err.status_code == status and err.reason == "Why" and err.code == code
    assert err.message == "the agent's words"
    assert str(err) == f"the agent's words (request {'ab' * 16})"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls and str(again) == str(err) and again.status_code == status
