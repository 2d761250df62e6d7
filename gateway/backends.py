"""Talking to what generates: local engine pools and remote OpenAI-compatible servers.

Both produce the same stream: TokenEvents, then one BackendFinal. A failure
before the first token raises BackendFailure, which the caller answers with the
next backend of the fallback chain; after the first token, a failure ends the
stream with BackendFinal(finish_reason="error") and the text so far is kept.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import jinja2
from django.conf import settings

from chatapp import runtime
from gateway.registry import BackendSpec
from gateway.types import BadRequest, ChatRequest, TokenEvent, Usage
from inference import EngineSaturated, PromptTooLong, SamplingParams
from observability import metrics

log = logging.getLogger(__name__)


class BackendFailure(Exception):
    """The backend could not start this request; try the next one."""

    def __init__(self, message: str, *, saturated: bool = False):
        super().__init__(message)
        self.saturated = saturated


@dataclass(frozen=True)
class BackendFinal:
    finish_reason: str
    usage: Usage
    error: str | None = None


# ------------------------------------------------------------ circuit breaker

class Circuit:
    """Per backend, per process: opens after N failures in a row, then lets one
    probe through after the cooldown (half-open); a success closes it. Each
    change of state is published as the backend's circuit-state gauge."""

    def __init__(self, name: str = ""):
        self.name = name
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False
        self.lock = threading.Lock()
        self._publish("closed")  # every backend in use has a series, not only those that failed

    def _publish(self, state: str) -> None:
        if self.name:
            metrics.circuit_state(self.name, state)

    def allow(self) -> bool:
        with self.lock:
            if self.opened_at is None:
                return True
            if time.monotonic() - self.opened_at < settings.GATEWAY_CIRCUIT_COOLDOWN_S or self.probing:
                return False
            self.probing = True  # half-open: this request is the probe
            self._publish("half_open")
            return True

    def success(self) -> None:
        with self.lock:
            if self.opened_at is not None:
                self._publish("closed")
            self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        with self.lock:
            self.failures += 1
            if self.probing or self.failures >= settings.GATEWAY_CIRCUIT_FAILURES:
                self.opened_at = time.monotonic()
                self._publish("open")
            self.probing = False


_circuits: dict[str, Circuit] = {}


def circuit(name: str) -> Circuit:
    circuit_ = _circuits.get(name)
    if circuit_ is None:
        circuit_ = _circuits.setdefault(name, Circuit(name))
    return circuit_


@runtime.on_reset
def reset_circuits() -> None:
    _circuits.clear()


# ---------------------------------------------------------------- local pools

def _sampling_params(request: ChatRequest):
    try:
        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop),
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


async def local_engine(spec: BackendSpec):
    if runtime.engine_loaded(spec.pool):
        return runtime.engine(spec.pool)
    try:
        return await asyncio.to_thread(runtime.engine, spec.pool)  # loads the model on first use
    except Exception as exc:
        raise BackendFailure(f"model pool '{spec.pool}' is unavailable: {exc}") from None


# Prompts up to this many characters are tokenized on the event loop: a
# chat turn's few hundred characters take the tokenizer ~0.2 ms, less than
# the thread hop (a wake-up and a turn at the GIL, several ms on a busy box).
INLINE_TOKENIZE_CHARS = 4000


async def local_prompt_ids(spec: BackendSpec, messages: list[dict]) -> list[int]:
    """The prompt's tokens. A long prompt is rendered and counted on a worker
    thread: it takes the tokenizer milliseconds to seconds, which on the
    event loop would hold back every stream of the process."""
    engine = await local_engine(spec)
    try:
        if sum(len(str(m.get("content") or "")) for m in messages) <= INLINE_TOKENIZE_CHARS:
            return engine.apply_chat_template(messages)
        return await asyncio.to_thread(engine.apply_chat_template, messages)
    except jinja2.TemplateError as exc:
        # The model's own template refused these messages (e.g. roles that do
        # not alternate): the request is at fault, not the backend.
        raise BadRequest(f"the model's chat template rejects these messages: {exc}") from None
    except Exception as exc:
        raise BackendFailure(f"model pool '{spec.pool}' could not tokenize the prompt: {exc}") from None


