"""fp32 matmul weights packed once for the CPU's GEMM library (EngineConfig.pack_weights).

`F.linear` on the CPU hands MKL an unpacked weight, and MKL copies it into its
own blocked layout on every call: at the skinny row counts of a decode step
that copy is a large part of the matmul. Two libraries in torch's x86 wheels
can take the weight in their own layout once, at start:

- **MKL** (`mkl._mkl_reorder_linear_weight`, `cblas_sgemm_pack`; the op
  inductor's freezing pass uses; `mkl._mkl_linear` runs `cblas_sgemm_compute`
  on it). On the 2-core Xeon over SmolLM2-135M's layer matmuls
  (docs/BENCHMARKS.md "fp32 weights packed for MKL"): 1.4-1.8x faster than
  F.linear at 4-64 rows, 1.05-1.3x at one row and in prefill chunks; the
  lm_head 1.3-2.2x. On the 2-core AMD EPYC it was no faster than F.linear.
- **oneDNN** (`mkldnn._reorder_linear_weight` into an opaque oneDNN tensor,
  `mkldnn._linear_pointwise`; inductor's path for bf16 linears). On the EPYC,
  1.8-2.5x faster than F.linear and MKL's packed sgemm from 4 to 128 rows
  (docs/BENCHMARKS.md "fp32 weights packed for MKL or oneDNN").

Which is faster depends on the CPU (MKL picks slower paths on AMD), so
PACKERS are timed at start on the model's own layer shapes (choose_packer,
once per process and set of shapes) and the fastest is kept, or none when
neither beats F.linear by PACK_MIN_GAIN. `EngineConfig.pack_backend` names
one instead.

- **One pack serves every row count.** MKL's packed bytes do not depend on
  the row count given to the pack, but its speed does: packed for one row it
  ran 32 rows no faster than `F.linear`; packed for PACK_ROWS it was the
  fastest or within noise of it from 1 to 512 rows. `_mkl_linear` runs the
  packed weight only when the row count it is told equals the input's, so
  packed_linear always passes the input's own. oneDNN ran the same packed
  for 32 or 128 rows.
- **Sums.** Each output element is still one fp32 dot product over the input
  row, summed in another order: MKL's packed results were bit-identical to
  `F.linear`'s at 17 rows or more and differed in the last bits below, as
  `F.linear` at 8 rows already differs from `F.linear` at one; oneDNN's differ
  in the last bits. The engine's promise is HF generate's tokens, which the
  engine tests check with each packer.
- **Memory.** A second copy of the layer weights, while the unpacked ones
  stay for the engine's start. An engine that loaded its model itself then
  frees them (ModelRunner.release_float_weights; `_mkl_linear` reads the
  unpacked weight's shape only, and gets a one-element stand-in of that
  shape). SmolLM2-135M in fp32 (540 MB of weights, 427 MB of them in the
  layers) on the 2-core EPYC, RSS growth of one engine: 1019 MiB unpacked,
  1539 packed for oneDNN and 1693 for MKL while the unpacked weights stayed;
  1275 and 1428 freed. What is left above unpacked is mostly the safetensors
  file's pages, mapped and clean, which the kernel drops under pressure
  (anonymous memory, packed for oneDNN: 978 MiB kept, 715 freed). Quantized
  weights free their float copies the same way.
- **Where.** fp32 on the CPU, unquantized, in a torch built with MKL or
  oneDNN (x86 builds from PyPI); elsewhere packed_linear is plain `F.linear`
  and nothing is packed.

No Django here; packed_linear and onednn_linear are TorchScript-compatible
because the scripted layer stack in inference.llama calls them (through
quantization.quantized_linear).
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The matmul modes of packed weights in the scripted layer stack (beside
# inference.quantization's QUANT_* modes, whose slots packed weights ride).
QUANT_PACKED_FP32 = 3  # MKL
QUANT_PACKED_ONEDNN = 4
# The row count the weights are packed for (see the module docstring); chosen
# by bench.formats --packing's matrix on the 2-core Xeon.
PACK_ROWS = 128


def _mkl_packing_available() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear") \
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):  # a build without the mkl op namespace
        return False


def _onednn_packing_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


MKL_PACKING = _mkl_packing_available()
ONEDNN_PACKING = _onednn_packing_available()
# The packers this torch has, by EngineConfig.pack_backend name.
PACKERS = tuple(name for name, ok in (("mkl", MKL_PACKING), ("onednn", ONEDNN_PACKING)) if ok)
# A packer is kept only if its layer matmuls take at most this share of
# F.linear's time (mean over the timed row counts): below that the gain is
# within the noise of a start-up measurement and not worth a second copy.
PACK_MIN_GAIN = 0.9

if MKL_PACKING:
    def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x [T, in] fp32 @ weight^T (+ bias) through the packed copy: [T, out]."""
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.size(0))
else:
    # Defined without the mkl op, so that TorchScript can compile the layer
    # stack on a torch built without MKL (it resolves every op at compile time).
    def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)


if ONEDNN_PACKING:
    def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x [T, in] fp32 @ weight^T (+ bias) through oneDNN's packed copy: [T, out]."""
        scalars: List[Optional[Union[int, float, complex]]] = []  # the schema's Scalar?[]: no fused op
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", scalars, "")
else:
    # Without the mkldnn op, for TorchScript's sake as packed_linear above;
    # never called (nothing is packed for oneDNN then).
    def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, packed, bias)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return bool(PACKERS) and device.type == "cpu" and dtype == torch.float32


