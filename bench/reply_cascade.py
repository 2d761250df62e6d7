"""Could a cheaper head clear replies before the full one reads them?

    python -m bench.reply_cascade [--tokens 128] [--rounds 3] [--write]

Moderation of replies caps the relay at 32 streams (bench.reply_floor): the
`minilm` head reads every reply. Prompts already go through a cascade whose
first stage, the `minilm2` head, clears a prompt below the lowest risk it gave
any harmful training item. This bench asks whether a head trained on prompts
can do the same for replies, on replies a model really writes:

- the bundled SmolLM2 answers every prompt of the labelled set (greedy,
  --tokens tokens at most; as a small model does, it answers many harmful
  ones), and bench/data's public-domain texts are cut into reply-sized
  windows;
- the `minilm` head checks each reply as the output window does (the
  embedding head checker, verdict cache off): the replies it flags or blocks
  are the ones a first stage must not clear;
- each cheaper head (`minilm2`, `static`) scores every reply's windows on
  the harm categories (a reply gets no injection or jailbreak verdicts, and
  prose reads to these heads as a pasted document, the injection class, so
  1 - P(benign) clears no reply); the table gives how much of the benign
  replies each could clear without letting any flagged reply through, and
  at a few fixed thresholds what it would clear and let through;
- the checker's time a reply for each head, best of --rounds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import report, setup_django_offline

SECTION = "## Could a cheaper head clear replies first? (bench.reply_cascade)"
DATA = Path(__file__).resolve().parent / "data"
PROSE = ("pride_and_prejudice_ch1.txt", "gettysburg_address.txt", "us_constitution_opening.md")
WINDOW_CHARS = 650  # about a 128-token reply
HEADS = ("minilm2", "static")
THRESHOLDS = (0.01, 0.02, 0.05, 0.1)


def _replies(prompts: list[str], tokens: int) -> list[str]:
    """SmolLM2's greedy replies to `prompts`, through the engine."""
    from bench.engine import bundled_model_dir
    from inference import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(bundled_model_dir(), EngineConfig(kv_cache_bytes=2**30, max_num_seqs=64))
    try:
        ids = [engine.apply_chat_template([{"role": "user", "content": p}])[-1024:] for p in prompts]
        completions = engine.generate(ids, [SamplingParams(max_tokens=tokens, temperature=0.0)] * len(ids))
        return [engine.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    finally:
        engine.shutdown()


def _prose() -> list[str]:
    windows = []
    for name in PROSE:
        text = (DATA / name).read_text()
        windows += [text[i:i + WINDOW_CHARS] for i in range(0, max(1, len(text) - WINDOW_CHARS // 2), WINDOW_CHARS)]
    return windows


def harm_risk(head, texts: list[str]) -> np.ndarray:
    """[N] each text's highest harm risk over its windows: the probability
    `head` puts on the harm categories, as the checker windows and folds it."""
    from safety.checkers import windows
    from safety.normalize import fold
    from safety.taxonomy import BENIGN, JAILBREAK, PROMPT_INJECTION

    parts = [windows(fold(t)) for t in texts]
    probabilities = head.probabilities([w for p in parts for w in p])  # [W, C]
    harm = [k for k, label in enumerate(head.labels) if label not in (BENIGN, PROMPT_INJECTION, JAILBREAK)]
    risk = probabilities[:, harm].sum(axis=1)
    out, row = [], 0
    for p in parts:
        out.append(float(risk[row:row + len(p)].max()))
        row += len(p)
    return np.asarray(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens a reply at most")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each head's check (best kept)")
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    setup_django_offline()
    from django.conf import settings

    from retrieval import services as retrieval_services
    from safety import checkers, labelled
    from safety.taxonomy import ALLOW, BENIGN, JAILBREAK, PROMPT_INJECTION

    settings.SAFETY_VERDICT_CACHE = 0
    items = labelled.load()
    started = time.perf_counter()
    replies = _replies([i.text for i in items], args.tokens) + _prose()
    generated_s = time.perf_counter() - started
    labels = [i.label for i in items] + ["prose"] * (len(replies) - len(items))
    benign = np.asarray([label in (BENIGN, "prose") for label in labels])

    settings.SAFETY_HEAD_FEATURIZER = "minilm"
    checker = checkers.EmbeddingHeadChecker()
    checker.warm()
    caught = np.asarray([any(v.action != ALLOW for v in vs) for vs in checker.check(replies, "output")])
    by_group = {
        "benign prompts": [label == BENIGN for label in labels],
        "harm-category prompts": [label not in (BENIGN, PROMPT_INJECTION, JAILBREAK, "prose") for label in labels],
        "injection and jailbreak prompts": [label in (PROMPT_INJECTION, JAILBREAK) for label in labels],
        "public-domain prose windows": [label == "prose" for label in labels],
    }
    groups = report.table(["replies to", "count", "flagged or blocked by the minilm head"],
                          [(name, sum(m), int(caught[np.asarray(m)].sum())) for name, m in by_group.items()])

    best, risks = {name: float("inf") for name in ("minilm", *HEADS)}, {}
    for _ in range(args.rounds):
        for name in best:
            retrieval_services.forget()
            head = checkers.head(name)
            start = time.perf_counter()
            risks[name] = harm_risk(head, replies)
            best[name] = min(best[name], time.perf_counter() - start)
    rows = []
    for name in HEADS:
        risk = risks[name]
        floor = float(risk[caught].min()) if caught.any() else float("inf")
        cells = [f"{floor:.4f}: {np.mean(risk[benign] < floor):.0%}"]
        cells += [f"{np.mean(risk[benign] < t):.0%} / {int((risk[caught] < t).sum())}" for t in THRESHOLDS]
        rows.append((name, f"{1e3 * best[name] / len(replies):.1f}", *cells))
    table = report.table(
        ["first stage", "ms a reply (the minilm head: "
         f"{1e3 * best['minilm'] / len(replies):.1f})", "cleared below the lowest flagged reply's risk: benign cleared",
         *(f"below {t}: benign cleared / flagged let through" for t in THRESHOLDS)], rows)
    text = "\n\n".join([
        f"Command: `{report.command_line('bench.reply_cascade', argv)}`. {report.machine_header(machine)} "
        f"{settings.EMBEDDING_THREADS} torch thread(s) for the embedding heads, as in the product.",
        f"SmolLM2's greedy replies ({args.tokens} tokens at most, generated in {generated_s:.0f} s) to the "
        f"{len(items)} prompts of safety/data/labelled.jsonl, and bench/data's public-domain texts in "
        f"{WINDOW_CHARS}-character windows. The `minilm` head, which reads every reply today, flags or blocks:",
        groups,
        f"Each cheaper head's harm risk (its harm categories' probability, the highest over a reply's windows) "
        f"against those {int(caught.sum())} flagged replies; the {int(benign.sum())} benign ones are the replies "
        f"to benign prompts and the prose windows; time: one check of all {len(replies)} replies, best of "
        f"{args.rounds}:",
        table,
        "A first stage may clear only what the `minilm` head would not flag: its threshold must sit below every "
        "flagged reply's risk (the third column), or it lets that many through (the others).",
    ])
    print(text)
    if args.write:
        report.write_section(f"{SECTION}\n\n{text}\n", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
