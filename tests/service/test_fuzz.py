"""Every endpoint in the OpenAPI schema, fuzzed with schemathesis (valid and invalid inputs, a bounded,
deterministic number of examples each) in-process over ASGI: no 5xx, and every 4xx carries the error
envelope {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import os

import pytest
import schemathesis

# per operation and mode (valid, invalid), about 20 operations: 50 in `make test-long` (~1 min on 2 cores), 25 in
# `make test` (the CI budget)
EXAMPLES_PER_OPERATION = 50 if os.environ.get("MOERGE_TEST_LONG") else 25


@pytest.fixture(scope="module")
def fuzzed_app(real_settings, tmp_path_factory):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    # keys off, so requests get past authentication into the handlers; short answers keep chat cheap
    s = real_settings.model_copy(update={"pool_dir": tmp_path_factory.mktemp("fuzz-pool"), "routing_method": "embed",
                                         "max_new_tokens_limit": 4, "max_request_bytes": 2**20})
    return create_app(build_runtime(s, progress=lambda m: None))


def _problem(case, response) -> str | None:
    """What is wrong with one response, or None."""
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 500:
        return where
    ctype = response.headers.get("content-type") or [""]          # schemathesis keeps header values as lists
    if str(ctype[0] if isinstance(ctype, list) else ctype).startswith("text/event-stream") \
            and '"server_error"' in response.text:
        return "error inside a 200 stream: " + where + f"; body {str(case.body)[:300]}"
    if 400 <= response.status_code < 500:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return "no error envelope: " + where
        if set(response.json()) != {"error"} or set(error) != {"message", "type", "param", "code"} \
                or not isinstance(error["message"], str) or not error["message"] \
                or error["code"] != str(response.status_code):
            return "malformed error envelope: " + where
    return None


def _short_answers(case):
    """Valid chat bodies ask for at most 4 tokens (the server's limit here), so they reach generation
    instead of all stopping at the limit check; the 4-token limit itself is fuzzed by invalid bodies."""
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and not isinstance(case.body.get(field), bool):
                case.body[field] = max(1, min(case.body[field], 4))
        case.body.setdefault("max_tokens", 4)
    return case


def _fuzz(operation, mode) -> list[str]:
    """Run one operation's examples; return the problems found (Hypothesis stops at the first one)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    seen: list[str] = []

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode).map(_short_answers))
    def run(case):
        try:
            response = case.call()
        except Exception as e:  # noqa: BLE001 - the app raised: Starlette re-raises after its 500
            problem = f"{case.method} {case.formatted_path} raised {e!r}; body {str(case.body)[:200]}"
            seen.append(problem)
            raise AssertionError(problem) from None
        problem = _problem(case, response)
        if problem:
            seen.append(problem)
            raise AssertionError(problem)

    try:
        run()
    except AssertionError:
        pass
    except Unsatisfiable:       # no invalid input exists for an operation without parameters
        assert mode.name == "NEGATIVE" and not seen
    return seen[:1]


@pytest.mark.real
@pytest.mark.slow
def test_every_endpoint_fuzzed_gives_no_5xx_and_every_4xx_carries_the_error_envelope(fuzzed_app):
    from schemathesis import GenerationMode
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    problems = [p for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                for p in _fuzz(op, mode)]
    assert not problems, "\n".join(problems)
