"""Bad input at the gateway's edge: every number bounded, bodies that break
parsers, limits on messages, characters, stop strings and max_tokens; for the
API (400 in OpenAI's shape) and for every other caller (BadRequest), before
any tokenizer, quota or backend sees the request. Blocking work (tokenizer,
django-ratelimit's Redis calls) runs off the event loop."""
import json
import threading

import jinja2
import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from django.core.cache import caches
from django.test import AsyncClient

from chatapp import runtime
from chatapp.asgi import application
from gateway import api, backends, registry
from gateway.keys import api_key_create
from gateway.models import UsageRecord
from gateway.types import SEED_LIMIT, BadRequest, ChatRequest
from tests.gateway.helpers import add_remote, collect


@pytest.fixture
def alice_key(alice):
    return api_key_create(user=alice, name="test")[1]


async def post(key, body):
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return await AsyncClient().post("/v1/chat/completions", raw, content_type="application/json",
                                    headers={"Authorization": f"Bearer {key}"})


def hello(**extra):
    return {"model": "remote", "messages": [{"role": "user", "content": "hello there"}], **extra}


def assert_400(response, mentions: str = ""):
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert mentions in error["message"], error["message"]


async def test_a_seed_beyond_64_bits_is_400_and_never_reaches_a_backend(remote, alice_key):
    before = remote.count()
    response = await post(alice_key, hello(temperature=1, seed=18446744073709551616))
    assert_400(response, "seed")
    assert remote.count() == before
    # The client's error is not the backend's: its circuit saw nothing.
    assert backends.circuit("remote").failures == 0
    assert (await post(alice_key, hello(seed=SEED_LIMIT - 1, max_tokens=5))).status_code == 200


async def test_requests_a_backend_rejects_as_bad_never_open_its_circuit(remote, alice_key, settings):
    await sync_to_async(add_remote)(remote, "strict", remote_model="fake-400")
    for _ in range(settings.GATEWAY_CIRCUIT_FAILURES + 2):
        response = await post(alice_key, hello(model="strict"))
        # The backend's own words may name its hosts or keys: logged, not shown.
        assert_400(response, "answered HTTP 400")
        assert "context length exceeded" not in response.content.decode()
    assert backends.circuit("strict").failures == 0 and backends.circuit("strict").allow()


@pytest.mark.parametrize("extra, mentions", [
    ({"seed": -1}, "seed"),
    ({"seed": SEED_LIMIT}, "seed"),
    ({"max_tokens": 32769}, "max_tokens"),
    ({"max_completion_tokens": 10**30}, "max_tokens"),
    ({"temperature": 10**400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 49}, "stop"),
    ({"model": "m" * 65}, "model"),
])
async def test_numbers_and_strings_out_of_range_are_400(remote, alice_key, extra, mentions):
    assert_400(await post(alice_key, hello(**extra)), mentions)


@pytest.mark.parametrize("raw, mentions", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model": "remote", "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"model": "remote", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', "NaN"),
    ('{"model": "remote", "temperature": Infinity, "messages": [{"role": "user", "content": "x"}]}', "Infinity"),
    ('{"model": "remote", "temperature": 1e999, "messages": [{"role": "user", "content": "x"}]}', "temperature"),
    (b'{"model": "remote", "messages": [{"role": "user", "content": "\xff"}]}', "not valid JSON"),
], ids=["deeply-nested", "5000-digit-integer", "NaN", "Infinity", "1e999", "not-utf8"])
async def test_bodies_that_break_parsers_are_400(remote, alice_key, raw, mentions):
    assert_400(await post(alice_key, raw), mentions)


async def test_nul_characters_in_text_are_400(remote, alice_key):
    assert_400(await post(alice_key, hello(messages=[{"role": "user", "content": "a\u0000b"}])), "NUL")


async def test_too_many_messages_or_characters_are_refused_before_any_work(remote, alice_key, settings):
    settings.GATEWAY_MAX_MESSAGES = 3
    settings.GATEWAY_MAX_REQUEST_CHARS = 100
    before = remote.count()
    many = [{"role": "user", "content": "hi"}] * 4
    assert_400(await post(alice_key, hello(messages=many)), "limit is 3")
    long = [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 41}]
    response = await post(alice_key, hello(messages=long))
    assert_400(response, "limit is 100")
    assert remote.count() == before
    # Refused before the quota step: no reservation, no ledger row.
    assert not await UsageRecord.objects.aexists()


