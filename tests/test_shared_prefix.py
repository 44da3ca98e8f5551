"""Decode with shared-prefix blocks (`kernels/shared_prefix.py`) against the reference, and the
blocks themselves (CPU: Triton interpreter).

Requests are built as a radix-cache hit leaves them: the requests of a group hold one prefix's
slots for its first positions, then slots of their own. The pool is poisoned as in
tests/kernel_cases.py (NaN meta in unused slots, NaN window rows, NaN output), and so is the
kernels' float scratch (partials no program wrote must never be read).
"""

import dataclasses

import pytest
import torch
import triton
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import (DECODE_LAUNCH, INT32_MAX, PROGRAMS_PER_SM, decode_attention_int2,
                                        decode_step, default_num_kv_splits)
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels import shared_prefix
from oscar_sglang.kernels.shared_prefix import block_members, find_shared_prefixes
from kernel_cases import Batch, assert_matches, make_cache, store_tokens, window_positions



def shared_batch(prefix_lens, requests, slots_total):
    """kv_indptr, kv_indices (int64) for requests (group, shared tokens, own tokens) that take
    the first `shared` slots of their group's prefix, then own slots; slots are shuffled."""
    perm = torch.randperm(slots_total, generator=torch.Generator().manual_seed(5)).tolist()
    prefixes = []
    for n in prefix_lens:
        prefixes.append(perm[:n])
        perm = perm[n:]
    indptr, indices = [0], []
    for group, shared, own in requests:
        slots = prefixes[group][:shared] + perm[:own]
        perm = perm[own:]
        indices += slots
        indptr.append(len(indices))
    return torch.tensor(indptr), torch.tensor(indices, dtype=torch.int64)


def test_wide_blocks_from_the_wide_batch_on_except_for_3_bit_keys():
    big = shared_prefix.WIDE_BLOCKS_MIN_BATCH
    assert shared_prefix.shared_dot_rows(big - 1, 4) == shared_prefix.SHARED_DOT_ROWS
    wide = shared_prefix.WIDE_SHARED_DOT_ROWS
    assert shared_prefix.shared_dot_rows(big, 4) == shared_prefix.shared_dot_rows(big, 2) == wide
    assert shared_prefix.shared_dot_rows(big, 3) == shared_prefix.SHARED_DOT_ROWS


def test_blocks_group_requests_by_their_shared_slots():
    fmt = OscarFormat(64, 64, sink_tokens=4, recent_tokens=8)
    # group 0's prefix: 60 tokens; group 1's: 40. Five requests of group 0 (more than a block of
    # 4 holds), one of which shares only the first 30 positions; interleaved with group 1, a
    # request of its own and one too short for INT2 positions.
    requests = [(0, 60, 20), (1, 40, 30), (0, 60, 5), (2, 0, 70), (0, 30, 40), (0, 60, 9),
                (1, 40, 12), (0, 60, 33), (2, 0, 6)]
    indptr, indices = shared_batch([60, 40, 0], requests, 1000)
    shared = find_shared_prefixes(indptr, indices, fmt, group=4)
    assert block_members(4, len(requests), fmt.key_bits) == 4 and shared.members.shape == (len(requests), 4)
    blocks = {}
    for row, end in zip(shared.members.tolist(), shared.block_end.tolist()):
        members = tuple(b for b in row if b >= 0)
        if members:
            blocks[members] = end
    assert sorted(b for members in blocks for b in members) == list(range(len(requests)))
    sizes = (shared.members >= 0).sum(dim=1).tolist()
    assert int(shared.sharing) == 2 and sorted(sizes[:2]) == [2, 4] and max(sizes[2:]) == 1, sizes
    lengths = [shared + own for _, shared, own in requests]
    ends = [fmt.int2_span(n)[1] for n in lengths]
    group0 = [0, 2, 4, 5, 7]
    assert blocks[tuple(group0[:4])] == 30  # request 4 diverges at position 30
    assert blocks[(7,)] == 4  # the fifth request is a block of its own: nothing shared
    assert blocks[(1, 6)] == min(40, ends[1], ends[6])
    assert blocks[(3,)] == 4 and blocks[(8,)] == 4
    block_end_of = {b: end for members, end in blocks.items() for b in members}
    for b, n in enumerate(lengths):
        start = fmt.int2_span(n)[0]
        own = block_end_of[b] if len(next(m for m in blocks if b in m)) > 1 else start
        assert shared.own_start[b] == own <= ends[b]


