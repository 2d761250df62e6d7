"""An engine that loads its own model frees the float copies of the layer
weights once the layer stack runs on quantized or packed copies
(ModelRunner.release_float_weights), and its tokens do not change; a module
the caller passes in stays whole, and so do the plain weights few-row fp32
steps multiply by (EngineConfig.small_linear_rows)."""
from __future__ import annotations

import pytest

from inference import Engine, EngineConfig, SamplingParams, packing

from .conftest import make_prompts, tiny_llama

pytestmark = pytest.mark.timeout(180)

# hidden 64, intermediate 160, 3 layers, 4 heads of 16, 2 KV heads (tests/inference/conftest.tiny_llama).
LAYER_PARAMS = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 160 * 64 + 64 * 160
LAYER_BYTES = 3 * LAYER_PARAMS * 4  # fp32

# Packed, with few-row steps on the packed copies too (small_linear_rows=0): with
# small_linear on, the plain weights stay (test_engine_small_linear).
RELEASED = [pytest.param({"pack_backend": name, "small_linear_rows": 0}, id=f"packed-{name}",
                         marks=pytest.mark.skipif(name not in packing.PACKERS, reason=f"no {name} in this torch"))
            for name in ("mkl", "onednn")] + [
    pytest.param({"quantization": "int8"}, id="int8"),
    pytest.param({"quantization": "int8_weight_only"}, id="int8-weight-only"),
    pytest.param({"quantization": "int4_weight_only"}, id="int4-weight-only"),
]


def _linears(model):
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        yield from (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _run(model_or_loader, settings):
    prompts = make_prompts(6, seed=11, max_len=40)
    config = EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128, **settings)
    with Engine(model_or_loader, None, config) as engine:
        tokens = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))]
        return tokens, engine.released_weight_bytes, engine.runner.net


@pytest.mark.parametrize("settings", RELEASED)
def test_an_engine_that_loads_its_model_frees_the_float_layer_weights(settings):
    given = tiny_llama()
    expected, released, _net = _run(given, settings)
    assert released == 0  # the caller's module: untouched
    assert all(linear.weight.numel() > 0 for linear in _linears(given))

    loaded = []

    def load():
        loaded.append(tiny_llama())
        return loaded[0]

    got, released, net = _run(load, settings)
    assert got == expected
    assert all(len(tokens) == 12 for tokens in got)
    assert released == LAYER_BYTES
    # Nothing the engine keeps holds the float weights any more: the HF module's
    # are empty, and what is left in their place is one element seen at the shape.
    assert all(linear.weight.numel() == 0 for linear in _linears(loaded[0]))
    for layer in net.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            assert layer[name].untyped_storage().nbytes() <= 4
    kept = sum(s.untyped_storage().nbytes() for layer in net.weight_scales for s in layer)
    if "pack_backend" in settings:
        assert kept <= 4 * 4 * 3  # the unpacked weights' slots: shapes only
    else:
        assert kept > 0  # the quantized weights' real scales


def test_unpacked_fp32_keeps_its_weights(monkeypatch):
    """The layer stack multiplies by the float weights themselves: nothing to free."""
    expected, _released, _net = _run(tiny_llama(), {"pack_weights": False})
    loaded = []

    def load():
        loaded.append(tiny_llama())
        return loaded[0]

    got, released, _net = _run(load, {"pack_weights": False})
    assert got == expected and released == 0
    assert all(linear.weight.numel() > 0 for linear in _linears(loaded[0]))


def test_the_heap_is_trimmed_once_built_and_a_libc_without_trim_is_no_error(monkeypatch):
    """Engine._build hands glibc's free pages back (malloc_trim(0)); where
    there is no libc.so.6 or no malloc_trim in it, the engine starts all the same."""
    from types import SimpleNamespace

    from inference import engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module.ctypes, "CDLL", lambda name: SimpleNamespace(malloc_trim=calls.append))
    with Engine(tiny_llama(), None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128)) as engine:
        assert calls == [0] and engine.stats()["running"] == 0

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(engine_module.ctypes, "CDLL", missing)
    engine_module._trim_heap()
    monkeypatch.setattr(engine_module.ctypes, "CDLL", lambda name: SimpleNamespace())  # no malloc_trim
    engine_module._trim_heap()
