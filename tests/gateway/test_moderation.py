"""The moderation hook on prompts and streamed replies, for chat and API alike."""
import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from gateway.keys import api_key_create
from gateway.models import UsageRecord
from gateway.services import stream_chat
from gateway.types import Blocked, ChatRequest, TokenEvent
from safety.services import OutputWindow
from tests.gateway.helpers import collect


def ask(user, text):
    return ChatRequest(messages=[{"role": "user", "content": text}], user_id=user.pk, max_tokens=20)


async def test_a_blocked_prompt_is_refused_before_any_backend_call(remote, alice, settings):
    settings.SAFETY_BLOCKED_TERMS = ["forbidden"]
    calls = remote.count()
    with pytest.raises(Blocked) as refused:
        await collect(ask(alice, "tell me the FORBIDDEN thing"))
    assert refused.value.status == 400 and refused.value.code == "content_policy_violation"
    assert remote.count() == calls
    row = await UsageRecord.objects.aget()
    assert row.status == "blocked" and row.charged_tokens == 0


async def test_the_api_answers_a_blocked_prompt_with_400(remote, alice, settings):
    settings.SAFETY_BLOCKED_TERMS = ["forbidden"]
    _, raw = await sync_to_async(api_key_create)(user=alice, name="t")
    response = await AsyncClient().post(
        "/v1/chat/completions",
        json.dumps({"model": "remote", "messages": [{"role": "user", "content": "forbidden"}]}),
        content_type="application/json", headers={"Authorization": f"Bearer {raw}"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "content_policy_violation"


async def test_a_reply_is_cut_before_a_blocked_term_reaches_the_user(remote, alice, settings):
    # The fake replies "echo: hello there": the term spans two streamed tokens.
    settings.SAFETY_BLOCKED_TERMS = ["echo: hello"]
    shown = ""
    async for event in stream_chat(ask(alice, "hello there")):
        if isinstance(event, TokenEvent):
            shown += event.text
        else:
            final = event
    assert "echo" not in shown
    assert final.finish_reason == "content_filter" and final.error
    row = await UsageRecord.objects.aget()
    assert row.status == "content_filter"


async def test_a_clean_reply_streams_whole_through_the_window(remote, alice, settings):
    settings.SAFETY_BLOCKED_TERMS = ["something else entirely"]
    text, final = await collect(ask(alice, "hello there"))
    assert text == "echo: hello there" and final.finish_reason == "stop"


async def test_the_output_window_holds_back_only_a_possible_term(transactional_db, settings):
    settings.SAFETY_BLOCKED_TERMS = ["badword"]
    window = OutputWindow()
    # Three times the term's length is held back (room for a separator or a
    # zero-width character after each letter of an obfuscated spelling).
    assert await window.apush("this is fine, and the rest is fine too ") == "this is fine, and "
    assert await window.apush("and ba") == "the re"
    assert await window.apush("dword") == "" and window.verdict.blocked
    assert await window.aflush() == ""
