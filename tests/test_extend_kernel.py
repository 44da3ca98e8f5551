"""The Triton extend kernel against `reference.extend_attention` (CPU: Triton interpreter).

Cached prefixes are written through the real write paths (`reference.encode_kv` for whole
prefixes, `quantize.write_kv_int2` for chunked prefill); NaN poisons unused slots, window rows
and the output as tests/kernel_cases.py does.
"""

import pytest
import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.extend import ExtendLaunch, extend_attention_int2, gather_kv
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.quantize import write_kv_int2
from kernel_cases import assert_matches, fill_requests, make_cache, new_tokens, run_extend


# (prefix, chunk) pairs for OscarFormat(·, ·, sink_tokens=4, recent_tokens=8): no prefix,
# L = prefix + chunk < S, a chunk crossing the sinks, S < L < S + W, L = S + W + 1, an empty
# chunk, a long prefix with a multi-tile chunk, a long prefix with one token, a prefix and a
# chunk of whole attention tiles (64 keys)
PAIRS = [(0, 5), (2, 1), (3, 6), (6, 4), (12, 1), (30, 0), (200, 70), (90, 1), (128, 128)]


@pytest.mark.parametrize(
    "head_dim, group_size, gqa, dtype, index_dtype, per_head, key_bits",
    [
        (64, 32, 1, torch.bfloat16, torch.int32, True, 2),
        (64, 64, 3, torch.float16, torch.int64, False, 4),
        (128, 32, 4, torch.bfloat16, torch.int64, True, 2),
        (128, 128, 8, torch.float16, torch.int32, True, 4),
        (64, 64, 7, torch.bfloat16, torch.int64, True, 3),
        (128, 32, 2, torch.float16, torch.int32, False, 3),
    ],
)
def test_extend_matches_reference(head_dim, group_size, gqa, dtype, index_dtype, per_head, key_bits):
    gen = torch.Generator().manual_seed(head_dim + group_size + gqa)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=4, recent_tokens=8, key_bits=key_bits)
    kv_heads = 2
    prefixes, chunks = zip(*PAIRS)
    cache = make_cache(fmt, kv_heads, sum(prefixes) + 16, len(PAIRS) + 1, per_head, gen)
    batch = fill_requests(cache, list(prefixes), dtype, index_dtype, gen)
    q, k, v, qo_indptr = new_tokens(chunks, kv_heads, gqa, head_dim, dtype, gen)
    got, expected = run_extend(cache, q, k, v, qo_indptr.to(index_dtype), batch.kv_indptr, batch.kv_indices,
                               batch.window_starts)
    assert_matches(got, expected, dtype)


@pytest.mark.parametrize("head_dim, group_size, dtype, key_bits",
                         [(64, 32, torch.bfloat16, 2), (128, 64, torch.float16, 2), (64, 64, torch.float16, 4),
                          (128, 32, torch.bfloat16, 3), (64, 64, torch.float16, 3)])
def test_gather_kv_matches_reference(head_dim, group_size, dtype, key_bits, nan_scratch):
    """Every row of the scratch: a request's prefix in the model's space, from INT2 or the window
    rows as the chunk length decides (`reference.gather_rotated_kv` · Rᵀ), then its chunk, whose
    rows holding a NaN or Inf are zeros."""
    gen = torch.Generator().manual_seed(head_dim + 7)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=4, recent_tokens=8, key_bits=key_bits)
    prefixes, chunks = zip(*PAIRS)
    kv_heads = 3
    cache = make_cache(fmt, kv_heads, sum(prefixes) + 16, len(PAIRS) + 1, True, gen)
    batch = fill_requests(cache, list(prefixes), dtype, torch.int32, gen)
    _, k_new, v_new, qo_indptr = new_tokens(chunks, kv_heads, 1, head_dim, dtype, gen)
    k_new[3, 1, 5], v_new[7, 2, 0], v_new[-1, 0, -1] = float("nan"), float("inf"), float("-inf")
    got = gather_kv(qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts, k_new, v_new, cache,
                    max(chunks), max(prefixes), dtype)
    assert got.shape == (2, sum(prefixes) + sum(chunks), kv_heads, head_dim) and got.dtype == dtype
    pools = ((cache.k_codes, cache.k_meta, cache.k_window, cache.k_rot, k_new),
             (cache.v_codes, cache.v_meta, cache.v_window, cache.v_rot, v_new))
    for b, (prefix, chunk) in enumerate(PAIRS):
        lo, first = int(batch.kv_indptr[b]), int(batch.kv_indptr[b] + qo_indptr[b])
        slots = batch.kv_indices[lo:lo + prefix]
        for which, (codes, meta, window, rot, new) in enumerate(pools):
            rotated = ref.gather_rotated_kv(slots, int(batch.window_starts[b]), prefix + chunk, codes, meta, window, fmt)
            torch.testing.assert_close(got[which, first:first + prefix].float(), ref.unrotate(rotated, rot),
                                       rtol=2e-2, atol=2e-2)
            rows = new[int(qo_indptr[b]):int(qo_indptr[b + 1])]
            expected = torch.where(torch.isfinite(rows).all(dim=-1, keepdim=True), rows, 0)
            assert torch.equal(got[which, first + prefix:first + prefix + chunk], expected)


