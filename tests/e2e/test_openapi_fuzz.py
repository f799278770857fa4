"""Schemathesis over /openapi.json against the live server: no input may produce a 5xx.

Driven through schemathesis' Python API with Hypothesis directly (one property per operation), which
keeps it independent of the schemathesis pytest plugin's ties to pytest internals.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.conftest import LiveServer

EXAMPLES = 40


@pytest.fixture(scope="session")
def api_schema(live_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


def operations(schema: schemathesis.BaseSchema) -> list:  # type: ignore[type-arg]
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_causes_a_server_error(api_schema: schemathesis.BaseSchema, live_server: LiveServer,
                                        mode: GenerationMode) -> None:
    ops = operations(api_schema)
    assert len(ops) >= 10, "the schema lists the API's operations"
    headers = {"Authorization": f"Bearer {live_server.admin_token}"}
    total = 0
    for op in ops:
        if op.method.upper() == "DELETE" and op.path == "/api/tokens/{token_id}":
            continue  # could only ever revoke the token the fuzzer itself uses; covered in test_api
        calls = 0

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            run()
        except Unsatisfiable:
            # An operation with nothing to get wrong (no parameters, no body) has no negative cases.
            assert mode is GenerationMode.NEGATIVE, f"{op.method} {op.path}: no positive case generated"
        total += calls
    assert total > len(ops), "the fuzzer sent requests"
