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

- "int4_weight_only": the layers' weights are 4-bit, one scale and one offset
  per group of INT4_GROUP_SIZE input columns (asymmetric, as llama.cpp's Q4_1),
  activations in bf16. On CPU the product runs in torch's int4 kernel
  (aten._weight_int4pack_mm_for_cpu), which reads half the bytes of int8: one
  forward's layer matmuls at one row took 5.2 ms against 11.7 for int8
  weight-only and 23.9 in fp32 on the 2-core Xeon (docs/BENCHMARKS.md). With
  fp32 activations that kernel ran 30-100x slower, hence bf16 around it. The
  lm_head stays int8 weight-only: it is a fifth of the weights, the last
  matmul before the token is chosen, and int4 saved it 0.4 ms a step. Each row
  is summed on its own (batched equals alone, tested). Off the CPU the
  weight is dequantized on the fly (dequantized_int4_linear): correct, not fast.

The quantized matmuls take a mode: QUANT_INT8 (int8 weights and activations),
QUANT_INT8_WEIGHT_ONLY or QUANT_INT4_WEIGHT_ONLY; QUANT_PACKED_FP32 and
QUANT_PACKED_ONEDNN are no quantization but fp32 weights packed for MKL or
oneDNN (inference.packing).

No Django here; the functions below are TorchScript-compatible because the
scripted layer stack in inference.llama calls them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from inference.packing import (  # noqa: F401 (re-exported)
    QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN, onednn_linear, pack_weight, packed_linear, shape_only)

QUANT_INT8 = 0
QUANT_INT8_WEIGHT_ONLY = 1
QUANT_INT4_WEIGHT_ONLY = 2
# Not quantizations, QUANT_PACKED_FP32 and QUANT_PACKED_ONEDNN (3 and 4,
# defined in inference.packing): fp32 weights packed for MKL or oneDNN, riding
# the same slots (the packed copy as the weight, the unpacked weight as its "scale").
# 32 columns share a scale and an offset, as in llama.cpp's Q4_0/Q4_1 blocks
# (the bundled GGUF's): groups of 64 ran no faster at one row (a forward's layer
# matmuls 5.6 ms against 5.2), and smaller groups keep the rounding error lower.
INT4_GROUP_SIZE = 32
# The CPU kernel's packing interleaves this many 16-column tiles.
_INT4_INNER_K_TILES = 2


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


def quantize_weight_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] int32 codes in 0..15, [in / group, out, 2]
    fp32 (scale, offset)); a weight is (code - 8) * scale + offset, the layout
    torch's int4 kernels take. Asymmetric: each group's 16 levels span its own
    min to max."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 weights need in_features divisible by {group_size}, not {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    scale = (high - low).clamp_min(1e-12) / 15.0
    codes = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    offset = low + 8.0 * scale  # the value of code 8
    scales_offsets = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
    return codes.reshape(out_features, in_features).contiguous(), scales_offsets


def pack_int4(codes: torch.Tensor, scales_offsets: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 weight as the device's matmul takes it: on CPU packed two codes
    a byte for aten._weight_int4pack_mm_for_cpu, with bf16 scales; elsewhere the
    codes as uint8 for dequantized_int4_linear."""
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)
        return packed, scales_offsets.to(torch.bfloat16)
    return codes.to(device=device, dtype=torch.uint8), scales_offsets.to(device)


def dequantized_int4_linear(x: torch.Tensor, codes: torch.Tensor, scales_offsets: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ the int4 weight^T, widened to x's dtype first (off the CPU)."""
    out_features, in_features = codes.size(0), codes.size(1)
    groups = scales_offsets.size(0)
    centred = (codes.to(x.dtype) - 8.0).view(out_features, groups, in_features // groups)
    scale = scales_offsets[:, :, 0].t().to(x.dtype).unsqueeze(-1)  # [out, groups, 1]
    offset = scales_offsets[:, :, 1].t().to(x.dtype).unsqueeze(-1)
    return F.linear(x, (centred * scale + offset).view(out_features, in_features))


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales_offsets: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [T, in] float, weight from pack_int4 -> [T, out] in x's dtype."""
    if x.is_cpu:
        group_size = x.size(-1) // scales_offsets.size(0)  # (TorchScript reads no module globals)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, group_size,
                                                       scales_offsets).to(x.dtype)
    else:
        y = dequantized_int4_linear(x, weight, scales_offsets)
    if bias is not None:
        y = y + bias
    return y


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor], mode: int) -> torch.Tensor:
    """The matmul of a quantized weight in the given QUANT_* mode (literals
    below: TorchScript reads no module globals)."""
    if mode == 3:  # QUANT_PACKED_FP32 (MKL)
        return packed_linear(x, weight, scale, bias)
    if mode == 4:  # QUANT_PACKED_ONEDNN
        return onednn_linear(x, weight, bias)
    if mode == 2:  # QUANT_INT4_WEIGHT_ONLY
        return int4_linear(x, weight, scale, bias)
    return int8_linear(x, weight, scale, bias, mode == 1)  # QUANT_INT8_WEIGHT_ONLY


