"""The Triton decode kernel against `reference.decode_attention` (CPU: Triton interpreter).

Pools and poisoning: tests/kernel_cases.py.
"""

import dataclasses

import pytest
import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import (
    DECODE_LAUNCH,
    MAX_KV_SPLITS,
    DecodeLaunch,
    ReduceBlock,
    decode_attention_int2,
    decode_step,
    default_num_kv_splits,
    chunked_reduce_block,
    reduce_block,
    reduce_plan,
    reduce_rounds,
    rotate_requests,
)
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache
from kernel_cases import assert_matches, fill_requests, make_cache, run_decode

# lengths around the window edges of OscarFormat(·, ·, sink_tokens=4, recent_tokens=8):
# 0 (empty), L < S, L = S, S < L < S + W, L = S + W, L = S + W + 1, longer
SMALL_WINDOW_LENS = [3, 0, 9, 13, 1, 12, 4, 60, 300]


@pytest.mark.parametrize(
    "head_dim, group_size, gqa, dtype, index_dtype, per_head, lens, key_bits",
    [
        (64, 32, 1, torch.bfloat16, torch.int32, True, SMALL_WINDOW_LENS, 2),
        (64, 64, 3, torch.float16, torch.int64, False, SMALL_WINDOW_LENS, 2),
        (128, 32, 4, torch.bfloat16, torch.int64, True, [13, 1000, 5], 2),
        (128, 64, 8, torch.float16, torch.int32, True, SMALL_WINDOW_LENS, 2),
        (128, 128, 4, torch.bfloat16, torch.int32, False, [9, 700], 2),
        (64, 64, 7, torch.bfloat16, torch.int32, True, SMALL_WINDOW_LENS, 4),
        (128, 32, 2, torch.float16, torch.int64, False, [13, 301, 5], 4),
        (64, 32, 5, torch.float16, torch.int64, True, SMALL_WINDOW_LENS, 3),
        (128, 128, 4, torch.bfloat16, torch.int32, False, [13, 301, 5], 3),
    ],
)
def test_decode_matches_reference(head_dim, group_size, gqa, dtype, index_dtype, per_head, lens, key_bits):
    gen = torch.Generator().manual_seed(head_dim + group_size + gqa)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=4, recent_tokens=8, key_bits=key_bits)
    kv_heads = 2
    cache = make_cache(fmt, kv_heads, sum(lens) + 64, len(lens) + 2, per_head, gen)
    batch = fill_requests(cache, lens, dtype, index_dtype, gen)
    q = torch.randn(len(lens), kv_heads * gqa, head_dim, generator=gen).to(dtype)
    assert_matches(*run_decode(cache, batch, q), dtype)


def test_decode_default_windows():
    """Default S = 64, W = 128: window-only, window + INT2, and a longer sequence."""
    gen = torch.Generator().manual_seed(7)
    fmt = OscarFormat(128)
    lens = [150, 193, 400]
    cache = make_cache(fmt, 1, sum(lens) + 8, len(lens), True, gen)
    batch = fill_requests(cache, lens, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(lens), 4, 128, generator=gen).to(torch.bfloat16)
    assert_matches(*run_decode(cache, batch, q), torch.bfloat16)


@pytest.mark.parametrize("splits", [1, 5, 40])
def test_decode_split_counts(splits):
    """Any split count gives the same answer, including splits left without INT2 work."""
    gen = torch.Generator().manual_seed(11)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
    lens = [500, 20]
    cache = make_cache(fmt, 1, sum(lens), len(lens), False, gen)
    batch = fill_requests(cache, lens, torch.bfloat16, torch.int64, gen)
    q = torch.randn(len(lens), 2, 64, generator=gen).to(torch.bfloat16)
    assert_matches(*run_decode(cache, batch, q, num_kv_splits=splits), torch.bfloat16)


