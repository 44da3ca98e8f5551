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
EXACT_BLOCK = 64  # the exact region's width is sink + recent + block: small blocks keep it narrow


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
    """The handlers here assume whole causal sequences without cache or padding."""
    if query.shape[2] != key.shape[2] or attention_mask is not None:
        raise ValueError("OSCAR attention simulation needs whole unpadded sequences "
                         "(use_cache=False, no attention_mask)")


def row_blocks(length: int, block: int = DEFAULT_BLOCK):
    """(start, end) of consecutive query blocks covering [0, length)."""
    for start in range(0, length, block):
        yield start, min(start + block, length)


def _grouped(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H_q, L, D] -> [B, H_kv, G, L, D]: query heads of one KV group together (GQA)."""
    b, h, length, d = x.shape
    return x.reshape(b, num_kv_heads, h // num_kv_heads, length, d)


def _causal(start: int, end: int, device) -> torch.Tensor:
    """bool [n, end]: query position start + i sees key positions <= start + i."""
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


def windowed_attention(query, k_exact, k_quant, v_exact, v_quant, scaling: float,
                       sink: int, recent: int, block: int = EXACT_BLOCK) -> torch.Tensor:
    """What a decoding server computes for every position at once: query i reads key/value t
    from (k_exact, v_exact) when t < sink or i - t < recent, otherwise from (k_quant, v_quant);
    sink = recent = 0 reads everything from the quantized tensors.

    query [B, H_q, L, D]; k_*, v_* [B, H_kv, L, D]. Returns float32 [B, L, H_q, D]."""
    return merge_regions(quantized_region(query, k_quant, v_quant, scaling, sink, recent),
                         exact_region(query, k_exact, v_exact, scaling, sink, recent, block))


# A region is the attention of every query over a subset of its keys: (out [B, H_q, L, D]
# normalized over that subset, lse [B, H_q, L] its log-sum-exp; -inf and zeros for a query with
# no key there). Regions over disjoint key sets merge exactly through their log-sum-exps.

def merge_regions(*regions) -> torch.Tensor:
    """Attention over the union of disjoint regions: float32 [B, L, H_q, D]."""
    return _union(regions)[0].transpose(1, 2)


def _union(regions):
    """The region over the union of disjoint regions."""
    lse = torch.logsumexp(torch.stack([lse for _, lse in regions]), dim=0)
    finite = torch.where(torch.isinf(lse), 0.0, lse)
    return sum((part_lse - finite).exp()[..., None] * out for out, part_lse in regions), lse


def quantized_region(query, k, v, scaling: float, sink: int, recent: int):
    """Region of query i over keys [sink, i - recent] (the INT2 part as served). After shifting
    both axes this is an ordinary causal square: one fused call, no L x L mask."""
    q, k, v = query.float(), k.float(), v.float()
    bsz, heads, length, dim = q.shape
    out = q.new_zeros(bsz, heads, length, dim)
    lse = q.new_full((bsz, heads, length), float("-inf"))
    first = sink + recent  # first query with a quantized key
    if length <= first:
        return out, lse
    group = heads // k.shape[1]
    k = k[:, :, sink:length - recent].repeat_interleave(group, dim=1)
    v = v[:, :, sink:length - recent].repeat_interleave(group, dim=1)
    out[:, :, first:], lse[:, :, first:] = _attention_with_lse(q[:, :, first:], k, v, scaling)
    return out, lse


def _attention_with_lse(q, k, v, scaling):
    """Causal attention of equal-length q, k, v [B, H, n, D] -> (out, logsumexp [B, H, n])."""
    if q.device.type != "cpu":
        return attention_with_lse_blocked(q, k, v, scaling)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scaling)
    return out, lse


def attention_with_lse_blocked(q, k, v, scaling):
    """Device-independent `_attention_with_lse` (GPUs have no fused float32 kernel returning the
    log-sum-exp), in row blocks so memory stays O(block x n)."""
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
    for start, end in row_blocks(q.shape[2]):
        scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~_causal(start, end, q.device), float("-inf"))
        out[:, :, start:end], lse[:, :, start:end] = _normalized(scores, v[:, :, :end])
    return out, lse


def _normalized(scores, v):
    """Softmax-weighted values and the log-sum-exp of scores [..., n, m] over v [..., m, D];
    rows with every score -inf give zeros and -inf."""
    lse = scores.logsumexp(-1)
    finite = torch.where(torch.isinf(lse), 0.0, lse)
    return (scores - finite[..., None]).exp() @ v, lse


def exact_region(query, k, v, scaling: float, sink: int, recent: int, block: int = EXACT_BLOCK):
    """Region of query i over keys t < sink or i - recent < t <= i (the BF16 windows as served):
    the sinks for all queries at once, the recent band in blocks of `block` query rows over
    contiguous key slices (each block's band is at most block + recent - 1 wide)."""
    q, k, v = query.float(), k.float(), v.float()
    length = q.shape[2]
    qg = _grouped(q, k.shape[1])  # [B, H_kv, G, L, D]
    kg, vg = k[:, :, None], v[:, :, None]  # broadcast over the query heads of a group
    regions = []
    if sink:
        s = min(sink, length)
        scores = (qg @ kg[..., :s, :].transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~_causal(0, length, q.device)[:, :s], float("-inf"))
        regions.append(_normalized(scores, vg[..., :s, :]))
    if recent:
        out, lse = torch.zeros_like(qg), qg.new_full(qg.shape[:-1], float("-inf"))
        for start, end in row_blocks(length, block):
            lo = min(max(sink, start - recent + 1), end)  # band keys: [lo, end), never a sink
            rows = torch.arange(start, end, device=q.device)[:, None]
            cols = torch.arange(lo, end, device=q.device)[None, :]
            scores = (qg[..., start:end, :] @ kg[..., lo:end, :].transpose(-1, -2)) * scaling
            scores = scores.masked_fill((cols > rows) | (rows - cols >= recent), float("-inf"))
            out[..., start:end, :], lse[..., start:end] = _normalized(scores, vg[..., lo:end, :])
        regions.append((out, lse))
    if not regions:
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"))
    return _union([(out.reshape(q.shape), lse.reshape(q.shape[:-1])) for out, lse in regions])


def key_divergences(query, key, key_quant, scaling: float, sink: int, recent: int, exact_lse,
                    block: int = DEFAULT_BLOCK) -> tuple[float, float]:
    """How reading keys from INT2 changes attention distributions, summed over batch, query
    heads and query positions. For query i, p is its exact attention distribution and p̂ the
    same with the keys it reads from INT2 (positions [sink, i - recent]) taken from `key_quant`:

    - attention KL: KL(p || p̂);
    - peak KL: the term of KL(p || p̂) of the INT2 key with the largest exact score,
      p_top · log(p_top / p̂_top): the share of the divergence that a query singling out one
      key far back (a retrieval) loses on that key. Diffuse queries contribute little to it,
      so it is not dominated by the many queries whose attention averages similar values.

    Both depend on keys only. query [B, H_q, L, D]; key, key_quant [B, H_kv, L, D];
    exact_lse [B, H_q, L]: the log-sum-exp of the exact windows' scores (exact_region's).
    Returns (attention KL sum, peak KL sum)."""
    q = query.float()
    length = q.shape[2]
    first = sink + recent  # first query with a quantized key
    if length <= first:
        return 0.0, 0.0
    group = q.shape[1] // key.shape[1]
    k = key[:, :, sink:length - recent].float().repeat_interleave(group, dim=1)
    k_hat = key_quant[:, :, sink:length - recent].float().repeat_interleave(group, dim=1)
    kl = peak = 0.0
    # query first + r reads region keys j <= r (position sink + j): a causal square again
    for start, end in row_blocks(length - first, block):
        rows = q[:, :, first + start:first + end]
        visible = _causal(start, end, q.device)
        scores = (rows @ k[:, :, :end].transpose(-1, -2)) * scaling
        scores_hat = (rows @ k_hat[:, :, :end].transpose(-1, -2)) * scaling
        exact = exact_lse[:, :, first + start:first + end]
        masked = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logaddexp(masked.logsumexp(-1), exact)
        lse_hat = torch.logaddexp(scores_hat.masked_fill(~visible, float("-inf")).logsumexp(-1), exact)
        logp = scores - lse[..., None]
        log_ratio = logp - (scores_hat - lse_hat[..., None])  # log p - log p̂
        probs = logp.exp() * visible
        # the exact windows' keys (mass 1 - Σ probs) each have log p - log p̂ = lse_hat - lse
        exact_terms = (1 - probs.sum(-1)) * (lse_hat - lse)
        kl += ((probs * log_ratio).sum(-1) + exact_terms).double().sum().item()
        top = masked.argmax(-1, keepdim=True)
        peak += (probs.gather(-1, top) * log_ratio.gather(-1, top)).double().sum().item()
    return kl, peak


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
        rows = torch.arange(start, end, device=query.device)[:, None]
        cols = torch.arange(end, device=query.device)[None, :]
        quantized = (cols >= sink) & (rows - cols >= recent)
        mass[:, :, :end] += (probs.square() * quantized).sum(dim=(2, 3))
    return out.reshape(bsz, -1, length, dim).transpose(1, 2), mass
