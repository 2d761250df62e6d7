"""Chat pages. Thin: parse, authorize (`access_*`), call one service, respond.

Views that start a generation are async: the reply task must be created on
the server's event loop, where it outlives the request that started it. Their
database work runs on the chat's own threads (`db_thread`), not queued behind
every sync view on asgiref's single thread.
"""
from __future__ import annotations

from functools import wraps
from inspect import iscoroutinefunction

from django.conf import settings
from django.contrib.auth.decorators import login_required as django_login_required
from django.contrib.auth.decorators import user_passes_test
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.utils.html import escape
from django.utils.text import slugify
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET, require_POST

from audit.net import client_ip
from chatapp.runtime import REDIS_ERRORS, on_db_thread
from conversations import selectors, services, turns
from conversations.rendering import pygments_css
from gateway import ratelimits
from gateway.types import try_again_in
from memory import services as memory_services


def _sidebar_page(user, page=None, archived: bool = False):
    """`page` as the query string has it: get_page turns anything that is not
    a page number (`?page=²`, a 5,000-digit number) into the first or last page."""
    paginator = Paginator(selectors.conversation_list(user=user, archived=archived), settings.CHAT_PAGE_SIZE)
    return paginator.get_page(page)


def _refuse_nul(*values) -> None:
    """PostgreSQL text cannot hold NUL characters: say so, rather than fail on save."""
    if any(isinstance(value, str) and "\x00" in value for value in values):
        raise ValidationError("The text contains a NUL character (\\0), which cannot be stored; remove it and try again.")


def _main_context(request, conversation=None) -> dict:
    """What the chat's main pane (`_main.html`) needs."""
    return {
        "conversation": conversation,
        "branch": selectors.branch_with_siblings(conversation=conversation) if conversation else [],
        "models": selectors.models_for(user=request.user),
        "default_model": selectors.default_model(),
        "max_chars": settings.CHAT_MAX_MESSAGE_CHARS,
    }


def _chat_context(request, conversation=None, error: str = "", draft: str = "") -> dict:
    return {**_main_context(request, conversation), "sidebar": _sidebar_page(request.user), "error": error, "draft": draft}


async def _is_authenticated(user) -> bool:
    return user.is_authenticated


def login_required(view):
    """Django's, without its thread hop for async views: its test is a sync
    lambda, which it runs through `sync_to_async` on every request; the user
    is already loaded (chatapp.middleware.LoadedUserMiddleware), so an async
    test is a plain attribute read."""
    if iscoroutinefunction(view):
        return user_passes_test(_is_authenticated)(view)
    return django_login_required(view)


def _composer_error(message: str, status: int = 422) -> HttpResponse:
    """The message, swapped by htmx into the composer's error slot. htmx
    swaps it as HTML whatever its content type, and the message may echo
    what the user sent (a model name): escaped here."""
    response = HttpResponse(escape(message), status=status, content_type="text/plain; charset=utf-8")
    response["HX-Retarget"] = "#composer-error"
    response["HX-Reswap"] = "innerHTML"
    return response


def _plain_error(exc: ValidationError) -> HttpResponse:
    return HttpResponse(escape(" ".join(exc.messages)), status=422, content_type="text/plain; charset=utf-8")


async def _chat_rate_limited(request, user) -> HttpResponse | None:
    """The API's kind of HTTP rate limit on the chat's POSTs that start a
    reply, per user and per client address (gateway.ratelimits: async
    counters in Redis, on the event loop). A user over their limit does not
    count against their address."""
    checks = (("chat-user", str(user.pk), settings.CHAT_RATE_PER_USER),
              ("chat-ip", client_ip(request), settings.CHAT_RATE_PER_IP))
    try:
        for group, identity, rate in checks:
            wait_s = await ratelimits.hit(group=group, identity=identity, rate=rate)
            if wait_s is not None:
                break
    except REDIS_ERRORS:
        return _composer_error("The rate limiter (Redis) is unreachable; try again in a minute.", status=503)
    if wait_s is None:
        return None
    response = _composer_error(f"You are sending messages too fast. {try_again_in(wait_s)}", status=429)
    response["Retry-After"] = str(wait_s)
    return response


def chat_throttled(view):
    """For the async views that start a reply (inside login_required)."""

    @wraps(view)
    async def wrapper(request, *args, **kwargs):
        limited = await _chat_rate_limited(request, await request.auser())
        return limited if limited is not None else await view(request, *args, **kwargs)

    return wrapper


