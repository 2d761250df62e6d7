"""The SSE stream of one reply: replay from Last-Event-ID, then the live tail.

Served by Channels (not a Django view) so a long-lived response costs one
coroutine, not a thread. The stream loop runs as its own task so that
`http.disconnect` is handled while it waits (AsyncHttpConsumer would only see
the disconnect after `handle` returns).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from importlib import import_module
from urllib.parse import parse_qs

from channels.consumer import AsyncConsumer
from channels.exceptions import StopConsumer
from django.conf import settings
from django.contrib.auth import get_user
from django.http import Http404, HttpRequest
from django.http.cookie import parse_cookie

from chatapp.runtime import on_db_thread
from conversations import streams
from conversations.models import Message
from conversations.selectors import access_message
from conversations.streams import StreamEvent
from observability import logs, metrics

log = logging.getLogger(__name__)

# How often, on average, a stream whose log is missing asks the database
# whether its reply ended anyway, in heartbeats.
DB_CHECK_EVERY_BEATS = 3

VIEW_NAME = "reply_stream"  # its label in the requests-by-view metric

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# Event ids are sequence numbers; Redis Stream ids hold them up to 2**64 - 1.
MAX_EVENT_ID = 2**63 - 1


def _parse_last_event_id(scope) -> int | None:
    """The number after which to replay: 0 when absent, None when it is not
    an event id this server could have sent (plain ASCII digits in range)."""
    headers = dict(scope.get("headers") or [])
    raw = headers.get(b"last-event-id", b"").decode("latin-1").strip()
    if not raw:
        raw = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("last_event_id") or [""])[0].strip()
    if not raw:
        return 0
    # int() alone would take "1_000", " ٣", and 4,000 digits that then break XRANGE.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_EVENT_ID)) or int(raw) > MAX_EVENT_ID:
        return None
    return int(raw)


def _session_user(scope):
    """The user signed in by the request's session cookie, found the way
    Django's session and auth middleware find it (the session engine's store,
    then `auth.get_user`, which checks the session's password hash)."""
    cookie = dict(scope.get("headers") or []).get(b"cookie", b"").decode("latin-1")
    request = HttpRequest()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(
        parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME))
    return get_user(request)


def _load(scope, reply_id):
    """Who asks and their reply, in one trip to a chat database thread.

    Not Channels' AuthMiddlewareStack: its lookups queue on asgiref's one
    shared sync thread, so 32 streams opened together (and, when it wrapped
    the whole site, 32 POSTs) waited on each other's round trips. A scope
    that already carries a user (an auth middleware, a test) keeps it."""
    user = scope["user"] if "user" in scope else _session_user(scope)
    message = access_message(user=user, message_id=reply_id)
    if message.role != Message.Role.ASSISTANT:
        raise Http404("No such reply")
    return message


def _reload(reply_id):
    return Message.objects.filter(id=reply_id).first()


