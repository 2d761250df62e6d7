"""API keys: created on the settings page or by `manage.py create_api_key`.

A key is shown once; only its SHA-256 is stored. `access_api_key` is the only
permission-checked way to fetch a key: another user's key is a 404.

One more credential is no user's: `internal_api_key()`, with which the Celery
worker asks the serving process for titles and summaries (conversations.tasks).
It is an HMAC of SECRET_KEY, so every process of a deployment derives the same
one and none stores it; it is accepted only on an exact, constant-time match.

A verified key is remembered in Redis for about a minute (`aauthenticate`), so a
burst of API calls does not queue one database lookup each on the ledger
threads: with 32 requests at once those lookups took about 90 ms of each
one's time to first token. Whatever ends a key's validity (revoked, deleted,
its user deactivated or deleted) puts a tombstone in its place once the
change commits (`forget`, wired to the models' signals in gateway.apps), and
a lookup never overwrites an entry (SET NX): one that read the database just
before a revocation cannot bring the key back.
"""
from __future__ import annotations

import hashlib
import random
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.http import Http404
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac

from chatapp import runtime
from gateway.models import ApiKey

KEY_PREFIX = "sk-chat-"
INTERNAL_KEY_PREFIX = "sk-internal-"
# last_used_at is a hint for the owner, not an audit log: write it at most once a minute.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# About last_used_at's resolution: a cached key still updates it about once a
# minute. Each entry lives a random 45-75 s, so keys first used together (a
# burst of clients) do not all go back to the database in the same instant.
KEY_CACHE_TTL_S = 60
KEY_CACHE_JITTER_S = 15
_TOMBSTONE = b"-"


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_key_create(*, user, name: str) -> tuple[ApiKey, str]:
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(user=user, name=(name or "").strip()[:100] or "key", prefix=raw[:12], key_hash=_hash(raw))
    key.full_clean()
    key.save()
    return key, raw


def access_api_key(*, user, key_id: int) -> ApiKey:
    try:
        return ApiKey.objects.get(pk=key_id, user=user)
    except ApiKey.DoesNotExist:
        raise Http404("No such API key") from None


def api_key_revoke(*, user, key_id: int) -> ApiKey:
    key = access_api_key(user=user, key_id=key_id)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def api_keys_revoke(queryset) -> int:
    """Revoke every live key of `queryset` (a ban, a password change, the
    admin's action), one save each so that each revocation is audited."""
    now = timezone.now()
    count = 0
    for key in queryset.filter(revoked_at__isnull=True):
        key.revoked_at = now
        key.save(update_fields=["revoked_at"])
        count += 1
    return count


def api_keys_revoke_all(*, user) -> int:
    return api_keys_revoke(ApiKey.objects.filter(user=user))


@dataclass(frozen=True)
class VerifiedKey:
    """A live API key, as a request needs it."""

    pk: int
    user_id: int


def _cache_key(key_hash: str) -> str:
    return f"{settings.CACHES['default']['KEY_PREFIX']}:api-key:{key_hash}"


@dataclass(frozen=True)
class Remembered:
    """What Redis holds for a bearer token (`aremembered`)."""

    key_hash: str | None  # None: the token is no key of this product's shape
    key: VerifiedKey | None = None  # verified in the last minute or so
    refused: bool = False  # a tombstone: the key's validity ended
    redis_up: bool = True


async def aremembered(raw: str) -> Remembered:
    """One Redis GET, no database: the API's handler sends it beside the
    per-IP counter (gateway.api), so that a cached key costs no round trip
    of its own, and only a request within its IP's limit reaches the
    database (`aauthenticate`)."""
    if not raw or not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return Remembered(None)
    key_hash = _hash(raw)
    try:
        cached = await runtime.redis_async().get(_cache_key(key_hash))
    except runtime.REDIS_ERRORS:
        return Remembered(key_hash, redis_up=False)  # the database alone decides; nothing is remembered
    if cached == _TOMBSTONE:
        return Remembered(key_hash, refused=True)
    if cached:
        pk, user_id = map(int, cached.split(b":"))
        return Remembered(key_hash, key=VerifiedKey(pk=pk, user_id=user_id))
    return Remembered(key_hash)


async def aauthenticate(raw: str, remembered: Remembered | None = None) -> VerifiedKey | None:
    """The live key for a bearer token, or None: from Redis when it was
    verified in the last minute or so, else from the database.
    `remembered`: `aremembered(raw)`'s answer, when the caller has it."""
    if remembered is None:
        remembered = await aremembered(raw)
    if remembered.key_hash is None or remembered.refused:
        return None
    if remembered.key is not None:
        return remembered.key
    key = await runtime.on_db_thread(_authenticate, runtime.LEDGER_DB)(remembered.key_hash)
    if key is None:
        return None
    if remembered.redis_up:
        try:
            ttl_s = KEY_CACHE_TTL_S + random.randint(-KEY_CACHE_JITTER_S, KEY_CACHE_JITTER_S)
            await runtime.redis_async().set(_cache_key(remembered.key_hash), f"{key.pk}:{key.user_id}",
                                            ex=ttl_s, nx=True)
        except runtime.REDIS_ERRORS:
            pass  # the key is valid all the same; it is looked up again next time
    return VerifiedKey(pk=key.pk, user_id=key.user_id)


def forget(key_hashes) -> None:
    """Refuse these keys from the cache on, once the current transaction
    commits (a rolled-back revocation must not refuse a live key). The
    tombstones outlive any entry written before them."""
    def write(redis) -> None:
        pipe = redis.pipeline(transaction=False)
        for key_hash in key_hashes:
            pipe.set(_cache_key(key_hash), _TOMBSTONE, ex=KEY_CACHE_TTL_S + KEY_CACHE_JITTER_S)
        pipe.execute()

    _after_commit(list(key_hashes), write)


def remember_again(key_hashes) -> None:
    """Drop these keys' tombstones (their user was reactivated): the database decides again."""
    key_hashes = list(key_hashes)
    _after_commit(key_hashes, lambda redis: redis.delete(*[_cache_key(h) for h in key_hashes]))


def _after_commit(key_hashes: list[str], command) -> None:
    """`command(redis)` once the current transaction commits, when there are keys to change."""
    if key_hashes:
        # Without Redis no key is served from it, and what it kept expires within 75 s.
        runtime.redis_after_commit(command, f"could not update {len(key_hashes)} API keys in the key cache")


def _authenticate(key_hash: str) -> ApiKey | None:
    key = (
        ApiKey.objects.select_related("user")
        .filter(key_hash=key_hash, revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if key is None:
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key


@dataclass(frozen=True)
class InternalCaller:
    """The product's own background jobs, where the API expects an ApiKey:
    no user (no quota, no rate limit), no key row in the ledger."""

    user_id: None = None
    pk: None = None


INTERNAL_CALLER = InternalCaller()


def internal_api_key() -> str:
    # Salted with a purpose of its own, so it reveals nothing of other HMACs of SECRET_KEY.
    return INTERNAL_KEY_PREFIX + salted_hmac("gateway.keys.internal_api_key", "background jobs",
                                             algorithm="sha256").hexdigest()


def is_internal_api_key(raw: str) -> bool:
    return raw.startswith(INTERNAL_KEY_PREFIX) and constant_time_compare(raw, internal_api_key())
