"""Triton extend (chunked-prefill) attention over the packed OSCAR-2 cache.

Program (b, h, i) handles BLOCK_M query rows of request b: the rows are (token, query head)
pairs of KV head h's GQA group, so every prefix tile is loaded once for the whole group. Each
program attends, with one online softmax,
1. to the cached prefix in rotated space, reading the request's BF16 window rows (sinks and
   the recent ring) with the decode kernel's window helper and the INT2 codes in between with
   `_int2_prefix_segment` — the prefix is never materialized in BF16;
2. to the new chunk (k_new, v_new, not rotated) exactly and causally, in the model's space:
   q·k = q'·k' because the rotation is orthogonal, so the two parts share one softmax.
The prefix accumulator is rotated back (· R_Vᵀ) and added to the chunk accumulator at the end.
The grid depends on shapes and the host int max_extend_len only.
"""

import struct

import torch
import triton
import triton.language as tl

from .decode import (
    BLOCK_ROWS,
    LOG2E,
    _nonzero,
    _online_softmax,
    _pick,
    _rotate_slice,
    _unrotate,
    _window_segment,
    check_pool,
    meta_words,
    rot_arg,
)
from .format import CODE_BITS, CODE_MAX, OscarFormat

BLOCK_M = 64  # query rows ((token, head) pairs) per program
BLOCK_PREFIX = 64  # INT2 prefix positions per tile (128 spills registers at 64 query rows)
BLOCK_CHUNK = 64  # new-chunk keys per tile
NUM_WARPS = 8
NUM_STAGES = 3  # software pipelining depth of the prefix loop (index load -> code/meta loads)


def _fp16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


# fp16 1024.0: its mantissa step is exactly 1, so OR-ing a small integer into the mantissa and
# subtracting 1024 converts it to fp16 exactly without the slow integer-to-float instructions.
FP16_1024_BITS = tl.constexpr(_fp16_bits(1024.0))


def _exact_unpack_ptx(s: int) -> str:
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


EXACT_PTX_0 = tl.constexpr(_exact_unpack_ptx(0))
EXACT_PTX_1 = tl.constexpr(_exact_unpack_ptx(1))
EXACT_PTX_2 = tl.constexpr(_exact_unpack_ptx(2))
EXACT_PTX_3 = tl.constexpr(_exact_unpack_ptx(3))



# ----------------------------------------------------------------------------- prefix tiles


@triton.jit
def _column(x, g: tl.constexpr, NG: tl.constexpr):
    """x: [N, NG] -> column g, [N]."""
    return tl.sum(tl.where(tl.arange(0, NG)[None, :] == g, x, 0.0), axis=1)


