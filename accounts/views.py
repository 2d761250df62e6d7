"""A user's account: sign-up, and the settings pages for usage and API keys.

The gateway owns quotas, the usage ledger and API keys as data; these pages
only render what its selectors and key services return.
"""
from functools import wraps

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django_ratelimit.decorators import ratelimit

from accounts import setup
from accounts.forms import SetupForm, SignUpForm
from accounts.services import admin_create_with_token, password_changed, user_sign_up
from audit.net import client_ip
from gateway import keys, selectors


def _signup_rate(group, request):
    return settings.SIGNUP_RATE_PER_IP


def _client_ip(group, request):
    return client_ip(request)


@require_http_methods(["GET", "POST"])
@ratelimit(key=_client_ip, rate=_signup_rate, method="POST", block=False)
def signup(request):
    if request.user.is_authenticated:
        return redirect("home")
    if settings.SIGNUP_POLICY == "closed" and not (setup.first_signup_is_admin() and not setup.any_user_exists()):
        return render(request, "registration/signup_closed.html", status=403)
    if getattr(request, "limited", False):
        return _too_many(request)
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = user_sign_up(
                username=form.cleaned_data["username"], password=form.cleaned_data["password1"],
                invite_code=form.cleaned_data.get("invite_code", ""), request=request,
            )
        except ValidationError as exc:  # a bad invite code, or the model's own checks
            form.add_error(None if hasattr(exc, "error_dict") or "invite_code" not in form.fields else "invite_code",
                           exc)
        except PermissionDenied:
            return render(request, "registration/signup_closed.html", status=403)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("home")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
@ratelimit(key=_client_ip, rate=_signup_rate, method="POST", block=False)
def first_admin_setup(request):
    """/accounts/setup/: the first admin, with the token `serve` printed."""
    if setup.admin_exists():
        raise Http404("An admin exists already.")
    if getattr(request, "limited", False):
        return _too_many(request)
    form = SetupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = admin_create_with_token(
                token=form.cleaned_data["setup_token"], username=form.cleaned_data["username"],
                password=form.cleaned_data["password1"], request=request,
            )
        except PermissionDenied as exc:
            form.add_error("setup_token", str(exc))
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("/admin/")
    return render(request, "registration/setup.html", {"form": form}, status=400 if form.errors else 200)


class PasswordChangeView(auth_views.PasswordChangeView):
    """Django's, plus: with PASSWORD_CHANGE_REVOKES_KEYS the API keys go too."""

    def form_valid(self, form):
        response = super().form_valid(form)
        password_changed(user=form.user, request=self.request)
        return response


def _too_many(request):
    response = render(request, "accounts/throttled.html", status=429)
    response["Retry-After"] = "60"
    return response


def _page_rate(group, request):
    return settings.GATEWAY_PAGE_RATE


def throttled(view):
    """django-ratelimit per user and per IP, answered with a 429 page (its own default is a 403)."""

    @ratelimit(key="user_or_ip", rate=_page_rate, block=False)
    @ratelimit(key=_client_ip, rate=_page_rate, block=False)
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if getattr(request, "limited", False):
            return _too_many(request)
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
