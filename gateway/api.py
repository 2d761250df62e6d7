"""The OpenAI-compatible API: /v1/chat/completions, /v1/models and /v1/moderations.

Bearer API keys, errors in OpenAI's shape with the right status, and the same
gateway path (quotas, caches, routing, moderation) as the chat pages. The
official `openai` client works against it unchanged.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass, replace

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway import client, openapi, quotas, ratelimits, registry
from gateway.keys import INTERNAL_CALLER, InternalCaller, aauthenticate, aremembered, is_internal_api_key
from gateway.types import (
    MAX_STOP_STRINGS,
    PRIORITY_BACKGROUND,
    PRIORITY_INTERACTIVE,
    SEED_LIMIT,
    BadRequest,
    ChatRequest,
    FinalEvent,
    GatewayError,
    ModerationUnavailable,
    TokenEvent,
    try_again_in,
)
from observability import logs
from retrieval.services import aembed
from safety.services import amoderations
from safety.taxonomy import CATEGORIES

def error_response(status: int, message: str, *, error_type: str, code: str | None, headers=None) -> JsonResponse:
    response = JsonResponse(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}, status=status
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def gateway_error_response(exc: GatewayError) -> JsonResponse:
    headers = dict(exc.headers)
    message = exc.message
    if exc.retry_after_s is not None:
        headers.setdefault("Retry-After", str(exc.retry_after_s))
        message = f"{message} {try_again_in(exc.retry_after_s)}"
    return error_response(exc.status, message, error_type=exc.error_type, code=exc.code, headers=headers)


def _client_ip(group, request) -> str:
    """The per-IP limit's key: django-ratelimit's own "ip" key, except that an
    address it cannot parse (a proxy on a unix socket leaves REMOTE_ADDR empty
    or absent) is one shared key instead of an exception on every request."""
    address = request.META.get("REMOTE_ADDR") or ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"unparsed:{address[:64]}"
    # IPv6 clients get a /64 each, as django-ratelimit gives them.
    return str(ipaddress.ip_network(f"{ip}/{64 if ip.version == 6 else 32}", strict=False).network_address)


async def _throttled(request, *, group: str, key, rate: str) -> JsonResponse | None:
    """A fixed-window request counter (gateway.ratelimits), answered in the API's own 429 shape."""
    try:
        wait_s = await ratelimits.hit(group=group, identity=key(group, request), rate=rate)
    except REDIS_ERRORS:
        # Fail closed, like the token quotas that sit behind this limit.
        return error_response(503, quotas.REDIS_DOWN, error_type="server_error", code="service_unavailable")
    if wait_s is None:
        return None
    return error_response(
        429, f"Too many requests ({rate}). {try_again_in(wait_s)}", error_type="requests",
        code="rate_limit_exceeded", headers={"Retry-After": str(wait_s)},
    )


async def _authorize(request):
    """(api key, None) or (None, error response): IP limit, bearer key, user limit.

    The internal credential (the product's background jobs) skips the limits:
    its requests are no user's, and on loopback they would eat into the IP
    budget that a reverse proxy's users share."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if is_internal_api_key(token):
        return INTERNAL_CALLER, None
    # The IP's counter and the key's cache entry in one wait (two Redis calls in
    # flight together); the database is asked only within the IP's limit.
    limited, remembered = await asyncio.gather(
        _throttled(request, group="api-ip", key=_client_ip, rate=settings.GATEWAY_API_RATE_PER_IP),
        aremembered(token))
    if limited:
        return None, limited
    key = await aauthenticate(token, remembered)
    if key is None:
        message = "Incorrect API key provided." if token else "Missing bearer API key (Authorization: Bearer sk-...)."
        return None, error_response(401, message, error_type="invalid_request_error", code="invalid_api_key")
    limited = await _throttled(
        request, group="api-user", key=lambda group, req: str(key.user_id), rate=settings.GATEWAY_API_RATE_PER_USER
    )
    if limited:
        return None, limited
    return key, None


# ------------------------------------------------------------------ parsing

def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise BadRequest("message content must be a string or a list of text parts")


def _number(body, name, kind, default, *, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"'{name}' must be between {low} and {high}")
    return kind(value)


def parse_chat_request(body, key) -> tuple[ChatRequest, bool, bool]:
    """(request, stream, include_usage) from an OpenAI chat-completions body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (a name from /v1/models, or 'auto')")
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools and function calling are not supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream, include_usage = _parse_stream(body)
    # Background jobs yield to people waiting on a reply, and are ledgered as tasks.
    internal = isinstance(key, InternalCaller)
    request = ChatRequest(
        messages=_parse_messages(body.get("messages")),
        user_id=key.user_id,
        model=model,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, 512, low=1, high=settings.GATEWAY_MAX_TOKENS),
        temperature=_number(body, "temperature", float, 1.0, low=0, high=2),
        top_p=_number(body, "top_p", float, 1.0, low=0, high=1),
        seed=_number(body, "seed", int, None, low=0, high=SEED_LIMIT - 1),
        stop=_parse_stop(body.get("stop")),
        priority=PRIORITY_BACKGROUND if internal else PRIORITY_INTERACTIVE,
        source="task" if internal else "api",
        api_key_id=key.pk,
    )
    return request, stream, include_usage


