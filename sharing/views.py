"""Share links: the owner's create / list / revoke (404 to anyone else) and
the public, read-only snapshot page (no account, no sidebar, noindex)."""
from __future__ import annotations

from django.contrib.auth.views import redirect_to_login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from conversations.selectors import access_conversation
from sharing import selectors, services

MAX_TOKEN_CHARS = 64  # tokens are 43; a longer one is not worth a query


def _private(response: HttpResponse) -> HttpResponse:
    """The snapshot page: kept out of search engines, caches (a revoked link
    must 404 at once) and Referer headers (the URL is the secret)."""
    response["X-Robots-Tag"] = "noindex, nofollow"
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_POST
def share_create(request, conversation_id):
    conversation = access_conversation(user=request.user, conversation_id=conversation_id)
    try:
        share = services.share_create(conversation=conversation)
    except ValidationError as exc:
        return HttpResponse(" ".join(exc.messages), status=422, content_type="text/plain; charset=utf-8")
    if not request.htmx:
        return redirect("share_list")
    # The chat's menu shows the new link in place.
    return render(request, "sharing/_created.html", {"share": share})


@login_required
@require_GET
def share_list(request):
    return render(request, "sharing/share_list.html", {"shares": selectors.share_list(user=request.user)})


@login_required
@require_POST
def share_revoke(request, share_id):
    share = selectors.access_share(user=request.user, share_id=share_id)
    services.share_revoke(share=share)
    return redirect("share_list")


@require_GET
def share_view(request, token):
    if len(token) > MAX_TOKEN_CHARS:
        raise Http404("No such share")
    share = selectors.share_by_token(token=token)
    return _private(render(request, "sharing/share_view.html", {"share": share, "shared_messages": share.messages.all()}))


@require_POST
def share_continue(request, token):
    if len(token) > MAX_TOKEN_CHARS:
        raise Http404("No such share")
    share = selectors.share_by_token(token=token)
    if not request.user.is_authenticated:
        # Back to the snapshot after signing in, where the button is again.
        return redirect_to_login(reverse("share_view", args=[token]))
    conversation = services.share_continue(share=share, user=request.user)
    return redirect("conversation", conversation_id=conversation.id)
