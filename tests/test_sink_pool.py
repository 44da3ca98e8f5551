"""The slot-keyed sink pool (oscar_sglang/pool.py) under SGLang's real allocators
and RadixCache (CPU, seconds): a radix hit restores the exact BF16 sinks its prefix was written
with, the rows go back when the allocator frees their slots (free, free groups, segments, pages,
clear), and a full pool falls back to dequantized sinks.

The scheduler steps are replayed as in test_pool_lifecycle (its Stack); the allocator hooks are
the plugin's, applied by SGLang's load_plugins().
"""

import types

import pytest
import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from oscar_sglang.forward_plan import assign_sink_rows
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.reference import decode_kv
from oscar_sglang.kernels.rotation_file import data_free_rotations
from oscar_sglang.pool import OscarTokenToKVPool
from oscar_sglang.sizing import (
    budgeted_cell_bytes,
    sink_bytes_per_request,
    sink_rows_per_request,
    window_request_capacity,
)
from pool_cases import FMT, HEADS, HEAD_DIM, LAYERS, Stack, assert_windows_restored, check_sink_books, new_req

S = FMT.sink_tokens
pytestmark = pytest.mark.usefixtures("oscar_allocator_hooks")


def small_pool(size=32, page_size=1, sink_rows=S, requests=2):
    pool = OscarTokenToKVPool(size, page_size, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM),
                              sink_rows_per_request=sink_rows)
    pool.allocate_windows(requests)
    return pool


