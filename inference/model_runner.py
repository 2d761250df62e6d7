"""The only module that touches the model: KV-cache tensors, batch layout, forward."""
from __future__ import annotations

import logging

import torch

from inference.config import EngineConfig
from inference.cuda_graphs import DecodeGraphs
from inference.kernels import (SMALL_LINEAR_ALL_ROWS, can_pack_small, can_pack_small_int8, default_small_rows,
                               load_kernels, max_small_rows, pack_small_int8, pack_small_weight)
from inference.llama import AttentionPlan, DecodeGroup, PagedLlama, PrefillChunk, PromptRows, same_bits_blocks
from inference.packing import (ONEDNN_PACKING, QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN, can_pack, pack_paged,
                               pack_weight, resolve_packer, shape_only)
from inference.quantization import QUANT_INT8_WEIGHT_ONLY, dequantized_bf16, quantize_paged, round_paged_to_bf16
from inference.scheduler import ScheduledBatch
from inference.sequence import Sequence
from inference.threads import choose_step_threads

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig):
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.block_size = config.block_size
        model.to(device=self.device, dtype=self.dtype)
        model.eval()
        self.model = model
        hf_config = model.config
        max_positions = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True):
            # Without sliding-window attention, the model is exact only up to the window.
            max_positions = min(max_positions, window)
        if config.max_model_len:
            max_positions = min(max_positions, config.max_model_len)
        self.weight_packing = "none"  # or the inference.packing packer the fp32 weights were packed for
        self.quantization = config.quantization
        with torch.inference_mode():
            self.net = PagedLlama(model, max_positions, config.script_layers)
            bf16_weights = self._prepare_weights(config)
        self.packed_weights = self.weight_packing != "none"  # for stats() and /healthz
        # Decode (and half precision's prefill) attention reads the paged cache in
        # place (inference.kernels) where its library builds; CUDA keeps the
        # torch path (and its graphs).
        kernels_ready = (self.device.type == "cpu"
                         and (config.attention_kernel or config.small_linear_rows != 0 or config.fused_ops)
                         and load_kernels(config.kernel_dir))
        self.net.attention_kernel = bool(config.attention_kernel and kernels_ready)
        self.net.fused_ops = bool(config.fused_ops and kernels_ready)
        if kernels_ready:
            self._use_small_linear(config, bf16_weights)
        if config.bf16_prompts and bf16_weights is not None:
            self._use_bf16_prompts(config, bf16_weights[0])
        elif config.bf16_prompts and self._int8_prompt_layers:
            self._use_bf16_prompts(config, self._int8_prompt_layers)
        self._int8_prompt_layers = []  # packed for oneDNN now: the row-major copies go
        self.num_blocks = self._num_blocks(config)  # what the block manager hands out
        # CUDA graphs pad batches with rows that write into one scratch block past those.
        cache_blocks = self.num_blocks + (1 if config.cuda_graphs else 0)
        shape = (self.net.num_layers, self.net.num_kv_heads, cache_blocks, self.block_size, self.net.head_dim)
        # [layers, kv_heads, num_blocks, block_size, D] (head-major: see inference.llama),
        # allocated once for the engine's life.
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.max_model_len = min(max_positions, self.num_blocks * self.block_size)
        self.graphs = (DecodeGraphs(self.net, self.k_cache, self.v_cache, self.block_size,
                                    scratch_block=self.num_blocks) if config.cuda_graphs else None)
        self.num_params = sum(p.numel() for p in model.parameters())
        # FLOPs per token: every matmul weight once (embedding lookup is no matmul; a
        # tied lm_head is counted as the matmul it is).
        self.matmul_params = sum(w["qkv"].numel() + w["o"].numel() + w["gate_up"].numel() + w["down"].numel()
                                 for w in self.net.layers) + self.net.lm_head.numel()
        # Which steps run on one thread (inference.threads); measured here, on
        # the weights and cache the steps will use.
        self.step_threads = choose_step_threads(self, config.one_thread_rows, config.follow_cpu_load)

    def _prepare_weights(self, config: EngineConfig) -> tuple[list[list[torch.Tensor]], torch.Tensor] | None:
        """Quantize, round or pack the stack's weights as configured; the bf16
        copies under "bf16_weight_only", for _use_small_linear. Under
        "int8_weight_only" with bf16 prompts, keeps bf16 copies of the
        dequantized weights for them (_int8_prompt_layers)."""
        self._int8_prompt_layers: list[list[torch.Tensor]] = []
        if config.quantization in ("none", "bf16_weight_only") and config.pack_weights and can_pack(
                self.device, self.dtype):
            self.weight_packing = self._packer(config)
        if config.quantization == "bf16_weight_only":
            # Rounded (and packed as fp32 is, weight by weight): the bf16 copies serve few-row steps.
            return round_paged_to_bf16(self.net, self.weight_packing)
        if config.quantization != "none":
            quantize_paged(self.net, config.quantization)
            if config.bf16_prompts and config.quantization == "int8_weight_only" and self.dtype == torch.float32:
                self._int8_prompt_layers = dequantized_bf16(self.net)
        elif self.weight_packing != "none":
            pack_paged(self.net, self.weight_packing)
        return None

    def _use_small_linear(self, config: EngineConfig,
                          bf16_weights: tuple[list[list[torch.Tensor]], torch.Tensor] | None) -> None:
        """Few-row fp32 steps multiply in small_linear (its library loaded): by
        the bf16 copies under "bf16_weight_only" (packed for its AVX-512 loop
        where every one can be), else by the plain weights, unpacked or packed
        with the plain copy kept (see release_float_weights). Under
        "int8_weight_only" every step does, over the int8 weights and their
        scales packed for that loop, where every one can be."""
        net = self.net
        fp32 = self.dtype == torch.float32
        plain = fp32 and net.quant_mode in (-1, QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN)
        int8 = fp32 and net.quant_mode == QUANT_INT8_WEIGHT_ONLY and self._int8_packable()
        rows = config.small_linear_rows
        if rows is None:
            rows = SMALL_LINEAR_ALL_ROWS if int8 else default_small_rows(bf16_weights is not None)
        if not (plain or int8) or rows <= 0:
            return
        if int8:
            # Every step, whatever its row count: oneDNN's int8 kernel rounds the
            # activations to bf16, so a cut by row count would give a row batched
            # other bits than alone; and small_linear was 1.9-2.5x faster at 1 to
            # 256 rows (docs/BENCHMARKS.md). oneDNN's copies go: nothing reads them.
            for w, scales in zip(net.weights, net.weight_scales):
                net.small_weights.append([pack_small_int8(w[slot], scale.float())
                                          for slot, scale in zip((1, 2, 4, 5), scales)])
                for slot in (1, 2, 4, 5):
                    w[slot] = shape_only(w[slot])
            head, head_scale, mode = net.lm_head_quantized
            net.lm_head_small = pack_small_int8(head, head_scale.float())
            net.lm_head_quantized = (shape_only(head), head_scale, mode)
            if rows != SMALL_LINEAR_ALL_ROWS and config.small_linear_rows is not None:
                log.info("int8 weights: every step in small_linear (small_linear_rows=%d reads as on)", rows)
            net.small_rows = SMALL_LINEAR_ALL_ROWS
            return
        if bf16_weights is not None:
            layers, lm_head = bf16_weights
            if all(can_pack_small(w) for w in (*(w for layer in layers for w in layer), lm_head)):
                # New copies: the row-major ones still serve bf16 prompts' packing, then go.
                layers = [[pack_small_weight(w) for w in layer] for layer in layers]
                lm_head = pack_small_weight(lm_head)
            net.small_weights, net.lm_head_small = layers, lm_head
        elif net.quant_mode < 0:
            net.small_weights = [[w[1], w[2], w[4], w[5]] for w in net.weights]
            net.lm_head_small = net.lm_head
        else:  # packed: the scale slots hold the plain weights (inference.packing)
            net.small_weights = [list(layer) for layer in net.weight_scales]
            net.lm_head_small = net.lm_head
        net.small_rows = min(rows, max_small_rows([w for layer in net.small_weights for w in layer]))

    def _int8_packable(self) -> bool:
        """Whether every int8 weight (lm_head included) fits small_linear's packed loop."""
        net = self.net
        weights = [w[slot] for w in net.weights for slot in (1, 2, 4, 5)]
        if net.lm_head_quantized is not None:
            weights.append(net.lm_head_quantized[0])
        packable = net.lm_head_quantized is not None and all(can_pack_small_int8(w) for w in weights)
        if not packable:
            log.info("int8 weights not in small_linear (no AVX-512, or shapes off its 16 x 4 blocks): "
                     "every step runs oneDNN's int8 kernel")
        return packable

    def _use_bf16_prompts(self, config: EngineConfig, bf16_layers: list[list[torch.Tensor]]) -> None:
        """Prompt rows multiply the bf16 copies packed for oneDNN (EngineConfig.bf16_prompts)."""
        if not ONEDNN_PACKING:
            log.warning("bf16 prompts need torch's oneDNN linear: prompts stay in fp32")
            return
        block = config.bf16_prompt_block
        self.net.half_weights = [[pack_weight(w, "onednn", rows=block) for w in layer] for layer in bf16_layers]
        self.net.half_block = block
        # Every layer's matmul of a kind has the same shape: check each kind once.
        self.net.half_blocks = [same_bits_blocks(packed, weight.size(1), block, config.bf16_prompt_max_block,
                                                 config.bf16_prompt_min_block)
                                for packed, weight in zip(self.net.half_weights[0], bf16_layers[0])]
        log.info("bf16 prompts in calls of %s rows (qkv, o, gate_up, down)",
                 ", ".join("/".join(map(str, blocks)) for blocks in self.net.half_blocks))

    def release_float_weights(self) -> int:
        """Free the float copies of the layers' matmul weights once the layer
        stack runs on copies of its own (quantized, or packed for MKL or
        oneDNN); returns the bytes freed. The HF module and PagedLlama.layers
        held them only for the engine's start: the stack never reads them
        again (MKL's packed matmul reads the unpacked weight's shape alone, as
        packed_linear always passes the input's own row count). For SmolLM2-135M
        that is the 427 MB of fp32 layer weights, which packing or quantizing had
        doubled. The embedding (and the lm_head tied to it) stays. Only for a
        model the engine loaded itself (Engine._build): a module the caller
        passed in stays whole, as its owner may still run it. Nor when few-row
        fp32 steps multiply by the plain weights (EngineConfig.small_linear_rows).
        Under "bf16_weight_only" the stack runs on rounded copies of its own
        (and few-row steps on bf16 ones), so the loaded weights always go."""
        net = self.net
        rounded = self.quantization == "bf16_weight_only"
        float_small = net.small_rows > 0 and net.quant_mode in (-1, QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN)
        if not rounded and (net.quant_mode < 0 or float_small):
            return 0  # the stack multiplies by the float weights themselves (at few rows, or always)
        freed = sum(w[name].untyped_storage().nbytes() for w in net.layers
                    for name in ("qkv", "o", "gate_up", "down"))
        if net.quant_mode in (QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN):
            net.weight_scales = [[shape_only(w) for w in layer] for layer in net.weight_scales]
        for w in net.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                w[name] = shape_only(w[name])
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj):
                # Empty, not zeros: the hollow HF module fails loudly if anything calls it.
                linear.weight.data = torch.empty(0, dtype=self.dtype, device=self.device)
        return freed

    def _packer(self, config: EngineConfig) -> str:
        packer, choice = resolve_packer(config.pack_backend, self.model.config)
        if choice is not None:
            log.info("fp32 weight packing: %s", choice.summary())
        return packer

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.net.num_layers * self.block_size * self.net.num_kv_heads * self.net.head_dim * element

    def _num_blocks(self, config: EngineConfig) -> int:
        budget = config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                budget = int(free * config.gpu_memory_fraction)
            else:
                budget = EngineConfig.CPU_DEFAULT_KV_CACHE_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is smaller than one block "
                             f"({self.bytes_per_block} bytes)")
        return num_blocks

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that sample a token now (their
        chunk reached the last known token) and their logits [N, V] fp32."""
        # Decodes first, shortest context first, so similar lengths share a padded group.
        entries = sorted(zip(batch.seqs, batch.num_new_tokens),
                         key=lambda e: (e[1] > 1, e[0].num_computed_tokens if e[1] == 1 else 0))
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampled: list[Sequence] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        half_rows: list[int] = []  # prompt rows, under EngineConfig.bf16_prompts
        half_block = self.net.half_block
        for seq, num_new in entries:
            start = seq.num_computed_tokens
            row = len(tokens)
            table = seq.block_table
            tokens.extend(seq.token_ids[start:start + num_new])
            span = range(start, start + num_new)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            ctx_len = start + num_new
            if half_block and start < seq.num_prompt_tokens:
                half_rows.extend(range(row, row + min(num_new, seq.num_prompt_tokens - start)))
            if num_new == 1:
                decode_tables.append(table[:-(-ctx_len // bs)])
                decode_lens.append(ctx_len)
            else:
                prefills.append(self._prefill_chunk(row, start, num_new, table))
            if ctx_len == seq.num_tokens:
                logit_rows.append(row + num_new - 1)
                sampled.append(seq)
        threads = self.step_threads.threads_for(len(tokens))
        if threads != torch.get_num_threads():  # the engine thread's own count (OpenMP's is per thread)
            torch.set_num_threads(threads)
        if self.graphs is not None and not prefills:
            with torch.inference_mode():
                logits = self.graphs.run(tokens, positions, slots, decode_tables, decode_lens)
            return sampled, logits[torch.tensor(logit_rows, device=self.device)]
        plan = AttentionPlan(len(decode_tables), self._decode_groups(decode_tables, decode_lens), prefills)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        rows = None
        if half_rows:
            full_rows = [] if len(half_rows) == len(tokens) else sorted(set(range(len(tokens))) - set(half_rows))
            rows = PromptRows(as_tensor(half_rows), as_tensor(full_rows), self.net.half_blocks)
        with torch.inference_mode():
            logits = self.net.forward(as_tensor(tokens), as_tensor(positions), as_tensor(slots), plan,
                                      as_tensor(logit_rows), self.k_cache, self.v_cache, rows)
        return sampled, logits

    @property
    def prefill_in_place(self) -> bool:
        """Prefill attention in the library's kernel, not SDPA (see _prefill_chunk)."""
        return self.net.attention_kernel and (self.dtype != torch.float32 or self.net.half_block > 0)

    def _prefill_chunk(self, row: int, start: int, num_new: int, table: list[int]) -> PrefillChunk:
        """Tokens [start, start + num_new) of a sequence, at rows from `row`."""
        ctx_len = start + num_new
        # With the library, where the bits are not HF generate's anyway (half
        # precision, bf16 prompts): its prefill attention reads every chunk's
        # keys through the block table and needs no mask. fp32 keeps SDPA's
        # sums, which are HF's.
        in_place = self.prefill_in_place
        if start == 0 and not in_place:
            return PrefillChunk(row, num_new, ctx_len, None, None)
        blocks = torch.tensor(table[:-(-ctx_len // self.block_size)], device=self.device)
        if in_place:
            return PrefillChunk(row, num_new, ctx_len, blocks, None)
        key_pos = torch.arange(ctx_len, device=self.device)
        query_pos = torch.arange(start, ctx_len, device=self.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [q, C]: query i sees keys up to its position
        return PrefillChunk(row, num_new, ctx_len, blocks, mask)

    def _decode_groups(self, decode_tables: list[list[int]], decode_lens: list[int]) -> list[DecodeGroup]:
        """Decode rows (sorted by context length) in padded groups. The kernel
        reads each row only up to its own context, so padding costs it nothing:
        one group, no mask."""
        if self.net.attention_kernel:
            spans = [(0, len(decode_tables))] if decode_tables else []
        else:
            spans = _split_groups([len(t) for t in decode_tables], 0, len(decode_tables))
        groups = []
        for first, last in spans:
            width = len(decode_tables[last - 1])  # sorted: the group's longest is its last
            padded = [t + [0] * (width - len(t)) for t in decode_tables[first:last]]
            lens = torch.tensor(decode_lens[first:last], device=self.device)
            if self.net.attention_kernel:
                mask = torch.empty(0, dtype=torch.bool, device=self.device)
            else:
                key_pos = torch.arange(width * self.block_size, device=self.device)
                mask = (key_pos[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, C]
            blocks = torch.tensor([b for table in padded for b in table], device=self.device)  # [B * nb]
            groups.append(DecodeGroup(first, last - first, blocks, mask, lens))
        return groups


def _split_groups(widths: list[int], first: int, last: int, depth: int = 2) -> list[tuple[int, int]]:
    """Split sorted block counts [first, last) where that saves a quarter of the
    padded attention area (gathered KV bytes); at most 2**depth groups."""
    if last - first < 2 or depth == 0:
        return [(first, last)] if last > first else []
    whole = (last - first) * widths[last - 1]
    cost, cut = min(((k - first) * widths[k - 1] + (last - k) * widths[last - 1], k) for k in range(first + 1, last))
    if cost > 0.75 * whole:
        return [(first, last)]
    return _split_groups(widths, first, cut, depth - 1) + _split_groups(widths, cut, last, depth - 1)