@login_required
@require_GET
def home(request):
    return render(request, "conversations/chat.html", _chat_context(request))


@login_required
@require_GET
def conversation_page(request, conversation_id):
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    return render(request, "conversations/chat.html", _chat_context(request, conversation))


@login_required
@require_GET
def sidebar(request):
    archived = request.GET.get("archived") == "1"
    page = _sidebar_page(request.user, request.GET.get("page"), archived)
    return render(request, "conversations/_sidebar_items.html", {"sidebar": page, "archived": archived})


def _thread_response(request, conversation) -> HttpResponse:
    return render(request, "conversations/_thread.html", {"conversation": conversation, "branch": selectors.branch_with_siblings(conversation=conversation)})


# ------------------------------------------------------------ turns (async)

def _new_chat_fragment(request, conversation) -> HttpResponse:
    return render(request, "conversations/_new_chat.html", _main_context(request, conversation))


@login_required
@require_POST
@chat_throttled
async def conversation_new(request):
    user = await request.auser()
    request.user = user  # the page render must not load the user a second time
    try:
        _refuse_nul(request.POST.get("text"), request.POST.get("model"), request.POST.get("system_prompt"))
        reply, prepared = await on_db_thread(turns.create_and_prepare)(
            services.conversation_start, user=user, text=request.POST.get("text"),
            model=request.POST.get("model", ""), system_prompt=request.POST.get("system_prompt", ""),
            temporary=request.POST.get("temporary") == "1",
        )
    except ValidationError as exc:
        message = " ".join(exc.messages)
        if request.htmx:
            return _composer_error(message)
        return await on_db_thread(lambda: render(request, "conversations/chat.html", _chat_context(
            request, error=message, draft=request.POST.get("text", "")), status=422))()
    turns.start_reply(reply.id, prepared)
    url = f"/c/{reply.conversation_id}/"
    if not request.htmx:
        return redirect(url)
    # The new chat's main pane and its sidebar entry in this response (no
    # redirect round trip before the stream opens, and not the whole page:
    # the sidebar's queries and render would hold every chat of a burst back).
    response = await on_db_thread(_new_chat_fragment)(request, reply.conversation)
    response["HX-Retarget"] = "#main"
    response["HX-Reswap"] = "innerHTML"
    response["HX-Push-Url"] = url
    return response


def _turn_fragment(request, reply):
    conversation = reply.conversation
    return render(request, "conversations/_thread.html", {"conversation": conversation, "branch": selectors.branch_with_siblings(conversation=conversation)})


async def _start_and_render(request, fn, **kwargs):
    try:
        _refuse_nul(*kwargs.values())
        reply, prepared = await on_db_thread(turns.create_and_prepare)(fn, **kwargs)
    except ValidationError as exc:
        return _composer_error(" ".join(exc.messages))
    turns.start_reply(reply.id, prepared)
    return await on_db_thread(_turn_fragment)(request, reply)


@login_required
@require_POST
@chat_throttled
async def message_send(request, conversation_id):
    user = await request.auser()
    conversation = await on_db_thread(selectors.access_conversation)(user=user, conversation_id=conversation_id)
    return await _start_and_render(request, services.message_send, conversation=conversation, text=request.POST.get("text"))


@login_required
@require_POST
@chat_throttled
async def message_edit(request, message_id):
    user = await request.auser()
    message = await on_db_thread(selectors.access_message)(user=user, message_id=message_id)
    return await _start_and_render(request, services.message_edit, message=message, text=request.POST.get("text"))


@login_required
@require_POST
@chat_throttled
async def message_regenerate(request, message_id):
    user = await request.auser()
    message = await on_db_thread(selectors.access_message)(user=user, message_id=message_id)
    return await _start_and_render(request, services.message_regenerate, message=message)


@login_required
@require_POST
async def message_stop(request, message_id):
    user = await request.auser()
    message = await on_db_thread(selectors.access_message)(user=user, message_id=message_id)
    status = await turns.stop_reply(message.id)
    return JsonResponse({"status": status})


