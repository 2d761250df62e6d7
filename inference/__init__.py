"""The inference engine: continuous batching over a paged, prefix-cached KV cache.

No Django here (the adapter lives in inference.pools). Public surface:
Engine, EngineConfig, SamplingParams, Completion, the stream events and errors.
"""
from inference.config import EngineConfig, SamplingParams
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

__all__ = [
    "Completion", "DeltaEvent", "Engine", "EngineConfig", "EngineSaturated", "FinishEvent",
    "PromptTooLong", "RequestHandle", "RequestMetrics", "SamplingParams", "TokenLogprob",
    "UnsupportedModel", "Usage",
]
