"""The Triton decode kernel against `reference.decode_attention` (CPU: Triton interpreter).

Pools are filled through the real write path (`reference.encode_kv`) from random data, at
shuffled, non-contiguous slots and window rows. Everything a correct kernel must not read
(unused slots' meta, window rows holding no visible position) and the output are poisoned
with NaN, so a stray read or an unwritten output shows up as NaN. The pool helpers here are
shared with test_extend_kernel.py and tests/gpu/.
"""

from dataclasses import dataclass

import pytest
import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import (
    MAX_KV_SPLITS,
    decode_attention_int2,
    default_num_kv_splits,
)
from oscar_sglang.kernels.format import DEFAULT_K_CLIP, DEFAULT_V_CLIP, OscarFormat

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def random_rotation(heads: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """[heads, dim, dim] fp32 random orthogonal matrices."""
    return torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))[0].float()


@dataclass
class Cache:
    """One layer's OSCAR-2 pool buffers and rotations."""

    fmt: OscarFormat
    k_codes: torch.Tensor
    k_meta: torch.Tensor
    v_codes: torch.Tensor
    v_meta: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor
    k_rot: torch.Tensor
    v_rot: torch.Tensor

    @property
    def buffers(self):
        """The pool arguments of the attention functions, in their order."""
        return (self.k_codes, self.k_meta, self.v_codes, self.v_meta,
                self.k_window, self.v_window, self.k_rot, self.v_rot)


def make_cache(fmt: OscarFormat, kv_heads: int, slots: int, requests: int, per_head: bool,
               gen: torch.Generator, device="cpu") -> Cache:
    """Empty pool with random codes and NaN meta / window rows (poison for stray reads)."""
    rot_heads = kv_heads if per_head else 1

    def codes(kind):
        return torch.randint(0, 256, fmt.codes_shape(slots, kv_heads, kind), generator=gen, dtype=torch.uint8)

    def nan(shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype)

    cache = Cache(fmt, codes("k"), nan(fmt.meta_shape(slots, kv_heads), torch.float16),
                  codes("v"), nan(fmt.meta_shape(slots, kv_heads), torch.float16),
                  nan(fmt.window_shape(requests, kv_heads), torch.bfloat16),
                  nan(fmt.window_shape(requests, kv_heads), torch.bfloat16),
                  random_rotation(rot_heads, fmt.head_dim, gen), random_rotation(rot_heads, fmt.head_dim, gen))
    return Cache(fmt, *(t.to(device) for t in cache.buffers))


def window_positions(fmt: OscarFormat, length: int) -> list[int]:
    """Positions of a `length`-token sequence that live in its window rows."""
    start, end = fmt.int2_span(length)
    return [*range(start), *range(end, length)]


def store_tokens(cache: Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 window_start: int, positions: list[int], window: list[int]):
    """Encode k, v: [T, H_kv, D] (positions `positions`) with `reference.encode_kv` into `slots`,
    and copy the positions listed in `window` into the request's window rows."""
    fmt = cache.fmt
    for x, rot, clip, codes, meta, rows, kind in (
        (k, cache.k_rot, DEFAULT_K_CLIP, cache.k_codes, cache.k_meta, cache.k_window, "k"),
        (v, cache.v_rot, DEFAULT_V_CLIP, cache.v_codes, cache.v_meta, cache.v_window, "v"),
    ):
        c, m, w = ref.encode_kv(x.cpu(), rot.cpu(), clip, fmt, fmt.code_bits(kind))
        codes[slots] = c.to(codes.device)
        meta[slots] = m.to(meta.device)
        for i, p in enumerate(positions):
            if p in set(window):
                rows[fmt.window_row(window_start, p)] = w[i].to(rows.device)


@dataclass
class Batch:
    """Decode metadata of a batch of requests whose whole sequences are in the cache."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    window_starts: torch.Tensor


def fill_requests(cache: Cache, lens: list[int], dtype: torch.dtype, index_dtype: torch.dtype,
                  gen: torch.Generator) -> Batch:
    """Write random K/V for requests of the given lengths at shuffled slots and window rows."""
    fmt, kv_heads, d = cache.fmt, cache.k_codes.shape[1], cache.fmt.head_dim
    device = cache.k_codes.device
    slot_perm = torch.randperm(cache.k_codes.shape[0], generator=gen)
    row_perm = torch.randperm(cache.k_window.shape[0] // fmt.window_rows, generator=gen)
    indptr, indices, starts = [0], [], []
    for b, length in enumerate(lens):
        slots = slot_perm[indptr[-1]:indptr[-1] + length]
        start = int(row_perm[b]) * fmt.window_rows
        k = torch.randn(length, kv_heads, d, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, d, generator=gen).to(dtype)
        if length:
            store_tokens(cache, k, v, slots.to(device), start, list(range(length)), window_positions(fmt, length))
        indptr.append(indptr[-1] + length)
        indices.append(slots)
        starts.append(start)
    return Batch(torch.tensor(indptr, dtype=index_dtype, device=device),
                 torch.cat(indices).to(index_dtype).to(device),
                 torch.tensor(starts, dtype=index_dtype, device=device))


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """out (kernel, q's dtype) against the float32 reference, tolerance from the dtype."""
    assert out.dtype == dtype
    assert not out.isnan().any(), "NaN in the kernel output"
    tol = TOLERANCE[dtype]
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * scale)


def run_decode(cache: Cache, batch: Batch, q: torch.Tensor, num_kv_splits=None):
    """Kernel (into a NaN-poisoned output) and reference results."""
    sm_scale = cache.fmt.head_dim ** -0.5
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, *cache.buffers, sm_scale, cache.fmt)
    out = torch.full_like(q, float("nan"))
    got = decode_attention_int2(*args, num_kv_splits=num_kv_splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    return got, ref.decode_attention(*args)


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
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, *cache.buffers, 0.125, fmt)
    expected = ref.decode_attention(*args)
    wide = torch.full((len(lens), 4, 2 * 64), float("nan"), dtype=torch.float16)
    decode_attention_int2(*args, out=wide[:, :, :64])
    assert_matches(wide[:, :, :64], expected, torch.float16)
    assert wide[:, :, 64:].isnan().all(), "wrote outside the output view"
    assert_matches(decode_attention_int2(*args), expected, torch.float16)


def test_default_split_count_depends_on_shapes_only():
    cpu = torch.device("cpu")
    for batch in (1, 2, 7, 64, 513):
        splits = default_num_kv_splits(batch, 8, cpu)
        assert 1 <= splits <= MAX_KV_SPLITS
    assert default_num_kv_splits(1, 8, cpu) >= default_num_kv_splits(64, 8, cpu)


def test_decode_rejects_mismatched_pool():
    gen = torch.Generator().manual_seed(0)
    fmt = OscarFormat(64)
    cache = make_cache(fmt, 2, 8, 1, True, gen)
    q = torch.randn(1, 3, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_int2(q, torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]), *cache.buffers, 0.1, fmt)
    with pytest.raises(ValueError, match="codes"):
        decode_attention_int2(q[:, :2], torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]),
                              *cache.buffers, 0.1, OscarFormat(128))
    with pytest.raises(ValueError, match=r"k codes must be uint8 \[slots, 2, 32\] for 4-bit codes"):
        decode_attention_int2(q[:, :2], torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]),
                              *cache.buffers, 0.1, OscarFormat(64, key_bits=4))
