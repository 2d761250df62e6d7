"""The client's address, for the audit log, sign-in lockout and rate limits.

The product runs behind Daphne on TCP or on a unix socket. On a unix socket
(behind a local reverse proxy) REMOTE_ADDR is empty or absent, and on TCP
behind a local proxy it is a loopback address: in both cases the address that
matters is the one the proxy appended last to X-Forwarded-For. Only then is the
header read: a client that talks to Daphne directly cannot choose its address.
"""
from __future__ import annotations

import ipaddress

UNKNOWN = "0.0.0.0"  # what a request with no usable address counts as (one shared key)


def _parse(value: str):
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


def client_ip(request) -> str:
    """Never raises, never empty: axes and django-ratelimit key on it."""
    meta = getattr(request, "META", {}) or {}
    remote = _parse(meta.get("REMOTE_ADDR") or "")
    if remote is None or remote.is_loopback:
        forwarded = (meta.get("HTTP_X_FORWARDED_FOR") or "").split(",")
        proxied = _parse(forwarded[-1]) if forwarded[-1].strip() else None
        if proxied is not None:
            return str(proxied)
    return str(remote) if remote is not None else UNKNOWN


def client_ip_or_none(request) -> str | None:
    ip = client_ip(request) if request is not None else UNKNOWN
    return None if ip == UNKNOWN else ip
