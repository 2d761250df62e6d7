"""Generations in flight: a cap per user, shedding by plan priority, bans.

Every generation a user starts (chat or API) holds a lease in Redis for as
long as it runs: a member of the user's sorted set and of the deployment's,
scored by its expiry. Admission is one Lua script, so concurrent requests
cannot overrun a cap between a count and an add. The process that holds a
lease renews it every ABUSE_LEASE_RENEW_S (one script for all of them); a
process that dies stops renewing, and its leases expire after
ABUSE_LEASE_TTL_S and stop counting. Nothing is counted in process memory.

Three policies read the same sets:
- per user: at most `Limits.max_concurrent` leases (the plan's), else 429;
- fairness: the engine runs lower priority numbers first, and a request's
  number grows with the leases its user already holds, so a user's second
  and third requests wait behind everyone else's first ones: a few users
  cannot fill the engine's waiting queue ahead of the others;
- capacity: in a spike, a plan of priority p is admitted only while fewer
  than ABUSE_CAPACITY × (1 − ABUSE_PRIORITY_RESERVE × (100 − p) / 100)
  generations are in flight, so priority 0 is shed first (429, Retry-After)
  and priority 100 keeps the whole capacity.

A ban (`revoke_user`) removes the user's leases and marks the user banned;
each holding process sees it at its next renewal (within ABUSE_LEASE_RENEW_S)
and aborts the generation through the gateway's own abort.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway.registry import Limits
from gateway.types import PRIORITY_BACKGROUND, GatewayError, Overloaded, RateLimited, Unavailable

log = logging.getLogger(__name__)

# KEYS: the user's set, the deployment's set, the user's ban marker.
# ARGV: now, expiry, request id, the user's cap (0: none), the deployment limit (0: none), key TTL (s).
# Returns {admitted (1) / user cap (0) / deployment full (-2) / banned (-1), the user's leases, all leases}.
ACQUIRE_LUA = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {-1, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local mine = redis.call('ZCARD', KEYS[1])
local total = redis.call('ZCARD', KEYS[2])
if tonumber(ARGV[4]) > 0 and mine >= tonumber(ARGV[4]) then return {0, mine, total} end
if tonumber(ARGV[5]) > 0 and total >= tonumber(ARGV[5]) then return {-2, mine, total} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, mine, total}
"""

# KEYS: the deployment's set, then (user set, ban marker) per lease.
# ARGV: expiry, key TTL, then the request id per lease.
# Returns the 1-based indexes of the leases that were revoked (banned, or gone).
RENEW_LUA = """
local revoked = {}
for i = 3, #ARGV do
  local user_key, ban_key, rid = KEYS[2 * (i - 2)], KEYS[2 * (i - 2) + 1], ARGV[i]
  if redis.call('EXISTS', ban_key) == 1 or not redis.call('ZSCORE', user_key, rid) then
    redis.call('ZREM', user_key, rid)
    redis.call('ZREM', KEYS[1], rid)
    table.insert(revoked, i - 2)
  else
    redis.call('ZADD', user_key, 'XX', ARGV[1], rid)
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], rid)
    redis.call('EXPIRE', user_key, ARGV[2])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return revoked
"""

# KEYS: the user's set, the deployment's set, the ban marker. ARGV: ban (1) or not (0).
REVOKE_LUA = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, rid in ipairs(members) do redis.call('ZREM', KEYS[2], rid) end
redis.call('DEL', KEYS[1])
if ARGV[1] == '1' then redis.call('SET', KEYS[3], '1') end
return #members
"""

class Banned(GatewayError):
    status = 403
    code = "account_disabled"
    error_type = "invalid_request_error"


def _prefix() -> str:
    return f"{settings.CACHES['default'].get('KEY_PREFIX', '')}:gw:c"


def _keys(user_id: int) -> tuple[str, str, str]:
    prefix = _prefix()
    return f"{prefix}:u:{user_id}", f"{prefix}:all", f"{prefix}:ban:{user_id}"


def deployment_limit(priority: int) -> int:
    """How many generations may be in flight when a plan of `priority` asks (0: no limit)."""
    capacity = settings.ABUSE_CAPACITY
    if not capacity:
        return 0
    share = 1 - settings.ABUSE_PRIORITY_RESERVE * (100 - min(100, max(0, priority))) / 100
    return max(1, math.floor(capacity * share))


@dataclass
class Lease:
    user_id: int
    request_id: str
    on_revoked: Callable[[str], None]
    released: bool = False
    revoked: bool = False
    queue_position: int = 0  # the user's other generations in flight when this one was admitted

    def fair_priority(self, priority: int) -> int:
        """The engine priority for this request: later than everyone's first
        request by the number its user already runs, but still before the
        background work (titles, summaries)."""
        return priority + min(self.queue_position, max(0, PRIORITY_BACKGROUND - 1 - priority))


def acquire_call(*, user_id: int, request_id: str, limits: Limits) -> tuple[list, list]:
    """ACQUIRE_LUA's (keys, args) for a lease on `request_id`: what `acquire`
    runs, and what gateway.admission runs in one round trip with the quota."""
    now = time.time()
    ttl_s = settings.ABUSE_LEASE_TTL_S
    return list(_keys(user_id)), [now, now + ttl_s, request_id, limits.max_concurrent,
                                  deployment_limit(limits.priority), math.ceil(ttl_s) + 1]


def lease_from(result, *, user_id: int, request_id: str, limits: Limits,
               on_revoked: Callable[[str], None]) -> Lease:
    """The lease ACQUIRE_LUA's `result` granted, or its refusal raised."""
    admitted, mine, _total = (int(x) for x in result)
    if admitted == 1:
        lease = Lease(user_id=user_id, request_id=request_id, on_revoked=on_revoked, queue_position=mine)
        _keeper_leases()[request_id] = lease
        return lease
    if admitted == -1:
        raise Banned("This account is disabled.")
    if admitted == 0:
        raise RateLimited(
            f"You already have {mine} replies being written (your plan allows {limits.max_concurrent} at once); "
            "wait for one to finish.", retry_after_s=5, headers={"Retry-After": "5"},
        )
    raise Overloaded("The service is at capacity right now.", retry_after_s=10, headers={"Retry-After": "10"})


