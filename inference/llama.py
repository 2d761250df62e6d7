"""A paged forward for the Llama family (Llama, SmolLM2, Mistral, Qwen2).

Hugging Face attention knows nothing of a block-paged cache, so the engine
runs the HF module's own weights through this forward instead: embed, then per
layer RMSNorm -> fused QKV -> rotary -> write K/V into cache slots -> attention
over each sequence's block-gathered context -> o_proj, RMSNorm -> fused
gate/up -> SiLU -> down; final norm and lm_head only at sampled positions.

The KV cache is head-major, [layers, kv_heads, num_blocks, block_size, D], so
that gathering a sequence's blocks is one index_select of whole contiguous
blocks per head, and the gathered [kv_heads, B, context, D] hands SDPA one
contiguous [context, D] matrix per (sequence, head) without another copy.
Against the token-major layout indexed as cache[tables] (an element-wise
gather, then strided keys), decode attention at 32 sequences ran about 2x
faster (bench.decode, docs/BENCHMARKS.md "Decode step").

The batch is flattened: the T new tokens of all sequences are concatenated.
Single-token queries (decodes) share one padded attention call per layer;
prefill chunks take one call each.

The TorchScript layer stack is compiled on the first engine's construction,
not at import (see scripted_layer_stack).
"""
# No `from __future__ import annotations` here: TorchScript reads the
# NamedTuples' field annotations and cannot resolve them as strings
# (pytorch issue #95858).
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from inference import kernels  # noqa: F401  (defines the schemas of torch.ops.chatapp's ops)
from inference import layer_ops
from inference.outputs import UnsupportedModel
from inference.packing import onednn_linear
from inference.quantization import quantized_linear

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


class DecodeGroup(NamedTuple):
    """Decode rows of similar context length, padded to the group's longest."""

    first_row: int
    num_rows: int  # B
    blocks: torch.Tensor  # [B * nb] int64: the rows' block tables, each padded with block 0 to nb
    mask: torch.Tensor  # [B, 1, 1, nb * block_size] bool, True = attend (unused by the kernel: may be empty)
    context_lens: torch.Tensor  # [B] int64: each row's context, its new token included


class PrefillChunk(NamedTuple):
    """One sequence's prefill chunk: rows [first_row, first_row + query_len)."""

    first_row: int
    query_len: int
    context_len: int  # earlier tokens plus this chunk's
    # Block ids covering the context [nb]; None when the chunk has no earlier
    # context and the prefill kernel is not in use (its own K/V is everything).
    blocks: Optional[torch.Tensor]
    # The causal mask [q, C], for SDPA over gathered blocks; None when the
    # chunk has no earlier context (SDPA's is_causal) or the kernel runs it.
    mask: Optional[torch.Tensor]


class PromptRows(NamedTuple):
    """Which of a step's rows multiply in bf16 blocks (EngineConfig.bf16_prompts):
    the prompt's tokens, by position, whatever chunk or step carries them."""

    half: torch.Tensor  # [n] int64 row indices, ascending; empty when none
    full: torch.Tensor  # [T - n] the other rows, while both kinds are in the step; else empty
    # Per matmul [qkv, o, gate_up, down]: the row counts its oneDNN calls may
    # have, largest first (same_bits_blocks); empty when bf16 prompts are off.
    blocks: List[List[int]]


_EMPTY_ROWS = torch.empty(0, dtype=torch.long)
# What a step without prompt rows passes (built once: a forward is hot).
NO_PROMPT_ROWS = PromptRows(_EMPTY_ROWS, _EMPTY_ROWS, [])


