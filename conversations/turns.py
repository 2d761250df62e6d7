"""The turn: generating one assistant reply as a server-side asyncio task.

The task is not tied to the HTTP request that started it: it iterates
`gateway.services.stream_chat`, appends each event with a sequence number to
the reply's Redis log (which SSE consumers in any process tail), folds the
text into the database at most every STREAM_MATERIALIZE_S, and always ends
with one terminal event and one terminal status.

A watcher beside it listens for Stop (Redis pub/sub, so a Stop posted to any
web process reaches the process that generates) and counts live subscribers:
Stop or no reader for STREAM_GRACE_S aborts the engine sequence through
`gateway.services.abort`, which frees it at the next decoding step.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Executor, Future
from contextlib import aclosing

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings

from conversations import services, streams
from conversations.streams import StreamEvent

log = logging.getLogger(__name__)

# After Stop, how many more tokens to wait for the engine's own abort event
# (which carries the usage) before closing the stream ourselves.
LATE_TOKENS_BEFORE_CLOSE = 8

# Strong references: the event loop keeps only weak ones to tasks.
_running: dict[str, asyncio.Task] = {}


def running_count() -> int:
    return len(_running)


class _DbThreads(Executor):
    """A fixed pool of threads, each with a database connection of its own
    (not borrowed from the request pool: see `chatapp.db.own_connection`),
    closed when the pool shuts down (Django connections belong to the thread
    that opened them, so only that thread can close them)."""

    def __init__(self, size: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"chat-db-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        from django.db import connections

        from chatapp.db import own_connection

        own_connection()
        while True:
            job = self._jobs.get()
            if job is None:
                connections.close_all()
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join(30)


_executor: _DbThreads | None = None


def db_thread(fn):
    """Run a sync database function of the chat on the chat's own threads.

    Not asgiref's default single "sync thread": under Daphne every sync view
    queues on that one thread, and a reply's writes must not wait behind page
    renders (nor page renders behind 32 replies' writes)."""
    global _executor
    if _executor is None:
        _executor = _DbThreads(settings.CHAT_DB_THREADS)
    return sync_to_async(fn, thread_sensitive=False, executor=_executor)


def close_db_connections() -> None:
    """Stop the chat's database threads, closing their connections (tests,
    shutdown); the next call to db_thread starts fresh ones."""
    global _executor
    executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=True)


def _prepare(reply_id, reply=None):
    """Context and pending → streaming in one trip to a database thread
    (`reply`: the placeholder just saved by this thread, not read back)."""
    from conversations.context import build_request

    request = build_request(reply_id=reply_id, reply=reply)
    if request is None or not services.reply_start(reply_id=reply_id, request_id=request.request_id):
        return None
    return request


def create_and_prepare(create, /, **kwargs):
    """Run `create` (a service that saves a turn and returns its pending
    reply) and build that reply's model request in the same trip to a
    database thread, so the reply task starts generating at once instead of
    queueing for a thread again (behind the page render, in a burst).
    Returns (reply, request); request is None when it could not be built here,
    and the task then builds it itself and reports any error on the reply."""
    reply = create(**kwargs)
    try:
        request = _prepare(reply.id, reply)
    except Exception:
        request = None
    return reply, request


class _Outcome:
    """Why the generation ended early, set by the watcher."""

    def __init__(self):
        self.reason: str | None = None  # "stopped" | "interrupted"
        self.ended = False  # the generation is over: the watcher must not decide any more


def start_reply(reply_id, request=None) -> asyncio.Task:
    """Schedule the generation of `reply_id` on the running event loop
    (`request`: already built by `create_and_prepare`)."""
    key = str(reply_id)
    # A fresh context: the task must not inherit the request's (asgiref binds
    # sync_to_async calls to the request's executor, which ends with it).
    task = asyncio.get_running_loop().create_task(
        generate_reply(reply_id, request), name=f"reply-{key}", context=contextvars.Context()
    )
    _running[key] = task
    task.add_done_callback(lambda t: _running.pop(key, None))
    return task


async def wait_idle(timeout_s: float = 30) -> None:
    """Wait for every generation of this process (tests, shutdown)."""
    tasks = list(_running.values())
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


