"""Text a fail-closed checker could not check (it failed or timed out) is held
back as SAFETY_FAIL_CLOSED says, and every path says so for what it is: not a
verdict on the text (no category named, no block counted), and worth trying
again. Before, a benign prompt met during a checker's slow start was refused as
"blocked by the content policy (blocked term)" with a 400."""
import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from conversations import services, turns
from conversations.models import Message
from gateway.keys import api_key_create
from gateway.types import ModerationUnavailable
from safety import pipeline
from safety.services import (
    INPUT_BLOCKED, OUTPUT_BLOCKED, PASSAGE_LEFT_OUT, UNCHECKED, OutputWindow, amoderate_messages, screen_passages,
)
from tests.safety import fakes

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def failing_closed(settings):
    """A checker that always fails, covering "hate" and "violence"; hate fails closed."""
    settings.SAFETY_CHECKERS = ["safety.checkers.RulesChecker", "tests.safety.fakes.Failing",
                                "tests.safety.fakes.Recorder"]
    settings.SAFETY_FAIL_CLOSED = ["hate"]


async def _api(user, body, path):
    _, raw = await sync_to_async(api_key_create)(user=user, name="t")
    return await AsyncClient().post(path, json.dumps(body), content_type="application/json",
                                    headers={"Authorization": f"Bearer {raw}"})


async def test_a_prompt_that_could_not_be_checked_is_told_so(failing_closed, blocked_signals):
    verdict = await amoderate_messages([{"role": "user", "content": "hello"}])
    assert verdict.blocked and verdict.unchecked
    assert verdict.reason == UNCHECKED[INPUT_BLOCKED] and "hate" not in verdict.reason
    assert blocked_signals == []


def test_a_judged_block_is_what_the_decision_names(failing_closed):
    fakes.MARKERS["input"] = "BLOCKME"
    decision = pipeline.run(["BLOCKME now"], source="input")[0]
    assert decision.blocked and not decision.unchecked
    assert decision.top.checker == "recorder" and not decision.top.unchecked  # not the failed checker's stand-in


async def test_a_reply_that_could_not_be_checked_is_stopped_and_told_so(failing_closed, blocked_signals, settings):
    settings.SAFETY_OUTPUT_CHECK_CHARS = 10
    window = OutputWindow()
    assert await window.apush("a perfectly calm sentence about tides") == ""
    assert window.verdict.unchecked and window.verdict.reason == UNCHECKED[OUTPUT_BLOCKED]
    assert blocked_signals == []


def test_a_passage_that_could_not_be_checked_is_left_out_and_told_so(failing_closed, blocked_signals):
    [verdict] = screen_passages(["Tides rise twice a day."])
    assert verdict.blocked and verdict.reason == UNCHECKED[PASSAGE_LEFT_OUT]
    assert verdict.policy_version == ""  # never stored
    assert blocked_signals == []


@pytest.mark.parametrize("stream", [False, True])
async def test_the_api_answers_503_with_retry_after(remote, alice, failing_closed, stream):
    response = await _api(alice, {"model": "remote", "messages": [{"role": "user", "content": "hello"}],
                                  "stream": stream}, "/v1/chat/completions")
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "moderation_unavailable" and "could not be checked" in error["message"]
    assert response["Retry-After"] == str(ModerationUnavailable.RETRY_AFTER_S)


async def test_the_moderations_endpoint_answers_503_rather_than_stand_in_scores(alice, failing_closed):
    response = await _api(alice, {"input": ["a fine text"]}, "/v1/moderations")
    assert response.status_code == 503 and response.json()["error"]["code"] == "moderation_unavailable"
    assert response["Retry-After"] == str(ModerationUnavailable.RETRY_AFTER_S)


async def test_a_chat_message_that_could_not_be_checked_ends_in_an_error_to_retry(remote, alice, failing_closed,
                                                                                   fast_streams):
    conversation = await sync_to_async(services.conversation_create)(user=alice)
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    await client.post(f"/c/{conversation.id}/send", {"text": "hello there"})
    await turns.wait_idle(10)
    messages = await sync_to_async(list)(Message.objects.filter(conversation=conversation).order_by("created_at"))
    question, reply = messages
    assert question.content == "hello there"  # kept, to send again
    assert reply.status == "error" and reply.content == ""
    assert "could not be checked" in reply.error and "Try again in 5 seconds." in reply.error
    assert "content policy (" not in reply.error
