"""Plain-PyTorch reference of the OSCAR-2 format and of attention over it: the oracle of every
Triton kernel in this package. Slow, float32, no cleverness.

Rounding: code = floor((x - m) / s + 1/2), so a value exactly half-way between two levels
rounds up. Scale and minimum are rounded to fp16 first and the codes are computed against the
rounded grid, so dequantization reproduces what the quantizer aimed at.

Non-finite rows: a (token, head) row holding any NaN or Inf after rotation stores codes 0,
scale 0 and minimum 0 (and zeros in its BF16 window copy), so it dequantizes to an all-zero
vector: its key scores 0 and its value adds nothing. No other row is affected.
"""

import torch

from .format import CODE_BITS, CODE_MAX, CODES_PER_BYTE, OscarFormat
from .layer_cache import LayerCache


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D], rot: [H or 1, D, D] -> x · rot[h] per head, float32 [T, H, D]."""
    return torch.einsum("thd,hde->the", x.float(), rot.float().expand(x.shape[1], -1, -1))


def unrotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate` for orthogonal rot: x · rot[h]ᵀ, float32 [T, H, D]."""
    return torch.einsum("the,hde->thd", x.float(), rot.float().expand(x.shape[1], -1, -1))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [..., D] -> [..., 1] bool, True where every value of the row is finite."""
    return torch.isfinite(x).all(dim=-1, keepdim=True)


def zero_nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [..., D] with the rows that hold a NaN or Inf replaced by zeros."""
    return torch.where(finite_rows(x), x, 0.0)


def clip_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clip each row of x: [..., D] at tau = the `ratio`-quantile of |x| over that row
    (linear interpolation, as torch.quantile). Returns float32."""
    x = x.float()
    tau = torch.quantile(x.abs(), ratio, dim=-1, keepdim=True)
    return torch.maximum(torch.minimum(x, tau), -tau)


def pack_int2_quartered(codes: torch.Tensor) -> torch.Tensor:
    """codes: [..., D] integers in 0..3 -> [..., D/4] uint8; byte j holds dims j, j+D/4,
    j+2D/4, j+3D/4 in bits [1:0], [3:2], [5:4], [7:6]."""
    quarters = codes.to(torch.uint8).chunk(CODES_PER_BYTE, dim=-1)
    packed = torch.zeros_like(quarters[0])
    for i, part in enumerate(quarters):
        packed |= part << (2 * i)
    return packed


def unpack_int2_quartered(packed: torch.Tensor) -> torch.Tensor:
    """packed: [..., D/4] uint8 -> codes [..., D] uint8 (inverse of pack_int2_quartered)."""
    return torch.cat([(packed >> (2 * i)) & CODE_MAX for i in range(CODES_PER_BYTE)], dim=-1)


def pack_bit_paired(bits: torch.Tensor) -> torch.Tensor:
    """bits: [..., D] integers in 0..1 -> [..., D/8] uint8: the quartered plane h of the bits
    with bytes 2i and 2i + 1 merged into byte i as h_2i | h_2i+1 << 1."""
    h = pack_int2_quartered(bits)
    return h[..., 0::2] | h[..., 1::2] << 1


def unpack_bit_paired(packed: torch.Tensor) -> torch.Tensor:
    """packed: [..., D/8] uint8 -> bits [..., D] uint8 (inverse of pack_bit_paired)."""
    h = torch.stack([packed & 0x55, (packed >> 1) & 0x55], dim=-1).flatten(-2)
    return unpack_int2_quartered(h)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [..., D] integers in 0..2^bits - 1 -> [..., bits · D/8] uint8 (kernels.format): bits
    [1:0] quartered, then bits [3:2] quartered (4-bit codes) or bit 2 paired (3-bit codes)."""
    codes = codes.to(torch.uint8)
    packed = [pack_int2_quartered(codes & CODE_MAX)]
    if bits == 4:
        packed.append(pack_int2_quartered(codes >> CODE_BITS))
    elif bits == 3:
        packed.append(pack_bit_paired(codes >> CODE_BITS))
    return torch.cat(packed, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: [..., bits · D/8] uint8 -> codes [..., D] uint8."""
    low_bytes = packed.shape[-1] * CODE_BITS // bits
    codes = unpack_int2_quartered(packed[..., :low_bytes])
    high = packed[..., low_bytes:]
    if bits == 4:
        codes |= unpack_int2_quartered(high) << CODE_BITS
    elif bits == 3:
        codes |= unpack_bit_paired(high) << CODE_BITS
    return codes


def quantize(x: torch.Tensor, group_size: int, bits: int = CODE_BITS):
    """Asymmetric `bits`-bit quantization of groups of `group_size` consecutive dims.

    x: [..., D] float -> codes [..., bits · D/8] uint8 (pack_codes), scale [..., D/G] fp16,
    minimum [..., D/G] fp16. Constant groups get scale 0 and reconstruct exactly.
    """
    levels = (1 << bits) - 1
    groups = zero_nonfinite_rows(x.float()).unflatten(-1, (-1, group_size))
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    minimum = lo.half()
    scale = ((hi - lo) / levels).half()
    s, m = scale.float().unsqueeze(-1), minimum.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.floor((groups - m) * inv + 0.5).clamp(0, levels).flatten(-2)
    return pack_codes(codes, bits), scale, minimum


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int):
    """Inverse of quantize (the code width from codes' bytes against the D/G groups of scale):
    -> float32 [..., D]."""
    head_dim = scale.shape[-1] * group_size
    c = unpack_codes(codes, codes.shape[-1] * 8 // head_dim).float().unflatten(-1, (-1, group_size))
    return (c * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)).flatten(-2)


def encode_kv(x: torch.Tensor, rot: torch.Tensor, clip_ratio: float, fmt: OscarFormat, bits: int = CODE_BITS):
    """The whole write path for new tokens x: [T, H, D] (bf16/fp16), codes of `bits` bits
    (fmt.code_bits("k") for keys).

    Returns codes [T, H, bits · D/8] uint8, meta [T, H, D/G, 2] fp16 and the BF16 window copy
    [T, H, D] (rotated, unclipped; zeros for non-finite rows).
    """
    rotated = rotate(x, rot)
    codes, scale, minimum = quantize(clip_rows(rotated, clip_ratio), fmt.group_size, bits)
    window = zero_nonfinite_rows(rotated).to(torch.bfloat16)
    return codes, torch.stack([scale, minimum], dim=-1), window


def decode_kv(codes: torch.Tensor, meta: torch.Tensor, fmt: OscarFormat) -> torch.Tensor:
    """codes [..., bits · D/8], meta [..., D/G, 2] -> rotated-space float32 [..., D]."""
    return dequantize(codes, meta[..., 0], meta[..., 1], fmt.group_size)


def gather_rotated_kv(
    slots: torch.Tensor, window_start: int, visible_len: int,
    codes: torch.Tensor, meta: torch.Tensor, window: torch.Tensor, fmt: OscarFormat,
) -> torch.Tensor:
    """What a query sees of one sequence's cache, in rotated space.

    slots: [n] slot ids of positions 0..n-1 (n <= visible_len); window_start: the request's first
    window row; positions in `fmt.int2_span(visible_len)` come from the INT2 pool, the others
    from the request's BF16 window rows. Returns float32 [n, H, D].
    """
    n = slots.shape[0]
    out = decode_kv(codes[slots.long()], meta[slots.long()], fmt)
    start, end = fmt.int2_span(visible_len)
    for p in [*range(min(start, n)), *range(end, n)]:
        out[p] = window[fmt.window_row(window_start, p)].float()
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, mask=None):
    """q: [n, H_q, D], k, v: [L, H_kv, D] float32, mask: [n, L] bool (True = visible)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * sm_scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), v)