async def _watch(reply_id, request_id: str, outcome: _Outcome, started_at: float) -> None:
    from gateway import services as gateway

    fanout = streams.fanout()
    wake = await fanout.watch("ctl", reply_id)
    try:
        last_reader = started_at
        # Stop arrives as a poke; the poll is for the grace period and for a
        # poke lost with the pub/sub connection. A reader in this process is
        # known without asking Redis.
        poll_s = min(2.0, settings.STREAM_GRACE_S / 4)
        while not outcome.ended:
            wake.clear()
            if await streams.stop_requested(reply_id):
                outcome.reason = "stopped"
            elif streams.local_readers(reply_id) or await streams.live_subscribers(reply_id):
                last_reader = time.monotonic()
            elif time.monotonic() - last_reader > settings.STREAM_GRACE_S:
                outcome.reason = "interrupted"
            if outcome.ended:
                return
            if outcome.reason:
                gateway.abort(request_id)
                return
            try:
                await asyncio.wait_for(wake.wait(), poll_s)  # a Stop pokes it at once
            except asyncio.TimeoutError:
                pass
    finally:
        fanout.unwatch("ctl", reply_id, wake)


def _readable_error(exc) -> str:
    from gateway.types import GatewayError

    if isinstance(exc, GatewayError):
        message = exc.message
        if exc.retry_after_s:
            message += f" Try again in {_human_seconds(exc.retry_after_s)}."
        return message
    return "The model failed while writing this reply. Try regenerating it."


def _human_seconds(seconds: int) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} minutes"
    return f"{round(minutes / 60)} hours"


async def generate_reply(reply_id, request=None) -> str:
    """Generate, log, materialize, finish. Returns the final status."""
    from gateway import services as gateway
    from gateway.types import Blocked, FinalEvent, GatewayError, Usage

    seq = 0
    parts: list[str] = []

    async def emit(event: str, data: dict) -> StreamEvent:
        nonlocal seq
        seq += 1
        ev = StreamEvent(seq=seq, event=event, data=data)
        await streams.append(reply_id, ev)
        return ev

    began = time.perf_counter()
    if request is None:
        try:
            request = await db_thread(_prepare)(reply_id)
        except Exception as exc:  # context could not be built: an error reply, never a hung one
            log.exception("building the context of %s", reply_id)
            await _finish(reply_id, emit, "error", "", seq_ref=lambda: seq, error=_context_error(exc))
            return "error"
        if request is None:
            return "gone"
    prepared_s = time.perf_counter() - began
    await emit("status", {"status": "streaming"})

    outcome = _Outcome()
    watcher = asyncio.create_task(_watch(reply_id, request.request_id, outcome, time.monotonic()))
    final = None
    error = ""
    blocked = False
    cancelled = False
    last_flush = time.monotonic()
    late_tokens = 0  # tokens that arrived after Stop/interrupt was decided
    try:
        async with aclosing(gateway.stream_chat(request)) as events:
            async for event in events:
                if isinstance(event, FinalEvent):
                    final = event
                    break
                if outcome.reason:
                    # Decided while the sequence was still being admitted (the
                    # first abort found nothing to abort): abort again, keep
                    # only what was shown, and give up on a stream that will
                    # not end; closing it makes the gateway settle and abort.
                    gateway.abort(request.request_id)
                    late_tokens += 1
                    if late_tokens > LATE_TOKENS_BEFORE_CLOSE:
                        break
                    continue
                if not event.text:
                    continue
                parts.append(event.text)
                if len(parts) == 1:
                    log.debug("reply %s: first token after %.0f ms (context ready at %.0f ms)", reply_id,
                              1000 * (time.perf_counter() - began), 1000 * prepared_s)
                await emit("token", {"t": event.text})
                if time.monotonic() - last_flush >= settings.STREAM_MATERIALIZE_S:
                    last_flush = time.monotonic()
                    await db_thread(services.reply_materialize)(
                        reply_id=reply_id, content="".join(parts), stream_seq=seq
                    )
    except Blocked as exc:
        error, blocked = exc.message, True
    except GatewayError as exc:
        error = _readable_error(exc)
    except asyncio.CancelledError:
        # The server is shutting down: record what exists, then let it go.
        cancelled = True
        outcome.reason = outcome.reason or "interrupted"
    except Exception:
        log.exception("generating %s", reply_id)
        error = _readable_error(None)
    finally:
        # redis-py's pubsub may swallow a cancellation while it waits: the flag
        # is what guarantees the watcher decides nothing after this point.
        outcome.ended = True
        watcher.cancel()
        try:
            await watcher
        except (asyncio.CancelledError, Exception):
            pass

    if blocked:
        status = "blocked"
    elif error:
        status = "error"
    elif outcome.reason:
        status = outcome.reason
    elif final is None:
        status, error = "error", "The reply ended unexpectedly."
    elif final.finish_reason == "error":
        status, error = "error", final.error or "The model failed while writing this reply."
    elif final.finish_reason == "abort":
        status = "stopped"
    elif final.finish_reason in ("blocked", "content_filter"):
        status, error = "blocked", final.error or "The reply was stopped by the content policy."
    else:
        status = "complete"
    usage = final.usage if final else None
    if usage is None and parts:
        # No final event (closed early): count what was delivered, for the record.
        usage = Usage(prompt_tokens=0, completion_tokens=len(parts))
    await _finish(
        reply_id, emit, status, "".join(parts), seq_ref=lambda: seq, error=error,
        model=final.model if final else "", usage=usage, finish_reason=final.finish_reason if final else "",
    )
    if cancelled:
        raise asyncio.CancelledError
    return status


