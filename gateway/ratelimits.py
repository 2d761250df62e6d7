"""Request counters for HTTP rate limits: async fixed windows in Redis (`limits`).

One Lua call on the event loop's own Redis pool per check. django-ratelimit's
counters are blocking cache calls, so they ran on worker threads: with 32 API
requests at once, two of them took about 200 ms of each request's time to
first token; on the chat page's POST, beside a busy engine, its thread hop and
two blocking round trips were about 4 ms of the 17 before the turn was saved.
"""
from __future__ import annotations

import functools
import math
import re
import time

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter

from chatapp import runtime

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@functools.lru_cache(maxsize=32)
def rate_item(rate: str) -> RateLimitItem:
    """A rate in the syntax every *_RATE_* setting uses (django-ratelimit's:
    "600/m", "10/5s") as a `limits` window."""
    match = _RATE.match(rate)
    if match is None:
        raise ImproperlyConfigured(f"{rate!r} is not a rate: write it as requests/period, e.g. 600/m or 10/5s")
    amount, count, unit = match.groups()
    return RateLimitItemPerSecond(int(amount), int(count or 1) * _UNIT_S[unit])


def _limiter() -> FixedWindowRateLimiter:
    """This event loop's counters, on its own Redis pool."""
    return runtime.loop_local("rate-limits", lambda: FixedWindowRateLimiter(RedisStorage(
        "async+redis://", implementation="redispy", connection_pool=runtime.redis_async().connection_pool,
        key_prefix=f"{settings.CACHES['default']['KEY_PREFIX']}:rate",
    )))


async def hit(*, group: str, identity: str, rate: str) -> int | None:
    """Count one request of `identity` in `group`'s window of `rate`: None
    while within it, else the whole seconds (at least 1) until the window
    resets. Raises chatapp.runtime.REDIS_ERRORS when Redis is unreachable;
    callers fail closed."""
    item, limiter = rate_item(rate), _limiter()
    if await limiter.hit(item, group, identity):
        return None
    reset_at = (await limiter.get_window_stats(item, group, identity)).reset_time
    return max(1, math.ceil(reset_at - time.time()))
