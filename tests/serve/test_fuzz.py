"""Property-based fuzzing of a live server from its own OpenAPI schema (schemathesis + hypothesis).

Schemathesis generates requests for every operation the server describes, bodies that fit the schema and bodies
that do not. Whatever comes in: no 5xx, no hang (each call has a timeout), and the server is healthy after and
still answers a normal request. Bounded: a fixed number of examples per mode on a tiny random model, with small
request limits so no generated request can ask for much work.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from serve_helpers import running_server

from lorakit.serve.auth import Keys
from lorakit.serve.limits import Limits

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEY = "sk-fuzz-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_tokens=8, max_prompts=4, max_n=2, max_queue=64, request_timeout_s=60)
EXAMPLES = {"positive": 40, "negative": 25}


def _served(pair):
    """Most generated bodies name a served model, so generation itself is fuzzed, not only the 404 path."""
    case, model = pair
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body = {**case.body, "model": model}
    return case


@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_fuzzing_from_the_openapi_schema_finds_no_server_error(tiny_serve_dir, fresh_adapters, mode):
    from schemathesis.generation.modes import GenerationMode

    with running_server(tiny_serve_dir, fresh_adapters, keys=Keys(api=(KEY,)), limits=LIMITS) as (url, state):
        schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=HEADERS, timeout=10)
        models = st.sampled_from([None, "tiny", "a0", "a3", "a7"])  # None: keep the generated (unknown) name
        strategy = st.tuples(schema.as_strategy(generation_mode=GenerationMode(mode)), models).map(_served)
        seen: list[tuple[str, int]] = []

        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=strategy)
        def check(case) -> None:
            start = time.monotonic()
            response = case.call(base_url=url, headers=HEADERS, timeout=30)
            seen.append((f"{case.method} {case.path}", response.status_code))
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            assert time.monotonic() - start < 30

        check()
        counts = Counter(seen)
        operations = {op for op, _ in seen}
        assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/adapters"} <= operations, counts
        assert mode == "negative" or counts[("POST /v1/completions", 200)] > 0, counts  # generation was reached
        assert httpx.get(url + "/health").json()["status"] == "ok"
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=30).status_code == 200
        assert state.batcher.alive