def _context_error(exc) -> str:
    from gateway.types import GatewayError
    from django.core.exceptions import ValidationError

    if isinstance(exc, GatewayError):
        return _readable_error(exc)
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return "The conversation could not be prepared for the model."


async def _finish(reply_id, emit, status, content, *, seq_ref, error="", model="", usage=None, finish_reason=""):
    from conversations.rendering import render_markdown

    # The database first, then the terminal event: a client that reloads on
    # `done` must find the final text and status already stored.
    won = await db_thread(services.reply_finish)(
        reply_id=reply_id, status=status, content=content, stream_seq=seq_ref() + 1, error=error, model=model,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
    )
    if not won:
        return  # a Stop fallback already ended it and wrote the terminal event
    data = {"status": status, "html": render_markdown(content), "error": error}
    if usage:
        data["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                         "cached_tokens": usage.cached_tokens}
    if finish_reason:
        data["finish_reason"] = finish_reason
    await emit("error" if status in ("error", "blocked") else "done", data)
    if status == "complete":
        await db_thread(_after_complete)(reply_id)


def _after_complete(reply_id) -> None:
    from conversations import tasks

    tasks.enqueue_after_reply(reply_id=reply_id)


# ------------------------------------------------------------ stop

async def stop_reply(reply_id, *, wait_s: float = 3.0) -> str:
    """Ask the generating task (in whichever process) to stop, and wait until
    the partial reply is saved, so a quick follow-up never races it. If no task
    answers (its process died), end the reply here with what was materialized."""
    from conversations.models import Message

    await streams.request_stop(reply_id)
    deadline = time.monotonic() + wait_s
    get_status = db_thread(lambda: Message.objects.filter(id=reply_id).values_list("status", flat=True).first())
    while time.monotonic() < deadline:
        status = await get_status()
        if status is None or status in Message.TERMINAL:
            return status or "gone"
        await asyncio.sleep(0.05)
    reply = await db_thread(Message.objects.get)(id=reply_id)
    seq = max(await streams.last_seq(reply_id), reply.stream_seq) + 1
    won = await db_thread(services.reply_finish)(
        reply_id=reply_id, status="stopped", content=reply.content, stream_seq=seq,
        prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
    )
    if won:
        from conversations.rendering import render_markdown

        await streams.append(reply_id, StreamEvent(seq=seq, event="done", data={
            "status": "stopped", "html": render_markdown(reply.content), "error": "", "replace": True,
        }))
    return "stopped"


def request_stop_sync(reply_id) -> None:
    async_to_sync(streams.request_stop)(reply_id)
