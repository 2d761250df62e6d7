"""Conversations, messages and preferences in the admin.

What people wrote is theirs: no list shows message text, the change pages
show metadata only, and staff read a conversation only through its "read"
page (the list's action or the button on its page), which first asks why
and records an audit event naming the reader, the owner and the reason.
"""
from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from audit.admin import AuditedAdmin
from audit.services import Kind, audit_record
from conversations.models import ChatPreferences, Conversation, Message

READ_TEMPLATE = "admin/conversations/conversation/read.html"


class ReadOnlyAdmin(AuditedAdmin, admin.ModelAdmin):
    """Staff look at metadata; they do not edit or delete users' chats (a
    delete page would list every message). A conversation's title and a
    message's __str__ are made of its text, so the pages name objects by id
    (`subtitle` here, the breadcrumbs in admin/conversations/change_form.html)."""

    change_form_template = "admin/conversations/change_form.html"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def action_checkbox(self, obj):
        # Django labels the checkbox with str(obj), i.e. with the user's words.
        attrs = {"class": "action-select", "aria-label": f"Select this object for an action - {obj.pk}"}
        return forms.CheckboxInput(attrs, lambda value: False).render(helpers.ACTION_CHECKBOX_NAME, str(obj.pk))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), "subtitle": object_id})

    def history_view(self, request, object_id, extra_context=None):
        raise Http404("No history for users' chats: they are read-only here.")


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    # No title: it is the first words of the first message until the model names the chat.
    list_display = ("id", "user", "model", "archived", "message_count", "created_at", "updated_at")
    list_filter = ("archived", "model", "title_source", "created_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "id__exact")
    date_hierarchy = "created_at"
    # No system prompt, summary or messages here: they are read on the read page.
    fields = ("id", "user", "title_source", "model", "archived", "created_at", "updated_at")
    readonly_fields = fields
    actions = ["read_conversation"]
    change_form_template = "admin/conversations/conversation/change_form.html"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(message_count=Count("messages"))

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, obj):
        return obj.message_count

    def get_urls(self):
        read = self.admin_site.admin_view(self.read_view)
        return [path("<uuid:object_id>/read/", read, name="conversations_conversation_read"), *super().get_urls()]

    @admin.action(description="Read the selected conversation (recorded in the audit log)")
    def read_conversation(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one conversation to read.", messages.WARNING)
            return None
        return redirect(reverse("admin:conversations_conversation_read", args=[queryset.get().pk]))

    def read_view(self, request, object_id):
        if not self.has_view_permission(request):
            raise PermissionDenied
        conversation = get_object_or_404(Conversation.objects.select_related("user"), pk=object_id)
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "conversation": conversation,
                   "title": f"Read conversation {conversation.pk}"}
        reason = (request.POST.get("reason") or "").strip()[:200] if request.method == "POST" else ""
        if not reason:
            # First ask why: nothing is shown, nothing recorded.
            context["asked"] = request.method == "POST"
            return TemplateResponse(request, READ_TEMPLATE, context)
        audit_record(
            kind=Kind.CONVERSATION_READ, actor=request.user, target_user=conversation.user, request=request,
            summary=f"{request.user.get_username()} read the conversation {conversation.pk} of "
                    f"{conversation.user.get_username()}: {reason}",
            data={"conversation_id": str(conversation.pk), "reason": reason},
        )
        context["transcript"] = conversation.messages.order_by("created_at")
        context["system_prompt"] = conversation.system_prompt
        return TemplateResponse(request, READ_TEMPLATE, context)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation_id", "role", "status", "model", "prompt_tokens", "completion_tokens",
                    "created_at")
    list_filter = ("role", "status", "model", "created_at")
    # By ids and owner, never by content: a search would show whose chats contain a word.
    search_fields = ("id__exact", "conversation__id__exact", "conversation__user__username", "request_id")
    date_hierarchy = "created_at"
    fields = ("id", "conversation_id", "parent_id", "role", "status", "model", "error", "prompt_tokens",
              "completion_tokens", "cached_tokens", "request_id", "created_at", "finished_at")
    readonly_fields = fields


@admin.register(ChatPreferences)
class ChatPreferencesAdmin(ReadOnlyAdmin):
    list_display = ("user", "updated_at")
    list_select_related = ("user",)
    search_fields = ("user__username",)
    list_filter = ("updated_at",)
    fields = ("user", "updated_at")
    readonly_fields = fields