def round_paged_to_bf16(net, packer: str = "none") -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """"bf16_weight_only": every matmul weight of a fp32 PagedLlama (layers
    and lm_head) rounded to bf16. Steps of many rows multiply the bf16 values
    widened back to fp32, packed for `packer` (inference.packing) unless it is
    "none", so they multiply exactly the weights the bf16 copies hold; the
    copies come back, per layer [qkv, o, gate_up, down], and the lm_head's,
    for small_linear. Packed, each widened weight lives only until its packed
    copy exists (the scale slot, which MKL reads for the shape alone, gets a
    stand-in): the rounding costs no second fp32 model, even at start. The
    loaded weights are not touched (their owner may still run them; see
    ModelRunner.release_float_weights), and the embedding stays fp32 (a lookup,
    no matmul), even when tied to the lm_head."""
    mode = QUANT_PACKED_ONEDNN if packer == "onednn" else QUANT_PACKED_FP32

    def widened(half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the stack multiplies by, what the scale slot holds)."""
        rounded = half.float()
        if packer == "none":
            return rounded, rounded
        return pack_weight(rounded, packer), shape_only(rounded)

    small, plains = [], []
    for w in net.weights:
        layer, layer_plains = [], []
        for slot in (1, 2, 4, 5):  # qkv, o, gate_up, down (see llama._layers)
            half = w[slot].to(torch.bfloat16).contiguous()
            w[slot], plain = widened(half)
            layer.append(half)
            layer_plains.append(plain)
        small.append(layer)
        plains.append(layer_plains)
    head = net.lm_head.to(torch.bfloat16).contiguous()
    head_weight, net.lm_head = widened(head)  # packed: lm_head keeps the shape, for what counts the weights
    if packer != "none":
        net.weight_scales = plains
        net.quant_mode = mode
        net.lm_head_quantized = (head_weight, net.lm_head, mode)
    return small, head


def dequantized_bf16(net) -> list[list[torch.Tensor]]:
    """Under "int8_weight_only": each layer's [qkv, o, gate_up, down] int8
    weight times its scale, rounded to bf16, for prompt rows in bf16
    (EngineConfig.bf16_prompts); before the int8 weights leave their slots."""
    return [[(w[slot].float() * scale.float()[:, None]).bfloat16()
             for slot, scale in zip((1, 2, 4, 5), scales)] for w, scales in zip(net.weights, net.weight_scales)]


def quantize_paged(net, quantization: str) -> None:
    """Swap a PagedLlama's matmul weights for quantized ones in place; norms
    and the embedding stay in the model's dtype. The float weights stay until
    the engine has started (ModelRunner.release_float_weights frees them when
    the engine loaded the model itself); only the scripted stack sees these.
    Off the CPU "int8" is weight-only (see the module docstring)."""
    cpu = net.device.type == "cpu"
    if quantization == "int4_weight_only":
        mode = QUANT_INT4_WEIGHT_ONLY
    elif quantization == "int8_weight_only" or not cpu:
        mode = QUANT_INT8_WEIGHT_ONLY
    else:
        mode = QUANT_INT8
    net.quant_mode = mode
    # The CPU weight-only kernels take their scales in bf16: cast once here, not per step.
    int8_scale_dtype = torch.bfloat16 if mode != QUANT_INT8 and cpu else torch.float32
    scales = []
    for index, w in enumerate(net.weights):
        layer_scales = []
        for slot in (1, 2, 4, 5):  # qkv, o, gate_up, down (see llama._layers)
            if mode == QUANT_INT4_WEIGHT_ONLY:
                q, s = pack_int4(*quantize_weight_int4(w[slot]), net.device)
            else:
                q, s = quantize_weight(w[slot])
                s = s.to(device=w[0].device, dtype=int8_scale_dtype)
            w[slot] = q
            layer_scales.append(s)
        scales.append(layer_scales)
    net.weight_scales = scales
    q, s = quantize_weight(net.lm_head)
    head_mode = QUANT_INT8_WEIGHT_ONLY if mode == QUANT_INT4_WEIGHT_ONLY else mode
    net.lm_head_quantized = (q, s.to(device=q.device, dtype=int8_scale_dtype), head_mode)
