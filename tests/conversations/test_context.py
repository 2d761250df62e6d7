"""The context builder and the background summary/title tasks, with
conversations longer than the model's context window."""
import pytest

from conversations import context, services, tasks
from conversations.models import Conversation, Message

pytestmark = pytest.mark.django_db


def _turn(conversation, text, answer):
    reply = services.message_send(conversation=conversation, text=text)
    services.reply_start(reply_id=reply.id, request_id="r")
    services.reply_finish(reply_id=reply.id, status="complete", content=answer, stream_seq=2)
    return reply


def _long_chat(alice, turns=30, words=20):
    conversation = services.conversation_create(user=alice, system_prompt="Be kind.")
    for i in range(turns):
        _turn(conversation, f"question {i} " + "word " * words, f"answer {i} " + "word " * words)
    conversation.refresh_from_db()
    return conversation


def test_short_conversation_goes_whole_with_system_prompt_and_custom_instructions(alice, fake_gateway):
    services.preferences_update(user=alice, custom_instructions="I am a chemist.")
    conversation = services.conversation_create(user=alice, system_prompt="Be kind.")
    _turn(conversation, "hello", "hi!")
    reply = services.message_send(conversation=conversation, text="and now?")
    request = context.build_request(reply_id=reply.id)
    assert request.messages[0] == {"role": "system", "content": "I am a chemist.\n\nBe kind."}
    assert [m["content"] for m in request.messages[1:]] == ["hello", "hi!", "and now?"]
    assert request.user_id == alice.id and request.max_tokens > 0


def _message_reads(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith("SELECT") and '"conversations_message"' in q["sql"].split(" WHERE ")[0]]


def test_a_new_chat_request_is_built_from_the_turn_just_saved_without_reading_it_back(alice, fake_gateway):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from conversations import turns

    services.preferences_update(user=alice, custom_instructions="I am a chemist.")
    with CaptureQueriesContext(connection) as queries:
        reply, request = turns.create_and_prepare(
            services.conversation_start, user=alice, text="hello there", system_prompt="Be kind."
        )
    assert _message_reads(queries.captured_queries) == []
    # The same request as one built from the database (the path of a reply
    # whose task starts elsewhere), but for the id the task gave it.
    Message.objects.filter(id=reply.id).update(status=Message.Status.PENDING)
    from_db = context.build_request(reply_id=reply.id)
    assert request.messages == from_db.messages == [
        {"role": "system", "content": "I am a chemist.\n\nBe kind."}, {"role": "user", "content": "hello there"},
    ]
    assert (request.user_id, request.model, request.max_tokens) == (from_db.user_id, from_db.model, from_db.max_tokens)


