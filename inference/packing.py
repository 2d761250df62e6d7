"""fp32 matmul weights packed once for MKL's sgemm (EngineConfig.pack_weights).

`F.linear` on the CPU hands MKL an unpacked weight, and MKL copies it into its
own blocked layout on every call: at the skinny row counts of a decode step
that copy is a large part of the matmul. MKL's pack API does the copy once
(`cblas_sgemm_pack`, exposed by torch as `mkl._mkl_reorder_linear_weight`,
the op inductor's freezing pass uses), and `mkl._mkl_linear` then runs
`cblas_sgemm_compute` on it. Measured on the 2-core Xeon over SmolLM2-135M's
layer matmuls (docs/BENCHMARKS.md "fp32 weights packed for MKL"): 1.4-1.8x
faster at 4-64 rows, 1.05-1.3x at one row and in prefill chunks; the lm_head
1.3-2.2x.

- **One pack serves every row count.** The packed bytes do not depend on the
  row count given to the pack (the same results for any), but its speed does:
  packed for one row it ran 32 rows no faster than `F.linear`; packed for
  PACK_ROWS it was the fastest or within noise of it from 1 to 512 rows.
  `_mkl_linear` runs the packed weight only when the row count it is told
  equals the input's, so packed_linear always passes the input's own.
- **Sums.** Each output element is still one fp32 dot product over the input
  row, and at 17 rows or more the results were bit-identical to `F.linear`'s;
  below that they differ in the last bits, as `F.linear` at 8 rows already
  differs from `F.linear` at one (MKL picks its kernel by shape). The engine's
  promise is HF generate's tokens, which the engine tests check with packing on.
- **Memory.** The unpacked weight stays (the HF module holds it, and
  `_mkl_linear` reads its shape), and MKL's packed layout pads: an engine on
  SmolLM2-135M in fp32 (540 MB of weights) grew by 760 MiB more packed than
  unpacked. Quantized weights add their copy the same way.
- **Where.** fp32 on the CPU, unquantized, in a torch built with MKL (x86
  builds from PyPI); elsewhere packed_linear is plain `F.linear` and nothing
  is packed.

No Django here; packed_linear is TorchScript-compatible because the scripted
layer stack in inference.llama calls it (through quantization.quantized_linear).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# The matmul mode of packed weights in the scripted layer stack (beside
# inference.quantization's QUANT_* modes, whose slots packed weights ride).
QUANT_PACKED_FP32 = 3
# The row count the weights are packed for (see the module docstring); chosen
# by bench.formats --packing's matrix on the 2-core Xeon.
PACK_ROWS = 128


def _mkl_packing_available() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear") \
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):  # a build without the mkl op namespace
        return False


MKL_PACKING = _mkl_packing_available()

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


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return MKL_PACKING and device.type == "cpu" and dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), PACK_ROWS)


def pack_paged(net) -> None:
    """Give a PagedLlama's matmuls packed copies of their weights, in the slots
    quantized weights take (inference.quantization): the weight slot holds the
    packed copy and the scale slot the unpacked weight."""
    scales = []
    for w in net.weights:
        layer_scales = []
        for slot in (1, 2, 4, 5):  # qkv, o, gate_up, down (see llama._layers)
            original = w[slot]
            w[slot] = pack_weight(original)
            layer_scales.append(original)
        scales.append(layer_scales)
    net.weight_scales = scales
    net.quant_mode = QUANT_PACKED_FP32
    net.lm_head_quantized = (pack_weight(net.lm_head), net.lm_head, QUANT_PACKED_FP32)
