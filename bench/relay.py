"""Relay benchmark: a remote backend alone against the same backend through the
product's /v1 relay (issue 16, item 3).

    python -m bench.relay [--streams 32] [--tokens 128] [--token-ms 10] [--singles 8] [--rounds 3]
                          [--baseline-tree DIR] [--rules-only] [--hosted] [--local-pool] [--split N]
                          [--web-processes N]
                          [--no-write]

1. starts `bench.sse_stub` in its own process: an OpenAI-compatible server that
   streams a token every --token-ms and uses almost no CPU, so what is measured
   is the relay's own cost;
2. starts `manage.py serve --no-worker` on a fresh DATA_DIR (embedded Postgres
   and Redis) as a relay node (no local pool: MODEL_POOLS_JSON='{}' unless
   the environment sets it) with the stub as a self-hosted remote
   backend (GATEWAY_BACKENDS_JSON; --hosted adds a server where it plays a
   hosted provider, sent the prompt only once it passed); one user and API
   key per stream, default plan (quotas, concurrency leases), moderation
   on, the gateway's caches off (a hit would not relay anything). With
   --baseline-tree, a second server runs the same from another checkout
   (the code before a change), on the same database and Redis, so before
   and after share one run. With --web-processes N, one more server runs N
   web processes on its port (WEB_PROCESSES: the kernel deals connections
   out among them). With --split N, N more servers (relay nodes, the cores'
   torch threads shared between them) get the streams of one contender
   dealt out by index: the same layout with a perfectly even split, which
   is how it was first measured;
3. one raw HTTP/SSE client (asyncio streams, no HTTP library: it shares the
   cores with the server) reads the same requests from the stub directly
   ("backend alone") and from /v1/chat/completions (`stream`, `include_usage`):
   one stream at a time (--singles in a row) and --streams sent at once, each
   contender in turn within every round, after a warm-up round.

Aggregate tok/s is the completion tokens of every reply over the wall time
from the first send to the last `[DONE]`; TTFT runs from the send (connect
included, for both) to the first chunk with text. "last text → [DONE]" is
how long a reply's end waits after its last text: the relay holds `[DONE]`
(and the finish reason) for the whole-message moderation read, and a
burst's replies end together; the stub writes its last token, finish and
`[DONE]` without a pause. `server CPU` is what the server process (Daphne,
the gateway) and the embedded Redis and Postgres burned per reply: the
least noisy figure on a shared machine. `client CPU` is this process's,
which reads every stream on the same cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench import free_port, http_body_parts, report, shared_services_env, wait_healthy
from bench.report import ROOT, percentile

SECTION = "## Relay to a remote backend (bench.relay)"
RULES_ONLY = "safety.checkers.RulesChecker"
PROMPT_TOPICS = ("tides", "volcanoes", "bread", "glaciers", "comets", "bees", "bridges", "clocks")


def prompt(i: int) -> str:
    """Distinct short questions: no verdict or cache hit is shared between streams."""
    return f"Question {i}: explain in a few paragraphs how {PROMPT_TOPICS[i % len(PROMPT_TOPICS)]} work."


# ------------------------------------------------------------ the client

@dataclass
class Target:
    """Where a contender's streams go: the stub itself or a server's /v1."""
    label: str
    port: int
    path: str
    keys: list[str] = field(default_factory=list)  # bearer keys, one per stream (the relay)
    model: str = "stub"
    pids: list[int] = field(default_factory=list)  # processes whose CPU counts as this contender's
    ports: list[int] = field(default_factory=list)  # --split: the servers stream i goes to, by i


def _request_bytes(target: Target, i: int, tokens: int) -> bytes:
    body = json.dumps({"model": target.model, "messages": [{"role": "user", "content": prompt(i)}],
                       "max_tokens": tokens, "temperature": 0.7, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    auth = f"Authorization: Bearer {target.keys[i % len(target.keys)]}\r\n" if target.keys else ""
    head = (f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\n{auth}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _event(data: bytes) -> tuple[bool, int | None, bool]:
    """(has text, completion tokens from a usage chunk, is [DONE]) of one SSE event."""
    if not data.startswith(b"data:"):
        return False, None, False  # a comment (heartbeat)
    data = data[5:].strip()
    if data == b"[DONE]":
        return False, None, True
    chunk = json.loads(data)
    if chunk.get("error"):
        raise RuntimeError(f"the stream failed: {chunk['error']}")
    usage = chunk.get("usage")
    has_text = any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())
    return has_text, (usage or {}).get("completion_tokens"), False


async def one_stream(target: Target, i: int, tokens: int) -> tuple[float | None, int, float | None]:
    """(TTFT s, completion tokens, s from the last chunk with text to [DONE])
    of one streamed request. The last is what the reply's end costs: the
    relay holds [DONE] for its whole-message moderation read."""
    started = time.perf_counter()
    port = target.ports[i % len(target.ports)] if target.ports else target.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request_bytes(target, i, tokens))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            status = head.partition(b"\r\n")[0].decode()
            raise RuntimeError(f"{target.label}: {status} {(await reader.read(500))!r}")
        first = last = None
        count, buffer = 0, b""
        async for part in http_body_parts(reader, b"chunked" in head.lower()):
            buffer += part
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for data in events:
                has_text, usage_tokens, done = _event(data)
                if has_text:
                    last = now
                    if first is None:
                        first = now - started
                count = usage_tokens if usage_tokens is not None else count
                if done:
                    return first, count, None if last is None else now - last
        raise RuntimeError(f"{target.label}: the stream ended without [DONE]")
    finally:
        writer.close()


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their children (live ones)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


async def burst(target: Target, first_index: int, n: int, tokens: int) -> dict:
    """n streams sent at once: aggregate tok/s, TTFTs, CPU."""
    cpu0, client0, started = _cpu_s(target.pids), time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one_stream(target, first_index + k, tokens) for k in range(n)))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": sum(r[1] for r in results), "ttfts": [r[0] for r in results if r[0]],
            "ends": [r[2] for r in results if r[2] is not None],
            "replies": n, "cpu_s": _cpu_s(target.pids) - cpu0, "client_cpu_s": time.process_time() - client0}


def merge(runs: list[dict]) -> dict:
    """Runs of one contender as one row: tokens over summed wall time, TTFTs pooled."""
    keys = ("wall_s", "tokens", "replies", "cpu_s", "client_cpu_s")
    merged = {k: sum(r[k] for r in runs) for k in keys}
    merged["ttfts"] = [t for r in runs for t in r["ttfts"]]
    merged["ends"] = [t for r in runs for t in r["ends"]]
    return merged


# ------------------------------------------------------------ set-up

def setup_django(data_dir: Path) -> None:
    os.environ["DATA_DIR"] = str(data_dir)
    os.environ["LOAD_MODELS"] = "0"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    sys.path.insert(0, str(ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from chatapp import embedded

    embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
    embedded.postgres_server(Path(settings.DATABASES["default"]["EMBEDDED_PGDATA"]))
    call_command("migrate", verbosity=0)


def make_keys(n: int) -> list[str]:
    """One user and API key per stream (a user's plan caps its replies in flight)."""
    # Imported here: needs django.setup() (setup_django) first.
    from django.contrib.auth import get_user_model
    from django.db import connections

    from gateway.keys import api_key_create

    users = get_user_model()
    keys = [api_key_create(user=users.objects.create_user(f"relay{i}", password="relay-pass-12345"),
                           name="bench")[1] for i in range(n)]
    connections.close_all()
    return keys


def start_stub(token_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.sse_stub", "--token-ms", str(token_ms)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("port "):
        proc.kill()
        raise SystemExit("the SSE stub did not start")
    return proc, int(line.split()[1])


def backends_json(stub_port: int, self_hosted: bool = True) -> str:
    """GATEWAY_BACKENDS_JSON naming the stub. It stands for a server the
    operator runs (vLLM, llama.cpp), so it is self-hosted: opened beside the
    prompt's moderation. Not self-hosted, it plays a hosted provider, which
    is sent the prompt only once it passed."""
    stub = {"base_url": f"http://127.0.0.1:{stub_port}/v1", "model": "stub", "context_window": 8192}
    return json.dumps({"stub": {**stub, "self_hosted": True} if self_hosted else stub})


def _server_env(name: str, stub_port: int) -> dict:
    return {
        # A relay node, as the web tier in front of remote engines runs: no
        # local pool, so moderation gets the process's cores (EMBEDDING_THREADS'
        # default). MODEL_POOLS_JSON in the environment measures another set-up.
        "MODEL_POOLS_JSON": "{}",
        **os.environ,
        **shared_services_env(name),
        "LOAD_MODELS": "0",
        "GATEWAY_BACKENDS_JSON": backends_json(stub_port),
        "GATEWAY_EXACT_CACHE": "0",
        "GATEWAY_SEMANTIC_CACHE": "0",
        "PYTHONUNBUFFERED": "1",
    }


def start_server(tree: Path, name: str, stub_port: int, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`manage.py serve --no-worker` from `tree`, waited for until /healthz
    answers (from each of its web processes, with WEB_PROCESSES)."""
    from django.conf import settings

    port = free_port()
    log = open(Path(settings.DATA_DIR) / f"{name}.log", "w")
    command = [sys.executable, "manage.py", "serve", "--no-worker", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=tree, env={**_server_env(name, stub_port), **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log.name)
    wait_web_processes(port, int((env or {}).get("WEB_PROCESSES", 1)))
    return proc, port


def wait_web_processes(port: int, n: int, timeout_s: float = 120) -> None:
    """Until n processes have answered /healthz on the port, each call on a new connection."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {n} web processes answered on port {port}")
        seen.add(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["process"]["pid"])


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    """`py-spy record` attached to a running server: collapsed stacks of the
    threads holding the GIL into `out`, written when it gets SIGINT. Attached
    after the warm-up round, so imports and model loads stay out of it."""
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(py_spy), "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                             "--threads", "--pid", str(pid), "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def service_pids(data_dir: Path) -> list[int]:
    """The embedded Redis and Postgres of this run (their command lines name its DATA_DIR)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(data_dir) in part for part in proc.info["cmdline"] or ()) and proc.pid != os.getpid():
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


# ------------------------------------------------------------ runs

async def measure(targets: list[Target], args) -> dict[str, dict[str, dict]]:
    """{"1": {label: row}, "N": {label: row}}: every contender in turn within
    each round, so a change in the machine's load hits them all alike."""
    singles: dict[str, list[dict]] = {t.label: [] for t in targets}
    bursts: dict[str, list[dict]] = {t.label: [] for t in targets}
    index, profiler = 0, None
    for round_ in range(args.rounds + 1):  # round 0 warms up (connections, imports, the checkers)
        if round_ == 1 and args.py_spy:
            profiler = start_profiler(targets[-1].pids[0], args.py_spy)
        for target in targets:
            runs = [await burst(target, index + k, 1, args.tokens) for k in range(args.singles)]
            index += args.singles
            many = await burst(target, index, args.streams, args.tokens)
            index += args.streams
            if round_:
                singles[target.label] += runs
                bursts[target.label].append(many)
        print(f"round {round_} done", flush=True)
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)
    return {"1": {k: merge(v) for k, v in singles.items()}, "N": {k: merge(v) for k, v in bursts.items()}}


def _row(name: str, r: dict, base: dict | None) -> tuple:
    tok_s = r["tokens"] / r["wall_s"]
    p50, p99 = 1000 * percentile(r["ttfts"], 0.5), 1000 * percentile(r["ttfts"], 0.99)
    share = added = "—"
    if base is not None:
        share = f"{100 * tok_s / (base['tokens'] / base['wall_s']):.1f}%"
        added = f"{p50 - 1000 * percentile(base['ttfts'], 0.5):+.1f}"
    end = f"{1000 * percentile(r['ends'], 0.5):.1f}" if r["ends"] else "—"
    return (name, r["replies"], r["tokens"], f"{tok_s:.0f}", share, f"{p50:.1f}", f"{p99:.1f}", added, end,
            f"{1000 * r['cpu_s'] / r['replies']:.1f}", f"{1e6 * r['cpu_s'] / max(1, r['tokens']):.0f}",
            f"{1000 * r['client_cpu_s'] / r['replies']:.1f}")


def render(results: dict, targets: list[Target], args) -> str:
    cells = []
    for size, label in (("1", "1 stream at a time"), ("N", f"{args.streams} streams at once")):
        rows = results[size]
        base = rows[targets[0].label]
        for target in targets:
            r = rows[target.label]
            cells.append(_row(f"{label}: {target.label}", r, None if target is targets[0] else base))
    table = report.table(["run", "replies", "tokens", "tok/s", "share of backend's tok/s", "TTFT p50 ms",
                          "TTFT p99 ms", "TTFT added p50 ms", "last text → [DONE] p50 ms", "server CPU ms / reply",
                          "server CPU µs / token", "client CPU ms / reply"],
                         cells)
    return table + "\n\n" + _verdicts(results, targets[-1].label, targets[0].label, args)


def _verdicts(results: dict, relay: str, backend: str, args) -> str:
    def share(size):
        r, b = results[size][relay], results[size][backend]
        return (r["tokens"] / r["wall_s"]) / (b["tokens"] / b["wall_s"])

    added = 1000 * (percentile(results["N"][relay]["ttfts"], 0.5) - percentile(results["N"][backend]["ttfts"], 0.5))
    lines = ["| target | measured | met |", "|---|---|---|"]
    for size, label in (("1", "one stream"), ("N", f"{args.streams} streams")):
        lines.append(f"| ≥ 95% of the backend's tok/s, {label} | {100 * share(size):.1f}% | "
                     f"{'yes' if share(size) >= 0.95 else 'no'} |")
    lines.append(f"| ≤ 50 ms TTFT added (p50), {args.streams} streams | {added:.1f} ms | "
                 f"{'yes' if added <= 50 else 'no'} |")
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32, help="streams sent at once")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--token-ms", type=float, default=10.0, help="the stub's time between tokens")
    parser.add_argument("--singles", type=int, default=8, help="streams measured one at a time, per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--baseline-tree", type=Path, help="also run the relay from this checkout (before a change)")
    parser.add_argument("--baseline-label", default="before", help="what to call the baseline tree's rows")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    parser.add_argument("--rules-only", action="store_true",
                        help="also run the relay with only the rules checker (what the classifier costs)")
    parser.add_argument("--hosted", action="store_true",
                        help="also run the relay with the stub as a hosted provider (sent the prompt only once it "
                             "passed moderation)")
    parser.add_argument("--local-pool", action="store_true",
                        help="also run the relay with the bundled local pool configured, as a default install "
                             "(one embedding thread) rather than a relay node")
    parser.add_argument("--web-processes", type=int, default=0, metavar="N",
                        help="also run a relay node with N web processes on its port (WEB_PROCESSES=N)")
    parser.add_argument("--split", type=int, default=0, metavar="N",
                        help="also run N relay servers, a contender's streams dealt out between them by index "
                             "(--web-processes N with a perfectly even split)")
    parser.add_argument("--py-spy", type=Path,
                        help="profile this tree's server over the measured rounds with py-spy (collapsed stacks here)")
    return parser.parse_args(argv)


