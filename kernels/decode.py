"""Triton split-KV decode attention that reads the packed OSCAR-2 cache directly.

Everything happens in rotated space: the query is rotated once per program (q' = q · R_K[h]),
scores are taken against INT2 codes without dequantizing them, and the output is rotated back
(o = o' · R_V[h]ᵀ) in the reduce kernel. Two launches:

1. `_decode_split_kernel`, grid (B, H_kv, splits + 1): program (b, h, 0) reads request b's BF16
   window rows (sinks and the recent ring), program (b, h, i >= 1) one contiguous range of its
   INT2 span; each handles all query heads of KV head h, so every KV tile is loaded once per
   GQA group. Each writes its normalized partial output o' and log2-sum-exp.
2. `_decode_reduce_kernel`, grid (B, H_kv): merges the partials and applies R_Vᵀ.

The grid depends only on shapes and host ints (no host sync), so decode can be captured in a
CUDA graph; programs whose range is empty write lse = -inf.

INT2 scoring without dequantization: with codes c (quarter slices c_s), scale s_g and minimum m_g
of the group g(s) holding slice s,
    q'·k̂ = Σ_g s_g · Σ_{s∈g} (q'_s · c_s) + Σ_g m_g · Σ_{i∈g} q'_i
and likewise for V:  o'_s += (p · s_g) @ c_s + (p @ m_g)  (the minimum adds to every dim of g).

The @triton.jit tile helpers here are shared with the extend kernel (extend.py).
"""

import struct

import torch
import triton
import triton.language as tl

from .format import (
    CODE_BITS,
    CODE_MAX,
    CODES_PER_BYTE,
    META_BYTES,
    META_FIELDS,
    OscarFormat,
)

assert CODES_PER_BYTE == 4, "the kernels keep one accumulator per quarter slice of a packed byte"
assert META_FIELDS * META_BYTES == 4, "the kernels read a group's (scale, minimum) as one 32-bit word"

BLOCK_N = 128  # INT2 positions per tile
BLOCK_ROWS = 32  # BF16 window rows per tile
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: query-head blocks are padded to this
NUM_STAGES = 3  # software pipelining depth of the INT2 loop (index load -> code/meta loads)
NUM_WARPS = 4
# registers per thread of the split kernel: 128 lets 4 programs share an SM (the only spills are
# in the query-rotation prologue, per ptxas for sm_90), which the split heuristic assumes
MAX_REGISTERS = 128
PROGRAMS_PER_SM = 4
WAVE_OVERHEAD = 0.01  # fixed cost of a wave of split programs, relative to reading a whole span
MAX_KV_SPLITS = 128
CPU_SM_COUNT = 8  # stand-in SM count when there is no GPU (interpreter runs)
LOG2E = 1.4426950408889634


def _fp16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


# fp16 1024.0: its mantissa step is exactly 1, so OR-ing a small integer into the mantissa and
# subtracting 1024 converts it to fp16 exactly without the slow integer-to-float instructions.
FP16_1024_BITS = tl.constexpr(_fp16_bits(1024.0))


def _unpack_ptx(s: int) -> str:
    """PTX turning 4 packed bytes ($2) into the fp16 codes of quarter slice s, two f16x2 ($0, $1):
    prmt moves bytes 0,1 (2,3) into 16-bit lanes; lop3 keeps the slice's bits in place and ORs
    them into the mantissa of 1024.0, giving 1024 + c·4^s exactly; fma by 4^-s minus 1024·4^-s
    leaves c exactly. Three instructions per two codes."""
    shift = CODE_BITS * s
    assert (CODE_MAX << shift) < 1024, "codes must fit the fp16 mantissa of 1024.0"
    mask = (CODE_MAX << shift) * 0x00010001  # both 16-bit lanes
    magic = FP16_1024_BITS.value * 0x00010001
    scale = _fp16_bits(2.0 ** -shift) * 0x00010001
    bias = _fp16_bits(-1024.0 * 2.0 ** -shift) * 0x00010001
    lines = ["{", ".reg .b32 t, sc, bi;", f"mov.b32 sc, {scale:#010x};", f"mov.b32 bi, {bias:#010x};"]
    for out, select in ((0, 0x4140), (1, 0x4342)):
        lines += [f"prmt.b32 t, $2, 0, {select:#06x};",
                  f"lop3.b32 t, t, {mask:#010x}, {magic:#010x}, 0xEA;",  # (t & mask) | magic
                  f"fma.rn.f16x2 ${out}, t, sc, bi;"]
    return "\n".join(lines + ["}"])


