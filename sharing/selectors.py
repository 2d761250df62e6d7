"""Reads for share links. `access_share` (the owner's management requests)
answers 404 to everyone else; `share_by_token` (the public page) finds a
share by its token alone, and a revoked one no longer exists."""
from __future__ import annotations

from django.http import Http404

from sharing.models import Share


def access_share(*, user, share_id) -> Share:
    if not getattr(user, "is_authenticated", False):
        raise Http404("No such share")
    try:
        return Share.objects.get(id=share_id, user=user)
    except (Share.DoesNotExist, ValueError, TypeError):
        raise Http404("No such share") from None


def share_by_token(*, token: str) -> Share:
    try:
        return Share.objects.prefetch_related("messages").get(token=token)
    except (Share.DoesNotExist, ValueError, TypeError):
        raise Http404("No such share") from None


def share_list(*, user) -> list[Share]:
    return list(Share.objects.filter(user=user).order_by("-created_at"))