def test_decode_strided_output_and_default_out():
    gen = torch.Generator().manual_seed(3)
    fmt = OscarFormat(64, 64, sink_tokens=4, recent_tokens=8)
    lens = [40, 7]
    cache = make_cache(fmt, 2, sum(lens), len(lens), True, gen)
    batch = fill_requests(cache, lens, torch.float16, torch.int32, gen)
    q = torch.randn(len(lens), 4, 64, generator=gen).to(torch.float16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125)
    expected = ref.decode_attention(*args)
    wide = torch.full((len(lens), 4, 2 * 64), float("nan"), dtype=torch.float16)
    decode_attention_int2(*args, out=wide[:, :, :64])
    assert_matches(wide[:, :, :64], expected, torch.float16)
    assert wide[:, :, 64:].isnan().all(), "wrote outside the output view"
    assert_matches(decode_attention_int2(*args), expected, torch.float16)


@pytest.mark.parametrize("reduce_dim_programs", [2, 8])
def test_decode_with_other_launch_parameters(reduce_dim_programs):
    """A DecodeLaunch other than the default (smaller tiles, more window programs, other reduce
    programs per head) changes how the work is cut, not the result."""
    gen = torch.Generator().manual_seed(8)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8, key_bits=3)
    lens = [300, 9, 77]
    cache = make_cache(fmt, 2, sum(lens), len(lens), True, gen)
    batch = fill_requests(cache, lens, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(lens), 6, 64, generator=gen).to(torch.bfloat16)
    launch = DecodeLaunch(block_n=32, block_rows=16, window_rows_per_program=4, num_stages=2,
                          reduce_dim_programs=reduce_dim_programs)
    assert_matches(*run_decode(cache, batch, q, num_kv_splits=3, launch=launch), torch.bfloat16)


@pytest.mark.parametrize("rows, parts, block, rotated", [(1, None, (1, 1, 4), 1), (16, None, (1, 4, 4), 4),
                                                       (64, None, (4, 4, 4), 4), (1, 2, (4, 4, 2), 1)])
def test_the_reduce_and_the_rotation_take_blocks_of_requests(rows, parts, block, rotated):
    """GQA 4 with 3 partials per query row: a reduce program merges one query row, the four
    query heads of a KV head, or those of four requests, all partials at once or (where one row
    per program would take 10 waves on the interpreter's 8 SMs) two at a time, and a q-rotation
    program rotates one or four requests' rows (five requests: the second block has one); every
    element of q' and of the output is written either way."""
    gen = torch.Generator().manual_seed(11)
    fmt = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
    lens = [133, 5, 61, 1, 40]
    cache = make_cache(fmt, 2, sum(lens), len(lens), True, gen)
    batch = fill_requests(cache, lens, torch.bfloat16, torch.int32, gen)
    q = torch.randn(len(lens), 8, 64, generator=gen).to(torch.bfloat16)
    launch = DecodeLaunch(reduce_rows=rows, rotate_rows=rows, reduce_parts=parts)
    step = decode_step(q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 0.125, num_kv_splits=2,
                       launch=launch)
    assert step.reduction_block == block
    assert step.rotation_block == rotate_requests(4, len(lens), launch) == rotated
    step.q_rot.fill_(float("nan"))
    step.out.fill_(float("nan"))
    assert_matches(step.run(), ref.decode_attention(q, batch.kv_indptr, batch.kv_indices, batch.window_starts,
                                                    cache, 0.125), torch.bfloat16)


def test_reduce_blocks_are_powers_of_two_within_the_rows():
    # heads first (dividing the group), then requests (up to the batch)
    assert [reduce_block(4, parts, 32)[:2] for parts in (4, 7, 19, 67)] == [(4, 4), (2, 4), (1, 2), (1, 1)]
    assert reduce_block(6, 5, 1) == (1, 2, 8) and reduce_block(1, 3, 3) == (2, 1, 4)
    assert reduce_block(8, 8, 1) == (1, 8, 8)
    assert reduce_block(8, 8, 128, DecodeLaunch(reduce_rows=32)) == (1, 4, 8)
    assert reduce_block(4, 16, 192, DecodeLaunch(reduce_rows=256)) == (4, 4, 16)
    assert reduce_block(4, 2, 64, DecodeLaunch(reduce_rows=256)) == (4, 4, 2)  # MAX_REDUCE_QUERY_ROWS
    assert reduce_block(32, 2, 1, DecodeLaunch(reduce_rows=256)) == (1, 16, 2)



