"""Moderation quality and cost: `python -m bench.safety`.

Scores every checker alone, and the configured pipeline (SAFETY_CHECKERS),
on the held-out split of the labelled set (safety/data/labelled.jsonl, see
safety.labelled; the embedding head never saw these items): precision,
recall and F1 per category, the share of benign items flagged, and the
added latency per prompt (p50/p95, verdict cache off: every text is new).
A text counts as detected for a category when a verdict of that category
(its top-level name) flags or blocks it; injection and jailbreak are also
scored together as "attack", the target's unit. Writes the "Evaluation"
section of docs/SAFETY.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

from bench import report

SAFETY_MD = report.ROOT / "docs" / "SAFETY.md"
SECTION = "## Evaluation (bench.safety)"
CANDIDATES = [
    "safety.checkers.RulesChecker",
    "safety.checkers.EmbeddingHeadChecker",
    "safety.checkers.GuardrailChecker",
    "safety.checkers.ProfanityChecker",
]
ATTACK = ("prompt_injection", "jailbreak")


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


def _measure(run, items) -> tuple[dict, list[float]]:
    found, latencies = [], []
    for item in items:
        started = time.perf_counter()
        decision = run(item.text)
        latencies.append((time.perf_counter() - started) * 1000)
        found.append(_detected(decision))
    return _score(items, found), latencies


def _evaluate(paths: list[str], items) -> list[tuple[str, dict, list[float]]]:
    from django.conf import settings

    from safety import pipeline

    settings.SAFETY_VERDICT_CACHE = 0  # every prompt is new: the latency of a first sight
    results = []
    for name, checker_paths in [*[(p.rsplit(".", 1)[1], [p]) for p in paths],
                                ("pipeline (SAFETY_CHECKERS)", list(settings.SAFETY_CHECKERS))]:
        settings.SAFETY_CHECKERS = checker_paths
        pipeline.run(["warm up the models"], source="input")  # loads them: not a prompt's cost
        score, latencies = _measure(lambda text: pipeline.run([text], source="input")[0], items)
        results.append((name, score, latencies))
    return results


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def _tables(results, label: str) -> str:
    summary = [("checker", "attack recall", "attack precision", "benign flagged", "p50 ms", "p95 ms")]
    detail = []
    for name, score, latencies in results:
        attack = score["rows"].get("attack", (float("nan"),) * 4)
        summary.append((name, _fmt(attack[1]), _fmt(attack[0]), f"{score['fpr']:.1%}",
                        f"{report.percentile(latencies, 0.5):.2f}", f"{report.percentile(latencies, 0.95):.2f}"))
        rows = [(category, _fmt(p), _fmt(r), _fmt(f1), n) for category, (p, r, f1, n) in score["rows"].items()]
        detail.append(f"**{name}** ({label}):\n\n" + report.table(["category", "precision", "recall", "F1", "items"], rows))
    return report.table(list(summary[0]), summary[1:]) + "\n\n" + "\n\n".join(detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkers", nargs="*", default=CANDIDATES, help="dotted paths to score alone")
    parser.add_argument("--no-write", action="store_true", help="do not write its section of docs/SAFETY.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    _setup()
    # Imported here: after django.setup().
    from chatapp import embedded
    from safety import labelled

    _, held_out = labelled.split(labelled.load())
    fresh = [i for i in held_out if "fresh" in i.tags]
    try:
        results = _evaluate(args.checkers, held_out)
        fresh_results = _evaluate(args.checkers, fresh)
    finally:
        embedded.stop_configured()  # the embedded Postgres the rules were read from
    body = (_tables(results, f"held-out split, {len(held_out)} items")
            + "\n\nOnly the items written after the rules and the head were settled "
            f"(tag `fresh`, {len(fresh)} items):\n\n" + _tables(fresh_results, "fresh items"))
    print(body)
    if not args.no_write:
        section = (
            f"{SECTION}\n\n`{report.command_line('bench.safety', argv)}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {report.machine_header(machine)}\n\n"
            f"Latency is the time one prompt spends in `safety.pipeline.run` (sequential, verdict cache off), "
            f"which the gateway awaits before it routes the request: the time added before the first token.\n\n"
            f"{body}\n"
        )
        report.write_section(section, SECTION, SAFETY_MD)
        print(f"wrote its section of {SAFETY_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
