"""Triton write kernel: rotate, clip, quantize and pack new K/V tokens into an OSCAR-2 pool.

One launch handles K and V of every new token of one layer (grid: token blocks × KV heads × 2).
No host synchronization and a grid that depends only on shapes, so it can be captured in a
CUDA graph. The numerics follow `reference.encode_kv` (see its module docstring for rounding
and non-finite rows); a launch can also set a caller's flag when any of its rows is non-finite,
so that the caller can report it later without synchronizing here.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .format import CODE_BITS, CODE_MAX, CODES_PER_BYTE
from .layer_cache import LayerCache



@dataclass(frozen=True)
class WriteLaunch:
    """Launch parameters of `write_kv_int2`; the defaults are the fastest measured
    (benchmarks/tuning/tune_decode.py sweeps others through this class)."""

    # tokens per program: 16 for prefill chunks; at decode (T = batch size, at most
    # decode_max_tokens) at most 4, so that the programs spread over more SMs (H100, T = 64:
    # 14.5 us against 17.0 us with 16 per program)
    block_tokens: int = 16
    decode_block_tokens: int = 4
    decode_max_tokens: int = 128
    num_warps: int = 4


WRITE_LAUNCH = WriteLaunch()


@triton.jit
def nonfinite_rows(x):
    """x: [N, D] -> [N] bool, True where the row holds a NaN or Inf (stored as zeros)."""
    wide = x.to(tl.float32)
    bad = (wide != wide) | (tl.abs(wide) == float("inf"))
    return tl.max(bad.to(tl.int32), axis=1) > 0


@triton.jit
def _encode_tile(
    x_ptr, stride_xt, stride_xh,
    rot_ptr, stride_rh,
    codes_ptr, stride_ct, stride_ch,
    meta_ptr, stride_mt, stride_mh,
    window_ptr, stride_wt, stride_wh, flag_ptr,
    slots, rows, tok, tok_ok, head,
    clip_lo, clip_frac,
    HAS_WINDOW: tl.constexpr, HAS_FLAG: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
    BITS: tl.constexpr, PLANE_BITS: tl.constexpr, PER_BYTE: tl.constexpr, PLANE_MAX: tl.constexpr,
):
    """BITS-bit codes stored as kernels.format packs them: bits [1:0] in a quartered PLANE_BITS
    plane, then bits [3:2] in another (BITS = 4) or bit 2 paired (BITS = 3)."""
    NG: tl.constexpr = D // G
    Q: tl.constexpr = D // PER_BYTE
    LEVELS: tl.constexpr = (1 << BITS) - 1
    dims = tl.arange(0, D)
    x = tl.load(x_ptr + tok[:, None] * stride_xt + head * stride_xh + dims[None, :],
                mask=tok_ok[:, None], other=0.0).to(tl.float32)
    rot = tl.load(rot_ptr + head * stride_rh + dims[:, None] * D + dims[None, :])
    xr = tl.dot(x, rot, input_precision="ieee")

    row_bad = nonfinite_rows(xr)
    xr = tl.where(row_bad[:, None], 0.0, xr)
    if HAS_FLAG:
        # masked-off tokens loaded as zeros, so only real rows can set it; racing stores all write 1
        tl.store(flag_ptr, 1, mask=tl.max(row_bad.to(tl.int32), axis=0) > 0)

    if HAS_WINDOW:
        w_ok = tok_ok & (rows >= 0)
        tl.store(window_ptr + rows[:, None] * stride_wt + head * stride_wh + dims[None, :],
                 xr.to(tl.bfloat16), mask=w_ok[:, None])

    # Clip at the clip-quantile of |x'| per row, linear interpolation as torch.quantile. The
    # quantile sits near the top, so peel off the D - clip_lo largest values one by one
    # instead of sorting the row (cheaper on the GPU, and far cheaper in the interpreter).
    work = tl.abs(xr)
    below = tl.zeros((BLOCK_T,), tl.float32)
    above = below
    peel = D - clip_lo
    for i in range(0, peel):
        top, where = tl.max(work, axis=1, return_indices=True)
        above = tl.where(i == peel - 2, top, above)
        below = top
        work = tl.where(dims[None, :] == where[:, None], -1.0, work)
    above = tl.where(peel == 1, below, above)
    tau = below + clip_frac * (above - below)
    xc = tl.minimum(tl.maximum(xr, -tau[:, None]), tau[:, None])

    grouped = tl.reshape(xc, (BLOCK_T, NG, G))
    lo = tl.min(grouped, axis=2)
    hi = tl.max(grouped, axis=2)
    minimum = lo.to(tl.float16)
    scale = ((hi - lo) / LEVELS).to(tl.float16)
    s = scale.to(tl.float32)[:, :, None]
    m = minimum.to(tl.float32)[:, :, None]
    q = tl.where(s > 0, tl.floor((grouped - m) / tl.where(s > 0, s, 1.0) + 0.5), 0.0)
    codes = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)

    row_ptrs = codes_ptr + slots[:, None] * stride_ct + head * stride_ch
    shifts = (PLANE_BITS * tl.arange(0, PER_BYTE))[None, :, None]
    for plane in tl.static_range(BITS // PLANE_BITS):
        quarters = tl.reshape((codes >> (PLANE_BITS * plane)) & PLANE_MAX, (BLOCK_T, PER_BYTE, Q))
        packed = tl.sum(quarters << shifts, axis=1).to(tl.uint8)
        tl.store(row_ptrs + plane * Q + tl.arange(0, Q)[None, :], packed, mask=tok_ok[:, None])
    if BITS % PLANE_BITS:
        # the top bit quartered, then bytes 2i and 2i + 1 merged into byte i (kernels.format)
        quarters = tl.reshape((codes >> (BITS - 1)) & 1, (BLOCK_T, PER_BYTE, Q))
        pairs = tl.reshape(tl.sum(quarters << shifts, axis=1), (BLOCK_T, Q // 2, 2))
        packed = tl.sum(pairs << tl.arange(0, 2)[None, None, :], axis=2).to(tl.uint8)
        tl.store(row_ptrs + (BITS // PLANE_BITS) * Q + tl.arange(0, Q // 2)[None, :], packed, mask=tok_ok[:, None])

    groups = tl.arange(0, NG)
    meta_off = slots[:, None] * stride_mt + head * stride_mh + groups[None, :] * 2
    tl.store(meta_ptr + meta_off, scale, mask=tok_ok[:, None])
    tl.store(meta_ptr + meta_off + 1, minimum, mask=tok_ok[:, None])


# token counts and clip positions vary between batches and layers: specializing on them (Triton
# compiles an int argument apart when it is 1 or a multiple of 16) would only multiply compiles
# flag_ptr points at the layer's entry of one flags tensor: its alignment depends on the layer
@triton.jit(do_not_specialize=["num_tokens", "k_clip_lo", "v_clip_lo"], do_not_specialize_on_alignment=["flag_ptr"])
def _write_kv_kernel(
    k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    slot_ptr, row_ptr, num_tokens,
    k_rot_ptr, v_rot_ptr, stride_krh, stride_vrh,
    k_codes_ptr, v_codes_ptr, stride_kct, stride_kch, stride_vct, stride_vch,
    k_meta_ptr, v_meta_ptr, stride_mt, stride_mh,
    k_win_ptr, v_win_ptr, stride_wt, stride_wh, flag_ptr,
    k_clip_lo, k_clip_frac, v_clip_lo, v_clip_frac,
    HAS_WINDOW: tl.constexpr, HAS_FLAG: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
    KEY_BITS: tl.constexpr, PLANE_BITS: tl.constexpr, PER_BYTE: tl.constexpr, PLANE_MAX: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)  # the pool is head-major: head offsets pass 2^31 bytes
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < num_tokens
    slots = tl.load(slot_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    rows = tok
    if HAS_WINDOW:
        rows = tl.load(row_ptr + tok, mask=tok_ok, other=-1).to(tl.int64)
    if tl.program_id(2) == 0:
        _encode_tile(k_ptr, stride_kt, stride_kh, k_rot_ptr, stride_krh,
                     k_codes_ptr, stride_kct, stride_kch, k_meta_ptr, stride_mt, stride_mh,
                     k_win_ptr, stride_wt, stride_wh, flag_ptr, slots, rows, tok, tok_ok, head,
                     k_clip_lo, k_clip_frac, HAS_WINDOW, HAS_FLAG, D, G, BLOCK_T,
                     KEY_BITS, PLANE_BITS, PER_BYTE, PLANE_MAX)
    else:
        _encode_tile(v_ptr, stride_vt, stride_vh, v_rot_ptr, stride_vrh,
                     v_codes_ptr, stride_vct, stride_vch, v_meta_ptr, stride_mt, stride_mh,
                     v_win_ptr, stride_wt, stride_wh, flag_ptr, slots, rows, tok, tok_ok, head,
                     v_clip_lo, v_clip_frac, HAS_WINDOW, HAS_FLAG, D, G, BLOCK_T,
                     PLANE_BITS, PLANE_BITS, PER_BYTE, PLANE_MAX)


def quantile_position(ratio: float, n: int) -> tuple[int, float]:
    """Index below and interpolation weight of the `ratio`-quantile of n sorted values."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {ratio}")
    pos = ratio * (n - 1)
    lo = math.floor(pos)
    return lo, pos - lo


