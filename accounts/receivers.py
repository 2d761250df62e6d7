"""The accounts app listens to moderation (safety.signals.content_blocked):
each block goes to the audit log and counts towards a review flag."""
from __future__ import annotations

import asyncio
import functools
import logging

from chatapp import runtime
from safety.signals import content_blocked

from accounts import services

log = logging.getLogger(__name__)

_pending: set = set()  # strong references to the writes started from an event loop


def _record(**fields) -> None:
    try:
        services.moderation_block_recorded(**fields)
    except Exception:  # a lost audit row must not fail the request that was blocked
        log.exception("recording a moderation block failed")


def on_content_blocked(sender, user_id=None, source="", category="", checker="", text="", **kwargs):
    work = functools.partial(_record, user_id=user_id, source=str(source), category=str(category),
                             checker=str(checker), text=text if isinstance(text, str) else "")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        work()  # a sync caller (a view, a task, asend's thread): write here
        return
    # Sent from the event loop (the gateway's stages): the ORM may not run
    # there, so the write goes to the gateway's database thread.
    task = asyncio.ensure_future(runtime.on_db_thread(work, runtime.LEDGER_DB)())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def connect() -> None:
    content_blocked.connect(on_content_blocked, dispatch_uid="accounts.content_blocked")