@login_required
@require_POST
def message_save_to_memory(request, message_id):
    """*Save to memory* on a message: the button becomes a note (htmx), or
    the message that says why not (422)."""
    message = selectors.access_message(user=request.user, message_id=message_id)
    try:
        if message.conversation.temporary:
            raise ValidationError("This is a temporary chat: nothing from it is saved to memory.")
        if not message.is_terminal:
            raise ValidationError("Wait for the reply to finish, then save it.")
        memory = memory_services.memory_save_message(user_id=request.user.id, text=message.content, message_id=message.id)
    except ValidationError as exc:
        return HttpResponse(f'<span class="memory-error" role="alert">{escape(" ".join(exc.messages))}</span>', status=422)
    if not request.htmx:
        return redirect("conversation", conversation_id=message.conversation_id)
    return render(request, "memory/_saved.html", {"memory": memory})


# ------------------------------------------------------------ tree & conversation edits

@login_required
@require_POST
def branch_switch(request, message_id):
    message = selectors.access_message(user=request.user, message_id=message_id)
    services.branch_switch(message=message)
    return _thread_response(request, message.conversation)


@login_required
@require_POST
def conversation_rename(request, conversation_id):
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    try:
        _refuse_nul(request.POST.get("title"))
        services.conversation_update(conversation=conversation, title=request.POST.get("title", ""))
    except ValidationError as exc:
        return _plain_error(exc)
    if request.htmx:
        return render(request, "conversations/_title.html", {"conversation": conversation})
    return redirect("conversation", conversation_id=conversation.id)


@login_required
@require_POST
def conversation_settings(request, conversation_id):
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    try:
        _refuse_nul(request.POST.get("model"), request.POST.get("system_prompt"))
        services.conversation_update(
            conversation=conversation, model=request.POST.get("model", ""),
            system_prompt=request.POST.get("system_prompt", ""),
        )
    except ValidationError as exc:
        return _plain_error(exc)
    return redirect("conversation", conversation_id=conversation.id)


@login_required
@require_POST
def conversation_archive(request, conversation_id):
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    services.conversation_update(conversation=conversation, archived=request.POST.get("archived") != "0")
    return redirect("conversation", conversation_id=conversation.id)


@login_required
def conversation_delete(request, conversation_id):
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    if request.method == "POST":
        services.conversation_delete(conversation=conversation)
        return redirect("home")
    return render(request, "conversations/confirm_delete.html", {"conversation": conversation, "sidebar": _sidebar_page(request.user)})


@login_required
@require_GET
def conversation_export(request, conversation_id, fmt):
    if fmt not in ("md", "json"):
        raise Http404("Unknown export format")
    conversation = selectors.access_conversation(user=request.user, conversation_id=conversation_id)
    name = slugify(conversation.title)[:50] or "chat"
    if fmt == "json":
        response = JsonResponse(selectors.export_json(conversation=conversation), json_dumps_params={"indent": 2, "ensure_ascii": False})
    else:
        response = HttpResponse(selectors.export_markdown(conversation=conversation), content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.{"json" if fmt == "json" else "md"}"'
    return response


@login_required
@require_GET
def archived(request):
    return render(request, "conversations/archived.html", {"sidebar": _sidebar_page(request.user), "archived_page": _sidebar_page(request.user, request.GET.get("page"), archived=True)})


@login_required
@require_GET
def search(request):
    query = request.GET.get("q", "")[:200]
    if "\x00" in query:
        return HttpResponseBadRequest("The search contains a NUL character (\\0); remove it and search again.",
                                      content_type="text/plain; charset=utf-8")
    hits = selectors.search(user=request.user, query=query)
    return render(request, "conversations/search.html", {"query": query, "hits": hits, "sidebar": _sidebar_page(request.user)})


@login_required
def preferences(request):
    saved = False
    error = ""
    if request.method == "POST":
        try:
            _refuse_nul(request.POST.get("custom_instructions"))
            services.preferences_update(user=request.user, custom_instructions=request.POST.get("custom_instructions", ""))
            saved = True
        except ValidationError as exc:
            error = " ".join(exc.messages)
    prefs = selectors.preferences_get(user=request.user)
    return render(request, "conversations/preferences.html", {"prefs": prefs, "saved": saved, "error": error, "sidebar": _sidebar_page(request.user)}, status=422 if error else 200)


@require_GET
@cache_control(max_age=86400, public=True)
def code_css(request):
    return HttpResponse(pygments_css(), content_type="text/css; charset=utf-8")
