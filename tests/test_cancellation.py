"""A cancellation (a Stop, a client gone, a loop closing) always arrives.

On Python 3.11 `asyncio.wait_for` returns normally when a cancellation lands
in the loop iteration where what it waits for completes (CPython gh-86296).
redis-py bounds every write with it, so a task cancelled mid-command went on
running: a keeper task once never ended and hung the event loop's close for
the whole of CI's per-test timeout. These tests cancel at every step of an
operation and fail if any accepted cancellation is dropped.
"""
import ast
import asyncio
import pathlib

import pytest

from chatapp import runtime
from inference.handle import RequestHandle, WakeList
from inference.outputs import DeltaEvent

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = pathlib.Path(__file__).resolve().parent.parent


async def dropped_cancellations(make_coro, steps: int = 40) -> list[int]:
    """Cancel a fresh run of `make_coro()` after 0, 1, 2, ... loop steps;
    the steps at which the task accepted the cancellation and yet returned."""
    dropped = []
    for step in range(steps):
        task = asyncio.create_task(make_coro())
        for _ in range(step):
            await asyncio.sleep(0)
        accepted = task.cancel()
        try:
            await task
            if accepted:
                dropped.append(step)
        except asyncio.CancelledError:
            assert accepted
    return dropped


async def test_a_cancelled_redis_command_raises_at_every_step():
    client = runtime.redis_async()
    await client.delete("cancel:n")
    script = client.register_script("return redis.call('incr', KEYS[1])")

    async def commands():
        await client.set("cancel:probe", "x")
        await script(keys=["cancel:n"])
        await client.zadd("cancel:z", {"a": 1})

    assert await dropped_cancellations(commands) == []
    # And no connection was left with an unread reply: each command still
    # gets its own answer.
    for i in range(20):
        await client.set("cancel:check", str(i))
        assert await client.get("cancel:check") == str(i).encode()


async def test_a_cancelled_reader_of_an_engine_stream_raises_even_as_it_is_woken():
    wake_list = WakeList()

    async def read_one():
        handle = RequestHandle("r", [1], asyncio.get_running_loop(), wake_list, abort=lambda _: None)

        async def deliver():
            handle.deliver(DeltaEvent(request_id="r", token_ids=(1,), text="a"))
            wake_list.wake_all()

        # The event arrives while the reader waits; the cancellation lands
        # at every step around that wake-up.
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(deliver()))
        await handle.__anext__()
        await asyncio.sleep(2)  # a reader that got its event waits for the next

    assert await dropped_cancellations(read_one, steps=12) == []


def test_product_code_does_not_use_asyncio_wait_for():
    """Each use of it on Python 3.11 is a cancellation that can be lost;
    `async with asyncio.timeout(...)` delivers it."""
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in {".venv", "tests", "bench", "var"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for" and \
                    isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
