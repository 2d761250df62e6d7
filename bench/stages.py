"""A new chat's path through the server, stage by stage, from the POST's send.

    .venv/bin/python -m bench.stages [--clients 32] [--stagger-ms 250] [--max-tokens 128] [--write]

Starts `manage.py serve` as bench.chat does (its own embedded Postgres and
Redis, greedy, caches off, quotas unlimited), with bench.stage_stamps
installed in it, then sends the chat page's POSTs (htmx's `/c/new`) and reads
each reply's SSE stream to its end: N chats one every --stagger-ms (0: all at
once), after a warm-up of as many other chats. Every stage is the p50/p90 of its
wall-clock time after the client sent the POST. What each stage is:

- django: the request reaches Django's ASGI handler (Daphne has parsed it);
- sync block: Django's synchronous middleware (chatapp.apps) has the request
  on its thread, one hop from the event loop;
- session, user: the session (Redis) and the user's row (Postgres) are loaded;
- view: the view starts (middleware done, back on the event loop);
- rate limit: the chat's request counters answered;
- saving / inserted / saved: the turn's rows (one statement) and then its
  model request (the context's reads), on a database thread;
- gateway: the reply's task hands the request to the gateway;
- engine: the gateway submits it to the engine (admission done);
- prefill starts, prefill ends: the engine's first step with the request (its
  prompt's forward, or the first chunk of it), from before to after the forward;
- first token: the engine thread delivers the first token;
- in the log: the reply's log (Redis) holds it;
- POST answered, stream opened: the client has the POST's answer; the SSE GET reached the server;
- token written: the SSE consumer wrote the first token;
- token read: the client read it (TTFT as bench.chat counts it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from bench import chat, free_port, report
from bench.report import ROOT, percentile

SECTION = "## A new chat's path, stage by stage (bench.stages)"
STAGES = ["django", "sync block", "session", "user", "view", "rate limit", "saving", "inserted", "saved", "gateway",
          "engine", "prefill starts", "prefill ends", "first token", "in the log",
          "POST answered", "stream opened", "token written", "token read"]


async def _turn(client, headers, text: str, delay_s: float) -> dict:
    await asyncio.sleep(delay_s)
    sent = time.time()
    response = await client.post("/c/new", data={"text": text}, headers=headers)
    answered = time.time()
    url = re.search(r'data-stream="([^"]+)"', response.text).group(1)
    first, event = None, None
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token" and first is None:
                    first = time.time()
                elif event in ("done", "error"):
                    break
    return {"reply": url.rstrip("/").split("/")[-2], "sent": sent, "POST answered": answered, "token read": first}


async def _run(base: str, cookies: list[str], texts: list[str], stagger_s: float) -> list[dict]:
    prepared = await asyncio.gather(*(chat._signed_in_client(base, c) for c in cookies[: len(texts)]))
    try:
        return await asyncio.gather(*(_turn(client, headers, text, i * stagger_s)
                                      for i, ((client, headers), text) in enumerate(zip(prepared, texts))))
    finally:
        await asyncio.gather(*(client.aclose() for client, _ in prepared))


def stage_times(turns: list[dict], stamps_file: Path) -> dict[str, list[float]]:
    """stage → ms after each chat's POST was sent (chats whose stage was stamped)."""
    by_key: dict[str, dict[str, float]] = {}
    reply_of: dict[str, str] = {}
    for line in stamps_file.read_text().splitlines():
        at, stage, key = json.loads(line)
        if stage.startswith("request:"):
            reply_of[stage.removeprefix("request:")] = key
        else:
            by_key.setdefault(key, {}).setdefault(stage, at)
    for request_id, reply_id in reply_of.items():  # the engine's stamps are keyed by request id
        for stage, at in by_key.get(request_id, {}).items():
            by_key.setdefault(reply_id, {}).setdefault(stage, at)
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for turn in turns:
        stamps = {**by_key.get(turn["reply"], {}), "POST answered": turn["POST answered"], "token read": turn["token read"]}
        for stage in STAGES:
            if stamps.get(stage) is not None:
                times[stage].append(1000 * (stamps[stage] - turn["sent"]))
    return times


def render(args, times: dict[str, list[float]], machine: dict) -> str:
    how = f"{args.clients} chats at once" if not args.stagger_ms else f"{args.clients} chats, one every {args.stagger_ms} ms"
    rows = [(stage, len(v), f"{percentile(v, 0.5):.1f}", f"{percentile(v, 0.9):.1f}") for stage, v in times.items()]
    return "\n\n".join([
        f"{how}, SmolLM2-135M-Instruct in the server's engine (default settings), greedy, max {args.max_tokens} "
        f"tokens; client and server share the machine. {report.machine_header(machine)}",
        report.table(["stage", "chats", "ms after the POST was sent, p50", "p90"], rows),
    ])


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--stagger-ms", type=int, default=250, help="one chat every N ms (0: all at once)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv=None):
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parse_args(argv)
    machine = report.machine_info()
    data_dir = Path(tempfile.mkdtemp(prefix="stagesbench-"))
    chat.setup_django(data_dir)
    probe_dir = data_dir / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text("import bench.stage_stamps\n\nbench.stage_stamps.install()\n")
    stamps_file = data_dir / "stamps.jsonl"
    # Read by bench.stage_stamps in the server's process, which inherits this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(probe_dir), str(ROOT)])
    os.environ["BENCH_STAGES_OUT"] = str(stamps_file)
    port = free_port()
    server = chat.start_server(port, args)
    try:
        cookies, _, _ = chat.make_users(args.clients, 0)
        from django.db import connections  # after setup_django()

        connections.close_all()
        base, stagger_s = f"http://127.0.0.1:{port}", args.stagger_ms / 1000
        # Each run's chats are new text to the server (bench.chat's prompts, another take), as real ones are.
        asyncio.run(_run(base, cookies, chat.prompts(args.clients, take=0), stagger_s))  # warm-up
        stamps_file.unlink(missing_ok=True)
        turns = asyncio.run(_run(base, cookies, chat.prompts(args.clients, take=1), stagger_s))
        times = stage_times(turns, stamps_file)
    finally:
        chat.stop_server(server, data_dir)
    body = render(args, times, machine)
    print(body)
    if args.write:
        report.write_section(f"{SECTION}\n\nCommand: `{report.command_line('bench.stages', argv)}`.\n\n{body}\n", SECTION)


if __name__ == "__main__":
    main()
