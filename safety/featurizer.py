"""What the embedding head reads: a text's vector, by one of two featurizers.

- "static" (default): static token embeddings distilled from the bundled
  all-MiniLM-L6-v2 by model2vec (`python -m safety.distill`, shipped in
  safety/data/static/): a text's vector is the mean of its tokens' rows, no
  transformer pass. About 0.6 ms of CPU per short prompt against 16-22 ms for
  the MiniLM pass, on any CPU (numpy only: no AMX or bf16 needed). Run on the
  pipeline's own threads: it is too cheap to queue for the embedding thread.
- "minilm": the MiniLM sentence embeddings of retrieval.services.embed, on
  the embedding thread, shared with the documents, memory and semantic cache.

A head is trained on one featurizer's vectors (`python -m safety.train
--featurizer NAME`) and records its name; SAFETY_HEAD_FEATURIZER picks which
head the checker loads. docs/SAFETY.md has both measured side by side.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from retrieval.services import embed

DATA = Path(__file__).resolve().parent / "data"
STATIC_PATH = DATA / "static"
HEAD_PATHS = {"static": DATA / "head.npz", "minilm": DATA / "head-minilm.npz"}

_static = None
_static_lock = threading.Lock()


def _static_model():
    global _static
    with _static_lock:
        if _static is None:
            # model2vec is imported on first use, with the model: a process
            # that never moderates does not load it.
            from model2vec import StaticModel

            # A local folder: nothing is fetched from a hub.
            _static = StaticModel.from_pretrained(STATIC_PATH, force_download=False)
    return _static


def _static_vectors(texts: list[str]) -> np.ndarray:
    vectors = np.asarray(_static_model().encode(list(texts)), dtype=np.float32)  # [N, D]
    # Unit length, as the head was trained: a long text's mean is not smaller.
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def vectors(texts: list[str], featurizer: str) -> np.ndarray:
    """[N, D] float32 vectors of `texts` (folded already) by `featurizer`."""
    if featurizer == "static":
        return _static_vectors(texts)
    if featurizer == "minilm":
        return np.asarray(embed(texts), dtype=np.float32)
    raise ValueError(f"unknown featurizer {featurizer!r}: use one of {sorted(HEAD_PATHS)}")
