"""OscarTokenToKVPool under SGLang's real slot machinery (CPU, seconds).

Everything SGLang here is the real class: TokenToKVPoolAllocator / PagedTokenToKVPoolAllocator
over the OSCAR pool, ReqToTokenPool, RadixCache (built from CacheInitParams as the scheduler
does in 0.5.17) and Req. The scheduler itself needs a server, so its steps are replayed in the
order it runs them: Req.init_next_round_input (match_prefix) -> inc_lock_ref (PrefillAdder) ->
ReqToTokenPool.alloc + slot allocation + req_to_token writes (alloc_for_extend) -> KV write
(as OscarAttnBackend does: sink-pool rows for new positions < S from its _assign_sink_rows,
write_kv_int2 with rows from pool.window_rows_for, then pool.save_sinks) ->
cache_unfinished_req / cache_finished_req / ReqToTokenPool.free (release_kv_cache).
The plugin's allocator hooks are applied (SGLang's load_plugins), so frees release sink rows.

At every checkpoint the slot books must balance: allocator free list + slots held by the tree +
slots owned by running requests = every slot exactly once, req-pool rows = free + running, and
each node's lock_ref = the running requests whose last_node lies below it. The sink-pool books
too: every row is either free or owned by exactly one slot, and that slot is not free.
"""

import math
import types
from array import array
from collections import Counter

import pytest
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

pytestmark = pytest.mark.usefixtures("oscar_allocator_hooks")


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
        write_kv_int2(k, v, slots, lay.k_rot, lay.v_rot, lay.k_clip, lay.v_clip, lay.k_codes,
                      lay.k_meta, lay.v_codes, lay.v_meta, FMT, rows, lay.k_window, lay.v_window)
        if sink_copy is not None:
            pool.save_sinks(layer, *sink_copy)


def backend_assign_sink_rows(pool: OscarTokenToKVPool, req_pool_idx: int, prefix: int,
                             slots: torch.Tensor):
    """OscarAttnBackend._assign_sink_rows (the real method) for an extend batch holding one
    request whose new tokens at positions prefix.. go to `slots`."""
    from oscar_sglang.backend import OscarAttnBackend

    batch = types.SimpleNamespace(extend_prefix_lens_cpu=[prefix], extend_seq_lens_cpu=[slots.numel()],
                                  out_cache_loc=slots)
    backend = types.SimpleNamespace(pool=pool, fmt=pool.fmt)
    return OscarAttnBackend._assign_sink_rows(backend, batch, [req_pool_idx])


