"""A user's account: sign-up, and the settings pages for usage and API keys.

The gateway owns quotas, the usage ledger and API keys as data; these pages
only render what its selectors and key services return.
"""
from functools import wraps

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django_ratelimit.decorators import ratelimit

from accounts.forms import SignUpForm
from accounts.services import user_sign_up
from gateway import keys, selectors


@require_http_methods(["GET", "POST"])
def signup(request):
    if request.user.is_authenticated:
        return redirect("home")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = user_sign_up(
            username=form.cleaned_data["username"], password=form.cleaned_data["password1"]
        )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)


def _page_rate(group, request):
    return settings.GATEWAY_PAGE_RATE


def throttled(view):
    """django-ratelimit per user and per IP, answered with a 429 page (its own default is a 403)."""

    @ratelimit(key="user_or_ip", rate=_page_rate, block=False)
    @ratelimit(key="ip", rate=_page_rate, block=False)
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if getattr(request, "limited", False):
            response = render(request, "accounts/throttled.html", status=429)
            response["Retry-After"] = "60"
            return response
        return view(request, *args, **kwargs)

    return wrapper


@login_required
@throttled
def usage(request):
    return render(request, "accounts/usage.html", selectors.usage_summary(user=request.user))


@login_required
@throttled
def api_keys(request):
    new_key, error = None, ""
    if request.method == "POST":
        name = request.POST.get("name", "")
        if "\x00" in name:
            # PostgreSQL text cannot hold it; say so instead of failing on save.
            error = "The name contains a NUL character (\\0); remove it and try again."
        else:
            _, new_key = keys.api_key_create(user=request.user, name=name)
    context = {"keys": selectors.api_keys_of(user=request.user), "new_key": new_key, "error": error}
    return render(request, "accounts/api_keys.html", context, status=400 if error else 200)


@login_required
@require_POST
@throttled
def api_key_revoke(request, key_id: int):
    keys.api_key_revoke(user=request.user, key_id=key_id)
    return redirect("api_keys")
