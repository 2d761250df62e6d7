"""The message tree, validation and every reply status transition."""
import pytest
from django.core.exceptions import ValidationError

from conversations import selectors, services
from conversations.models import Conversation, Message
from gateway.types import Usage

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(alice, fake_gateway):
    return services.conversation_create(user=alice)


def test_send_saves_user_message_and_pending_placeholder_together(conversation):
    reply = services.message_send(conversation=conversation, text="  Hello there  ")
    user_message = reply.parent
    assert user_message.role == "user" and user_message.content == "Hello there"
    assert reply.role == "assistant" and reply.status == "pending"
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == reply.id
    assert conversation.title == "Hello there" and conversation.title_source == "fallback"


def _statements(fn, **kwargs):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        result = fn(**kwargs)
    return result, [q["sql"].split()[0] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]


def test_a_turn_is_saved_in_as_few_statements_as_it_takes(alice, conversation):
    """Beside a busy engine every statement is a round trip that waits for a
    core: the user's message and the reply go in one INSERT, and the
    conversation's leaf comes with its locked row."""
    reply, statements = _statements(services.conversation_start, user=alice, text="first")
    assert statements == ["WITH"]  # the conversation and both messages, one INSERT each, in one statement
    assert reply.parent.role == "user" and Message.objects.filter(conversation=reply.conversation).count() == 2
    services.reply_finish(reply_id=reply.id, status="complete", content="ok", stream_seq=2)
    second, statements = _statements(services.message_send, conversation=reply.conversation, text="second")
    assert statements == ["SELECT", "SELECT", "INSERT", "UPDATE"]  # the locked chat with its leaf; idle?; turn; leaf
    assert second.parent.parent_id == reply.id and second.parent.content == "second"
    conversation = Conversation.objects.get(id=reply.conversation_id)
    assert conversation.current_leaf_id == second.id


@pytest.mark.django_db(transaction=True)
def test_a_new_chat_whose_rows_fail_leaves_nothing_behind(alice, fake_gateway, monkeypatch):
    """Its rows are one statement, with no transaction around it: a row that
    fails (here a reply under a message that does not exist, which the
    deferred foreign key refuses at the statement's end) takes the others with it."""
    import uuid

    from django.db import IntegrityError

    real = services._new_placeholder

    def orphan(conversation, parent):
        reply = real(conversation, parent)
        reply.parent_id = uuid.uuid4()
        return reply

    monkeypatch.setattr(services, "_new_placeholder", orphan)
    with pytest.raises(IntegrityError):
        services.conversation_start(user=alice, text="lost")
    assert not Conversation.objects.filter(user=alice).exists()
    assert not Message.objects.filter(content="lost").exists()
    monkeypatch.setattr(services, "_new_placeholder", real)
    reply = services.conversation_start(user=alice, text="kept")
    assert Message.objects.get(id=reply.id).parent.content == "kept"