def test_a_new_chat_is_saved_and_its_context_read_in_two_statements(alice, fake_gateway):
    """The turn's rows (one statement), then the user's custom instructions,
    memory's state and the documents' scope together (they were three
    queries): each round trip waits for Postgres to get a core."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from conversations import turns
    from memory import services as memory_services

    services.preferences_update(user=alice, custom_instructions="I am a chemist.")
    memory_services.settings_update(user=alice, enabled=False)
    with CaptureQueriesContext(connection) as queries:
        _, request = turns.create_and_prepare(services.conversation_start, user=alice, text="remember that I like tea")
    assert len(queries.captured_queries) == 2, [q["sql"][:80] for q in queries.captured_queries]
    # What was read in one query still decides the context: the instructions
    # lead it, and memory being off means nothing is remembered or recalled.
    assert request.messages[0] == {"role": "system", "content": "I am a chemist."}
    assert not alice.memories.exists()


def test_turn_facts_of_a_user_with_nothing_set(alice):
    conversation = services.conversation_create(user=alice)
    facts = context.turn_facts(user_id=alice.id, conversation_id=conversation.id)
    assert facts == context.TurnFacts(instructions="", memory_state=(True, False), scope=None)


def test_a_turn_in_an_older_chat_reads_its_branch_from_the_database(alice, fake_gateway):
    from conversations import turns
    from conversations.selectors import ancestors

    conversation = services.conversation_create(user=alice)
    first = _turn(conversation, "one", "uno")
    _turn(conversation, "two", "dos")
    reply, request = turns.create_and_prepare(services.message_send, conversation=conversation, text="three")
    # Its parent (the last reply) was loaded, not that reply's own parents: the
    # in-memory walk stops there and the whole branch comes from one query.
    assert [m["content"] for m in request.messages] == ["one", "uno", "two", "dos", "three"]
    assert [m.id for m in ancestors(reply)] == [m.id for m in ancestors(Message.objects.get(id=reply.id))]
    assert ancestors(reply)[0].id == first.parent_id


def test_long_conversation_keeps_the_newest_messages_that_fit(alice, fake_gateway, settings):
    settings.CHAT_REPLY_MAX_TOKENS = 100
    fake_gateway.context_window = 400
    conversation = _long_chat(alice)
    reply = services.message_send(conversation=conversation, text="last question")
    ctx = context.build_context(
        conversation=conversation, history=[m for m in __import__("conversations.selectors", fromlist=["x"]).ancestors(reply)[:-1]],
        reply_tokens=100,
    )
    assert ctx.prompt_tokens <= 300 == ctx.budget_tokens
    assert ctx.window[-1].content == "last question" and ctx.window[0].role == "user"
    assert ctx.dropped and ctx.dropped[-1].created_at < ctx.window[0].created_at
    # One more exchange (windows start with a user turn) would not have fitted.
    one_more = [ctx.messages[0], *({"role": m.role, "content": m.content} for m in ctx.dropped[-2:]), *ctx.messages[1:]]
    assert fake_gateway.count_prompt_tokens(one_more) > 300


def test_summary_of_older_turns_is_written_and_then_used(alice, fake_gateway, settings):
    settings.CHAT_REPLY_MAX_TOKENS = 100
    fake_gateway.context_window = 400
    fake_gateway.completions = ["The user asked thirty numbered questions."] * 100
    conversation = _long_chat(alice)
    reply = services.message_send(conversation=conversation, text="what did I ask first?")
    # Building the request enqueues the summary task (eager in tests).
    with __import__("django.test", fromlist=["x"]).TestCase.captureOnCommitCallbacks(execute=True):
        context.build_request(reply_id=reply.id)
    conversation.refresh_from_db()
    assert conversation.summary == "The user asked thirty numbered questions."
    summary_call = fake_gateway.requests[-1]
    assert summary_call.priority > 0 and summary_call.source == "task"
    request = context.build_request(reply_id=reply.id)
    assert "The user asked thirty numbered questions." in request.messages[0]["content"]
    assert request.messages[0]["content"].startswith("Be kind.")
    # Everything after the summarized part is there verbatim, newest last.
    assert request.messages[-1]["content"] == "what did I ask first?"
    assert fake_gateway.count_prompt_tokens(request.messages) <= 300


def test_summary_of_a_conversation_larger_than_the_window_is_built_in_chunks(alice, fake_gateway, settings):
    fake_gateway.context_window = 420
    conversation = _long_chat(alice, turns=20, words=30)
    last = conversation.messages.order_by("-created_at").first()
    fake_gateway.completions = [f"summary {i}" for i in range(50)]
    summary = tasks.summarize_conversation(str(conversation.id), str(last.id))
    calls = [r for r in fake_gateway.requests if r.source == "task"]
    assert len(calls) > 1  # chunked: each call fits the window
    assert all(fake_gateway.count_prompt_tokens(r.messages) <= 420 for r in calls)
    assert "summary 0" in calls[1].messages[1]["content"]  # each chunk builds on the last summary
    conversation.refresh_from_db()
    assert conversation.summary == summary and conversation.summary_through_id == last.id


def test_summary_on_another_branch_is_ignored(alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    first = _turn(conversation, "one", "1")
    services.summary_update(conversation_id=conversation.id, summary="old branch", through_id=first.id)
    edited = services.message_edit(message=first.parent, text="uno")
    request = context.build_request(reply_id=edited.id)
    assert all("old branch" not in m["content"] for m in request.messages)


def test_a_message_too_long_for_the_window_is_a_clear_error(alice, fake_gateway, settings):
    settings.CHAT_REPLY_MAX_TOKENS = 100
    fake_gateway.context_window = 120
    conversation = services.conversation_create(user=alice)
    reply = services.message_send(conversation=conversation, text="word " * 200)
    with pytest.raises(Exception, match="too long for the model's context"):
        context.build_request(reply_id=reply.id)


def test_title_task_names_the_conversation_after_the_first_reply(alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    _turn(conversation, "How do I bake sourdough bread at home?", "Like this.")
    fake_gateway.completions = ['"Baking Sourdough at Home"']
    assert tasks.title_conversation(str(conversation.id)) == "Baking Sourdough at Home"
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_source) == ("Baking Sourdough at Home", "auto")
    # A title is made once; a rename is never overwritten.
    assert tasks.title_conversation(str(conversation.id)) is None


def test_title_names_the_topic_from_the_message_when_the_model_rambles(alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    _turn(conversation, "How do I bake sourdough bread at home with rye flour?", "Like this.")
    fake_gateway.completions = ["x" * 300]
    assert tasks.title_conversation(str(conversation.id)) == "Bake sourdough bread at home"
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_source) == ("Bake sourdough bread at home", "auto")
