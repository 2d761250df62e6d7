"""Structured logs: the request id header, and the ids every line carries,
from the web request through the reply's task to the engine's thread."""
import io
import json
import logging

import pytest
from asgiref.sync import sync_to_async
from celery import signals as celery_signals
from django.test import AsyncClient

from conversations import services as chat_services
from conversations import turns
from conversations.models import Message
from inference import SamplingParams
from observability import logs
from tests.conftest import tiny_smollm2_engine


@pytest.fixture
def json_lines():
    """Every line logged while the test runs, as the JSON formatter renders it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_a_sane_incoming_request_id_comes_back(client):
    response = client.get("/no/such/page", HTTP_X_REQUEST_ID="edge-proxy.42:abc")
    assert response["X-Request-ID"] == "edge-proxy.42:abc"


@pytest.mark.parametrize("incoming", ["", "has spaces", "x" * 200, "line\\nbreak", "<script>"])
def test_a_missing_or_insane_request_id_is_replaced(client, incoming):
    response = client.get("/no/such/page", HTTP_X_REQUEST_ID=incoming)
    assert response["X-Request-ID"] != incoming and len(response["X-Request-ID"]) == 32


@pytest.mark.django_db
def test_a_requests_log_lines_carry_its_request_and_user_ids(alice_client, alice, json_lines):
    response = alice_client.get("/no/such/page", HTTP_X_REQUEST_ID="req-404-check")
    assert response.status_code == 404
    (line,) = [line for line in json_lines() if line["logger"] == "django.request"]
    assert line["request_id"] == "req-404-check" and line["user_id"] == alice.pk
    assert line["level"] == "warning" and "Not Found" in line["event"] and "timestamp" in line


def test_the_console_format_is_readable_and_keeps_the_fields():
    record = logging.LogRecord("chat", logging.WARNING, __file__, 1, "reply %s is slow", ("r1",), None)
    logs.bind(request_id="req-console")
    try:
        line = logs.formatter("console").format(record)
    finally:
        logs.clear()
    assert "reply r1 is slow" in line and "request_id=req-console" in line and not line.startswith("{")


@pytest.mark.django_db(transaction=True)
async def test_a_turns_lines_carry_the_posts_request_id_down_to_the_engine_pool(
        alice, chat_engine, fast_streams, json_lines, settings):
    settings.CHAT_REPLY_MAX_TOKENS = 6
    settings.CELERY_TASK_ALWAYS_EAGER = False  # the title task would call a serving process
    conversation = await sync_to_async(chat_services.conversation_create)(user=alice)
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post(f"/c/{conversation.id}/send", {"text": "Hello?"},
                                 headers={"HX-Request": "true", "X-Request-ID": "req-turn-1"})
    assert response["X-Request-ID"] == "req-turn-1"
    await turns.wait_idle(30)
    reply = await sync_to_async(Message.objects.get)(conversation=conversation, role="assistant")
    (line,) = [line for line in json_lines() if line["logger"] == "gateway.backends"]
    assert line["request_id"] == "req-turn-1" and line["user_id"] == alice.pk
    assert line["reply_id"] == str(reply.id) and line["conversation_id"] == str(conversation.id)
    assert "pool small ended" in line["event"]


def test_the_engine_thread_logs_a_requests_failure_in_its_submitters_context(smollm2_dir, json_lines):
    engine = tiny_smollm2_engine(smollm2_dir, kv_cache_mb=8, model_name="obs-failing")
    try:
        def broken_sample(seqs, logits):
            raise RuntimeError("sampler broke")

        engine.sampler.sample = broken_sample
        logs.bind(request_id="req-engine-1", reply_id="reply-9")
        try:
            completion = engine.submit([1, 2, 3], SamplingParams(max_tokens=2)).result(timeout_s=60)
        finally:
            logs.clear()
    finally:
        engine.shutdown()
    assert completion.finish_reason == "error"
    lines = [line for line in json_lines() if "sampling failed for request" in line["event"]]
    assert lines and lines[0]["request_id"] == "req-engine-1" and lines[0]["reply_id"] == "reply-9"
    assert "sampler broke" in lines[0]["exception"]


def test_a_task_message_carries_the_request_id_and_the_worker_binds_it():
    headers = {}
    logs.bind(request_id="req-task-7")
    try:
        celery_signals.before_task_publish.send(sender="conversations.tasks.title_conversation", headers=headers,
                                                body=(), exchange="", routing_key="celery")
    finally:
        logs.clear()
    sent = headers["request_id"]
    assert sent == "req-task-7"

    class Request:  # what Celery's worker hands a task: the message's headers as attributes
        is_eager = False
        request_id = sent
        headers = None

    class Task:
        name = "conversations.tasks.title_conversation"
        request = Request()

    celery_signals.task_prerun.send(sender=Task, task_id="t-1", task=Task, args=(), kwargs={})
    try:
        assert logs.current()["request_id"] == "req-task-7" and logs.current()["task_id"] == "t-1"
    finally:
        celery_signals.task_postrun.send(sender=Task, task_id="t-1", task=Task, args=(), kwargs={},
                                         retval=None, state="SUCCESS")
    assert logs.current() == {}
