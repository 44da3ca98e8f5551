"""Attention computed explicitly in float32, plugged into transformers through its own extension
point (AttentionInterface), so calibration and the accuracy harness run the stock model code.

All functions take the tensors a transformers attention function receives: query [B, H_q, L, D]
and key / value [B, H_kv, L, D], post-RoPE, for unpadded sequences without a KV cache (query
position i is sequence position i). Queries are processed in blocks of rows only to bound
memory; every (query, key) decision depends on positions alone, so results do not depend on the
block size.
"""

from contextlib import contextmanager

import torch
from transformers import AttentionInterface

DEFAULT_BLOCK = 256


@contextmanager
def attention_override(model, handler, name: str):
    """Run `model` with `handler(module, query, key, value, attention_mask, scaling, dropout,
    **kwargs) -> (output [B, L, H_q, D], weights or None)` as its attention function.

    The name is registered globally; the model's previous implementation is restored on exit.
    Registered names are not in transformers' mask-function table, so the model passes
    attention_mask=None and the handler applies the causal mask itself."""
    AttentionInterface.register(name, handler)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield handler
    finally:
        model.set_attn_implementation(previous)


def check_unpadded(query: torch.Tensor, key: torch.Tensor, attention_mask) -> None:
    """The handlers here assume full causal sequences without cache or padding."""
    if query.shape[2] != key.shape[2] or attention_mask is not None:
        raise ValueError("OSCAR attention simulation needs whole unpadded sequences "
                         "(use_cache=False, no attention_mask)")


def row_blocks(length: int, block: int = DEFAULT_BLOCK):
    """(start, end) of consecutive query blocks covering [0, length)."""
    for start in range(0, length, block):
        yield start, min(start + block, length)


def exact_columns(start: int, end: int, sink: int, recent: int) -> torch.Tensor:
    """Key positions that queries [start, end) may read exactly: [0, sink) and the recent band
    (start - recent, end). Sorted, disjoint, int64 [m]."""
    sinks = torch.arange(min(sink, end))
    band = torch.arange(max(sink, start - recent + 1, 0), end)
    return torch.cat([sinks, band])


def read_exact(rows: torch.Tensor, cols: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """bool [n, m]: whether query position rows[i] reads key position cols[j] exactly (a sink or
    within its last `recent` positions, itself included) rather than from the quantized cache."""
    return (cols[None, :] < sink) | (rows[:, None] - cols[None, :] < recent)


def _grouped(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H_q, L, D] -> [B, H_kv, G, L, D]: query heads of one KV group together (GQA)."""
    b, h, length, d = query.shape
    return query.reshape(b, num_kv_heads, h // num_kv_heads, length, d)


def _causal(start: int, end: int, device) -> torch.Tensor:
    """bool [n, end]: query position start + i sees key positions <= start + i."""
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


def windowed_attention(query, k_exact, k_quant, v_exact, v_quant, scaling: float,
                       sink: int, recent: int, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """What a decoding server computes for every position at once: query i reads key/value t
    from (k_exact, v_exact) when t < sink or i - t < recent, otherwise from (k_quant, v_quant).
    sink = recent = 0 reads everything from the quantized tensors.

    query [B, H_q, L, D]; k_*, v_* [B, H_kv, L, D]. Returns float32 [B, L, H_q, D]."""
    bsz, _, length, dim = query.shape
    heads_kv = k_quant.shape[1]
    q = _grouped(query.float(), heads_kv)
    k_quant, v_quant = k_quant.float(), v_quant.float()
    windowed = sink > 0 or recent > 0
    if windowed:
        k_exact = k_exact.float()
        v_delta = v_exact.float() - v_quant
    out = torch.empty_like(q)
    for start, end in row_blocks(length, block):
        qb = q[:, :, :, start:end]
        scores = torch.einsum("bhgnd,bhtd->bhgnt", qb, k_quant[:, :, :end]) * scaling
        if windowed:
            cols = exact_columns(start, end, sink, recent).to(query.device)
            sel = read_exact(torch.arange(start, end, device=query.device), cols, sink, recent)
            exact = torch.einsum("bhgnd,bhtd->bhgnt", qb, k_exact[:, :, cols]) * scaling
            scores[..., cols] = torch.where(sel, exact, scores[..., cols])
        probs = scores.masked_fill(~_causal(start, end, query.device), float("-inf")).softmax(-1)
        o = torch.einsum("bhgnt,bhtd->bhgnd", probs, v_quant[:, :, :end])
        if windowed:
            o += torch.einsum("bhgnt,bhtd->bhgnd", probs[..., cols] * sel, v_delta[:, :, cols])
        out[:, :, :, start:end] = o
    return out.reshape(bsz, -1, length, dim).transpose(1, 2)


def attention_with_key_mass(query, key, value, scaling: float, sink: int, recent: int,
                            block: int = DEFAULT_BLOCK):
    """Exact causal float32 attention and each key's squared attention mass from the queries
    that read it from the quantized cache:

        w[b, h, t] = sum over query heads g of group h and positions i with t >= sink and
                     i - t >= recent of p[b, h, g, i, t]^2

    Keys read exactly (sinks, recent window) contribute no quantization error, so their mass
    must not steer the value rotation (the attention sink alone would otherwise dominate it).

    query [B, H_q, L, D]; key, value [B, H_kv, L, D]. Returns (output float32 [B, L, H_q, D],
    w float32 [B, H_kv, L])."""
    bsz, _, length, dim = query.shape
    heads_kv = key.shape[1]
    q, key, value = _grouped(query.float(), heads_kv), key.float(), value.float()
    out = torch.empty_like(q)
    mass = torch.zeros(bsz, heads_kv, length, device=query.device)
    for start, end in row_blocks(length, block):
        scores = torch.einsum("bhgnd,bhtd->bhgnt", q[:, :, :, start:end], key[:, :, :end]) * scaling
        probs = scores.masked_fill(~_causal(start, end, query.device), float("-inf")).softmax(-1)
        out[:, :, :, start:end] = torch.einsum("bhgnt,bhtd->bhgnd", probs, value[:, :, :end])
        rows = torch.arange(start, end, device=query.device)
        cols = torch.arange(end, device=query.device)
        quantized = (cols[None, :] >= sink) & (rows[:, None] - cols[None, :] >= recent)
        mass[:, :, :end] += (probs.square() * quantized).sum(dim=(2, 3))
    return out.reshape(bsz, -1, length, dim).transpose(1, 2), mass