def _parse_messages(raw_messages) -> list[dict]:
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequest("'messages' must be a non-empty list")
    if len(raw_messages) > settings.GATEWAY_MAX_MESSAGES:
        raise BadRequest(f"'messages' has {len(raw_messages):,} items; the limit is {settings.GATEWAY_MAX_MESSAGES:,}")
    messages = []
    for message in raw_messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest("each message needs a role: system, user or assistant")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _text_content(message.get("content"))})
    return messages


def _parse_stop(stop) -> tuple[str, ...]:
    stop = stop or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} strings")
    return tuple(stop)


def _parse_stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object")
    return stream, bool(options.get("include_usage"))


# -------------------------------------------------------------------- views

def _usage_json(final: FinalEvent) -> dict:
    usage = final.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": min(usage.cached_tokens, usage.prompt_tokens)},
    }


async def _quota_headers(key) -> dict[str, str]:
    """The x-ratelimit-* headers of the key's user; none for the internal caller, who has no quota."""
    if key.user_id is None:
        return {}
    return await quotas.headers_for(key.user_id, await registry.alimits(key.user_id))


def _finish_reason(final: FinalEvent) -> str:
    return "stop" if final.finish_reason == "abort" else final.finish_reason


@csrf_exempt
async def chat_completions(request):
    key, body, refused = await _authorized_post(request)
    if refused:
        return refused
    try:
        chat, stream, include_usage = parse_chat_request(body, key)
        logs.bind(gateway_request_id=chat.request_id)  # the x-request-id this answer carries
        if _no_cache(request):
            chat = replace(chat, use_cache=False)
        events = client.current().stream(chat)
        first = await events.__anext__()
    except GatewayError as exc:
        return gateway_error_response(exc)
    reply = _Reply(chat, events, first, f"chatcmpl-{chat.request_id}", int(time.time()))
    if stream:
        # Headers go out before the reply: the windows as this request's
        # admission left them, its reservation counted. Taken from the
        # admission, not read again: one Redis round trip less before the
        # first chunk, which a burst of API calls queues behind each other's.
        headers = client.current().quota_headers(chat.request_id)
        if headers is None:  # nothing reserved (the internal caller): no quota to report
            headers = await _quota_headers(key)
        response = StreamingHttpResponse(_sse(reply, include_usage), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
    else:
        text, final = await _collect(reply)
        headers = await _quota_headers(key)
        response = _completion_response(reply, text, final)
    for name, value in {"x-request-id": chat.request_id, **headers}.items():
        response[name] = value
    return response


def _no_cache(request) -> bool:
    """`Cache-Control: no-cache` (or no-store) asks for a fresh reply: evals measure the model, not the cache."""
    directives = {d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return bool(directives & {"no-cache", "no-store"})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _authorized_post(request):
    """(api key, JSON body, None), or (None, None, the error response): the
    prologue every POST endpoint of /v1 shares."""
    if request.method != "POST":
        return None, None, error_response(405, "Use POST.", error_type="invalid_request_error",
                                          code="method_not_allowed")
    key, refused = await _authorize(request)
    if refused:
        return None, None, refused
    body, refused = _read_json(request)
    return key, body, refused


def _read_json(request):
    """(body, None) or (None, error response)."""
    try:
        raw = request.body
    except RequestDataTooBig:
        return None, error_response(
            413, "The request body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE allows.",
            error_type="invalid_request_error", code=None,
        )
    try:
        return json.loads(raw or b"null", parse_constant=_reject_constant), None
    except RecursionError:
        return None, _bad_json("it is nested too deeply")
    except ValueError as exc:
        # JSONDecodeError, bytes that are not UTF-8, NaN/Infinity, and integers
        # longer than Python converts (4,300 digits) are all ValueErrors.
        return None, _bad_json(str(exc)[:200])


def _bad_json(why: str) -> JsonResponse:
    return error_response(400, f"The body is not valid JSON: {why}.", error_type="invalid_request_error", code=None)


@dataclass
class _Reply:
    """A reply being relayed: the gateway's events, its first one already read."""
    chat: ChatRequest
    events: object
    first: object
    completion_id: str
    created: int


async def _collect(reply: _Reply) -> tuple[str, FinalEvent]:
    parts, final = [], reply.first
    if isinstance(reply.first, TokenEvent):
        parts.append(reply.first.text)
        async for event in reply.events:
            if isinstance(event, TokenEvent):
                parts.append(event.text)
            else:
                final = event
    return "".join(parts), final


def _completion_response(reply: _Reply, text: str, final: FinalEvent) -> JsonResponse:
    if final.finish_reason == "error":
        return error_response(
            502, f"The model failed while answering: {final.error}", error_type="server_error", code="backend_error",
        )
    return JsonResponse({
        "id": reply.completion_id,
        "object": "chat.completion",
        "created": reply.created,
        "model": final.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            # A reply the content policy stopped shows none of its text (what
            # streamed before the stop included).
            "message": {"role": "assistant", "content": "" if final.finish_reason == "content_filter" else text,
                        "refusal": None},
            "logprobs": None,
            "finish_reason": _finish_reason(final),
        }],
        "usage": _usage_json(final),
    })


