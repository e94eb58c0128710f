"""Schemathesis over the app's own OpenAPI schema, against the real server and the bundled model.

Valid and invalid bodies, parameters and headers for every operation, a few
hundred cases in all, bounded in count (never in time: a slow machine runs the
same cases, only later). No answer may be a 5xx, and the server must still be
healthy at the end. The seed is fixed (derandomize), so a failure reproduces.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from longserve.server.models import DEFAULT_MODEL
from tests.conftest import make_engine, running_server

CASES_PER_OPERATION_AND_MODE = 30


@pytest.fixture(scope="module")
def fuzzed_server(bundled_model, tokenizer):
    # a short max_model_len keeps the longest generation a case can ask for to a few seconds
    engine = make_engine(bundled_model, tokenizer, name=DEFAULT_MODEL, max_num_seqs=4, max_waiting=4, max_model_len=48)
    with running_server(engine, max_contexts=3, max_body_bytes=64 * 1024) as url:
        yield url


def test_no_case_gets_a_5xx_and_the_server_stays_healthy(fuzzed_server):
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # every route is in the schema
    server_errors, counted = [], {"cases": 0}

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=CASES_PER_OPERATION_AND_MODE, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=fuzzed_server, timeout=120)
                counted["cases"] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
                                         f"{response.status_code} {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no input): no negative cases
                pass
    print(f"{counted['cases']} cases over {len(operations)} operations")
    assert not server_errors, "\n".join(server_errors[:10])
    assert counted["cases"] >= 300
    assert httpx.get(f"{fuzzed_server}/health").status_code == 200