@pytest.mark.parametrize("fields", [
    {"seed": 2**64},
    {"seed": -5},
    {"seed": True},
    {"max_tokens": 0},
    {"max_tokens": 10**9},
    {"max_tokens": 3.5},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"temperature": 10**400},
    {"top_p": -(10**400)},
    {"top_p": float("nan")},
    {"stop": ("x" * 49,)},
    {"stop": ("a", "b", "c", "d", "e")},
    {"messages": [{"role": "user", "content": "nul \x00"}]},
    {"messages": [{"role": "user", "content": "hi"}] * 2049},
    {"messages": [{"role": "user", "content": "x" * 200_000}] * 2 + [{"role": "user", "content": "x"}]},
    {"model": "m" * 65},
])
async def test_every_caller_gets_the_same_bounds(fields):
    """Chat turns and background tasks build ChatRequests themselves: the gateway checks them too."""
    request = ChatRequest(**{"messages": [{"role": "user", "content": "hi"}], "source": "task", **fields})
    with pytest.raises(BadRequest):
        await collect(request)


async def test_the_openapi_description_is_served_without_a_key(db):
    response = await AsyncClient().get("/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {"/chat/completions", "/models", "/models/{model_id}"} <= set(document["paths"])
    body = document["paths"]["/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["seed"]["maximum"] == SEED_LIMIT - 1
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# ------------------------------------------------------------ off the event loop

class _RecordingEngine:
    """A pool's engine as local_prompt_ids sees it: only the chat template."""

    def __init__(self, error=None):
        self.threads, self.error = [], error

    def apply_chat_template(self, messages):
        self.threads.append(threading.current_thread())
        if self.error is not None:
            raise self.error
        return [1, 2, 3]


@pytest.fixture
def recording_pool(settings):
    settings.MODEL_POOLS = {"rec": {"model": "none"}}
    engine = _RecordingEngine()
    runtime.register_engine("rec", engine)
    yield registry.BackendSpec(name="rec", kind="local", pool="rec")
    runtime.unregister_engine("rec")


async def test_a_long_prompt_is_tokenized_off_the_event_loop_a_short_one_on_it(recording_pool):
    """Milliseconds to seconds of tokenizer work would hold back every stream
    of the process; a chat turn's few hundred characters cost less than the
    thread hop."""
    long_text = "x" * (backends.INLINE_TOKENIZE_CHARS + 1)
    ids = await backends.local_prompt_ids(recording_pool, [{"role": "user", "content": long_text}])
    assert ids == [1, 2, 3]
    assert runtime.engine("rec").threads[0] is not threading.current_thread()
    await backends.local_prompt_ids(recording_pool, [{"role": "user", "content": "hi"}])
    assert runtime.engine("rec").threads[1] is threading.current_thread()


async def test_an_over_long_prompt_is_refused_before_the_tokenizer_sees_it(recording_pool, settings, db):
    settings.GATEWAY_MAX_REQUEST_CHARS = 10
    with pytest.raises(BadRequest, match="limit is 10"):
        await collect(ChatRequest(messages=[{"role": "user", "content": "x" * 11}], model="rec", source="task"))
    assert runtime.engine("rec").threads == []


async def test_a_chat_template_that_rejects_the_messages_is_a_bad_request(recording_pool):
    runtime.engine("rec").error = jinja2.TemplateError("Conversation roles must alternate")
    with pytest.raises(BadRequest, match="alternate"):
        await backends.local_prompt_ids(recording_pool, [{"role": "user", "content": "hi"}])


def test_rate_limit_counters_are_shared_between_event_loops(remote, alice_key, settings):
    """The API's counters are async, on each event loop's own Redis pool, and
    count in Redis: a request served on another loop (the sync test client
    runs the async view on a loop of its own) sees the same window."""
    from asgiref.sync import async_to_sync
    from django.test import Client

    settings.GATEWAY_API_RATE_PER_USER = "1/m"
    headers = {"Authorization": f"Bearer {alice_key}"}
    assert async_to_sync(AsyncClient().get)("/v1/models", headers=headers).status_code == 200
    refused = Client().get("/v1/models", headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_the_cache_redis_client_has_socket_timeouts():
    client = caches["default"]._cache.get_client(write=True)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]


@pytest.mark.parametrize("client", [None, ("", 0), ("testclient", 50000)], ids=["absent", "empty", "not-an-ip"])
async def test_the_per_ip_limit_works_without_a_parsable_client_address(remote, alice_key, client):
    """Behind a proxy on a unix socket REMOTE_ADDR is empty or absent; django-ratelimit's own "ip" key raised."""
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/v1/models",
             "raw_path": b"/v1/models", "query_string": b"", "root_path": "", "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {alice_key}".encode())]}
    if client is not None:
        scope["client"] = client
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(10)
    assert start["status"] == 200
