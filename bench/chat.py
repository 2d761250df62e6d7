"""End-to-end chat streaming benchmark: browsers' path vs the engine alone.

    .venv/bin/python -m bench.chat [--clients 32] [--idle 500] [--max-tokens 128] [--rounds 4] [--write]

What it does, on a fresh DATA_DIR (its own embedded Postgres and Redis):
1. starts `manage.py serve --no-worker` (Daphne with SmolLM2 in-process), with
   the gateway's caches off (a cache hit would not measure generation) and
   its quotas unlimited (one user per client);
2. engine alone: the same prompts, submitted concurrently to an identical
   engine in this process: output tok/s and TTFT (submit → first token);
3. web path: N clients each POST a new chat as htmx does (`/c/new`, which
   answers with the chat's main pane), open its SSE stream and read it to the terminal event:
   delivered tok/s (completion tokens of every reply / wall time) and TTFT
   (POST → first token event in the client);
4. the same with M idle SSE connections held open on replies that never
   progress (pending placeholders), to see what idle streams cost.
With --rounds N, steps 2 and 3 (and the staggered runs) go by turns, N
rounds with the order swapped every round, and the targets take the
medians of the rounds' ratios: this VM's speed moves between minutes by
more than the margins the targets ask about.
Every run sends prompts of its own (`prompts`' take), as a burst of new
chats does: the server has never seen their text, nor its replies, so
moderation reads every reply from scratch, as it must for real ones (a
repeated text would be answered from the verdict cache and from retrieval's
cache of vectors, which the six-layer head reads), and both engines prefill
all but the chat template's shared start. Within a round the engine alone and
the web path get the same prompts. Every measured run is preceded by a
warm-up of the same shape. Greedy decoding: same prompts, same outputs, same
load. Prints a table; --write puts it in docs/BENCHMARKS.md (replacing only
this script's own section).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench import free_port, http_body_parts, report, shared_services_env, wait_healthy
from bench.report import ROOT, percentile
from inference import Engine, SamplingParams
from inference.bootstrap import resolve_model

# Django and the apps' modules (chatapp.runtime too: importing it reads the
# settings) are imported inside the functions: they need DATA_DIR set and
# django.setup(), which main() runs first on a fresh DATA_DIR. Imported at the
# top, they configured the settings on the developer's own var/ first, so the
# benchmark's users collided with the last run's.

SECTION = "## Chat streaming (bench.chat)"
TOPICS = ["a lighthouse keeper", "a lost robot", "a bakery on Mars", "a dragon who fears heights",
          "a chess tournament", "a river that talks", "a broken clock", "a secret garden"]


def prompts(n: int, take: int = 0) -> list[str]:
    """n new chats' messages; another `take` gives texts no earlier take has."""
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i + 1}, take {take})." for i in range(n)]


# ------------------------------------------------------------ set-up

def setup_django(data_dir: Path):
    os.environ["DATA_DIR"] = str(data_dir)
    os.environ.setdefault("MODELS_DIR", str(ROOT / "var" / "models"))
    # The native kernels' library, built once for this checkout (13-15 s a build).
    os.environ.setdefault("ENGINE_KERNEL_DIR", str(ROOT / "var" / "kernels"))
    os.environ["LOAD_MODELS"] = "0"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    import django

    django.setup()
    from django.conf import settings

    from chatapp import embedded

    embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
    embedded.postgres_server(Path(settings.DATABASES["default"]["EMBEDDED_PGDATA"]))
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def stop_server(server: subprocess.Popen, data_dir: Path) -> None:
    """The server, then the embedded services it used, whatever happened."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    _stop_services(data_dir)


def _stop_services(data_dir: Path) -> None:
    """The embedded Redis (and Postgres) would otherwise outlive the benchmark."""
    from chatapp import embedded

    embedded.stop_configured()
    shutil.rmtree(data_dir, ignore_errors=True)


def make_users(n: int, idle: int):
    """Users with logged-in session cookies, and `idle` pending replies."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from conversations import services

    cookies = []
    User = get_user_model()
    for i in range(n + 1):
        user = User.objects.create_user(f"bench{i}", password="bench-pass-12345")
        client = Client()
        client.force_login(user)
        cookies.append(client.cookies["sessionid"].value)
    idle_user = User.objects.get(username=f"bench{n}")
    idle_replies = []
    for i in range(idle):
        conversation = services.conversation_create(user=idle_user)
        idle_replies.append(str(services.message_send(conversation=conversation, text=f"idle {i}").id))
    return cookies[:n], cookies[n], idle_replies


