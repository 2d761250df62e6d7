"""The Memory page: suggestions to accept, edit or delete; saved memories to
edit or delete; the on/off switch (shown on the Custom instructions page).
Thin: parse, authorize (`access_memory`), call one service, respond. Plain
forms and redirects: the page works without JavaScript."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from memory import selectors, services
from memory.models import Memory


def _page(request, *, error: str = "", status: int = 200):
    context = {
        "suggestions": selectors.memory_list(user=request.user, status=Memory.Status.SUGGESTED),
        "memories": selectors.memory_list(user=request.user, status=Memory.Status.ACTIVE),
        "enabled": selectors.memory_enabled(user_id=request.user.id),
        "error": error,
    }
    return render(request, "memory/memory_list.html", context, status=status)


def _apply(request, action):
    """Run `action`; the page again with the error (422) when it is refused."""
    try:
        action()
    except ValidationError as exc:
        return _page(request, error=" ".join(exc.messages), status=422)
    return redirect("memory_list")


@login_required
@require_GET
def memory_list(request):
    return _page(request)


@login_required
@require_POST
def memory_add(request):
    return _apply(request, lambda: services.memory_create(
        user_id=request.user.id, text=request.POST.get("text"), source=Memory.Source.MANUAL))


@login_required
@require_POST
def memory_accept(request, memory_id):
    memory = selectors.access_memory(user=request.user, memory_id=memory_id)
    return _apply(request, lambda: services.memory_accept(memory=memory, text=request.POST.get("text")))


@login_required
@require_POST
def memory_edit(request, memory_id):
    memory = selectors.access_memory(user=request.user, memory_id=memory_id)
    return _apply(request, lambda: services.memory_update(memory=memory, text=request.POST.get("text")))


@login_required
@require_POST
def memory_delete(request, memory_id):
    memory = selectors.access_memory(user=request.user, memory_id=memory_id)
    services.memory_delete(memory=memory)
    return redirect("memory_list")


@login_required
@require_POST
def memory_settings(request):
    services.settings_update(user=request.user, enabled=request.POST.get("enabled") == "1")
    # Only these two names: a free-form "next" would be an open redirect.
    return redirect("chat_preferences" if request.POST.get("return_to") == "preferences" else "memory_list")