_TEXT_MARK = "\x00text\x00"  # a placeholder for a token's text; its last occurrence in a chunk is the delta's


async def _sse(reply: _Reply, include_usage: bool):
    events, first, model = reply.events, reply.first, reply.chat.model

    def chunk(delta=None, finish_reason=None, usage_json=None, choices=True):
        payload = {"id": reply.completion_id, "object": "chat.completion.chunk", "created": reply.created,
                   "model": model,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
                   if choices else []}
        if include_usage:
            payload["usage"] = usage_json
        return f"data: {json.dumps(payload)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    # A token's chunk is this chunk with only its text encoded: the same
    # bytes as chunk({"content": text}), for a fraction of the CPU per token.
    # Bytes, not str: Django encodes a str chunk after looking its charset up
    # in the Content-Type header again, for every chunk (bench.relay's profile).
    before, _, after = chunk({"content": _TEXT_MARK}).rpartition(json.dumps(_TEXT_MARK).encode())
    event = first
    while True:
        if isinstance(event, TokenEvent):
            yield before + json.dumps(event.text).encode() + after
        else:
            model = event.model or model
            if event.finish_reason == "error":
                # OpenAI's own mid-stream failure shape: clients raise on it, so
                # a cut-off reply never looks complete.
                error = {"message": f"The model failed while answering: {event.error}", "type": "server_error",
                         "param": None, "code": "backend_error"}
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
            else:
                yield chunk(finish_reason=_finish_reason(event))
                if include_usage:
                    yield chunk(usage_json=_usage_json(event), choices=False)
            yield b"data: [DONE]\n\n"
            return
        event = await events.__anext__()


MODERATION_MODEL = "chatapp-moderation"