def test_blocks_of_a_batch_without_positions():
    fmt = OscarFormat(64, 64, sink_tokens=4, recent_tokens=8)
    shared = find_shared_prefixes(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), fmt, 4)
    assert shared.block_end.tolist() == [4, 4] and shared.own_start.tolist() == [0, 0]
    assert shared.sharing.tolist() == [0]


def fill_shared_requests(cache, prefix_lens, requests, dtype, index_dtype, gen):
    """Write random K/V for `requests` (group, shared tokens, own tokens) laid out by
    shared_batch: a group's prefix positions hold the same K/V in every request of the group."""
    fmt, kv_heads, d = cache.fmt, cache.k_codes.shape[1], cache.fmt.head_dim
    indptr, indices = shared_batch(prefix_lens, requests, cache.k_codes.shape[0])
    prefix_kv = [(torch.randn(n, kv_heads, d, generator=gen).to(dtype),
                  torch.randn(n, kv_heads, d, generator=gen).to(dtype)) for n in prefix_lens]
    rows = torch.randperm(cache.k_window.shape[0] // fmt.window_rows_per_request, generator=gen)
    starts = []
    for b, (group, shared, own) in enumerate(requests):
        k = torch.cat([prefix_kv[group][0][:shared], torch.randn(own, kv_heads, d, generator=gen).to(dtype)])
        v = torch.cat([prefix_kv[group][1][:shared], torch.randn(own, kv_heads, d, generator=gen).to(dtype)])
        start = int(rows[b]) * fmt.window_rows_per_request
        length = shared + own
        if length:
            store_tokens(cache, k, v, indices[indptr[b]:indptr[b + 1]], start, list(range(length)),
                         window_positions(fmt, length))
        starts.append(start)
    return Batch(indptr.to(index_dtype), indices.to(index_dtype), torch.tensor(starts, dtype=index_dtype))


TIGHT = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # same math, another summation order


@pytest.mark.parametrize(
    "head_dim, group_size, gqa, dtype, index_dtype, key_bits",
    [
        (64, 32, 1, torch.bfloat16, torch.int32, 2),
        (64, 64, 3, torch.float16, torch.int64, 4),
        (128, 32, 4, torch.bfloat16, torch.int64, 2),
        (128, 128, 8, torch.float16, torch.int32, 4),
        (64, 32, 7, torch.bfloat16, torch.int64, 3),
        (128, 64, 2, torch.float16, torch.int32, 3),
    ],
)
def test_decode_with_shared_prefixes_matches_reference(head_dim, group_size, gqa, dtype, index_dtype, key_bits,
                                                       nan_scratch):
    gen = torch.Generator().manual_seed(head_dim + gqa)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=4, recent_tokens=8, key_bits=key_bits)
    kv_heads = 2
    prefix_lens = [301, 77]
    # odd lengths; a request that is all prefix but for one token, one that ends inside the
    # prefix's recent window, a diverging one, one of its own, an empty one
    requests = [(0, 301, 5), (1, 77, 40), (0, 301, 1), (0, 301, 130), (1, 77, 3), (0, 150, 61),
                (0, 301, 17), (1, 70, 0), (0, 0, 13), (0, 0, 0), (0, 301, 44)]
    cache = make_cache(fmt, kv_heads, sum(prefix_lens) + sum(own for *_, own in requests) + 16,
                       len(requests) + 2, True, gen)
    batch = fill_shared_requests(cache, prefix_lens, requests, dtype, index_dtype, gen)
    q = torch.randn(len(requests), kv_heads * gqa, head_dim, generator=gen).to(dtype)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, head_dim ** -0.5)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, gqa)
    assert (shared.block_end > fmt.sink_tokens).any(), "the batch must share positions"
    out = torch.full_like(q, float("nan"))
    decode_attention_int2(*args, out=out, shared=shared, num_kv_splits=3)
    assert_matches(out, ref.decode_attention(*args), dtype)
    alone = decode_attention_int2(*args, num_kv_splits=3)
    torch.testing.assert_close(out.float(), alone.float(), rtol=TIGHT[dtype], atol=TIGHT[dtype])
    # the reduce merging its partials in two chunks (one query row per program otherwise,
    # reduce_rows 1: many waves), the shared ones masked per chunk
    parts = decode_step(*args, shared=shared, num_kv_splits=3).parts
    chunk = triton.next_power_of_2(parts) // 2
    step = decode_step(*args, shared=shared, num_kv_splits=3,
                       launch=dataclasses.replace(DECODE_LAUNCH, reduce_rows=1, reduce_parts=chunk))
    assert step.reduction_block.parts == chunk < parts
    torch.testing.assert_close(step.run().float(), out.float(), rtol=TIGHT[dtype], atol=TIGHT[dtype])