def test_extend_with_other_launch_parameters():
    """An ExtendLaunch other than the default (smaller tiles, smaller gather programs) changes how
    the work is cut, not the result."""
    gen = torch.Generator().manual_seed(9)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8, key_bits=3)
    prefixes, chunks = zip(*PAIRS)
    cache = make_cache(fmt, 2, sum(prefixes) + 16, len(PAIRS) + 1, True, gen)
    batch = fill_requests(cache, list(prefixes), torch.bfloat16, torch.int32, gen)
    q, k, v, qo_indptr = new_tokens(chunks, 2, 3, 64, torch.bfloat16, gen)
    launch = ExtendLaunch(block_m=32, block_n=16, num_warps=4, num_stages=2, gather_block_t=16)
    assert_matches(*run_extend(cache, q, k, v, qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts,
                               launch), torch.bfloat16)


def test_extend_default_windows():
    """Default S = 64, W = 128 with prefixes inside and beyond the windows."""
    gen = torch.Generator().manual_seed(5)
    fmt = OscarFormat(128, 64)
    prefixes, chunks = [100, 300], [30, 9]
    cache = make_cache(fmt, 1, sum(prefixes), 2, True, gen)
    batch = fill_requests(cache, prefixes, torch.bfloat16, torch.int32, gen)
    q, k, v, qo_indptr = new_tokens(chunks, 1, 4, 128, torch.bfloat16, gen)
    assert_matches(*run_extend(cache, q, k, v, qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts),
                   torch.bfloat16)


@pytest.mark.parametrize(
    "fmt, schedule, dtype",
    [
        (OscarFormat(64, 32, sink_tokens=4, recent_tokens=8), (1, 7, 64), torch.bfloat16),
        (OscarFormat(128, 64, sink_tokens=4, recent_tokens=8), (64, 7, 1), torch.float16),
        (OscarFormat(64), (7, 64, 1, 64, 64), torch.bfloat16),
    ],
)
def test_chunked_prefill(fmt, schedule, dtype):
    """One sequence prefilled chunk by chunk: each chunk's tokens are written to the pool
    (INT2 codes and window rows, through write_kv_int2) before the next chunk attends, and
    every chunk's output matches the reference."""
    gen = torch.Generator().manual_seed(sum(schedule))
    kv_heads, gqa, total = 2, 2, sum(schedule)
    cache = make_cache(fmt, kv_heads, total + 40, 3, True, gen)
    slots = torch.randperm(total + 40, generator=gen)[:total]
    window_start = fmt.window_rows_per_request  # the request owns the second block of rows
    q, k, v, _ = new_tokens([total], kv_heads, gqa, fmt.head_dim, dtype, gen)
    done = 0
    for chunk in schedule:
        lo, hi = done, done + chunk
        # like SGLang, the chunk's K/V are written before its attention runs
        rows = [fmt.window_row(window_start, p) if p < fmt.sink_tokens or p >= hi - fmt.recent_tokens else -1
                for p in range(lo, hi)]
        write_kv_int2(k[lo:hi], v[lo:hi], slots[lo:hi], cache, torch.tensor(rows))
        got, expected = run_extend(cache, q[lo:hi], k[lo:hi], v[lo:hi], torch.tensor([0, chunk]),
                                   torch.tensor([0, lo]), slots[:lo], torch.tensor([window_start]))
        assert_matches(got, expected, dtype)
        done = hi


