"""Token quotas that hold under concurrency: reserve before, reconcile after.

Counting usage after the reply lets every concurrent request pass the check
(the failure of most gateways). Here a request atomically reserves its worst
case (prompt tokens + max_tokens) in every window with one Lua script, and
after the reply gives back what it did not use. So the tokens reserved in a
window never exceed its limit.

Windows are fixed and aligned to UTC (minute, day, month): the time a refused
request must wait is exactly the time until the window it hit rolls over.

A reservation is owned: it is recorded in Redis with a lease that the
reserving process renews while the request runs (`_keep_leases`). When a
process dies mid-request (kill -9), its leases run out and any process's
keeper gives the reserved tokens back (`sweep_expired`), so a crash does not
leave a user's day and month counters holding a worst case. Reconcile and
sweep each act only if the record is still there: a reservation is settled
exactly once.
"""
from __future__ import annotations

import asyncio
import calendar
import contextvars
import logging
import math
import time
import uuid
from dataclasses import dataclass

from django.conf import settings

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway.registry import Limits
from gateway.types import BadRequest, QuotaExceeded, RateLimited, Unavailable
from observability import metrics

log = logging.getLogger(__name__)

# KEYS: requests/minute, tokens/minute, tokens/day, tokens/month counters,
# the open reservations (hash) and their leases (sorted set by expiry).
# ARGV: the four limits (0 = none), the token cost, the four TTLs, the
# reservation's id, its lease expiry and its record ("tokens key key key").
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
redis.call('HSET', KEYS[5], ARGV[10], ARGV[12])
redis.call('ZADD', KEYS[6], ARGV[11], ARGV[10])
return {1, 0, used[1], used[2], used[3], used[4]}
"""

# KEYS: the open reservations, the leases. ARGV[1]: the reservation's id,
# ARGV[2]: tokens to give back (negative when the reply cost more than
# reserved; "all" gives back the whole reservation). Only while its record is
# there: settled once, by its request or by the sweep. A window that already
# rolled over is left alone: its counter is gone and must not go negative.
RECONCILE_LUA = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not record then return 0 end
local fields = {}
for word in string.gmatch(record, '%S+') do fields[#fields + 1] = word end
local delta = tonumber(fields[1])
if ARGV[2] ~= 'all' then delta = tonumber(ARGV[2]) end
if delta == 0 then return 1 end
for i = 2, #fields do
  if redis.call('EXISTS', fields[i]) == 1 then
    local v = redis.call('DECRBY', fields[i], delta)
    if v < 0 then redis.call('SET', fields[i], 0, 'KEEPTTL') end
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
    id: str = ""
    settled: bool = False


OPEN_KEY = "gw:q:open"  # reservation id -> "tokens key key key"
LEASES_KEY = "gw:q:leases"  # reservation id, scored by its lease's expiry (unix s)


def _limit_values(limits: Limits) -> tuple[int, int, int, int]:
    return (limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day, limits.tokens_per_month)


@dataclass(frozen=True)
class ReserveCall:
    """RESERVE_LUA's keys and args for one request, and what reading its
    result needs: what `reserve` runs, and what gateway.admission runs in
    one round trip with the request's lease."""
    user_id: int
    limits: Limits
    tokens: int
    windows: Windows
    id: str
    keys: list
    args: list


def reserve_call(*, user_id: int, limits: Limits, tokens: int, now: float | None = None) -> ReserveCall:
    """The reservation's script call; a 400 when `tokens` exceed a limit
    outright (waiting would never help)."""
    lim = _limit_values(limits)
    for index in (1, 2, 3):
        if lim[index] and tokens > lim[index]:
            # Waiting would never help: say what to change instead.
            raise BadRequest(
                f"This request needs up to {tokens} tokens (prompt + max_tokens) but your plan allows "
                f"{lim[index]} {WINDOW_NAMES[index]}; lower max_tokens or shorten the prompt."
            )
    w = windows(user_id, now)
    reservation_id = uuid.uuid4().hex
    record = " ".join([str(tokens), *w.keys[1:]])
    return ReserveCall(user_id=user_id, limits=limits, tokens=tokens, windows=w, id=reservation_id,
                       keys=[*w.keys, OPEN_KEY, LEASES_KEY],
                       args=[*lim, tokens, *[r + 5 for r in w.resets_s], reservation_id, _lease_expiry(), record])


