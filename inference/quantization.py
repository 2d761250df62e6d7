"""Int8 weights for the paged forward (EngineConfig.quantization).

Every matmul weight (fused QKV, o_proj, fused gate/up, down_proj and the
lm_head) becomes int8 with one scale per output row (symmetric, absmax; fp32,
or bf16 for the CPU weight-only kernel, which takes no other).

- "int8" on CPU: the activations are quantized too, one scale per token row, and the
  product runs as an int8 x int8 -> int32 GEMM (torch._int_mm). The int32 sum
  is exact, so a row's result depends on nothing else in the batch: batched and
  alone give the same tokens, as the engine promises. torch's own dynamic
  quantization (quantize_dynamic / quantized.linear_dynamic, fbgemm) ran a
  forward's matmuls 1.4-1.7x faster than this here, but it takes one
  activation scale for the whole [T, hidden] input: a sequence's result would
  change with whatever else is batched, and one outlier row (LLMs put huge
  activations on the first token) would coarsen every other row's
  quantization. The weight-only kernel below is faster than this at one row
  and 1.4x slower at 32 rows, where a busy server spends its steps
  (docs/BENCHMARKS.md, bench.formats).
- "int8_weight_only": the weights alone are int8, the activations keep
  their precision. On CPU the product runs in oneDNN's int8-weight kernel
  (aten._weight_int8pack_mm), which streams the int8 weight and widens it in
  registers, with bf16 activations: it is the fastest one-row (one chat)
  matmul measured here (one forward's matmuls at one row on the EPYC: 7.7 ms,
  fp32 36.4, int8 x int8 12.4; at 32 rows between fp32 and bf16;
  docs/BENCHMARKS.md, bench.formats), and it loses almost nothing
  (bench.quality). Each row is summed on its own, so batched equals alone.
  On CUDA (and on "int8" there: torch._int_mm on CUDA needs more than 16
  rows, which a decode step rarely has) the weight is dequantized on the fly
  into the activation dtype (dequantized_linear).

No Django here; the functions below are TorchScript-compatible because the
scripted layer stack in inference.llama calls them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int8_weight_only")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] int8, [out] fp32 scale), symmetric per output row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight-only product off the CPU: the int8 weight widened to x's dtype."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], weight_only: bool) -> torch.Tensor:
    """x [T, in] float, weight [out, in] int8, scale [out] -> [T, out] in x's dtype."""
    if weight_only and x.is_cpu:
        # It takes bf16 activations and scales (with fp32 ones it ran 5-40x
        # slower here), so an fp32 model casts around it; quantize_paged keeps
        # the scales in bf16 already.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale.to(torch.bfloat16)).to(x.dtype)
    elif weight_only:
        y = dequantized_linear(x, weight, scale)
    else:
        xf = x.float()
        x_scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # [T, 1]
        xq = torch.round(xf / x_scale).to(torch.int8)  # |xf / x_scale| <= 127 by construction
        y = (torch._int_mm(xq, weight.t()) * (x_scale * scale)).to(x.dtype)  # [T, out]
    if bias is not None:
        y = y + bias
    return y


def quantize_paged(net, weight_only: bool) -> None:
    """Swap a PagedLlama's matmul weights for int8 in place; norms and the
    embedding stay in the model's dtype. The HF module keeps its float weights
    (the engine never calls it), so only the scripted stack sees int8."""
    net.int8_weight_only = weight_only
    scales = []
    # The CPU weight-only kernel takes its scales in bf16: cast once here, not per step.
    scale_dtype = torch.bfloat16 if weight_only and net.device.type == "cpu" else torch.float32
    for index, w in enumerate(net.weights):
        layer_scales = []
        for slot in (1, 2, 4, 5):  # qkv, o, gate_up, down (see llama._layers)
            q, s = quantize_weight(w[slot])
            w[slot] = q
            layer_scales.append(s.to(device=w[0].device, dtype=scale_dtype))
        scales.append(layer_scales)
    net.weight_scales = scales
    q, s = quantize_weight(net.lm_head)
    net.lm_head_int8 = (q, s.to(device=q.device, dtype=scale_dtype))
