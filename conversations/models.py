"""Conversations and their message tree.

A conversation's messages form a tree through `parent`: regenerating a reply
adds a sibling assistant message, editing a user message adds a sibling user
message (and a new reply under it). `current_leaf` remembers which branch the
user is looking at; the page shows the path from the root to that leaf.
"""
from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector
from django.db import models


class Conversation(models.Model):
    class TitleSource(models.TextChoices):
        FALLBACK = "fallback"  # the first words of the first message, until the model names it
        AUTO = "auto"
        USER = "user"  # a rename wins over every automatic title

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    title_source = models.CharField(max_length=10, choices=TitleSource.choices, default=TitleSource.FALLBACK)
    model = models.CharField(max_length=100, blank=True, help_text="empty: the gateway's default")
    system_prompt = models.TextField(blank=True)
    archived = models.BooleanField(default=False)
    # A temporary chat is not listed or searched, uses and saves no memory,
    # gets no model-written title, and is deleted TEMPORARY_CHAT_TTL_S after
    # its last change (conversations.tasks.purge_temporary_chats).
    temporary = models.BooleanField(default=False)
    current_leaf = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Running summary of the turns that no longer fit the model's context;
    # valid only on branches that contain `summary_through`.
    summary = models.TextField(blank=True)
    summary_through = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["user", "archived", "-updated_at"], name="conv_user_recent"),
            GinIndex(SearchVector("title", config="english"), name="conv_title_fts"),
            models.Index(fields=["updated_at"], name="conv_temporary", condition=models.Q(temporary=True)),
        ]

    def __str__(self) -> str:
        return self.title or "New chat"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        SYSTEM = "system"
        TOOL = "tool"

    class Status(models.TextChoices):
        PENDING = "pending"
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        INTERRUPTED = "interrupted"
        ERROR = "error"
        BLOCKED = "blocked"

    TERMINAL = frozenset({Status.COMPLETE, Status.STOPPED, Status.INTERRUPTED, Status.ERROR, Status.BLOCKED})
    UNFINISHED = (Status.PENDING, Status.STREAMING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.COMPLETE)
    model = models.CharField(max_length=100, blank=True)
    error = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # The gateway request id of the generation (for abort) and the sequence
    # number of the last stream event folded into `content`: a page rendered
    # from the database resumes the stream after exactly that event.
    request_id = models.CharField(max_length=64, blank=True)
    stream_seq = models.PositiveIntegerField(default=0)
    # While a reply is unfinished, the process generating it touches this
    # every REPLY_HEARTBEAT_S; one silent for REPLY_STALE_S belongs to a dead
    # process and is reaped (several `serve`s may share the database, so
    # "unfinished" alone says nothing about who is still writing it).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["conversation", "-created_at"], name="msg_conv_newest"),
            models.Index(fields=["status"], name="msg_status", condition=models.Q(status__in=["pending", "streaming"])),
            GinIndex(SearchVector("content", config="english"), name="msg_content_fts"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class ChatPreferences(models.Model):
    """Per-user custom instructions, prepended to every conversation's system prompt."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_preferences")
    custom_instructions = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)