def test_partials_are_merged_in_chunks_where_that_takes_fewer_rounds():
    # chunks leave room for MAX_REDUCE_QUERY_ROWS query rows however many partials there are
    assert chunked_reduce_block(4, 64) == (4, 4, 8) and chunked_reduce_block(4, 1) == (1, 4, 8)
    assert chunked_reduce_block(8, 64, DecodeLaunch(reduce_parts=4)) == (2, 8, 4)
    # an H100 (132 SMs), GQA 4, H_q 32: chunks where one load per program leaves one row and many
    # waves (64 requests on a shared prefix, 38 partials), one load where the programs fit a wave
    assert reduce_plan(4, 32, 38, 64, 132) == (4, 4, 8)
    assert reduce_plan(4, 32, 67, 1, 132) == (1, 1, 128)
    assert reduce_plan(4, 32, 11, 8, 132) == (1, 4, 16)
    assert reduce_plan(4, 32, 5, 32, 132) == (2, 4, 8)  # all partials fit one chunk
    assert reduce_plan(4, 32, 38, 64, 132, DecodeLaunch(reduce_parts=None)) == (1, 1, 64)
    assert reduce_rounds(ReduceBlock(1, 1, 64), 38, 64, 32, 132) == 32  # 8192 programs, 264 at once
    assert reduce_rounds(ReduceBlock(4, 4, 8), 38, 64, 32, 132) == 2 * 5


def test_default_split_count_depends_on_shapes_only():
    cpu = torch.device("cpu")
    for batch in (1, 2, 7, 64, 513):
        splits = default_num_kv_splits(batch, 8, cpu)
        assert 1 <= splits <= MAX_KV_SPLITS
    assert default_num_kv_splits(1, 8, cpu) >= default_num_kv_splits(64, 8, cpu)


def test_the_split_kernels_are_picked_by_pairs_and_shared_blocks():
    # the default: the CUDA kernel from cuda_min_pairs (request, KV head) pairs on; beside
    # shared-prefix blocks both, by request
    least = DECODE_LAUNCH.cuda_min_pairs
    assert DECODE_LAUNCH.split_kernels(least, False) == DECODE_LAUNCH.split_kernels(8 * least, False) == "cuda"
    assert DECODE_LAUNCH.split_kernels(least - 1, False) == DECODE_LAUNCH.split_kernels(least - 1, True) == "triton"
    assert DECODE_LAUNCH.split_kernels(8 * least, True) == "by_request"
    # one kernel everywhere, for timing and tests
    assert DECODE_LAUNCH.with_split_kernel("cuda").split_kernels(1, True) == "cuda"
    assert DECODE_LAUNCH.with_split_kernel("triton").split_kernels(8 * least, True) == "triton"


def test_decode_rejects_mismatched_query():
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(OscarFormat(64), 2, 8, 1, True, gen)
    q = torch.randn(1, 3, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_int2(q, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]), cache, 0.1)


def test_layer_cache_rejects_buffers_of_another_format():
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(OscarFormat(64), 2, 8, 1, True, gen)
    tensors = [getattr(cache, f.name) for f in dataclasses.fields(cache)][1:9]
    with pytest.raises(ValueError, match="codes"):
        LayerCache(OscarFormat(128), *tensors)
    with pytest.raises(ValueError, match=r"k codes must be uint8 \[slots, 2, 32\] for 4-bit codes"):
        LayerCache(OscarFormat(64, key_bits=4), *tensors)
    with pytest.raises(ValueError, match="rotations"):
        LayerCache(OscarFormat(64), *tensors[:6], tensors[6][:, :32], tensors[7])
    with pytest.raises(ValueError, match="share strides"):
        LayerCache(OscarFormat(64), *tensors[:3], torch.cat([tensors[3], tensors[3]], 1)[:, :2], *tensors[4:])
