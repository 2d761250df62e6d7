"""A request's lease and quota reservation, taken in one Redis round trip
(gateway.admission), with what each refusal leaves behind."""
import pytest
from asgiref.sync import sync_to_async

from chatapp import runtime
from gateway import admission, concurrency, quotas
from gateway.registry import Limits
from gateway.services import stream_chat
from gateway.types import BadRequest, ChatRequest, FinalEvent, QuotaExceeded, RateLimited, TokenEvent, Unavailable
from tests.gateway.helpers import give_plan


def limits(**kw):
    values = dict(plan="t", tier="standard", requests_per_minute=0, tokens_per_minute=0, tokens_per_day=1000,
                  tokens_per_month=0, max_concurrent=2)
    return Limits(**{**values, **kw})


async def leases_of(user_id: int) -> set[str]:
    user_key, all_key, _ = concurrency._keys(user_id)
    client = runtime.redis_async()
    mine = {m.decode() if isinstance(m, bytes) else m for m in await client.zrange(user_key, 0, -1)}
    everyone = {m.decode() if isinstance(m, bytes) else m for m in await client.zrange(all_key, 0, -1)}
    assert mine <= everyone
    return mine


async def tokens_reserved_today(user_id: int) -> int:
    return int(await runtime.redis_async().get(quotas.windows(user_id).keys[2]) or 0)


class CountingCommands:
    """Counts the commands the process's async Redis client sends."""

    def __init__(self, monkeypatch):
        self.sent: list[str] = []
        client = runtime.redis_async()
        real = client.execute_command

        async def execute_command(*args, **options):
            self.sent.append(str(args[0]))
            return await real(*args, **options)

        monkeypatch.setattr(client, "execute_command", execute_command)


async def test_the_lease_and_the_reservation_take_one_round_trip(monkeypatch):
    await admission.admit(user_id=931, request_id="warm", limits=limits(), tokens=10, on_revoked=print)  # loads the script
    commands = CountingCommands(monkeypatch)
    lease, reservation = await admission.admit(user_id=931, request_id="r1", limits=limits(), tokens=10,
                                               on_revoked=print)
    assert commands.sent == ["EVALSHA"]
    assert lease.request_id == "r1" and lease.queue_position == 1  # "warm" still holds the first slot
    assert reservation.tokens == 10 and await tokens_reserved_today(931) == 20
    assert await leases_of(931) == {"warm", "r1"}
    await concurrency.release(lease)
    await quotas.reconcile(reservation, charged_tokens=0)
    assert await leases_of(931) == {"warm"} and await tokens_reserved_today(931) == 10


async def test_a_request_over_its_cap_reserves_no_tokens():
    cap = limits(max_concurrent=1)
    held, _ = await admission.admit(user_id=932, request_id="a", limits=cap, tokens=100, on_revoked=print)
    with pytest.raises(RateLimited) as refused:
        await admission.admit(user_id=932, request_id="b", limits=cap, tokens=100, on_revoked=print)
    assert "1 replies being written" in refused.value.message
    assert await tokens_reserved_today(932) == 100  # the first request's only
    assert await leases_of(932) == {"a"}
    await concurrency.release(held)


async def test_a_refused_reservation_gives_its_slot_back():
    plan = limits(tokens_per_day=150)
    first, _ = await admission.admit(user_id=933, request_id="a", limits=plan, tokens=100, on_revoked=print)
    with pytest.raises(QuotaExceeded) as refused:
        await admission.admit(user_id=933, request_id="b", limits=plan, tokens=100, on_revoked=print)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    assert await leases_of(933) == {"a"}  # no slot held by the refused request
    assert "b" not in concurrency._keeper_leases()  # nor renewed by this process
    await concurrency.release(first)
    # The slot the refusal did not keep is there for the next request.
    again, reservation = await admission.admit(user_id=933, request_id="c", limits=plan, tokens=50,
                                               on_revoked=print)
    assert await leases_of(933) == {"c"} and await tokens_reserved_today(933) == 150
    await concurrency.release(again)


async def test_a_banned_user_is_refused_and_reserves_nothing():
    await sync_to_async(concurrency.revoke_user)(934, ban=True)
    with pytest.raises(concurrency.Banned):
        await admission.admit(user_id=934, request_id="a", limits=limits(), tokens=10, on_revoked=print)
    assert await leases_of(934) == set() and await tokens_reserved_today(934) == 0


async def test_a_request_no_window_could_hold_is_a_400_before_redis(monkeypatch):
    commands = CountingCommands(monkeypatch)
    with pytest.raises(BadRequest) as refused:
        await admission.admit(user_id=935, request_id="a", limits=limits(tokens_per_day=100), tokens=101,
                              on_revoked=print)
    assert "lower max_tokens" in refused.value.message
    assert commands.sent == [] and await leases_of(935) == set()


async def test_unreachable_redis_is_a_503(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    with pytest.raises(Unavailable) as refused:
        await admission.admit(user_id=936, request_id="a", limits=limits(), tokens=10, on_revoked=print)
    assert refused.value.status == 503 and "Redis" in refused.value.message


@pytest.mark.django_db(transaction=True)
async def test_a_gateway_call_admits_in_one_round_trip_and_releases_after(remote, alice, monkeypatch):
    """Through the gateway's public entry: before its first token a chat's
    admission sends one script (it was a lease script and then a quota
    script), and the slot comes back when the reply ends."""
    await sync_to_async(give_plan)(alice, tokens_per_day=100_000)

    def ask():
        return ChatRequest(messages=[{"role": "user", "content": "hi"}], user_id=alice.pk, max_tokens=20)

    [event async for event in stream_chat(ask())]  # the scripts loaded, the registry cached
    commands = CountingCommands(monkeypatch)
    before_first_token = None
    async for event in stream_chat(ask()):
        if before_first_token is None and isinstance(event, TokenEvent):
            before_first_token = list(commands.sent)
    assert isinstance(event, FinalEvent) and event.usage.completion_tokens > 0
    assert before_first_token.count("EVALSHA") == 1, before_first_token
    assert await leases_of(alice.pk) == set()
