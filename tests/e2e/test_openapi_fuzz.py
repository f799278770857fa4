"""Schemathesis over /openapi.json against a live server: no input may produce a 5xx.

The server is `polydev serve` with its VM backend replaced by a stand-in (fake_vm_server): with no image
on the test machine the real server's VM routes answer 503 `vm_unavailable` by design, which would hide
every other answer those routes give; with the stand-in they create, list and destroy for real, and still
boot nothing.

Driven through schemathesis' Python API with Hypothesis directly (one property per operation), which
keeps it independent of the schemathesis pytest plugin's ties to pytest internals.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support.live_server import LiveServer

EXAMPLES = 40


@pytest.fixture(scope="session")
def api_schema(fake_vm_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fake_vm_server.url}/openapi.json")


def operations(schema: schemathesis.BaseSchema) -> list:  # type: ignore[type-arg]
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_causes_a_server_error(api_schema: schemathesis.BaseSchema, fake_vm_server: LiveServer,
                                        mode: GenerationMode) -> None:
    ops = operations(api_schema)
    assert len(ops) >= 15, "the schema lists the API's operations, the VM routes included"
    headers = {"Authorization": f"Bearer {fake_vm_server.admin_token}"}
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
    vms = httpx.get(f"{fake_vm_server.url}/api/vms", params={"all": "true"}, headers=headers).json()
    if mode is GenerationMode.POSITIVE:  # valid bodies reached the engine, not just the validation layer
        assert any(vm["backend"] == "agent" for vm in vms)
    # The VMs it made count against the admin's quota on this shared server: later tests make their own.
    for vm in vms:
        if vm["status"] in ("creating", "running"):
            httpx.delete(f"{fake_vm_server.url}/api/vms/{vm['id']}", headers=headers)