def _start(args, data_dir: Path, procs: list) -> list[Target]:
    """The stub, the servers and the users; every process started goes into `procs`."""
    stub, stub_port = start_stub(args.token_ms)
    procs.append(stub)
    keys = make_keys(args.streams)
    services = service_pids(data_dir)
    targets = [Target("backend alone (stub)", stub_port, "/v1/chat/completions", pids=[stub.pid])]
    servers = [(args.baseline_tree, f"relay, {args.baseline_label}", None)] if args.baseline_tree else []
    if args.rules_only:
        servers.append((ROOT, "relay, rules only (no classifier)", {"SAFETY_CHECKERS": RULES_ONLY}))
    if args.hosted:
        servers.append((ROOT, "relay, stub as a hosted provider",
                        {"GATEWAY_BACKENDS_JSON": backends_json(stub_port, self_hosted=False)}))
    if args.local_pool:
        # The bundled pool configured (not loaded: LOAD_MODELS=0), as a
        # default install runs: moderation keeps to EMBEDDING_THREADS=1 there.
        servers.append((ROOT, "relay, beside a local pool",
                        {"MODEL_POOLS_JSON": json.dumps({"small": {"model": "bundled:smollm2"}})}))
    if args.web_processes > 1:
        servers.append((ROOT, f"relay, {args.web_processes} web processes",
                        {"WEB_PROCESSES": str(args.web_processes)}))
    if args.split > 1:
        # The cores' torch threads shared out: two processes of two threads
        # each oversubscribed two cores (docs/BENCHMARKS.md).
        threads = str(max(1, (os.cpu_count() or 1) // args.split))
        split = [start_server(ROOT, f"split{k}", stub_port, {"EMBEDDING_THREADS": threads}) for k in range(args.split)]
        procs += [server for server, _ in split]
        targets.append(Target(f"{args.split} relay processes, streams split", split[0][1], "/v1/chat/completions",
                              keys=keys, pids=[*(server.pid for server, _ in split), *services],
                              ports=[port for _, port in split]))
    for i, (tree, label, env) in enumerate([*servers, (ROOT, "through the relay (/v1)", None)]):
        server, port = start_server(tree.resolve(), f"server{i}", stub_port, env)
        procs.append(server)
        targets.append(Target(label, port, "/v1/chat/completions", keys=keys, pids=[server.pid, *services]))
    return targets


def _stop(procs: list, data_dir: Path) -> None:
    for proc in reversed(procs):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    from chatapp import embedded  # after setup_django()

    embedded.stop_configured()
    shutil.rmtree(data_dir, ignore_errors=True)


def main(argv=None) -> int:
    args = _parse_args(argv)
    machine = report.machine_info()
    data_dir = Path(tempfile.mkdtemp(prefix="relaybench-"))
    procs: list = []
    try:
        setup_django(data_dir)
        targets = _start(args, data_dir, procs)
        results = asyncio.run(measure(targets, args))
    finally:
        _stop(procs, data_dir)
    body = render(results, targets, args)
    print(body)
    if not args.no_write:
        write_section(body, report.command_line("bench.relay", argv), machine, args)
        print(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


def write_section(body: str, command: str, machine: dict, args) -> None:
    section = (
        f"{SECTION}\n\n`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"{report.machine_header(machine)}\n\n"
        f"The backend is `bench.sse_stub` in its own process: {args.tokens} tokens per reply, one every "
        f"{args.token_ms:g} ms, almost no CPU. The relay is `manage.py serve` (Daphne, no model loaded) with the "
        f"stub as a self-hosted remote backend (opened beside the prompt's moderation), read through "
        f"/v1/chat/completions with one user and API key per stream "
        f"(quotas, leases, moderation of prompt and reply, ledger; caches off). Every contender in turn "
        f"within each of {args.rounds} rounds, after a warm-up round; client, stub and servers share the "
        f"cores. Server CPU counts the server process with the embedded Redis and Postgres.\n\n{body}\n"
    )
    report.write_section(section, SECTION)


if __name__ == "__main__":
    sys.exit(main())