async def local_stream(spec: BackendSpec, request: ChatRequest, prompt_ids) -> AsyncIterator:
    engine = await local_engine(spec)
    params = _sampling_params(request)
    extra = {}
    if settings.GATEWAY_PREFIX_CACHE_SCOPE == "user" and request.user_id is not None:
        # A salted prefix is reused only by the same user: no one can time
        # another user's cached prompt, at the cost of shared system prompts.
        extra["cache_salt"] = f"user:{request.user_id}"
    try:
        handle = engine.submit(
            prompt_ids, params, request_id=request.request_id, priority=request.priority, **extra
        )
    except EngineSaturated as exc:
        raise BackendFailure(f"model pool '{spec.pool}' is at capacity ({exc})", saturated=True) from None
    except PromptTooLong as exc:
        raise BadRequest(str(exc)) from None
    async for event in handle:
        if event.finished:
            usage = event.usage
            # In the caller's context: the line carries its request, user and reply ids.
            log.info("pool %s ended %s: %s, %d prompt (%d cached) + %d generated tokens, first token after %s s",
                     spec.pool, request.request_id, event.finish_reason, usage.prompt_tokens, usage.cached_tokens,
                     usage.completion_tokens, _seconds(event.metrics.ttft_s))
            yield BackendFinal(
                finish_reason=event.finish_reason,
                usage=Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens,
                ),
                error=getattr(event, "error", None),
            )
            return
        if event.text or event.token_ids:
            yield TokenEvent(text=event.text, token_ids=tuple(event.token_ids))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def local_abort(spec: BackendSpec, request_id: str) -> None:
    if runtime.engine_loaded(spec.pool):
        runtime.engine(spec.pool).abort(request_id)


# -------------------------------------------------------------- remote servers

def estimate_tokens(messages: list[dict]) -> int:
    """A remote model's tokenizer is not at hand: ~4 characters a token, plus
    the chat template's per-message overhead. Reconciliation fixes the count."""
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in messages)
    return chars // 4 + 4 * len(messages) + 2