@dataclass
class AttentionPlan:
    """Per-step attention layout, shared by every layer. Decode rows come first
    in the flattened batch: rows [0, num_decodes)."""

    num_decodes: int
    decode_groups: List[DecodeGroup]
    prefills: List[PrefillChunk]


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused_ops: bool) -> torch.Tensor:
    # fused_ops: the same sums as one op of inference.kernels' library (csrc/fused_ops.cpp).
    if fused_ops:
        return torch.ops.chatapp.rms_norm(x, weight, eps)
    return layer_ops.rms_norm(x, weight, eps)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], quant_mode: int, small_rows: int,
            small_weight: Optional[torch.Tensor]) -> torch.Tensor:
    # scale is set when the weight is quantized (EngineConfig.quantization,
    # inference.quantization; quant_mode is one of its QUANT_* modes) or
    # packed, where it holds the plain weight (inference.packing).
    if x.size(0) <= small_rows and small_weight is not None:
        # A few fp32 rows: one pass over the plain fp32 weight, or its bf16
        # copy under "bf16_weight_only" (inference.kernels' small_linear;
        # small_rows is 0 unless ModelRunner set the small weights).
        return torch.ops.chatapp.small_linear(x.contiguous(), small_weight, bias)
    if scale is not None:
        return quantized_linear(x, weight, scale, bias, quant_mode)
    return F.linear(x, weight, bias)


def _residual_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], quant_mode: int,
                     small_rows: int, small_weight: Optional[torch.Tensor]) -> torch.Tensor:
    # h + x @ W^T in one GEMM (the residual is the accumulator): one pass fewer over h.
    if x.size(0) <= small_rows and small_weight is not None:  # see _linear
        return h + torch.ops.chatapp.small_linear(x.contiguous(), small_weight, bias)
    if scale is not None:
        return h + quantized_linear(x, weight, scale, bias, quant_mode)
    if bias is not None:
        return h + F.linear(x, weight, bias)
    return torch.addmm(h, x, weight.t())


def block_cover(n: int, blocks: List[int]) -> List[int]:
    """The row counts of the calls that cover n rows, each one of `blocks`
    (largest first, the smallest last): the smallest block that holds the
    rest with less than the smallest block's rows of padding where there is
    one, else the largest that fits. So padding stays under the smallest
    block, and a long prompt goes in the largest calls (fewer, faster ones).
    (Plain loops: the TorchScript layer stack calls it.)"""
    sizes: List[int] = []
    smallest = blocks[-1]
    while n > 0:
        size = 0
        for b in blocks:  # largest first: the last that holds the rest is the smallest
            if n <= b and b < n + smallest:
                size = b
        if size == 0:
            size = smallest
            for b in blocks:
                if b <= n:
                    size = b  # the largest that fits
                    break
        sizes.append(size)
        n -= size
    return sizes


def bf16_block_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                      blocks: List[int]) -> torch.Tensor:
    """x [n, in] fp32 rounded to bf16, times a bf16 weight packed for oneDNN
    (AMX or AVX512-BF16 where the CPU has them), summed in fp32 and rounded
    to bf16 by oneDNN, widened back: [n, out] fp32. Every call has one of
    `blocks` rows (block_cover), the last one padded with zeros: oneDNN's
    bf16 GEMM sums a row in an order that depends on the call's row count (a
    row's bits differed between calls of 2 to 129 rows on the AMX Xeon), but
    with the count fixed a row's result depends on nothing else in the call,
    neither its place, the other rows, the padding nor the thread count
    (checked bit for bit); larger blocks are only those that same_bits_blocks
    found to give the smallest's bits. So a prompt gets the same bits whether
    it is prefilled whole, in chunks, beside other prompts, or after a
    prefix-cache hit."""
    sizes = block_cover(x.size(0), blocks)
    n, padded = x.size(0), sum(sizes)
    if padded == n:
        xb = x.to(torch.bfloat16)
    else:
        xb = torch.zeros(padded, x.size(1), dtype=torch.bfloat16, device=x.device)
        xb[:n] = x
    parts: List[torch.Tensor] = []
    start = 0
    for size in sizes:
        parts.append(onednn_linear(xb[start:start + size], packed, None))
        start += size
    y = (parts[0] if len(parts) == 1 else torch.cat(parts))[:n].float()
    if bias is not None:
        y = y + bias
    return y


