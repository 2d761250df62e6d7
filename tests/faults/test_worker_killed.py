"""The Celery worker killed while a title request is in flight."""
import os
import signal
import time

import psutil
import pytest

from conversations.services import fallback_title
from tests.faults.harness import Serve, User, assert_invariants, wait_for

FIRST_MESSAGE = "How do I bake sourdough bread at home with rye flour?"


def in_flight_request(serve: Serve) -> psutil.Process | None:
    """The worker process that holds a connection to serve's API right now."""
    for main in serve.worker_mains():
        for proc in [main, *main.children(recursive=True)]:
            try:
                if any(c.raddr and c.raddr.port == serve.port and c.status == psutil.CONN_ESTABLISHED
                       for c in proc.net_connections(kind="tcp")):
                    return main
            except psutil.Error:
                continue
    return None


def kill_mid_title(user: User, serve: Serve, attempts: int = 4) -> str:
    """Start chats until one's title request is caught in flight; kill the
    whole worker then. Returns that chat's id."""
    for _ in range(attempts):
        conversation_id, reply_id = user.new_chat(FIRST_MESSAGE)
        assert user.read(reply_id).terminal["data"]["status"] == "complete"
        titled = lambda: user.export(conversation_id)["title"] != fallback_title(FIRST_MESSAGE)  # noqa: E731
        worker = wait_for(lambda: in_flight_request(serve) or titled(), timeout_s=120,
                          what="the title request", poll_s=0.02)
        if isinstance(worker, psutil.Process):
            os.killpg(worker.pid, signal.SIGKILL)  # the worker, its pool and its beat
            return conversation_id
    raise AssertionError(f"no title request caught in flight in {attempts} chats")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_killed_mid_title_is_restarted_and_the_chat_is_unaffected(tmp_path):
    serve = Serve(tmp_path / "data", CHAT_REPLY_MAX_TOKENS="16").start()
    try:
        user = User(serve).sign_up()
        old = {p.pid for p in serve.worker_mains()}
        conversation_id = kill_mid_title(user, serve)
        # serve starts a new worker: titles keep coming without a restart.
        killed = time.monotonic()
        wait_for(lambda: {p.pid for p in serve.worker_mains()} - old, timeout_s=120, what="a new worker")
        print(f"measured: worker killed mid-title, a new one {time.monotonic() - killed:.1f} s later")
        assert len(serve.worker_mains()) == 1
        reply = assert_invariants(user, serve, conversation_id, typed=FIRST_MESSAGE)
        assert reply["status"] == "complete"
        # The cut title request was given up (the chat keeps its first words)
        # or re-run; either way the chat is whole.
        title = user.export(conversation_id)["title"]
        assert title, title
        next_chat, _ = user.new_chat("What is the capital of France?")
        wait_for(lambda: user.export(next_chat)["title"] != fallback_title("What is the capital of France?"),
                 timeout_s=180, what="the next chat's title, from the new worker")
    finally:
        code = serve.stop()
    assert code == 0, serve.output()[-12000:]
