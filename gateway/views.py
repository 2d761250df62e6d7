"""The user's settings pages: usage and API keys."""
from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit

from gateway import keys, selectors


def _page_rate(group, request):
    return settings.GATEWAY_PAGE_RATE


def throttled(view):
    """django-ratelimit per user and per IP, answered with a 429 page (its own default is a 403)."""

    @ratelimit(key="user_or_ip", rate=_page_rate, block=False)
    @ratelimit(key="ip", rate=_page_rate, block=False)
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if getattr(request, "limited", False):
            response = render(request, "gateway/throttled.html", status=429)
            response["Retry-After"] = "60"
            return response
        return view(request, *args, **kwargs)

    return wrapper


@login_required
@throttled
def usage(request):
    return render(request, "gateway/usage.html", selectors.usage_summary(user=request.user))


@login_required
@throttled
def api_keys(request):
    new_key = None
    if request.method == "POST":
        _, new_key = keys.api_key_create(user=request.user, name=request.POST.get("name", ""))
    context = {"keys": selectors.api_keys_of(user=request.user), "new_key": new_key}
    return render(request, "gateway/api_keys.html", context)


@login_required
@require_POST
@throttled
def api_key_revoke(request, key_id: int):
    keys.api_key_revoke(user=request.user, key_id=key_id)
    return redirect("api_keys")
