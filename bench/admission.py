"""Where a /v1 request's time to first token goes, stage by stage, when many
arrive at once (issue 16, item 3: the relay's admission).

    python -m bench.admission [--streams 32] [--rounds 3] [--rules-only] [--hosted] [--no-write]

In one process, without Daphne or a network client: `bench.sse_stub` is the
remote backend (as in bench.relay), the product's ASGI application is called
directly with --streams requests at once, and each admission stage of the
gateway (rate limits, key lookup, routing and quota, moderation of the
prompt, opening the backend, quota headers) is timed by wrapping it. Per
stage: when it started and ended, p50 over the burst, in ms from the send;
and the TTFT p50 of each round. What Daphne, the client's parsing and the
other processes on the cores add is bench.relay's to show.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import relay, report
from bench.report import percentile

SECTION = "## Relay admission, stage by stage (bench.admission)"
# (module attribute, label), in the order a request meets them.
STAGES = (
    ("gateway.api:_authorize", "rate limits and API key"),
    ("gateway.services:_plan", "route, lease and quota"),
    ("gateway.services:amoderate_messages", "moderation of the prompt"),
    ("gateway.services:_open", "open the backend, first chunk"),
    ("gateway.api:_quota_headers", "quota headers"),
)


def _timed(marks: dict, label: str, started: list[float], fn):
    async def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            marks[label].append((t - started[0], time.perf_counter() - started[0]))
    return wrapper


async def _one(application, key: str, i: int, tokens: int) -> float | None:
    """TTFT (s) of one streamed /v1 request through the ASGI application."""
    body = json.dumps({"model": "stub", "messages": [{"role": "user", "content": relay.prompt(i)}],
                       "max_tokens": tokens, "temperature": 0.7, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000 + i % 20000),
             "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]}
    started, sent, done, first = time.perf_counter(), False, asyncio.Event(), None

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal first
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"/v1 answered {message['status']}")
        if message["type"] == "http.response.body":
            if first is None and b'"content": "' in message.get("body", b"") \
                    and b'"content": ""' not in message["body"]:
                first = time.perf_counter() - started
            if not message.get("more_body"):
                done.set()

    await application(scope, receive, send)
    return first


async def measure(args, keys: list[str]) -> tuple[dict, list[float]]:
    """({stage: [(start, end) s]}, [TTFT p50 s per round]) over the measured rounds."""
    from importlib import import_module

    from chatapp.asgi import application

    marks: dict = defaultdict(list)
    started = [0.0]
    for path, label in STAGES:
        module, name = path.split(":")
        module = import_module(module)
        setattr(module, name, _timed(marks, label, started, getattr(module, name)))
    p50s, index = [], 0
    for round_ in range(args.rounds + 1):  # round 0 loads the moderation models and warms the pools
        if round_ == 1:
            marks.clear()
        started[0] = time.perf_counter()
        ttfts = await asyncio.gather(*(_one(application, keys[k], index + k, args.tokens)
                                       for k in range(args.streams)))
        index += args.streams
        if round_:
            p50s.append(percentile([t for t in ttfts if t is not None], 0.5))
        print(f"round {round_}: TTFT p50 {1000 * percentile([t for t in ttfts if t], 0.5):.0f} ms", flush=True)
    from chatapp import runtime

    await runtime.http().close()  # before asyncio.run closes the loop: no "unclosed connector" at exit
    return marks, p50s


def render(marks: dict, p50s: list[float], args) -> str:
    rows = []
    for _, label in STAGES:
        spans = marks.get(label, [])
        if spans:
            rows.append((label, len(spans), f"{1000 * percentile([s for s, _ in spans], 0.5):.1f}",
                         f"{1000 * percentile([e for _, e in spans], 0.5):.1f}",
                         f"{1000 * percentile([e - s for s, e in spans], 0.5):.1f}"))
    table = report.table(["stage", "calls", "starts at p50 ms", "ends at p50 ms", "lasts p50 ms"], rows)
    rounds = ", ".join(f"{1000 * p:.0f}" for p in p50s)
    return f"{table}\n\nTTFT p50 of each measured round ({args.streams} at once): {rounds} ms."


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32, help="requests sent at once")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--rules-only", action="store_true", help="moderate with the rules checker alone")
    parser.add_argument("--hosted", action="store_true",
                        help="the stub as a hosted provider: opened only once the prompt passed moderation")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    machine = report.machine_info()
    stub, stub_port = relay.start_stub(10.0)
    os.environ["GATEWAY_BACKENDS_JSON"] = relay.backends_json(stub_port, self_hosted=not args.hosted)
    os.environ["GATEWAY_EXACT_CACHE"] = os.environ["GATEWAY_SEMANTIC_CACHE"] = "0"
    if args.rules_only:
        os.environ["SAFETY_CHECKERS"] = relay.RULES_ONLY
    data_dir = Path(tempfile.mkdtemp(prefix="admissionbench-"))
    try:
        relay.setup_django(data_dir)
        keys = relay.make_keys(args.streams)
        marks, p50s = asyncio.run(measure(args, keys))
    finally:
        stub.kill()
        from chatapp import embedded  # after setup_django()

        embedded.stop_configured()
        shutil.rmtree(data_dir, ignore_errors=True)
    body = render(marks, p50s, args)
    print(body)
    if not args.no_write:
        moderation = "the rules checker alone" if args.rules_only else "the default checkers (rules, cascade head)"
        opening = ("a hosted provider, opened once the prompt passed" if args.hosted
                   else "self-hosted, opened beside the prompt's moderation")
        section = (f"{SECTION}\n\n{report.provenance('bench.admission', argv, machine)}\n\n"
                   f"{args.streams} streamed /v1 requests at once, called on the product's ASGI application in one "
                   f"process (no Daphne, no network client), against `bench.sse_stub` ({opening}); moderation by "
                   f"{moderation}. Times are from the send; stages overlap (moderation runs beside routing and "
                   f"the quota, and the first token waits for it).\n\n{body}\n")
        report.write_section(section, SECTION)
        print(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