REDIS_DOWN = "The admission service (Redis) is unreachable; try again in a minute."


async def acquire(*, user_id: int, request_id: str, limits: Limits,
                  on_revoked: Callable[[str], None]) -> Lease:
    """A lease for one generation, or a 429 (cap, capacity) / 403-like refusal (ban)."""
    keys, args = acquire_call(user_id=user_id, request_id=request_id, limits=limits)
    try:
        result = await runtime.lua_script(runtime.redis_async(), ACQUIRE_LUA)(keys=keys, args=args)
    except REDIS_ERRORS:
        raise Unavailable(REDIS_DOWN) from None
    return lease_from(result, user_id=user_id, request_id=request_id, limits=limits, on_revoked=on_revoked)


async def release(lease: Lease | None) -> None:
    if lease is None or lease.released:
        return
    lease.released = True
    _keeper_leases().pop(lease.request_id, None)
    user_key, all_key, _ = _keys(lease.user_id)
    try:
        client = runtime.redis_async()
        async with client.pipeline(transaction=True) as pipe:
            await pipe.zrem(user_key, lease.request_id).zrem(all_key, lease.request_id).execute()
    except REDIS_ERRORS:
        pass  # it expires after ABUSE_LEASE_TTL_S


# ------------------------------------------------------------ renewal

def _keeper_leases() -> dict[str, Lease]:
    """This event loop's leases; its keeper task starts with the first one."""
    state = runtime.loop_local("gw-leases", dict)
    runtime.loop_local("gw-lease-keeper", lambda: asyncio.get_running_loop().create_task(
        _keep(state), name="gw-lease-keeper", context=contextvars.Context()))
    return state


async def _keep(leases: dict[str, Lease]) -> None:
    while True:
        await asyncio.sleep(settings.ABUSE_LEASE_RENEW_S)
        if leases:
            try:
                await renew(leases)
            except Exception:
                log.warning("renewing generation leases failed; they expire unless renewed", exc_info=True)


async def renew(leases: dict[str, Lease]) -> list[Lease]:
    """Extend every live lease; abort the generations whose lease was revoked."""
    held = [lease for lease in list(leases.values()) if not lease.released]
    if not held:
        return []
    keys = [_keys(0)[1]]
    for lease in held:
        user_key, _, ban_key = _keys(lease.user_id)
        keys += [user_key, ban_key]
    ttl_s = settings.ABUSE_LEASE_TTL_S
    script = runtime.lua_script(runtime.redis_async(), RENEW_LUA)
    revoked_at = await script(keys=keys, args=[time.time() + ttl_s, math.ceil(ttl_s) + 1,
                                                 *(lease.request_id for lease in held)])
    revoked = [held[int(i) - 1] for i in revoked_at]
    for lease in revoked:
        lease.revoked = True
        leases.pop(lease.request_id, None)
        log.info("generation %s of user %s aborted: its lease was revoked", lease.request_id, lease.user_id)
        lease.on_revoked(lease.request_id)
    return revoked


# ------------------------------------------------------------ bans (sync: admin actions)

def revoke_user(user_id: int, *, ban: bool = True) -> int:
    """End the user's generations everywhere within ABUSE_LEASE_RENEW_S and,
    with `ban`, refuse new ones until `unban_user`. Returns how many were running."""
    script = runtime.lua_script(runtime.redis_sync(), REVOKE_LUA)
    return int(script(keys=_keys(user_id), args=["1" if ban else "0"]))


def unban_user(user_id: int) -> None:
    runtime.redis_sync().delete(_keys(user_id)[2])


def in_flight(user_id: int) -> int:
    """The user's generations in flight now (sync: pages, tests)."""
    user_key = _keys(user_id)[0]
    return int(runtime.redis_sync().zcount(user_key, time.time(), "+inf"))
