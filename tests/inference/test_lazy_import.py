"""Processes that never run an engine (the Celery worker, manage.py commands,
the gateway building its requests) import the inference package without
paying for torch or the TorchScript compile."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_torch(code: str) -> bool:
    check = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


@pytest.mark.parametrize("code", [
    "import inference",
    "import inference.config",
    "from inference import SamplingParams, EngineSaturated, PromptTooLong, EngineConfig",
    "from inference import DeltaEvent, FinishEvent, Usage, resolve_device_and_dtype",
    "from inference.config import resolve_device_and_dtype; resolve_device_and_dtype('cpu', 'auto')",
    "from inference import EngineConfig; EngineConfig(kv_cache_bytes=2**20)",
])
def test_it_imports_without_torch(code):
    assert not imports_torch(code)


def test_the_engine_still_brings_torch_in():
    assert imports_torch("from inference import Engine")


def test_unknown_names_are_attribute_errors():
    import inference

    with pytest.raises(AttributeError):
        inference.NoSuchThing  # noqa: B018
