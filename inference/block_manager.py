"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts, prefix cache.

Only ids move here; the tensors live in the model runner. A block whose ref
count drops to zero joins the free queue; if it holds a full, hashed block of
tokens it stays findable by its hash until it is handed out again (LRU).
"""
from __future__ import annotations

from collections import OrderedDict

from inference.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # kept to verify a hash hit token for token


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front is handed out first). Uncached
        # blocks go to the front so cached ones are evicted only when needed.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --------------------------------------------------------------- hashing
    def update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes over every full block of its tokens.
        The salt enters the root, so tenants never share a chain."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        tokens = seq.token_ids
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else hash(("root", seq.cache_salt))
        for i in range(len(hashes), len(tokens) // bs):
            parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(parent)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the leading cached blocks of seq's tokens. A fully cached
        sequence gives up its last block so the model still computes the last
        position (its logits are needed) without writing into a shared block."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        hits = []
        bs = self.block_size
        for i, h in enumerate(seq.block_hashes):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: never reuse someone else's KV
            hits.append(block_id)
        if hits and len(hits) * bs >= seq.num_tokens:
            hits.pop()
        return hits

    # ------------------------------------------------------------ allocation
    def can_allocate(self, hits: list[int], num_tokens: int) -> bool:
        """Room for a new sequence whose first num_tokens are covered by hits + new blocks."""
        reviving = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits) + reviving <= len(self.free)

    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        self._grow(seq, num_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached content it still held
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Enter seq's newly completed (full and computed) blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        self.update_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            h = seq.block_hashes[i]
            if h in self.cached:
                continue  # an identical block computed by another sequence is already cached
            block = self.blocks[seq.block_table[i]]
            block.hash = h
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.cached[h] = block.block_id
        seq.num_registered_blocks = num_full

    def free_sequence(self, seq: Sequence) -> None:
        # Tail blocks first, so a prompt's head (the most shareable part) is evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.queried_tokens += num_queried
        self.hit_tokens += num_hit
