"""Split-KV decode attention that reads the packed OSCAR-2 cache directly (Triton; the split
programs also in CUDA C++).

Everything happens in rotated space: scores are taken against INT2 codes without dequantizing
them and the output is rotated back at the end. Three launches:

1. `_rotate_q_kernel`, grid (B / requests, H_kv, 4): q' = q · R_K[h] · sm_scale · log2(e), one
   quarter slice of the dims per program for a block of requests (one load of R's slice for all
   of them: the rotation matrices are not in L2 at decode time; `rotate_requests`).
2. `_decode_split_kernel`, grid (H_kv, B, splits + window programs): programs (h, b, i < splits)
   read one contiguous range of request b's INT2 span, the others a slice of its BF16 window
   rows (sinks and the recent ring); each handles all query heads of KV head h, so every KV tile
   is loaded once per GQA group. Each writes its normalized partial output o' and log2-sum-exp.
   KV heads vary fastest in launch order, so the programs of one request and split, which read
   the same slot indices, run together (the codes and meta of one head are contiguous:
   layer_cache.pool_buffer). The long INT2 programs come first in launch order and the short
   window programs last: the GPU starts thread blocks in about that order, so the window
   programs fill the SMs as INT2 programs finish, rather than holding back the INT2 programs
   that do not fit the first wave (on an H100 2-6 % faster at batch 8 and 32:
   results/h100/launch-order-ab.md). With DecodeLaunch.int2_split = "cuda" the same grid runs
   on a GPU in `int2_split.cu` instead (CUDA C++), which puts positions rather than query heads
   on the tensor-core rows of its INT2 programs (int2_split.py); beside shared-prefix blocks
   both kernels run, each request's INT2 programs in one of them by how many positions the
   request reads alone (`DecodeLaunch.split_kernels`).
3. `_decode_reduce_kernel`, grid (B / requests, H_q / heads, 4): merges the partials of a block
   of requests × query heads of one KV head and applies R_Vᵀ to a quarter of their dims (the rows
   share the slice of R_V). A program loads all its partials at once (one round trip to memory:
   `reduce_block`), or, where that leaves too many programs with too few rows (many partials per
   row, as beside shared-prefix blocks), merges them DecodeLaunch.reduce_parts at a time
   (`chunked_reduce_block`; the choice by a wave model, `reduce_plan`).

With `shared` (requests holding a cached prefix in the same slots, `shared_prefix.py`), a fourth
launch, `_decode_shared_kernel`, reads the positions a block of requests shares once for all of
them, their query heads stacked as the rows of one dot; the split kernel then reads only each
request's own positions, and the reduce kernel merges both kinds of partials.

The grid depends only on shapes and host ints (no host sync), so decode can be captured in a
CUDA graph; programs whose range is empty write lse = -inf.

INT2 scoring without dequantization: with codes c (quarter slices c_s), scale s_g and minimum m_g
of the group g(s) holding slice s,
    q'·k̂ = Σ_g s_g · Σ_{s∈g} (q'_s · c_s) + Σ_g m_g · Σ_{i∈g} q'_i
and likewise for V:  o'_s += (p · s_g) @ c_s + (p @ m_g)  (the minimum adds to every dim of g).
The codes enter the tensor-core dots as the fp16 subnormals c·4^s·2^-24 (two instructions per
two codes, see `tiles.unpack_ptx`); the powers of two are folded into q'_s (K) and into the final
scaling of o'_s (V), both exact. 3- and 4-bit keys are read as two 2-bit planes, c = c_0 + 4·c_1
(`tiles.load_key_codes`, `tiles.key_slice`), through the same unpacking.

The @triton.jit tile helpers are in tiles.py (shared with the extend kernel, extend.py).
"""

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import int2_split
from .format import CODE_BITS, CODE_MAX, CODES_PER_BYTE, OscarFormat
from .layer_cache import LayerCache
from .shared_prefix import SHARED_DOT_ROWS, SharedPrefixes
from .tiles import int2_segment, nonzero, rotate_slice, window_segment

