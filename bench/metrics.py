"""python -m bench.metrics: what metrics cost, with them on and off in one run.

    python -m bench.metrics [--pairs 60] [--requests 4] [--prompt-tokens 16] [--max-tokens 8]
                            [--threads 1] [--gateway-requests 300] [--block 10] [--no-write]

One process, a fresh temporary DATA_DIR (embedded Postgres and Redis for the
gateway part), METRICS_ENABLED flipped between short interleaved rounds:
each pair of rounds (one off, one on, in ABBA order) runs back to back, so
both halves of a pair see the same load on a shared box, and the result is
the median of the pairs' differences with a 95% bootstrap interval. Each
part is timed twice: by the wall clock, which other sessions' load moves by
tens of percent from one round to the next, and by this process's CPU time
(every thread: the engine, the scrapes, the gateway's database threads),
which load moves far less, since time spent waiting for a core is not
counted. A target is met when the interval's upper end is within it,
missed when its lower end is past it, inconclusive otherwise.

- the engine: the bundled SmolLM2 (fp32, one torch thread by default: a
  second one only spins on a shared box, and the metrics' cost per token
  does not depend on it) generating a batch of requests (ignore EOS, fixed
  lengths), with the finish observer and a scrape every second when on
  (Prometheus scrapes every 15 s: a harder test), against the same batch
  with metrics off (target: at most 2% fewer tokens per second, i.e. at
  most 2% more CPU per token); and the engine thread's own time in the
  observer plus the scrapes' time as a share of the run (an upper bound);
- the gateway: sampled requests (quota + ledger, no cache) through
  `gateway.services.stream_chat` to the loopback fake OpenAI backend, time
  per request on minus off (target: at most 1 ms);
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
import random
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
BOOTSTRAP_RESAMPLES = 4000


def log(*parts) -> None:
    print("[bench.metrics]", *parts, file=sys.stderr, flush=True)


def _setup_django() -> None:
    """Settings from a fresh DATA_DIR, metrics on (the rounds flip it)."""
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="chatapp-bench-metrics-")
    os.environ.setdefault("LOAD_MODELS", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["METRICS_ENABLED"] = "1"
    # The rules only: the embedding checker's model costs milliseconds of CPU per
    # gateway request either way, noise beside the metrics' microseconds.
    os.environ.setdefault("SAFETY_CHECKERS", "safety.checkers.RulesChecker")
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


def _order(pair_index: int) -> tuple[bool, ...]:
    """ABBA: neither side always runs first (warm caches, a drifting load)."""
    return (False, True) if pair_index % 2 == 0 else (True, False)


class _Clocks:
    """Wall and process CPU time of a block of work."""

    def __enter__(self):
        self.wall_s, self.cpu_s = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s, self.cpu_s = time.perf_counter() - self.wall_s, time.process_time() - self.cpu_s


def _paired(diffs: list[float]) -> dict:
    """The median of paired differences, its 95% bootstrap interval (seeded:
    the same data give the same interval), and how many pairs were positive."""
    rng, n = random.Random(0), len(diffs)
    medians = sorted(statistics.median(rng.choices(diffs, k=n)) for _ in range(BOOTSTRAP_RESAMPLES))
    return {"median": statistics.median(diffs), "lo": medians[int(0.025 * BOOTSTRAP_RESAMPLES)],
            "hi": medians[int(0.975 * BOOTSTRAP_RESAMPLES) - 1], "n": n, "positive": sum(d > 0 for d in diffs)}


# ------------------------------------------------------------------ engine

class _Scraper:
    """What Prometheus does, every `interval_s`, while metrics are on; and once
    at the start, so that a round shorter than the interval has its scrape
    too (more scrapes than Prometheus makes: a harder test)."""

    def __init__(self, interval_s: float):
        self.interval_s, self.count, self.busy_s, self._stop = interval_s, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from observability import exposition

        while True:
            started = time.perf_counter()
            exposition.render()
            self.busy_s += time.perf_counter() - started
            self.count += 1
            if self._stop.wait(self.interval_s):
                return

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


def _engine_rounds(args) -> list[dict]:
    """`args.pairs` pairs of rounds; each round: its clocks, tokens, and the
    time the observer and the scrapes took."""
    from inference import SamplingParams

    engine = _build_engine(args.threads)
    observer, observer_s = engine.finish_observer, [0.0]

    def timed_observer(event):
        started = time.perf_counter()
        observer(event)
        observer_s[0] += time.perf_counter() - started

    engine.finish_observer = timed_observer
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up: the first batch of this shape allocates
    pairs = []
    for index in range(args.pairs):
        pair = {}
        for on in _order(index):
            with _metrics(on), _Scraper(1.0) if on else _nothing() as scraper, _Clocks() as clocks:
                before_s = observer_s[0]
                completions = engine.generate(prompts, params)
            tokens = sum(len(c.token_ids) for c in completions)
            pair[on] = {"tokens": tokens, "wall_s": clocks.wall_s, "cpu_s": clocks.cpu_s,
                        "observer_s": observer_s[0] - before_s, "scrape_s": scraper.busy_s if on else 0.0,
                        "scrapes": scraper.count if on else 0}
        pairs.append(pair)
        if (index + 1) % 10 == 0 or index + 1 == args.pairs:
            off, on_ = pair[False], pair[True]
            log(f"engine pair {index + 1}/{args.pairs}: tok/s {off['tokens'] / off['wall_s']:.1f} off, "
                f"{on_['tokens'] / on_['wall_s']:.1f} on; CPU ms/token {off['cpu_s'] / off['tokens'] * 1000:.2f} "
                f"off, {on_['cpu_s'] / on_['tokens'] * 1000:.2f} on")
    engine.shutdown()
    return pairs


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
    # Django's test client calls itself "testserver": without this, every page
    # would be a DisallowedHost 400 (and an error logged), not the page.
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
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
        pairs = []
        for index in range(max(1, total // args.block)):
            pair = {}
            for on in _order(index):
                with _metrics(on), _Clocks() as clocks:
                    times = [await call(index * args.block + i) for i in range(args.block)]
                pair[on] = {"p50_ms": statistics.median(times), "cpu_ms": clocks.cpu_s * 1000 / args.block}
            pairs.append(pair)
        results[name] = pairs
        log(f"{name}: {len(pairs)} pairs of {args.block} requests")
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

def _verdict(stats: dict, limit: float) -> str:
    if stats["hi"] <= limit:
        return "met"
    return "missed" if stats["lo"] > limit else "inconclusive"


def _cell(stats: dict, unit: str, digits: int) -> str:
    return (f"{stats['median']:+.{digits}f}{unit} [{stats['lo']:+.{digits}f}, {stats['hi']:+.{digits}f}]; "
            f"{stats['positive']} of {stats['n']} pairs > 0")


def _engine_rows(pairs: list[dict], args) -> tuple[list[tuple], str]:
    tok_s = {on: [p[on]["tokens"] / p[on]["wall_s"] for p in pairs] for on in (False, True)}
    cpu_ms = {on: [p[on]["cpu_s"] / p[on]["tokens"] * 1000 for p in pairs] for on in (False, True)}
    lost = _paired([(off - on) / off * 100 for off, on in zip(tok_s[False], tok_s[True])])
    added = _paired([(on - off) / off * 100 for off, on in zip(cpu_ms[False], cpu_ms[True])])
    on_s = sum(p[True]["wall_s"] for p in pairs)
    observer_share = sum(p[True]["observer_s"] for p in pairs) / on_s * 100
    # What the metrics code itself took, timed where it runs: the observer on
    # the engine's thread, each scrape on its own. docs/prometheus.yml scrapes
    # every 15 s: the same scrapes, 15 times rarer.
    scrape_share = sum(p[True]["scrape_s"] for p in pairs) / on_s * 100
    bound_15s = observer_share + scrape_share / PROMETHEUS_INTERVAL_S
    # A scrape is the only metrics work that comes per second rather than per
    # request: the paired differences, measured at the scrape rate of these
    # rounds, scale to Prometheus' rate; the observer's share is added back
    # unscaled (it is inside the measured difference already: conservative).
    scale = (1 / PROMETHEUS_INTERVAL_S) / (sum(p[True]["scrapes"] for p in pairs) / on_s)
    shape = (f"{args.requests} requests × {args.prompt_tokens}+{args.max_tokens} tokens, "
             f"{args.threads or 'default'} torch thread(s)")
    rows = [
        (f"engine tok/s lost, wall clock ({shape})", f"{statistics.median(tok_s[False]):.1f} tok/s",
         f"{statistics.median(tok_s[True]):.1f} tok/s", _cell(lost, "%", 2), f"≤ 2%: {_verdict(lost, 2)}"),
        ("engine CPU time per token added (the process: engine thread, observer, scrapes)",
         f"{statistics.median(cpu_ms[False]):.2f} ms", f"{statistics.median(cpu_ms[True]):.2f} ms",
         _cell(added, "%", 2), f"≤ 2%: {_verdict(added, 2)}"),
        _scaled_row("engine tok/s lost", lost, scale, observer_share),
        _scaled_row("engine CPU time per token added", added, scale, observer_share),
        ("engine time in the observer + scrapes every 1 s, timed where they run (direct work only)", "—",
         f"{observer_share + scrape_share:.3f}% (observer {observer_share:.3f}%)", "—", "—"),
        (f"the same with Prometheus' scrape every {PROMETHEUS_INTERVAL_S} s (docs/prometheus.yml)", "—",
         f"{bound_15s:.3f}%", "—", "—"),
    ]
    scrapes = sum(p[True]["scrapes"] for p in pairs)
    every = cpu_ms[False] + cpu_ms[True]
    return rows, (f"{scrapes} scrapes during the {len(pairs)} rounds with metrics on; a round's CPU time per "
                  f"token ranged {min(every):.1f} to {max(every):.1f} ms")


def _scaled_row(what: str, stats: dict, scale: float, observer_share: float) -> tuple:
    scaled = {k: observer_share + stats[k] * scale for k in ("median", "lo", "hi")}
    return (f"{what}, scaled to Prometheus' scrape every {PROMETHEUS_INTERVAL_S} s (× {scale:.3f}, + the "
            f"observer's {observer_share:.3f}%)", "—", "—",
            f"{scaled['median']:+.2f}% [{scaled['lo']:+.2f}, {scaled['hi']:+.2f}]", f"≤ 2%: {_verdict(scaled, 2)}")


def _request_rows(name: str, what: str, pairs: list[dict], args) -> list[tuple]:
    rows = []
    for key, clock in (("p50_ms", "wall clock, p50 of the block"), ("cpu_ms", "CPU time, mean of the block")):
        off = [p[False][key] for p in pairs]
        on = [p[True][key] for p in pairs]
        stats = _paired([b - a for a, b in zip(off, on)])
        rows.append((f"{what} ({clock}; {len(pairs)} pairs of {args.block})", f"{statistics.median(off):.2f} ms",
                     f"{statistics.median(on):.2f} ms", _cell(stats, " ms", 3), f"≤ 1 ms: {_verdict(stats, 1)}"))
    return rows


HOW_TO_READ = (
    "How to read it: the halves of a pair ran seconds apart, and a row's interval is where the median of the "
    "pairs' differences lies (95%, bootstrap): *met* when its upper end is within the target, *missed* when its "
    "lower end is past it, *inconclusive* when the box's noise is wider than the target. On a busy shared VM "
    "the wall clock moves with the other sessions' load, and the same work takes more CPU time while other "
    "processes share the caches and memory bandwidth (the range above). The paired engine rows are measured "
    "with a scrape at each round's start and every second after ({times:.0f} times Prometheus' rate), and they "
    "catch what the direct timings do not (a scrape holding the GIL the engine's thread waits for, caches, "
    "thread switches); scrapes are the only metrics work that comes per second, not per request, so the "
    "scaled rows give the engine's loss at Prometheus' 15 s. For a request, the last row times the metric "
    "updates a chat request makes, directly."
)


def _render(r: dict, args) -> str:
    engine_rows, scrapes = _engine_rows(r["engine"], args)
    on_s = sum(p[True]["wall_s"] for p in r["engine"])
    r["scrape_times"] = sum(p[True]["scrapes"] for p in r["engine"]) / on_s * PROMETHEUS_INTERVAL_S
    rows = engine_rows + _request_rows("gateway", "gateway request, sampled: quota + ledger, fake remote",
                                       r["gateway"]["gateway"], args)
    rows += _request_rows("web", "web request through the middleware, `/c/code.css`", r["gateway"]["web"], args)
    rows.append(("metric updates of one chat request through web + gateway (4 updates, timed directly)", "—",
                 f"{r['request_us'] / 1000:.3f} ms", f"{r['request_us'] / 1000:.3f} ms",
                 f"≤ 1 ms: {'met' if r['request_us'] <= 1000 else 'missed'}"))
    table = report.table(["what", "metrics off (median)", "metrics on (median)",
                          "added: median of paired differences [95% interval]; pairs > 0", "target"], rows)
    costs, scrape = r["costs"], r["scrape"]
    unit = report.table(["one update (µs)", "memory-mapped files (used)", "in memory (prometheus-client's default)"], [
        ("counter `.labels(...).inc()`", f"{costs['files']['inc']:.2f}", f"{costs['memory']['inc']:.2f}"),
        ("histogram `.labels(...).observe()`", f"{costs['files']['observe']:.2f}", f"{costs['memory']['observe']:.2f}"),
    ])
    how_to_read = HOW_TO_READ.format(times=r["scrape_times"])
    return (f"{table}\n\n{scrapes}; load average {r['load_after']} at the end.\n\n{how_to_read}\n\n{unit}\n\n"
            f"A scrape of `/metrics` (every process's files plus the pools' `stats()`): {scrape['ms']:.2f} ms for "
            f"{scrape['bytes']:,} bytes from {scrape['files']} value files.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Many short rounds: the two halves of a pair run within seconds of each
    # other, so the other sessions' load, which moves over seconds to
    # minutes, mostly cancels in their difference.
    parser.add_argument("--pairs", type=int, default=60, help="engine rounds each way, in pairs (ABBA order)")
    parser.add_argument("--requests", type=int, default=4, help="requests in one engine round")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens per engine request")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per engine request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--gateway-requests", type=int, default=300, help="gateway requests each way")
    parser.add_argument("--block", type=int, default=10, help="gateway and web requests per round")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    _setup_django()
    results = {"engine": _engine_rounds(args), "gateway": _gateway_part(args), "costs": _update_costs(),
               "request_us": _request_work_us(), "scrape": _scrape_cost(),
               "load_after": tuple(round(x, 2) for x in os.getloadavg())}
    text = _render(results, args)
    print(text)
    if not args.no_write:
        section = (
            f"{SECTION}\n\n{report.provenance('bench.metrics', argv, machine)} "
            f"METRICS_ENABLED is flipped between short rounds run in pairs (one off, one on, ABBA order) in one "
            f"process; each row compares the two halves of each pair and gives the median of those differences "
            f"with a 95% bootstrap interval: a target is met when the interval's upper end is within it. *On* "
            f"includes a scrape every second during the engine rounds. Values live in memory-mapped files "
            f"(prometheus-client's multiprocess mode, observability.multiprocess says why).\n\n{text}\n"
        )
        report.write_section(section, SECTION)
        log(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