def fill_random(pool: OscarTokenToKVPool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for b in (*pool.k_buffer, *pool.v_buffer):
        b.copy_(torch.randint(0, 256, b.shape, generator=gen, dtype=torch.uint8))
    for b in (*pool.k_scale_buffer, *pool.v_scale_buffer):
        b.copy_(torch.rand(b.shape, generator=gen).half())
    for w in (*pool.k_window, *pool.v_window):
        w.copy_(torch.randn(w.shape, generator=gen).bfloat16())


def sinks_of(pool, req_idx):
    start = req_idx * FMT.window_rows_per_request
    return [[w[start:start + S].clone() for w in ws] for ws in (pool.k_window, pool.v_window)]


def admit_poisoned(s: Stack, req):
    """Stack.admit with the request's window rows poisoned between its request-row allocation
    and the restore, so that nothing left there by an earlier owner passes for restored."""
    req.init_next_round_input(s.cache)
    s.cache.inc_lock_ref(req.last_node)
    prefix = len(req.prefix_indices)
    req.set_extend_range(prefix, len(req.full_untruncated_fill_ids))
    new = s.extend(req)
    s.poison_windows(req)
    s.pool.restore_windows([(req.req_pool_idx, s.row(req)[:prefix])])
    return new


def free_units(s: Stack):
    return torch.cat([s.allocator.free_pages, s.allocator.release_pages]).tolist()


# ---- radix hit -> exact sinks -> eviction frees the rows -------------------------------------

@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_hit_restores_exact_sinks_and_eviction_frees_them(page_size):
    s = Stack(capacity=64, page_size=page_size, max_reqs=3)
    capacity = s.pool.sinks.capacity
    assert capacity == 3 * S and s.pool.sinks.free_rows() == capacity

    a = new_req("a", list(range(100, 120)), max_new_tokens=1)
    s.write_kv(a, 0, s.admit(a))
    exact = s.window_sinks(a)  # A's rotated BF16 sinks as the write kernel stored them
    a_slots = s.row(a)[:20].to(torch.int64).clone()
    assert s.pool.sinks.used_rows() == S
    assert (s.pool.sinks.row_of_slot[a_slots[:S]] >= 0).all()
    assert (s.pool.sinks.row_of_slot[a_slots[S:]] == -1).all()
    a.output_ids.append(900)
    s.finish(a)  # prompt inserted into the tree; A's request row is free again
    s.check_books([])
    assert s.pool.sinks.used_rows() == S

    # B shares 12 tokens: a radix hit on A's slots, sinks restored bit-exactly
    b = new_req("b", list(range(100, 112)) + list(range(300, 306)), max_new_tokens=1)
    b_new = admit_poisoned(s, b)  # restore_windows, as the backend does at admission
    assert torch.equal(b.prefix_indices.to(torch.int64), a_slots[:12])
    restored = s.window_sinks(b)
    for kv in range(2):
        for layer in range(LAYERS):
            assert torch.equal(restored[kv][layer], exact[kv][layer])
    # ... which is not what dequantizing the codes would have given
    codes, meta = s.pool.k_buffer[0][a_slots[:S]], s.pool.k_scale_buffer[0][a_slots[:S]]
    assert not torch.equal(decode_kv(codes, meta, FMT).bfloat16(), exact[0][0])
    assert_windows_restored(s.pool, b.req_pool_idx, a_slots[:12], untouched_poison=False)
    s.write_kv(b, 12, b_new)
    assert s.pool.sinks.used_rows() == S  # B's new positions are no sinks
    s.check_books([b])
    b.output_ids.append(901)
    s.finish(b, insert=False)
    s.check_books([])

    # the tree evicts A's prefix, the allocator frees its slots: the rows go back
    s.cache.evict(EvictParams(num_tokens=64))
    assert s.allocator.available_size() == 64
    assert s.pool.sinks.used_rows() == 0
    assert s.pool.sinks.free_rows() == capacity  # free + used == capacity
    assert (s.pool.sinks.row_of_slot == -1).all()
    check_sink_books(s.pool, free_units(s), page_size)

    # a request whose prefix was evicted gets fresh rows (the released ones are reused)
    c = new_req("c", list(range(100, 120)), max_new_tokens=1)
    c_slots = s.admit(c)
    assert len(c.prefix_indices) == 0
    s.write_kv(c, 0, c_slots)
    assert s.pool.sinks.used_rows() == S
    s.check_books([c])
    c.output_ids.append(1)
    s.finish(c)
    s.drain()


def test_duplicate_prefill_releases_the_duplicates_rows():
    """Two requests prefill one prompt concurrently: both get sink rows; the second insert frees
    its duplicate slots and with them its rows, and the survivor's rows are the tree's."""
    s = Stack(capacity=64, max_reqs=3)
    x, y = new_req("x", list(range(10, 30))), new_req("y", list(range(10, 30)))
    x_slots, y_slots = s.admit(x), s.admit(y)
    s.write_kv(x, 0, x_slots)
    s.write_kv(y, 0, y_slots)
    assert s.pool.sinks.used_rows() == 2 * S
    for r in (x, y):
        r.output_ids.append(1)
        s.cache.cache_unfinished_req(r)
    assert s.pool.sinks.used_rows() == S
    assert (s.pool.sinks.row_of_slot[y_slots] == -1).all()
    assert (s.pool.sinks.row_of_slot[x_slots[:S]] >= 0).all()
    s.check_books([x, y])
    for r in (x, y):
        s.finish(r)
    s.drain()


def test_full_sink_pool_falls_back_to_dequantized_sinks():
    s = Stack(capacity=64, max_reqs=1)  # one request: S rows in all
    assert s.pool.sinks.capacity == S
    a = new_req("a", list(range(100, 110)), max_new_tokens=1)
    s.write_kv(a, 0, s.admit(a))
    a.output_ids.append(1)
    s.finish(a)
    b = new_req("b", list(range(200, 210)), max_new_tokens=1)  # no room left: no rows
    b_slots = s.admit(b)
    s.write_kv(b, 0, b_slots)
    assert s.pool.sinks.used_rows() == S and (s.pool.sinks.row_of_slot[b_slots] == -1).all()
    b.output_ids.append(1)
    s.finish(b)
    s.check_books([])

    c = new_req("c", list(range(200, 208)) + [7, 7, 7], max_new_tokens=1)  # hits B: dequantized
    admit_poisoned(s, c)
    assert_windows_restored(s.pool, c.req_pool_idx, b_slots[:8], untouched_poison=False)
    start = c.req_pool_idx * FMT.window_rows_per_request
    want = decode_kv(s.pool.k_buffer[1][b_slots[:S]], s.pool.k_scale_buffer[1][b_slots[:S]], FMT)
    assert torch.equal(s.pool.k_window[1][start:start + S], want.bfloat16())
    s.finish(c, insert=False)
    s.drain()


def test_partial_assignment_and_mixed_restore():
    """Fewer free rows than sink positions: the first ones get rows, restore mixes exact and
    dequantized sinks per slot."""
    pool = small_pool(sink_rows=1, requests=2)  # 2 rows
    fill_random(pool)
    slots = torch.tensor([5, 9, 11, 20])
    copy = pool.sinks.assign(slots, [12 + p for p in range(4)])
    window_rows, rows = copy
    assert window_rows.tolist() == [12, 13] and sorted(rows.tolist()) == [0, 1]
    assert pool.sinks.row_of_slot[slots].tolist()[2:] == [-1, -1]
    for layer in range(LAYERS):
        pool.save_sinks(layer, window_rows, rows)
    exact = sinks_of(pool, 1)
    for w in (*pool.k_window, *pool.v_window):
        w[24:36] = 0
    pool.restore_windows([(2, torch.cat([slots, torch.tensor([3, 4])]))])
    restored = sinks_of(pool, 2)
    for kv, (codes, meta) in enumerate(((pool.k_buffer, pool.k_scale_buffer), (pool.v_buffer, pool.v_scale_buffer))):
        for layer in range(LAYERS):
            assert torch.equal(restored[kv][layer][:2], exact[kv][layer][:2])
            deq = decode_kv(codes[layer][slots[2:]], meta[layer][slots[2:]], FMT).bfloat16()
            assert torch.equal(restored[kv][layer][2:], deq)
    assert pool.sinks.assign(torch.tensor([30]), [12]) is None  # pool full
    pool.sinks.release(torch.tensor([9, 20, 9]))  # a slot without a row, a repeat
    assert pool.sinks.used_rows() == 1 and pool.sinks.free_rows() == 1
    check_sink_books(pool, [9, 20])


def test_restoring_several_requests_at_once_equals_one_by_one():
    """One restore_windows call for a batch of radix hits (sinks with and without sink-pool
    rows, prefixes longer than the windows, shorter than the sinks, empty) writes exactly what
    per-request calls write."""
    batched, single = small_pool(size=64, requests=4), small_pool(size=64, requests=4)
    for pool in (batched, single):
        fill_random(pool)
        written = torch.tensor([5, 9, 11, 20])
        window_rows, rows = pool.sinks.assign(written, [12 + p for p in range(4)])
        for layer in range(LAYERS):
            pool.save_sinks(layer, window_rows, rows)
    gen = torch.Generator().manual_seed(3)
    hits = [(1, torch.cat([torch.tensor([5, 9, 11, 20]), 30 + torch.randperm(25, generator=gen)])),
            (2, torch.tensor([], dtype=torch.int64)),
            (3, torch.tensor([9, 40])),
            (4, torch.tensor([7, 5, 9, 11, 20, 33, 34, 35, 36, 37, 38, 39, 41, 42]))]
    batched.restore_windows(hits)
    for hit in hits:
        single.restore_windows([hit])
    for got, expected in zip((*batched.k_window, *batched.v_window), (*single.k_window, *single.v_window)):
        assert torch.equal(got, expected)


def test_backend_assigns_rows_for_new_sink_positions_only():
    """forward_plan.assign_sink_rows over a batch of three requests: one prefilling from 0,
    one continuing inside the sinks, one past them."""
    pool = small_pool(size=64, requests=4)
    loc = torch.arange(40, 50)  # out_cache_loc of 6 + 1 + 3 new tokens
    batch = types.SimpleNamespace(extend_prefix_lens_cpu=[0, 2, 5], extend_seq_lens_cpu=[6, 1, 3],
                                  out_cache_loc=loc)
    window_rows, rows = assign_sink_rows(pool, batch, [1, 3, 2])
    wr = FMT.window_rows_per_request
    assert window_rows.tolist() == [wr + 0, wr + 1, wr + 2, wr + 3, 3 * wr + 2]
    owners = torch.nonzero(pool.sinks.row_of_slot >= 0).flatten().tolist()
    assert owners == [40, 41, 42, 43, 46]
    assert pool.sinks.row_of_slot[torch.tensor(owners)].tolist() == rows.tolist()
    decode = types.SimpleNamespace(extend_prefix_lens_cpu=[7], extend_seq_lens_cpu=[1],
                                   out_cache_loc=torch.tensor([50]))
    assert assign_sink_rows(pool, decode, [1]) is None


# ---- allocator free paths ---------------------------------------------------------------------

def owned(pool, slots):
    return (pool.sinks.row_of_slot[slots] >= 0).tolist()


def test_token_allocator_free_group_releases_at_group_end():
    pool = small_pool(size=32, requests=2)
    allocator = TokenToKVPoolAllocator(32, torch.uint8, "cpu", pool, need_sort=False)
    slots = allocator.alloc(8)
    pool.sinks.assign(slots[:6], list(range(6)))
    allocator.free_group_begin()
    allocator.free(slots[:2])
    allocator.free_segments([(slots[2:4], 2)])  # free_segment -> free, queued too
    assert owned(pool, slots[:4]) == [True] * 4  # nothing is on the free list yet
    allocator.free_group_end()
    assert owned(pool, slots[:6]) == [False] * 4 + [True] * 2
    assert pool.sinks.free_rows() == 2 * S - 2
    check_sink_books(pool, allocator.free_pages.tolist())
    clears = pool.clears
    allocator.clear()  # flush_cache: the backend learns from `clears` to refill every window
    assert pool.sinks.used_rows() == 0 and pool.sinks.free_rows() == 2 * S
    assert pool.clears == clears + 1


def test_paged_allocator_frees_whole_pages_in_and_out_of_groups():
    ps = 4
    pool = small_pool(size=32, page_size=ps, requests=3)
    allocator = PagedTokenToKVPoolAllocator(32, ps, torch.uint8, "cpu", pool, need_sort=False)
    slots = allocator.alloc(16)  # pages p0..p3
    sinks = torch.cat([slots[1:3], slots[5:7], slots[9:11], slots[13:15]])
    pool.sinks.assign(sinks, list(range(8)))
    assert pool.sinks.used_rows() == 8
    allocator.free(slots[3:4])  # one slot of p0: the page goes back, with slots 1 and 2
    assert owned(pool, sinks) == [False] * 2 + [True] * 6
    allocator.free_group_begin()
    allocator.free(slots[4:8])
    allocator.free_segment(slots[8:12], start_pos=0)  # page representatives, group path
    assert pool.sinks.used_rows() == 6
    allocator.free_group_end()
    assert owned(pool, sinks) == [False] * 6 + [True] * 2
    check_sink_books(pool, allocator.free_pages.tolist(), ps)
    allocator.free_segment(slots[12:16], start_pos=0)
    assert pool.sinks.used_rows() == 0 and pool.sinks.free_rows() == 3 * S
    check_sink_books(pool, allocator.free_pages.tolist(), ps)


def test_allocator_hooks_leave_other_pools_alone():
    allocator = TokenToKVPoolAllocator(16, torch.bfloat16, "cpu", None, need_sort=False)
    allocator.free(allocator.alloc(4))
    allocator.clear()
    paged = PagedTokenToKVPoolAllocator(16, 4, torch.bfloat16, "cpu", None, need_sort=False)
    paged.free(paged.alloc(8))
    assert paged.available_size() == 16


# ---- pool plumbing and sizing -----------------------------------------------------------------

def test_move_kv_cache_moves_sink_rows_with_their_slots():
    pool = small_pool(size=32, requests=2)
    pool.sinks.assign(torch.tensor([3, 4, 7]), [0, 1, 2])
    before = pool.sinks.row_of_slot.clone()
    pool.move_kv_cache(torch.tensor([20, 21]), torch.tensor([3, 5]))
    assert pool.sinks.row_of_slot[20] == before[3] and pool.sinks.row_of_slot[21] == -1
    assert pool.sinks.row_of_slot[3] == -1 and pool.sinks.row_of_slot[4] == before[4]
    check_sink_books(pool, [3, 5])


def test_kv_size_counts_the_sink_store():
    pool = small_pool(size=40, sink_rows=S, requests=5)
    plain = small_pool(size=40, sink_rows=0, requests=5)
    sink_store = 5 * S * HEADS * HEAD_DIM * 2 * LAYERS
    assert pool.sinks.capacity == 5 * S and plain.sinks.capacity == 0
    assert tuple(pool.get_kv_size_bytes()) == tuple(b + sink_store for b in plain.get_kv_size_bytes())


def test_sink_pool_is_charged_to_the_window_budget():
    """Qwen3-8B at defaults: one sequence start (S = 64 rows) per running request, inside the
    window fraction, so the request cap shrinks rather than the budget growing."""
    fmt = OscarFormat(128)
    window = fmt.window_bytes_per_request(36, 8)
    sink = sink_bytes_per_request(fmt, 36, 8)
    assert sink_rows_per_request(fmt) == 64 and sink == window * 64 // 192
    budget, fraction = 60 * 2**30, 0.10
    cell = budgeted_cell_bytes(20_736, fraction)
    tokens = budget // cell
    fit = window_request_capacity(tokens, cell, fraction, window + sink)
    assert (fit + 1) * window + fit * sink <= tokens * cell * fraction
    assert fit < window_request_capacity(tokens, cell, fraction, window)