def test_more_sharing_blocks_than_block_programs_match_reference(nan_scratch):
    """Six prefixes held by two requests each: blocks of 4 members leave 3 programs per split and
    KV head for 6 sharing blocks, so each program loops over two."""
    gen = torch.Generator().manual_seed(11)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8, key_bits=4)
    gqa, kv_heads = 4, 2
    prefix_lens = [50, 61, 33, 90, 47, 70]
    requests = [(g, n, 3 + 5 * g + b) for g, n in enumerate(prefix_lens) for b in range(2)]
    cache = make_cache(fmt, kv_heads, sum(prefix_lens) + sum(own for *_, own in requests) + 16,
                       len(requests) + 2, True, gen)
    batch = fill_shared_requests(cache, prefix_lens, requests, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(requests), kv_heads * gqa, 64, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, gqa)
    members = shared.members.shape[1]
    assert int(shared.sharing) == len(prefix_lens) > triton.cdiv(len(requests), members)
    assert ((shared.members >= 0).sum(dim=1) > 1).tolist() == [True] * 6 + [False] * 6, "sharing blocks first"
    out = torch.full_like(q, float("nan"))
    decode_attention_int2(*args, out=out, shared=shared, num_kv_splits=2)
    assert_matches(out, ref.decode_attention(*args), torch.bfloat16)