def start_server(port: int, args, extra_env: dict | None = None) -> subprocess.Popen:
    """`manage.py serve` on this DATA_DIR's database and Redis, waited for until healthy.
    Over 40 lines only for the environment it is given, one setting a line."""
    from django.conf import settings

    env = {
        **os.environ,
        **shared_services_env("server"),
        "LOAD_MODELS": "1",
        "CHAT_TEMPERATURE": "0",
        "CHAT_REPLY_MAX_TOKENS": str(args.max_tokens),
        "STREAM_GRACE_S": "600",
        "GATEWAY_EXACT_CACHE": "0",
        "GATEWAY_SEMANTIC_CACHE": "0",
        "GATEWAY_DEFAULT_RPM": "0",
        "GATEWAY_DEFAULT_TPM": "0",
        "GATEWAY_DEFAULT_TPD": "0",
        "GATEWAY_DEFAULT_TPMONTH": "0",
        "ENGINE_MAX_NUM_SEQS": str(max(32, args.clients)),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    log = open(Path(settings.DATA_DIR) / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--no-worker", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    wait_healthy(proc, port, log.name)
    return proc


# ------------------------------------------------------------ engine alone

def _steps_between(before: dict | None, after: dict | None) -> dict:
    """The engine's steps and busy seconds between two `Engine.stats()`: a run
    that took longer in more steps filled its batches worse (chats arriving
    spread out), one that took longer in as many steps ran slower steps."""
    if not before or not after:
        return {}
    return {"steps": after["steps"] - before["steps"], "busy_s": after["busy_s"] - before["busy_s"]}


async def _server_engine_stats(client: httpx.AsyncClient) -> dict | None:
    """The server's first running pool's `Engine.stats()`, from /healthz (a loopback caller sees them)."""
    try:
        pools = (await client.get("/healthz")).json().get("model_pools", {})
    except (httpx.HTTPError, ValueError):
        return None
    return next((pool["stats"] for pool in pools.values() if "stats" in pool), None)


async def engine_run(engine, texts: list[str], max_tokens: int, stagger_s: float = 0.0) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    before = engine.stats()

    async def one(i, text):
        await asyncio.sleep(i * stagger_s)
        ids = engine.apply_chat_template([{"role": "user", "content": text}])
        t0 = time.perf_counter()
        handle = engine.submit(ids, params)
        first = None
        tokens = 0
        async for event in handle:
            if event.finished:
                tokens = event.usage.completion_tokens
                break
            if first is None and (event.text or event.token_ids):
                first = time.perf_counter() - t0
        return first, tokens

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    wall = time.perf_counter() - t0
    return {**_summary(results, wall), **_steps_between(before, engine.stats())}


def _summary(results, wall) -> dict:
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    # Web turns also time the POST alone: how long the page work held each chat back.
    posts = [r[2] for r in results if len(r) > 2]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
            "ttft_p99_ms": 1000 * percentile(ttfts, 0.99), "n": len(results),
            "post_p50_ms": 1000 * percentile(posts, 0.5) if posts else None}


def _merge(runs: list[dict]) -> dict:
    """Sequential single-chat runs as one row (TTFT percentiles over the runs)."""
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    ttfts = [r["ttft_p50_ms"] for r in runs]
    posts = [r["post_p50_ms"] for r in runs if r.get("post_p50_ms") is not None]
    cpu = [r["client_cpu_s"] for r in runs if "client_cpu_s" in r]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50_ms": percentile(ttfts, 0.5),
            "ttft_p99_ms": percentile(ttfts, 0.99), "n": len(runs), "post_p50_ms": percentile(posts, 0.5) if posts else None,
            **({"client_cpu_s": sum(cpu)} if cpu else {})}


