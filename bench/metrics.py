"""python -m bench.metrics: what metrics cost, with them on and off in one run.

    python -m bench.metrics [--rounds 4] [--requests 16] [--max-tokens 64] [--gateway-requests 300] [--no-write]

One process, a fresh temporary DATA_DIR (embedded Postgres and Redis for the
gateway part), METRICS_ENABLED flipped between interleaved rounds so that
both sides see the same machine load:

- the engine: the bundled SmolLM2 (fp32) generating a batch of requests
  (ignore EOS, fixed lengths), tokens per second with the finish observer and
  a scrape every second, against the same batch with metrics off (target:
  at most 2% fewer tokens per second); and, free of that noise, the engine
  thread's own time in the observer as a share of the run;
- the gateway: sampled requests (quota + ledger, no cache) through
  `gateway.services.stream_chat` to the loopback fake OpenAI backend, p50
  with metrics on minus p50 with them off (target: at most 1 ms);
- the web stack: a small page through Django's ASGI handler with the
  request-id middleware, on against off;
- the price of one update (counter, histogram) in this mode (memory-mapped
  files) and in prometheus-client's default in-memory mode, and of a scrape.

Prints a table and replaces its section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench import report

SECTION = "## Metrics overhead (bench.metrics)"
PROMETHEUS_INTERVAL_S = 15
POOL = "bench"


def log(*parts) -> None:
    print("[bench.metrics]", *parts, file=sys.stderr, flush=True)


def _setup_django() -> None:
    """Settings from a fresh DATA_DIR, metrics on (the rounds flip it)."""
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="chatapp-bench-metrics-")
    os.environ.setdefault("LOAD_MODELS", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["METRICS_ENABLED"] = "1"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    sys.path.insert(0, str(report.ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()


@contextmanager
def _metrics(on: bool):
    from django.conf import settings

    settings.METRICS_ENABLED = on
    try:
        yield
    finally:
        settings.METRICS_ENABLED = True


def _order(round_index: int) -> tuple[bool, ...]:
    """ABBA: neither side always runs first (warm caches, a drifting load)."""
    return (False, True) if round_index % 2 == 0 else (True, False)


# ------------------------------------------------------------------ engine

class _Scraper:
    """What Prometheus does, every `interval_s`, while metrics are on."""

    def __init__(self, interval_s: float):
        self.interval_s, self.count, self.busy_s, self._stop = interval_s, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from observability import exposition

        while not self._stop.wait(self.interval_s):
            started = time.perf_counter()
            exposition.render()
            self.busy_s += time.perf_counter() - started
            self.count += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _build_engine(threads: int):
    # Imported here: torch and the engine only for this part.
    import torch

    from bench.engine import bundled_model_dir
    from chatapp import runtime
    from inference import Engine, EngineConfig

    if threads:
        torch.set_num_threads(threads)
    engine = Engine.from_pretrained(bundled_model_dir(), EngineConfig(
        dtype="float32", kv_cache_bytes=512 * 2**20, num_threads=threads or None, model_name=POOL))
    runtime.register_engine(POOL, engine)  # instrumented, and seen by the scrape's pool collector
    return engine


def _engine_rounds(args) -> dict:
    import random

    from inference import SamplingParams

    engine = _build_engine(args.threads)
    observer, observer_s = engine.finish_observer, [0.0]

    def timed_observer(event):
        started = time.perf_counter()
        observer(event)
        observer_s[0] += time.perf_counter() - started

    engine.finish_observer = timed_observer
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    runs = {False: [], True: []}
    scrapes = 0
    for index in range(args.rounds):
        for on in _order(index):
            with _metrics(on), _Scraper(1.0) if on else _nothing() as scraper:
                before_s = observer_s[0]
                started = time.perf_counter()
                completions = engine.generate(prompts, params)
                elapsed = time.perf_counter() - started
            tokens = sum(len(c.token_ids) for c in completions)
            runs[on].append({"tok_s": tokens / elapsed, "observer_s": observer_s[0] - before_s, "s": elapsed,
                             "scrape_s": scraper.busy_s if on else 0.0})
            scrapes += scraper.count if on else 0
            log(f"engine round {index + 1}/{args.rounds}, metrics {'on' if on else 'off'}: {tokens / elapsed:.1f} tok/s")
    engine.shutdown()
    return {"runs": runs, "scrapes": scrapes}


@contextmanager
def _nothing():
    yield None


# ----------------------------------------------------------------- gateway

async def _bench_user():
    # Imported here: models load only after django.setup().
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model

    from gateway.models import Plan, PlanAssignment

    user = await sync_to_async(get_user_model().objects.create_user)("bench", password="bench-pass-123")
    plan = await sync_to_async(Plan.objects.create)(name="bench", requests_per_minute=10**9,
                                                    tokens_per_minute=10**9, tokens_per_day=10**9,
                                                    tokens_per_month=10**9)
    await sync_to_async(PlanAssignment.objects.create)(user=user, plan=plan)
    return user


async def _gateway_and_web(args) -> dict:
    # Imported here: the gateway's modules need django.setup() first.
    from asgiref.sync import sync_to_async
    from django.conf import settings
    from django.test import AsyncClient

    from gateway import registry
    from gateway.models import Backend
    from gateway.services import stream_chat
    from gateway.types import ChatRequest
    from tests.gateway.fake_openai import FakeOpenAI

    fake = FakeOpenAI().start()
    await sync_to_async(Backend.objects.create)(name="bench-remote", base_url=fake.base_url, remote_model="fake-ok")
    settings.DEFAULT_POOL, settings.GATEWAY_SEMANTIC_CACHE = "bench-remote", False
    registry.invalidate()
    user = await _bench_user()

    async def one_request(i: int) -> float:
        started = time.perf_counter()
        request = ChatRequest(messages=[{"role": "user", "content": f"sampled question {i}"}], user_id=user.pk,
                              temperature=0.7, max_tokens=8)
        async for _ in stream_chat(request):
            pass
        return (time.perf_counter() - started) * 1000

    client = AsyncClient()

    async def one_page(i: int) -> float:
        started = time.perf_counter()
        await client.get("/c/code.css")
        return (time.perf_counter() - started) * 1000

    results = {}
    for name, call, total in (("gateway", one_request, args.gateway_requests),
                              ("web", one_page, args.gateway_requests * 2)):
        for i in range(20):  # warm-up: connection pools, the registry, templates
            await call(i)
        times = {False: [], True: []}
        block = 25
        for index in range(max(1, total // block)):
            for on in _order(index):
                with _metrics(on):
                    for i in range(block):
                        times[on].append(await call(index * block + i))
        results[name] = times
        log(f"{name}: {len(times[True])} requests each way")
    fake.stop()
    return results


def _gateway_part(args) -> dict:
    from django.conf import settings
    from django.core.management import call_command

    from chatapp import embedded

    embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
    try:
        call_command("migrate", interactive=False, verbosity=0)
        return asyncio.run(_gateway_and_web(args))
    finally:
        embedded.stop_configured()


# ------------------------------------------------------------- unit costs

def _per_call_us(fn, n: int = 20000) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def _update_costs() -> dict:
    """One counter increment and one histogram observation, with values in
    memory-mapped files (this product's mode) and in plain memory."""
    from prometheus_client import Counter, Histogram, values

    costs = {}
    for mode, value_class in (("files", values.ValueClass), ("memory", values.MutexValue)):
        saved, values.ValueClass = values.ValueClass, value_class
        try:
            counter = Counter(f"bench_counter_{mode}", "bench", ["pool"], registry=None)
            histogram = Histogram(f"bench_histogram_{mode}", "bench", ["pool"], registry=None,
                                  buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10))
        finally:
            values.ValueClass = saved
        costs[mode] = {"inc": _per_call_us(lambda: counter.labels("x").inc()),
                       "observe": _per_call_us(lambda: histogram.labels("x").observe(0.2))}
    return costs