# query-head blocks are padded to a power of two >= this (tl.dot pads small M internally; rows
# beyond the GQA group would only add softmax work)
MIN_DOT_ROWS = 4
# INT2 programs per SM the split heuristic aims at: two waves of the 4 that fit at once (the
# second wave evens out programs that end at different times; on an H100 at 128K x 8, 16 splits
# took 385 us against 444 us for 8)
PROGRAMS_PER_SM = 8
WAVE_OVERHEAD = 0.01  # fixed cost of a wave of split programs, relative to reading a whole span
# query rows of one reduce program at most: its output product [rows, D / reduce_dim_programs, D]
# stays in registers (sm_90, 8 warps, D 128: 77 registers at 16 rows, 176 at 32, spills at 64)
MAX_REDUCE_QUERY_ROWS = 16
MAX_KV_SPLITS = 64  # bounds the reduce kernel's one-shot tile of partials; at batch 1 more splits (two
# waves) were slower (H100: 132 took 5-25 % more time; results/h100/tune_decode_splits132.txt)
CPU_SM_COUNT = 8  # stand-in SM count when there is no GPU (interpreter runs)
# reduce programs (8 warps) resident per SM, for the reduce's wave model: Nsight Compute gave
# them a theoretical occupancy of 25-50 % on an H100 (results/h100/decode-profile.md)
REDUCE_PROGRAMS_PER_SM = 2
INT32_MAX = 2**31 - 1
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch parameters of `decode_attention_int2`'s kernels; the defaults are the fastest
    measured (benchmarks/tuning/tune_decode.py sweeps others through this class)."""

    block_n: int = 128  # INT2 positions per tile
    block_rows: int = 32  # BF16 window rows per tile
    window_rows_per_program: int = 64  # window rows per split-kernel program (3 at S + W = 192)
    # software-pipelining depth of the INT2 loop. The pipeliner shares num_stages - 1 stages
    # among the chain of dependent loads (slot index -> codes/meta): 5 gives each load two
    # stages, i.e. double-buffered shared memory, so a tile's loads overlap the previous tile's
    # compute (with 3 the codes get one buffer that is refilled only after the tile is consumed)
    num_stages: int = 5
    num_warps: int = 4
    max_registers: int | None = 128  # lets 4 programs share an SM (no spills, per ptxas for sm_90)
    # `_decode_shared_kernel`: dots of up to shared_prefix.SHARED_DOT_ROWS rows (narrow blocks)
    # share an SM four ways under the register cap; wider ones (64 rows:
    # `shared_prefix.shared_dot_rows`) spill hundreds of registers per tile under it, so they
    # get wide_shared_max_registers (two programs per SM)
    shared_warps: int = 4
    shared_max_registers: int | None = 128
    wide_shared_max_registers: int | None = 255
    # programs per SM the shared-prefix splits aim at (`default_num_kv_splits`) with wide blocks:
    # one wave of the two that fit an SM at 255 registers. PROGRAMS_PER_SM (two waves of the four
    # narrow or split-kernel programs that fit) made four waves of short programs and a partial per
    # split and query row for the reduce: on an H100 at 64 requests on a 32K prefix 8 splits took
    # the step from 268.6 to 226.7 us against 33 (16 splits: 238.5), the reduce from 50.6 to 25.5 us
    # (13 partials against 38); 192 requests get 11 splits either way
    # (results/h100/tune_decode_shared.txt, variants wide_splits2 and wide_splits4)
    wide_shared_programs_per_sm: int = 2
    # query rows (requests x the GQA group padded, head_block) per q-rotation program, which loads
    # its slice of R_K once for all of them (rotate_requests; on an H100 7.3 against 10.2 us for one
    # request per program at batch 32, 11.0 against 19.5 at 128: results/h100/tune_decode_pieces.txt)
    rotate_rows: int = 16
    reduce_warps: int = 8
    reduce_dim_programs: int = 4  # reduce programs per query-head block, each producing D / 4 output dims
    # partial rows (requests x query heads x partials, padded to powers of two) a reduce program
    # that loads all partials at once merges: the query heads of one KV head, then requests, share
    # a program while they fit, which loads its slice of R_V once for all of them (reduce_block; on
    # an H100 13.1 against 51.5 us for one query row per program at batch 32, 27.8 against 98.4 at
    # 128, results/h100/tune_decode_pieces.txt; 256 beside shared-prefix blocks: tune_decode_shared.txt)
    reduce_rows: int = 64
    # partials per query row a chunked reduce program loads at a time, merging them online (a power
    # of two; None: never chunked). On an H100 at 64 requests on a 32K prefix (38 partials, 33
    # shared splits) 8 at a time took the reduce from 118.6 to 50.6 us (4: 74.2), at 192 (16
    # partials) 87.3 against 88.7; where the model keeps one load, at batch 1 and 8, chunks were
    # slower (results/h100/tune_decode_shared.txt, tune_decode_pieces.txt)
    reduce_parts: int | None = 8
    # who runs the split programs (window and INT2): "cuda" (int2_split.cu, wherever
    # `int2_split.serves`, from cuda_min_pairs (request, KV head) pairs on; `split_kernels`) or
    # "triton" (`_decode_split_kernel`). On an H100 with 8 KV heads (results/h100/int2-split-cuda)
    # the CUDA kernel was 11-18 % faster from 64 pairs on at 32K-128K, but not where its programs'
    # ranges are short: with few pairs (its splits fill one wave; 33.6 against 29.3 us at 32K x 1,
    # 50.5 against 44.2 at 32K x 2, 70.8 against 70.3 at 32K x 4 = 32 pairs) and beside
    # shared-prefix blocks that leave each request a 1K tail (362 against 349 us at 64 requests on
    # a 32K prefix, 907 against 843 at 192)
    int2_split: str = "cuda"
    cuda_min_pairs: int = 32
    # beside shared-prefix blocks, where only the device knows what each request reads alone: the
    # CUDA kernel takes the INT2 programs of the requests that give each at least this many
    # positions, the Triton kernel the others and the window programs ("by_request"). Between the
    # measured ~1K (14 % slower in CUDA) and 2K positions per program (as fast or faster); 0: the
    # CUDA kernel runs every split program
    cuda_min_positions: int = 1536
    cuda_stages: int = 4  # cp.async pipeline depth of each warp of int2_split.cu
    # independent accumulators its key MMAs alternate between (all groups); one was the fastest on
    # an H100 (results/h100/int2-split-cuda/tune_decode.txt)
    cuda_key_chains: int = 1

    def split_kernels(self, pairs: int, shared_blocks: bool) -> str:
        """Who runs the split programs of a step of `pairs` (request, KV head) pairs, with or
        without shared-prefix blocks, where `int2_split.serves` the group: "triton", "cuda", or
        "by_request" (both kernels, each request's INT2 programs in one of them by its own span;
        see cuda_min_positions)."""
        if self.int2_split != "cuda" or pairs < self.cuda_min_pairs:
            return "triton"
        return "by_request" if shared_blocks and self.cuda_min_positions > 0 else "cuda"

    def with_split_kernel(self, int2_split: str) -> "DecodeLaunch":
        """These parameters with the split programs in `int2_split`'s kernel at every batch size,
        shared-prefix blocks or not (where `int2_split.serves`; for timing and testing one kernel)."""
        return replace(self, int2_split=int2_split, cuda_min_pairs=1, cuda_min_positions=0)


DECODE_LAUNCH = DecodeLaunch()


# ----------------------------------------------------------------------------- decode kernels


@triton.jit(do_not_specialize=["batch"])
def _rotate_q_kernel(
    q_ptr, stride_qb, stride_qh, k_rot_ptr, stride_krh, qr_ptr, qk_scale, batch,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, REQUESTS: tl.constexpr, D: tl.constexpr,
):
    """Program (r, h, s): slice s of q' = q · R_K[h] · qk_scale for the GQA group of KV head h of
    requests [r·REQUESTS, (r+1)·REQUESTS) (those < batch; one load of R_K's slice for all their
    rows), into qr: fp32 [B, H_q, D]. qk_scale = sm_scale·log2(e): scores come out in the exp2
    domain."""
    P: tl.constexpr = D // 4
    hk = tl.program_id(1)
    s = tl.program_id(2)
    rows = tl.arange(0, REQUESTS * BLOCK_H)
    b = tl.program_id(0) * REQUESTS + rows // BLOCK_H
    heads = hk * GROUP + rows % BLOCK_H
    ok = (rows % BLOCK_H < GROUP) & (b < batch)
    q_rows = q_ptr + b.to(tl.int64)[:, None] * stride_qb + heads[:, None] * stride_qh
    qr = rotate_slice(q_rows, ok[:, None], k_rot_ptr + hk * stride_krh, s, D, P, D) * qk_scale
    row = b.to(tl.int64) * tl.num_programs(1) * GROUP + heads
    tl.store(qr_ptr + row[:, None] * D + s * P + tl.arange(0, P)[None, :], qr, mask=ok[:, None])


@triton.jit(do_not_specialize=["num_splits", "num_parts", "cuda_min_span"])
def _decode_split_kernel(
    qr_ptr,
    kv_indptr_ptr, kv_indices_ptr, window_starts_ptr, own_start_ptr,
    k_codes_ptr, v_codes_ptr, stride_kcs, stride_kch, stride_vcs, stride_vch,
    k_meta_ptr, v_meta_ptr, stride_ms, stride_mh,
    k_win_ptr, v_win_ptr, stride_ws, stride_wh,
    part_o_ptr, part_lse_ptr, num_q_heads, num_splits, num_parts, cuda_min_span,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, KEY_BITS: tl.constexpr,
    S: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    WIN_ROWS: tl.constexpr, SHARED: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    P: tl.constexpr = D // 4
    hk = tl.program_id(0)
    pool_head = hk.to(tl.int64)  # the pool is head-major: head offsets pass 2^31 bytes
    b = tl.program_id(1)
    split = tl.program_id(2)

    kv_lo = tl.load(kv_indptr_ptr + b)
    length = tl.load(kv_indptr_ptr + b + 1) - kv_lo
    start = tl.minimum(S, length)
    end = tl.maximum(start, length - W)
    # SHARED: positions [S, own_start) are read by the request's shared-prefix block
    own_start = tl.load(own_start_ptr + b) if SHARED else start
    # programs 0..num_splits-1 read BLOCK_N-aligned ranges of the INT2 positions the request reads
    # alone, the next WIN_ROWS window rows each (launch order: the module docstring)
    per_split = tl.cdiv(tl.cdiv(end - own_start, num_splits), BLOCK_N) * BLOCK_N
    seg_lo = own_start + split * per_split
    seg_hi = tl.minimum(seg_lo + per_split, end)
    is_window = split >= num_splits
    window = split - num_splits
    has_work = (is_window & (length > 0)) | (~is_window & (seg_lo < seg_hi))
    # the INT2 parts of a request reading at least cuda_min_span positions alone are int2_split.cu's
    if is_window | (tl.maximum(end - own_start, 0) < cuda_min_span):
        heads = tl.arange(0, BLOCK_H)
        head_ok = heads < GROUP
        m_i, l_i, a0, a1, a2, a3 = _empty_state(BLOCK_H, P)
        row = b.to(tl.int64) * num_q_heads + hk * GROUP + heads
        if has_work:
            q0, q1, q2, q3 = _query_slices(qr_ptr, row, head_ok, D)
            if is_window:
                row0 = tl.load(window_starts_ptr + b).to(tl.int64)
                m_i, l_i, a0, a1, a2, a3 = window_segment(
                    m_i, l_i, a0, a1, a2, a3, q0, q1, q2, q3,
                    k_win_ptr + row0 * stride_ws + hk * stride_wh,
                    v_win_ptr + row0 * stride_ws + hk * stride_wh,
                    stride_ws, start, end, length, window * WIN_ROWS, tl.minimum((window + 1) * WIN_ROWS, S + W),
                    P, S, W, BLOCK_R)
            else:
                m_i, l_i, a0, a1, a2, a3 = int2_segment(
                    m_i, l_i, a0, a1, a2, a3, q0, q1, q2, q3,
                    kv_indices_ptr + kv_lo, seg_lo, seg_hi,
                    k_codes_ptr + pool_head * stride_kch, v_codes_ptr + pool_head * stride_vch, stride_kcs, stride_vcs,
                    k_meta_ptr + pool_head * stride_mh, v_meta_ptr + pool_head * stride_mh, stride_ms,
                    P, NG, KEY_BITS, BLOCK_N, CODE_BITS, CODE_MAX, PTX_UNPACK, NUM_STAGES)
        _store_partial(part_o_ptr, part_lse_ptr, row * num_parts + split, head_ok, m_i, l_i, a0, a1, a2, a3, D)


@triton.jit
def _empty_state(M: tl.constexpr, P: tl.constexpr):
    """Online-softmax state of M rows that have seen nothing: m = -inf, l = 0, a_s = 0 [M, P]."""
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    a = tl.zeros([M, P], tl.float32)
    return m_i, l_i, a, a, a, a


@triton.jit
def _query_slices(qr_ptr, row, ok, D: tl.constexpr):
    """Rows `row` [M] (int64; 0 where not ok) of the rotated queries qr [B·H_q, D] fp32 as four
    [M, D/4] slices."""
    P: tl.constexpr = D // 4
    q_ptrs = qr_ptr + row[:, None] * D + tl.arange(0, P)[None, :]
    q0 = tl.load(q_ptrs, mask=ok[:, None], other=0.0)
    q1 = tl.load(q_ptrs + P, mask=ok[:, None], other=0.0)
    q2 = tl.load(q_ptrs + 2 * P, mask=ok[:, None], other=0.0)
    q3 = tl.load(q_ptrs + 3 * P, mask=ok[:, None], other=0.0)
    return q0, q1, q2, q3


@triton.jit
def _store_partial(part_o_ptr, part_lse_ptr, part, ok, m_i, l_i, a0, a1, a2, a3, D: tl.constexpr):
    """Partials [B, H_q, num_parts, D] and [B, H_q, num_parts]: rows `part` [M] (where ok) get
    the log2-sum-exp [M] (-inf where nothing was seen) and the normalized output slices of the
    online-softmax state (m_i, l_i, a_s [M, D/4])."""
    P: tl.constexpr = D // 4
    inv = 1.0 / nonzero(l_i)[:, None]
    tl.store(part_lse_ptr + part, tl.where(l_i > 0, m_i + tl.math.log2(nonzero(l_i)), float("-inf")), mask=ok)
    o_ptrs = part_o_ptr + part[:, None] * D + tl.arange(0, P)[None, :]
    tl.store(o_ptrs, a0 * inv, mask=ok[:, None])
    tl.store(o_ptrs + P, a1 * inv, mask=ok[:, None])
    tl.store(o_ptrs + 2 * P, a2 * inv, mask=ok[:, None])
    tl.store(o_ptrs + 3 * P, a3 * inv, mask=ok[:, None])


@triton.jit(do_not_specialize=["num_shared_splits", "num_parts", "first_part"])
def _decode_shared_kernel(
    qr_ptr,
    kv_indptr_ptr, kv_indices_ptr, members_ptr, block_end_ptr, sharing_ptr,
    k_codes_ptr, v_codes_ptr, stride_kcs, stride_kch, stride_vcs, stride_vch,
    k_meta_ptr, v_meta_ptr, stride_ms, stride_mh,
    part_o_ptr, part_lse_ptr, num_q_heads, num_shared_splits, num_parts, first_part,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
    NG: tl.constexpr, KEY_BITS: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Program (h, i, j): split j of the INT2 positions [S, block_end[k]) that the members of
    shared-prefix block k hold in the same slots, read through the block's first member, for the
    query heads of KV head h of every member at once (row r: member r // GROUP, head r % GROUP),
    for the blocks k = i, i + the programs along axis 1, ... below the number of blocks that
    share positions (`shared_prefix.SharedPrefixes`: they come first; the grid is static, the
    number found on the device). Writes each member's partial `first_part + j`."""
    P: tl.constexpr = D // 4
    hk = tl.program_id(0)
    pool_head = hk.to(tl.int64)  # the pool is head-major: head offsets pass 2^31 bytes
    split = tl.program_id(2)
    for blk in range(tl.program_id(1), tl.load(sharing_ptr), tl.num_programs(1)):
        lead = tl.load(members_ptr + blk * MEMBERS)
        shared_end = tl.load(block_end_ptr + blk)
        rows = tl.arange(0, BLOCK_M)
        member = tl.load(members_ptr + blk * MEMBERS + rows // GROUP, mask=rows < MEMBERS * GROUP, other=-1)
        row_ok = member >= 0
        row = member.to(tl.int64) * num_q_heads + hk * GROUP + rows % GROUP
        per_split = tl.cdiv(tl.cdiv(shared_end - S, num_shared_splits), BLOCK_N) * BLOCK_N
        seg_lo = S + split * per_split
        seg_hi = tl.minimum(seg_lo + per_split, shared_end)
        m_i, l_i, a0, a1, a2, a3 = _empty_state(BLOCK_M, P)
        if seg_lo < seg_hi:
            q0, q1, q2, q3 = _query_slices(qr_ptr, row, row_ok, D)
            m_i, l_i, a0, a1, a2, a3 = int2_segment(
                m_i, l_i, a0, a1, a2, a3, q0, q1, q2, q3,
                kv_indices_ptr + tl.load(kv_indptr_ptr + lead), seg_lo, seg_hi,
                k_codes_ptr + pool_head * stride_kch, v_codes_ptr + pool_head * stride_vch, stride_kcs, stride_vcs,
                k_meta_ptr + pool_head * stride_mh, v_meta_ptr + pool_head * stride_mh, stride_ms,
                P, NG, KEY_BITS, BLOCK_N, CODE_BITS, CODE_MAX, PTX_UNPACK, NUM_STAGES)
        _store_partial(part_o_ptr, part_lse_ptr, row * num_parts + first_part + split, row_ok,
                       m_i, l_i, a0, a1, a2, a3, D)


@triton.jit
def _merge_parts(m, l, acc, first, rows, ok_rows, in_block, num_parts, first_shared_part, part_o_ptr, part_lse_ptr,
                 D: tl.constexpr, BLOCK_P: tl.constexpr, SHARED: tl.constexpr):
    """(m, l, acc) of the query rows [R] (acc [R, D]) with their partials [first, first + BLOCK_P)
    merged in: the running maximum and sum of 2^lse and the 2^lse-weighted sum of o'."""
    parts = first + tl.arange(0, BLOCK_P)
    ok = ok_rows[:, None] & (parts < num_parts)[None, :]
    if SHARED:
        ok &= (parts < first_shared_part)[None, :] | in_block[:, None]
    part_rows = rows[:, None] + parts[None, :]  # [R, BLOCK_P]
    lse = tl.load(part_lse_ptr + part_rows, mask=ok, other=float("-inf"))
    o = tl.load(part_o_ptr + part_rows[:, :, None] * D + tl.arange(0, D)[None, None, :], mask=ok[:, :, None], other=0.0)
    m_new = tl.maximum(m, tl.max(lse, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no partial yet: no NaN
    w = tl.math.exp2(lse - ref[:, None])
    scale = tl.math.exp2(m - ref)
    return m_new, l * scale + tl.sum(w, axis=1), acc * scale[:, None] + tl.sum(w[:, :, None] * o, axis=1)


@triton.jit(do_not_specialize=["batch", "num_parts", "first_shared_part"])
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, batch, num_parts, own_start_ptr, first_shared_part,
    out_ptr, stride_ob, stride_oh,
    v_rot_ptr, stride_vrh,
    GROUP: tl.constexpr, REQUESTS: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr, S: tl.constexpr, SHARED: tl.constexpr, CHUNKED: tl.constexpr,
):
    """Program (r, i, c): for each query row k < REQUESTS·HEADS, request r·REQUESTS + k // HEADS
    (those < batch) and query head i·HEADS + k % HEADS (HEADS divides GROUP: the heads of one KV
    head), merge the row's num_parts partials (CHUNKED: BLOCK_P at a time, online; else all at
    once, num_parts <= BLOCK_P, so the program waits for memory once), then output dims
    [c·BLOCK_J, (c+1)·BLOCK_J) of o' · R_V[kv head]ᵀ (fp32 matrix-vector products over the slice
    of R_V all rows share, loaded once: `ReduceBlock`). Splitting the output dims over programs
    keeps each program's share of R_V small. SHARED: the partials from first_shared_part on exist
    only for a request in a shared-prefix block (own_start > S)."""
    k = tl.arange(0, REQUESTS * HEADS)
    b = tl.program_id(0) * REQUESTS + k // HEADS
    h = tl.program_id(1) * HEADS + k % HEADS
    b_ok = b < batch
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    rows = (b.to(tl.int64) * tl.num_programs(1) * HEADS + h) * num_parts  # [REQUESTS·HEADS]
    in_block = b_ok
    if SHARED:
        in_block = tl.load(own_start_ptr + b, mask=b_ok, other=0) > S
    dims = tl.arange(0, D)
    rot = tl.load(v_rot_ptr + (tl.program_id(1) * HEADS // GROUP) * stride_vrh + j[:, None] * D + dims[None, :])  # R[j, i]
    m = tl.full([REQUESTS * HEADS], float("-inf"), tl.float32)
    l = tl.zeros([REQUESTS * HEADS], tl.float32)
    acc = tl.zeros([REQUESTS * HEADS, D], tl.float32)
    if CHUNKED:
        for first in range(0, num_parts, BLOCK_P):
            m, l, acc = _merge_parts(m, l, acc, first, rows, b_ok, in_block, num_parts, first_shared_part,
                                     part_o_ptr, part_lse_ptr, D, BLOCK_P, SHARED)
    else:
        m, l, acc = _merge_parts(m, l, acc, 0, rows, b_ok, in_block, num_parts, first_shared_part,
                                 part_o_ptr, part_lse_ptr, D, BLOCK_P, SHARED)
    merged = acc / nonzero(l)[:, None]  # [REQUESTS·HEADS, D]
    out = tl.sum(rot[None, :, :] * merged[:, None, :], axis=2)  # out[k, j] = Σ_i o'_k[i] · R[j, i]
    tl.store(out_ptr + b.to(tl.int64)[:, None] * stride_ob + h[:, None] * stride_oh + j[None, :],
             out.to(out_ptr.dtype.element_ty), mask=b_ok[:, None])


# ----------------------------------------------------------------------------- host side


def head_block(group: int) -> int:
    """Rows of a query-head block: the GQA group padded to a power of two >= MIN_DOT_ROWS."""
    return max(MIN_DOT_ROWS, triton.next_power_of_2(group))


def shared_rows(members: int, group: int) -> int:
    """Query rows of a shared-prefix block's dot: its members' query heads of one KV head,
    padded to a power of two."""
    return head_block(members * group)


def wide_blocks(members: int, group: int) -> bool:
    """Whether shared-prefix blocks of `members` requests are wide: more query rows (`shared_rows`)
    than shared_prefix.SHARED_DOT_ROWS, so their programs get DecodeLaunch.wide_shared_max_registers
    and their split count aims at DecodeLaunch.wide_shared_programs_per_sm."""
    return shared_rows(members, group) > SHARED_DOT_ROWS


def most_requests(batch: int, fits) -> int:
    """The most requests (a power of two up to the batch) that fits(requests) accepts; at least one."""
    requests = 1
    while 2 * requests <= batch and fits(2 * requests):
        requests *= 2
    return requests


def rotate_requests(block_h: int, batch: int, launch: DecodeLaunch = DECODE_LAUNCH) -> int:
    """Requests per q-rotation program: the most whose rows (block_h each: `head_block`) fit
    launch.rotate_rows (`most_requests`)."""
    return most_requests(batch, lambda requests: requests * block_h <= launch.rotate_rows)


class ReduceBlock(NamedTuple):
    """The query rows of one reduce program: `requests` requests × `heads` query heads of one
    KV head, and the partials per row it loads at once (powers of two; `reduce_plan`)."""

    requests: int
    heads: int
    parts: int


def most_query_rows(group: int, batch: int, fits) -> tuple[int, int]:
    """(requests, heads) of the most query rows fits(rows) accepts: heads of one KV head first (a
    power of two dividing the GQA group), then requests (`most_requests`); at least one of each."""
    heads = 1
    while group % (2 * heads) == 0 and fits(2 * heads):
        heads *= 2
    return most_requests(batch, lambda requests: fits(requests * heads)), heads


def reduce_block(group: int, parts: int, batch: int, launch: DecodeLaunch = DECODE_LAUNCH) -> ReduceBlock:
    """A reduce program that loads all `parts` partials of its query rows at once (padded to a
    power of two): the most rows (`most_query_rows`) whose partials fit launch.reduce_rows, at
    most MAX_REDUCE_QUERY_ROWS."""
    parts = triton.next_power_of_2(parts)
    requests, heads = most_query_rows(
        group, batch, lambda rows: rows <= MAX_REDUCE_QUERY_ROWS and rows * parts <= launch.reduce_rows)
    return ReduceBlock(requests, heads, parts)


def chunked_reduce_block(group: int, batch: int, launch: DecodeLaunch = DECODE_LAUNCH) -> ReduceBlock:
    """A reduce program that merges launch.reduce_parts partials at a time: MAX_REDUCE_QUERY_ROWS
    query rows however many partials there are."""
    requests, heads = most_query_rows(group, batch, lambda rows: rows <= MAX_REDUCE_QUERY_ROWS)
    return ReduceBlock(requests, heads, launch.reduce_parts)


def reduce_rounds(block: ReduceBlock, parts: int, batch: int, q_heads: int, sms: int,
                  launch: DecodeLaunch = DECODE_LAUNCH) -> int:
    """The reduce's modeled time: waves of programs (REDUCE_PROGRAMS_PER_SM per SM) times the
    loads of partials each program waits for in turn."""
    programs = triton.cdiv(batch, block.requests) * (q_heads // block.heads) * launch.reduce_dim_programs
    return triton.cdiv(programs, REDUCE_PROGRAMS_PER_SM * sms) * triton.cdiv(parts, block.parts)


def reduce_plan(group: int, q_heads: int, parts: int, batch: int, sms: int,
                launch: DecodeLaunch = DECODE_LAUNCH) -> ReduceBlock:
    """The reduce program of a step: all partials at once (`reduce_block`), unless merging them
    in chunks (`chunked_reduce_block`) takes fewer modeled rounds (`reduce_rounds`): many
    partials per row and more programs than one wave, as beside shared-prefix blocks."""
    one_load = reduce_block(group, parts, batch, launch)
    if launch.reduce_parts is None or launch.reduce_parts >= one_load.parts:
        return one_load
    chunked = chunked_reduce_block(group, batch, launch)
    return min((one_load, chunked), key=lambda block: reduce_rounds(block, parts, batch, q_heads, sms, launch))


def window_programs(fmt: OscarFormat, launch: DecodeLaunch = DECODE_LAUNCH) -> int:
    """Split-kernel programs per (request, KV head) that read the BF16 window rows."""
    return triton.cdiv(fmt.window_rows_per_request, launch.window_rows_per_program)


def sm_count(device: torch.device) -> int:
    """The device's SM count (CPU_SM_COUNT off the GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SM_COUNT


def default_num_kv_splits(batch: int, num_kv_heads: int, device: torch.device,
                          programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """INT2 splits per (request, KV head).

    Picks the split count with the least modeled time at long context: the batch × H_kv × splits
    INT2 programs run in waves of programs_per_sm per SM (PROGRAMS_PER_SM for the Triton split
    kernel, int2_split.PROGRAMS_PER_SM for the CUDA one), each wave as long as one split (1/splits
    of the span) plus a fixed WAVE_OVERHEAD (the window programs are short and not modeled).
    Batch 1 thus gets the most splits, large batches few with little wave-quantization loss (on
    an H100: 64 splits at batch 1, 16 at batch 8, the fastest of the counts measured at 32K-128K
    context). Depends on shapes and the device only, never on tensor values, so it is safe under
    CUDA-graph capture."""
    slots = programs_per_sm * sm_count(device)
    pairs = batch * num_kv_heads

    def modeled_time(splits: int) -> float:
        return triton.cdiv(pairs * splits, slots) * (1.0 / splits + WAVE_OVERHEAD)

    return min(range(1, MAX_KV_SPLITS + 1), key=modeled_time)


def meta_words(meta: torch.Tensor) -> torch.Tensor:
    """meta [slots, H_kv, D/G, 2] fp16 -> int32 view [slots, H_kv, D/G, 1]: one word per group."""
    return meta.view(torch.int32)


def code_args(cache: LayerCache) -> tuple:
    """The codes arguments of the split and shared kernels: both buffers, then the slot and
    head strides of K and of V (a key's row is key_bits / 2 times a value's)."""
    k, v = cache.k_codes, cache.v_codes
    return k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1)


def decode_attention_int2(
    q: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
    cache: LayerCache, sm_scale: float, num_kv_splits: int | None = None, out: torch.Tensor | None = None,
    shared: SharedPrefixes | None = None, launch: DecodeLaunch = DECODE_LAUNCH,
) -> torch.Tensor:
    """One decode step over the OSCAR-2 cache; same semantics as `reference.decode_attention`.

    q: [B, H_q, D] bf16/fp16 (not rotated); kv_indptr: [B + 1], kv_indices: [total] int32/int64
    (request b sees slots kv_indices[kv_indptr[b]:kv_indptr[b+1]], positions 0..L-1);
    window_starts: [B] first window row of each request; cache: the layer's pool buffers.
    num_kv_splits: INT2 splits per (request, KV head), 1..MAX_KV_SPLITS, default from the SM
    count (a runtime kernel argument: changing it recompiles only the reduce kernel, and only
    when the number of partials crosses a power of two).
    shared: `shared_prefix.find_shared_prefixes(kv_indptr, kv_indices, fmt, H_q // H_kv)`, computed
    once per batch for all layers: INT2 positions that requests hold in the same slots are read
    once per block of requests (`_decode_shared_kernel`), the rest per request.
    launch: the kernels' launch parameters (DecodeLaunch; the defaults unless tuning).
    Returns out: [B, H_q, D] in q's dtype.
    """
    return decode_step(q, kv_indptr, kv_indices, window_starts, cache, sm_scale, num_kv_splits, out, shared,
                       launch).run()


def decode_step(
    q: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
    cache: LayerCache, sm_scale: float, num_kv_splits: int | None = None, out: torch.Tensor | None = None,
    shared: SharedPrefixes | None = None, launch: DecodeLaunch = DECODE_LAUNCH,
) -> "DecodeStep":
    """`decode_attention_int2`'s arguments validated and its scratch allocated, as a DecodeStep
    whose launches run in order by `run()` (or one at a time, to time them apart)."""
    batch, q_heads, d = q.shape
    fmt, kv_heads = cache.fmt, cache.kv_heads
    if d != fmt.head_dim or q_heads % kv_heads or q.stride(-1) != 1:
        raise ValueError(f"q must be [B, H_q, {fmt.head_dim}] with H_q a multiple of {kv_heads}, got {tuple(q.shape)}")
    group = q_heads // kv_heads
    if launch.int2_split not in ("cuda", "triton"):
        raise ValueError(f"DecodeLaunch.int2_split must be 'cuda' or 'triton', got {launch.int2_split!r}")
    split_kernels = "triton"
    if int2_split.serves(group, q.device):
        split_kernels = launch.split_kernels(batch * kv_heads, shared is not None)
    splits = num_kv_splits
    if splits is None:  # by request: the Triton kernel's count, which the CUDA kernel ran as fast as its own
        splits = default_num_kv_splits(batch, kv_heads, q.device,
                                       int2_split.PROGRAMS_PER_SM if split_kernels == "cuda" else PROGRAMS_PER_SM)
    if not 1 <= splits <= MAX_KV_SPLITS:
        raise ValueError(f"num_kv_splits must be in 1..{MAX_KV_SPLITS}, got {splits}")
    members = shared_splits = 0
    if shared is not None:
        members = shared.members.shape[1]
        if shared.members.shape[0] != batch or tuple(shared.own_start.shape) != (batch,):
            raise ValueError(f"shared prefixes are for a batch of {shared.members.shape[0]} requests, "
                             f"not of {batch}: find them for this batch's kv_indptr and kv_indices")
        # the reduce kernel merges at most MAX_KV_SPLITS INT2 partials per head in one tile
        programs_per_sm = launch.wide_shared_programs_per_sm if wide_blocks(members, group) else PROGRAMS_PER_SM
        shared_splits = max(1, min(default_num_kv_splits(triton.cdiv(batch, members), kv_heads, q.device,
                                                         programs_per_sm), MAX_KV_SPLITS - splits))
    win = window_programs(fmt, launch)
    parts = win + splits + shared_splits
    return DecodeStep(
        DecodeInputs(q, kv_indptr, kv_indices, window_starts, cache, sm_scale), shared, launch, group, splits,
        shared_splits, members, win, parts, split_kernels,
        q_rot=torch.empty(batch, q_heads, d, dtype=torch.float32, device=q.device),
        part_o=torch.empty(batch, q_heads, parts, d, dtype=torch.float32, device=q.device),
        part_lse=torch.empty(batch, q_heads, parts, dtype=torch.float32, device=q.device),
        out=torch.empty_like(q) if out is None else out)


@dataclass(frozen=True)
class DecodeInputs:
    """What `decode_attention_int2` attends with: q [B, H_q, D], kv_indptr [B + 1], kv_indices,
    window_starts [B], the layer's cache and the softmax scale (`args`: in its argument order)."""

    q: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    window_starts: torch.Tensor
    cache: LayerCache
    sm_scale: float

    @property
    def args(self) -> tuple:
        return self.q, self.kv_indptr, self.kv_indices, self.window_starts, self.cache, self.sm_scale


@dataclass
class DecodeStep:
    """One decode step's launches (module docstring) on `inputs`, over its scratch: q_rot [B, H_q, D] fp32,
    part_o [B, H_q, parts, D] fp32 and part_lse [B, H_q, parts] fp32, parts = win (window
    programs) + splits + shared_splits; out [B, H_q, D]. split_kernels: who runs the split
    programs (`DecodeLaunch.split_kernels`: "triton", "cuda" or "by_request")."""

    inputs: DecodeInputs
    shared: SharedPrefixes | None
    launch: DecodeLaunch
    group: int
    splits: int
    shared_splits: int
    members: int
    win: int
    parts: int
    split_kernels: str
    q_rot: torch.Tensor
    part_o: torch.Tensor
    part_lse: torch.Tensor
    out: torch.Tensor

    @property
    def own_start(self) -> torch.Tensor:
        # without shared blocks the kernels never read own_start (SHARED is off): any int32 pointer
        return self.inputs.kv_indptr if self.shared is None else self.shared.own_start

    def run(self) -> torch.Tensor:
        if self.inputs.q.shape[0] > 0:
            self.rotate_q()
            self.split()
            if self.shared is not None:
                self.shared_blocks()
            self.reduce()
        return self.out

    def rotate_q(self) -> None:
        q, batch, kv_heads = self.inputs.q, self.inputs.q.shape[0], self.inputs.cache.kv_heads
        k_rot, k_rot_stride = self.inputs.cache.rotation("k")
        requests = self.rotation_block
        _rotate_q_kernel[(triton.cdiv(batch, requests), kv_heads, CODES_PER_BYTE)](
            q, q.stride(0), q.stride(1), k_rot, k_rot_stride, self.q_rot, self.inputs.sm_scale * LOG2E, batch,
            GROUP=self.group, BLOCK_H=head_block(self.group), REQUESTS=requests, D=q.shape[2],
            num_warps=self.launch.num_warps,
        )

    @property
    def rotation_block(self) -> int:
        """Requests per q-rotation program (`rotate_requests`)."""
        return rotate_requests(head_block(self.group), self.inputs.q.shape[0], self.launch)

    @property
    def reduction_block(self) -> ReduceBlock:
        """Requests × query heads per reduce program and partials per load (`reduce_plan`)."""
        batch, q_heads = self.inputs.q.shape[:2]
        return reduce_plan(self.group, q_heads, self.parts, batch, sm_count(self.inputs.q.device), self.launch)

    @property
    def cuda_min_span(self) -> int:
        """The own span (INT2 positions a request reads alone) from which int2_split.cu runs a
        request's INT2 programs: 0 where it runs them all, INT32_MAX where the Triton kernel does."""
        return {"cuda": 0, "triton": INT32_MAX}.get(self.split_kernels, self.launch.cuda_min_positions * self.splits)

    def split(self) -> None:
        if self.split_kernels != "cuda":  # the window programs and the requests below cuda_min_span
            self.triton_split(self.cuda_min_span)
        if self.split_kernels != "triton":
            int2_split.launch(*self.cuda_split_args())

    def cuda_split_args(self) -> tuple:
        """`int2_split.launch`'s arguments for this step's programs in the CUDA kernel."""
        windows = 0 if self.split_kernels == "by_request" else self.win  # by request, Triton runs them
        programs = int2_split.SplitPrograms(self.splits, windows, self.launch.window_rows_per_program,
                                            self.cuda_min_span)
        return (self.q_rot, self.inputs.kv_indptr, self.inputs.kv_indices, self.inputs.window_starts,
                None if self.shared is None else self.shared.own_start, self.inputs.cache, self.part_o,
                self.part_lse, programs, self.launch.cuda_stages, self.launch.cuda_key_chains)

    def triton_split(self, cuda_min_span: int) -> None:
        """`_decode_split_kernel`: the window programs, and the INT2 programs of the requests whose
        own span is below cuda_min_span."""
        cache, fmt, launch = self.inputs.cache, self.inputs.cache.fmt, self.launch
        k_meta, v_meta = meta_words(cache.k_meta), meta_words(cache.v_meta)
        _decode_split_kernel[(cache.kv_heads, self.inputs.q.shape[0], self.win + self.splits)](
            self.q_rot,
            self.inputs.kv_indptr, self.inputs.kv_indices, self.inputs.window_starts, self.own_start,
            *code_args(cache),
            k_meta, v_meta, k_meta.stride(0), k_meta.stride(1),
            cache.k_window, cache.v_window, cache.k_window.stride(0), cache.k_window.stride(1),
            self.part_o, self.part_lse, self.inputs.q.shape[1], self.splits, self.parts, cuda_min_span,
            GROUP=self.group, BLOCK_H=head_block(self.group), D=fmt.head_dim, NG=fmt.num_groups,
            KEY_BITS=fmt.key_bits, S=fmt.sink_tokens, W=fmt.recent_tokens, BLOCK_N=launch.block_n,
            BLOCK_R=launch.block_rows, WIN_ROWS=launch.window_rows_per_program,
            SHARED=self.shared is not None, CODE_BITS=CODE_BITS, CODE_MAX=CODE_MAX,
            PTX_UNPACK=not triton.knobs.runtime.interpret, NUM_STAGES=launch.num_stages,
            num_warps=launch.num_warps, maxnreg=launch.max_registers,
        )

    def shared_blocks(self) -> None:
        cache, fmt, launch, shared = self.inputs.cache, self.inputs.cache.fmt, self.launch, self.shared
        k_meta, v_meta = meta_words(cache.k_meta), meta_words(cache.v_meta)
        # programs along axis 1: as many as there are blocks when every block is full
        block_programs = triton.cdiv(self.inputs.q.shape[0], self.members)
        _decode_shared_kernel[(cache.kv_heads, block_programs, self.shared_splits)](
            self.q_rot,
            self.inputs.kv_indptr, self.inputs.kv_indices, shared.members, shared.block_end, shared.sharing,
            *code_args(cache),
            k_meta, v_meta, k_meta.stride(0), k_meta.stride(1),
            self.part_o, self.part_lse, self.inputs.q.shape[1], self.shared_splits, self.parts, self.win + self.splits,
            GROUP=self.group, MEMBERS=self.members, BLOCK_M=shared_rows(self.members, self.group),
            D=fmt.head_dim, NG=fmt.num_groups,
            KEY_BITS=fmt.key_bits, S=fmt.sink_tokens, BLOCK_N=launch.block_n,
            CODE_BITS=CODE_BITS, CODE_MAX=CODE_MAX, PTX_UNPACK=not triton.knobs.runtime.interpret,
            NUM_STAGES=launch.num_stages, num_warps=launch.shared_warps,
            maxnreg=(launch.wide_shared_max_registers if wide_blocks(self.members, self.group)
                     else launch.shared_max_registers),
        )

    def reduce(self) -> None:
        v_rot, v_rot_stride = self.inputs.cache.rotation("v")
        d, launch, out = self.inputs.q.shape[2], self.launch, self.out
        batch, q_heads = self.inputs.q.shape[:2]
        block = self.reduction_block
        _decode_reduce_kernel[(triton.cdiv(batch, block.requests), q_heads // block.heads, launch.reduce_dim_programs)](
            self.part_o, self.part_lse, batch, self.parts, self.own_start, self.win + self.splits,
            out, out.stride(0), out.stride(1),
            v_rot, v_rot_stride,
            GROUP=self.group, REQUESTS=block.requests, HEADS=block.heads, D=d,
            BLOCK_P=block.parts, BLOCK_J=d // launch.reduce_dim_programs, CHUNKED=block.parts < self.parts,
            S=self.inputs.cache.fmt.sink_tokens, SHARED=self.shared is not None, num_warps=launch.reduce_warps,
        )
