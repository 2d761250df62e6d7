"""Decode steps replayed from CUDA graphs (EngineConfig.cuda_graphs).

On a GPU a small model's decode step is bound by kernel launches, not by the
GPU: hundreds of small kernels, each launched from the host. A captured graph
replays them all in one launch. A graph has fixed shapes, so each is captured
for a bucket: a batch size (rounded up to a power of two) and a context width
in blocks (rounded up the same way), lazily, on the first step that needs it.
Padded rows read block 0 under a mask and write their K/V into a scratch block
that the block manager never hands out (the last block of the cache).

Not yet run on a GPU: the project's machines and CI have none. Its tests,
tests/inference/test_engine_cuda.py (the graphs' tokens against the eager
steps' and fp32's against HF generate), run where one is, as
bench/device_check.sh does on a lent GPU machine; the config refuses it
without CUDA.
"""
from __future__ import annotations

import torch

from inference.llama import AttentionPlan, DecodeGroup, PagedLlama


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Graph:
    """One captured decode step: static inputs, the graph, its logits."""

    def __init__(self, net: PagedLlama, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 rows: int, width: int, block_size: int, scratch_slot: int, pool):
        device = k_cache.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        # The warm-up runs really write K/V: into the scratch block, never a sequence's.
        self.slots = torch.full((rows,), scratch_slot, dtype=torch.long, device=device)
        self.blocks = torch.zeros(rows * width, dtype=torch.long, device=device)  # [B * nb]
        self.mask = torch.zeros(rows, 1, 1, width * block_size, dtype=torch.bool, device=device)
        logit_rows = torch.arange(rows, device=device)
        # Read only by the CPU kernel; the graphs run the torch path (masked).
        self.context_lens = torch.ones(rows, dtype=torch.long, device=device)
        plan = AttentionPlan(rows, [DecodeGroup(0, rows, self.blocks, self.mask, self.context_lens)], [])

        def step() -> torch.Tensor:
            return net.forward(self.tokens, self.positions, self.slots, plan, logit_rows, k_cache, v_cache)

        self.mask[:, :, :, 0] = True  # warm-up rows attend somewhere (no all-masked softmax)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # lazy inits (cuBLAS handles, workspaces) happen outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
            self.logits = step()  # [B, V]


class DecodeGraphs:
    def __init__(self, net: PagedLlama, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_size: int, scratch_block: int):
        self.net, self.k_cache, self.v_cache = net, k_cache, v_cache
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def run(self, tokens: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], lens: list[int]) -> torch.Tensor:
        """One decode token per row; returns logits [rows, V] fp32 (a copy)."""
        n = len(tokens)
        rows, width = _bucket(n), _bucket(max(len(t) for t in tables))
        graph = self.graphs.get((rows, width))
        if graph is None:
            graph = self.graphs[(rows, width)] = _Graph(self.net, self.k_cache, self.v_cache, rows, width,
                                                       self.block_size, self.scratch_slot, self.pool)
        pad = rows - n
        blocks = [b for t in tables for b in t + [0] * (width - len(t))] + [0] * (pad * width)
        key_pos = torch.arange(width * self.block_size)
        lens_t = torch.tensor(lens + [1] * pad)  # padded rows see one (masked-in) key: no NaN
        graph.tokens.copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        graph.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        graph.slots.copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        graph.blocks.copy_(torch.tensor(blocks), non_blocking=True)
        graph.mask.copy_((key_pos[None, :] < lens_t[:, None])[:, None, None, :], non_blocking=True)
        graph.graph.replay()
        return graph.logits[:n].clone()