def parse_moderation_input(body) -> list[str]:
    """The texts of an OpenAI moderations body: `input` is a string, a list of
    strings, or a list of {"type": "text", "text": ...} parts."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    raw = body.get("input")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty list of strings")
    if len(items) > settings.GATEWAY_MAX_MESSAGES:
        raise BadRequest(f"'input' has {len(items):,} items; the limit is {settings.GATEWAY_MAX_MESSAGES:,}")
    texts = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise BadRequest("each input must be a string or a text part ({\"type\": \"text\", \"text\": ...})")
        texts.append(item)
    chars = sum(len(t) for t in texts)
    if chars > settings.GATEWAY_MAX_REQUEST_CHARS:
        raise BadRequest(f"the input is {chars:,} characters long; the limit is {settings.GATEWAY_MAX_REQUEST_CHARS:,}")
    return texts


def _moderation_result(decision) -> dict:
    scores = {category: 0.0 for category in CATEGORIES}
    flagged = {category: False for category in CATEGORIES}
    for verdict in decision.verdicts:
        if verdict.category in scores:
            scores[verdict.category] = max(scores[verdict.category], round(verdict.score, 6))
            flagged[verdict.category] = flagged[verdict.category] or verdict.flagged
    return {
        "flagged": any(flagged.values()),
        "categories": flagged,
        "category_scores": scores,
        "category_applied_input_types": {category: ["text"] for category in CATEGORIES},
    }


@csrf_exempt
async def moderations(request):
    """OpenAI's POST /v1/moderations, answered by the same pipeline every prompt passes."""
    key, body, refused = await _authorized_post(request)
    if refused:
        return refused
    try:
        texts = parse_moderation_input(body)
    except GatewayError as exc:
        return gateway_error_response(exc)
    decisions = await amoderations(texts, user_id=key.user_id)
    if any(decision.unchecked for decision in decisions):
        # Scores of 1.0 standing in for a checker that failed are no answer to "is this harmful?".
        return gateway_error_response(ModerationUnavailable(
            "The texts could not be checked just now: a moderation check failed or timed out."))
    return JsonResponse({
        "id": f"modr-{uuid.uuid4().hex}",
        "model": MODERATION_MODEL,
        "results": [_moderation_result(d) for d in decisions],
    })


@csrf_exempt
async def models(request, model_id: str | None = None):
    if request.method != "GET":
        return error_response(405, "Use GET.", error_type="invalid_request_error", code="method_not_allowed")
    key, refused = await _authorize(request)
    if refused:
        return refused
    names = await client.current().aavailable_models(key.user_id)
    if model_id is not None:
        if model_id not in names:
            return error_response(
                404, f"The model '{model_id}' does not exist or you do not have access to it.",
                error_type="invalid_request_error", code="model_not_found",
            )
        try:
            info = await runtime.on_db_thread(client.current().model_info, runtime.LEDGER_DB)(model_id)
        except GatewayError as exc:
            return gateway_error_response(exc)
        # What a caller that fits prompts to the model needs (the summary task;
        # vLLM's cards carry it as max_model_len).
        return JsonResponse({**_model_json(model_id), "context_window": info.context_window})
    return JsonResponse({"object": "list", "data": [_model_json(name) for name in names]})


def _model_json(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatapp"}


EMBEDDING_MAX_INPUTS = 256  # texts in one /v1/embeddings request


@csrf_exempt
async def embeddings(request):
    """OpenAI's /v1/embeddings with the bundled sentence embedder (all-MiniLM-L6-v2,
    or EMBEDDING_MODEL): the Celery worker holds no model, so its evals embed here."""
    key, body, refused = await _authorized_post(request)
    if refused:
        return refused
    texts = body.get("input") if isinstance(body, dict) else None
    texts = [texts] if isinstance(texts, str) else texts
    if (not isinstance(texts, list) or not texts or len(texts) > EMBEDDING_MAX_INPUTS
            or not all(isinstance(t, str) for t in texts)):
        message = f"'input' must be a string or a list of 1 to {EMBEDDING_MAX_INPUTS} strings"
        return error_response(400, message, error_type="invalid_request_error", code="invalid_request")
    if sum(map(len, texts)) > settings.GATEWAY_MAX_REQUEST_CHARS:
        return error_response(400, f"'input' is longer than {settings.GATEWAY_MAX_REQUEST_CHARS:,} characters",
                              error_type="invalid_request_error", code="invalid_request")
    vectors = await aembed(texts)
    return JsonResponse({
        "object": "list", "model": body.get("model") or "embedding",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    })


@csrf_exempt
def not_found(request, rest=""):
    return error_response(
        404, f"Unknown API route: {request.method} {request.path}", error_type="invalid_request_error", code="not_found"
    )


def openapi_json(request):
    """The API's OpenAPI description: public, like the API's documentation."""
    if request.method != "GET":
        return error_response(405, "Use GET.", error_type="invalid_request_error", code="method_not_allowed")
    return JsonResponse(openapi.document(), json_dumps_params={"ensure_ascii": False})
