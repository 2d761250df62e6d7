"""all-MiniLM-L6-v2 in numpy, for the Celery worker's ingestion.

Why not sentence-transformers there: the worker must not import torch
(chatapp.celery keeps it model-free for the *chat* model, ~100 MB per
process); torch alone adds about 400 MB to each pool process. This is the
same BERT forward pass (6 layers, mean pooling, L2 norm) on the same
safetensors weights and the same `tokenizers` tokenizer, in numpy, on the
worker's own threads (DOCUMENTS_EMBED_THREADS BLAS threads, so a worker
never takes every core from the engines beside it). Its vectors match
sentence-transformers' to a cosine of 0.9999+ (tests/documents/test_embedder.py),
so the serving process embeds questions with `retrieval.services` (torch,
already loaded for the semantic cache) and searches these vectors.
"""
from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
from django.conf import settings
from safetensors.numpy import load_file
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer

from retrieval import services as retrieval_services

DIMENSIONS = 384
_lock = threading.Lock()


def model_dir() -> Path:
    # The same folder as the torch embeddings' (retrieval.services imports torch only to embed).
    return Path(retrieval_services.model_path())


def model_name() -> str:
    """Stored with each chunk: `reindex_documents` re-embeds the others."""
    return settings.EMBEDDING_MODEL or "bundled:all-MiniLM-L6-v2"


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (error < 1.5e-7): numpy has no erf, and
    # BERT's GELU is the exact one.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class Bert:
    def __init__(self, path: Path):
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "bert":
            raise ValueError(f"{path}: the worker's embedder runs BERT models only, not {config.get('model_type')!r}")
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config.get("layer_norm_eps", 1e-12)
        self.w = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
        max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.enable_padding()

    def _linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _attention(self, x, mask, p):
        b, s, h = x.shape
        d = h // self.heads

        def split(t):  # [B, S, H] -> [B, heads, S, d]
            return t.reshape(b, s, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(self._linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + mask  # [B, heads, S, S]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (scores / scores.sum(-1, keepdims=True)) @ v  # [B, heads, S, d]
        return ctx.transpose(0, 2, 1, 3).reshape(b, s, h)

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, 384] unit vectors."""
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc])  # [B, S]
        keep = np.array([e.attention_mask for e in enc], dtype=np.float32)  # [B, S]
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        mask = ((1.0 - keep) * -1e9)[:, None, None, :]  # [B, 1, 1, S]
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            a = self._linear(self._attention(x, mask, p), f"{p}.attention.output.dense")
            x = _layer_norm(x + a, w[f"{p}.attention.output.LayerNorm.weight"], w[f"{p}.attention.output.LayerNorm.bias"], self.eps)
            hidden = self._linear(x, f"{p}.intermediate.dense")
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / np.sqrt(2.0)))
            out = self._linear(hidden, f"{p}.output.dense")
            x = _layer_norm(x + out, w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"], self.eps)
        pooled = (x * keep[:, :, None]).sum(1) / np.maximum(keep.sum(1, keepdims=True), 1e-9)  # [B, H]
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@lru_cache(maxsize=1)
def _model() -> Bert:
    return Bert(model_dir())


@lru_cache(maxsize=1)
def counting_tokenizer() -> Tokenizer:
    """The model's tokenizer without truncation or padding (for chunking;
    loads no weights)."""
    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def embed_batch(texts: list[str]) -> list[list[float]]:
    """Unit vectors for `texts`, on this thread with DOCUMENTS_EMBED_THREADS BLAS threads."""
    with _lock, threadpool_limits(limits=settings.DOCUMENTS_EMBED_THREADS):
        return _model().encode(list(texts)).astype(np.float32).tolist()
