"""Device and dtype: "auto" and None resolved in one place."""
from __future__ import annotations

import pytest
import torch

from inference import EngineConfig, resolve_device_and_dtype


def test_auto_resolves_to_the_machine():
    device, dtype = resolve_device_and_dtype("auto", None)
    if torch.cuda.is_available():
        assert device == "cuda" and dtype in ("bfloat16", "float16")
    else:
        assert (device, dtype) == ("cpu", "float32")


def test_cpu_dtype_none_is_fp32_auto_is_left_to_measuring_and_explicit_values_pass_through():
    assert resolve_device_and_dtype("cpu", None) == ("cpu", "float32")
    # On the CPU "auto" is decided by timing the model's matmuls (inference.formats).
    assert resolve_device_and_dtype("cpu", "auto") == ("cpu", "auto")
    assert resolve_device_and_dtype("cpu", "bfloat16") == ("cpu", "bfloat16")
    assert resolve_device_and_dtype("cuda:1", "float16") == ("cuda:1", "float16")


def test_engine_config_resolves_through_it():
    config = EngineConfig(device="auto")
    assert (config.device, config.dtype) == resolve_device_and_dtype("auto", None)
    assert EngineConfig(dtype=None).dtype == "float32"


def test_cuda_graphs_are_refused_without_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        EngineConfig(device="cpu", cuda_graphs=True)
