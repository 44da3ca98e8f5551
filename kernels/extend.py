"""Extend (chunked-prefill) attention over the packed OSCAR-2 cache, in two launches.

1. `_gather_kv_kernel` builds a model-space BF16/FP16 K/V scratch [Σ (prefix + chunk), H_kv, D]
   holding, for request b from row scratch_indptr[b] = kv_indptr[b] + qo_indptr[b], its cached
   prefix and then its new chunk. Prefix positions the chunk reads from the window rows (the
   sinks and, with L = prefix + chunk, positions >= L - W) come from the request's BF16 rows,
   the others from INT2 codes; both are rotated back (· Rᵀ) there. The chunk's rows that hold a
   NaN or Inf become zeros, as the pool stores them.
2. Causal attention of the chunk's queries over the scratch, the mask aligned to each
   request's last key (query t of a chunk sees keys [0, prefix + t]): on CUDA, FlashInfer's
   ragged prefill (backend "auto": 20 % less time than this module's kernel, gather included, at 8
   requests × 35,840 cached × 1,024 new tokens on an H200; RESULTS.md, "Prefill with a cached
   prefix"); otherwise, and where a
   request's result must not depend on its batch, `_extend_attention_kernel`: program
   (i, h, b) handles BLOCK_M query rows of request b, (token, query head) pairs of KV head h's
   GQA group, so every K/V tile is loaded once for the whole group, with one online softmax
   over the prefix and then, causally, over the chunk.

Gathering once per chunk costs O(prefix + chunk) next to the attention's O(prefix · chunk), and
lets the attention loop run at 16-bit tensor-core speed instead of unpacking codes for every
query tile. The scratch needs 2 · H_kv · D · 2 bytes per token (Qwen3-8B: 4 KiB); callers bound
it by splitting large batches. Grids depend on shapes and host ints only.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode import LOG2E
from .format import CODE_BITS, CODE_MAX
from .layer_cache import LayerCache
from .quantize import nonfinite_rows
from .tiles import load_key_codes, nonzero, online_softmax, unrotate


@dataclass(frozen=True)
class ExtendLaunch:
    """Launch parameters of `extend_attention_int2`'s kernels; the defaults are the fastest
    measured (benchmarks/extend_kernels.py sweeps others through this class)."""

    block_m: int = 128  # query rows ((token, head) pairs) per attention program
    block_n: int = 64  # keys per attention tile (128-key tiles were 2 % faster on an H200, at 255 registers)
    num_warps: int = 8
    num_stages: int = 3  # software-pipelined K/V tiles of the attention loop (Triton's default on CUDA)
    gather_block_t: int = 64  # prefix + chunk positions per gather program
    gather_warps: int = 4


EXTEND_LAUNCH = ExtendLaunch()


# ----------------------------------------------------------------------------- 1. gather


@triton.jit
def _prefix_quarter(
    s: tl.constexpr, byte, byte_hi, from_window, slot, valid, meta_ptr, stride_ms, win_ptr, row, stride_ws,
    P: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
):
    """Rotated-space dims [sP, (s+1)P) of prefix positions: [T, P] fp32. byte, byte_hi: [T, P]
    uint8, the packed codes as `tiles.load_key_codes` reads them (quarter s sits at bit 2s; byte_hi
    only for BITS > 2); meta_ptr/win_ptr offset to one KV head."""
    code = ((byte >> (CODE_BITS * s)) & CODE_MAX).to(tl.float32)
    if BITS > 2:
        code += 4.0 * ((byte_hi >> (CODE_BITS * s)) & CODE_MAX).to(tl.float32)
    group = (s * P) // G  # G >= P, so a quarter lies inside one group
    int2_ok = valid & ~from_window
    scale = tl.load(meta_ptr + slot * stride_ms + 2 * group, mask=int2_ok, other=0.0).to(tl.float32)
    minimum = tl.load(meta_ptr + slot * stride_ms + 2 * group + 1, mask=int2_ok, other=0.0).to(tl.float32)
    cols = s * P + tl.arange(0, P)
    win = tl.load(win_ptr + row[:, None] * stride_ws + cols[None, :], mask=from_window[:, None], other=0.0)
    return tl.where(from_window[:, None], win.to(tl.float32), code * scale[:, None] + minimum[:, None])


# Index arrays reach the kernels as slices (a batch split into scratch-bounded groups): their
# alignment varies from launch to launch, and specializing on it compiled new variants mid-serving.
@triton.jit(do_not_specialize_on_alignment=["qo_indptr_ptr", "kv_indptr_ptr", "kv_indices_ptr", "window_starts_ptr"])
def _gather_kv_kernel(
    qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, window_starts_ptr,
    new_ptr, stride_nt, stride_nh,
    codes_ptr, stride_cs, stride_ch, meta_ptr, stride_ms, stride_mh,
    win_ptr, stride_ws, stride_wh, rot_ptr, stride_rh,
    out_ptr, stride_ot, stride_oh,
    D: tl.constexpr, G: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
    BITS: tl.constexpr, CODE_BITS: tl.constexpr, CODE_MAX: tl.constexpr,
):
    """Program (b, i, h): positions [i·BLOCK_T, (i+1)·BLOCK_T) of request b's prefix + chunk,
    KV head h, of one of K / V -> out[kv_indptr[b] + qo_indptr[b] + position, h] in the model's
    space and out's dtype; new_ptr: that one's new rows [N, H_kv, D]."""
    P: tl.constexpr = D // 4
    b = tl.program_id(0)
    hk = tl.program_id(2)
    kv_lo = tl.load(kv_indptr_ptr + b)
    prefix = tl.load(kv_indptr_ptr + b + 1) - kv_lo
    q_lo = tl.load(qo_indptr_ptr + b)
    chunk = tl.load(qo_indptr_ptr + b + 1) - q_lo
    pos0 = tl.program_id(1) * BLOCK_T
    pos = pos0 + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, D)
    out_rows = out_ptr + (kv_lo + q_lo + pos).to(tl.int64)[:, None] * stride_ot + hk * stride_oh + dims[None, :]
    if pos0 < prefix:
        length = prefix + chunk
        start = tl.minimum(S, length)
        end = tl.maximum(start, length - W)
        valid = pos < prefix
        from_window = valid & ((pos < start) | (pos >= end))
        row = tl.load(window_starts_ptr + b).to(tl.int64) + tl.where(pos < S, pos, S + (pos - S) % W)
        slot = tl.load(kv_indices_ptr + kv_lo + pos, mask=valid, other=0).to(tl.int64)
        pool_head = hk.to(tl.int64)  # the pool is head-major: head offsets pass 2^31 bytes
        byte, byte_hi = load_key_codes(codes_ptr + slot[:, None] * stride_cs + pool_head * stride_ch,
                                       valid & ~from_window, P, BITS)
        meta = meta_ptr + pool_head * stride_mh
        win = win_ptr + hk * stride_wh
        x0 = _prefix_quarter(0, byte, byte_hi, from_window, slot, valid, meta, stride_ms, win, row, stride_ws,
                             P, G, BITS, CODE_BITS, CODE_MAX)
        x1 = _prefix_quarter(1, byte, byte_hi, from_window, slot, valid, meta, stride_ms, win, row, stride_ws,
                             P, G, BITS, CODE_BITS, CODE_MAX)
        x2 = _prefix_quarter(2, byte, byte_hi, from_window, slot, valid, meta, stride_ms, win, row, stride_ws,
                             P, G, BITS, CODE_BITS, CODE_MAX)
        x3 = _prefix_quarter(3, byte, byte_hi, from_window, slot, valid, meta, stride_ms, win, row, stride_ws,
                             P, G, BITS, CODE_BITS, CODE_MAX)
        x = unrotate(x0, x1, x2, x3, rot_ptr + hk * stride_rh, D, P)
        tl.store(out_rows, x.to(out_ptr.dtype.element_ty), mask=valid[:, None])
    if pos0 + BLOCK_T > prefix and pos0 < prefix + chunk:
        new = (pos >= prefix) & (pos < prefix + chunk)
        x = tl.load(new_ptr + (q_lo + pos - prefix).to(tl.int64)[:, None] * stride_nt + hk * stride_nh + dims[None, :],
                    mask=new[:, None], other=0.0)
        tl.store(out_rows, tl.where(nonfinite_rows(x)[:, None], 0.0, x).to(out_ptr.dtype.element_ty), mask=new[:, None])


# ----------------------------------------------------------------------------- 2. attention


@triton.jit
def _dot(a, b, acc, NATIVE_DOT: tl.constexpr):
    """acc + a @ b, b a 16-bit K or V tile. NATIVE_DOT (GPU): a is rounded to b's dtype and the
    tensor cores run 16-bit, as in flash attention. Otherwise (the Triton interpreter, whose
    bf16 dot is wrong) both go to fp32: tf32 is exact for 16-bit inputs, p keeps fp32."""
    if NATIVE_DOT:
        return tl.dot(a.to(b.dtype), b, acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_ptrs, v_ptrs, key_ok, visible, qk_scale, NATIVE_DOT: tl.constexpr,
                 MASKED: tl.constexpr):
    """One online-softmax step over a K/V tile. q: [M, D] 16-bit; k_ptrs, v_ptrs: [N, D]
    pointers, key_ok: [N, 1] which to load; visible: [M or 1, N] bool. MASKED = False: every
    key exists and every row sees it (key_ok and visible unused), so the tile is loaded and
    scored without predicates. Returns (m_i, l_i, acc)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok, other=0.0)
    else:
        k = tl.load(k_ptrs)
    scores = _dot(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), tl.float32), NATIVE_DOT) * qk_scale
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))
    m_i, l_i, alpha, p = online_softmax(m_i, l_i, scores)
    if MASKED:
        v = tl.load(v_ptrs, mask=key_ok, other=0.0)
    else:
        v = tl.load(v_ptrs)
    return m_i, l_i, _dot(p, v, acc * alpha[:, None], NATIVE_DOT)