UNPACK_PTX_0 = tl.constexpr(_unpack_ptx(0))
UNPACK_PTX_1 = tl.constexpr(_unpack_ptx(1))
UNPACK_PTX_2 = tl.constexpr(_unpack_ptx(2))
UNPACK_PTX_3 = tl.constexpr(_unpack_ptx(3))


# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _pick(s: tl.constexpr, x0, x1, x2, x3):
    """The s-th of four per-slice values (s is a compile-time constant)."""
    x = x0
    if s == 1:
        x = x1
    elif s == 2:
        x = x2
    elif s == 3:
        x = x3
    return x


@triton.jit
def _column(x, g: tl.constexpr, NG: tl.constexpr):
    """x: [N, NG] -> column g, [N]."""
    return tl.sum(tl.where(tl.arange(0, NG)[None, :] == g, x, 0.0), axis=1)


@triton.jit
def _rotate_slice(x_ptrs, x_mask, rot_ptr, s: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
    """x_ptrs: [M, 1] pointers to rows of x (D contiguous bf16/fp16 values), rot_ptr -> R [D, D]
    fp32: slice s of x · R, i.e. x · R[:, sP:(s+1)P], fp32 [M, P].

    A bf16/fp16 x converts to fp16 exactly (any |x| in fp16's normal range, [6e-5, 65504]) and R
    is split into fp16 hi + lo parts, so two fp16 tensor-core dots give ~fp32 accuracy (2^-20);
    a loop over P-wide chunks of the reduction keeps registers low."""
    acc = tl.zeros([x_ptrs.shape[0], P], tl.float32)
    k = tl.arange(0, P)
    for k0 in tl.range(0, D, P, num_stages=1):
        x = tl.load(x_ptrs + k0 + k[None, :], mask=x_mask, other=0.0).to(tl.float32).to(tl.float16)
        r = tl.load(rot_ptr + (k0 + k)[:, None] * D + s * P + k[None, :])
        r_hi = r.to(tl.float16)
        acc = tl.dot(x, r_hi, acc)
        acc = tl.dot(x, (r - r_hi.to(tl.float32)).to(tl.float16), acc)
    return acc


@triton.jit
def _unrotate(a0, a1, a2, a3, rot_ptr, D: tl.constexpr, P: tl.constexpr):
    """o' given as four slices a_s: [M, P] fp32 (dims sP..(s+1)P) -> o' · Rᵀ, fp32 [M, D]."""
    cols = tl.arange(0, D)[None, :] * D + tl.arange(0, P)[:, None]  # Rᵀ[sP + i, j] = R[j, sP + i]
    out = tl.dot(a0, tl.load(rot_ptr + cols), input_precision="tf32x3")
    out += tl.dot(a1, tl.load(rot_ptr + P + cols), input_precision="tf32x3")
    out += tl.dot(a2, tl.load(rot_ptr + 2 * P + cols), input_precision="tf32x3")
    out += tl.dot(a3, tl.load(rot_ptr + 3 * P + cols), input_precision="tf32x3")
    return out


@triton.jit
def _code_slice(codes, s: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
                PTX_UNPACK: tl.constexpr):
    """codes: [N, P] uint8 -> the codes of quarter slice s as fp16 [N, P] (exact small integers).

    Both paths put the code into the mantissa of fp16 1024.0 (exact) instead of converting
    integers to float, which runs at a quarter of the ALU rate. PTX_UNPACK (GPU) works on four
    packed bytes per instruction; the plain path is what the Triton interpreter can run."""
    if PTX_UNPACK:
        if s == 0:
            c = tl.inline_asm_elementwise(UNPACK_PTX_0, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        elif s == 1:
            c = tl.inline_asm_elementwise(UNPACK_PTX_1, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        elif s == 2:
            c = tl.inline_asm_elementwise(UNPACK_PTX_2, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        else:
            c = tl.inline_asm_elementwise(UNPACK_PTX_3, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
    else:
        bits = ((codes >> (CODE_BITS * s)) & CODE_MAX).to(tl.uint16) | FP16_1024_BITS
        c = bits.to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0
    return c


@triton.jit
def _load_meta(meta_ptr, slot, valid, stride_ms, NG: tl.constexpr):
    """meta_ptr: one head's meta viewed as 32-bit words [slots, ·, NG] (the fp16 pair scale,
    minimum: scale in the low half) -> scale, minimum: [N, NG] fp32. One word per load keeps
    the loads wide enough for the pipeliner's async copies."""
    word = tl.load(meta_ptr + slot[:, None] * stride_ms + tl.arange(0, NG)[None, :],
                   mask=valid[:, None], other=0)
    scale = (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    minimum = (word >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _online_softmax(m_i, l_i, scores):
    """One online-softmax step on scores: [M, N] fp32 (log2 domain, -inf = masked) ->
    (m_new, l_new, alpha [M] to rescale accumulators by, p [M, N]). Rows with nothing visible
    yet keep m = -inf and get alpha = p = 0 instead of NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(scores - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _nonzero(x):
    """x with zeros replaced by 1 (rows that saw nothing: their accumulators are 0 anyway)."""
    return tl.where(x > 0, x, 1.0)


@triton.jit
def _int2_segment(
    m_i, l_i, a0, a1, a2, a3,
    q0, q1, q2, q3, qs0, qs1, qs2, qs3,
    idx_ptr, lo, hi,
    k_codes_ptr, v_codes_ptr, stride_cs, k_meta_ptr, v_meta_ptr, stride_ms,
    P: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Attend to positions [lo, hi) read from INT2, slots idx_ptr[pos].

    State: m_i, l_i: [M] fp32 (log2 domain), a_s: [M, P] fp32 accumulators of o' slices.
    q_s: [M, P] fp16 rotated, pre-scaled query slices; qs_s: [M] fp32 their row sums.
    Code/meta pointers are offset to one KV head. Returns the updated (m_i, l_i, a0..a3).
    """
    SPG: tl.constexpr = 4 // NG  # quarter slices per quantization group (G >= D/4 always)
    M: tl.constexpr = a0.shape[0]
    cols = tl.arange(0, P)
    groups = tl.arange(0, NG)
    # Σ_n p·m_g is the same for every dim of group g: accumulate it per group, add it at the end
    acc_min = tl.zeros([M, NG], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi
        slot = tl.load(idx_ptr + pos, mask=valid, other=0).to(tl.int64)
        kc = tl.load(k_codes_ptr + slot[:, None] * stride_cs + cols[None, :], mask=valid[:, None], other=0)
        vc = tl.load(v_codes_ptr + slot[:, None] * stride_cs + cols[None, :], mask=valid[:, None], other=0)
        k_scale, k_min = _load_meta(k_meta_ptr, slot, valid, stride_ms, NG)
        v_scale, v_min = _load_meta(v_meta_ptr, slot, valid, stride_ms, NG)

        # scores = Σ_g scale_g · Σ_{s∈g} q'_s·c_s + min_g · Σ_{s∈g} Σ q'_s
        for g in tl.static_range(NG):
            s = g * SPG
            dots = tl.dot(_pick(s, q0, q1, q2, q3), tl.trans(_code_slice(kc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)))
            qsum = _pick(s, qs0, qs1, qs2, qs3)
            for t in tl.static_range(1, SPG):
                s = g * SPG + t
                dots = tl.dot(_pick(s, q0, q1, q2, q3), tl.trans(_code_slice(kc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)), dots)
                qsum += _pick(s, qs0, qs1, qs2, qs3)
            part = dots * _column(k_scale, g, NG)[None, :] + qsum[:, None] * _column(k_min, g, NG)[None, :]
            if g == 0:
                scores = part
            else:
                scores += part
        scores = tl.where(valid[None, :], scores, float("-inf"))

        m_i, l_i, alpha, p = _online_softmax(m_i, l_i, scores)
        a0 *= alpha[:, None]
        a1 *= alpha[:, None]
        a2 *= alpha[:, None]
        a3 *= alpha[:, None]
        acc_min *= alpha[:, None]
        # o'_s += (p · scale_g) @ c_s; the minimum's share goes to acc_min
        for g in tl.static_range(NG):
            pg = (p * _column(v_scale, g, NG)[None, :]).to(tl.float16)
            pm = tl.sum(p * _column(v_min, g, NG)[None, :], axis=1)
            acc_min += tl.where(groups[None, :] == g, pm[:, None], 0.0)
            for t in tl.static_range(SPG):
                s = g * SPG + t
                c = _code_slice(vc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)
                if s == 0:
                    a0 = tl.dot(pg, c, a0)
                elif s == 1:
                    a1 = tl.dot(pg, c, a1)
                elif s == 2:
                    a2 = tl.dot(pg, c, a2)
                else:
                    a3 = tl.dot(pg, c, a3)
    a0 += _column(acc_min, 0 // SPG, NG)[:, None]
    a1 += _column(acc_min, 1 // SPG, NG)[:, None]
    a2 += _column(acc_min, 2 // SPG, NG)[:, None]
    a3 += _column(acc_min, 3 // SPG, NG)[:, None]
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _window_segment(
    m_i, l_i, a0, a1, a2, a3,
    q0, q1, q2, q3,
    k_win_ptr, v_win_ptr, stride_ws, n_sink, rec_lo, rec_hi,
    P: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Attend to one request's BF16 window rows: sink rows [0, n_sink) and the recent positions
    [rec_lo, rec_hi) (held in ring rows S + (p - S) mod W; rec_hi - rec_lo <= W).

    State as in `_int2_segment`; q_s: [M, P] fp32 rotated, pre-scaled query slices; window
    pointers are offset to the request's first row and to one KV head. BF16 rows are exact in
    tf32, so tf32 dots round only q' and p (to 11 significant bits, as the INT2 path's fp16 q'),
    and bf16 arithmetic, which the Triton interpreter cannot run, stays out of the kernel.
    """
    cols = tl.arange(0, P)
    # ring slot of the oldest recent position; slot j then holds the ((j - first) mod W)-th one
    first = (rec_lo - S) % W
    for r0 in tl.range(0, S + W, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        nth = (r - S - first + W) % W
        valid = tl.where(r < S, r < n_sink, (r < S + W) & (nth < rec_hi - rec_lo))
        ptrs = r[:, None] * stride_ws + cols[None, :]
        scores = tl.zeros([a0.shape[0], BLOCK_R], tl.float32)
        for s in tl.static_range(4):
            k = tl.load(k_win_ptr + s * P + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.dot(_pick(s, q0, q1, q2, q3), tl.trans(k), scores, input_precision="tf32")
        scores = tl.where(valid[None, :], scores, float("-inf"))

        m_i, l_i, alpha, p = _online_softmax(m_i, l_i, scores)
        a0 = _window_pv(a0 * alpha[:, None], p, v_win_ptr, ptrs, valid)
        a1 = _window_pv(a1 * alpha[:, None], p, v_win_ptr + P, ptrs, valid)
        a2 = _window_pv(a2 * alpha[:, None], p, v_win_ptr + 2 * P, ptrs, valid)
        a3 = _window_pv(a3 * alpha[:, None], p, v_win_ptr + 3 * P, ptrs, valid)
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _window_pv(acc, p, v_ptr, ptrs, valid):
    """acc: [M, P] + p: [M, R] @ the BF16 value slice at v_ptr + ptrs: [R, P]."""
    v = tl.load(v_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    return tl.dot(p, v, acc, input_precision="tf32")


# ----------------------------------------------------------------------------- decode kernels


@triton.jit
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kv_indptr_ptr, kv_indices_ptr, window_starts_ptr,
    k_codes_ptr, v_codes_ptr, stride_cs, stride_ch,
    k_meta_ptr, v_meta_ptr, stride_ms, stride_mh,
    k_win_ptr, v_win_ptr, stride_ws, stride_wh,
    k_rot_ptr, stride_krh,
    part_o_ptr, part_lse_ptr, num_q_heads, num_splits, qk_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
    S: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    P: tl.constexpr = D // 4
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)

    kv_lo = tl.load(kv_indptr_ptr + b)
    length = tl.load(kv_indptr_ptr + b + 1) - kv_lo
    start = tl.minimum(S, length)
    end = tl.maximum(start, length - W)
    # program 0 reads the window rows (scheduled first: it is often the longest), programs
    # 1..num_splits read BLOCK_N-aligned ranges of the INT2 span
    per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
    seg_lo = start + (split - 1) * per_split
    seg_hi = tl.minimum(seg_lo + per_split, end)
    is_window = split == 0
    has_work = (is_window & (length > 0)) | (~is_window & (seg_lo < seg_hi))

    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < GROUP
    cols = tl.arange(0, P)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    a0 = tl.zeros([BLOCK_H, P], tl.float32)
    a1 = tl.zeros([BLOCK_H, P], tl.float32)
    a2 = tl.zeros([BLOCK_H, P], tl.float32)
    a3 = tl.zeros([BLOCK_H, P], tl.float32)
    if has_work:
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + (hk * GROUP + heads)[:, None] * stride_qh
        rot = k_rot_ptr + hk * stride_krh
        # fold sm_scale·log2(e) into q' so scores come out in the exp2 domain
        q0 = _rotate_slice(q_rows, head_ok[:, None], rot, 0, D, P) * qk_scale
        q1 = _rotate_slice(q_rows, head_ok[:, None], rot, 1, D, P) * qk_scale
        q2 = _rotate_slice(q_rows, head_ok[:, None], rot, 2, D, P) * qk_scale
        q3 = _rotate_slice(q_rows, head_ok[:, None], rot, 3, D, P) * qk_scale
        if is_window:
            row0 = tl.load(window_starts_ptr + b).to(tl.int64)
            m_i, l_i, a0, a1, a2, a3 = _window_segment(
                m_i, l_i, a0, a1, a2, a3, q0, q1, q2, q3,
                k_win_ptr + row0 * stride_ws + hk * stride_wh,
                v_win_ptr + row0 * stride_ws + hk * stride_wh,
                stride_ws, start, end, length, P, S, W, BLOCK_R)
        else:
            m_i, l_i, a0, a1, a2, a3 = _int2_segment(
                m_i, l_i, a0, a1, a2, a3,
                q0.to(tl.float16), q1.to(tl.float16), q2.to(tl.float16), q3.to(tl.float16),
                tl.sum(q0, axis=1), tl.sum(q1, axis=1), tl.sum(q2, axis=1), tl.sum(q3, axis=1),
                kv_indices_ptr + kv_lo, seg_lo, seg_hi,
                k_codes_ptr + hk * stride_ch, v_codes_ptr + hk * stride_ch, stride_cs,
                k_meta_ptr + hk * stride_mh, v_meta_ptr + hk * stride_mh, stride_ms,
                P, NG, BLOCK_N, CODE_BITS, CODE_MAX, PTX_UNPACK, NUM_STAGES)
        inv = 1.0 / _nonzero(l_i)[:, None]
        a0 *= inv
        a1 *= inv
        a2 *= inv
        a3 *= inv
    lse = tl.where(l_i > 0, m_i + tl.math.log2(_nonzero(l_i)), float("-inf"))

    # partials: [B, H_q, num_splits + 1, D] and [B, H_q, num_splits + 1]
    row = (b.to(tl.int64) * num_q_heads + hk * GROUP + heads) * (num_splits + 1) + split
    tl.store(part_lse_ptr + row, lse, mask=head_ok)
    o_ptrs = part_o_ptr + row[:, None] * D + cols[None, :]
    tl.store(o_ptrs, a0, mask=head_ok[:, None])
    tl.store(o_ptrs + P, a1, mask=head_ok[:, None])
    tl.store(o_ptrs + 2 * P, a2, mask=head_ok[:, None])
    tl.store(o_ptrs + 3 * P, a3, mask=head_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, num_q_heads, num_parts,
    out_ptr, stride_ob, stride_oh,
    v_rot_ptr, stride_vrh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
):
    P: tl.constexpr = D // 4
    b = tl.program_id(0)
    hk = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < GROUP
    cols = tl.arange(0, P)
    rows = (b.to(tl.int64) * num_q_heads + hk * GROUP + heads) * num_parts

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    a0 = tl.zeros([BLOCK_H, P], tl.float32)
    a1 = tl.zeros([BLOCK_H, P], tl.float32)
    a2 = tl.zeros([BLOCK_H, P], tl.float32)
    a3 = tl.zeros([BLOCK_H, P], tl.float32)
    for i in tl.range(0, num_parts, num_stages=2):
        lse = tl.load(part_lse_ptr + rows + i, mask=head_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(lse - m_safe)
        l_i = l_i * alpha + w
        m_i = m_new
        o_ptrs = part_o_ptr + (rows + i)[:, None] * D + cols[None, :]
        a0 = a0 * alpha[:, None] + w[:, None] * tl.load(o_ptrs, mask=head_ok[:, None], other=0.0)
        a1 = a1 * alpha[:, None] + w[:, None] * tl.load(o_ptrs + P, mask=head_ok[:, None], other=0.0)
        a2 = a2 * alpha[:, None] + w[:, None] * tl.load(o_ptrs + 2 * P, mask=head_ok[:, None], other=0.0)
        a3 = a3 * alpha[:, None] + w[:, None] * tl.load(o_ptrs + 3 * P, mask=head_ok[:, None], other=0.0)
    out = _unrotate(a0, a1, a2, a3, v_rot_ptr + hk * stride_vrh, D, P)
    out /= _nonzero(l_i)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + (hk * GROUP + heads)[:, None] * stride_oh
             + tl.arange(0, D)[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


# ----------------------------------------------------------------------------- host side


def head_block(group: int) -> int:
    """Rows of a query-head block: the GQA group padded to a power of two >= 16 (tl.dot)."""
    return max(MIN_DOT_ROWS, triton.next_power_of_2(group))


def default_num_kv_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """INT2 splits per (request, KV head); the grid has batch × H_kv × (splits + 1) programs.

    Picks the split count with the least modeled time at long context: the batch × H_kv × splits
    INT2 programs run in waves of PROGRAMS_PER_SM per SM, each wave as long as one split (1/splits
    of the span) plus a fixed WAVE_OVERHEAD (the window programs are short and not modeled).
    Batch 1 thus gets about one full wave of short programs, large batches few splits with little
    wave-quantization loss. Depends on shapes and the device only, never on tensor values, so it
    is safe under CUDA-graph capture."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SM_COUNT
    slots = PROGRAMS_PER_SM * sms
    pairs = batch * num_kv_heads

    def modeled_time(splits: int) -> float:
        return triton.cdiv(pairs * splits, slots) * (1.0 / splits + WAVE_OVERHEAD)

    return min(range(1, MAX_KV_SPLITS + 1), key=modeled_time)


def check_pool(k_codes, k_meta, v_codes, v_meta, k_window, v_window, k_rot, v_rot, fmt: OscarFormat):
    """Validate one layer's pool buffers and rotations against the format; returns H_kv."""
    heads = k_codes.shape[1]
    d = fmt.head_dim
    if tuple(k_codes.shape[1:]) != fmt.codes_shape(1, heads)[1:] or k_codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [slots, H_kv, {fmt.packed_dim}], got {tuple(k_codes.shape)}")
    if tuple(k_meta.shape[1:]) != fmt.meta_shape(1, heads)[1:] or k_meta.dtype != torch.float16:
        raise ValueError(f"meta must be fp16 [slots, H_kv, {fmt.num_groups}, 2], got {tuple(k_meta.shape)}")
    if tuple(k_window.shape[1:]) != (heads, d) or k_window.dtype != torch.bfloat16:
        raise ValueError(f"windows must be bf16 [rows, H_kv, {d}], got {tuple(k_window.shape)}")
    if k_codes.stride() != v_codes.stride() or k_meta.stride() != v_meta.stride():
        raise ValueError("K and V codes/meta buffers must share strides")
    if k_window.stride() != v_window.stride():
        raise ValueError("K and V window buffers must share strides")
    for buf in (k_codes, k_meta, k_window):
        if buf.stride(-1) != 1:
            raise ValueError("pool buffers must be contiguous in their last dim")
    if k_meta.stride(-2) != META_FIELDS:
        raise ValueError("meta groups must be contiguous")
    for rot in (k_rot, v_rot):
        if rot.dim() != 3 or rot.shape[0] not in (1, heads) or tuple(rot.shape[1:]) != (d, d):
            raise ValueError(f"rotations must be [H_kv or 1, {d}, {d}], got {tuple(rot.shape)}")
    return heads


def meta_words(meta: torch.Tensor) -> torch.Tensor:
    """meta [slots, H_kv, D/G, 2] fp16 -> int32 view [slots, H_kv, D/G, 1]: one word per group."""
    return meta.view(torch.int32)


def rot_arg(rot: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 contiguous rotation and its per-head stride (0 when shared by all heads)."""
    rot = rot.float().contiguous()
    return rot, rot.stride(0) if rot.shape[0] > 1 else 0


def decode_attention_int2(
    q: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
    k_codes: torch.Tensor, k_meta: torch.Tensor, v_codes: torch.Tensor, v_meta: torch.Tensor,
    k_window: torch.Tensor, v_window: torch.Tensor, k_rot: torch.Tensor, v_rot: torch.Tensor,
    sm_scale: float, fmt: OscarFormat, num_kv_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over the OSCAR-2 cache; same semantics as `reference.decode_attention`.

    q: [B, H_q, D] bf16/fp16 (not rotated); kv_indptr: [B + 1], kv_indices: [total] int32/int64
    (request b sees slots kv_indices[kv_indptr[b]:kv_indptr[b+1]], positions 0..L-1);
    window_starts: [B] first window row of each request; codes [slots, H_kv, D/4] uint8,
    meta [slots, H_kv, D/G, 2] fp16, windows [rows, H_kv, D] bf16; rotations [H_kv or 1, D, D].
    num_kv_splits: INT2 splits per (request, KV head), default from the SM count (a runtime
    kernel argument: changing it does not recompile).
    Returns out: [B, H_q, D] in q's dtype.
    """
    batch, q_heads, d = q.shape
    kv_heads = check_pool(k_codes, k_meta, v_codes, v_meta, k_window, v_window, k_rot, v_rot, fmt)
    if d != fmt.head_dim or q_heads % kv_heads or q.stride(-1) != 1:
        raise ValueError(f"q must be [B, H_q, {fmt.head_dim}] with H_q a multiple of {kv_heads}, got {tuple(q.shape)}")
    group = q_heads // kv_heads
    splits = default_num_kv_splits(batch, kv_heads, q.device) if num_kv_splits is None else num_kv_splits
    if splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {splits}")
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    k_rot, k_rot_stride = rot_arg(k_rot)
    v_rot, v_rot_stride = rot_arg(v_rot)
    k_meta, v_meta = meta_words(k_meta), meta_words(v_meta)
    part_o = torch.empty(batch, q_heads, splits + 1, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, q_heads, splits + 1, dtype=torch.float32, device=q.device)
    block_h = head_block(group)

    _decode_split_kernel[(batch, kv_heads, splits + 1)](
        q, q.stride(0), q.stride(1),
        kv_indptr, kv_indices, window_starts,
        k_codes, v_codes, k_codes.stride(0), k_codes.stride(1),
        k_meta, v_meta, k_meta.stride(0), k_meta.stride(1),
        k_window, v_window, k_window.stride(0), k_window.stride(1),
        k_rot, k_rot_stride,
        part_o, part_lse, q_heads, splits, sm_scale * LOG2E,
        GROUP=group, BLOCK_H=block_h, D=d, NG=fmt.num_groups,
        S=fmt.sink_tokens, W=fmt.recent_tokens, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_ROWS,
        CODE_BITS=CODE_BITS, CODE_MAX=CODE_MAX, PTX_UNPACK=not triton.knobs.runtime.interpret,
        NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    _decode_reduce_kernel[(batch, kv_heads)](
        part_o, part_lse, q_heads, splits + 1,
        out, out.stride(0), out.stride(1),
        v_rot, v_rot_stride,
        GROUP=group, BLOCK_H=block_h, D=d, num_warps=NUM_WARPS,
    )
    return out