def sequence_kv(cache: LayerCache, slots: torch.Tensor, window_start: int, visible_len: int):
    """K and V of `slots` (positions 0..n-1) in the model's space, float32 [n, H_kv, D] each, as
    `gather_rotated_kv` reads them."""
    fmt = cache.fmt
    k = gather_rotated_kv(slots, window_start, visible_len, cache.k_codes, cache.k_meta, cache.k_window, fmt)
    v = gather_rotated_kv(slots, window_start, visible_len, cache.v_codes, cache.v_meta, cache.v_window, fmt)
    return unrotate(k, cache.k_rot), unrotate(v, cache.v_rot)


def decode_attention(q, kv_indptr, kv_indices, window_starts, cache: LayerCache, sm_scale: float) -> torch.Tensor:
    """One decode step. q: [B, H_q, D] (not rotated); request b sees the slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]] (positions 0..L-1, its new token last) and owns the
    window rows starting at window_starts[b] of one layer's `cache`.
    Returns float32 [B, H_q, D] in the model's (unrotated) space."""
    out = []
    for b in range(q.shape[0]):
        slots = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        k, v = sequence_kv(cache, slots, int(window_starts[b]), slots.shape[0])
        out.append(_attend(q[b:b + 1], k, v, sm_scale)[0])
    return torch.stack(out)


def extend_attention(
    q, k_new, v_new, qo_indptr, kv_indptr, kv_indices, window_starts, cache: LayerCache, sm_scale: float,
) -> torch.Tensor:
    """One chunk of prefill. Request b's new tokens are rows qo_indptr[b]:qo_indptr[b+1] of
    q: [N, H_q, D] and k_new, v_new: [N, H_kv, D] (not rotated, attended exactly and causally);
    its cached prefix is the slots kv_indices[kv_indptr[b]:kv_indptr[b+1]]. With L = prefix +
    chunk, prefix positions in `cache.fmt.int2_span(L)` come from INT2 and the others from the
    request's window rows (which hold the prefix's sinks and its last W positions). A chunk's
    non-finite K or V rows count as zeros, as the pool stores them. Returns float32 [N, H_q, D]."""
    out = []
    for b in range(len(qo_indptr) - 1):
        lo, hi = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        prefix, n = slots.shape[0], hi - lo
        k_pre, v_pre = sequence_kv(cache, slots, int(window_starts[b]), prefix + n)
        k = torch.cat([k_pre, zero_nonfinite_rows(k_new[lo:hi].float())])
        v = torch.cat([v_pre, zero_nonfinite_rows(v_new[lo:hi].float())])
        pos = torch.arange(prefix + n, device=q.device)
        visible = pos[None, :] <= pos[prefix:, None]
        out.append(_attend(q[lo:hi], k, v, sm_scale, visible))
    return torch.cat(out)