class ReplyStreamConsumer(AsyncConsumer):
    # No channel layer: streams are fed by the reply's Redis log and the
    # fan-out, never by channel messages. With the layer, every SSE
    # connection kept a Redis connection in a BZPOPMIN loop for nothing, and
    # cancelling that receive at the end of a stream could hang.
    channel_layer_alias = None
    task: asyncio.Task | None = None
    sent_seq = 0  # the last event this response carried

    async def http_request(self, message):
        if message.get("more_body"):
            return
        self.reply_id = self.scope["url_route"]["kwargs"]["reply_id"]
        self.connection_id = uuid.uuid4().hex
        # Not a Django view: the request id and log context are set here.
        headers = dict(self.scope.get("headers") or [])
        self.request_id = logs.request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        logs.bind(request_id=self.request_id, reply_id=self.reply_id)
        after = _parse_last_event_id(self.scope)
        if after is None:
            await self._plain(400, b"Last-Event-ID must be an event id: a non-negative integer, at most 2**63 - 1.")
            return
        try:
            self.reply = await on_db_thread(_load)(self.scope, self.reply_id)
        except Http404:
            await self._plain(404, b"Not found")
            return
        self.task = asyncio.create_task(self._stream(after))

    async def http_disconnect(self, message):
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        raise StopConsumer()

    def _headers(self, headers: list) -> list:
        return [*headers, (logs.REQUEST_ID_HEADER.lower().encode(), self.request_id.encode())]

    async def _plain(self, status: int, body: bytes):
        metrics.http_request(view=VIEW_NAME, method="GET", status=status)
        await self.send({"type": "http.response.start", "status": status,
                         "headers": self._headers([(b"content-type", b"text/plain; charset=utf-8")])})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send(self, chunk: bytes, more: bool = True):
        await self.send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def _stream(self, after: int):
        """Open the response, replay and tail the reply's log, and always leave
        the reader lists clean."""
        reply_id = self.reply_id
        self.sent_seq = after
        metrics.http_request(view=VIEW_NAME, method="GET", status=200)
        metrics.sse_opened(resumed=after > 0)
        try:
            await self.send({"type": "http.response.start", "status": 200, "headers": self._headers(SSE_HEADERS)})
            await self._serve_stream(reply_id, after)
        finally:
            metrics.sse_closed()

    async def _serve_stream(self, reply_id, after: int):
        # Tell the browser how long to wait before reconnecting; first bytes
        # also make proxies commit to streaming.
        await self._send(b"retry: 1000\n\n")
        fanout = streams.fanout()
        wake = None
        streams.reader_joined(reply_id)
        try:
            wake = await fanout.watch("new", reply_id)
            await streams.subscriber_touch(reply_id, self.connection_id)
            if not await streams.log_exists(reply_id) and self.reply.is_terminal:
                await self._send_stored(self.reply, after)
                return
            await self._tail(wake)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream of %s", reply_id)
            ev = StreamEvent(seq=self.sent_seq + 1, event="error",
                             data={"status": Message.Status.ERROR, "error": "The stream failed; reload the page."})
            await self._send(ev.encode(), more=False)
        finally:
            streams.reader_left(reply_id)
            if wake is not None:
                fanout.unwatch("new", reply_id, wake)
            with contextlib.suppress(Exception):
                await streams.subscriber_leave(reply_id, self.connection_id)

    async def _tail(self, wake: asyncio.Event) -> None:
        """Send what the log holds after `sent_seq`, then wait for more (a poke)
        or for the next heartbeat, until the terminal event."""
        heartbeat_s = settings.STREAM_HEARTBEAT_S
        # Jittered, so that many streams opened together do not beat together.
        last_beat = time.monotonic() - random.uniform(0, heartbeat_s / 2)
        next_db_check = self._next_db_check(heartbeat_s)
        while True:
            # Clear before reading: a poke that lands after the read leaves
            # the event set, so the wait below returns at once.
            wake.clear()
            events = await streams.read_after(self.reply_id, self.sent_seq)
            if events:
                if await self._send_events(events):
                    return
                continue
            remaining = heartbeat_s - (time.monotonic() - last_beat)
            if remaining > 0:
                try:
                    # Not wait_for: on Python 3.11 it drops a disconnect's
                    # cancellation that lands as the wake-up does.
                    async with asyncio.timeout(remaining):
                        await wake.wait()
                    continue
                except TimeoutError:
                    pass
            last_beat = time.monotonic()
            await self._send(b": heartbeat\n\n")
            streams.subscriber_heartbeat(self.reply_id, self.connection_id)
            # A reply ends with a terminal event in its log; only one whose
            # process died (ended by the reaper) or whose log expired does
            # not, and that is rare enough to check every few beats.
            if last_beat >= next_db_check:
                next_db_check = self._next_db_check(heartbeat_s)
                if await self._ended_without_log(self.sent_seq):
                    return

    async def _send_events(self, events: list[StreamEvent]) -> bool:
        """One write for whatever arrived together (a reader that fell behind,
        or a replay), up to the terminal event. Returns whether it was sent."""
        chunk = []
        terminal = False
        for ev in events:
            chunk.append(ev.encode())
            self.sent_seq = ev.seq
            if ev.terminal:
                terminal = True
                break
        await self._send(b"".join(chunk), more=not terminal)
        return terminal

    @staticmethod
    def _next_db_check(heartbeat_s: float) -> float:
        # Jittered per check, not only once: 500 streams opened together
        # would otherwise ask the database in one burst every few beats, for
        # as long as they stay open.
        return time.monotonic() + DB_CHECK_EVERY_BEATS * heartbeat_s * random.uniform(0.5, 1.5)

    async def _ended_without_log(self, after: int) -> bool:
        """A reply that ended while its log expired or was never written (its
        process died): send what the database holds and close."""
        if await streams.log_exists(self.reply_id):
            return False
        reply = await on_db_thread(_reload)(self.reply_id)
        if reply is None or not reply.is_terminal:
            return False
        await self._send_stored(reply, after)
        return True

    async def _send_stored(self, reply: Message, after: int):
        event = streams.terminal_event(max(reply.stream_seq, after + 1), reply.status, reply.content,
                                       error=reply.error, replace=True)
        await self._send(event.encode(), more=False)