def same_bits_blocks(packed: torch.Tensor, in_features: int, block: int, largest: int,
                     smallest: Optional[int] = None, linear=None) -> List[int]:
    """The row counts, block × 2^k up to `largest` and block ÷ 2^k down to
    `smallest` (default: block, none smaller), whose calls give every row the
    bits that calls of `block` rows give it, at every thread count up to this
    thread's (the engine's steps may run on fewer, StepThreads): largest
    first, the smallest kept last (`block` itself always is). Whether two row
    counts sum in the same order is the library's choice of kernel for the
    shape and the CPU (at SmolLM2's shapes on the AMX Xeon 64 and 128 rows
    agree at every layer, 256 at three of four, and 7-32 rows sum otherwise;
    on the Zen 5 EPYC 8 to 256 rows all agree), so it is checked here, at
    start, on the weight itself, over as many random rows as the largest
    count: a different order shows in some row's last bits. Smaller calls
    are what make a short prompt cheap: its last call is padded to the
    smallest count kept."""
    linear = onednn_linear if linear is None else linear
    candidates = [block]
    while candidates[-1] * 2 <= largest:
        candidates.append(candidates[-1] * 2)
    smaller: List[int] = []  # each divides the rows checked, as `block` does
    size, least = block, block if smallest is None else smallest
    while size % 2 == 0 and size // 2 >= least:
        size //= 2
        smaller.append(size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(candidates[-1], in_features, generator=generator).to(torch.bfloat16)

    def in_calls_of(rows: int) -> torch.Tensor:
        return torch.cat([linear(x[start:start + rows], packed, None) for start in range(0, x.size(0), rows)])

    threads = torch.get_num_threads()
    kept = set(candidates[1:] + smaller)
    try:
        for count in range(1, threads + 1):
            torch.set_num_threads(count)
            reference = in_calls_of(block)
            kept = {rows for rows in kept if torch.equal(in_calls_of(rows), reference)}
    finally:
        torch.set_num_threads(threads)
    return sorted(kept | {block}, reverse=True)


def _split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  scale: Optional[torch.Tensor], quant_mode: int, small_rows: int,
                  small_weight: Optional[torch.Tensor], half_weight: torch.Tensor,
                  rows: PromptRows, site: int) -> torch.Tensor:
    """A step with prompt rows (EngineConfig.bf16_prompts): those in bf16
    blocks, the others (generated tokens) as _linear runs them. site: which
    of the layer's matmuls (qkv, o, gate_up, down: 0-3)."""
    if rows.full.numel() == 0:
        return bf16_block_linear(x, half_weight, bias, rows.blocks[site])
    half = bf16_block_linear(x.index_select(0, rows.half), half_weight, bias, rows.blocks[site])
    out = torch.empty(x.size(0), half.size(1), dtype=half.dtype, device=half.device)
    out.index_copy_(0, rows.half, half)
    out.index_copy_(0, rows.full, _linear(x.index_select(0, rows.full), weight, bias, scale, quant_mode,
                                          small_rows, small_weight))
    return out