def test_extend_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    fmt = OscarFormat(64)
    cache = make_cache(fmt, 2, 8, 1, True, gen)
    q = torch.randn(3, 4, 64).to(torch.bfloat16)
    k = torch.randn(3, 1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="k_new"):
        extend_attention_int2(q, k, k, torch.tensor([0, 3]), torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64),
                              torch.tensor([0]), cache, 0.1, 3, 0)


def test_backend_splits_large_batches_into_scratch_sized_groups():
    """The extend path runs the kernel over request groups whose gathered K/V fits its bound;
    the groups' outputs equal one launch over the whole batch."""
    from oscar_sglang.extend_groups import RequestGroup, extend_in_groups, request_groups

    gen = torch.Generator().manual_seed(11)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
    prefixes, chunks = [40, 0, 25, 30, 7], [3, 5, 1, 4, 2]
    cache = make_cache(fmt, 2, sum(prefixes) + 8, len(prefixes) + 1, True, gen)
    batch = fill_requests(cache, prefixes, torch.bfloat16, torch.int32, gen)
    q, k, v, qo_indptr = new_tokens(chunks, 2, 2, 64, torch.bfloat16, gen)
    args = (qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 64 ** -0.5)
    whole = extend_in_groups(q, k, v, args, [RequestGroup.of(0, 5, chunks, prefixes)])
    ranges = request_groups([p + c for p, c in zip(prefixes, chunks)], 50)
    assert ranges == [(0, 2), (2, 3), (3, 5)]
    grouped = extend_in_groups(q, k, v, args, [RequestGroup.of(r0, r1, chunks, prefixes) for r0, r1 in ranges])
    torch.testing.assert_close(grouped, whole, rtol=0, atol=0)
    assert_matches(whole, ref.extend_attention(q, k, v, *args), torch.bfloat16)


def test_request_groups_bound():
    from oscar_sglang.extend_groups import request_groups

    assert request_groups([5, 5, 5], 10) == [(0, 2), (2, 3)]
    assert request_groups([50, 1, 1], 10) == [(0, 1), (1, 3)]
    assert request_groups([0, 0], 1) == [(0, 2)]


def test_flashinfer_plans_are_bounded(monkeypatch):
    """A forward plans one FlashInfer wrapper per request group, at most MAX_FLASHINFER_PLANS
    (each holds 16 MiB of plan buffers): later groups get None (the Triton kernel), and the
    wrappers are made once and planned again by later forwards. Stand-ins replace FlashInfer,
    which needs CUDA."""
    from oscar_sglang import extend_groups

    made, plans = [], []
    monkeypatch.setattr(extend_groups, "flashinfer_extend_wrapper", lambda workspace: made.append(object()) or made[-1])
    monkeypatch.setattr(extend_groups, "plan_flashinfer_extend",
                        lambda wrapper, extend, prefix, *rest: plans.append((wrapper, extend, prefix)) or wrapper)
    planner = extend_groups.FlashInferPlans(False, "cpu")
    planner.enabled = True  # its workspace stays None: the stand-ins never read it
    limit = extend_groups.MAX_FLASHINFER_PLANS
    groups = [(r, r + 1) for r in range(limit + 3)]
    lens = list(range(1, limit + 4))
    wrappers = planner.plan(groups, lens, lens, 32, 8, 128, 0.1, torch.bfloat16)
    assert wrappers[:limit] == made and len(made) == limit and wrappers[limit:] == [None] * 3
    assert [(extend, prefix) for _, extend, prefix in plans] == [([n], [n]) for n in lens[:limit]]
    assert planner.plan(groups[:2], lens, lens, 32, 8, 128, 0.1, torch.bfloat16) == made[:2] and len(made) == limit
    assert extend_groups.FlashInferPlans(False, "cpu").plan(groups, lens, lens, 32, 8, 128, 0.1,
                                                            torch.bfloat16) == [None] * len(groups)