def reservation_from(call: ReserveCall, result) -> Reservation:
    """The reservation RESERVE_LUA's `result` made (now leased by this
    process), or the 429 of the window that refused it."""
    admitted, refused, *used = (int(x) for x in result)
    limits, w = call.limits, call.windows
    headers = rate_headers(limits, tuple(used), w.resets_s)
    if admitted:
        reservation = Reservation(user_id=call.user_id, tokens=call.tokens, token_keys=w.keys[1:], headers=headers,
                                  id=call.id)
        _leases().hold(reservation)
        return reservation
    lim = _limit_values(limits)
    index = refused - 1
    wait_s = w.resets_s[index]
    headers["Retry-After"] = str(wait_s)
    # The wait is in retry_after_s: the API and the chat page each word it their way.
    if index == 0:
        message = f"Rate limit reached: {lim[0]} requests per minute."
    else:
        message = (
            f"Token limit reached: {lim[index]} {WINDOW_NAMES[index]} ({used[index]} used, this request "
            f"needs up to {call.tokens})."
        )
    metrics.quota_rejected(WINDOW_LABELS[index])
    error_class = RateLimited if index <= 1 else QuotaExceeded
    raise error_class(message, headers=headers, retry_after_s=wait_s)


async def reserve(*, user_id: int, limits: Limits, tokens: int, now: float | None = None) -> Reservation:
    """Reserve one request and `tokens` tokens in every window, or raise a 429."""
    call = reserve_call(user_id=user_id, limits=limits, tokens=tokens, now=now)
    try:
        result = await runtime.lua_script(runtime.redis_async(), RESERVE_LUA)(keys=call.keys, args=call.args)
    except REDIS_ERRORS:
        raise Unavailable(REDIS_DOWN) from None
    return reservation_from(call, result)


async def reconcile(reservation: Reservation, *, charged_tokens: int) -> None:
    """Give back what the reply did not use (all of it for a cache hit or a failure)."""
    if reservation.settled:
        return
    reservation.settled = True
    _leases().release(reservation)
    try:
        reconcile_script = runtime.lua_script(runtime.redis_async(), RECONCILE_LUA)
        await reconcile_script(keys=[OPEN_KEY, LEASES_KEY],
                               args=[reservation.id, reservation.tokens - charged_tokens])
    except REDIS_ERRORS:
        # Its lease then runs out and a sweep gives all of it back: fail open.
        pass


# ------------------------------------------------------------ leases

def _lease_expiry() -> float:
    return time.time() + settings.QUOTA_LEASE_S


class _Leases:
    """The reservations this event loop holds, and the task that renews
    their leases and sweeps the expired ones of dead processes every third
    of a lease."""

    def __init__(self):
        self.held: dict[str, Reservation] = {}
        self.keeper: asyncio.Task | None = None

    def hold(self, reservation: Reservation) -> None:
        self.held[reservation.id] = reservation
        self.start()

    def start(self) -> None:
        if self.keeper is None or self.keeper.done():
            self.keeper = asyncio.get_running_loop().create_task(
                _keep_leases(self), name="quota-leases", context=contextvars.Context())

    def release(self, reservation: Reservation) -> None:
        self.held.pop(reservation.id, None)


def _leases() -> _Leases:
    return runtime.loop_local("quota-leases", _Leases)


def start_keeper() -> None:
    """This event loop's lease keeper, started by `serve` (so the leases of a
    process that died are swept before anyone reserves again) and by the
    loop's first reservation."""
    _leases().start()


async def _keep_leases(leases: _Leases) -> None:
    while True:
        await asyncio.sleep(settings.QUOTA_LEASE_S / 3)
        try:
            await renew(list(leases.held))
            await sweep_expired()
        except REDIS_ERRORS:
            log.warning("quota leases: Redis unreachable; trying again later")


async def renew(reservation_ids: list[str]) -> None:
    """Push the leases of live reservations forward (XX: never re-create one
    a sweep already settled)."""
    if reservation_ids:
        expiry = _lease_expiry()
        await runtime.redis_async().zadd(LEASES_KEY, {rid: expiry for rid in reservation_ids}, xx=True)


async def sweep_expired(now: float | None = None, batch: int = 100) -> int:
    """Give back in full the reservations whose lease ran out (their process
    died). Safe in every process at once: each is settled by one script run.
    Returns how many were given back."""
    client = runtime.redis_async()
    expired = await client.zrangebyscore(LEASES_KEY, "-inf", time.time() if now is None else now,
                                         start=0, num=batch)
    reconcile_script = runtime.lua_script(client, RECONCILE_LUA)
    returned = 0
    for reservation_id in expired:
        returned += int(await reconcile_script(keys=[OPEN_KEY, LEASES_KEY], args=[reservation_id, "all"]))
    if returned:
        log.info("quota leases: gave back %d reservations of dead processes", returned)
    return returned


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
