"""Structured logs: structlog renders every standard-library log record.

The product logs through `logging.getLogger(__name__)` everywhere (the engine
too, which must not depend on Django); structlog's ProcessorFormatter turns
each record into one JSON object (LOG_FORMAT=json) or a readable line
(LOG_FORMAT=console), and adds the fields bound in the current context:

    request_id       the HTTP request's (X-Request-ID, also on the response),
                     carried into the reply's task, the engine's lines about
                     the request and the Celery tasks it enqueued
    user_id          the signed-in user
    conversation_id  from the URL, and the turn's
    reply_id         the reply a turn or a stream is about
    message_id       from the URL (edit, regenerate, stop, switch)

Context lives in contextvars (structlog.contextvars), so it follows asyncio
tasks and asgiref's thread hops by itself; a task started with a fresh
context gets the fields through `carry()`.
"""
from __future__ import annotations

import contextvars
import logging
import re
import uuid

import structlog
from structlog.contextvars import (
    bind_contextvars,
    clear_contextvars,
    get_contextvars,
    merge_contextvars,
    unbind_contextvars,
)

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is kept when it could not smuggle anything into a log line
# or a header: letters, digits and a few separators, not too long.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_SHARED = [
    merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def formatter(log_format: str = "json") -> logging.Formatter:
    """The formatter of settings.LOGGING's handlers (its "()" factory)."""
    _configure_structlog()
    if log_format == "console":
        last = [structlog.dev.ConsoleRenderer(colors=False)]
    else:
        last = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
    )


def _configure_structlog() -> None:
    """structlog's own loggers (`structlog.get_logger()`) go through the
    standard library too, so both kinds of line come out alike."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


# ------------------------------------------------------------------ context

def request_id_from(incoming: str | None) -> str:
    """The caller's request id when it is sane, else a new one."""
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def bind(**fields) -> None:
    """Add fields to every later log line of this context (None is skipped)."""
    values = {key: value if isinstance(value, (int, str)) else str(value)
              for key, value in fields.items() if value is not None}
    if values:
        bind_contextvars(**values)


def unbind(*keys: str) -> None:
    unbind_contextvars(*keys)


def clear() -> None:
    clear_contextvars()


def current() -> dict:
    return get_contextvars()


def current_request_id() -> str | None:
    return get_contextvars().get("request_id")


def carry() -> contextvars.Context:
    """A fresh context holding only the log fields of this one: for a task
    that must not inherit the rest of its creator's context."""
    fields = get_contextvars()
    context = contextvars.Context()
    if fields:
        context.run(bind_contextvars, **fields)
    return context