def check_sink_books(pool: OscarTokenToKVPool, free_units, page_size: int = 1):
    """Every sink row is free or owned by exactly one slot, and no free slot owns one."""
    slot_rows = pool.sink_row_of_slot
    owners = torch.nonzero(slot_rows >= 0).flatten()
    rows = slot_rows[owners].tolist()
    assert len(rows) == len(set(rows)), "two slots share a sink row"
    free_rows = pool._sink_free + torch.nonzero(pool._sink_released[:pool.sink_capacity]).flatten().tolist()
    assert len(free_rows) == len(set(free_rows)), "a sink row is free twice"
    assert not set(free_rows) & set(rows), "a sink row is both free and owned"
    assert sorted(free_rows + rows) == list(range(pool.sink_capacity)), "sink rows leaked"
    assert pool.sink_rows_free() + pool.sink_rows_used() == pool.sink_capacity
    stale = set((owners // page_size).tolist()) & set(free_units)
    assert not stale, f"free slots/pages {sorted(stale)[:8]} still own sink rows"
    return owners


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
        sink_copy = None if decode else backend_assign_sink_rows(self.pool, req.req_pool_idx, start, slots)
        positions = torch.arange(start, start + n)
        rows = self.pool.window_rows_for(torch.full((n,), req.req_pool_idx), positions,
                                         torch.full((n,), start + n))
        write_random_kv(self.pool, slots, rows, sink_copy, self.gen)

    def window_sinks(self, req: Req, n: int = FMT.sink_tokens):
        """Copies of the BF16 window rows of `req`'s first n positions: [k, v][layer]."""
        start = req.req_pool_idx * FMT.window_rows
        return [[w[start:start + n].clone() for w in ws] for ws in (self.pool.k_window, self.pool.v_window)]

    def snapshot(self):
        """Copies of codes/meta of every layer: [k_codes, k_meta, v_codes, v_meta][layer]."""
        return [[b.clone() for b in bufs] for bufs in
                (self.pool.k_buffer, self.pool.k_scale_buffer, self.pool.v_buffer, self.pool.v_scale_buffer)]

    def poison_windows(self, req: Req):
        block = slice(req.req_pool_idx * FMT.window_rows, (req.req_pool_idx + 1) * FMT.window_rows)
        for w in (*self.pool.k_window, *self.pool.v_window):
            w[block] = WINDOW_POISON

    # ---- the books -------------------------------------------------------------------------

    def nodes(self):
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

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
        assert self.pool.sink_rows_used() == 0
        assert self.pool.sink_rows_free() == self.pool.sink_capacity


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
    start = req_idx * FMT.window_rows
    rows = {FMT.window_row(start, p): p for p in restored}
    bufs = expect_bufs or [pool.k_buffer, pool.k_scale_buffer, pool.v_buffer, pool.v_scale_buffer]
    for layer in range(LAYERS):
        for codes, meta, window, store in (
                (bufs[0][layer], bufs[1][layer], pool.k_window[layer], pool.k_sink),
                (bufs[2][layer], bufs[3][layer], pool.v_window[layer], pool.v_sink)):
            for row in range(start, start + FMT.window_rows):
                if row in rows:
                    slot = slots[rows[row]].long()
                    sink_row = int(pool.sink_row_of_slot[slot])
                    if rows[row] < FMT.sink_tokens and sink_row >= 0:
                        want = store[layer][sink_row]
                    else:
                        want = decode_kv(codes[slot], meta[slot], FMT).to(torch.bfloat16)
                    assert torch.equal(window[row], want), f"layer {layer} window row {row}"
                elif untouched_poison:
                    assert (window[row] == WINDOW_POISON).all(), f"row {row} written by restore"


# ---- radix lifecycle --------------------------------------------------------------------------

def test_shared_prefix_lifecycle_page1():
    s = Stack(capacity=96)
    system, user_a = list(range(100, 124)), list(range(200, 216))

    # request A: 40-token prompt, prefilled, two decode steps, finished into the tree
    a = new_req("a", system + user_a, max_new_tokens=3)
    a_slots = s.admit(a)
    assert len(a.prefix_indices) == 0 and a_slots.numel() == 40
    s.write_kv(a, 0, a_slots)
    a_sinks = s.window_sinks(a)  # A's exact rotated BF16 sinks
    assert s.pool.sink_rows_used() == FMT.sink_tokens
    a.output_ids.append(900)
    s.cache.cache_unfinished_req(a)  # prefill done, not finished: the prompt enters the tree
    assert a.cache_protected_len == 40 and s.cache.protected_size() == 40
    s.check_books([a])
    for tok in (901, 902):
        pos = a.kv_committed_len
        s.write_kv(a, pos, s.decode_step(a), decode=True)
        a.output_ids.append(tok)
    s.check_books([a])
    a_all = s.row(a)[:42].to(torch.int64).clone()
    s.finish(a)
    assert s.tree_slots().sort().values.tolist() == a_all.sort().values.tolist()
    assert s.allocator.available_size() == 96 - 42 and s.cache.evictable_size() == 42
    s.check_books([])
    kept = s.snapshot()

    # request B shares 30 tokens: match_prefix hands back A's slots; its sinks come exact from
    # the sink pool, its recent rows from INT2
    b = new_req("b", (system + user_a)[:30] + list(range(300, 312)), max_new_tokens=2)
    b.init_next_round_input(s.cache)
    s.cache.inc_lock_ref(b.last_node)
    assert torch.equal(b.prefix_indices, a_all[:30]) and b.cache_protected_len == 30
    b.set_extend_range(30, 42)
    b_new = s.extend(b)
    s.poison_windows(b)
    s.pool.restore_windows([(b.req_pool_idx, s.row(b)[:30])])
    assert_windows_restored(s.pool, b.req_pool_idx, a_all[:30])
    assert_windows_restored(s.pool, b.req_pool_idx, a_all[:30], expect_bufs=kept)
    for exact, restored in zip(a_sinks, s.window_sinks(b)):
        for layer in range(LAYERS):
            assert torch.equal(restored[layer], exact[layer])
    s.check_books([b])
    assert not set(b_new.tolist()) & set(a_all.tolist())
    s.write_kv(b, 30, b_new)
    assert s.pool.sink_rows_used() == FMT.sink_tokens  # B wrote no sink position
    # B's own chunk leaves the sink rows (positions 0..3 of the shared prefix) alone
    sink_rows = slice(b.req_pool_idx * FMT.window_rows, b.req_pool_idx * FMT.window_rows + FMT.sink_tokens)
    for layer in range(LAYERS):
        assert torch.equal(s.pool.k_window[layer][sink_rows], a_sinks[0][layer])
        for new, old in zip(s.snapshot(), kept):  # the shared slots' codes were not touched
            assert torch.equal(new[layer][a_all], old[layer][a_all])

    # memory pressure: C needs 50 slots, 42 are free -> allocate fails -> evict -> retry
    c = new_req("c", list(range(500, 550)))
    c.init_next_round_input(s.cache)
    s.cache.inc_lock_ref(c.last_node)
    c.set_extend_range(0, 50)
    assert s.allocator.available_size() == 42 and s.allocator.alloc(50) is None
    c_slots = s.extend(c)  # evicts A's unlocked tail (12 slots), B's 30 locked ones stay
    assert s.tree_slots().sort().values.tolist() == a_all[:30].sort().values.tolist()
    assert not set(c_slots.tolist()) & set(a_all[:30].tolist())
    s.check_books([b, c])
    s.cache.evict(EvictParams(num_tokens=1000))  # locked nodes are never evicted
    assert s.tree_slots().numel() == 30 and s.allocator.available_size() == 4
    s.check_books([b, c])

    s.finish(c, insert=False)  # abort: freed, never inserted
    assert s.allocator.available_size() == 54
    s.check_books([b])
    b.output_ids.append(950)
    s.write_kv(b, 42, s.decode_step(b), decode=True)
    b.output_ids.append(951)
    s.finish(b)
    assert s.tree_slots().numel() == 43
    s.drain()


def test_shared_prefix_lifecycle_paged():
    """page_size 4 with SGLang's paged allocator (alloc_extend / alloc_decode Triton kernels
    run under the interpreter): page-aligned matches, chunked prefill, eviction, abort."""
    ps = 4
    s = Stack(capacity=96, page_size=ps)
    prompt_a = list(range(100, 142))  # 42 tokens

    a = new_req("a", prompt_a, max_new_tokens=2)
    a_slots = s.admit(a)
    s.write_kv(a, 0, a_slots)
    a_sinks = s.window_sinks(a)
    a.output_ids.append(900)
    s.cache.cache_unfinished_req(a)
    assert a.cache_protected_len == 40  # page-aligned part in the tree, 2 tokens stay with A
    s.check_books([a])
    slot = s.decode_step(a)
    assert slot.item() == s.row(a)[41].item() + 1  # continues A's partial page
    s.write_kv(a, 42, slot, decode=True)
    a.output_ids.append(901)
    a_all = s.row(a)[:43].to(torch.int64).clone()
    s.finish(a)  # key aligned to 40: the partial page (40..42) goes back
    assert s.tree_slots().numel() == 40
    assert s.allocator.available_size() == 96 - 40
    s.check_books([])
    kept = s.snapshot()

    # B shares 30 tokens -> match rounded down to 28 (7 pages)
    b = new_req("b", prompt_a[:30] + list(range(300, 314)), max_new_tokens=2)
    b_new = s.admit(b)
    assert b.cache_protected_len == 28 and torch.equal(b.prefix_indices, a_all[:28])
    assert_windows_restored(s.pool, b.req_pool_idx, a_all[:28], expect_bufs=kept, untouched_poison=False)
    for exact, restored in zip(a_sinks, s.window_sinks(b)):
        assert all(torch.equal(r, e) for r, e in zip(restored, exact))  # bit-exact sinks
    assert (b_new // ps).unique().numel() == math.ceil(14 / ps)
    s.write_kv(b, 28, b_new)
    s.check_books([b])

    # D: chunked prefill in page-aligned chunks of 12, inserted unfinished between chunks
    d = new_req("d", list(range(600, 630)), max_new_tokens=1)
    s.admit(d, chunk=12)
    s.check_books([b, d])
    for done, end in ((12, 24), (24, 30)):
        s.cache.cache_unfinished_req(d, chunked=True)  # Scheduler.stash_chunked_request
        assert d.cache_protected_len == done and s.cache.protected_size() == 28 + done
        s.check_books([b, d])
        d.set_extend_range(len(d.prefix_indices), end)  # PrefillAdder.add_chunked_req
        s.extend(d)
        s.check_books([b, d])
    d.output_ids.append(990)  # max_new_tokens 1: finished at prefill
    s.finish(d)
    s.check_books([b])

    # E needs 10 pages: only 3 are free, the rest comes from evicting unlocked leaves
    assert s.allocator.available_size() == 12
    e = new_req("e", list(range(700, 740)))
    s.admit(e)
    assert not set((s.row(e)[:40] // ps).tolist()) & set((a_all[:28] // ps).tolist())
    s.check_books([b, e])
    s.finish(e, insert=False)
    b.output_ids.append(950)
    s.write_kv(b, 42, s.decode_step(b), decode=True)
    b.output_ids.append(951)
    s.finish(b)
    s.check_books([])
    s.drain()


def test_duplicate_prefix_slots_are_freed_once():
    """Two requests prefill the same prompt before either is inserted: the second insert finds
    the prefix, cache_unfinished_req frees its duplicate slots and re-points it at the tree's."""
    s = Stack(capacity=64)
    prompt = list(range(10, 30))
    x, y = new_req("x", prompt), new_req("y", prompt)
    x_slots, y_slots = s.admit(x), s.admit(y)
    assert len(y.prefix_indices) == 0  # x was not inserted yet
    for r in (x, y):
        r.output_ids.append(1)
        s.cache.cache_unfinished_req(r)
    assert torch.equal(s.row(y)[:20].to(torch.int64), x_slots)
    assert s.allocator.available_size() == 64 - 20  # y's 20 duplicates went back, once
    assert set(y_slots.tolist()) <= set(s.allocator.free_pages.tolist())
    s.check_books([x, y])
    for r in (x, y):
        s.decode_step(r)
        r.output_ids.append(2)
    s.finish(x)
    s.finish(y)
    s.drain()


# ---- restore_windows ----------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 11, 12, 13, 30])
def test_restore_windows_lengths(length):
    """Sinks, ring rows and nothing else, for prefixes shorter than, equal to and longer than
    the windows (S=4, W=8)."""
    pool = OscarTokenToKVPool(64, 1, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM))
    pool.allocate_windows(3)
    gen = torch.Generator().manual_seed(length)
    for bufs in (pool.k_buffer, pool.v_buffer):
        for b in bufs:
            b.copy_(torch.randint(0, 256, b.shape, generator=gen, dtype=torch.uint8))
    for bufs in (pool.k_scale_buffer, pool.v_scale_buffer):
        for b in bufs:
            b.copy_(torch.randn(b.shape, generator=gen).half())
    for w in (*pool.k_window, *pool.v_window):
        w.fill_(WINDOW_POISON)
    slots = torch.randperm(64, generator=gen)[:length].to(torch.int32) + 1
    pool.restore_windows([(2, slots)])
    assert_windows_restored(pool, 2, slots)
    for w in (*pool.k_window, *pool.v_window):  # other requests' rows untouched
        outside = torch.cat([w[:2 * FMT.window_rows], w[3 * FMT.window_rows:]])
        assert (outside == WINDOW_POISON).all()


# ---- pool plumbing --------------------------------------------------------------------------

def test_move_kv_cache_moves_codes_and_meta_of_every_layer():
    pool = OscarTokenToKVPool(32, 1, HEADS, HEAD_DIM, 3, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(3, HEADS, HEAD_DIM))
    pool.allocate_windows(2)
    gen = torch.Generator().manual_seed(7)
    for b in (*pool.k_buffer, *pool.v_buffer):
        b.copy_(torch.randint(0, 256, b.shape, generator=gen, dtype=torch.uint8))
    for b in (*pool.k_scale_buffer, *pool.v_scale_buffer, *pool.k_window, *pool.v_window):
        b.copy_(torch.randn(b.shape, generator=gen).to(b.dtype))
    groups = (pool.k_buffer, pool.v_buffer, pool.k_scale_buffer, pool.v_scale_buffer)
    before = [[b.clone() for b in g] for g in groups]
    windows = [w.clone() for w in (*pool.k_window, *pool.v_window)]
    src, tgt = torch.tensor([3, 4, 9, 17]), torch.tensor([20, 21, 5, 30])
    pool.move_kv_cache(tgt, src)
    for group, old in zip(groups, before):
        for layer, (buf, ref) in enumerate(zip(group, old)):
            want = ref.clone()
            want[tgt] = ref[src]
            assert torch.equal(buf, want), f"layer {layer}: {buf.dtype} buffer not moved"
    for w, ref in zip((*pool.k_window, *pool.v_window), windows):
        assert torch.equal(w, ref)  # windows belong to requests, not slots


def test_get_kv_size_bytes_counts_codes_meta_and_windows():
    size, page = 40, 1
    pool = OscarTokenToKVPool(size, page, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM))
    rows = size + page
    codes = rows * HEADS * HEAD_DIM // 4
    meta = rows * HEADS * (HEAD_DIM // FMT.group_size) * 2 * 2
    assert tuple(pool.get_kv_size_bytes()) == (LAYERS * (codes + meta),) * 2
    pool.allocate_windows(5)
    windows = 6 * FMT.window_rows * HEADS * HEAD_DIM * 2
    assert tuple(pool.get_kv_size_bytes()) == (LAYERS * (codes + meta + windows),) * 2
    # per token across layers, K+V: the format's own number
    assert 2 * LAYERS * (codes + meta) // rows == FMT.bytes_per_token(LAYERS, HEADS)


def test_direct_writes_and_offload_are_refused():
    pool = OscarTokenToKVPool(16, 1, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM))
    k = torch.zeros(2, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="oscar"):
        pool.set_kv_buffer(None, torch.tensor([1, 2]), k, k)
    allocator = TokenToKVPoolAllocator(16, torch.uint8, "cpu", pool, need_sort=False)
    with pytest.raises(NotImplementedError, match="oscar"):
        allocator.get_cpu_copy(torch.tensor([1]))
    with pytest.raises(NotImplementedError, match="oscar"):
        pool.get_contiguous_buf_infos()


# ---- capacity arithmetic (oscar_sglang/sizing.py) -------------------------------------------

QWEN3_8B = dict(layers=36, kv_heads=8, head_dim=128)


def test_qwen3_8b_bytes_per_token():
    fmt = OscarFormat(QWEN3_8B["head_dim"])
    int2 = fmt.bytes_per_token(QWEN3_8B["layers"], QWEN3_8B["kv_heads"])
    bf16 = 2 * QWEN3_8B["layers"] * QWEN3_8B["kv_heads"] * QWEN3_8B["head_dim"] * 2
    assert (int2, bf16) == (20_736, 147_456)
    assert fmt.window_bytes_per_request(QWEN3_8B["layers"], QWEN3_8B["kv_heads"]) == 28_311_552


@pytest.mark.parametrize("fraction,ratio", [(0.0, 147_456 / 20_736), (0.10, 0.9 * 147_456 / 20_736)])
def test_budgeted_cell_bytes_token_ratio(fraction, ratio):
    from oscar_sglang.sizing import budgeted_cell_bytes

    budget = 60 * 2**30
    cell = budgeted_cell_bytes(20_736, fraction)
    assert cell == math.ceil(20_736 / (1 - fraction))
    tokens, bf16_tokens = budget // cell, budget // 147_456
    assert tokens / bf16_tokens == pytest.approx(ratio, rel=1e-4)
    if fraction == 0.0:
        assert tokens >= 7 * bf16_tokens
    # what SGLang then allocates for INT2 leaves the fraction over
    assert budget - tokens * 20_736 >= fraction * budget - 20_736


def test_window_request_capacity_fits_budget():
    from oscar_sglang.sizing import budgeted_cell_bytes, window_request_capacity

    budget, fraction = 60 * 2**30, 0.10
    per_request = OscarFormat(128).window_bytes_per_request(36, 8)
    cell = budgeted_cell_bytes(20_736, fraction)
    tokens = budget // cell
    fit = window_request_capacity(tokens, cell, fraction, per_request)
    assert 200 <= fit <= 230  # ~6.4 GB of 28 MB rows
    # fit requests + SGLang's padding row fit in the fraction, one more would not
    assert (fit + 1) * per_request <= tokens * cell * fraction < (fit + 2) * per_request
    assert tokens * 20_736 + (fit + 1) * per_request <= budget
    assert window_request_capacity(tokens, budgeted_cell_bytes(20_736, 0.0), 0.0, per_request) < 1


def _configurator(explicit_requests: bool, fraction: float = 0.10):
    """What compute_cell_size leaves on SGLang's DefaultPoolConfigurator, for Qwen3-8B."""
    from oscar_sglang.sizing import budgeted_cell_bytes

    fmt = OscarFormat(128)
    info = dict(explicit_requests=explicit_requests, page_size=16, fraction=fraction,
                window_bytes=fmt.window_bytes_per_request(36, 8), sink_bytes=9_437_184,
                sink_rows=64, int2_bytes=20_736, bf16_bytes=147_456, bits=2.25, key_bits=2, group=128)
    cell = 20_736 if explicit_requests else budgeted_cell_bytes(20_736, fraction)
    return types.SimpleNamespace(_oscar=info, _cell_size=cell)


def test_explicit_max_running_requests_gets_its_window_rows():
    """--max-running-requests N: N requests keep their BF16 rows, the INT2 pool gets the rest
    of the budget (whole pages); the window fraction caps only when N is not given."""
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig
    from oscar_sglang.sizing import finalize_with_max_running_requests

    budget = 20 * 2**30
    per_request = 28_311_552 + 9_437_184
    explicit = _configurator(True)
    config = MemoryPoolConfig(max_total_num_tokens=budget // 20_736, max_running_requests=192)
    config = finalize_with_max_running_requests(lambda _, c: c, explicit, config)
    assert config.max_running_requests == 192
    assert config.max_total_num_tokens % 16 == 0
    used = config.max_total_num_tokens * 20_736 + 193 * per_request
    assert budget - 16 * 20_736 < used + 20_736 and used <= budget

    by_fraction = _configurator(False)
    cell = by_fraction._cell_size
    config = MemoryPoolConfig(max_total_num_tokens=budget // cell, max_running_requests=2048)
    config = finalize_with_max_running_requests(lambda _, c: c, by_fraction, config)
    assert config.max_running_requests == int(budget // cell * cell * 0.10 // per_request) - 1 < 192

    too_many = MemoryPoolConfig(max_total_num_tokens=budget // 20_736, max_running_requests=600)
    with pytest.raises(ValueError, match="lower --max-running-requests"):
        finalize_with_max_running_requests(lambda _, c: c, explicit, too_many)
