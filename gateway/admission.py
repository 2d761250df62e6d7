"""A request's slot in flight and its quota reservation, in one Redis round trip.

Every generation a user starts needs both: a lease (gateway.concurrency: the
per-user cap, capacity shedding, bans) and then its worst case reserved in
every quota window (gateway.quotas). Run one after the other they were two
round trips on the critical path of every chat turn and API call, each a
wait for Redis to get a core beside a busy engine (bench.stages: the
gateway's admission 9-13 ms p50 of a new chat's path on the 2-core Zen 5
EPYC, one chat every 250 ms). Here one script runs both scripts' bodies as
they are, in order, atomically: the quota is reserved only when the lease
was granted, and a refused reservation takes its lease back before the
script returns, so what either refusal leaves in Redis is what the two
calls left, and nothing is held between them.
"""
from __future__ import annotations

from collections.abc import Callable

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway import concurrency, quotas
from gateway.registry import Limits
from gateway.types import Unavailable

# KEYS: ACQUIRE_LUA's three, then RESERVE_LUA's six; ARGV: ACQUIRE_LUA's six,
# then RESERVE_LUA's twelve. Returns {the lease's result, the reservation's
# result (empty when the lease was refused)}.
ADMIT_LUA = f"""
local function acquire(KEYS, ARGV)
{concurrency.ACQUIRE_LUA}
end
local function reserve(KEYS, ARGV)
{quotas.RESERVE_LUA}
end
local lease = acquire({{KEYS[1], KEYS[2], KEYS[3]}}, {{ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}})
if lease[1] ~= 1 then return {{lease, {{}}}} end
local quota_keys, quota_args = {{}}, {{}}
for i = 4, #KEYS do quota_keys[#quota_keys + 1] = KEYS[i] end
for i = 7, #ARGV do quota_args[#quota_args + 1] = ARGV[i] end
local quota = reserve(quota_keys, quota_args)
if quota[1] ~= 1 then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
end
return {{lease, quota}}
"""


async def admit(*, user_id: int, request_id: str, limits: Limits, tokens: int,
                on_revoked: Callable[[str], None]) -> tuple[concurrency.Lease, quotas.Reservation]:
    """A lease for the generation and `tokens` reserved in every window, or
    the refusal: a ban (403), the user's cap or the deployment's capacity
    (429), then a quota window (429) or a request no window could ever hold
    (400, checked before Redis)."""
    reserve = quotas.reserve_call(user_id=user_id, limits=limits, tokens=tokens)
    lease_keys, lease_args = concurrency.acquire_call(user_id=user_id, request_id=request_id, limits=limits)
    try:
        lease_result, quota_result = await runtime.lua_script(runtime.redis_async(), ADMIT_LUA)(
            keys=[*lease_keys, *reserve.keys], args=[*lease_args, *reserve.args])
    except REDIS_ERRORS:
        raise Unavailable(concurrency.REDIS_DOWN) from None
    if int(lease_result[0]) == 1:
        # Refused here, the script has already taken its lease back.
        reservation = quotas.reservation_from(reserve, quota_result)
    # The lease, or its refusal raised (then nothing was reserved).
    lease = concurrency.lease_from(lease_result, user_id=user_id, request_id=request_id, limits=limits,
                                   on_revoked=on_revoked)
    return lease, reservation
