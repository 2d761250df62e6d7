"""Real `serve` processes, a signed-in user and the invariants every fault
must leave intact (docs/RELIABILITY.md).

Everything waits on a condition with a generous deadline, never for a fixed
time: these tests share a 2-core box with whatever else runs there.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis

from chatapp.embedded import redis_socket_path
from tests.test_serve import ROOT, free_port

TERMINAL = {"complete", "stopped", "interrupted", "error", "blocked"}
PASSWORD = "alice-pass-123"
# Long enough to be caught mid-reply by a test on a busy box (SmolLM2 writes
# 10 to 30 tokens/s here), short enough that a whole reply ends in a minute.
LONG_REPLY_TOKENS = 400
LONG_PROMPT = "Write a long, detailed essay on the history of bread, with many sections."
# Greedy replies: sampled at 0.7, about one reply in 500 to LONG_PROMPT ends
# after ten tokens ("Spreading the Bread by Hugging Face"), before a test can
# stop it. Greedy, it runs to LONG_REPLY_TOKENS in fp32, bf16, int8, int4 and
# bf16 weights (what "auto" picks on the 2-core EPYC).
# With greedy replies cacheable, the response caches are off, so every turn
# reaches the engine.
DETERMINISTIC = {"CHAT_TEMPERATURE": "0", "GATEWAY_EXACT_CACHE": "0", "GATEWAY_SEMANTIC_CACHE": "0"}


def wait_for(condition, *, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


class Serve:
    """One `manage.py serve` on its own port, its output in a log file."""

    def __init__(self, data_dir: Path, *, load_models: bool = True, worker: bool = True,
                 log_dir: Path | None = None, **env: str):
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {
            **os.environ, "DATA_DIR": str(data_dir), "LOAD_MODELS": "1" if load_models else "0",
            "PYTHONUNBUFFERED": "1", "ENGINE_KV_CACHE_MB": "64", "STREAM_MATERIALIZE_S": "0.2",
            "CHAT_REPLY_MAX_TOKENS": str(LONG_REPLY_TOKENS), "SHUTDOWN_TIMEOUT_S": "30",
            # A killed serve's replies are reaped within a test's patience,
            # yet a live one's heartbeat has room for a busy box's delays.
            "REPLY_HEARTBEAT_S": "2", "REPLY_STALE_S": "15", **DETERMINISTIC, **env,
        }
        self.worker = worker
        self.proc: subprocess.Popen | None = None
        self.log_path = (log_dir or data_dir.parent) / f"serve-{data_dir.name}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Serve":
        self.start_process()
        wait_for(self._healthy, timeout_s=240, what=f"serve on {self.url} to be healthy", poll_s=0.5)
        return self

    def start_process(self) -> None:
        """The process alone, not waited for."""
        args = [sys.executable, "manage.py", "serve", "--port", str(self.port)]
        if not self.worker:
            args.append("--no-worker")
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.output()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout_s: float = 90) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not stop within {timeout_s} s:\n{self.output()[-3000:]}")

    def worker_mains(self) -> list[psutil.Process]:
        """The live Celery worker main processes this serve started."""
        found = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "celery" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue  # gone meanwhile
        return found

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(redis_socket_path(self.data_dir / "redis")))


def celery_processes_of(data_dir: Path) -> list[psutil.Process]:
    """Every worker, beat and pool process of a DATA_DIR, whoever its parent."""
    schedule = str(data_dir / "celerybeat-schedule")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "celery" in " ".join(cmdline) and schedule in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@dataclass
class Stream:
    """What one SSE connection to a reply received."""
    tokens: list[str] = field(default_factory=list)
    last_id: int = 0
    terminal: dict | None = None
    ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class User:
    """A browser's session: sign-up, chats, streams, Stop."""

    def __init__(self, serve: Serve, *, cookies=None):
        self.client = httpx.Client(base_url=serve.url, timeout=60, cookies=cookies)

    def via(self, serve: Serve) -> "User":
        """The same session, through another `serve` (or a restarted one)."""
        return User(serve, cookies=self.client.cookies)

    def sign_up(self, username: str = "alice") -> "User":
        self.client.get("/accounts/signup/")
        response = self.client.post("/accounts/signup/", headers=self._csrf(), data={
            "username": username, "password1": PASSWORD, "password2": PASSWORD,
        })
        assert response.status_code == 302, response.text
        return self

    def _csrf(self) -> dict:
        return {"X-CSRFToken": self.client.cookies["csrftoken"]}

    def new_chat(self, text: str) -> tuple[str, str]:
        """(conversation id, reply id) of a new chat."""
        response = self.client.post("/c/new", headers=self._csrf(), data={"text": text})
        assert response.status_code == 302, response.text
        conversation_id = response.headers["location"].strip("/").split("/")[-1]
        reply = [m for m in self.export(conversation_id)["messages"] if m["role"] == "assistant"][-1]
        return conversation_id, reply["id"]

    def export(self, conversation_id: str) -> dict:
        response = self.client.get(f"/c/{conversation_id}/export.json")
        assert response.status_code == 200, response.text
        return response.json()

    def message(self, conversation_id: str, message_id: str) -> dict:
        return next(m for m in self.export(conversation_id)["messages"] if m["id"] == message_id)

    def stop(self, reply_id: str) -> str:
        response = self.client.post(f"/m/{reply_id}/stop", headers=self._csrf())
        assert response.status_code == 200, response.text
        return response.json()["status"]

    def read(self, reply_id: str, *, last_event_id: int = 0, until=None, timeout_s: float = 120) -> Stream:
        """Read a reply's SSE stream until its terminal event, `until(stream)`,
        or the connection drops (a killed server)."""
        stream = Stream(last_id=last_event_id)
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        deadline = time.monotonic() + timeout_s
        try:
            with self.client.stream("GET", f"/c/reply/{reply_id}/stream", headers=headers,
                                    timeout=httpx.Timeout(timeout_s)) as response:
                assert response.status_code == 200, response.read()
                for event in _events(response.iter_lines(), deadline, f"reply {reply_id} ended"):
                    _add(stream, event)
                    if stream.terminal or (until and until(stream)):
                        break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server went away mid-stream
        return stream


