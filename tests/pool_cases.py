"""The pool under SGLang's real slot machinery, for the pool tests: a Stack of SGLang's real
allocator, ReqToTokenPool and RadixCache over OscarTokenToKVPool, the scheduler's steps replayed in
its order, and the books that must balance after each (see test_pool_lifecycle.py)."""

import types
from array import array
from collections import Counter

import torch
from sglang.srt.managers.schedule_batch import Req, ReqKvInfo
from sglang.srt.mem_cache.allocation import (
    alloc_paged_token_slots_decode,
    alloc_paged_token_slots_extend,
    alloc_token_slots,
)
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.quantize import write_kv_int2
from oscar_sglang.kernels.reference import decode_kv
from oscar_sglang.kernels.rotation_file import data_free_rotations
from oscar_sglang.pool import OscarTokenToKVPool
from oscar_sglang.sizing import sink_rows_per_request

HEADS, HEAD_DIM, LAYERS = 2, 64, 2
FMT = OscarFormat(HEAD_DIM, sink_tokens=4, recent_tokens=8)
WINDOW_POISON = 1234.0


def map_request_slots(req_to_token_pool, req: Req, prefix: int, end: int, new: torch.Tensor):
    """What alloc_for_extend records for one request: its prefix and new slots in
    req_to_token, and its KV lengths."""
    req_to_token_pool.write((req.req_pool_idx, slice(0, prefix)), req.prefix_indices)
    req_to_token_pool.write((req.req_pool_idx, slice(prefix, end)), new)
    if req.kv is None:
        req.kv = ReqKvInfo(kv_allocated_len=end, swa_evicted_seqlen=0)
    else:
        req.kv.kv_allocated_len = end
    req.kv_committed_len = end


def write_random_kv(pool, slots: torch.Tensor, rows: torch.Tensor, sink_copy, gen: torch.Generator):
    """Random K/V (K at twice V's scale) for `slots` in every layer through write_kv_int2, with
    window rows `rows`; then, as forward_extend does, the new sinks into their sink-pool rows."""
    n = slots.numel()
    for layer in range(LAYERS):
        lay = pool.layer(layer)
        k = (torch.randn(n, HEADS, HEAD_DIM, generator=gen) * 2).bfloat16()
        v = torch.randn(n, HEADS, HEAD_DIM, generator=gen).bfloat16()
        write_kv_int2(k, v, slots, lay, rows)
        if sink_copy is not None:
            pool.save_sinks(layer, *sink_copy)


def assign_sink_rows_of(pool: OscarTokenToKVPool, req_pool_idx: int, prefix: int,
                             slots: torch.Tensor):
    """forward_plan.assign_sink_rows (what the backend plans) for an extend batch holding one
    request whose new tokens at positions prefix.. go to `slots`."""
    from oscar_sglang.forward_plan import assign_sink_rows

    batch = types.SimpleNamespace(extend_prefix_lens_cpu=[prefix], extend_seq_lens_cpu=[slots.numel()],
                                  out_cache_loc=slots)
    return assign_sink_rows(pool, batch, [req_pool_idx])