@triton.jit
def _scratch_offsets(rows, hk, stride_kt, stride_kh, dims):
    """[N, D] offsets of scratch rows `rows` [N], KV head hk."""
    return rows.to(tl.int64)[:, None] * stride_kt + hk * stride_kh + dims[None, :]


@triton.jit(do_not_specialize_on_alignment=["qo_indptr_ptr", "kv_indptr_ptr"])
def _extend_attention_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, v_ptr, stride_kt, stride_kh,
    qo_indptr_ptr, kv_indptr_ptr,
    out_ptr, stride_ot, stride_oh, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    """k_ptr, v_ptr: the gathered scratch (launch 1), request b's prefix and then its chunk."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # chunk tokens per program
    tok0 = tl.program_id(0) * TOKENS
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_lo = tl.load(qo_indptr_ptr + b)
    n = tl.load(qo_indptr_ptr + b + 1) - q_lo
    if tok0 < n:
        rows = tl.arange(0, BLOCK_M)
        tok = tok0 + rows // GROUP
        head = hk * GROUP + rows % GROUP
        row_ok = (rows < TOKENS * GROUP) & (tok < n)
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + (q_lo + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
                    + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)

        kv_lo = tl.load(kv_indptr_ptr + b)
        prefix = tl.load(kv_indptr_ptr + b + 1) - kv_lo
        first = kv_lo + q_lo  # the request's first scratch row
        # the whole cached prefix is visible: whole tiles without predicates, then the rest
        full = prefix // BLOCK_N * BLOCK_N
        for j0 in tl.range(0, full, BLOCK_N):
            key = _scratch_offsets(first + j0 + tl.arange(0, BLOCK_N), hk, stride_kt, stride_kh, dims)
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + key, v_ptr + key, None, None, qk_scale,
                                         NATIVE_DOT, False)
        if full < prefix:
            j = full + tl.arange(0, BLOCK_N)
            key = _scratch_offsets(first + j, hk, stride_kt, stride_kh, dims)
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + key, v_ptr + key, (j < prefix)[:, None],
                                         (j < prefix)[None, :], qk_scale, NATIVE_DOT, True)
        # token t sees chunk keys [0, t]: whole tiles below this program's first token, then the
        # tiles its tokens see in part
        chunk_first = first + prefix
        below = tl.minimum(tok0 + 1, n) // BLOCK_N * BLOCK_N
        for j0 in tl.range(0, below, BLOCK_N):
            key = _scratch_offsets(chunk_first + j0 + tl.arange(0, BLOCK_N), hk, stride_kt, stride_kh, dims)
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + key, v_ptr + key, None, None, qk_scale,
                                         NATIVE_DOT, False)
        for j0 in tl.range(below, tl.minimum(tok0 + TOKENS, n), BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            key = _scratch_offsets(chunk_first + j, hk, stride_kt, stride_kh, dims)
            visible = (j[None, :] <= tok[:, None]) & (j[None, :] < n)
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + key, v_ptr + key, (j < n)[:, None], visible,
                                         qk_scale, NATIVE_DOT, True)

        out = acc / nonzero(l_i)[:, None]
        tl.store(out_ptr + (q_lo + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- host side


def gather_kv(
    qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
    k_new: torch.Tensor, v_new: torch.Tensor, cache: LayerCache, max_extend_len: int, max_prefix_len: int,
    dtype: torch.dtype, launch: ExtendLaunch = EXTEND_LAUNCH,
) -> torch.Tensor:
    """The chunk's requests' keys and values in the model's space (launch 1 of the module
    docstring). Arguments as for `extend_attention_int2`. Returns kv: [2 (K, V), Σ (prefix +
    chunk), H_kv, D] of `dtype`, request b's prefix and then its chunk from row
    kv_indptr[b] + qo_indptr[b]."""
    fmt, kv_heads, d = cache.fmt, cache.kv_heads, cache.fmt.head_dim
    batch = qo_indptr.shape[0] - 1
    kv = torch.empty(2, kv_indices.shape[0] + k_new.shape[0], kv_heads, d, dtype=dtype, device=k_new.device)
    if batch == 0 or max_prefix_len + max_extend_len == 0:
        return kv
    grid = (batch, triton.cdiv(max_prefix_len + max_extend_len, launch.gather_block_t), kv_heads)
    for kind, new, codes, meta, window, dest in (
            ("k", k_new, cache.k_codes, cache.k_meta, cache.k_window, kv[0]),
            ("v", v_new, cache.v_codes, cache.v_meta, cache.v_window, kv[1])):
        rot, rot_stride = cache.rotation(kind)
        _gather_kv_kernel[grid](
            qo_indptr, kv_indptr, kv_indices, window_starts,
            new, new.stride(0), new.stride(1),
            codes, codes.stride(0), codes.stride(1), meta, meta.stride(0), meta.stride(1),
            window, window.stride(0), window.stride(1), rot, rot_stride,
            dest, dest.stride(0), dest.stride(1),
            D=d, G=fmt.group_size, S=fmt.sink_tokens, W=fmt.recent_tokens, BLOCK_T=launch.gather_block_t,
            BITS=fmt.code_bits(kind), CODE_BITS=CODE_BITS, CODE_MAX=CODE_MAX, num_warps=launch.gather_warps,
        )
    return kv


def flashinfer_extend_wrapper(workspace: torch.Tensor):
    """A FlashInfer ragged prefill wrapper for `extend_attention_int2(flashinfer=...)`.
    workspace: uint8 CUDA buffer (FlashInfer recommends 128 MiB), which wrappers run one after
    another may share."""
    import flashinfer

    return flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")


def plan_flashinfer_extend(wrapper, extend_lens: list[int], prefix_lens: list[int], q_heads: int, kv_heads: int,
                           head_dim: int, sm_scale: float, dtype: torch.dtype):
    """Plan `wrapper` for one `extend_attention_int2` call: causal over each request's gathered
    prefix + chunk (FlashInfer aligns the mask to the last key). Host lists, so planning does not
    wait for the GPU; a plan serves every layer of a forward. Returns the wrapper."""
    qo_indptr = torch.tensor([0, *extend_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    scratch_indptr = qo_indptr + torch.tensor([0, *prefix_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    wrapper.plan(qo_indptr, scratch_indptr, q_heads, kv_heads, head_dim, causal=True, sm_scale=sm_scale,
                 q_data_type=dtype)
    return wrapper


def extend_attention_int2(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
    window_starts: torch.Tensor, cache: LayerCache, sm_scale: float, max_extend_len: int, max_prefix_len: int,
    out: torch.Tensor | None = None, flashinfer=None, launch: ExtendLaunch = EXTEND_LAUNCH,
) -> torch.Tensor:
    """One chunk of prefill over the OSCAR-2 cache; same semantics as `reference.extend_attention`.

    q: [N, H_q, D], k_new, v_new: [N, H_kv, D] bf16/fp16 (not rotated; request b's chunk is rows
    qo_indptr[b]:qo_indptr[b+1]); its cached prefix is the slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]] (int32/int64) and its window rows start at
    window_starts[b]; cache: the layer's pool buffers. max_extend_len,
    max_prefix_len: host ints >= every chunk / prefix length (they size the grids). flashinfer:
    a wrapper planned for these lengths by `plan_flashinfer_extend` (then it attends), or None
    (`_extend_attention_kernel`). Allocates a scratch of 2 · (len(kv_indices) + N) · H_kv · D
    values of q's dtype.
    Returns out: [N, H_q, D] in q's dtype.
    """
    tokens, q_heads, d = q.shape
    fmt, kv_heads = cache.fmt, cache.kv_heads
    if d != fmt.head_dim or q_heads % kv_heads or q.stride(-1) != 1:
        raise ValueError(f"q must be [N, H_q, {fmt.head_dim}] with H_q a multiple of {kv_heads}, got {tuple(q.shape)}")
    if (k_new.shape != (tokens, kv_heads, d) or v_new.shape != k_new.shape or k_new.stride(-1) != 1
            or v_new.stride(-1) != 1):
        raise ValueError(f"k_new, v_new must be [{tokens}, {kv_heads}, {d}], "
                         f"got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    group = q_heads // kv_heads
    if group > launch.block_m:
        raise ValueError(f"GQA group {group} exceeds ExtendLaunch.block_m = {launch.block_m}")
    if out is None:
        out = torch.empty_like(q)
    batch = qo_indptr.shape[0] - 1
    if tokens == 0 or batch == 0 or max_extend_len == 0:
        return out
    kv = gather_kv(qo_indptr, kv_indptr, kv_indices, window_starts, k_new, v_new, cache, max_extend_len,
                   max_prefix_len, q.dtype, launch)
    if flashinfer is not None:
        return flashinfer.run(q, kv[0], kv[1], out=out)
    _extend_attention_kernel[(triton.cdiv(max_extend_len, launch.block_m // group), kv_heads, batch)](
        q, q.stride(0), q.stride(1),
        kv[0], kv[1], kv.stride(1), kv.stride(2),
        qo_indptr, kv_indptr,
        out, out.stride(0), out.stride(1), sm_scale * LOG2E,
        GROUP=group, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, D=d,
        NATIVE_DOT=not triton.knobs.runtime.interpret, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