# ------------------------------------------------------------ web path

async def _signed_in_client(base: str, cookie: str):
    """A client that has loaded the home page: session cookie and CSRF token in hand."""
    client = httpx.AsyncClient(base_url=base, cookies={"sessionid": cookie}, timeout=600)
    home = await client.get("/")
    token = home.cookies.get("csrftoken") or client.cookies.get("csrftoken")
    return client, {"X-CSRFToken": token, "HX-Request": "true"}


async def web_turn(client, headers: dict, text: str, delay_s: float = 0.0) -> tuple[float | None, int, float]:
    await asyncio.sleep(delay_s)
    t0 = time.perf_counter()
    response = await client.post("/c/new", data={"text": text}, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"POST /c/new: {response.status_code} {response.text[:200]}")
    post_s = time.perf_counter() - t0
    # The answer is the new chat's main pane, with its live reply's stream URL.
    match = re.search(r'data-stream="([^"]+)"', response.text)
    if match is None:
        raise RuntimeError("the new chat has no live stream")
    first, tokens = await read_reply(str(client.base_url), client.cookies["sessionid"], match.group(1), t0)
    return first, tokens, post_s


async def read_reply(base: str, session: str, path: str, t0: float) -> tuple[float | None, int]:
    """(seconds from t0 to the first token event, the reply's completion tokens)
    of a reply's SSE stream, read on a plain socket. The clients share the
    cores with the server they measure: through httpx's line iterator they
    burned about 100 µs a token there (bench.relay's client reads the same way)."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n"
                     f"Cookie: sessionid={session}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            status = head.partition(b"\r\n")[0].decode()
            raise RuntimeError(f"GET {path}: {status}")
        first, buffer = None, b""
        async for part in http_body_parts(reader, b"chunked" in head.lower()):
            *events, buffer = (buffer + part).split(b"\n\n")
            for event in events:  # "id: N\nevent: NAME\ndata: JSON"; a heartbeat is a comment line
                at = event.find(b"event: ")
                name = event[at + 7:event.find(b"\n", at)] if at >= 0 else b""
                if name == b"token":
                    if first is None:
                        first = time.perf_counter() - t0
                elif name in (b"done", b"error"):
                    data = json.loads(event[event.index(b"data:") + 5:])
                    if name == b"error":
                        raise RuntimeError(f"reply failed: {data.get('error')}")
                    return first, (data.get("usage") or {}).get("completion_tokens", 0)
        raise RuntimeError(f"GET {path}: the stream ended without its done event")
    finally:
        writer.close()


async def web_run(base: str, cookies: list[str], texts: list[str], stagger_s: float = 0.0) -> dict:
    # Every client has its page open before the clock starts, as people have the
    # chat page loaded before they press Send: the burst is the sends, not 32
    # page loads (nor the client library's own set-up) competing with them.
    prepared = await asyncio.gather(*(_signed_in_client(base, c) for c in cookies[: len(texts)]))
    before = await _server_engine_stats(prepared[0][0])
    try:
        t0 = time.perf_counter()
        # The clients share the machine with the server: what they burn is not the web path's.
        cpu0 = time.process_time()
        results = await asyncio.gather(*(web_turn(client, headers, t, i * stagger_s)
                                         for i, ((client, headers), t) in enumerate(zip(prepared, texts))))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        steps = _steps_between(before, await _server_engine_stats(prepared[0][0]))
    finally:
        await asyncio.gather(*(client.aclose() for client, _ in prepared))
    return {**_summary(results, wall), "client_cpu_s": cpu, **steps}


async def hold_idle(base: str, cookie: str, reply_ids: list[str], ready: asyncio.Event, stop: asyncio.Event):
    limits = httpx.Limits(max_connections=len(reply_ids) + 10, max_keepalive_connections=0)
    connected = 0
    async with httpx.AsyncClient(base_url=base, cookies={"sessionid": cookie}, timeout=None, limits=limits) as client:
        async def one(reply_id):
            nonlocal connected
            async with client.stream("GET", f"/c/reply/{reply_id}/stream") as stream:
                lines = stream.aiter_lines()
                await lines.__anext__()  # "retry:": the stream is open
                connected += 1
                if connected == len(reply_ids):
                    ready.set()
                async for _ in lines:  # heartbeats
                    if stop.is_set():
                        break

        tasks = [asyncio.create_task(one(r)) for r in reply_ids]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------ main

async def run(args, base, cookies, idle_cookie, idle_replies, engine) -> dict:
    takes = itertools.count()

    def fresh(n: int = args.clients) -> list[str]:
        return prompts(n, next(takes))

    results = {}
    # One chat at a time first: the web path's own latency, with an idle engine.
    print(f"one chat at a time ({args.singles} chats) ...", flush=True)
    for text in fresh(args.singles):  # warm-up
        await engine_run(engine, [text], args.max_tokens)
        await web_run(base, cookies[:1], [text])
    engine_single, web_single = [], []
    for text in fresh(args.singles):
        engine_single.append(await engine_run(engine, [text], args.max_tokens))
        web_single.append(await web_run(base, cookies[:1], [text]))
    results["engine_1"] = _merge(engine_single)
    results["web_1"] = _merge(web_single)
    print("engine alone and web path: warm-up ...", flush=True)
    texts = fresh()
    await engine_run(engine, texts, args.max_tokens)
    await web_run(base, cookies, texts)
    print(f"{args.clients} at once, {args.rounds} round(s) ...", flush=True)
    results["burst_rounds"] = await _alternate(args.rounds, fresh,
                                               lambda texts: engine_run(engine, texts, args.max_tokens),
                                               lambda texts: web_run(base, cookies, texts))
    results["engine"], results["web"] = results["burst_rounds"][0]["engine"], results["burst_rounds"][0]["web"]
    if args.stagger_ms:
        # New chats arriving one every stagger_ms, as people do: each POST
        # lands while the earlier chats stream, without 31 others queued beside it.
        stagger = args.stagger_ms / 1000
        print(f"staggered: one chat every {args.stagger_ms} ms, {args.rounds} round(s) ...", flush=True)
        results["stagger_rounds"] = await _alternate(
            args.rounds, fresh, lambda texts: engine_run(engine, texts, args.max_tokens, stagger),
            lambda texts: web_run(base, cookies, texts, stagger))
        results["engine_stagger"] = results["stagger_rounds"][0]["engine"]
        results["web_stagger"] = results["stagger_rounds"][0]["web"]
    if idle_replies:
        print(f"web path with {len(idle_replies)} idle SSE connections ...", flush=True)
        ready, stop = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold_idle(base, idle_cookie, idle_replies, ready, stop))
        await asyncio.wait_for(ready.wait(), 120)
        results["web_idle"] = await web_run(base, cookies, fresh())
        stop.set()
        await holder
    return results


async def _alternate(rounds: int, texts_fn, engine_fn, web_fn) -> list[dict]:
    """The engine alone and the web path by turns, the order swapped every
    round: this VM's speed moves by more than the targets' margins between
    minutes (the engine alone's 32-at-once row ran 285-436 tok/s in four runs
    within ten minutes), so each round's ratio compares two runs seconds apart.
    Each round's two runs send the same new prompts, `texts_fn()`."""
    out = []
    for r in range(rounds):
        texts = texts_fn()
        order = ("engine", "web") if r % 2 == 0 else ("web", "engine")
        result = {"first": order[0]}
        for kind in order:
            result[kind] = await (engine_fn(texts) if kind == "engine" else web_fn(texts))
        out.append(result)
    return out