def check_sink_books(pool: OscarTokenToKVPool, free_units, page_size: int = 1):
    """Every sink row is free or owned by exactly one slot, and no free slot owns one."""
    slot_rows = pool.sinks.row_of_slot
    owners = torch.nonzero(slot_rows >= 0).flatten()
    rows = slot_rows[owners].tolist()
    assert len(rows) == len(set(rows)), "two slots share a sink row"
    free_rows = pool.sinks.unharvested_free_rows()
    assert len(free_rows) == len(set(free_rows)), "a sink row is free twice"
    assert not set(free_rows) & set(rows), "a sink row is both free and owned"
    assert sorted(free_rows + rows) == list(range(pool.sinks.capacity)), "sink rows leaked"
    assert pool.sinks.free_rows() + pool.sinks.used_rows() == pool.sinks.capacity
    stale = set((owners // page_size).tolist()) & set(free_units)
    assert not stale, f"free slots/pages {sorted(stale)[:8]} still own sink rows"
    return owners


def radix_nodes(cache):
    """Every node of a RadixCache below its root, depth first."""
    stack = list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


class Stack:
    """The OSCAR pool with SGLang's allocator, request pool and radix cache on top."""

    def __init__(self, capacity: int, page_size: int = 1, max_reqs: int = 6, max_context: int = 128):
        self.capacity, self.page_size = capacity, page_size
        self.pool = OscarTokenToKVPool(capacity, page_size, HEADS, HEAD_DIM, LAYERS, "cpu", False,
                                       fmt=FMT, rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM),
                                       sink_rows_per_request=sink_rows_per_request(FMT))
        if page_size == 1:
            self.allocator = TokenToKVPoolAllocator(capacity, torch.uint8, "cpu", self.pool, need_sort=False)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(capacity, page_size, torch.uint8, "cpu",
                                                         self.pool, need_sort=False)
        self.req_to_token_pool = ReqToTokenPool(max_reqs, max_context, "cpu", False)
        self.pool.allocate_windows(self.req_to_token_pool.size)  # what OscarAttnBackend does
        self.cache = RadixCache(CacheInitParams(
            disable=False, req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.allocator, page_size=page_size))
        self.gen = torch.Generator().manual_seed(capacity * 10 + page_size)

    @property
    def units(self) -> int:
        """Allocation units: slots at page_size 1, pages otherwise (slot/page 0 is padding)."""
        return self.capacity // self.page_size

    def row(self, req: Req) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx]

    # ---- the scheduler's steps -------------------------------------------------------------

    def admit(self, req: Req, chunk: int | None = None) -> torch.Tensor:
        """init_next_round_input + PrefillAdder (lock, extend range) + alloc_for_extend.
        Returns the new slots; the backend's window restore for a radix hit is done too."""
        req.init_next_round_input(self.cache)
        self.cache.inc_lock_ref(req.last_node)
        prefix = len(req.prefix_indices)
        end = len(req.full_untruncated_fill_ids)
        if chunk is not None:
            end = min(end, prefix + chunk)
        req.set_extend_range(prefix, end)
        new = self.extend(req)
        if prefix > 0:  # OscarAttnBackend._restore_windows_of_new_requests
            self.pool.restore_windows([(req.req_pool_idx, self.row(req)[:prefix])])
        return new

    def extend(self, req: Req) -> torch.Tensor:
        """alloc_for_extend for one request whose extend_range is set."""
        prefix, end = req.extend_range
        assert len(req.prefix_indices) == prefix
        self.req_to_token_pool.alloc([req])
        if self.page_size == 1:
            new = self.alloc_or_evict(end - prefix)
        else:
            self.assert_fits_paged(end - prefix)
            last = req.prefix_indices[-1:] if prefix else torch.tensor([-1])
            new = alloc_paged_token_slots_extend(
                self.cache, torch.tensor([prefix]), torch.tensor([prefix]), torch.tensor([end]),
                torch.tensor([end]), last.to(torch.int64), end - prefix)
        map_request_slots(self.req_to_token_pool, req, prefix, end, new)
        return new

    def alloc_or_evict(self, n: int) -> torch.Tensor:
        """Allocator refuses -> evict the shortfall from the tree -> retry."""
        out = self.allocator.alloc(n)
        if out is None:
            self.cache.evict(EvictParams(num_tokens=n - self.allocator.available_size()))
            out = self.allocator.alloc(n)
        assert out is not None, f"no {n} slots even after eviction"
        return out

    def assert_fits_paged(self, tokens: int):
        # alloc_extend reads free_pages before checking the count; on CPU (Triton interpreter)
        # an over-ask reads past the tensor, so the PrefillAdder-style budget check is a must
        need = tokens + self.page_size
        have = self.allocator.available_size() + self.cache.evictable_size()
        assert have >= need, f"test bug: {need} tokens asked, {have} available + evictable"

    def decode_step(self, req: Req) -> torch.Tensor:
        """prepare_for_decode for one request: one new slot at position kv_committed_len."""
        pos = req.kv_committed_len
        if self.page_size == 1:
            slot = alloc_token_slots(self.cache, 1)
        else:
            self.assert_fits_paged(1)
            slot = alloc_paged_token_slots_decode(
                self.cache, torch.tensor([pos + 1]), torch.tensor([pos + 1]),
                self.row(req)[pos - 1:pos].to(torch.int64))
        self.req_to_token_pool.write((req.req_pool_idx, pos), slot)
        req.kv_committed_len += 1
        req.kv.kv_allocated_len += 1
        return slot

    def finish(self, req: Req, insert: bool = True):
        """release_kv_cache: cache_finished_req (insert or not) + free the request row."""
        self.cache.cache_finished_req(req, is_insert=insert, kv_len_to_handle=req.kv_committed_len)
        self.req_to_token_pool.free(req)
        req.kv = None

    # ---- KV writes -------------------------------------------------------------------------

    def write_kv(self, req: Req, start: int, slots: torch.Tensor, decode: bool = False):
        """New tokens at positions start.. of `req` into `slots`, as the backend's forward does:
        an extend first gets sink-pool rows for its positions < S (decode never does), then
        every layer is written and its new sinks are copied into those rows."""
        n = slots.numel()
        sink_copy = None if decode else assign_sink_rows_of(self.pool, req.req_pool_idx, start, slots)
        positions = torch.arange(start, start + n)
        rows = self.pool.window_rows_for(torch.full((n,), req.req_pool_idx), positions,
                                         torch.full((n,), start + n))
        write_random_kv(self.pool, slots, rows, sink_copy, self.gen)

    def window_sinks(self, req: Req, n: int = FMT.sink_tokens):
        """Copies of the BF16 window rows of `req`'s first n positions: [k, v][layer]."""
        start = req.req_pool_idx * FMT.window_rows_per_request
        return [[w[start:start + n].clone() for w in ws] for ws in (self.pool.k_window, self.pool.v_window)]

    def snapshot(self):
        """Copies of codes/meta of every layer: [k_codes, k_meta, v_codes, v_meta][layer]."""
        return [[b.clone() for b in bufs] for bufs in
                (self.pool.k_buffer, self.pool.k_scale_buffer, self.pool.v_buffer, self.pool.v_scale_buffer)]

    def poison_windows(self, req: Req):
        block = slice(req.req_pool_idx * FMT.window_rows_per_request, (req.req_pool_idx + 1) * FMT.window_rows_per_request)
        for w in (*self.pool.k_window, *self.pool.v_window):
            w[block] = WINDOW_POISON

    # ---- the books -------------------------------------------------------------------------

    def nodes(self):
        return radix_nodes(self.cache)

    def tree_slots(self) -> torch.Tensor:
        values = [n.value for n in self.nodes()]
        return torch.cat(values).to(torch.int64) if values else torch.empty(0, dtype=torch.int64)

    def check_books(self, running: list[Req]):
        ps, units = self.page_size, self.units
        free = torch.cat([self.allocator.free_pages, self.allocator.release_pages]).tolist()
        assert len(free) == len(set(free)), "a slot/page is on the free list twice (double free)"
        assert all(1 <= u <= units for u in free), "free list holds the padding unit or garbage"

        tree = self.tree_slots()
        assert tree.numel() == tree.unique().numel(), "two tree nodes share a slot"
        tree_units = Counter((tree // ps).tolist())
        assert all(c == ps for c in tree_units.values()), "the tree holds a partial page"

        owned: list[int] = []
        for req in running:
            row = self.row(req)
            # the protected prefix is exactly the tree path down to last_node
            path, node = [], req.last_node
            while node is not self.cache.root_node:
                path.insert(0, node.value)
                node = node.parent
            path = torch.cat(path) if path else torch.empty(0, dtype=torch.int64)
            assert len(path) == req.cache_protected_len
            assert torch.equal(row[:req.cache_protected_len].to(torch.int64), path)
            mine = row[req.cache_protected_len:req.kv.kv_allocated_len].to(torch.int64)
            owned.extend((mine // ps).unique().tolist())
        assert len(owned) == len(set(owned)), "two running requests own the same slot/page"

        sets = (set(free), set(tree_units), set(owned))
        assert sum(map(len, sets)) == units, (
            f"free {len(sets[0])} + tree {len(sets[1])} + running {len(sets[2])} != {units}")
        assert set().union(*sets) == set(range(1, units + 1)), "slots leaked or double-booked"

        # radix cache counters and locks
        assert self.cache.evictable_size() + self.cache.protected_size() == tree.numel()
        expected = Counter()
        for req in running:
            node = req.last_node
            while node is not self.cache.root_node:
                expected[id(node)] += 1
                node = node.parent
        assert self.cache.root_node.lock_ref == 1
        protected = 0
        for node in self.nodes():
            assert node.lock_ref == expected[id(node)], "lock_ref differs from the running requests"
            protected += len(node.key) if node.lock_ref else 0
            leaf = not node.children and node.lock_ref == 0
            assert (node in self.cache.evictable_leaves) == leaf
        assert self.cache.protected_size() == protected

        rows = self.req_to_token_pool.free_slots + [r.req_pool_idx for r in running]
        assert sorted(rows) == list(range(1, self.req_to_token_pool.size + 1))
        check_sink_books(self.pool, free, ps)

    def drain(self):
        """Evict everything once no request is running: every unit back on the free list."""
        self.check_books([])
        self.cache.evict(EvictParams(num_tokens=self.capacity))
        assert self.tree_slots().numel() == 0 and self.cache.evictable_size() == 0
        assert self.allocator.available_size() == self.capacity
        self.check_books([])
        assert self.pool.sinks.used_rows() == 0
        assert self.pool.sinks.free_rows() == self.pool.sinks.capacity


def new_req(rid: str, ids, max_new_tokens: int = 8) -> Req:
    return Req(rid, "", array("q", ids), SamplingParams(max_new_tokens=max_new_tokens))


def assert_windows_restored(pool: OscarTokenToKVPool, req_idx: int, slots: torch.Tensor,
                            expect_bufs=None, untouched_poison: bool = True):
    """Window rows of request `req_idx` for its prefix `slots` (positions 0..n-1) hold the
    sink-pool row of a sink whose slot has one and the dequantized codes of every other slot;
    with untouched_poison, no other row of it was written."""
    n = slots.numel()
    sink_end, recent_start = FMT.int2_span(n)
    restored = [*range(sink_end), *range(recent_start, n)]
    start = req_idx * FMT.window_rows_per_request
    rows = {FMT.window_row(start, p): p for p in restored}
    bufs = expect_bufs or [pool.k_buffer, pool.k_scale_buffer, pool.v_buffer, pool.v_scale_buffer]
    for layer in range(LAYERS):
        for codes, meta, window, store in (
                (bufs[0][layer], bufs[1][layer], pool.k_window[layer], pool.sinks.k),
                (bufs[2][layer], bufs[3][layer], pool.v_window[layer], pool.sinks.v)):
            for row in range(start, start + FMT.window_rows_per_request):
                if row in rows:
                    slot = slots[rows[row]].long()
                    sink_row = int(pool.sinks.row_of_slot[slot])
                    if rows[row] < FMT.sink_tokens and sink_row >= 0:
                        want = store[layer][sink_row]
                    else:
                        want = decode_kv(codes[slot], meta[slot], FMT).to(torch.bfloat16)
                    assert torch.equal(window[row], want), f"layer {layer} window row {row}"
                elif untouched_poison:
                    assert (window[row] == WINDOW_POISON).all(), f"row {row} written by restore"


# ---- radix lifecycle --------------------------------------------------------------------------
