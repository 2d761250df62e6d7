"""Moderation quality and cost: `python -m bench.safety`.

Scores every checker alone, and the configured pipeline (SAFETY_CHECKERS),
on the held-out split of the labelled set (safety/data/labelled.jsonl, see
safety.labelled; the embedding head never saw these items): precision,
recall and F1 per category, the share of benign items flagged, and the
checkers' latency per prompt (p50/p95 wall and CPU time, verdict cache off:
every text is new). Then the time moderation adds before the first token,
through the gateway's real entry point (`stream_chat`) and a backend that
answers at once (the loopback fake of the tests: the worst case, with no
prefill to hide behind), interleaved prompt by prompt: input
moderation off, moderation before the other stages (the order before it ran
beside them), and as the gateway runs it now, beside routing, quota, cache
and the backend's start, the first token held for its verdict.
A text counts as detected for a category when a verdict of that category
(its top-level name) flags or blocks it; injection and jailbreak are also
scored together as "attack", the target's unit. Writes the "Evaluation"
section of docs/SAFETY.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import aclosing

from bench import report

SAFETY_MD = report.ROOT / "docs" / "SAFETY.md"
SECTION = "## Evaluation (bench.safety)"
CANDIDATES = [
    "safety.checkers.RulesChecker",
    "safety.checkers.EmbeddingHeadChecker:minilm2",
    "safety.checkers.EmbeddingHeadChecker:static",
    "safety.checkers.EmbeddingHeadChecker:minilm",
    "safety.checkers.EmbeddingHeadChecker:cascade",
    "safety.checkers.GuardrailChecker",
    "safety.checkers.ProfanityChecker",
]
ATTACK = ("prompt_injection", "jailbreak")
# The heads whose time before the first token is compared, beside the stages
# (as the gateway runs moderation), interleaved with "off" and "before".
TTFT_HEADS = ("minilm", "cascade")
TTFT_MODES = ("moderation off", "moderation before the stages",
              *(f"moderation beside the stages, {name} head" for name in TTFT_HEADS))


def _setup() -> None:
    """Django on a fresh DATA_DIR: the rules checker reads the admin's rules (none here)."""
    os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="chatapp-bench-safety-")
    os.environ.setdefault("LOAD_MODELS", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    sys.path.insert(0, str(report.ROOT))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()
    from django.core.management import call_command

    from django.conf import settings

    from chatapp import embedded

    embedded.start_redis(settings.EMBEDDED_REDIS_DIR)  # the gateway's quota and cache, for the first-token part
    call_command("migrate", interactive=False, verbosity=0)


def _detected(decision) -> set[str]:
    from safety.taxonomy import top_level

    found = {top_level(v.category) for v in decision.verdicts if v.flagged and v.category}
    if found & set(ATTACK):
        found.add("attack")
    return found


def _score(items, found: list[set[str]]) -> dict:
    """Per category: precision, recall, F1, support; plus benign false positives."""
    truth = [{i.label} | ({"attack"} if i.label in ATTACK else set()) for i in items]
    categories = sorted({c for t in truth for c in t} - {"benign"})
    rows = {}
    for category in categories:
        tp = sum(category in f and category in t for f, t in zip(found, truth))
        fp = sum(category in f and category not in t for f, t in zip(found, truth))
        fn = sum(category not in f and category in t for f, t in zip(found, truth))
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows[category] = (precision, recall, f1, tp + fn)
    benign = [f for f, i in zip(found, items) if i.label == "benign"]
    fpr = sum(bool(f) for f in benign) / len(benign) if benign else float("nan")
    return {"rows": rows, "fpr": fpr, "benign": len(benign)}


def _measure(run, items) -> tuple[dict, list[float], list[float]]:
    """Scores, and per prompt the wall time and the process's CPU time (all
    threads: the checkers run on the pipeline's and the embedding thread). On
    a shared machine the wall time grows with the load; the CPU time is
    what a prompt costs a quiet core."""
    found, latencies, cpu = [], [], []
    for item in items:
        started, cpu_started = time.perf_counter(), time.process_time()
        decision = run(item.text)
        latencies.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
        found.append(_detected(decision))
    return _score(items, found), latencies, cpu


def _runs(paths: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, checker paths, head featurizer) of each run: each path alone
    ("PATH:NAME" with the head on the vectors of featurizer NAME), then the
    configured pipeline with each head."""
    from django.conf import settings

    default = settings.SAFETY_HEAD_FEATURIZER
    runs = []
    for spec in paths:
        path, _, featurizer = spec.partition(":")
        name = path.rsplit(".", 1)[1]
        if name == "EmbeddingHeadChecker":
            name += f" ({featurizer or default})"
        runs.append((name, [path], featurizer or default))
    pipeline_paths = list(settings.SAFETY_CHECKERS)
    runs.append((f"pipeline (SAFETY_CHECKERS, {default} head)", pipeline_paths, default))
    for other in sorted({"static", "minilm", "minilm2", "cascade"} - {default}):
        runs.append((f"pipeline ({other} head)", pipeline_paths, other))
    return runs


def _evaluate(paths: list[str], items) -> list[tuple[str, dict, list[float]]]:
    from django.conf import settings

    from retrieval.services import forget as forget_vectors
    from safety import pipeline
    from safety.checkers import EmbeddingHeadChecker

    settings.SAFETY_VERDICT_CACHE = 0  # every prompt is new: the latency of a first sight
    checkers, default = list(settings.SAFETY_CHECKERS), settings.SAFETY_HEAD_FEATURIZER
    results = []
    for name, checker_paths, featurizer in _runs(paths):
        settings.SAFETY_CHECKERS, settings.SAFETY_HEAD_FEATURIZER = checker_paths, featurizer
        pipeline.forget()  # no verdict of another head is remembered
        forget_vectors()  # nor a MiniLM vector of an earlier run (retrieval keeps them per text)
        EmbeddingHeadChecker().warm()  # its models load here, not within a check's deadline
        pipeline.run(["warm up the models"], source="input")  # loads them: not a prompt's cost
        score, latencies, cpu = _measure(lambda text: pipeline.run([text], source="input")[0], items)
        results.append((name, score, latencies, cpu))
    settings.SAFETY_CHECKERS, settings.SAFETY_HEAD_FEATURIZER = checkers, default
    pipeline.forget()
    return results


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def _tables(results, label: str) -> str:
    summary = [("checker", "attack recall", "attack precision", "benign flagged", "p50 ms", "p95 ms", "CPU p50 ms")]
    detail = []
    for name, score, latencies, cpu in results:
        attack = score["rows"].get("attack", (float("nan"),) * 4)
        summary.append((name, _fmt(attack[1]), _fmt(attack[0]), f"{score['fpr']:.1%}",
                        f"{report.percentile(latencies, 0.5):.2f}", f"{report.percentile(latencies, 0.95):.2f}",
                        f"{report.percentile(cpu, 0.5):.2f}"))
        rows = [(category, _fmt(p), _fmt(r), _fmt(f1), n) for category, (p, r, f1, n) in score["rows"].items()]
        detail.append(f"**{name}** ({label}):\n\n" + report.table(["category", "precision", "recall", "F1", "items"], rows))
    return report.table(list(summary[0]), summary[1:]) + "\n\n" + "\n\n".join(detail)


# ------------------------------------------------------------ before the first token

async def _first_token_ms(stream) -> float:
    """Milliseconds to the stream's first token; the rest is drained (the
    reply's end, its output check and the ledger row must not overlap the next)."""
    from gateway.types import TokenEvent

    started, first = time.perf_counter(), None
    async with aclosing(stream) as events:
        async for event in events:
            if first is None and isinstance(event, TokenEvent):
                first = time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


async def _ttft(texts: list[str], local: bool = False) -> dict[str, list[float]]:
    """First-token times per mode, the modes interleaved and rotated prompt by
    prompt. "off" and "before" send the request as the judge's (the one source
    the gateway does not moderate), "before" after awaiting the checks itself.
    `local`: the default deployment's backend, the in-process engine with the
    bundled model, whose prefill the check runs beside (both on these cores)."""
    from django.conf import settings

    from bench.gateway import _bench_user
    from gateway import registry
    from gateway.services import JUDGE_SOURCE, stream_chat
    from gateway.types import ChatRequest
    from retrieval.services import forget as forget_vectors
    from safety import pipeline
    from safety.services import amoderate_messages
    from tests.gateway.fake_openai import FakeOpenAI

    # Only prompts the pipeline lets through reach a first token (a benign item it blocks is a false positive).
    texts = [t for t in texts if not pipeline.run([t], source="input")[0].blocked]
    fake = FakeOpenAI().start()
    try:
        default_pool = settings.DEFAULT_POOL
        user = await _bench_user(fake.base_url)
        if local:
            settings.DEFAULT_POOL = default_pool
            registry.invalidate()

        default_head = settings.SAFETY_HEAD_FEATURIZER

        async def one(text: str, mode: str) -> float:
            messages = [{"role": "user", "content": text}]
            ask = dict(messages=messages, user_id=user.pk, temperature=0.7, max_tokens=2 if local else 8)
            if mode in TTFT_MODES[2:]:
                settings.SAFETY_HEAD_FEATURIZER = TTFT_HEADS[TTFT_MODES.index(mode) - 2]
                try:
                    return await _first_token_ms(stream_chat(ChatRequest(**ask)))
                finally:
                    settings.SAFETY_HEAD_FEATURIZER = default_head
            checks_ms = 0.0
            if mode == TTFT_MODES[1]:
                started = time.perf_counter()
                await amoderate_messages(messages, user_id=user.pk)
                checks_ms = (time.perf_counter() - started) * 1000
            return checks_ms + await _first_token_ms(stream_chat(ChatRequest(**ask, source=JUDGE_SOURCE)))

        from safety.checkers import EmbeddingHeadChecker

        for name in TTFT_HEADS:  # each head's models load here
            settings.SAFETY_HEAD_FEATURIZER = name
            EmbeddingHeadChecker().warm()
        settings.SAFETY_HEAD_FEATURIZER = default_head
        for mode in TTFT_MODES[2:]:
            await one("warm up the gateway, please", mode)
        times: dict[str, list[float]] = {mode: [] for mode in TTFT_MODES}
        for i, text in enumerate(texts):
            for k in range(len(TTFT_MODES)):
                mode = TTFT_MODES[(i + k) % len(TTFT_MODES)]
                # A first sight of the prompt: no MiniLM vector kept from the
                # filter above or the previous mode (retrieval keeps them per text).
                forget_vectors()
                times[mode].append(await one(text, mode))
        return times
    finally:
        fake.stop()


def _ttft_table(times: dict[str, list[float]]) -> str:
    off = times[TTFT_MODES[0]]
    rows = []
    for mode, values in times.items():
        added = [v - o for v, o in zip(values, off)]
        rows.append((mode, f"{report.percentile(values, 0.5):.2f}", f"{report.percentile(values, 0.95):.2f}",
                     "–" if mode == TTFT_MODES[0] else f"{statistics.median(added):.2f}"))
    return report.table(["input moderation", "first token p50 ms", "p95 ms", "added p50 ms (paired)"], rows)


def _local_ttft_only() -> int:
    """The first-token part alone, against the in-process engine: the check
    runs beside the prompt's prefill there, on the same cores."""
    os.environ["LOAD_MODELS"] = "1"
    _setup()
    # Imported here: after django.setup().
    from django.conf import settings

    from chatapp import embedded, runtime
    from safety import labelled

    settings.SAFETY_VERDICT_CACHE = 0  # every prompt is new: the latency of a first sight
    _, held_out = labelled.split(labelled.load())
    benign = list(dict.fromkeys(i.text for i in held_out if i.label == "benign"))
    try:
        runtime.start_engines(progress=lambda msg: None)
        times = asyncio.run(_ttft(benign, local=True))
    finally:
        runtime.shutdown_engines()
        embedded.stop_configured()
    print(f"Added before the first token ({len(times[TTFT_MODES[0]])} held-out benign prompts, each "
          f"{len(TTFT_MODES)} ways, "
          f"interleaved; the in-process engine, SmolLM2-135M, its prefill beside the check):\n")
    print(_ttft_table(times))
    print(f"load average {os.getloadavg()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkers", nargs="*", default=CANDIDATES, help="dotted paths to score alone")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/SAFETY.md")
    parser.add_argument("--no-ttft", action="store_true", help="skip the time added before the first token")
    parser.add_argument("--local-engine", action="store_true",
                        help="measure the first token against the in-process engine (the default deployment) "
                             "instead of a backend that answers at once; prints, writes nothing")
    args = parser.parse_args(argv)
    if args.local_engine:
        return _local_ttft_only()
    machine = report.machine_info()
    _setup()
    # Imported here: after django.setup().
    from chatapp import embedded
    from safety import labelled

    _, held_out = labelled.split(labelled.load())
    fresh = [i for i in held_out if "fresh" in i.tags]
    # Benign prompts only: each must reach a first token.
    benign = list(dict.fromkeys(i.text for i in held_out if i.label == "benign"))
    try:
        results = _evaluate(args.checkers, held_out)
        fresh_results = _evaluate(args.checkers, fresh)
        times = None if args.no_ttft else asyncio.run(_ttft(benign))
    finally:
        embedded.stop_configured()  # the embedded Postgres and Redis
    body = (_tables(results, f"held-out split, {len(held_out)} items")
            + "\n\nOnly the items written after the rules and the head were settled "
            f"(tag `fresh`, {len(fresh)} items):\n\n" + _tables(fresh_results, "fresh items"))
    if times is not None:
        body += (f"\n\nAdded before the first token ({len(times[TTFT_MODES[0]])} held-out benign prompts the "
                 f"pipeline lets through, each {len(TTFT_MODES)} ways, "
                 "interleaved; a backend that answers at once):\n\n" + _ttft_table(times))
    print(body)
    if not args.no_write:
        section = (
            f"{SECTION}\n\n{report.provenance('bench.safety', argv, machine)}\n\n"
            f"p50/p95 ms: the wall time one prompt spends in `safety.pipeline.run` (sequential, verdict cache off); "
            f"CPU: the process's CPU time for it, what it costs a quiet core. The time it adds before the first "
            f"token is measured through the gateway at the end.\n\n"
            f"{body}\n"
        )
        report.write_section(section, SECTION, SAFETY_MD)
        print(f"wrote its section of {SAFETY_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
