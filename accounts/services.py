"""Accounts: sign-up under the sign-up policy, the first admin, bans, review flags."""
from __future__ import annotations

from datetime import timedelta
from importlib import import_module

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from accounts import setup
from accounts.models import InviteCode, ReviewFlag
from audit.models import AuditEvent
from audit.services import Kind, audit_record
from gateway import concurrency, keys

# Any constant works: it only has to be the same for every sign-up.
_SIGNUP_LOCK_KEY = 0x5157_0001


def _use_invite(code: str) -> InviteCode:
    invite = InviteCode.objects.select_for_update().filter(code=(code or "").strip()).first()
    if invite is None or not invite.usable:
        raise ValidationError("This invite code is not valid (unknown, used up or expired).")
    invite.uses += 1
    invite.save(update_fields=["uses"])
    return invite


def user_sign_up(*, username: str, password: str, email: str = "", invite_code: str = "", request=None):
    """Create a user under SIGNUP_POLICY (PermissionDenied when closed,
    ValidationError for a bad invite code). The first account of the
    installation becomes the admin only when `serve` bound a loopback address
    (accounts.setup says why).

    The advisory lock serialises concurrent sign-ups so exactly one of them
    sees an empty user table, and an invite's last use goes to one of them."""
    policy = settings.SIGNUP_POLICY
    User = get_user_model()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SIGNUP_LOCK_KEY])
        first = setup.first_signup_is_admin() and not User.objects.exists()
        if policy == "closed" and not first:  # the operator's own first account still works on loopback
            raise PermissionDenied("Sign-up is closed on this server.")
        invite = _use_invite(invite_code) if policy == "invite" and not first else None
        user = User(username=username, email=email, is_staff=first, is_superuser=first)
        user.set_password(password)
        user.full_clean(exclude=["password"])
        user.save()
    audit_record(kind=Kind.SIGNUP, summary=f"{username} signed up" + (" (first user: admin)" if first else ""),
                 actor=user, target_user=user, request=request,
                 data={"invite_id": invite.pk} if invite else {})
    return user


def admin_create_with_token(*, token: str, username: str, password: str, request=None):
    """The first admin, made with the one-time token `serve` printed."""
    User = get_user_model()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SIGNUP_LOCK_KEY])
        if setup.admin_exists() or not setup.setup_token_valid(token):
            raise PermissionDenied("This setup token is not valid (wrong, used, or an admin already exists).")
        user = User(username=username, is_staff=True, is_superuser=True)
        user.set_password(password)
        user.full_clean(exclude=["password"])
        user.save()
        if not setup.consume_setup_token(token):  # another process used it meanwhile
            raise PermissionDenied("This setup token was just used.")
    audit_record(kind=Kind.ADMIN_CREATED, summary=f"{username} became the first admin with the setup token",
                 actor=user, target_user=user, request=request)
    return user


# ------------------------------------------------------------ bans

def _end_sessions(user) -> int:
    """Delete the user's sessions (database and cache). Their next request is
    anonymous anyway (an inactive user is never loaded), but a session must
    not wait to expire with the user's id in it."""
    store = import_module(settings.SESSION_ENGINE).SessionStore
    ended = 0
    for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator():
        if str(session.get_decoded().get("_auth_user_id")) == str(user.pk):
            store(session_key=session.session_key).delete()
            ended += 1
    return ended


def user_ban(*, user, actor=None, request=None, reason: str = "") -> None:
    """Disable the account. Within ABUSE_LEASE_RENEW_S (under a second): its
    sessions are gone, its API keys are refused (inactive users never
    authenticate), and every reply it has in flight, chat or API, in any
    process, is aborted (gateway.concurrency)."""
    user.is_active = False
    user.save(update_fields=["is_active"])
    running = concurrency.revoke_user(user.pk, ban=True)
    sessions = _end_sessions(user)
    audit_record(kind=Kind.BAN, summary=f"{user.get_username()} banned" + (f": {reason}" if reason else ""),
                 actor=actor, target_user=user, request=request,
                 data={"sessions_ended": sessions, "generations_aborted": running})


def user_unban(*, user, actor=None, request=None) -> None:
    user.is_active = True
    user.save(update_fields=["is_active"])
    concurrency.unban_user(user.pk)
    audit_record(kind=Kind.UNBAN, summary=f"{user.get_username()} unbanned", actor=actor, target_user=user,
                 request=request)


def password_changed(*, user, request=None) -> int:
    """After a password change: with PASSWORD_CHANGE_REVOKES_KEYS, the old
    password's holder loses the API keys too. Returns how many were revoked."""
    if not settings.PASSWORD_CHANGE_REVOKES_KEYS:
        return 0
    return keys.api_keys_revoke_all(user=user)


# ------------------------------------------------------------ review flags

def _block_count_key(user_id: int) -> str:
    return f"abuse:blocks:{user_id}"


def moderation_block_recorded(*, user_id: int, source: str, category: str, checker: str, text: str = "") -> None:
    """One of the user's texts was blocked: audit it, and after
    ABUSE_REVIEW_BLOCKS of them within ABUSE_REVIEW_WINDOW_S raise a review flag."""
    User = get_user_model()
    user = User.objects.filter(pk=user_id).first() if user_id else None
    data = {"source": source, "category": category, "checker": checker}
    if settings.AUDIT_STORE_BLOCKED_TEXT and text:
        data["text"] = text[:4000]
    audit_record(kind=Kind.MODERATION_BLOCK, summary=f"{source} blocked: {category} ({checker})",
                 target_user=user, data=data)
    if user is None:
        return
    key = _block_count_key(user.pk)
    # The window starts at the first block; add() does nothing if it is already running.
    cache.add(key, 0, timeout=settings.ABUSE_REVIEW_WINDOW_S)
    count = cache.incr(key)
    if count >= settings.ABUSE_REVIEW_BLOCKS:
        _raise_review_flag(user, count, category)


def _recent_categories(user, category: str) -> list[str]:
    """The categories of the user's blocks in the window, from the audit log."""
    since = timezone.now() - timedelta(seconds=settings.ABUSE_REVIEW_WINDOW_S)
    recorded = AuditEvent.objects.filter(kind=Kind.MODERATION_BLOCK, target_user=user, created_at__gte=since)
    return sorted({category, *(c for c in recorded.values_list("data__category", flat=True) if c)})


def _raise_review_flag(user, count: int, category: str) -> None:
    categories = _recent_categories(user, category)
    flag = ReviewFlag.objects.filter(user=user, resolved_at__isnull=True).first()
    if flag is not None:
        categories = sorted({*flag.categories, *categories})
        ReviewFlag.objects.filter(pk=flag.pk).update(blocks=max(flag.blocks, count), categories=categories)
        return
    reason = f"{count} moderation blocks within {settings.ABUSE_REVIEW_WINDOW_S} s"
    try:
        with transaction.atomic():
            ReviewFlag.objects.create(user=user, reason=reason, blocks=count, categories=categories)
    except IntegrityError:
        return  # a concurrent block raised it first
    audit_record(kind=Kind.REVIEW_FLAG, summary=f"review flag on {user.get_username()}: {reason}",
                 target_user=user, data={"blocks": count})


def review_flag_resolve(*, flag: ReviewFlag, actor) -> None:
    ReviewFlag.objects.filter(pk=flag.pk, resolved_at__isnull=True).update(resolved_at=timezone.now(),
                                                                          resolved_by=actor)
    cache.delete(_block_count_key(flag.user_id))
