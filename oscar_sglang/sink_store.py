"""SinkStore: exact BF16 sinks of cached prefixes, kept by slot.

So that a prefix cached in the radix tree keeps exact BF16 sinks, a small store of BF16 rows per
layer ([C, H_kv, D], K and V) is keyed by slot: `row_of_slot[slot]` is the store row holding the
exact rotated K/V of that slot (-1: none). Rows are assigned to the slots of positions < S when
an extend batch writes them (`assign`, host side, outside CUDA graphs) and filled from the
request's window rows after the write kernel (`save`); a radix hit's window rows are restored
from them (OscarTokenToKVPool.restore_windows). The allocator's free / clear hooks
(patches/allocator_*.py) release them (`release` / `reset`) when their slots go back to its free
list.
Releasing is GPU-only (no host sync inside the scheduler's free paths): released rows are
flagged in a device mask and moved to the host free list the next time `assign` runs short.
"""

import logging

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

logger = logging.getLogger(__name__)


class SinkStore:
    def __init__(self, slots: int, num_layers: int, num_kv_heads: int, head_dim: int, device,
                 memory_saver_adapter):
        """slots: the pool's slot count (row_of_slot is sized like its slot buffers). Holds no
        rows until `allocate`."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.device, self.memory_saver_adapter = device, memory_saver_adapter
        self.row_of_slot = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.released = torch.zeros(1, dtype=torch.bool, device=device)
        self.capacity = 0
        self.k: list[torch.Tensor] = []  # per layer [capacity, H_kv, D] bf16
        self.v: list[torch.Tensor] = []
        self._free: list[int] = []

    def allocate(self, capacity: int, sink_tokens: int) -> None:
        """`capacity` rows per layer (sequence starts of `sink_tokens` rows each); every slot
        loses its row."""
        shape = (capacity, self.num_kv_heads, self.head_dim)
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(self.num_layers)]
            self.v = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(self.num_layers)]
        self.capacity = capacity
        # one entry more than rows: releases of slots without a row flag that dummy entry
        self.released = torch.zeros(capacity + 1, dtype=torch.bool, device=self.device)
        self.reset()
        logger.info("OSCAR sink pool: %d BF16 rows (%d sequence starts of %d sinks), %.2f GB",
                    capacity, capacity // max(sink_tokens, 1), sink_tokens, self.nbytes() / 2**30)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))

    def reset(self) -> None:
        """Every slot is free (the allocator's clear()): every row is free."""
        self.row_of_slot.fill_(-1)
        self.released.zero_()
        self._free = list(range(self.capacity - 1, -1, -1))

    def release(self, free_index: torch.Tensor) -> None:
        """The slots `free_index` went back to the allocator's free list: release their rows.
        Device ops only (no host sync): the rows are flagged in `released`."""
        if self.capacity == 0 or free_index.numel() == 0:
            return
        slots = free_index.to(self.row_of_slot.device)
        rows = self.row_of_slot[slots]
        self.row_of_slot[slots] = -1
        self.released[torch.where(rows >= 0, rows, self.capacity)] = True

    def _harvest(self) -> None:
        """Move rows released since the last call to the host free list (syncs the device).
        Only the flags read are cleared: a release still in flight on another stream (the
        scheduler frees on its stream while the forward stream assigns) is harvested next time."""
        released = torch.nonzero(self.released[:self.capacity]).flatten()
        if released.numel():
            self.released[released] = False
            self._free.extend(released.tolist())

    def free_rows(self) -> int:
        """Free rows (syncs the device; for logging and tests)."""
        self._harvest()
        return len(self._free)

    def used_rows(self) -> int:
        """Rows owned by a slot (syncs the device; for logging and tests)."""
        return int((self.row_of_slot >= 0).sum())

    def unharvested_free_rows(self) -> list[int]:
        """The free rows without harvesting (no state change; for tests' bookkeeping checks)."""
        return self._free + torch.nonzero(self.released[:self.capacity]).flatten().tolist()

    def assign(self, slots: torch.Tensor, window_rows: list[int]):
        """Give rows to the slots of new positions < S of an extend batch, as far as free rows
        last. Host side (not inside a CUDA graph). slots: [n] slot ids on the device;
        window_rows: the n window rows the write kernel fills for them. Returns
        (window_rows, sink_rows) device tensors of the pairs `save` copies, or None."""
        n = len(window_rows)
        if self.capacity == 0 or n == 0:
            return None
        if len(self._free) < n:
            self._harvest()
        k = min(n, len(self._free))
        if k == 0:
            return None
        rows = [self._free.pop() for _ in range(k)]
        slots = slots[:k].to(self.row_of_slot.device)
        self.release(slots)  # a fresh slot has none; never leak one if it had
        rows = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.row_of_slot[slots] = rows.to(torch.int32)
        return torch.tensor(window_rows[:k], dtype=torch.int64, device=self.device), rows

    def save(self, layer: int, k_window: torch.Tensor, v_window: torch.Tensor, window_rows: torch.Tensor,
             sink_rows: torch.Tensor) -> None:
        """Copy layer `layer`'s (0-based in this store) freshly written window rows into their
        store rows."""
        self.k[layer].index_copy_(0, sink_rows, k_window.index_select(0, window_rows))
        self.v[layer].index_copy_(0, sink_rows, v_window.index_select(0, window_rows))

    def move(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        """Rows follow their slots moved from src_loc to tgt_loc (the pool's slot moves)."""
        self.release(tgt_loc)
        moved = self.row_of_slot[src_loc]
        self.row_of_slot[src_loc] = -1
        self.row_of_slot[tgt_loc] = moved
