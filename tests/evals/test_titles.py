"""The title job names the topic in a few words, even when the model answers
the message instead (SmolLM2 titled "Give me three tips for growing
tomatoes." as "1. Use a tomato skin to protect your plants from pests")."""
import pytest

from conversations import services, tasks
from conversations.models import Conversation

TOMATOES = "Give me three tips for growing tomatoes."


@pytest.mark.parametrize("answer", [
    "1. Use a tomato skin to protect your plants from pests",  # a list item: an answer
    "- Water them deeply twice a week",
    "Tomatoes need six to eight hours of sun every day to grow well",  # a sentence, not a few words
    "Baking Bread by Hand",  # one of the prompt's examples, not this topic
    "",
])
def test_an_answer_is_not_a_title(answer):
    assert services.clean_title(answer, TOMATOES) is None
    assert services.title_for(answer, TOMATOES) == "Three tips for growing tomatoes"


def test_a_title_is_tidied_up():
    assert services.clean_title('Title: "Growing Tomatoes."\nMore text', TOMATOES) == "Growing Tomatoes"
    assert services.clean_title("**Tomato Growing Tips**", TOMATOES) == "Tomato Growing Tips"


@pytest.mark.parametrize("message, title", [
    ("What is the capital of France?", "Capital of France"),
    ("How do I bake sourdough bread at home with rye flour?", "Bake sourdough bread at home"),
    ("I want to run my first marathon next spring. How should I train?", "Run my first marathon next spring"),
    ("What's a good way to make a monthly budget when my income changes?", "Make a monthly budget"),
    ("Can you review my resume summary and make it sound more professional?", "Review my resume summary"),
    ("hi", "Hi"),
    ("?!", "?!"),
])
def test_the_topic_comes_from_the_message_without_its_asking(message, title):
    assert services.topic_title(message) == title


def test_the_prompt_asks_for_a_title_with_examples_and_ends_with_the_message():
    messages = tasks.title_messages(TOMATOES)
    assert messages[0]["role"] == "system" and "title" in messages[0]["content"]
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(tasks.TITLE_EXAMPLES)
    assert messages[-1] == {"role": "user", "content": f"Message: {TOMATOES}"}


@pytest.mark.django_db
def test_the_job_names_the_topic_when_the_model_answers_instead(alice, fake_gateway):
    conversation = services.conversation_create(user=alice)
    reply = services.message_send(conversation=conversation, text=TOMATOES)
    services.reply_start(reply_id=reply.id, request_id="r")
    services.reply_finish(reply_id=reply.id, status="complete", content="Here are three tips.", stream_seq=2)
    fake_gateway.completions = ["1. Use a tomato skin to protect your plants from pests"]
    assert tasks.title_conversation(str(conversation.id)) == "Three tips for growing tomatoes"
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_source) == ("Three tips for growing tomatoes",
                                                               Conversation.TitleSource.AUTO)