def _decode_group(q: torch.Tensor, layer_k: torch.Tensor, layer_v: torch.Tensor, group: DecodeGroup,
                  kv_heads: int, scale: float, block_size: int, attention_kernel: bool) -> torch.Tensor:
    """One decode group's attention: [B, H, D]."""
    first, b, blocks = group.first_row, group.num_rows, group.blocks
    if attention_kernel:
        # The blocks read in place, each row only up to its own context (inference.kernels).
        return torch.ops.chatapp.paged_decode_attention(q[first:first + b].contiguous(), layer_k, layer_v,
                                                        blocks.view(b, -1), group.context_lens, scale)
    ctx, dim = blocks.size(0) // b * block_size, q.size(2)
    # index_select copies whole blocks (memcpy); cache[tables] gathered element by element.
    keys = layer_k.index_select(1, blocks).view(kv_heads, b, ctx, dim)  # [KV, B, C, D]
    values = layer_v.index_select(1, blocks).view(kv_heads, b, ctx, dim)
    if q.dtype != torch.float32:
        # Half precision: SDPA's CPU flash kernel ran a one-query step 10-20x
        # slower in bf16 than in fp32 (2.7 ms against 0.24 ms for 32 sequences
        # of 160 tokens; docs/BENCHMARKS.md), more than the step's matmuls.
        # Two batched matmuls over [KV, B] with the softmax in fp32 do it
        # directly; fp32 keeps SDPA, whose sums HF generate's match.
        heads = q.size(1)
        queries = q[first:first + b].view(b, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [KV, B, G, D]
        # As HF's eager attention does it: scores in the model's dtype, softmax in fp32.
        scores = torch.matmul(queries, keys.transpose(2, 3)) * scale  # [KV, B, G, C]
        scores = scores.masked_fill(group.mask.view(1, b, 1, ctx).logical_not(), float("-inf"))
        o = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)  # [KV, B, G, D]
        return o.transpose(0, 1).reshape(b, heads, dim)
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [B, KV, C, D]
    queries = q[first:first + b].unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask,
                                       scale=scale, enable_gqa=True)  # [B, H, 1, D]
    return o.squeeze(2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_k: torch.Tensor, layer_v: torch.Tensor,
               decode_groups: List[DecodeGroup], prefills: List[PrefillChunk],
               kv_heads: int, scale: float, attention_kernel: bool) -> torch.Tensor:
    # layer_k, layer_v [KV, num_blocks, block_size, D]
    num_tokens, heads, dim = q.size(0), q.size(1), q.size(2)
    block_size = layer_k.size(2)
    if len(prefills) == 0 and len(decode_groups) == 1:
        # A decode-only step in one group (always so for one stream): SDPA's own
        # output is the result; no buffer to assemble the groups in.
        group = decode_groups[0]
        return _decode_group(q, layer_k, layer_v, group, kv_heads, scale, block_size,
                             attention_kernel).reshape(num_tokens, heads * dim)
    out = torch.empty(num_tokens, heads, dim, dtype=q.dtype, device=q.device)
    for group in decode_groups:
        out[group.first_row:group.first_row + group.num_rows] = _decode_group(
            q, layer_k, layer_v, group, kv_heads, scale, block_size, attention_kernel)
    for chunk in prefills:
        start, q_len, ctx_len = chunk.first_row, chunk.query_len, chunk.context_len
        # Locals, not attributes: TorchScript refines Optional only on local names.
        blocks, mask = chunk.blocks, chunk.mask
        if blocks is not None and mask is None:
            # Planned in place (ModelRunner._prefill_chunk does so in half
            # precision with the library): the library's prefill attention
            # reads every key and value where it lies (this chunk's are in the
            # cache already), sums in fp32, and gives each row the same bits
            # however its prompt was chunked (csrc/prefill_attention.cpp).
            # fp32 keeps SDPA, whose sums are HF generate's.
            out[start:start + q_len] = torch.ops.chatapp.paged_prefill_attention(
                q[start:start + q_len], layer_k, layer_v, blocks, ctx_len, scale)
            continue
        queries = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if mask is None:  # no earlier context: this chunk's own K/V is everything
            keys = k[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, KV, q, D]
            values = v[start:start + q_len].transpose(0, 1).unsqueeze(0)
        else:
            assert blocks is not None  # given with every mask
            keys = layer_k.index_select(1, blocks).view(kv_heads, -1, dim)[:, :ctx_len].unsqueeze(0)  # [1, KV, C, D]
            values = layer_v.index_select(1, blocks).view(kv_heads, -1, dim)[:, :ctx_len].unsqueeze(0)
        if not q.is_cuda:
            # Half precision on the CPU without the library: sums in fp32. SDPA's
            # bf16 CPU kernel splits the keys in blocks that depend on where a chunk
            # starts and ends, so a prompt prefilled in two chunks or resumed from
            # cached blocks got other last bits than prefilled whole, and on the AMX
            # Xeon a greedy near-tie flipped between batched and alone; in fp32 such
            # differences stay below bf16's rounding (a no-op for fp32 models).
            queries, keys, values = queries.float(), keys.float(), values.float()
        if mask is None:
            o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                               scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                               scale=scale, enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1).to(q.dtype)
    return out.view(num_tokens, heads * dim)


