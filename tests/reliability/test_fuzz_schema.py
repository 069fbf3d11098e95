"""Fuzz every route from the app's own OpenAPI schema (schemathesis) against a real server.

For every operation in the schema the running server serves, schemathesis generates valid
(positive) and invalid (negative) requests; each is sent with the API key to the real server.
Pass: no 5xx for any input, and every response whose status the schema documents matches the
documented body schema and content type. CI runs RELIABILITY_FUZZ_CASES=12 cases per operation
and mode; `make fuzz` runs 300.

Cases are drawn with schemathesis' strategies and hypothesis' ``@given`` per operation rather
than ``schemathesis.pytest.from_fixture``: the latter's subtest reporting does not run under
pytest 9 ("'Function' object has no attribute '_nodeid'").
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from reliability_lib import scale
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

pytestmark = pytest.mark.slow

CASES = scale("RELIABILITY_FUZZ_CASES", 12)
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def _operations(guarded):
    # The schema the running server serves (the same document /docs renders), fetched with the key.
    document = httpx.get(f"{guarded.url}/openapi.json", headers=guarded.auth, timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]


def _real_path_parameters(guarded) -> dict[str, str]:
    """The served model's name and version, and the id of a real (manifest) job."""
    model = httpx.get(f"{guarded.url}/v1/models", headers=guarded.auth, timeout=10).json()["name"]
    job = httpx.post(
        f"{guarded.url}/v1/jobs", json={"paths": ["astronaut.jpg", "coffee.jpg"]}, headers=guarded.auth, timeout=30
    )
    assert job.status_code == 202, job.text
    return {"model_name": model, "model_version": "1", "job_id": job.json()["id"]}


def _fuzz(guarded, cases, seen: Counter[int]) -> None:
    """Send CASES requests drawn from ``cases`` to the server, count their statuses in ``seen``, check each."""

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz(case):
        response = case.call(base_url=guarded.url, headers=guarded.auth, timeout=30)
        seen[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    fuzz()


def test_every_operation_survives_generated_requests(guarded):
    operations = _operations(guarded)
    assert len(operations) >= 15, [op.label for op in operations]  # v1, v2, jobs, health: all of them
    statuses: dict[str, Counter[int]] = {}
    known = _real_path_parameters(guarded)
    for operation in operations:
        # Random path parameters only ever reach 404; a third pass pins them to a real model and
        # job so the generated queries and bodies reach the route's own parsing.
        pinned = {name: value for name, value in known.items() if "{" + name + "}" in operation.path}
        passes = [(GenerationMode.POSITIVE, None), (GenerationMode.NEGATIVE, None)]
        if pinned:
            passes.append((GenerationMode.POSITIVE, pinned))
        for mode, path_parameters in passes:
            seen = statuses.setdefault(operation.label, Counter())
            try:
                _fuzz(guarded, operation.as_strategy(generation_mode=mode, path_parameters=path_parameters), seen)
            except Unsatisfiable:
                # Negative mode only: an operation with no parameters and no body has no invalid input.
                assert mode is GenerationMode.NEGATIVE, operation.label
    total = sum(sum(c.values()) for c in statuses.values())
    print(f"\nschemathesis: {total} requests over {len(operations)} operations")
    for label, counts in statuses.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert total >= len(operations) * CASES  # really ran, not skipped
    assert httpx.get(f"{guarded.url}/readyz", timeout=10).status_code == 200  # and the server is still up
