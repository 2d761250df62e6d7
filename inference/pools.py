"""Django-side adapter: named engine pools built from settings.MODEL_POOLS.

The engine core imports no Django; this module is the one place that reads
settings for it. `serve` calls start_all() once; the gateway calls get().
"""
from __future__ import annotations

import logging
import sys
import threading

from django.conf import settings

log = logging.getLogger(__name__)

_engines: dict = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()


class PoolUnavailable(RuntimeError):
    pass


def _device_and_dtype() -> tuple[str, str]:
    import torch

    device = settings.ENGINE_DEVICE
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.ENGINE_DTYPE
    if dtype == "auto":
        # fp32 on CPU (half-precision matmuls are slow there); bf16 where the GPU has it.
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


def engine_config(spec: dict):
    from inference import EngineConfig

    device, dtype = _device_and_dtype()
    return EngineConfig(
        device=device,
        dtype=dtype,
        kv_cache_bytes=int(spec["kv_cache_mb"]) * 2**20,
        max_num_seqs=int(spec["max_num_seqs"]),
        max_num_batched_tokens=int(spec["max_num_batched_tokens"]),
        max_waiting=int(spec["max_waiting"]),
        num_threads=int(spec["num_threads"]) or None,
    )


def share_the_gil_with_engines() -> None:
    """Shorten the interpreter's switch interval (ENGINE_GIL_SWITCH_INTERVAL_MS)
    in a process that runs an engine beside other Python threads; never
    lengthen it."""
    interval_s = settings.ENGINE_GIL_SWITCH_INTERVAL_MS / 1000
    if 0 < interval_s < sys.getswitchinterval():
        sys.setswitchinterval(interval_s)


def start(name: str, progress=print):
    from inference import Engine
    from inference.bootstrap import resolve_model

    share_the_gil_with_engines()
    spec = {**settings.ENGINE_DEFAULTS, **settings.MODEL_POOLS[name]}
    with _lock:
        if name in _engines:
            return _engines[name]
        try:
            path = resolve_model(spec["model"], settings.MODELS_DIR, progress=progress)
            engine = Engine.from_pretrained(path, engine_config(spec))
        except Exception as exc:
            _errors[name] = f"{type(exc).__name__}: {exc}"
            raise
        _engines[name] = engine
        _errors.pop(name, None)
        progress(f"model pool {name!r} ready: {spec['model']}")
        return engine


def start_all(progress=print) -> None:
    for name in settings.MODEL_POOLS:
        start(name, progress=progress)


def get(name: str | None = None):
    """The running engine of a pool; started on first use in processes that
    did not start it at boot (the Celery worker, tests)."""
    name = name or settings.DEFAULT_POOL
    if name not in settings.MODEL_POOLS:
        raise PoolUnavailable(f"unknown model pool {name!r}")
    engine = _engines.get(name)
    if engine is None:
        engine = start(name, progress=log.info)
    return engine


def loaded(name: str) -> bool:
    return name in _engines


def register(name: str, engine) -> None:
    """Install an already-built engine (tests, embedding callers)."""
    with _lock:
        _engines[name] = engine


def unregister(name: str):
    """Take a registered engine out (without shutting it down); returns it, or None."""
    with _lock:
        return _engines.pop(name, None)


def health() -> dict:
    report = {}
    for name, spec in settings.MODEL_POOLS.items():
        engine = _engines.get(name)
        if engine is not None:
            try:
                report[name] = {"status": "ok", "model": spec["model"], "stats": engine.stats()}
            except Exception as exc:
                report[name] = {"status": "down", "model": spec["model"], "detail": str(exc)}
        elif name in _errors:
            report[name] = {"status": "down", "model": spec["model"], "detail": _errors[name]}
        elif settings.LOAD_MODELS:
            report[name] = {"status": "down", "model": spec["model"], "detail": "not loaded"}
        else:
            report[name] = {"status": "ok", "model": spec["model"], "detail": "lazy: loads on first use"}
    return report


def shutdown_all() -> None:
    with _lock:
        for name, engine in list(_engines.items()):
            try:
                engine.shutdown()
            except Exception:
                log.exception("shutting down pool %s", name)
        _engines.clear()
