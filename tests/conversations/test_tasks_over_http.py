"""Titles and summaries reach the model over the serving process's API: what
a task does when that process is down, overloaded, or refuses a prompt as
too long for the model."""
import logging

import httpx
import pytest

from conversations import services, tasks
from gateway.keys import internal_api_key
from gateway.types import BadRequest
from tests.conversations.conftest import ServingApiInProcess
from tests.test_serve import free_port

pytestmark = pytest.mark.django_db

QUESTION = "How do I bake sourdough bread at home with rye flour?"


def _chat_turn(conversation, text, answer):
    reply = services.message_send(conversation=conversation, text=text)
    services.reply_start(reply_id=reply.id, request_id="r")
    services.reply_finish(reply_id=reply.id, status="complete", content=answer, stream_seq=2)


def _chat(user):
    conversation = services.conversation_create(user=user)
    _chat_turn(conversation, QUESTION, "Like this.")
    return conversation


def test_a_title_gives_up_on_a_serving_process_that_stays_down(alice, settings, caplog):
    settings.SERVE_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    conversation = _chat(alice)
    with caplog.at_level(logging.WARNING, logger="conversations.tasks"):
        tasks.title_conversation.apply(args=[str(conversation.id)])  # eager: retries run at once
    (line,) = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert f"after {tasks.MAX_RETRIES + 1} tries" in line and settings.SERVE_URL in line
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_source) == (services.fallback_title(QUESTION), "fallback")


def test_a_title_waits_out_an_overloaded_serving_process(alice, fake_gateway, monkeypatch):
    calls = []
    in_process = ServingApiInProcess()

    def busy_twice(request):
        calls.append(request)
        if len(calls) <= 2:
            return httpx.Response(429, json={"error": {"message": "engine at capacity"}})
        return in_process.handle_request(request)

    monkeypatch.setattr(tasks, "serving_api", lambda: httpx.Client(
        base_url="http://testserver", transport=httpx.MockTransport(busy_twice),
        headers={"Authorization": f"Bearer {internal_api_key()}"},
    ))
    fake_gateway.completions = ["Rye Sourdough at Home"]
    conversation = _chat(alice)
    tasks.title_conversation.apply(args=[str(conversation.id)])
    assert len(calls) == 3
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_source) == ("Rye Sourdough at Home", "auto")


def test_a_title_reaches_a_serving_process_behind_a_tls_proxy(alice, fake_gateway, settings):
    """In production ALLOWED_HOSTS names the public host and plain HTTP is
    redirected to HTTPS; the worker's loopback request must pass both."""
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    settings.HTTPS = settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    fake_gateway.completions = ["Rye Sourdough at Home"]
    conversation = _chat(alice)
    assert tasks.title_conversation(str(conversation.id)) == "Rye Sourdough at Home"


def test_a_summary_chunk_the_model_refuses_as_too_long_is_folded_in_halves(alice, fake_gateway, monkeypatch):
    """The worker has no tokenizer: it sizes chunks by an estimate, and the
    serving process's own count has the last word."""
    limit = 70
    fake_stream = fake_gateway.stream
    refused, accepted = [], []

    def strict(request):
        if fake_gateway.count_prompt_tokens(request.messages) > limit:
            refused.append(request)
            raise BadRequest(f"the prompt is too long; this model pool takes at most {limit} tokens (context {limit})")
        accepted.append(request)
        return fake_stream(request)

    monkeypatch.setattr(fake_gateway, "stream", strict)
    conversation = services.conversation_create(user=alice)
    for i in range(4):
        _chat_turn(conversation, f"question {i} " + "word " * 8, f"answer {i}")
    last = conversation.messages.order_by("-created_at").first()
    fake_gateway.completions = [f"summary {i}" for i in range(20)]
    summary = tasks.summarize_conversation(str(conversation.id), str(last.id))
    assert refused and len(accepted) > 1
    assert summary == f"summary {len(accepted) - 1}"  # each fold built on the one before
    assert "summary 0" in accepted[1].messages[1]["content"]
    conversation.refresh_from_db()
    assert conversation.summary == summary and conversation.summary_through_id == last.id
