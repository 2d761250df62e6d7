"""Writes for share links: take a snapshot, revoke it, continue it."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from conversations import selectors as chat_selectors
from conversations import services as chat_services
from conversations.models import Conversation, Message
from sharing.models import Share, SharedMessage


def _snapshot_of(conversation: Conversation) -> list[Message]:
    """The branch on screen, root → leaf: the user's messages and the finished
    replies that say something (a reply still being written is left out)."""
    return [
        m for m in chat_selectors.branch_path(conversation=conversation)
        if m.role == Message.Role.USER or (m.role == Message.Role.ASSISTANT and m.is_terminal and m.content)
    ]


@transaction.atomic
def share_create(*, conversation: Conversation) -> Share:
    """A read-only copy of the conversation's current branch, as it is now."""
    if conversation.temporary:
        raise ValidationError("A temporary chat cannot be shared.")
    messages = _snapshot_of(conversation)
    if not messages:
        raise ValidationError("There is nothing to share in this chat yet.")
    share = Share.objects.create(user=conversation.user, conversation=conversation,
                                 title=conversation.title or "Shared chat")
    SharedMessage.objects.bulk_create([
        SharedMessage(share=share, position=i, role=m.role, content=m.content, model=m.model if m.role == "assistant" else "")
        for i, m in enumerate(messages)
    ])
    return share


def share_revoke(*, share: Share) -> None:
    """The link answers 404 from now on; the copies go with it."""
    share.delete()


def share_continue(*, share: Share, user) -> Conversation:
    """The snapshot copied into `user`'s account as a new chat to go on with."""
    turns = [(m.role, m.content, m.model) for m in share.messages.all()]
    return chat_services.conversation_import(user=user, title=share.title, turns=turns)
