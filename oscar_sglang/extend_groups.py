"""Extend forwards in request groups: a batch's requests split so that each
`extend_attention_int2` call's gathered K/V scratch stays bounded, each group with a FlashInfer
plan (planned once per forward, run by every layer) or the Triton attention kernel."""

from dataclasses import dataclass

import torch

from oscar_sglang.kernels.extend import extend_attention_int2, flashinfer_extend_wrapper, plan_flashinfer_extend

EXTEND_SCRATCH_BYTES = 1 << 30  # bound on the extend path's gathered K/V scratch per launch
FLASHINFER_WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended size
# each wrapper holds 8 MiB of device and 8 MiB of page-locked plan buffers; request groups of a
# forward beyond this many go to the Triton attention kernel
MAX_FLASHINFER_PLANS = 8


@dataclass(frozen=True)
class RequestGroup:
    """Requests [r0, r1) of an extend batch run by one extend_attention_int2 call: their new
    tokens [qo, qo_end) and prefix entries [kv, kv_end) of the batch's arrays (host ints, so
    slicing does not wait for the GPU), and a FlashInfer wrapper planned for them or None."""

    r0: int
    r1: int
    qo: int
    qo_end: int
    kv: int
    kv_end: int
    max_extend: int
    max_prefix: int
    flashinfer: object

    @classmethod
    def of(cls, r0, r1, extend_lens, prefix_lens, flashinfer=None):
        qo, kv = sum(extend_lens[:r0]), sum(prefix_lens[:r0])
        return cls(r0, r1, qo, qo + sum(extend_lens[r0:r1]), kv, kv + sum(prefix_lens[r0:r1]),
                   max(extend_lens[r0:r1]), max(prefix_lens[r0:r1]), flashinfer)


def request_groups(lengths, limit: int) -> list[tuple[int, int]]:
    """Consecutive request ranges [r0, r1) whose lengths sum to at most `limit` (a range of one
    request may exceed it); none for no requests."""
    groups, r0, total = [], 0, 0
    for r, length in enumerate(lengths):
        if r > r0 and total + length > limit:
            groups.append((r0, r))
            r0, total = r, 0
        total += length
    if len(lengths) > r0:
        groups.append((r0, len(lengths)))
    return groups


class FlashInferPlans:
    """Up to MAX_FLASHINFER_PLANS ragged-prefill wrappers sharing one workspace, re-planned per
    forward. `enabled` False (no CUDA, the PyTorch reference, deterministic inference): every
    group gets None, the Triton kernel."""

    def __init__(self, enabled: bool, device):
        self.enabled = enabled
        self.workspace = (torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
                          if enabled else None)
        self.wrappers = []

    def plan(self, ranges, extend_lens, prefix_lens, q_heads: int, kv_heads: int, head_dim: int,
             sm_scale: float, dtype: torch.dtype) -> list:
        """For each request range [r0, r1), a wrapper planned for it, or None.

        FlashInfer copies a plan to the GPU asynchronously from the wrapper's page-locked
        buffer. Extend forwards plan after init_forward_metadata's host sync
        (req_pool_indices.tolist()), so every copy of an earlier forward has run by then and
        re-planning a wrapper never overwrites a plan still in flight."""
        if not self.enabled:
            return [None] * len(ranges)
        planned = min(len(ranges), MAX_FLASHINFER_PLANS)
        while len(self.wrappers) < planned:
            self.wrappers.append(flashinfer_extend_wrapper(self.workspace))
        wrappers = [plan_flashinfer_extend(wrapper, extend_lens[r0:r1], prefix_lens[r0:r1], q_heads, kv_heads,
                                           head_dim, sm_scale, dtype)
                    for wrapper, (r0, r1) in zip(self.wrappers, ranges[:planned])]
        return wrappers + [None] * (len(ranges) - planned)

    def groups(self, extend_lens, prefix_lens, q_heads: int, kv_heads: int, head_dim: int,
               sm_scale: float, dtype: torch.dtype) -> list[RequestGroup]:
        """An extend batch's RequestGroups: consecutive requests whose gathered K/V (prefix +
        chunk tokens, 2 · H_kv · D elements each) stays within EXTEND_SCRATCH_BYTES, each planned."""
        per_token = 2 * kv_heads * head_dim * dtype.itemsize
        ranges = request_groups([p + e for p, e in zip(prefix_lens, extend_lens)], EXTEND_SCRATCH_BYTES // per_token)
        wrappers = self.plan(ranges, extend_lens, prefix_lens, q_heads, kv_heads, head_dim, sm_scale, dtype)
        return [RequestGroup.of(r0, r1, extend_lens, prefix_lens, wrapper)
                for (r0, r1), wrapper in zip(ranges, wrappers)]


def extend_in_groups(q, k, v, args, groups: list[RequestGroup]):
    """extend_attention_int2 over request groups; args are its arguments after k_new, v_new, for
    the whole batch."""
    if len(groups) == 1:
        g = groups[0]
        return extend_attention_int2(q, k, v, *args, max_extend_len=g.max_extend, max_prefix_len=g.max_prefix,
                                     flashinfer=g.flashinfer)
    qo_indptr, kv_indptr, kv_indices, starts, *pool_args = args
    out = torch.empty_like(q)
    for g in groups:
        tokens = slice(g.qo, g.qo_end)
        extend_attention_int2(
            q[tokens], k[tokens], v[tokens], qo_indptr[g.r0:g.r1 + 1] - g.qo, kv_indptr[g.r0:g.r1 + 1] - g.kv,
            kv_indices[g.kv:g.kv_end], starts[g.r0:g.r1], *pool_args, max_extend_len=g.max_extend,
            max_prefix_len=g.max_prefix, out=out[tokens], flashinfer=g.flashinfer)
    return out
