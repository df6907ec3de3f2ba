"""Schemathesis fuzzes a real server from its own /openapi.json with an admin token: no answer is a 5xx.

Bounded: every non-FHIR route, the system-level FHIR endpoints and three resource types (Patient with
its operations, Observation, the AuditEvent trail) - the other types share the same code paths - with a
few generated cases per operation (a few hundred requests, well under two minutes).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import Server, start_server

pytestmark = pytest.mark.server  # starts real server processes

FUZZED = r"^/(?!fhir)|^/fhir(/(metadata|_history|\.well-known/smart-configuration))?$|^/fhir/(Patient|Observation|AuditEvent)(/|$)"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("fuzz")
    srv = start_server(base / "data", base / "server.log")
    try:
        yield srv
    finally:
        srv.stop()
        log = (base / "server.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]  # no unhandled exception behind a 4xx either


@pytest.fixture(scope="module")
def admin_token(fuzz_server: Server) -> str:
    return fuzz_server.token()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    return schema.include(path_regex=FUZZED)


# Each operation gets its own Hypothesis run (schemathesis' pytest loader does not support pytest 9 yet).
FUZZ = settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck), database=None)


def test_no_server_error(api_schema: schemathesis.BaseSchema, fuzz_server: Server, admin_token: str) -> None:
    headers = {"Authorization": f"Bearer {admin_token}"}
    failures: dict[str, str] = {}
    ran = calls = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=fuzz_server.base_url, headers=headers, checks=[not_a_server_error],
                                   timeout=30)

        try:
            fuzz()
        except Exception as exc:  # a failing check, with schemathesis' reproduction (curl) in the message
            failures[operation.label] = str(exc)[:1500]
        ran += 1
    assert ran >= 40 and calls >= 4 * ran, (ran, calls)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_the_fuzzed_subset_is_not_empty(api_schema: schemathesis.BaseSchema) -> None:
    ops = [r.ok() for r in api_schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/oauth2/token", "/openapi.json", "/fhir", "/fhir/Patient/{id}", "/fhir/AuditEvent"} <= paths
    assert len(ops) >= 40
