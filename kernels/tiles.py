"""@triton.jit tile helpers of the decode and extend kernels (decode.py, extend.py): reading 2-bit
code planes (2-bit values, 2-, 3- or 4-bit keys) without dequantizing them (see decode.py's docstring for the arithmetic), the BF16 window
rows, online softmax, and the rotations in and out of the rotated space."""

import triton
import triton.language as tl

from .format import CODE_BITS, CODE_MAX, CODES_PER_BYTE, META_BYTES, META_FIELDS

assert CODES_PER_BYTE == 4, "the kernels keep one accumulator per quarter slice of a packed byte"
assert META_FIELDS * META_BYTES == 4, "the kernels read a group's (scale, minimum) as one 32-bit word"


def unpack_ptx(s: int) -> str:
    """PTX turning 4 packed bytes ($2) into quarter slice s as two f16x2 ($0, $1) holding the
    fp16 subnormals c·4^s·2^-24 (exact: the code bits land in the mantissa, exponent field 0):
    prmt moves bytes 0,1 (2,3) into the low halves of the 16-bit lanes and an and keeps the
    slice's bits in place. Two instructions per two codes, the prmt shared by the four slices."""
    shift = CODE_BITS * s
    assert (CODE_MAX << shift) < 1024, "codes must stay inside the fp16 mantissa"
    mask = (CODE_MAX << shift) * 0x00010001  # both 16-bit lanes
    lines = ["{", ".reg .b32 t;"]
    for out, select in ((0, 0x4140), (1, 0x4342)):
        lines += [f"prmt.b32 t, $2, 0, {select:#06x};", f"and.b32 ${out}, t, {mask:#010x};"]
    return "\n".join(lines + ["}"])


UNPACK_PTX_0 = tl.constexpr(unpack_ptx(0))
UNPACK_PTX_1 = tl.constexpr(unpack_ptx(1))
UNPACK_PTX_2 = tl.constexpr(unpack_ptx(2))
UNPACK_PTX_3 = tl.constexpr(unpack_ptx(3))
CODE_UNIT = tl.constexpr(2.0 ** 24)  # 1 / the value of fp16 mantissa bit 0 (a subnormal)


@triton.jit
def pick(s: tl.constexpr, x0, x1, x2, x3):
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
def rotate_slice(x_ptrs, x_mask, rot_ptr, s, D: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr):
    """x_ptrs: [M, 1] pointers to rows of x (D contiguous bf16/fp16 values), rot_ptr -> R [D, D]
    fp32: slice s of x · R, i.e. x · R[:, sP:(s+1)P], fp32 [M, P].

    A bf16/fp16 x converts to fp16 exactly (any |x| in fp16's normal range, [6e-5, 65504]) and R
    is split into fp16 hi + lo parts, so two fp16 tensor-core dots give ~fp32 accuracy (2^-20).
    The reduction runs over CHUNK-wide pieces of R: CHUNK = D loads R's slice in one round trip
    to memory (a lone program), smaller chunks keep registers low (many rows per program)."""
    acc = tl.zeros([x_ptrs.shape[0], P], tl.float32)
    k = tl.arange(0, CHUNK)
    for k0 in tl.range(0, D, CHUNK, num_stages=1):
        x = tl.load(x_ptrs + k0 + k[None, :], mask=x_mask, other=0.0).to(tl.float32).to(tl.float16)
        r = tl.load(rot_ptr + (k0 + k)[:, None] * D + s * P + tl.arange(0, P)[None, :])
        r_hi = r.to(tl.float16)
        acc = tl.dot(x, r_hi, acc)
        acc = tl.dot(x, (r - r_hi.to(tl.float32)).to(tl.float16), acc)
    return acc


@triton.jit
def unrotate(a0, a1, a2, a3, rot_ptr, D: tl.constexpr, P: tl.constexpr):
    """o' given as four slices a_s: [M, P] fp32 (dims sP..(s+1)P) -> o' · Rᵀ, fp32 [M, D]."""
    cols = tl.arange(0, D)[None, :] * D + tl.arange(0, P)[:, None]  # Rᵀ[sP + i, j] = R[j, sP + i]
    out = tl.dot(a0, tl.load(rot_ptr + cols), input_precision="tf32x3")
    out += tl.dot(a1, tl.load(rot_ptr + P + cols), input_precision="tf32x3")
    out += tl.dot(a2, tl.load(rot_ptr + 2 * P + cols), input_precision="tf32x3")
    out += tl.dot(a3, tl.load(rot_ptr + 3 * P + cols), input_precision="tf32x3")
    return out