def test_it_rejects_empty_and_overlong_messages(conversation, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10
    with pytest.raises(ValidationError, match="Write a message"):
        services.message_send(conversation=conversation, text="   ")
    with pytest.raises(ValidationError, match="limit is 10"):
        services.message_send(conversation=conversation, text="x" * 11)
    assert not Message.objects.exists()


def test_it_refuses_a_second_turn_while_one_is_generating(conversation):
    services.message_send(conversation=conversation, text="one")
    with pytest.raises(ValidationError, match="Wait for the current reply"):
        services.message_send(conversation=conversation, text="two")


def _finish(reply, text="ok", status="complete"):
    assert services.reply_start(reply_id=reply.id, request_id="r")
    assert services.reply_finish(reply_id=reply.id, status=status, content=text, stream_seq=3)
    reply.refresh_from_db()
    return reply


def test_regenerate_makes_a_sibling_reply_and_switch_moves_between_them(conversation):
    first = _finish(services.message_send(conversation=conversation, text="hi"), "first")
    second = _finish(services.message_regenerate(message=first), "second")
    assert second.parent_id == first.parent_id
    conversation.refresh_from_db()
    branch = selectors.branch_with_siblings(conversation=conversation)
    assert [i.message.content for i in branch] == ["hi", "second"]
    assert (branch[1].index, branch[1].count, branch[1].prev_id) == (2, 2, first.id)

    services.branch_switch(message=first)
    conversation.refresh_from_db()
    branch = selectors.branch_with_siblings(conversation=conversation)
    assert [i.message.content for i in branch] == ["hi", "first"]
    assert (branch[1].index, branch[1].next_id) == (1, second.id)


def test_edit_makes_a_sibling_user_message_with_a_new_reply(conversation):
    first = _finish(services.message_send(conversation=conversation, text="question one"))
    _finish(services.message_send(conversation=conversation, text="follow up"))
    edited_reply = services.message_edit(message=first.parent, text="question two")
    assert edited_reply.parent.parent_id is None
    assert edited_reply.parent.content == "question two"
    conversation.refresh_from_db()
    path = [m.content for m in selectors.branch_path(conversation=conversation)]
    assert path == ["question two", ""]
    # Back to the original branch: its newest leaf, with the follow-up.
    services.branch_switch(message=first.parent)
    conversation.refresh_from_db()
    assert [m.content for m in selectors.branch_path(conversation=conversation)] == ["question one", "ok", "follow up", "ok"]


def test_only_user_messages_can_be_edited_and_only_replies_regenerated(conversation):
    reply = _finish(services.message_send(conversation=conversation, text="hi"))
    with pytest.raises(ValidationError):
        services.message_edit(message=reply, text="x")
    with pytest.raises(ValidationError):
        services.message_regenerate(message=reply.parent)


@pytest.mark.parametrize("status", ["complete", "stopped", "interrupted", "error", "blocked"])
def test_every_terminal_status_is_recorded_once(conversation, status):
    reply = services.message_send(conversation=conversation, text="hi")
    assert reply.status == "pending"
    assert services.reply_start(reply_id=reply.id, request_id="req-1")
    assert not services.reply_start(reply_id=reply.id, request_id="req-2")  # only from pending
    services.replies_materialize(checkpoints={reply.id: ("par", 2)})
    reply.refresh_from_db()
    assert (reply.status, reply.content, reply.stream_seq, reply.request_id) == ("streaming", "par", 2, "req-1")
    assert services.reply_finish(
        reply_id=reply.id, status=status, content="partial", stream_seq=5, error="why",
        usage=Usage(prompt_tokens=3, completion_tokens=2),
    )
    # The first terminal status wins; later writers (a racing Stop) lose.
    assert not services.reply_finish(reply_id=reply.id, status="complete", content="other", stream_seq=9)
    services.replies_materialize(checkpoints={reply.id: ("late", 9)})
    reply.refresh_from_db()
    assert (reply.status, reply.content, reply.prompt_tokens, reply.completion_tokens) == (status, "partial", 3, 2)
    assert reply.finished_at is not None


def test_checkpoints_of_many_replies_keep_every_text_exactly(alice, conversation):
    """One statement for many replies (three arrays joined by position): texts
    that an array's quoting could mangle come back as written, each with its
    own sequence number, and a reply not streaming is left alone."""
    texts = ['say "hi", {not, a set}', "back\\slash \\\" and NULL", "", "línea\nnueva\tété 🚀", "NULL"]
    replies = []
    for text in texts:
        reply = services.conversation_start(user=alice, text="q")
        services.reply_start(reply_id=reply.id, request_id="r")
        replies.append(reply)
    pending = services.message_send(conversation=conversation, text="not started")
    checkpoints = {reply.id: (text, 10 + i) for i, (reply, text) in enumerate(zip(replies, texts))}
    assert services.replies_materialize(checkpoints={**checkpoints, pending.id: ("never", 99)}) == len(texts)
    stored = {m.id: (m.content, m.stream_seq) for m in Message.objects.filter(id__in=checkpoints)}
    assert stored == checkpoints
    pending.refresh_from_db()
    assert (pending.status, pending.content, pending.stream_seq) == ("pending", "", 0)
    assert services.replies_materialize(checkpoints={}) == 0


def test_reaper_marks_stale_replies_interrupted_and_keeps_partial_text(conversation, settings):
    streaming = services.message_send(conversation=conversation, text="hi")
    services.reply_start(reply_id=streaming.id, request_id="r")
    services.replies_materialize(checkpoints={streaming.id: ("half a rep", 4)})
    other = services.conversation_create(user=conversation.user)
    pending = services.message_send(conversation=other, text="yo")
    assert services.reap_orphaned_replies() == 0  # fresh: another process may be writing them
    settings.REPLY_STALE_S = 0  # silent since they were written
    assert services.reap_orphaned_replies() == 2
    streaming.refresh_from_db()
    pending.refresh_from_db()
    assert (streaming.status, streaming.content) == ("interrupted", "half a rep")
    assert pending.status == "interrupted"
    assert services.reap_orphaned_replies() == 0


def test_rename_beats_automatic_titles(conversation):
    services.conversation_update(conversation=conversation, title="  My   title ")
    assert conversation.title == "My title" and conversation.title_source == "user"
    assert not services.title_update_auto(conversation_id=conversation.id, title="Robot title")
    with pytest.raises(ValidationError):
        services.conversation_update(conversation=conversation, title="   ")


def test_archive_hides_from_the_sidebar(conversation, alice):
    services.conversation_update(conversation=conversation, archived=True)
    assert list(selectors.conversation_list(user=alice)) == []
    assert list(selectors.conversation_list(user=alice, archived=True)) == [conversation]


def test_unknown_model_is_refused(alice, fake_gateway):
    with pytest.raises(ValidationError, match="Unknown model"):
        services.conversation_create(user=alice, model="gpt-17")


def test_a_new_chat_starts_in_one_transaction(alice, fake_gateway, settings):
    reply = services.conversation_start(user=alice, text="Plan a trip to Lisbon", system_prompt="Be brief.")
    conversation = Conversation.objects.get(user=alice)
    assert (conversation.title, conversation.system_prompt) == ("Plan a trip to Lisbon", "Be brief.")
    assert conversation.current_leaf_id == reply.id and reply.status == "pending"
    assert [m.role for m in selectors.branch_path(conversation=conversation)] == ["user", "assistant"]
    settings.CHAT_MAX_MESSAGE_CHARS = 20
    for kwargs in ({"text": " "}, {"text": "x" * 21}, {"text": "Hi", "model": "gpt-17"},
                   {"text": "Hi", "system_prompt": "y" * 21}):
        with pytest.raises(ValidationError):
            services.conversation_start(user=alice, **kwargs)
    assert Conversation.objects.filter(user=alice).count() == 1


def test_fallback_title_is_the_first_words():
    assert services.fallback_title("one two three four five six seven eight nine") == "one two three four five six seven eight…"
    assert services.fallback_title("short") == "short"


def test_delete_removes_messages(conversation):
    _finish(services.message_send(conversation=conversation, text="hi"))
    services.conversation_delete(conversation=conversation)
    assert not Conversation.objects.exists() and not Message.objects.exists()
