"""Shared builders of the kernel tests (CPU: Triton interpreter; tests/gpu: CUDA).

One layer's pool is filled through the real write path (`reference.encode_kv`) from random data,
at shuffled, non-contiguous slots and window rows. Everything a correct kernel must not read
(unused slots' meta, window rows holding no visible position) and the outputs are poisoned (NaN,
or the *_POISON values for the write kernel), so a stray read or an unwritten output shows up.
"""

from dataclasses import dataclass

import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import DECODE_LAUNCH, decode_attention_int2
from oscar_sglang.kernels.extend import EXTEND_LAUNCH, extend_attention_int2
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer
from oscar_sglang.kernels.quantize import WRITE_LAUNCH, write_kv_int2

CODE_POISON, META_POISON, WINDOW_POISON = 0xA5, -7.0, 1234.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def random_rotation(heads: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """[heads, dim, dim] fp32 random orthogonal matrices."""
    return torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))[0].float()


def make_cache(fmt: OscarFormat, kv_heads: int, slots: int, requests: int, per_head: bool,
               gen: torch.Generator, device="cpu") -> LayerCache:
    """Empty pool with random codes and NaN meta / window rows (poison for stray reads), codes
    and meta stored head-major as the server's pool stores them."""
    rot_heads = kv_heads if per_head else 1

    def codes(kind):
        random = torch.randint(0, 256, fmt.codes_shape(slots, kv_heads, kind), generator=gen, dtype=torch.uint8)
        return pool_buffer(random.shape, random.dtype, device).copy_(random)

    def nan_meta():
        return pool_buffer(fmt.meta_shape(slots, kv_heads), torch.float16, device).fill_(float("nan"))

    def nan_window():
        return torch.full(fmt.window_shape(requests, kv_heads), float("nan"), dtype=torch.bfloat16, device=device)

    return LayerCache(fmt, codes("k"), nan_meta(), codes("v"), nan_meta(), nan_window(), nan_window(),
                      random_rotation(rot_heads, fmt.head_dim, gen).to(device),
                      random_rotation(rot_heads, fmt.head_dim, gen).to(device))


def window_positions(fmt: OscarFormat, length: int) -> list[int]:
    """Positions of a `length`-token sequence that live in its window rows."""
    start, end = fmt.int2_span(length)
    return [*range(start), *range(end, length)]


def store_tokens(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 window_start: int, positions: list[int], window: list[int]):
    """Encode k, v: [T, H_kv, D] (positions `positions`) with `reference.encode_kv` into `slots`,
    and copy the positions listed in `window` into the request's window rows."""
    fmt = cache.fmt
    for x, rot, clip, codes, meta, rows, kind in (
        (k, cache.k_rot, cache.k_clip, cache.k_codes, cache.k_meta, cache.k_window, "k"),
        (v, cache.v_rot, cache.v_clip, cache.v_codes, cache.v_meta, cache.v_window, "v"),
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


def fill_requests(cache: LayerCache, lens: list[int], dtype: torch.dtype, index_dtype: torch.dtype,
                  gen: torch.Generator) -> Batch:
    """Write random K/V for requests of the given lengths at shuffled slots and window rows."""
    fmt, kv_heads, d = cache.fmt, cache.k_codes.shape[1], cache.fmt.head_dim
    device = cache.k_codes.device
    slot_perm = torch.randperm(cache.k_codes.shape[0], generator=gen)
    row_perm = torch.randperm(cache.k_window.shape[0] // fmt.window_rows_per_request, generator=gen)
    indptr, indices, starts = [0], [], []
    for b, length in enumerate(lens):
        slots = slot_perm[indptr[-1]:indptr[-1] + length]
        start = int(row_perm[b]) * fmt.window_rows_per_request
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


def run_decode(cache: LayerCache, batch: Batch, q: torch.Tensor, num_kv_splits=None, launch=DECODE_LAUNCH):
    """Kernel (into a NaN-poisoned output, with `launch`) and reference results."""
    sm_scale = cache.fmt.head_dim ** -0.5
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, sm_scale)
    out = torch.full_like(q, float("nan"))
    got = decode_attention_int2(*args, num_kv_splits=num_kv_splits, out=out, launch=launch)
    assert got.data_ptr() == out.data_ptr()
    return got, ref.decode_attention(*args)


def run_extend(cache: LayerCache, q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, window_starts,
               launch=EXTEND_LAUNCH):
    """Kernel (into a NaN-poisoned output, with `launch`) and reference results."""
    sm_scale = cache.fmt.head_dim ** -0.5
    args = (q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, window_starts, cache, sm_scale)
    chunks = (qo_indptr[1:] - qo_indptr[:-1]).tolist()
    prefixes = (kv_indptr[1:] - kv_indptr[:-1]).tolist()
    out = torch.full_like(q, float("nan"))
    got = extend_attention_int2(*args, max_extend_len=max(chunks), max_prefix_len=max(prefixes), out=out,
                                launch=launch)
    assert got.data_ptr() == out.data_ptr()
    return got, ref.extend_attention(*args)


def new_tokens(chunks, kv_heads, gqa, dim, dtype, gen):
    """Random q: [N, H_q, D], k_new, v_new: [N, H_kv, D] and qo_indptr for chunk lengths."""
    n = sum(chunks)
    q = torch.randn(n, kv_heads * gqa, dim, generator=gen).to(dtype)
    k = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    qo_indptr = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, qo_indptr


def assert_codes_match(got, want, x_rot_clipped, meta, group, bits=2):
    """Codes must be equal except where the reference value sits on a rounding tie."""
    got_c, want_c = ref.unpack_codes(got, bits), ref.unpack_codes(want, bits)
    diff = got_c != want_c
    if not diff.any():
        return
    s = meta[..., 0].float().repeat_interleave(group, dim=-1)
    m = meta[..., 1].float().repeat_interleave(group, dim=-1)
    y = (x_rot_clipped - m) / torch.where(s > 0, s, 1.0)
    near_tie = ((y - y.floor()) - 0.5).abs() < 1e-4
    assert (near_tie | ~diff).all(), f"{int(diff.sum())} codes differ away from rounding ties"
    assert ((got_c.int() - want_c.int()).abs() <= 1).all()


def write_poisoned(k, v, slots, k_rot, v_rot, clips, rows, fmt: OscarFormat, num_slots: int,
                   launch=WRITE_LAUNCH) -> dict:
    """write_kv_int2 (with `launch`) into poisoned pool buffers ({k,v}_{codes,meta,window}, window
    rows = tokens; codes and meta head-major, as the server's pool) on DEVICE; returns the buffers
    on the CPU."""
    tokens, heads, d = k.shape
    bufs = {
        f"{kind}_{name}": pool_buffer(shape, dtype, DEVICE).fill_(poison)
        for kind in "kv"
        for name, shape, poison, dtype in (
            ("codes", fmt.codes_shape(num_slots, heads, kind), CODE_POISON, torch.uint8),
            ("meta", fmt.meta_shape(num_slots, heads), META_POISON, torch.float16),
        )
    }
    bufs.update({f"{kind}_window": torch.full((tokens, heads, d), WINDOW_POISON, dtype=torch.bfloat16, device=DEVICE)
                 for kind in "kv"})
    cache = LayerCache(fmt, bufs["k_codes"], bufs["k_meta"], bufs["v_codes"], bufs["v_meta"], bufs["k_window"],
                       bufs["v_window"], k_rot.to(DEVICE), v_rot.to(DEVICE), *clips)
    write_kv_int2(k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), cache, window_rows=rows.to(DEVICE), launch=launch)
    return {name: t.cpu() for name, t in bufs.items()}
