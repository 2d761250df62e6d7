"""Memory tests use the chat's fake gateway (tests.conversations.conftest);
memory's own background job reaches it over the serving API in-process too."""
import functools

import pytest

from memory import tasks as memory_tasks
from tests.conversations.conftest import (  # noqa: F401  (re-exported fixtures)
    ServingApiInProcess, _close_thread_connections, fake_gateway, fast_streams, serving_api_in_process,
)


@pytest.fixture(autouse=True)
def memory_serving_api_in_process(monkeypatch):
    monkeypatch.setattr(memory_tasks, "serving_api",
                        functools.partial(memory_tasks.serving_api, transport=ServingApiInProcess()))


@pytest.fixture
def chat_turn():
    """A finished turn of `conversation`: the user's text and the reply's; returns the reply."""
    from conversations import services

    def turn(conversation, text, answer="Sure."):
        reply = services.message_send(conversation=conversation, text=text)
        services.reply_start(reply_id=reply.id, request_id="r")
        services.reply_finish(reply_id=reply.id, status="complete", content=answer, stream_seq=2)
        return reply

    return turn