def _add(stream: Stream, event: dict) -> None:
    stream.ids.append(event["id"])
    stream.last_id = event["id"]
    if event["event"] == "token":
        stream.tokens.append(event["data"]["t"])
    elif event["event"] in ("done", "error"):
        stream.terminal = event


def _events(lines, deadline: float, what: str):
    """SSE events; heartbeat comments only move the clock on."""
    event: dict = {}
    for line in lines:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if not line:
            if "data" in event:
                yield {"id": int(event.get("id", 0)), "event": event.get("event", "message"),
                       "data": json.loads(event["data"])}
            event = {}
        elif not line.startswith(":") and ":" in line:
            key, value = line.split(":", 1)
            event[key] = value.strip() if key != "data" else value[1:] if value.startswith(" ") else value


def assert_invariants(user: User, serve: Serve, conversation_id: str, *, typed: str, timeout_s: float = 120) -> dict:
    """After a fault: the user's message is kept, the reply ends in a terminal
    status, no KV block is held, and the next chat works. Returns the reply."""
    def ended():
        messages = user.export(conversation_id)["messages"]
        replies = [m for m in messages if m["role"] == "assistant"]
        return replies[-1] if replies and replies[-1]["status"] in TERMINAL else None

    reply = wait_for(ended, timeout_s=timeout_s, what="the reply to end")
    assert [m["content"] for m in user.export(conversation_id)["messages"] if m["role"] == "user"] == [typed]
    next_chat, next_reply = user.new_chat("Say hello.")
    stream = user.read(next_reply)
    assert stream.terminal and stream.terminal["data"]["status"] == "complete", stream
    assert user.message(next_chat, next_reply)["content"] == stream.text
    wait_for(lambda: kv_blocks_used(serve) == 0, timeout_s=60, what="KV blocks to return to zero")
    return reply


def kv_blocks_used(serve: Serve) -> int:
    pools = serve.health()["model_pools"]
    return sum(p.get("stats", {}).get("kv_blocks_used", 0) for p in pools.values())