def _remote_body(spec: BackendSpec, request: ChatRequest) -> dict:
    body = {
        "model": spec.remote_model or spec.name,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    return body


class AbortSignal:
    """Set from any thread (the Stop endpoint) to end a remote stream.

    While the stream waits on the backend, setting it cancels that wait (the
    reading task's own await, turned back into an abort by `_next_chunk`):
    racing every read against an event would cost a task and a wait per
    token, the relay's largest per-token cost under load (bench.relay)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.reader: asyncio.Task | None = None  # the task waiting on the backend, while it waits

    def set(self) -> None:
        self.loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self.event.set()
        if self.reader is not None:
            self.reader.cancel()


async def remote_stream(spec: BackendSpec, request: ChatRequest, abort: AbortSignal) -> AsyncIterator:
    url = spec.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    # The silences of the body are _next_chunk's to time (first token, then
    # idle); sock_read bounds the response head and backs those up.
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.GATEWAY_CONNECT_TIMEOUT_S,
        sock_read=max(settings.GATEWAY_FIRST_TOKEN_TIMEOUT_S, settings.GATEWAY_IDLE_TIMEOUT_S),
    )
    try:
        response = await runtime.http().post(url, json=_remote_body(spec, request), headers=headers, timeout=timeout)
    except (aiohttp.ClientError, TimeoutError) as exc:
        metrics.remote_error(spec.name, "unreachable")
        raise BackendFailure(f"backend '{spec.name}' is unreachable: {type(exc).__name__} {exc}") from None
    reply = None
    try:
        if response.status != 200:
            body = (await response.content.read(500)).decode(errors="replace")
            # The body is the backend's, not ours to show: it may name hosts,
            # paths or keys. It goes to the log; users get the status.
            log.warning("backend %s answered HTTP %s: %s", spec.name, response.status, body)
            message = f"backend '{spec.name}' answered HTTP {response.status}"
            metrics.remote_error(spec.name, f"http_{response.status}")
            if response.status == 400:
                raise BadRequest(message)
            raise BackendFailure(message, saturated=response.status == 429)
        reply = _RemoteReply(spec, request)
        async for item in _remote_events(reply, response, abort):
            yield item
    finally:
        if reply is not None and reply.done and not response.content.at_eof():
            _finish_body(response)
        else:
            # Back to the pool when the body was read to its end, closed
            # otherwise (an abort, a broken stream, a body left unread).
            response.release()


# A response's [DONE] is the reply's end; the chunked body's last bytes often
# arrive a write later. Reading them off the reply's path lets the connection
# go back to the pool instead of being closed: a new one is a TCP (and, for a
# hosted backend, a TLS) handshake before the next first token.
_FINISH_BODY_S = 1.0
_finishing: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones


def _finish_body(response: aiohttp.ClientResponse) -> None:
    try:
        task = asyncio.get_running_loop().create_task(_read_to_end(response))
    except RuntimeError:  # the stream was finalized off its loop: nothing left to reuse
        response.release()
        return
    _finishing.add(task)
    task.add_done_callback(_finishing.discard)


async def _read_to_end(response: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(_FINISH_BODY_S):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        pass  # a backend that keeps the stream open after [DONE]: the connection is closed below
    finally:
        response.release()


class _RemoteReply:
    """What one remote stream has delivered so far, and how it ends: a
    failure before the first token raises BackendFailure (the next backend
    is tried), after it ends the reply with an error BackendFinal."""

    def __init__(self, spec: BackendSpec, request: ChatRequest):
        self.spec, self.request = spec, request
        self.started = False
        self.text_parts = 0
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.done = False  # [DONE] was read: the body holds nothing more the reply needs

    def final(self, finish_reason: str, error: str | None = None) -> BackendFinal:
        return BackendFinal(finish_reason, _usage(self.request, self.usage, self.text_parts), error=error)

    def fail(self, message: str, kind: str = "bad_stream") -> BackendFinal:
        metrics.remote_error(self.spec.name, kind)
        if not self.started:
            raise BackendFailure(message)
        return self.final("error", message)

    def texts(self, chunk: dict) -> list[str]:
        """The text pieces of one chunk (usually one); remembers usage and finish."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        texts = []
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.started = True
                self.text_parts += 1
                texts.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return texts

    def end(self) -> BackendFinal:
        if self.finish_reason is None:
            return self.fail(f"backend '{self.spec.name}' ended the stream without a finish reason")
        return self.final(self.finish_reason)


async def _remote_events(reply: _RemoteReply, response: aiohttp.ClientResponse, abort: AbortSignal):
    """The stream's events, one TokenEvent per network read: what arrived
    together (a backend's burst, or tokens queued while this process was busy)
    goes through moderation, encoding and the client's socket once."""
    spec = reply.spec
    reads = response.content.iter_any()
    pending = b""  # an incomplete last line
    while True:
        data = await _next_chunk(reply, reads, abort)
        if isinstance(data, BackendFinal):
            yield data
            return
        closed = data is None
        if closed:
            lines, pending = [pending], b""  # a last line without its newline still counts
        else:
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
        texts, ended, failed = _parse_lines(reply, lines)
        if texts:
            yield TokenEvent(text="".join(texts), pieces=len(texts))
        if failed:
            log.warning("backend %s sent an error mid-stream: %.500s", spec.name, failed)
            yield reply.fail(f"backend '{spec.name}' reported an error", "error_event")
            return
        if ended or closed:
            reply.done = ended  # what follows [DONE] is read off the reply's path (_finish_body)
            break
    yield reply.end()


def _parse_lines(reply: _RemoteReply, lines: list[bytes]) -> tuple[list[str], bool, object]:
    """(text pieces, [DONE] seen, the error a chunk reported) of whole SSE lines."""
    texts: list[str] = []
    for line in lines:
        if not line.startswith(b"data:"):
            continue  # comments (keep-alives), event names, blank separators
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return texts, True, None
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            return texts, False, chunk["error"]
        texts += reply.texts(chunk)
    return texts, False, None


async def _next_chunk(reply: _RemoteReply, reads, abort: AbortSignal) -> bytes | BackendFinal | None:
    """The next bytes from the backend, None at the end of the stream, or the
    final event of an abort, a silence past its timeout or a broken stream."""
    if abort.event.is_set():
        return reply.final("abort")
    wait_s = settings.GATEWAY_IDLE_TIMEOUT_S if reply.started else settings.GATEWAY_FIRST_TOKEN_TIMEOUT_S
    task = asyncio.current_task()
    abort.reader = task
    try:
        async with asyncio.timeout(wait_s):
            return await reads.__anext__()
    except TimeoutError:
        return reply.fail(f"backend '{reply.spec.name}' sent nothing for {wait_s:g} s", "timeout")
    except asyncio.CancelledError:
        # The abort's cancel is turned into the abort's final event; any other
        # cancellation (the client went away) still pending goes on.
        if not abort.event.is_set() or task.uncancel() > 0:
            raise
        return reply.final("abort")
    except StopAsyncIteration:
        return None
    except aiohttp.ClientError as exc:
        return reply.fail(f"backend '{reply.spec.name}' stream broke: {type(exc).__name__} {exc}", "stream_broken")
    finally:
        abort.reader = None


def _usage(request: ChatRequest, usage: dict | None, chunks: int) -> Usage:
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        return Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )
    # Servers without stream usage: one chunk is about one token.
    return Usage(prompt_tokens=estimate_tokens(request.messages), completion_tokens=chunks)
