"""Who becomes the first admin.

On a loopback bind the person at the keyboard is the operator, and the first
account that signs up becomes the admin (the two-command set-up). On any other
bind that would hand the server to whoever finds it first, so `serve` prints a
one-time setup token instead, and the first admin is made on /accounts/setup/
with it (or with `manage.py createsuperuser`). Anything that did not go
through `serve` (Daphne started by hand, tests) is treated as not loopback.

The token's hash lives in Redis (the Django cache), so every process of the
deployment accepts it, and it is deleted when used.
"""
from __future__ import annotations

import hashlib
import ipaddress
import secrets

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.utils.crypto import constant_time_compare

SETUP_TOKEN_CACHE_KEY = "accounts:setup-token-sha256"
SETUP_TOKEN_TTL_S = 7 * 86400

_first_signup_is_admin = False


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_signup_is_admin() -> bool:
    return _first_signup_is_admin


def set_first_signup_is_admin(value: bool) -> None:
    global _first_signup_is_admin
    _first_signup_is_admin = value


def admin_exists() -> bool:
    return get_user_model().objects.filter(is_superuser=True).exists()


def any_user_exists() -> bool:
    return get_user_model().objects.exists()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_setup_token() -> str:
    """A new one-time token (the previous one stops working)."""
    token = secrets.token_urlsafe(24)
    cache.set(SETUP_TOKEN_CACHE_KEY, _digest(token), timeout=SETUP_TOKEN_TTL_S)
    return token


def setup_token_valid(token: str) -> bool:
    stored = cache.get(SETUP_TOKEN_CACHE_KEY)
    return bool(token) and stored is not None and constant_time_compare(stored, _digest(token))


def consume_setup_token(token: str) -> bool:
    """True once for a valid token; it is gone afterwards."""
    if not setup_token_valid(token):
        return False
    return bool(cache.delete(SETUP_TOKEN_CACHE_KEY))


def configure_for_bind(host: str) -> str | None:
    """Called by `serve` before it listens on `host`. Returns the setup token
    to print, or None (loopback, or an admin already exists)."""
    loopback = is_loopback(host)
    set_first_signup_is_admin(loopback)
    if loopback or admin_exists():
        return None
    return issue_setup_token()
