"""Token quotas that hold under concurrency: reserve before, reconcile after.

Counting usage after the reply lets every concurrent request pass the check
(the failure of most gateways). Here a request atomically reserves its worst
case (prompt tokens + max_tokens) in every window with one Lua script, and
after the reply gives back what it did not use. So the tokens reserved in a
window never exceed its limit.

Windows are fixed and aligned to UTC (minute, day, month): the time a refused
request must wait is exactly the time until the window it hit rolls over.
"""
from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway.registry import Limits
from gateway.types import BadRequest, QuotaExceeded, RateLimited, Unavailable
from observability import metrics

# KEYS: requests/minute, tokens/minute, tokens/day, tokens/month counters.
# ARGV: the four limits (0 = none), the token cost, the four TTLs.
# Returns {admitted, index of the window that refused (1-based) or 0, used1..used4}.
RESERVE_LUA = """
local add = {1, tonumber(ARGV[5]), tonumber(ARGV[5]), tonumber(ARGV[5])}
local used = {}
for i = 1, 4 do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and used[i] + add[i] > limit then
    return {0, i, used[1], used[2], used[3], used[4]}
  end
end
for i = 1, 4 do
  used[i] = redis.call('INCRBY', KEYS[i], add[i])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5 + i]))
end
return {1, 0, used[1], used[2], used[3], used[4]}
"""

# KEYS: the token counters a reservation charged. ARGV[1]: tokens to give back
# (negative when the reply cost more than reserved). A window that already
# rolled over is left alone: its counter is gone and must not go negative.
RECONCILE_LUA = """
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('DECRBY', KEYS[i], delta)
    if v < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
"""

WINDOW_NAMES = ("requests per minute", "tokens per minute", "tokens per day", "tokens per month")
WINDOW_LABELS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")  # metrics
REDIS_DOWN = (
    "The quota service (Redis) is unreachable, so requests are refused until it is back; "
    "try again in a minute."
)


def _scripts(client):
    """The Lua scripts, sent once per connection pool and then run by SHA."""
    scripts = getattr(client, "_gateway_quota_scripts", None)
    if scripts is None:
        scripts = (client.register_script(RESERVE_LUA), client.register_script(RECONCILE_LUA))
        client._gateway_quota_scripts = scripts
    return scripts


@dataclass(frozen=True)
class Windows:
    keys: tuple[str, str, str, str]
    resets_s: tuple[int, int, int, int]  # seconds until each window rolls over


def windows(user_id: int, now: float | None = None) -> Windows:
    now = time.time() if now is None else now
    tm = time.gmtime(now)
    minute = int(now // 60)
    day = time.strftime("%Y%m%d", tm)
    month = time.strftime("%Y%m", tm)
    day_end = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0)) + 86400
    next_month = (tm.tm_year + tm.tm_mon // 12, tm.tm_mon % 12 + 1)
    month_end = calendar.timegm((*next_month, 1, 0, 0, 0))
    minute_reset = max(1, math.ceil((minute + 1) * 60 - now))
    # {user} is a hash tag: all of a user's counters share a cluster slot.
    prefix = f"gw:q:{{{user_id}}}"
    return Windows(
        keys=(f"{prefix}:rpm:{minute}", f"{prefix}:tpm:{minute}", f"{prefix}:tpd:{day}", f"{prefix}:tpmo:{month}"),
        resets_s=(
            minute_reset,
            minute_reset,
            max(1, math.ceil(day_end - now)),
            max(1, math.ceil(month_end - now)),
        ),
    )


def rate_headers(limits: Limits, used: tuple[int, int, int, int], resets_s: tuple[int, ...]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the per-minute windows."""
    headers = {}
    if limits.requests_per_minute:
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.requests_per_minute - used[0]))
        headers["x-ratelimit-reset-requests"] = f"{resets_s[0]}s"
    if limits.tokens_per_minute:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tokens_per_minute - used[1]))
        headers["x-ratelimit-reset-tokens"] = f"{resets_s[1]}s"
    return headers


@dataclass
class Reservation:
    user_id: int
    tokens: int
    token_keys: tuple[str, ...]
    headers: dict[str, str]
    settled: bool = False


def _limit_values(limits: Limits) -> tuple[int, int, int, int]:
    return (limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day, limits.tokens_per_month)


async def reserve(*, user_id: int, limits: Limits, tokens: int, now: float | None = None) -> Reservation:
    """Reserve one request and `tokens` tokens in every window, or raise a 429."""
    lim = _limit_values(limits)
    for index in (1, 2, 3):
        if lim[index] and tokens > lim[index]:
            # Waiting would never help: say what to change instead.
            raise BadRequest(
                f"This request needs up to {tokens} tokens (prompt + max_tokens) but your plan allows "
                f"{lim[index]} {WINDOW_NAMES[index]}; lower max_tokens or shorten the prompt."
            )
    w = windows(user_id, now)
    try:
        reserve_script, _ = _scripts(runtime.redis_async())
        result = await reserve_script(keys=w.keys, args=[*lim, tokens, *[r + 5 for r in w.resets_s]])
    except REDIS_ERRORS:
        raise Unavailable(REDIS_DOWN) from None
    admitted, refused, *used = (int(x) for x in result)
    headers = rate_headers(limits, tuple(used), w.resets_s)
    if admitted:
        return Reservation(user_id=user_id, tokens=tokens, token_keys=w.keys[1:], headers=headers)
    index = refused - 1
    wait_s = w.resets_s[index]
    headers["Retry-After"] = str(wait_s)
    # The wait is in retry_after_s: the API and the chat page each word it their way.
    if index == 0:
        message = f"Rate limit reached: {lim[0]} requests per minute."
    else:
        message = (
            f"Token limit reached: {lim[index]} {WINDOW_NAMES[index]} ({used[index]} used, this request "
            f"needs up to {tokens})."
        )
    metrics.quota_rejected(WINDOW_LABELS[index])
    error_class = RateLimited if index <= 1 else QuotaExceeded
    raise error_class(message, headers=headers, retry_after_s=wait_s)


async def reconcile(reservation: Reservation, *, charged_tokens: int) -> None:
    """Give back what the reply did not use (all of it for a cache hit or a failure)."""
    if reservation.settled:
        return
    reservation.settled = True
    refund = reservation.tokens - charged_tokens
    if refund == 0:
        return
    try:
        _, reconcile_script = _scripts(runtime.redis_async())
        await reconcile_script(keys=reservation.token_keys, args=[refund])
    except REDIS_ERRORS:
        # The reservation then simply expires with its window: fail safe.
        pass


async def current_usage(user_id: int) -> tuple[int, int, int, int]:
    w = windows(user_id)
    values = await runtime.redis_async().mget(w.keys)
    return tuple(int(v or 0) for v in values)


async def headers_for(user_id: int, limits: Limits) -> dict[str, str]:
    """The x-ratelimit-* headers for a user right now (empty without Redis)."""
    try:
        used = await current_usage(user_id)
    except REDIS_ERRORS:
        return {}
    return rate_headers(limits, used, windows(user_id).resets_s)


def current_usage_sync(user_id: int) -> tuple[int, int, int, int]:
    w = windows(user_id)
    try:
        return tuple(int(v or 0) for v in runtime.redis_sync().mget(w.keys))
    except REDIS_ERRORS:
        return (0, 0, 0, 0)