def _layers(h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor,
            weights: List[List[torch.Tensor]], qkv_biases: List[Optional[torch.Tensor]],
            o_biases: List[Optional[torch.Tensor]], scales: List[List[torch.Tensor]], quant_mode: int,
            k_cache: torch.Tensor, v_cache: torch.Tensor,
            decode_groups: List[DecodeGroup], prefills: List[PrefillChunk],
            heads: int, kv_heads: int, dim: int, eps: float, scale: float,
            attention_kernel: bool, small_rows: int, small_weights: List[List[torch.Tensor]],
            fused_ops: bool, half_weights: List[List[torch.Tensor]], rows: PromptRows) -> torch.Tensor:
    """Every decoder layer; weights[i] = [input_norm, qkv, o, post_norm, gate_up, down];
    scales[i] = the quantized weights' scales of [qkv, o, gate_up, down], or scales is empty
    (float weights); quant_mode is their inference.quantization QUANT_* mode; attention_kernel
    runs decode attention in inference.kernels' library instead of gathering blocks; steps of
    at most small_rows tokens run their matmuls in its small_linear (0: never), on
    small_weights[i] = [qkv, o, gate_up, down] as small_linear reads them; fused_ops
    runs RMSNorm, the rotary embedding and SiLU * up as one op each of the same
    library (csrc/fused_ops.cpp) instead of a handful of torch ops each;
    half_weights[i] = [qkv, o, gate_up, down] in bf16 packed for oneDNN, which
    the rows in `rows.half` multiply (bf16_block_linear), in a step that has
    prompt rows (EngineConfig.bf16_prompts); empty in any other."""
    num_tokens = h.size(0)
    # Steps with prompt rows split each matmul (_split_linear); the others,
    # every decode step among them, run _linear with one check per matmul.
    half = len(half_weights) > 0
    for index, w in enumerate(weights):
        s: List[Optional[torch.Tensor]] = [None, None, None, None]
        if len(scales) > 0:
            for j in range(4):
                s[j] = scales[index][j]
        sw: List[Optional[torch.Tensor]] = [None, None, None, None]
        if len(small_weights) > 0:
            for j in range(4):
                sw[j] = small_weights[index][j]
        x = _norm(h, w[0], eps, fused_ops)
        if half:
            qkv = _split_linear(x, w[1], qkv_biases[index], s[0], quant_mode, small_rows, sw[0],
                                half_weights[index][0], rows, 0)
        else:
            qkv = _linear(x, w[1], qkv_biases[index], s[0], quant_mode, small_rows, sw[0])  # [T, (H + 2 KV) * D]
        qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk = qk.view(num_tokens, heads + kv_heads, dim)  # [T, H + KV, D]: one rotation for both
        if fused_ops:
            qk = torch.ops.chatapp.rotary(qk, cos, signed_sin)
        else:
            qk = layer_ops.rotate(qk, cos, signed_sin)
        q, k = qk[:, :heads], qk[:, heads:]  # [T, H, D], [T, KV, D]
        v = v.view(num_tokens, kv_heads, dim)
        layer_k = k_cache[index]  # [KV, num_blocks, block_size, D]
        layer_v = v_cache[index]
        layer_k.view(kv_heads, -1, dim).index_copy_(1, slots, k.transpose(0, 1))  # slot = block * block_size + offset
        layer_v.view(kv_heads, -1, dim).index_copy_(1, slots, v.transpose(0, 1))
        o = _attention(q, k, v, layer_k, layer_v, decode_groups, prefills, kv_heads, scale,
                       attention_kernel)  # [T, H * D]
        if half:
            h = h + _split_linear(o, w[2], o_biases[index], s[1], quant_mode, small_rows, sw[1],
                                  half_weights[index][1], rows, 1)
        else:
            h = _residual_linear(h, o, w[2], o_biases[index], s[1], quant_mode, small_rows, sw[1])
        x = _norm(h, w[3], eps, fused_ops)
        if half:
            gate_up = _split_linear(x, w[4], None, s[2], quant_mode, small_rows, sw[2], half_weights[index][2], rows, 2)
        else:
            gate_up = _linear(x, w[4], None, s[2], quant_mode, small_rows, sw[2])
        act = torch.ops.chatapp.silu_mul(gate_up) if fused_ops else layer_ops.silu_mul(gate_up)
        if half:
            h = h + _split_linear(act, w[5], None, s[3], quant_mode, small_rows, sw[3], half_weights[index][3], rows, 3)
        else:
            h = _residual_linear(h, act, w[5], None, s[3], quant_mode, small_rows, sw[3])
    return h


