import pytest

from conversations.models import Conversation, Message


def make_thread(user, *, model="small", status=Message.Status.COMPLETE):
    """A conversation: question → reply, both on the current branch."""
    conversation = Conversation.objects.create(user=user, title="Tomatoes", system_prompt="Be brief.")
    question = Message.objects.create(conversation=conversation, role="user", content="How do I grow tomatoes?")
    reply = Message.objects.create(conversation=conversation, parent=question, role="assistant",
                                   content="Sun, water, stakes.", status=status, model=model,
                                   prompt_tokens=12, completion_tokens=5)
    conversation.current_leaf = reply
    conversation.save(update_fields=["current_leaf"])
    return conversation, question, reply


@pytest.fixture
def thread(alice):
    return make_thread(alice)