def _ratio(r: dict) -> float:
    return r["web"]["tok_s"] / r["engine"]["tok_s"]


def _added(r: dict) -> float:
    return r["web"]["ttft_p50_ms"] - r["engine"]["ttft_p50_ms"]


def _steps_cell(run: dict) -> str:
    if not run.get("steps"):
        return "—"
    return f"{run['steps']}, {1000 * run['busy_s'] / run['steps']:.1f}"


def _round_rows(args, results: dict) -> str:
    """Each alternating round's web ÷ engine and TTFT added."""
    cells = []
    stagger = results.get("stagger_rounds") or []
    for i, burst in enumerate(results["burst_rounds"]):
        row = [i + 1, burst["first"], f"{burst['engine']['tok_s']:.1f}", f"{burst['web']['tok_s']:.1f}",
               f"{100 * _ratio(burst):.0f}%", _steps_cell(burst["engine"]), _steps_cell(burst["web"])]
        if stagger:
            s = stagger[i]
            row += [f"{s['engine']['ttft_p50_ms']:.0f}", f"{s['web']['ttft_p50_ms']:.0f}", f"{_added(s):+.0f}"]
        cells.append(row)
    head = ["round", "ran first", f"{args.clients} at once: engine alone tok/s", "web path tok/s", "web ÷ engine",
            "engine alone: steps, mean ms", "web path's engine: steps, mean ms"]
    if stagger:
        head += [f"one every {args.stagger_ms} ms: engine alone TTFT p50 ms", "web path TTFT p50 ms", "added ms"]
    return report.table(head, cells)


