"""The first chat after a start: what its user waits for once `serve` says it is ready.

    .venv/bin/python -m bench.first_chat [--rounds 2] [--baseline-tree DIR] [--write]

Starts `manage.py serve --no-worker` with default settings (LOAD_MODELS=1, the
bundled SmolLM2, default moderation and caches) on one embedded Postgres and
Redis, times it to a healthy /healthz, then streams one /v1 chat completion
and times its first token, then a second chat's. Each round starts every tree
afresh (DIR first: a tree exported with `git archive`, this benchmark run from
this checkout), after one start of this tree that is not counted (it converts
the bundled model once and fills the page cache).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import free_port, report, shared_services_env, wait_healthy
from bench.relay import make_keys, setup_django
from bench.report import ROOT

SECTION = "## The first chat after a start (bench.first_chat)"
QUESTIONS = ("How do tides work?", "Why is the sky blue?", "What makes bread rise?", "How do bees find flowers?")


def start(tree: Path, name: str) -> tuple[subprocess.Popen, int, float]:
    """`serve` from `tree` on the shared database and Redis; the seconds it took to be healthy."""
    from django.conf import settings

    env = {
        **os.environ,
        **shared_services_env(name),
        "MODELS_DIR": str(ROOT / "var" / "models"),  # the converted SmolLM2, shared by every start
        "LOAD_MODELS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    log = open(Path(settings.DATA_DIR) / f"{name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "manage.py", "serve", "--no-worker", "--port", str(port)],
                            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log.name)
    return proc, port, time.perf_counter() - started


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def first_token_s(port: int, key: str, question: str) -> float:
    """Seconds from the request's send to its first streamed text."""
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    # The model's name is part of what a client's first request costs.
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=120).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120,
                      headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return time.perf_counter() - started
    raise RuntimeError("the reply streamed no text")


def one_start(tree: Path, name: str, key: str) -> dict:
    proc, port, ready_s = start(tree, name)
    try:
        first = first_token_s(port, key, QUESTIONS[0])
        second = first_token_s(port, key, QUESTIONS[1])
    finally:
        stop(proc)
    return {"ready_s": ready_s, "first_ms": first * 1000, "second_ms": second * 1000}


def render(results: dict[str, list[dict]]) -> str:
    rows = []
    for label, runs in results.items():
        for i, r in enumerate(runs, start=1):
            rows.append((label, i, f"{r['ready_s']:.1f}", f"{r['first_ms']:.0f}", f"{r['second_ms']:.0f}"))
        rows.append((f"**{label}, median**", "", f"{statistics.median(r['ready_s'] for r in runs):.1f}",
                     f"{statistics.median(r['first_ms'] for r in runs):.0f}",
                     f"{statistics.median(r['second_ms'] for r in runs):.0f}"))
    return report.table(["tree", "round", "start → healthy /healthz, s", "first chat: first token, ms",
                         "second chat: first token, ms"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-tree", type=Path, help="an earlier tree (git archive) started the same way")
    parser.add_argument("--baseline-label", default="before")
    parser.add_argument("--write", action="store_true", help="write its section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    data_dir = Path(tempfile.mkdtemp(prefix="firstchat-"))
    trees = ([(args.baseline_label, args.baseline_tree.resolve())] if args.baseline_tree else []) + [("this tree", ROOT)]
    results: dict[str, list[dict]] = {label: [] for label, _ in trees}
    try:
        setup_django(data_dir)
        key = make_keys(1)[0]
        stop(start(ROOT, "warm-up")[0])
        for round_ in range(args.rounds):
            for i, (label, tree) in enumerate(trees):
                results[label].append(one_start(tree, f"r{round_}t{i}", key))
                print(label, results[label][-1], flush=True)
    finally:
        from chatapp import embedded  # after setup_django()

        embedded.stop_configured()
        shutil.rmtree(data_dir, ignore_errors=True)
    body = render(results)
    print(body)
    if args.write:
        section = (f"{SECTION}\n\n{report.provenance('bench.first_chat', argv, machine)}\n\n"
                   f"Each start is `manage.py serve --no-worker` with default settings (LOAD_MODELS=1), one /v1 "
                   f"chat streamed after /healthz first answers, then a second; trees alternate within each "
                   f"of {args.rounds} rounds.\n\n{body}\n")
        report.write_section(section, SECTION)
        print(f"wrote its section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
