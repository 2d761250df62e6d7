"""Waiting in a test for something to happen, never for a fixed time."""
import asyncio
import inspect
import time


async def eventually(condition, *, timeout_s: float = 5.0, poll_s: float = 0.01):
    """Return `condition()`'s first true result; a coroutine function's result
    is awaited. Fails the test when it is still false after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert loop.time() < deadline, f"{condition.__qualname__} still false after {timeout_s} s"
        await asyncio.sleep(poll_s)


def eventually_sync(condition, *, timeout_s: float = 5.0, poll_s: float = 0.05):
    """`eventually` for sync tests (a live server polled through the ORM)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{condition.__qualname__} still false after {timeout_s} s"
        time.sleep(poll_s)
