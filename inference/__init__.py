"""The inference engine: continuous batching over a paged, prefix-cached KV cache.

No Django here. Public surface: Engine, EngineConfig, SamplingParams,
resolve_device_and_dtype, Completion, the stream events and errors.

The names load lazily (PEP 562): `import inference`, SamplingParams and the
errors cost no torch, so processes that never run an engine (the Celery
worker, manage.py commands, the gateway's request building) do not import
torch or compile the TorchScript layer stack. `inference.Engine` brings both in.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads these
    from inference.config import EngineConfig, SamplingParams, resolve_device_and_dtype
    from inference.engine import Engine
    from inference.handle import RequestHandle
    from inference.outputs import (
        Completion,
        DeltaEvent,
        EngineSaturated,
        FinishEvent,
        PromptTooLong,
        RequestMetrics,
        TokenLogprob,
        UnsupportedModel,
        Usage,
    )

_MODULE_OF = {
    "EngineConfig": "inference.config",
    "SamplingParams": "inference.config",
    "resolve_device_and_dtype": "inference.config",
    "Engine": "inference.engine",
    "RequestHandle": "inference.handle",
    **{name: "inference.outputs" for name in (
        "Completion", "DeltaEvent", "EngineSaturated", "FinishEvent", "PromptTooLong", "RequestMetrics",
        "TokenLogprob", "UnsupportedModel", "Usage")},
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        # AttributeError (not ImportError) lets `from inference import pools` fall
        # through to importing the submodule.
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
