"""Load test: simulated people and API clients against a real `serve`, for minutes.

    .venv/bin/python -m bench.load [--users 12] [--api-clients 4] [--duration 600] [--write]

On a fresh DATA_DIR (its own embedded Postgres and Redis) it starts `manage.py
serve` with the bundled model (as bench.chat does), then runs until
--duration:

- each simulated person sends a chat, reads its SSE stream and, by chance,
  reads it to the end (60%), reloads mid-reply and resumes with
  Last-Event-ID (20%: the resumed text must continue exactly where it
  stopped, nothing lost or doubled), or presses Stop (20%); then thinks for
  1-5 s and goes on in the same chat or starts a new one;
- each API client streams /v1/chat/completions with its own key, and thinks.

It counts every error that is not a 429, samples the server's memory (RSS
of serve and its children) every 5 s, and prints p50/p99 TTFT and
inter-token latency, requests by outcome, and memory growth after warm-up
(the first fifth of the run). Exits non-zero on an error that is not a 429
or memory growth over 5%. --write puts the table in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench import chat, free_port, report
from bench.report import percentile

RSS_GROWTH_LIMIT = 0.05


@dataclass
class Tally:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def error(self, what: str) -> None:
        self.count("error")
        self.errors.append(what)


# ------------------------------------------------------------ a person in the chat pages

async def _read_stream(client, url: str, tally: Tally, *, after: int = 0, stop_after: int | None = None,
                       t0: float | None = None) -> tuple[str, int, str | None]:
    """Tokens of one SSE response: (text, last event id, terminal status or None
    when we hung up after `stop_after` tokens)."""
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(after)} if after else {})}
    text, last_id, event, seen, last_at = [], after, None, 0, None
    async with client.stream("GET", url, headers=headers) as stream:
        if stream.status_code != 200:
            raise RuntimeError(f"GET {url}: {stream.status_code}")
        async for line in stream.aiter_lines():
            if line.startswith("id:"):
                last_id = int(line[3:])
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "token":
                now = time.perf_counter()
                if t0 is not None and last_at is None and not after:
                    tally.ttft_s.append(now - t0)
                elif last_at is not None:
                    tally.itl_s.append(now - last_at)
                last_at = now
                text.append(json.loads(line[5:])["t"])
                seen += 1
                if stop_after is not None and seen >= stop_after:
                    return "".join(text), last_id, None
            elif line.startswith("data:") and event in ("done", "error"):
                return "".join(text), last_id, json.loads(line[5:]).get("status")
    return "".join(text), last_id, "cut"


async def _send(client, headers: dict, conversation: str | None, text: str) -> tuple[str, str, str]:
    """POST a message as htmx does; (conversation id, reply id, stream url)."""
    path = f"/c/{conversation}/send" if conversation else "/c/new"
    response = await client.post(path, data={"text": text}, headers=headers)
    if response.status_code == 429:
        raise PermissionError("429")
    if response.status_code != 200:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:120]}")
    url = re.search(r'data-stream="([^"]+)"', response.text).group(1)
    reply = re.search(r"/c/reply/([0-9a-f-]+)/stream", url).group(1)
    conversation = conversation or re.search(r"/c/([0-9a-f-]{36})/", response.headers.get("HX-Push-Url", "")).group(1)
    return conversation, reply, url


async def _turn(client, headers: dict, conversation: str | None, tally: Tally, rng: random.Random) -> str | None:
    t0 = time.perf_counter()
    conversation, reply, url = await _send(client, headers, conversation, f"Tell me about {rng.choice(chat.TOPICS)}.")
    action = rng.choices(["read", "reload", "stop"], weights=[60, 20, 20])[0]
    if action == "read":
        _, _, status = await _read_stream(client, url, tally, t0=t0)
    elif action == "reload":
        first, after, status = await _read_stream(client, url, tally, stop_after=rng.randint(1, 8), t0=t0)
        if status is None:  # hung up mid-reply: resume where the page left off
            rest, _, status = await _read_stream(client, url, tally, after=after)
            stored = await client.get(f"/c/{conversation}/export.json")
            final = stored.json()["messages"][-1]["content"] if stored.status_code == 200 else None
            if final is not None and not final.startswith(first + rest[: max(0, len(final) - len(first))]):
                tally.error(f"resume lost or doubled text in {reply}")
    else:
        _, _, status = await _read_stream(client, url, tally, stop_after=rng.randint(1, 6), t0=t0)
        if status is None:
            stop = await client.post(f"/m/{reply}/stop", headers=headers)
            status = "stopped" if stop.status_code in (200, 204) else f"stop answered {stop.status_code}"
    tally.count(f"chat {action}: {status}")
    if status not in ("complete", "stopped"):
        tally.error(f"reply {reply} ended {status}")
    return conversation if rng.random() < 0.7 else None


async def person(base: str, cookie: str, deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    client, headers = await chat._signed_in_client(base, cookie)
    conversation = None
    try:
        while time.monotonic() < deadline:
            try:
                conversation = await _turn(client, headers, conversation, tally, rng)
            except PermissionError:
                tally.count("429")
            except Exception as exc:  # every failure is counted, none stops the run
                tally.error(f"chat: {type(exc).__name__}: {exc}")
                conversation = None
            await asyncio.sleep(rng.uniform(1, 5))
    finally:
        await client.aclose()


# ------------------------------------------------------------ an API client

async def api_client(base: str, key: str, deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < deadline:
            body = {"model": "small", "stream": True, "max_tokens": rng.randint(16, 96),
                    "messages": [{"role": "user", "content": f"Explain {rng.choice(chat.TOPICS)} briefly."}]}
            t0, last, finish = time.perf_counter(), None, None
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code == 429:
                        tally.count("429")
                    elif response.status_code != 200:
                        tally.error(f"api: {response.status_code}")
                    else:
                        async for line in response.aiter_lines():
                            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                                continue
                            chunk = json.loads(line[5:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"]["message"])
                            choice = chunk["choices"][0]
                            if choice["delta"].get("content"):
                                now = time.perf_counter()
                                (tally.ttft_s if last is None else tally.itl_s).append(now - (last or t0))
                                last = now
                            finish = choice["finish_reason"] or finish
                        tally.count(f"api: {finish}")
            except Exception as exc:
                tally.error(f"api: {type(exc).__name__}: {exc}")
            await asyncio.sleep(rng.uniform(0.5, 3))


# ------------------------------------------------------------ the run

async def sample_memory(pid: int, started: float, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        try:
            root = psutil.Process(pid)
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            tally.rss_mb.append((time.monotonic() - started, rss / 2**20))
        except psutil.Error:
            pass
        await asyncio.sleep(5)


async def run(args, base: str, cookies: list[str], keys: list[str], server_pid: int) -> Tally:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.duration
    await asyncio.gather(
        sample_memory(server_pid, started, deadline, tally),
        *(person(base, cookie, deadline, tally, seed) for seed, cookie in enumerate(cookies)),
        *(api_client(base, key, deadline, tally, 1000 + seed) for seed, key in enumerate(keys)),
    )
    return tally


def memory_growth(tally: Tally, warmup_s: float) -> tuple[float, float, float]:
    """(RSS after warm-up, RSS at the end, growth) in MiB and as a fraction."""
    after = [mb for at, mb in tally.rss_mb if at >= warmup_s] or [mb for _, mb in tally.rss_mb]
    # The median of the first and last minute: one sample catches a transient.
    first = sorted(after[:12])[len(after[:12]) // 2]
    last = sorted(after[-12:])[len(after[-12:]) // 2]
    return first, last, (last - first) / first


def render(args, tally: Tally, machine: dict) -> str:
    first, last, growth = memory_growth(tally, args.duration / 5)
    ms = 1000
    rows = [
        ("TTFT p50 / p99", f"{percentile(tally.ttft_s, 0.5) * ms:.0f} / {percentile(tally.ttft_s, 0.99) * ms:.0f} ms"),
        ("inter-token latency p50 / p99", f"{percentile(tally.itl_s, 0.5) * ms:.0f} / {percentile(tally.itl_s, 0.99) * ms:.0f} ms"),
        ("replies and API requests", str(sum(n for k, n in tally.outcomes.items() if k not in ("429", "error")))),
        ("429 answers", str(tally.outcomes.get("429", 0))),
        ("errors that are not 429", str(len(tally.errors))),
        ("server RSS after warm-up → end", f"{first:.0f} → {last:.0f} MiB ({growth:+.1%})"),
    ]
    outcomes = [(k, str(n)) for k, n in sorted(tally.outcomes.items())]
    return "\n".join([
        report.machine_header(machine), "",
        f"{args.users} people in the chat pages and {args.api_clients} API clients for {args.duration} s "
        f"(bundled SmolLM2, {args.max_tokens}-token replies at most).", "",
        report.table(["measure", "value"], rows), "",
        report.table(["outcome", "count"], outcomes), "",
        *(f"- {error}" for error in tally.errors[:20]),
    ])


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--api-clients", type=int, default=4)
    parser.add_argument("--duration", type=int, default=600, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.clients = args.users + args.api_clients  # what bench.chat.start_server sizes the engine for
    return args


def _api_keys(n: int) -> list[str]:
    from django.contrib.auth import get_user_model

    from gateway.keys import api_key_create

    User = get_user_model()
    return [api_key_create(user=User.objects.create_user(f"api{i}", password="bench-pass-12345"), name="load")[1]
            for i in range(n)]


def main(argv=None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parse_args(argv)
    machine = report.machine_info()
    data_dir = Path(tempfile.mkdtemp(prefix="loadbench-"))
    chat.setup_django(data_dir)
    port = free_port()
    print(f"starting the server on :{port} (data in {data_dir}) ...", flush=True)
    server = chat.start_server(port, args)
    try:
        cookies, _, _ = chat.make_users(args.users, 0)
        keys = _api_keys(args.api_clients)
        from django.db import connections  # after setup_django()

        connections.close_all()
        tally = asyncio.run(run(args, f"http://127.0.0.1:{port}", cookies, keys, server.pid))
    finally:
        chat.stop_server(server, data_dir)
    body = render(args, tally, machine)
    print(body)
    if args.write:
        heading = "## Load (bench.load)"
        report.write_section(f"{heading}\n\nCommand: `{report.command_line('bench.load', argv)}`\n\n{body}\n", heading)
    _, _, growth = memory_growth(tally, args.duration / 5)
    return 1 if tally.errors or growth > RSS_GROWTH_LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())
