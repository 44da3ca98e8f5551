"""OscarTokenToKVPool under SGLang's real slot machinery (CPU, seconds).

Everything SGLang here is the real class: TokenToKVPoolAllocator / PagedTokenToKVPoolAllocator
over the OSCAR pool, ReqToTokenPool, RadixCache (built from CacheInitParams as the scheduler
does in 0.5.17) and Req. The scheduler itself needs a server, so its steps are replayed in the
order it runs them: Req.init_next_round_input (match_prefix) -> inc_lock_ref (PrefillAdder) ->
ReqToTokenPool.alloc + slot allocation + req_to_token writes (alloc_for_extend) -> KV write
(as OscarAttnBackend does: sink-pool rows for new positions < S from forward_plan.assign_sink_rows,
write_kv_int2 with rows from pool.window_rows_for, then pool.save_sinks) ->
cache_unfinished_req / cache_finished_req / ReqToTokenPool.free (release_kv_cache).
The plugin's allocator hooks are applied (SGLang's load_plugins), so frees release sink rows.

At every checkpoint the slot books must balance: allocator free list + slots held by the tree +
slots owned by running requests = every slot exactly once, req-pool rows = free + running, and
each node's lock_ref = the running requests whose last_node lies below it. The sink-pool books
too: every row is either free or owned by exactly one slot, and that slot is not free.
"""

import math

import pytest
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.rotation_file import data_free_rotations
from oscar_sglang.pool import OscarTokenToKVPool
from pool_cases import FMT, HEADS, HEAD_DIM, LAYERS, WINDOW_POISON, Stack, assert_windows_restored, new_req

pytestmark = pytest.mark.usefixtures("oscar_allocator_hooks")


def test_shared_prefix_lifecycle_page1():
    s = Stack(capacity=96)
    system, user_a = list(range(100, 124)), list(range(200, 216))

    # request A: 40-token prompt, prefilled, two decode steps, finished into the tree
    a = new_req("a", system + user_a, max_new_tokens=3)
    a_slots = s.admit(a)
    assert len(a.prefix_indices) == 0 and a_slots.numel() == 40
    s.write_kv(a, 0, a_slots)
    a_sinks = s.window_sinks(a)  # A's exact rotated BF16 sinks
    assert s.pool.sinks.used_rows() == FMT.sink_tokens
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
    assert s.pool.sinks.used_rows() == FMT.sink_tokens  # B wrote no sink position
    # B's own chunk leaves the sink rows (positions 0..3 of the shared prefix) alone
    sink_rows = slice(b.req_pool_idx * FMT.window_rows_per_request, b.req_pool_idx * FMT.window_rows_per_request + FMT.sink_tokens)
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
        outside = torch.cat([w[:2 * FMT.window_rows_per_request], w[3 * FMT.window_rows_per_request:]])
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


def test_codes_and_meta_are_stored_head_major():
    """Indexed [slots, H_kv, ...], laid out [H_kv, slots, ...] (layer_cache.pool_buffer): a
    decode program, which reads one KV head, finds that head's rows together."""
    pool = OscarTokenToKVPool(32, 1, HEADS, HEAD_DIM, 2, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(2, HEADS, HEAD_DIM))
    for buf in (*pool.k_buffer, *pool.v_buffer, *pool.k_scale_buffer, *pool.v_scale_buffer):
        assert buf.shape[:2] == (33, HEADS)
        assert buf.transpose(0, 1).is_contiguous() and not buf.is_contiguous()


def test_get_kv_size_bytes_counts_codes_meta_and_windows():
    size, page = 40, 1
    pool = OscarTokenToKVPool(size, page, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM))
    rows = size + page
    codes = rows * HEADS * HEAD_DIM // 4
    meta = rows * HEADS * (HEAD_DIM // FMT.group_size) * 2 * 2
    assert tuple(pool.get_kv_size_bytes()) == (LAYERS * (codes + meta),) * 2
    pool.allocate_windows(5)
    windows = 6 * FMT.window_rows_per_request * HEADS * HEAD_DIM * 2
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


class Configurator:
    """Stands in for SGLang's DefaultPoolConfigurator: the cell size it keeps."""

    def __init__(self, cell_size: int):
        self._cell_size = cell_size


def _configurator(explicit_requests: bool, fraction: float = 0.10):
    """A configurator with what compute_cell_size records for it, for Qwen3-8B."""
    from oscar_sglang import sizing

    fmt = OscarFormat(128)
    cell = 20_736 if explicit_requests else sizing.budgeted_cell_bytes(20_736, fraction)
    configurator = Configurator(cell)
    sizing._SIZINGS[configurator] = sizing.PoolSizing(
        fmt=fmt, explicit_requests=explicit_requests, page_size=16, window_fraction=fraction,
        window_bytes=fmt.window_bytes_per_request(36, 8), sink_bytes=9_437_184, int2_bytes=20_736,
        bf16_bytes=147_456)
    return configurator


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