@triton.jit
def _code_slice_exact(codes, s: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
                PTX_UNPACK: tl.constexpr):
    """codes: [N, P] uint8 -> the codes of quarter slice s as fp16 [N, P] (exact small integers).

    Both paths put the code into the mantissa of fp16 1024.0 (exact) instead of converting
    integers to float, which runs at a quarter of the ALU rate. PTX_UNPACK (GPU) works on four
    packed bytes per instruction; the plain path is what the Triton interpreter can run."""
    if PTX_UNPACK:
        if s == 0:
            c = tl.inline_asm_elementwise(EXACT_PTX_0, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        elif s == 1:
            c = tl.inline_asm_elementwise(EXACT_PTX_1, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        elif s == 2:
            c = tl.inline_asm_elementwise(EXACT_PTX_2, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        else:
            c = tl.inline_asm_elementwise(EXACT_PTX_3, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
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
def _int2_prefix_segment(
    m_i, l_i, a0, a1, a2, a3,
    q0, q1, q2, q3, qs0, qs1, qs2, qs3,
    idx_ptr, lo, hi,
    k_codes_ptr, v_codes_ptr, stride_cs, k_meta_ptr, v_meta_ptr, stride_ms,
    P: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Attend to positions [lo, hi) read from INT2, slots idx_ptr[pos], with the codes converted
    to exact fp16 integers (`decode._int2_segment` feeds them as subnormals, which suits its
    4-row tiles but not these 64-row ones: there the tensor cores read the codes from shared
    memory and the decode loop's meta layout multiplies the async copies).

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
            dots = tl.dot(_pick(s, q0, q1, q2, q3), tl.trans(_code_slice_exact(kc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)))
            qsum = _pick(s, qs0, qs1, qs2, qs3)
            for t in tl.static_range(1, SPG):
                s = g * SPG + t
                dots = tl.dot(_pick(s, q0, q1, q2, q3), tl.trans(_code_slice_exact(kc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)), dots)
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
                c = _code_slice_exact(vc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)
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
def _extend_kernel(
    q_ptr, stride_qt, stride_qh,
    k_new_ptr, v_new_ptr, stride_knt, stride_knh, stride_vnt, stride_vnh,
    qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, window_starts_ptr,
    k_codes_ptr, v_codes_ptr, stride_cs, stride_ch,
    k_meta_ptr, v_meta_ptr, stride_ms, stride_mh,
    k_win_ptr, v_win_ptr, stride_ws, stride_wh,
    k_rot_ptr, stride_krh, v_rot_ptr, stride_vrh,
    out_ptr, stride_ot, stride_oh, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
    S: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
    PTX_UNPACK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    P: tl.constexpr = D // 4
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # chunk tokens per program
    b = tl.program_id(0)
    hk = tl.program_id(1)
    tok0 = tl.program_id(2) * TOKENS
    q_lo = tl.load(qo_indptr_ptr + b)
    n = tl.load(qo_indptr_ptr + b + 1) - q_lo
    if tok0 < n:
        rows = tl.arange(0, BLOCK_M)
        tok = tok0 + rows // GROUP
        head = hk * GROUP + rows % GROUP
        row_ok = (rows < TOKENS * GROUP) & (tok < n)
        q_rows = q_ptr + (q_lo + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh

        kv_lo = tl.load(kv_indptr_ptr + b)
        prefix = tl.load(kv_indptr_ptr + b + 1) - kv_lo
        length = prefix + n
        start = tl.minimum(S, length)
        end = tl.maximum(start, length - W)

        # 1. cached prefix, rotated space: positions [0, min(start, prefix)) and [end, prefix)
        #    from the window rows, [start, min(end, prefix)) from INT2
        rot = k_rot_ptr + hk * stride_krh
        q0 = _rotate_slice(q_rows, row_ok[:, None], rot, 0, D, P, P) * qk_scale
        q1 = _rotate_slice(q_rows, row_ok[:, None], rot, 1, D, P, P) * qk_scale
        q2 = _rotate_slice(q_rows, row_ok[:, None], rot, 2, D, P, P) * qk_scale
        q3 = _rotate_slice(q_rows, row_ok[:, None], rot, 3, D, P, P) * qk_scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        a0 = tl.zeros([BLOCK_M, P], tl.float32)
        a1 = tl.zeros([BLOCK_M, P], tl.float32)
        a2 = tl.zeros([BLOCK_M, P], tl.float32)
        a3 = tl.zeros([BLOCK_M, P], tl.float32)
        row0 = tl.load(window_starts_ptr + b).to(tl.int64)
        m_i, l_i, a0, a1, a2, a3 = _window_segment(
            m_i, l_i, a0, a1, a2, a3, q0, q1, q2, q3,
            k_win_ptr + row0 * stride_ws + hk * stride_wh,
            v_win_ptr + row0 * stride_ws + hk * stride_wh,
            stride_ws, tl.minimum(start, prefix), end, tl.maximum(prefix, end), 0, S + W, P, S, W, BLOCK_R)
        m_i, l_i, a0, a1, a2, a3 = _int2_prefix_segment(
            m_i, l_i, a0, a1, a2, a3,
            q0.to(tl.float16), q1.to(tl.float16), q2.to(tl.float16), q3.to(tl.float16),
            tl.sum(q0, axis=1), tl.sum(q1, axis=1), tl.sum(q2, axis=1), tl.sum(q3, axis=1),
            kv_indices_ptr + kv_lo, start, tl.minimum(end, prefix),
            k_codes_ptr + hk * stride_ch, v_codes_ptr + hk * stride_ch, stride_cs,
            k_meta_ptr + hk * stride_mh, v_meta_ptr + hk * stride_mh, stride_ms,
            P, NG, BLOCK_N, CODE_BITS, CODE_MAX, PTX_UNPACK, NUM_STAGES)

        # 2. the new chunk, model space, causal: token t sees chunk keys [0, t]. 16-bit q, k, v
        #    are exact in tf32, so tf32 dots give the products of a native bf16/fp16 dot.
        dims = tl.arange(0, D)
        q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j0 in tl.range(0, tl.minimum(tok0 + TOKENS, n), BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C)
            key = (q_lo + j).to(tl.int64)[:, None]
            key_ok = (j < n)[:, None]
            k = tl.load(k_new_ptr + key * stride_knt + hk * stride_knh + dims[None, :], mask=key_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32") * qk_scale
            scores = tl.where((j[None, :] <= tok[:, None]) & (j[None, :] < n), scores, float("-inf"))
            m_i, l_i, alpha, p = _online_softmax(m_i, l_i, scores)
            a0 *= alpha[:, None]
            a1 *= alpha[:, None]
            a2 *= alpha[:, None]
            a3 *= alpha[:, None]
            v = tl.load(v_new_ptr + key * stride_vnt + hk * stride_vnh + dims[None, :], mask=key_ok, other=0.0)
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="tf32")

        out = acc + _unrotate(a0, a1, a2, a3, v_rot_ptr + hk * stride_vrh, D, P)
        out /= _nonzero(l_i)[:, None]
        tl.store(out_ptr + (q_lo + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def extend_attention_int2(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
    window_starts: torch.Tensor,
    k_codes: torch.Tensor, k_meta: torch.Tensor, v_codes: torch.Tensor, v_meta: torch.Tensor,
    k_window: torch.Tensor, v_window: torch.Tensor, k_rot: torch.Tensor, v_rot: torch.Tensor,
    sm_scale: float, fmt: OscarFormat, max_extend_len: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One chunk of prefill over the OSCAR-2 cache; same semantics as `reference.extend_attention`.

    q: [N, H_q, D], k_new, v_new: [N, H_kv, D] bf16/fp16 (not rotated; request b's chunk is rows
    qo_indptr[b]:qo_indptr[b+1]); its cached prefix is the slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]] (int32/int64) and its window rows start at
    window_starts[b]. Pool buffers as in `decode_attention_int2`. max_extend_len: a host int
    >= every chunk length (it sizes the grid). Returns out: [N, H_q, D] in q's dtype.
    """
    tokens, q_heads, d = q.shape
    kv_heads = check_pool(k_codes, k_meta, v_codes, v_meta, k_window, v_window, k_rot, v_rot, fmt)
    if d != fmt.head_dim or q_heads % kv_heads or q.stride(-1) != 1:
        raise ValueError(f"q must be [N, H_q, {fmt.head_dim}] with H_q a multiple of {kv_heads}, got {tuple(q.shape)}")
    if k_new.shape != (tokens, kv_heads, d) or v_new.shape != k_new.shape or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError(f"k_new, v_new must be [{tokens}, {kv_heads}, {d}], got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    group = q_heads // kv_heads
    if group > BLOCK_M:
        raise ValueError(f"GQA group {group} exceeds BLOCK_M = {BLOCK_M}")
    if out is None:
        out = torch.empty_like(q)
    batch = qo_indptr.shape[0] - 1
    if tokens == 0 or batch == 0 or max_extend_len == 0:
        return out
    k_rot, k_rot_stride = rot_arg(k_rot)
    v_rot, v_rot_stride = rot_arg(v_rot)
    k_meta, v_meta = meta_words(k_meta), meta_words(v_meta)
    grid = (batch, kv_heads, triton.cdiv(max_extend_len, BLOCK_M // group))
    _extend_kernel[grid](
        q, q.stride(0), q.stride(1),
        k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        qo_indptr, kv_indptr, kv_indices, window_starts,
        k_codes, v_codes, k_codes.stride(0), k_codes.stride(1),
        k_meta, v_meta, k_meta.stride(0), k_meta.stride(1),
        k_window, v_window, k_window.stride(0), k_window.stride(1),
        k_rot, k_rot_stride, v_rot, v_rot_stride,
        out, out.stride(0), out.stride(1), sm_scale * LOG2E,
        GROUP=group, BLOCK_M=BLOCK_M, D=d, NG=fmt.num_groups,
        S=fmt.sink_tokens, W=fmt.recent_tokens, BLOCK_N=BLOCK_PREFIX, BLOCK_R=BLOCK_ROWS,
        BLOCK_C=BLOCK_CHUNK, CODE_BITS=CODE_BITS, CODE_MAX=CODE_MAX,
        PTX_UNPACK=not triton.knobs.runtime.interpret, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS,
    )
    return out