def _run_rows(args, results: dict) -> str:
    """The measured runs as one table."""
    rows = [("1 chat at a time: engine alone", results["engine_1"]), ("1 chat at a time: web path", results["web_1"]),
            (f"{args.clients} at once: engine alone", results["engine"]),
            (f"{args.clients} at once: web path (Daphne + SSE)", results["web"])]
    if "web_idle" in results:
        rows.append((f"{args.clients} at once: web path + {args.idle} idle SSE", results["web_idle"]))
    if "web_stagger" in results:
        rows += [(f"{args.clients} chats, one every {args.stagger_ms} ms: engine alone", results["engine_stagger"]),
                 (f"{args.clients} chats, one every {args.stagger_ms} ms: web path", results["web_stagger"])]
    cores = os.cpu_count() or 1
    cells = []
    for name, r in rows:
        post = "—" if r.get("post_p50_ms") is None else f"{r['post_p50_ms']:.0f}"
        cpu = (f"{r['client_cpu_s']:.1f} s ({100 * r['client_cpu_s'] / (cores * r['wall_s']):.0f}%)"
               if "client_cpu_s" in r else "—")
        cells.append((name, r["n"], r["tokens"], f"{r['wall_s']:.1f}", f"{r['tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f}",
                      f"{r['ttft_p99_ms']:.0f}", post, cpu))
    return report.table(["run", "replies", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                         "POST answered p50 ms", "clients' CPU (share of the cores)"], cells)


def render(args, results: dict, device: str, machine: dict) -> str:
    w = results["web"]
    lines = [f"SmolLM2-135M-Instruct, greedy, max {args.max_tokens} tokens, {device}. {report.machine_header(machine)}",
             "", _run_rows(args, results)]
    rounds = results["burst_rounds"]
    ratio = statistics.median(_ratio(r) for r in rounds)
    added = statistics.median(_added(r) for r in rounds)
    if len(rounds) > 1:
        lines += ["", f"The {len(rounds)} alternating rounds (the table above is round 1; the targets below take "
                      "the medians of the rounds):", "", _round_rows(args, results)]
    added_1 = results["web_1"]["ttft_p50_ms"] - results["engine_1"]["ttft_p50_ms"]
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| delivered tok/s ≥ 90% of the engine's ({args.clients} at once) | {100 * ratio:.0f}% | "
              f"{'yes' if ratio >= 0.9 else 'no'} |",
              f"| TTFT added by the web path ≤ 50 ms (p50), one chat at a time | {added_1:.0f} ms | "
              f"{'yes' if added_1 <= 50 else 'no'} |",
              f"| TTFT added by the web path ≤ 50 ms (p50), {args.clients} at once | {added:.0f} ms | "
              f"{'yes' if added <= 50 else 'no'} |"]
    if "web_idle" in results:
        slow = 1 - results["web_idle"]["tok_s"] / w["tok_s"]
        lines.append(f"| {args.idle} idle SSE connections slow active streams ≤ 10% | {100 * slow:.1f}% | "
                     f"{'yes' if slow <= 0.10 else 'no'} |")
    if "web_stagger" in results:
        added_s = statistics.median(_added(r) for r in results["stagger_rounds"])
        lines.append(f"| TTFT added by the web path ≤ 50 ms (p50), {args.clients} chats one every {args.stagger_ms} ms "
                     f"| {added_s:.0f} ms | {'yes' if added_s <= 50 else 'no'} |")
    return "\n".join(lines)


