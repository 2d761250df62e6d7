"""Wall-clock stamps of a new chat's stages inside `manage.py serve`, for bench.stages.

Installed into the server by a sitecustomize that bench.stages writes (the
server imports this module before Django starts); importing it does nothing.
Each stamp is a line [time.time(), stage, key] appended to the file named by
BENCH_STAGES_OUT; the client's own times use the same clock, so every stage
is measured from the POST's send. The product carries no probes of its own.
"""
from __future__ import annotations

import contextvars
import json
import os
import threading
import time

_lock = threading.Lock()
_stamps: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bench_stage_stamps", default=None)


def _rec(path: str, stage: str, key, at: float | None = None) -> None:
    with _lock, open(path, "a") as f:
        f.write(json.dumps([at or time.time(), stage, str(key)]) + "\n")


def install() -> None:
    """Wrap django.setup so that, once the apps are loaded, the stages are stamped."""
    path = os.environ.get("BENCH_STAGES_OUT")
    if not path:
        return
    import django

    real_setup = django.setup

    def setup(*args, **kwargs):
        real_setup(*args, **kwargs)
        if not getattr(django, "_bench_stages_patched", False):  # serve sets Django up more than once
            django._bench_stages_patched = True
            _patch(path)

    django.setup = setup


_INHERITED = object()
_replaced: list[tuple[object, str, object]] = []  # (owner, attribute, its own value or _INHERITED), in order


def _replace(owner, name: str, value) -> None:
    _replaced.append((owner, name, vars(owner).get(name, _INHERITED)))
    setattr(owner, name, value)


def uninstall() -> None:
    """Put back every wrapped attribute (the tests' way out; a server never leaves)."""
    while _replaced:
        owner, name, original = _replaced.pop()
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def _stamp(name: str) -> None:
    stamps = _stamps.get()
    if stamps is not None:
        stamps.setdefault(name, time.time())


def _patch_middleware() -> None:
    """Stamps inside Django's synchronous middleware block (chatapp.apps):
    its thread has the request, the session is loaded, the user is loaded."""
    from django.contrib.sessions.middleware import SessionMiddleware
    from django.middleware.security import SecurityMiddleware

    from chatapp.middleware import LoadedUserMiddleware

    real_security = SecurityMiddleware.process_request

    def security(self, request):
        _stamp("sync block")
        return real_security(self, request)

    _replace(SecurityMiddleware, "process_request", security)
    real_session = SessionMiddleware.process_request

    def session(self, request):
        real_session(self, request)
        request.session.get("_auth_user_id")  # the session's load (lazy until read)
        _stamp("session")

    _replace(SessionMiddleware, "process_request", session)
    real_loaded = LoadedUserMiddleware.__call__

    def loaded(self, request):
        request.user.is_authenticated  # the lazy user, as LoadedUserMiddleware evaluates it
        _stamp("user")
        return real_loaded(self, request)

    _replace(LoadedUserMiddleware, "__call__", loaded)


def _patch(path: str) -> None:
    """One wrapper per stage, in the order a chat meets them."""
    from django.core.handlers import asgi as django_asgi

    from conversations import consumers, turns, views
    from inference import engine as engine_module
    from inference import engine_loop
    from inference.handle import RequestHandle

    # 1. the request reaches Django, its middleware, the rate limit (stamped per request, written with the reply id)
    # `handle`, not `__call__`: chatapp.asgi's handlers override `__call__` (to lend the request a thread) and
    # then call `handle`, inside the context where the request's sync work runs.
    real_handle = django_asgi.ASGIHandler.handle

    async def handle(self, scope, receive, send):
        if scope.get("path") == "/c/new":
            _stamps.set({"django": time.time()})
        return await real_handle(self, scope, receive, send)

    _replace(django_asgi.ASGIHandler, "handle", handle)
    _patch_middleware()
    real_rate_limited = views._chat_rate_limited

    async def rate_limited(request, user):
        _stamp("view")
        answer = await real_rate_limited(request, user)
        _stamp("rate limit")
        return answer

    _replace(views, "_chat_rate_limited", rate_limited)

    # 2. the turn saved and its request built, on a database thread
    real_create = turns.create_and_prepare

    def create_and_prepare(create, /, **kwargs):
        started = time.time()
        reply, request = real_create(create, **kwargs)
        for stage, at in (*(_stamps.get() or {}).items(), ("saving", started), ("saved", time.time())):
            _rec(path, stage, reply.id, at)
        return reply, request

    _replace(turns, "create_and_prepare", create_and_prepare)
    real_build = turns.build_request

    def build_request(**kwargs):
        _stamp("inserted")
        return real_build(**kwargs)

    _replace(turns, "build_request", build_request)

    # 3. the gateway, the engine, the reply's log, the SSE stream
    real_generate = turns.generate

    async def generate(log_, request, *args):
        _rec(path, "gateway", log_.reply_id)
        _rec(path, "request:" + request.request_id, log_.reply_id)
        return await real_generate(log_, request, *args)

    _replace(turns, "generate", generate)
    real_submit = engine_module.Engine.submit

    def submit(self, prompt, sampling_params=None, request_id=None, **kwargs):
        _rec(path, "engine", request_id)
        return real_submit(self, prompt, sampling_params, request_id, **kwargs)

    _replace(engine_module.Engine, "submit", submit)
    real_execute = engine_loop.EngineLoop._execute
    scheduled: set = set()

    def execute(self, batch):
        # The first step that carries a request: its prompt's forward (a chunk of it when chunked).
        fresh = [seq.request_id for seq in batch.seqs if seq.request_id not in scheduled]
        scheduled.update(fresh)
        for request_id in fresh:
            _rec(path, "prefill starts", request_id)
        try:
            return real_execute(self, batch)
        finally:
            for request_id in fresh:
                _rec(path, "prefill ends", request_id)

    _replace(engine_loop.EngineLoop, "_execute", execute)
    real_deliver = RequestHandle.deliver

    def deliver(self, event):
        if not getattr(self, "_bench_delivered", False):
            self._bench_delivered = True
            _rec(path, "first token", self.request_id)
        return real_deliver(self, event)

    _replace(RequestHandle, "deliver", deliver)
    real_token = turns.ReplyLog.token
    logged: set = set()

    async def token(self, text):
        first = self.reply_id not in logged
        await real_token(self, text)
        if first:
            logged.add(self.reply_id)
            _rec(path, "in the log", self.reply_id)

    _replace(turns.ReplyLog, "token", token)
    real_request = consumers.ReplyStreamConsumer.http_request

    async def http_request(self, message):
        _rec(path, "stream opened", self.scope["url_route"]["kwargs"]["reply_id"])
        return await real_request(self, message)

    _replace(consumers.ReplyStreamConsumer, "http_request", http_request)
    real_send = consumers.ReplyStreamConsumer._send_events
    sent: set = set()

    async def send_events(self, events):
        first = self.reply_id not in sent and any(e.event == "token" for e in events)
        result = await real_send(self, events)
        if first:
            sent.add(self.reply_id)
            _rec(path, "token written", self.reply_id)
        return result

    _replace(consumers.ReplyStreamConsumer, "_send_events", send_events)
