"""Export: JSONL lines with the context the reply answered, from the command and the admin."""
import io
import json

import pytest
from django.core.management import CommandError, call_command

from conversations.models import Message
from feedback import services
from tests.feedback.conftest import make_thread


@pytest.fixture
def branched(alice):
    """u1 → a1 → u2 → a2 on the current branch, and u2' (an edit) → a2' beside it."""
    conversation, u1, a1 = make_thread(alice)
    u2 = Message.objects.create(conversation=conversation, parent=a1, role="user", content="And in pots?")
    edited = Message.objects.create(conversation=conversation, parent=a1, role="user", content="And indoors?")
    Message.objects.create(conversation=conversation, parent=edited, role="assistant", content="Lamps.",
                           model="small")
    a2 = Message.objects.create(conversation=conversation, parent=u2, role="assistant", content="Big pots.",
                                model="large", prompt_tokens=30, completion_tokens=3)
    conversation.current_leaf = a2
    conversation.save(update_fields=["current_leaf"])
    return conversation, a1, a2


def export(**options) -> list[dict]:
    out = io.StringIO()
    call_command("export_feedback", stdout=out, stderr=io.StringIO(), **options)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_holds_the_rating_the_reply_its_model_and_the_branch_before_it(alice, branched):
    conversation, _, a2 = branched
    services.feedback_set(user=alice, message=a2, rating="down", category="unhelpful", comment="Which size?")
    [line] = export()
    assert line["rating"] == "down" and line["category"] == "unhelpful" and line["comment"] == "Which size?"
    assert line["model"] == "large" and line["message_id"] == str(a2.id)
    assert line["conversation_id"] == str(conversation.id) and line["system_prompt"] == "Be brief."
    assert line["context"] == [
        {"role": "user", "content": "How do I grow tomatoes?"},
        {"role": "assistant", "content": "Sun, water, stakes."},
        {"role": "user", "content": "And in pots?"},
    ]
    assert line["reply"]["content"] == "Big pots." and line["reply"]["completion_tokens"] == 3


def test_the_command_filters_by_rating_and_model_and_writes_a_file(alice, branched, tmp_path):
    _, a1, a2 = branched
    services.feedback_set(user=alice, message=a1, rating="up")
    services.feedback_set(user=alice, message=a2, rating="down")
    assert [line["message_id"] for line in export(rating="up")] == [str(a1.id)]
    assert [line["message_id"] for line in export(model="large")] == [str(a2.id)]
    target = tmp_path / "feedback.jsonl"
    export(output=str(target))
    assert len(target.read_text().splitlines()) == 2
    with pytest.raises(CommandError, match="not a date"):
        export(since="yesterday")


def test_the_admin_lists_filters_and_exports_jsonl(admin_client, alice, bob, branched):
    _, a1, a2 = branched
    services.feedback_set(user=alice, message=a1, rating="up")
    services.feedback_set(user=alice, message=a2, rating="down", comment="meh")
    services.feedback_set(user=bob, message=make_thread(bob)[2], rating="up")  # a filter needs two choices
    page = admin_client.get("/admin/feedback/feedback/?rating__exact=-1&model=large")
    assert page.status_code == 200 and "meh" in page.content.decode()
    for by in ("By model", "By rating", "By user", "By created at"):
        assert by.lower() in page.content.decode().lower()
    ids = [str(pk) for pk in alice.feedback.values_list("id", flat=True)]
    response = admin_client.post("/admin/feedback/feedback/", {"action": "export_jsonl", "_selected_action": ids})
    assert response["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]
    assert {line["rating"] for line in lines} == {"up", "down"}
    assert all(line["context"] for line in lines)
