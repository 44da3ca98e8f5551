"""The CUDA INT2 split kernel (kernels/int2_split.cu) on the CPU: its key-register plan and query
fragment, emulated bit for bit, score keys as the reference codes do, and NVRTC compiles every
format for an H100 without register spills in its tile loop. Its results on the CPU:
tests/test_int2_split_emulated.py; on a GPU: tests/gpu/test_kernels_gpu.py."""

import itertools
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from oscar_sglang.kernels import int2_split
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import DECODE_LAUNCH
from oscar_sglang.kernels.format import SUPPORTED_GROUP_SIZES, SUPPORTED_KEY_BITS, OscarFormat

from benchmarks.tuning import kernel_resources
from kernel_cases import make_cache

FORMATS = [OscarFormat(d, g, key_bits=bits)
           for d, g, bits in itertools.product((64, 128), SUPPORTED_GROUP_SIZES, SUPPORTED_KEY_BITS) if g <= d]


def lane_values(reg: int2_split.KeyRegister, row: np.ndarray, t: int) -> tuple[int, int]:
    """What `reg.c_expr()` leaves in the two 16-bit lanes of thread t, from key row bytes `row`."""
    chunk = reg.chunk
    first = chunk.start + t * chunk.size + (0 if chunk.size == 2 else reg.chunk_byte)
    word = int.from_bytes(bytes(row[first:first + min(4, chunk.size)]), "little")
    if chunk.size == 2:  # __byte_perm(w, 0, 0x4140): bytes 0, 1 into the lanes' low bytes
        spread = (word & 0xFF) | ((word >> 8) & 0xFF) << 16
    else:
        spread = word >> (8 * reg.half)
    x = spread & reg.mask
    return x & 0xFFFF, x >> 16


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_key_registers_score_every_group_like_the_reference(fmt):
    gen = torch.Generator().manual_seed(fmt.head_dim + fmt.key_bits)
    codes = torch.randint(0, 1 << fmt.key_bits, (5, fmt.head_dim), generator=gen)
    rows = ref.pack_codes(codes, fmt.key_bits).numpy()
    q = torch.randn(fmt.head_dim, generator=gen, dtype=torch.float64).numpy()
    regs, fragment = int2_split.key_registers(fmt), int2_split.query_fragment(fmt)
    for row, c in zip(rows, codes.numpy()):
        got = np.zeros(fmt.num_groups)
        low_dims = []
        for t, (i, reg) in itertools.product(range(int2_split.THREADS_PER_ROW), enumerate(regs)):
            group = int2_split.register_group(fmt, reg)
            for lane, value in enumerate(lane_values(reg, row, t)):
                # the query fragment as the kernel builds it: register constants, thread shift and weight
                dim = fragment.dims[i][lane] + fragment.dim_steps[0] * (t & 1) + fragment.dim_steps[1] * (t >> 1)
                assert dim // fmt.group_size == group
                got[group] += q[dim] * fragment.scales[i][lane] * fragment.thread_weights[t] * value
                low_dims += [dim] if fragment.sums[i] and fragment.thread_sums[t] else []
        want = (q * c).reshape(fmt.num_groups, fmt.group_size).sum(axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # the minimum's term sums q' over each dim once
        assert sorted(low_dims) == list(range(fmt.head_dim))


def test_registers_pair_within_groups_and_fill_the_mma():
    for fmt in FORMATS:
        regs = int2_split.key_registers(fmt)
        # one position's codes spread over 4 threads, two codes per register
        codes = fmt.head_dim * (2 if fmt.key_bits > 2 else 1)
        assert len(regs) * 2 * int2_split.THREADS_PER_ROW == codes, fmt
        groups = [int2_split.register_group(fmt, r) for r in regs]
        assert groups == sorted(groups)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_nvrtc_compiles_for_sm90_without_spills(fmt):
    for gqa, shared, index_bits in ((4, False, (32, 32, 32)), (8, True, (64, 64, 64)), (1, False, (32, 64, 32))):
        kernel = int2_split.SplitKernel(fmt, gqa, index_bits, shared, DECODE_LAUNCH.window_rows_per_program,
                                        DECODE_LAUNCH.cuda_stages, DECODE_LAUNCH.cuda_key_chains)
        compiled = int2_split.compile_kernel(kernel, "sm_90")
        stored = [int(n) for n in re.findall(r"(\d+) bytes spill stores", compiled.log)]
        # ptxas may park one value in local memory for a higher occupancy, stored once and reloaded
        # outside the tile loop (seen at D 64 with GQA 8); anything more, or any local memory in
        # the loop, is register pressure in the loop
        assert len(stored) == 1 and stored[0] <= 8, compiled.log
        loop = kernel_resources.main_loop(kernel_resources.loops(kernel_resources.cuobjdump(compiled.cubin, "-sass")))
        assert loop["mma"] and not loop["spills"], loop
        if (fmt, gqa) == (OscarFormat(128, key_bits=4), 4):  # the format the benchmarks time
            assert "0 bytes spill stores, 0 bytes spill loads" in compiled.log, compiled.log


def test_a_misaligned_pool_is_refused_before_launch():
    fmt = OscarFormat(128, key_bits=4)
    cache = make_cache(fmt, 2, 8, 1, True, torch.Generator().manual_seed(0))
    int2_split.check_layout(cache)
    shifted = torch.zeros(cache.k_codes.numel() + 1, dtype=torch.uint8)[1:].view(cache.k_codes.shape)
    with pytest.raises(ValueError, match="k_codes rows must be 16-byte aligned.*int2_split='triton'"):
        int2_split.check_layout(replace(cache, k_codes=shifted))
    rows = torch.zeros(cache.k_window.numel() + 1, dtype=torch.bfloat16)[1:].view(cache.k_window.shape)
    with pytest.raises(ValueError, match="k_window/v_window rows must be 8-byte aligned.*int2_split='triton'"):
        int2_split.check_layout(replace(cache, k_window=rows, v_window=rows))