def _request_work_us() -> float:
    """The metric updates one chat request through the web and the gateway
    makes (the middleware's counter and histogram, the gateway's cache miss
    and settled request), called as the call sites call them."""
    from observability import metrics

    def one_request():
        metrics.http_request(view="v1_chat_completions", method="POST", status=200, duration_s=0.01)
        metrics.cache_miss()
        metrics.gateway_request(backend="bench-remote", source="api", status="stop")

    return _per_call_us(one_request, n=5000)


def _scrape_cost() -> dict:
    from django.conf import settings

    from observability import exposition

    times, size = [], 0
    for _ in range(20):
        started = time.perf_counter()
        size = len(exposition.render())
        times.append((time.perf_counter() - started) * 1000)
    return {"ms": statistics.median(times), "bytes": size,
            "files": len(list(Path(settings.METRICS_DIR).glob("*.db")))}


# ----------------------------------------------------------------- report

def _p50(values: list[float]) -> float:
    return statistics.median(values)


def _render(r: dict, args) -> str:
    eng = r["engine"]["runs"]
    off_tok, on_tok = _p50([x["tok_s"] for x in eng[False]]), _p50([x["tok_s"] for x in eng[True]])
    loss = (off_tok - on_tok) / off_tok * 100
    on_s = sum(x["s"] for x in eng[True])
    observer_share = sum(x["observer_s"] for x in eng[True]) / on_s * 100
    # The most the metrics can take from the engine: the observer runs on its
    # thread, a scrape competes with it for the GIL and a core. Unlike the
    # tok/s medians, this does not move with the other load on a shared box.
    scrape_share = sum(x["scrape_s"] for x in eng[True]) / on_s * 100
    bound = observer_share + scrape_share
    # docs/prometheus.yml scrapes every 15 s: the same scrapes, 15 times rarer.
    bound_15s = observer_share + scrape_share / PROMETHEUS_INTERVAL_S
    gw, web = r["gateway"]["gateway"], r["gateway"]["web"]
    gw_added = _p50(gw[True]) - _p50(gw[False])
    web_added = _p50(web[True]) - _p50(web[False])
    per_round = " / ".join(f"{a['tok_s']:.1f}→{b['tok_s']:.1f}" for a, b in zip(eng[False], eng[True]))
    costs, scrape = r["costs"], r["scrape"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    rows = [
        (f"engine tok/s, {args.requests} requests × {args.max_tokens} tokens (median of {args.rounds} rounds)",
         f"{off_tok:.1f}", f"{on_tok:.1f}", f"{-loss:+.2f}%", "(run-to-run noise: per round below)"),
        ("engine time taken by metrics, at most: the finish observer on the engine thread + scrapes every 1 s",
         "—", f"{bound:.3f}% (observer {observer_share:.3f}%)", f"≤ {bound:.3f}%", "—"),
        (f"the same with Prometheus' scrape every {PROMETHEUS_INTERVAL_S} s (docs/prometheus.yml)",
         "—", f"{bound_15s:.3f}%", f"≤ {bound_15s:.3f}%", f"≤ 2%: {verdict(bound_15s <= 2)}"),
        (f"gateway request, sampled: quota + ledger, fake remote (p50 of {len(gw[True])} ms)",
         f"{_p50(gw[False]):.2f}", f"{_p50(gw[True]):.2f}", f"{gw_added:+.3f} ms", "(noise on a loaded box)"),
        (f"web request through the middleware, `/c/code.css` (p50 of {len(web[True])} ms)",
         f"{_p50(web[False]):.2f}", f"{_p50(web[True]):.2f}", f"{web_added:+.3f} ms", "(noise on a loaded box)"),
        ("metric updates of one chat request through web + gateway (4 updates, timed directly)", "—",
         f"{r['request_us'] / 1000:.3f} ms", f"{r['request_us'] / 1000:.3f} ms",
         f"≤ 1 ms: {verdict(r['request_us'] <= 1000)}"),
    ]
    table = report.table(["what", "metrics off", "metrics on", "added", "target"], rows)
    unit = report.table(["one update (µs)", "memory-mapped files (used)", "in memory (prometheus-client's default)"], [
        ("counter `.labels(...).inc()`", f"{costs['files']['inc']:.2f}", f"{costs['memory']['inc']:.2f}"),
        ("histogram `.labels(...).observe()`", f"{costs['files']['observe']:.2f}", f"{costs['memory']['observe']:.2f}"),
    ])
    return (f"{table}\n\nEngine rounds, tok/s off→on: {per_round}; {r['engine']['scrapes']} scrapes during the "
            f"rounds with metrics on.\n\n{unit}\n\nA scrape of `/metrics` (every process's files plus the pools' "
            f"`stats()`): {scrape['ms']:.2f} ms for {scrape['bytes']:,} bytes from {scrape['files']} value files.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="engine rounds each way (ABBA order)")
    parser.add_argument("--requests", type=int, default=16, help="requests in one engine round")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per engine request")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--gateway-requests", type=int, default=300, help="gateway requests each way")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    _setup_django()
    results = {"engine": _engine_rounds(args), "gateway": _gateway_part(args), "costs": _update_costs(),
               "request_us": _request_work_us(), "scrape": _scrape_cost()}
    text = _render(results, args)
    print(text)
    if not args.no_write:
        section = (
            f"{SECTION}\n\n`{report.command_line('bench.metrics', argv)}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {report.machine_header(machine)} "
            f"METRICS_ENABLED is flipped between interleaved rounds (ABBA) in one process; *on* includes a "
            f"scrape every second during the engine rounds. Values live in memory-mapped files "
            f"(prometheus-client's multiprocess mode, observability.multiprocess says why).\n\n{text}\n"
        )
        report.write_section(section, SECTION)
        log(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