def pack_weight(weight: torch.Tensor, packer: str = "mkl", rows: int = 0) -> torch.Tensor:
    """The weight packed for `packer`, for calls of about `rows` rows (0: PACK_ROWS).
    oneDNN packs a bf16 weight as bf16 (inference.llama.bf16_block_linear)."""
    if packer == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows or PACK_ROWS)
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows or PACK_ROWS)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, packer: str) -> torch.Tensor:
    """x @ weight^T through a copy packed by pack_weight(weight, packer)."""
    if packer == "onednn":
        return onednn_linear(x, packed, None)
    return packed_linear(x, packed, weight, None)


@dataclass
class PackerChoice:
    packer: str | None  # the packer kept, or None: F.linear is as fast
    rows: tuple[int, ...] = ()
    times_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # median per contender and rows

    def summary(self) -> str:
        cells = "; ".join(f"{name} " + "/".join(f"{ms:.2f}" for ms in by_rows.values())
                          for name, by_rows in self.times_ms.items())
        kept = self.packer or "none (unpacked)"
        return f"{kept} (layer matmuls, ms at {'/'.join(map(str, self.rows))} rows: {cells})"


@functools.cache
def choose_packer(shapes: tuple[tuple[int, int], ...], rows: tuple[int, ...] = (1, 8, 32, 128),
                  copies: int = 3, rounds: int = 5) -> PackerChoice:
    """Time F.linear and each packer on layer matmuls of the given (out, in)
    shapes and keep the fastest packer (mean of its time over F.linear's at
    each row count), if it is PACK_MIN_GAIN faster. Random weights: the speed
    does not depend on the values. `copies` of each shape, so the weights
    stream from memory a little as a step's do; contenders interleaved in
    every round, medians kept. Once per process and set of shapes (about half
    a second for SmolLM2's)."""
    if not PACKERS:
        return PackerChoice(None)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=generator) for out, inp in shapes for _ in range(copies)]
    packs = {name: [pack_weight(w, name) for w in weights] for name in PACKERS}
    inputs = {(n, inp): torch.randn(n, inp, generator=generator) for n in rows for _out, inp in shapes}
    contenders = ("unpacked", *PACKERS)
    samples: dict[str, dict[int, list[float]]] = {c: {n: [] for n in rows} for c in contenders}
    with torch.inference_mode():
        for round_index in range(rounds + 1):  # round 0 warms up (oneDNN builds kernels on first use)
            for n in rows:
                for contender in contenders:
                    began = time.perf_counter()
                    for index, w in enumerate(weights):
                        x = inputs[(n, w.size(1))]
                        if contender == "unpacked":
                            F.linear(x, w)
                        else:
                            packed_matmul(x, packs[contender][index], w, contender)
                    if round_index:
                        samples[contender][n].append((time.perf_counter() - began) * 1000)
    times = {c: {n: statistics.median(samples[c][n]) for n in rows} for c in contenders}
    relative = {name: statistics.fmean(times[name][n] / times["unpacked"][n] for n in rows) for name in PACKERS}
    best = min(relative, key=relative.get)
    return PackerChoice(best if relative[best] <= PACK_MIN_GAIN else None, rows, times)


def layer_shapes(hf_config) -> tuple[tuple[int, int], ...]:
    """The (out, in) shapes of a Llama-family layer's matmuls as the paged
    forward fuses them (inference.llama): qkv, o, gate_up, down."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    return ((heads * dim + 2 * kv_heads * dim, hidden), (hidden, heads * dim), (2 * inter, hidden), (hidden, inter))


def resolve_packer(backend: str, hf_config) -> tuple[str, PackerChoice | None]:
    """The packer for EngineConfig.pack_backend ("auto": measured by
    choose_packer, whose report comes back too); "none" when nothing is packed."""
    if backend != "auto":
        if backend not in PACKERS:
            raise ValueError(f"pack_backend {backend!r} is not available in this torch "
                             f"(available: {', '.join(PACKERS) or 'none'})")
        return backend, None
    choice = choose_packer(layer_shapes(hf_config))
    return choice.packer or "none", choice


def shape_only(t: torch.Tensor) -> torch.Tensor:
    """One element seen at t's shape: for what reads only a weight's shape
    (MKL's packed matmul, packed_linear), once the weight itself is freed."""
    return torch.zeros((1, 1), dtype=t.dtype, device=t.device).expand(t.shape)


def pack_paged(net, packer: str = "mkl") -> None:
    """Give a PagedLlama's matmuls packed copies of their weights, in the slots
    quantized weights take (inference.quantization): the weight slot holds the
    packed copy and the scale slot the unpacked weight."""
    mode = QUANT_PACKED_ONEDNN if packer == "onednn" else QUANT_PACKED_FP32
    scales = []
    for w in net.weights:
        layer_scales = []
        for slot in (1, 2, 4, 5):  # qkv, o, gate_up, down (see llama._layers)
            original = w[slot]
            w[slot] = pack_weight(original, packer)
            layer_scales.append(original)
        scales.append(layer_scales)
    net.weight_scales = scales
    net.quant_mode = mode
    net.lm_head_quantized = (pack_weight(net.lm_head, packer), net.lm_head, mode)
