"""ForwardPlan: what every layer of one forward reads besides its own layer's cache, built once
per forward (FlashInfer-style plan, then run per layer).

An extend forward (never captured in a CUDA graph) is planned in the backend's
init_forward_metadata, host work included: the sink-store rows of new sink positions. A decode
forward is planned at its first layer, so that a captured CUDA graph replays the planning with
the batch (the window rows and shared-prefix blocks are device work on the batch's tensors).
"""

from dataclasses import dataclass, field

import torch

from oscar_sglang.kernels.shared_prefix import SharedPrefixes, find_shared_prefixes

from .extend_groups import FlashInferPlans, RequestGroup
from .pool import OscarTokenToKVPool


@dataclass
class ForwardPlan:
    """window_rows: [T] the window row each new token is copied to (-1: none); window_starts: [B]
    each request's first window row; shared: a decode batch's shared-prefix blocks (None: read
    every position per request); sink_copy: an extend batch's (window rows, sink rows) pairs that
    each layer copies into the sink store after its write (None: no new sink position got a row);
    extend_lens, prefix_lens: an extend batch's new and cached tokens per request, host ints
    (empty for decode)."""

    window_rows: torch.Tensor
    window_starts: torch.Tensor
    shared: SharedPrefixes | None = None
    sink_copy: tuple[torch.Tensor, torch.Tensor] | None = None
    extend_lens: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    _groups: tuple | None = None  # ((sm_scale, dtype), [RequestGroup]) planned at the first layer

    def request_groups(self, plans: FlashInferPlans, q_heads: int, kv_heads: int, head_dim: int,
                       sm_scale: float, dtype: torch.dtype) -> list[RequestGroup]:
        """The extend batch's request groups, planned by the first layer that asks and reused by
        the others (re-planned only for a layer of another softmax scale or dtype)."""
        key = (sm_scale, dtype)
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, plans.groups(self.extend_lens, self.prefix_lens, q_heads, kv_heads, head_dim,
                                              sm_scale, dtype))
        return self._groups[1]


def plan_decode(pool: OscarTokenToKVPool, forward_batch, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                gqa: int, share_prefixes: bool) -> ForwardPlan:
    """A decode batch's plan (device work only: capturable). share_prefixes: look for requests
    holding a cached prefix in the same slots (`kernels/shared_prefix.py`); worth it from two
    requests on."""
    req = forward_batch.req_pool_indices
    rows = pool.window_rows_for(req, forward_batch.positions, forward_batch.seq_lens)
    shared = (find_shared_prefixes(kv_indptr, kv_indices, pool.fmt, gqa)
              if share_prefixes and req.shape[0] > 1 else None)
    return ForwardPlan(rows, pool.window_starts(req), shared)


def plan_extend(pool: OscarTokenToKVPool, forward_batch, indices: list[int]) -> ForwardPlan:
    """An extend batch's plan; indices: its req_pool_indices on the host."""
    req = forward_batch.req_pool_indices
    per_token = torch.repeat_interleave(torch.arange(req.shape[0], device=req.device),
                                        forward_batch.extend_seq_lens, output_size=forward_batch.positions.shape[0])
    rows = pool.window_rows_for(req[per_token], forward_batch.positions, forward_batch.seq_lens[per_token])
    return ForwardPlan(rows, pool.window_starts(req), sink_copy=assign_sink_rows(pool, forward_batch, indices),
                       extend_lens=list(forward_batch.extend_seq_lens_cpu),
                       prefix_lens=list(forward_batch.extend_prefix_lens_cpu))


def assign_sink_rows(pool: OscarTokenToKVPool, forward_batch, indices: list[int]):
    """Sink-store rows for the slots of an extend batch's new positions < S (as many as the store
    has free; the others fall back to dequantization when restored). Returns the
    (window rows, sink rows) pairs each layer copies after its write, or None."""
    fmt = pool.fmt
    if pool.sinks.capacity == 0:
        return None
    tokens, window_rows, offset = [], [], 0
    for idx, prefix, length in zip(indices, forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu):
        first_row = idx * fmt.window_rows_per_request
        for pos in range(prefix, min(fmt.sink_tokens, prefix + length)):
            tokens.append(offset + pos - prefix)
            window_rows.append(first_row + pos)
        offset += length
    if not tokens:
        return None
    loc = forward_batch.out_cache_loc
    return pool.sinks.assign(loc[torch.tensor(tokens, device=loc.device)], window_rows)