@pytest.mark.parametrize("head_dim, key_bits", [(64, 4), (64, 3), (128, 3)])
@pytest.mark.parametrize("dot_rows", [32, shared_prefix.WIDE_SHARED_DOT_ROWS])
def test_larger_blocks_match_reference(dot_rows, head_dim, key_bits, nan_scratch):
    """Blocks of 8 requests (32 rows) and the wide blocks of 16 that batches of
    WIDE_BLOCKS_MIN_BATCH requests get (64 rows), asked for by find_shared_prefixes' dot_rows."""
    gen = torch.Generator().manual_seed(dot_rows + key_bits)
    fmt = OscarFormat(head_dim, 32, sink_tokens=4, recent_tokens=8, key_bits=key_bits)
    gqa, kv_heads = 4, 2
    requests = [(0, 120, b % 7) for b in range(dot_rows // gqa + 3)] + [(0, 60, 9), (0, 0, 30)]
    cache = make_cache(fmt, kv_heads, 120 + sum(own for *_, own in requests) + 16, len(requests) + 2, True, gen)
    batch = fill_shared_requests(cache, [120], requests, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(requests), kv_heads * gqa, head_dim, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, head_dim ** -0.5)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, gqa, dot_rows)
    assert shared.members.shape == (len(requests), dot_rows // gqa)
    assert (shared.members >= 0).sum(dim=1).max() == dot_rows // gqa, "a block must be full"
    out = torch.full_like(q, float("nan"))
    decode_attention_int2(*args, out=out, shared=shared, num_kv_splits=2)
    assert_matches(out, ref.decode_attention(*args), torch.bfloat16)


def test_wide_blocks_aim_their_splits_at_the_programs_that_fit():
    """Shared-prefix splits follow DecodeLaunch.wide_shared_programs_per_sm over wide blocks (two
    of their programs fit an SM) and the split kernel's PROGRAMS_PER_SM over narrow ones."""
    gen = torch.Generator().manual_seed(7)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
    gqa, kv_heads = 4, 2
    requests = [(0, 120, 5)] * 20
    cache = make_cache(fmt, kv_heads, 120 + 5 * len(requests) + 16, len(requests) + 2, True, gen)
    batch = fill_shared_requests(cache, [120], requests, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(requests), kv_heads * gqa, 64, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125)
    for dot_rows in (shared_prefix.SHARED_DOT_ROWS, shared_prefix.WIDE_SHARED_DOT_ROWS):
        shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, gqa, dot_rows)
        blocks = triton.cdiv(len(requests), dot_rows // gqa)
        for programs_per_sm in (8, 2):
            launch = dataclasses.replace(DECODE_LAUNCH, wide_shared_programs_per_sm=programs_per_sm)
            aimed = programs_per_sm if dot_rows > shared_prefix.SHARED_DOT_ROWS else PROGRAMS_PER_SM
            expected = default_num_kv_splits(blocks, kv_heads, q.device, aimed)
            assert decode_step(*args, shared=shared, num_kv_splits=2, launch=launch).shared_splits == expected
    wide = [decode_step(*args, shared=shared, num_kv_splits=2, launch=dataclasses.replace(
        DECODE_LAUNCH, wide_shared_programs_per_sm=n)).shared_splits for n in (8, 2)]
    assert wide[1] < wide[0], wide


def test_by_request_the_triton_kernel_leaves_long_own_spans_to_the_cuda_kernel():
    """Split by request (`DecodeLaunch.split_kernels`), the Triton split kernel writes every
    request's window parts and the INT2 parts of the requests reading fewer than cuda_min_span
    positions alone, as when it runs all of them, and no part of the others (int2_split.cu's:
    tests/gpu)."""
    gen = torch.Generator().manual_seed(4)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
    requests = [(0, 200, 5), (0, 0, 300), (0, 200, 90), (0, 200, 1), (0, 0, 41), (0, 0, 3)]
    cache = make_cache(fmt, 2, 200 + sum(own for *_, own in requests) + 16, len(requests) + 2, True, gen)
    batch = fill_shared_requests(cache, [200], requests, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(requests), 4, 64, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125)
    step = decode_step(*args, shared=find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, 2),
                       num_kv_splits=3)
    # the span each split-kernel choice hands int2_split.cu from (on the CPU the Triton kernel runs all)
    by_request = DECODE_LAUNCH.cuda_min_positions * step.splits
    for kernels, span in (("cuda", 0), ("triton", INT32_MAX), ("by_request", by_request)):
        assert dataclasses.replace(step, split_kernels=kernels).cuda_min_span == span
    step.rotate_q()
    step.triton_split(INT32_MAX)
    whole_o, whole_lse = step.part_o.clone(), step.part_lse.clone()
    min_span = 33
    step.part_o.fill_(float("nan"))
    step.part_lse.fill_(float("nan"))
    step.triton_split(min_span)
    int2_parts, window_parts = slice(0, step.splits), slice(step.splits, step.splits + step.win)
    lengths = batch.kv_indptr.diff().tolist()
    own_spans = [max(fmt.int2_span(n)[1] - int(own), 0) for n, own in zip(lengths, step.shared.own_start)]
    assert min(own_spans) < min_span <= max(own_spans), "the batch must have requests on both sides"
    for b, span in enumerate(own_spans):
        for mine in [window_parts] + ([int2_parts] if span < min_span else []):
            torch.testing.assert_close(step.part_lse[b, :, mine], whole_lse[b, :, mine], equal_nan=True)
            torch.testing.assert_close(step.part_o[b, :, mine], whole_o[b, :, mine], equal_nan=True)
        if span >= min_span:
            assert step.part_lse[b, :, int2_parts].isnan().all() and step.part_o[b, :, int2_parts].isnan().all()


def test_shared_prefixes_must_match_the_batch():
    gen = torch.Generator().manual_seed(1)
    fmt = OscarFormat(64, 64, sink_tokens=4, recent_tokens=8)
    requests = [(0, 40, 3), (0, 40, 9)]
    cache = make_cache(fmt, 1, 64, 2, True, gen)
    batch = fill_shared_requests(cache, [40], requests, torch.bfloat16, torch.int32, gen)
    q = torch.randn(2, 2, 64, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125)
    first_only = find_shared_prefixes(batch.kv_indptr[:2], batch.kv_indices, fmt, group=1)
    with pytest.raises(ValueError, match="batch of 1 requests, not of 2"):
        decode_attention_int2(*args, shared=first_only)