def write_kv_int2(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: LayerCache,
    window_rows: torch.Tensor | None = None, nonfinite_flag: torch.Tensor | None = None,
    launch: WriteLaunch = WRITE_LAUNCH,
) -> None:
    """Encode new tokens of one layer into its pool buffers (codes and meta of `cache`), in place.

    k, v: [T, H_kv, D] bf16/fp16 (keys post-RoPE); slots: [T] int32/int64, any order, no repeats;
    cache: the layer's buffers, rotations and clip ratios.
    window_rows: optional [T] int (-1 = none, no repeats otherwise) selecting rows of the cache's
    window rows that receive the rotated, unclipped BF16 copy.
    nonfinite_flag: optional [1] int32 (one layer's element of a flags tensor), set to 1 when
    any K or V row of the launch is non-finite after rotation (stored as zeros); never cleared
    here, so the caller can read it later without a host sync in this launch's path.
    launch: the launch parameters (WriteLaunch; the defaults unless tuning).
    """
    num_tokens, heads, d = k.shape
    fmt = cache.fmt
    if d != fmt.head_dim or v.shape != k.shape or heads != cache.kv_heads:
        raise ValueError(f"k, v must both be [T, {cache.kv_heads}, {fmt.head_dim}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    k_rot, k_rot_stride = cache.rotation("k")
    v_rot, v_rot_stride = cache.rotation("v")
    k_window, v_window = cache.k_window, cache.v_window
    has_window = window_rows is not None
    if not has_window:
        window_rows = slots  # unused placeholder
    has_flag = nonfinite_flag is not None
    if has_flag:
        assert nonfinite_flag.dtype == torch.int32 and nonfinite_flag.numel() == 1
    else:
        nonfinite_flag = slots  # unused placeholder
    k_lo, k_frac = quantile_position(cache.k_clip, d)
    v_lo, v_frac = quantile_position(cache.v_clip, d)
    if num_tokens > launch.decode_max_tokens:
        block_t = launch.block_tokens
    else:
        block_t = min(launch.decode_block_tokens, triton.next_power_of_2(num_tokens))
    grid = (triton.cdiv(num_tokens, block_t), heads, 2)
    _write_kv_kernel[grid](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        slots, window_rows, num_tokens,
        k_rot, v_rot, k_rot_stride, v_rot_stride,
        cache.k_codes, cache.v_codes, cache.k_codes.stride(0), cache.k_codes.stride(1),
        cache.v_codes.stride(0), cache.v_codes.stride(1),
        cache.k_meta, cache.v_meta, cache.k_meta.stride(0), cache.k_meta.stride(1),
        k_window, v_window, k_window.stride(0), k_window.stride(1), nonfinite_flag,
        k_lo, k_frac, v_lo, v_frac,
        HAS_WINDOW=has_window, HAS_FLAG=has_flag, D=d, G=fmt.group_size, BLOCK_T=block_t,
        KEY_BITS=fmt.key_bits, PLANE_BITS=CODE_BITS, PER_BYTE=CODES_PER_BYTE, PLANE_MAX=CODE_MAX,
        num_warps=launch.num_warps,
    )