def write_section(body: str, command: str) -> None:
    section = (f"{SECTION}\n\nCommand: `{command}` (written {time.strftime('%Y-%m-%d')}).\n"
               "The web path is a client doing what the chat page does: POST the message (htmx; the answer is the new chat's main pane and sidebar entry), "
               "read the SSE stream to its terminal event; TTFT runs from the POST to the first token event. "
               "Every client has loaded the home page (session, CSRF token) before the clock starts, as a "
               "person has the chat open before pressing Send. "
               "The engine figures come from an identical engine in the benchmark's process given the same "
               "prompts at once. Gateway caches off, quotas unlimited, moderation as shipped; every run "
               "sends prompts the server has not seen (so it reads every reply, as it must for real ones), "
               "after a warm-up run of as many others. Client and server share the machine's two cores, and the engine shares its "
               "process with Daphne: every millisecond of web work (the POSTs' inserts and page renders, "
               "the per-token Redis append and SSE write) takes a core from the engine's two torch threads, "
               "which then wait for each other at every op. One chat at a time isolates the web path's own "
               "latency. `POST answered` is the time from the POST to its response. `clients' CPU` is "
               "what the benchmark's own process (the 32 HTTP clients, parsing every SSE event) burned "
               "during the run, out of the same cores: a browser would not take it from the server. In the "
               "burst, 32 new chats' page work shares the cores with the engine's prefill, so their first "
               "tokens wait for it. The staggered rows send 32 more new chats one every --stagger-ms (the engine "
               "alone on the same schedule): each POST lands while the earlier chats "
               "stream, as when people chat at the same time without clicking Send in the same instant. "
               "With --rounds, the engine alone and the web path run by turns, the order swapped every round, "
               "and the targets take the rounds' medians.\n\n" + body + "\n")
    report.write_section(section, SECTION)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--singles", type=int, default=8, help="chats measured one at a time")
    parser.add_argument("--stagger-ms", type=int, default=250,
                        help="also run the chats arriving one every N ms (0: skip)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating rounds of the engine alone and the web path (at once, and staggered)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    for name in ("rounds", "singles", "clients", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def local_engine(clients: int):
    """An engine configured as the server's "small" pool, for the engine-alone rows."""
    # Imported here: settings are read after setup_django() (main).
    from django.conf import settings

    spec = {**settings.ENGINE_DEFAULTS, **settings.MODEL_POOLS["small"], "max_num_seqs": max(32, clients)}
    from chatapp.runtime import engine_config

    return Engine.from_pretrained(resolve_model(spec["model"], settings.MODELS_DIR), engine_config(spec))


def main(argv=None):
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parse_args(argv)
    machine = report.machine_info()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.idle + 1024)), hard))
    data_dir = Path(tempfile.mkdtemp(prefix="chatbench-"))
    setup_django(data_dir)
    port = free_port()
    print(f"starting the server on :{port} (data in {data_dir}) ...", flush=True)
    # Moderation as shipped: every run's prompts are new (`prompts`' take), so
    # its caches answer what they would for real new chats and nothing more.
    server = start_server(port, args)
    try:
        # After the start: the server's reaper would mark the idle placeholders interrupted.
        cookies, idle_cookie, idle_replies = make_users(args.clients, args.idle)
        from django.db import connections  # after setup_django()

        connections.close_all()
        engine = local_engine(args.clients)
        stats = engine.stats()
        weights = "" if stats["quantization"] == "none" else f", {stats['quantization']} weights"
        device = f"{stats['device']} {stats['dtype']}{weights}, {os.cpu_count()} CPU cores"
        results = asyncio.run(run(args, f"http://127.0.0.1:{port}", cookies, idle_cookie, idle_replies, engine))
        engine.shutdown()
    finally:
        stop_server(server, data_dir)
    body = render(args, results, device, machine)
    print(body)
    if args.write:
        write_section(body, report.command_line("bench.chat", argv))


if __name__ == "__main__":
    main()
