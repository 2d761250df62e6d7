"""Writing the audit log: `audit_record` is the one way in."""
from __future__ import annotations

import logging

from django.db import transaction

from audit.models import AuditEvent
from audit.net import client_ip_or_none

log = logging.getLogger(__name__)

Kind = AuditEvent.Kind


def _name(user) -> str:
    return getattr(user, "get_username", lambda: "")() if user is not None else ""


def audit_record(*, kind: str, summary: str, actor=None, target_user=None, target_name: str = "",
                 request=None, data: dict | None = None) -> AuditEvent | None:
    """Append one event. `actor`/`target_user` are users (or None); an
    anonymous actor is stored as none. Never raises: a failed audit write is
    logged, and the action it records is not undone for it."""
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None
    try:
        with transaction.atomic():  # a savepoint: a failure here must not break the caller's transaction
            return AuditEvent.objects.create(
                kind=kind, summary=summary[:300], actor=actor, actor_name=_name(actor)[:150],
                target_user=target_user, target_name=(target_name or _name(target_user))[:150],
                ip=client_ip_or_none(request), data=data or {},
            )
    except Exception:
        log.exception("could not write the audit event %s: %s", kind, summary)
        return None