# The layer stack runs as one TorchScript call: the interpreter executes its
# ~20 ops per layer without the GIL. Called op by op from Python, the engine
# thread gave the GIL back and waited for it again around every op, and while
# the web server's threads were busy (a burst of new chats) each wait could
# last a whole switch interval: a 12-token prefill took 0.75 s instead of
# 0.05 s (docs/BENCHMARKS.md). The plain interpreter (no profiling executor)
# runs it as written, without re-specialising for every batch shape.
# TorchScript is deprecated in favour of torch.compile, which would need a C++
# toolchain at run time on CPU and minutes of compilation per shape; it still
# ships with the pinned torch. Should a later torch drop it, the same function
# runs eagerly (correct, just exposed to the GIL again).
# Compiled once per process, when the first engine is built: processes that
# import the engine's modules without running one do not pay for it.
@functools.cache
def scripted_layer_stack():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_layers)
    except Exception:  # pragma: no cover - depends on the torch build
        log.warning("TorchScript unavailable: the layer stack runs eagerly", exc_info=True)
        return _layers


class PagedLlama:
    def __init__(self, model: torch.nn.Module, max_positions: int, script_layers: bool = True):
        # Over 40 lines: one attribute per model tensor or shape fact, read once here.
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {config.model_type!r} is not supported by the paged engine "
                f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {config.hidden_act!r} is not supported (only silu)")
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [self._fuse(layer) for layer in inner.layers]
        self.num_layers = len(self.layers)
        # The scripted layer stack's arguments, built once.
        self.weights = [[w["input_norm"], w["qkv"], w["o"], w["post_norm"], w["gate_up"], w["down"]]
                        for w in self.layers]
        self.qkv_biases = [w["qkv_bias"] for w in self.layers]
        self.o_biases = [w["o_bias"] for w in self.layers]
        # The eager stack is only the GIL benchmark's baseline (EngineConfig.script_layers).
        self.layer_stack = scripted_layer_stack() if script_layers else _layers
        # Set by inference.quantization.quantize_paged when the weights are quantized.
        self.weight_scales: list[list[torch.Tensor]] = []
        # (weight, scale, QUANT_* mode) when the lm_head is quantized.
        self.lm_head_quantized: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.quant_mode = -1  # no quantized weights
        # Set by the model runner once inference.kernels' library is loaded (CPU only).
        self.attention_kernel = False
        self.fused_ops = False  # RMSNorm, rotary and SiLU * up as the library's ops (ModelRunner sets it)
        self.small_rows = 0  # fp32 steps of at most this many tokens multiply in small_linear
        # What small_linear multiplies by, set with small_rows (ModelRunner):
        # per layer [qkv, o, gate_up, down], and the lm_head.
        self.small_weights: list[list[torch.Tensor]] = []
        self.lm_head_small: torch.Tensor | None = None
        # Under EngineConfig.bf16_prompts (ModelRunner): bf16 [qkv, o, gate_up, down] per layer packed
        # for oneDNN, which prompt rows multiply in calls of half_blocks[matmul] rows (half_block the least).
        self.half_weights, self.half_block, self.half_blocks = [], 0, []
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        # Rotary tables from the model's own rotary module, so every rope
        # variant HF precomputes (default, linear, llama3, yarn...) is honoured.
        rotary = inner.rotary_emb
        if getattr(rotary, "rope_type", "default") == "dynamic":
            raise UnsupportedModel("dynamic rope scaling is not supported")
        positions = torch.arange(max_positions, device=self.device)[None]
        with torch.no_grad():
            cos, sin = rotary(self.embed[:1][None], positions)
        self.cos = cos[0].to(self.dtype)  # [max_positions, D]
        half = self.head_dim // 2
        # [-sin | sin] halves: what layer_ops.rotate multiplies the swapped halves by.
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).to(self.dtype)

    @staticmethod
    def _fuse(layer) -> dict:
        """One matmul for Q, K and V and one for gate and up. The HF parameters
        are re-pointed at slices of the fused tensors, so memory is not doubled
        and the HF module keeps working on the same weights."""
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "q_norm", None) is not None:
            raise UnsupportedModel("attention with q/k norms (e.g. Qwen3) is not supported")

        def fuse(linears):
            fused = torch.cat([lin.weight.data for lin in linears], dim=0)
            start = 0
            for lin in linears:
                rows = lin.weight.shape[0]
                lin.weight.data = fused[start:start + rows]
                start += rows
            return fused

        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = torch.cat([attn.q_proj.bias.data, attn.k_proj.bias.data, attn.v_proj.bias.data])
        return {
            "input_norm": layer.input_layernorm.weight,
            "qkv": qkv,
            "qkv_bias": qkv_bias,
            "o": attn.o_proj.weight,
            "o_bias": attn.o_proj.bias,
            "post_norm": layer.post_attention_layernorm.weight,
            "gate_up": fuse([mlp.gate_proj, mlp.up_proj]),
            "down": mlp.down_proj.weight,
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                plan: AttentionPlan, logit_rows: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PromptRows | None = None) -> torch.Tensor:
        """input_ids, positions, slots [T]; logit_rows [N]; caches
        [layers, kv_heads, num_blocks, block_size, D]; rows: the prompt rows
        that multiply in bf16 (None: none). Returns logits [N, V] (fp32)."""
        h = F.embedding(input_ids, self.embed)  # [T, hidden]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        signed_sin = self.signed_sin[positions].unsqueeze(1)
        with torch.jit.optimized_execution(False):
            h = self.layer_stack(h, cos, signed_sin, slots, self.weights, self.qkv_biases, self.o_biases,
                                 self.weight_scales, self.quant_mode, k_cache, v_cache,
                                 plan.decode_groups, plan.prefills, self.num_heads, self.num_kv_heads,
                                 self.head_dim, self.eps, self.scale, self.attention_kernel, self.small_rows,
                                 self.small_weights, self.fused_ops,
                                 # A step without prompt rows skips the half weights' lookups altogether.
                                 self.half_weights if rows is not None else [],
                                 rows if rows is not None else NO_PROMPT_ROWS)
        h = _norm(h[logit_rows], self.final_norm, self.eps, self.fused_ops)  # [N, hidden]
        if h.size(0) <= self.small_rows and self.lm_head_small is not None:  # as the layers' (see _linear)
            return torch.ops.chatapp.small_linear(h.contiguous(), self.lm_head_small, None)  # [N, V]
        if self.lm_head_quantized is not None:
            weight, scale, mode = self.lm_head_quantized
            return quantized_linear(h, weight, scale, None, mode).float()  # [N, V]
        if self.device.type == "cpu" and h.dtype == torch.float32:
            # MKL runs the tall lm_head GEMM ([V, hidden] with V ~ 50k) about 30%
            # faster as W @ h^T than as h @ W^T at 8-64 rows (measured on the
            # 2-core box; docs/BENCHMARKS.md); the transpose back is one small copy.
            # Not in half precision: oneDNN's bf16 GEMM gains nothing that way,
            # and the transposed copy and the widening cost two passes over the
            # logits (32 rows of SmolLM2's: 6.1 against 5.2 ms, the AMX Xeon).
            return torch.mm(self.lm_head, h.t()).t().contiguous().float()  # [N, V]
        return F.linear(h, self.lm_head).float()  # [N, V]