@triton.jit
def code_slice(codes, s: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
                PTX_UNPACK: tl.constexpr):
    """codes: [N, P] uint8 -> quarter slice s as the fp16 subnormals c·4^s·2^-24 (exact).
    PTX_UNPACK (GPU) works on four packed bytes per instruction; the plain path is what the
    Triton interpreter can run."""
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
        c = (codes & (CODE_MAX << (CODE_BITS * s))).to(tl.uint16).to(tl.float16, bitcast=True)
    return c


@triton.jit
def load_meta_words(meta_ptr, slot, valid, stride_ms, NG: tl.constexpr):
    """meta_ptr: one head's meta viewed as 32-bit words [slots, ·, NG] (the fp16 pair scale,
    minimum: scale in the low half) -> words [N] when NG == 1, else [N, NG]. One word per load
    keeps the loads wide enough for the pipeliner's async copies."""
    if NG == 1:
        word = tl.load(meta_ptr + slot * stride_ms, mask=valid, other=0)
    else:
        word = tl.load(meta_ptr + slot[:, None] * stride_ms + tl.arange(0, NG)[None, :],
                       mask=valid[:, None], other=0)
    return word


@triton.jit
def group_meta(words, g: tl.constexpr, NG: tl.constexpr):
    """(scale, minimum) of group g as fp32 [N], from `load_meta_words`."""
    if NG == 1:
        w = words
    else:
        w = tl.sum(tl.where(tl.arange(0, NG)[None, :] == g, words, 0), axis=1)
    scale = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    minimum = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def online_softmax(m_i, l_i, scores):
    """One online-softmax step on scores: [M, N] fp32 (log2 domain, -inf = masked) ->
    (m_new, l_new, alpha [M] to rescale accumulators by, p [M, N]). Rows with nothing visible
    yet keep m = -inf and get alpha = p = 0 instead of NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(scores - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def nonzero(x):
    """x with zeros replaced by 1 (rows that saw nothing: their accumulators are 0 anyway)."""
    return tl.where(x > 0, x, 1.0)


@triton.jit
def load_key_codes(row_ptrs, valid, P: tl.constexpr, KEY_BITS: tl.constexpr):
    """row_ptrs: [N, 1] pointers to key code rows (kernels.format) -> (kc, kc_hi): [N, P] uint8,
    the low 2-bit plane and the high plane read as a quartered 2-bit plane (kc itself for 2-bit
    keys). A 3-bit key's paired plane of P/2 bytes is split into its even and odd bits, which
    interleave into the quartered plane's bytes 2i and 2i + 1."""
    cols = tl.arange(0, P)[None, :]
    kc = tl.load(row_ptrs + cols, mask=valid[:, None], other=0)
    kc_hi = kc
    if KEY_BITS == 4:
        kc_hi = tl.load(row_ptrs + P + cols, mask=valid[:, None], other=0)
    elif KEY_BITS == 3 and P >= 32:
        paired = tl.load(row_ptrs + P + tl.arange(0, P // 2)[None, :], mask=valid[:, None], other=0)
        # uint8 again: the PTX unpacking reads four packed bytes per 32-bit register
        kc_hi = tl.reshape(tl.join(paired & 0x55, (paired >> 1) & 0x55), (paired.shape[0], P)).to(tl.uint8)
    elif KEY_BITS == 3:
        # head_dim 64: the join above gave wrong scores on an H100 (the interpreter computes it
        # right), so each quartered byte loads its paired byte itself (byte loads: slower)
        paired = tl.load(row_ptrs + P + cols // 2, mask=valid[:, None], other=0)
        kc_hi = ((paired >> (cols % 2)) & 0x55).to(tl.uint8)
    return kc, kc_hi


@triton.jit
def key_slice(kc, kc_hi, s: tl.constexpr, KEY_BITS: tl.constexpr, CODE_BITS: tl.constexpr,
              CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr):
    """Quarter slice s of a key's codes as fp16 c·4^s·2^-24 [N, P]: kc alone (2-bit keys), or
    c_0 + 4·c_1 from kc and kc_hi (`load_key_codes`; c·4^s < 1024 keeps every value an exact fp16
    subnormal)."""
    c = code_slice(kc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)
    if KEY_BITS > 2:
        c = (c + code_slice(kc_hi, s, CODE_BITS, CODE_MAX, PTX_UNPACK) * 4.0).to(tl.float16)
    return c


@triton.jit
def int2_tile(
    m_i, l_i, a0, a1, a2, a3, am0, am1, am2, am3,
    q0, q1, q2, q3, qs0, qs1, qs2, qs3,
    kc, kc_hi, vc, kw, vw, valid,
    NG: tl.constexpr, KEY_BITS: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
    PTX_UNPACK: tl.constexpr,
):
    """One tile of quantized positions: key codes kc, kc_hi (`load_key_codes`), value codes
    vc [N, P] uint8, meta words kw, vw (`load_meta_words`), valid [N].
    q_s: fp16 [M, P] holding q'_s·4^-s; qs_s: [M] Σ q'_s; a_s: accumulators of o'_s·4^s·2^-24;
    am_g: [M] Σ p·minimum of value group g (added to the dims of g at the end)."""
    SPG: tl.constexpr = 4 // NG  # quarter slices per quantization group (G >= D/4 always)
    # scores = Σ_g scale_g · Σ_{s∈g} q'_s·c_s + min_g · Σ_{s∈g} Σ q'_s
    for g in tl.static_range(NG):
        s = g * SPG
        dots = tl.dot(pick(s, q0, q1, q2, q3),
                      tl.trans(key_slice(kc, kc_hi, s, KEY_BITS, CODE_BITS, CODE_MAX, PTX_UNPACK)))
        qsum = pick(s, qs0, qs1, qs2, qs3)
        for t in tl.static_range(1, SPG):
            s = g * SPG + t
            dots = tl.dot(pick(s, q0, q1, q2, q3),
                          tl.trans(key_slice(kc, kc_hi, s, KEY_BITS, CODE_BITS, CODE_MAX, PTX_UNPACK)), dots)
            qsum += pick(s, qs0, qs1, qs2, qs3)
        k_scale, k_min = group_meta(kw, g, NG)
        part = dots * (k_scale * CODE_UNIT)[None, :] + qsum[:, None] * k_min[None, :]
        if g == 0:
            scores = part
        else:
            scores += part
    scores = tl.where(valid[None, :], scores, float("-inf"))

    m_i, l_i, alpha, p = online_softmax(m_i, l_i, scores)
    a0 *= alpha[:, None]
    a1 *= alpha[:, None]
    a2 *= alpha[:, None]
    a3 *= alpha[:, None]
    am0 *= alpha
    am1 *= alpha
    am2 *= alpha
    am3 *= alpha
    # o'_s += (p · scale_g) @ c_s; the minimum's share goes to am_g
    for g in tl.static_range(NG):
        v_scale, v_min = group_meta(vw, g, NG)
        pg = (p * v_scale[None, :]).to(tl.float16)
        pm = tl.sum(p * v_min[None, :], axis=1)
        if g == 0:
            am0 += pm
        elif g == 1:
            am1 += pm
        elif g == 2:
            am2 += pm
        else:
            am3 += pm
        for t in tl.static_range(SPG):
            s = g * SPG + t
            c = code_slice(vc, s, CODE_BITS, CODE_MAX, PTX_UNPACK)
            if s == 0:
                a0 = tl.dot(pg, c, a0)
            elif s == 1:
                a1 = tl.dot(pg, c, a1)
            elif s == 2:
                a2 = tl.dot(pg, c, a2)
            else:
                a3 = tl.dot(pg, c, a3)
    return m_i, l_i, a0, a1, a2, a3, am0, am1, am2, am3


@triton.jit
def int2_segment(
    m_i, l_i, a0, a1, a2, a3,
    q0, q1, q2, q3,
    idx_ptr, lo, hi,
    k_codes_ptr, v_codes_ptr, stride_kcs, stride_vcs, k_meta_ptr, v_meta_ptr, stride_ms,
    P: tl.constexpr, NG: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr, PTX_UNPACK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Attend to positions [lo, hi) read from the quantized pool, slots idx_ptr[pos].

    State: m_i, l_i: [M] fp32 (log2 domain), a_s: [M, P] fp32 accumulators of o' slices.
    q_s: [M, P] fp32 rotated, pre-scaled query slices. Code/meta pointers are offset to one KV
    head; key code rows as in kernels.format for KEY_BITS-bit keys. Returns the updated (m_i, l_i, a0..a3).
    """
    SPG: tl.constexpr = 4 // NG
    M: tl.constexpr = a0.shape[0]
    cols = tl.arange(0, P)
    # codes enter the dots as c·4^s·2^-24: K slices take 4^-s in q, V slices accumulate o'_s·4^s·2^-24
    qs0 = tl.sum(q0, axis=1)
    qs1 = tl.sum(q1, axis=1)
    qs2 = tl.sum(q2, axis=1)
    qs3 = tl.sum(q3, axis=1)
    q0 = q0.to(tl.float16)
    q1 = (q1 * 0.25).to(tl.float16)
    q2 = (q2 * 0.0625).to(tl.float16)
    q3 = (q3 * 0.015625).to(tl.float16)
    a0 *= 1.0 / CODE_UNIT
    a1 *= 4.0 / CODE_UNIT
    a2 *= 16.0 / CODE_UNIT
    a3 *= 64.0 / CODE_UNIT
    am0 = tl.zeros([M], tl.float32)
    am1 = tl.zeros([M], tl.float32)
    am2 = tl.zeros([M], tl.float32)
    am3 = tl.zeros([M], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi
        slot = tl.load(idx_ptr + pos, mask=valid, other=0).to(tl.int64)
        kc, kc_hi = load_key_codes(k_codes_ptr + slot[:, None] * stride_kcs, valid, P, KEY_BITS)
        vc = tl.load(v_codes_ptr + slot[:, None] * stride_vcs + cols[None, :], mask=valid[:, None], other=0)
        kw = load_meta_words(k_meta_ptr, slot, valid, stride_ms, NG)
        vw = load_meta_words(v_meta_ptr, slot, valid, stride_ms, NG)
        m_i, l_i, a0, a1, a2, a3, am0, am1, am2, am3 = int2_tile(
            m_i, l_i, a0, a1, a2, a3, am0, am1, am2, am3, q0, q1, q2, q3, qs0, qs1, qs2, qs3,
            kc, kc_hi, vc, kw, vw, valid, NG, KEY_BITS, CODE_BITS, CODE_MAX, PTX_UNPACK)
    a0 = a0 * CODE_UNIT + pick(0 // SPG, am0, am1, am2, am3)[:, None]
    a1 = a1 * (CODE_UNIT / 4) + pick(1 // SPG, am0, am1, am2, am3)[:, None]
    a2 = a2 * (CODE_UNIT / 16) + pick(2 // SPG, am0, am1, am2, am3)[:, None]
    a3 = a3 * (CODE_UNIT / 64) + pick(3 // SPG, am0, am1, am2, am3)[:, None]
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def window_segment(
    m_i, l_i, a0, a1, a2, a3,
    q0, q1, q2, q3,
    k_win_ptr, v_win_ptr, stride_ws, n_sink, rec_lo, rec_hi, row_lo, row_hi,
    P: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Attend to one request's BF16 window rows [row_lo, row_hi) (row_lo a multiple of BLOCK_R)
    of: sink rows [0, n_sink) and the recent positions [rec_lo, rec_hi) (held in ring rows
    S + (p - S) mod W; rec_hi - rec_lo <= W).

    State as in `int2_segment`; q_s: [M, P] fp32 rotated, pre-scaled query slices; window
    pointers are offset to the request's first row and to one KV head. BF16 rows are exact in
    tf32, so tf32 dots round only q' and p (to 11 significant bits, as the INT2 path's fp16 q'),
    and bf16 arithmetic, which the Triton interpreter cannot run, stays out of the kernel.
    """
    cols = tl.arange(0, P)
    # ring slot of the oldest recent position; slot j then holds the ((j - first) mod W)-th one
    first = (rec_lo - S) % W
    for r0 in tl.range(row_lo, row_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        nth = (r - S - first + W) % W
        valid = (r < row_hi) & tl.where(r < S, r < n_sink, nth < rec_hi - rec_lo)
        ptrs = r[:, None] * stride_ws + cols[None, :]
        scores = tl.zeros([a0.shape[0], BLOCK_R], tl.float32)
        for s in tl.static_range(4):
            k = tl.load(k_win_ptr + s * P + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.dot(pick(s, q0, q1, q2, q3), tl.trans(k), scores, input_precision="tf32")
        scores = tl.where(valid[None, :], scores, float("-inf"))

        m_i, l_i, alpha, p = online_softmax(m_i, l_i, scores)
        a0 = window_pv(a0 * alpha[:, None], p, v_win_ptr, ptrs, valid)
        a1 = window_pv(a1 * alpha[:, None], p, v_win_ptr + P, ptrs, valid)
        a2 = window_pv(a2 * alpha[:, None], p, v_win_ptr + 2 * P, ptrs, valid)
        a3 = window_pv(a3 * alpha[:, None], p, v_win_ptr + 3 * P, ptrs, valid)
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def window_pv(acc, p, v_ptr, ptrs, valid):
    """acc: [M, P] + p: [M, R] @ the BF16 value slice at v_ptr + ptrs: [R, P]."""
    v = tl.load(v_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    return tl.dot(p, v, acc, input_precision="tf32")
