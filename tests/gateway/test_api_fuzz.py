"""Schemathesis fuzzes /v1 from its own OpenAPI description (/v1/openapi.json):
requests that fit the schema and requests that break it, through the whole
ASGI application in-process, with the fake OpenAI-compatible backend
(tests.gateway.fake_openai) behind the gateway. No answer may be a 5xx.

`make test` runs FUZZ_EXAMPLES (default 100) examples per operation; for a
long run: FUZZ_EXAMPLES=3000 pytest tests/gateway/test_api_fuzz.py
"""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings

from chatapp.asgi import application
from gateway.keys import api_key_create
from retrieval.services import embed
from tests.gateway.helpers import give_plan

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


@pytest.fixture
def fuzz_key(remote, alice, settings):
    # What is fuzzed is the parsing and the gateway, not the limits: nothing is refused for volume.
    settings.GATEWAY_API_RATE_PER_USER = settings.GATEWAY_API_RATE_PER_IP = "1000000/m"
    give_plan(alice, requests_per_minute=0, tokens_per_minute=0, tokens_per_day=0, tokens_per_month=0)
    return api_key_create(user=alice, name="fuzz")[1]


@pytest.fixture
def api_schema(fuzz_key):
    # Load the embedding model before the app runs on schemathesis's thread:
    # its first import of torch there waited for this (main) thread.
    embed(["warm up"])
    return schemathesis.openapi.from_asgi("/v1/openapi.json", application)


schema = schemathesis.pytest.from_fixture("api_schema")


def _aim_at_the_backend(case) -> None:
    """Random model names all end in a 404; most requests name the real one,
    so the fuzzer reaches moderation, quotas, caches and the backend."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"][:1] not in ("", "z"):
        body["model"] = "remote"


@schema.parametrize()
# All operations run in this one test: a long run needs more than the suite's 600 s.
@pytest.mark.timeout(max(600, FUZZ_EXAMPLES))
@hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                     suppress_health_check=list(HealthCheck))
def test_no_request_to_v1_gets_a_server_error(case, fuzz_key):
    _aim_at_the_backend(case)
    # A generous read timeout: a 2-core box running other work can be slow, and slow is not what is tested.
    response = case.call(headers={"Authorization": f"Bearer {fuzz_key}"}, timeout=60)
    assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
