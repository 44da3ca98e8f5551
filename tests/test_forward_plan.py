"""oscar_sglang.forward_plan on the CPU: what an extend and a decode forward plan for their layers
(window rows, window starts, sink copies, shared-prefix blocks, request groups planned once)."""

from types import SimpleNamespace

import torch
from oscar_sglang.extend_groups import FlashInferPlans
from oscar_sglang.forward_plan import plan_decode, plan_extend
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.rotation_file import data_free_rotations
from oscar_sglang.pool import OscarTokenToKVPool

FMT = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
KV_HEADS, LAYERS = 2, 2


def pool(sink_rows: int = FMT.sink_tokens, requests: int = 4) -> OscarTokenToKVPool:
    made = OscarTokenToKVPool(128, 1, KV_HEADS, FMT.head_dim, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, KV_HEADS, FMT.head_dim),
                              sink_rows_per_request=sink_rows)
    made.allocate_windows(requests)
    return made


def extend_batch():
    """Request 3 prefills positions 0-5; request 1 continues from position 2 with 17 tokens (its
    prefix 0-1 cached), so its positions 2 and 3 are sinks too."""
    prefix, chunks = [0, 2], [6, 17]
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, chunks)])
    return SimpleNamespace(req_pool_indices=torch.tensor([3, 1]), positions=positions,
                           seq_lens=torch.tensor([6, 19]), extend_seq_lens=torch.tensor(chunks),
                           extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=chunks,
                           out_cache_loc=torch.arange(40, 40 + sum(chunks)))


def test_extend_plan_rows_starts_and_sink_copies():
    stack, batch = pool(), extend_batch()
    plan = plan_extend(stack, batch, [3, 1])
    rows = FMT.window_rows_per_request
    assert plan.window_starts.tolist() == [3 * rows, 1 * rows]
    per_token = torch.tensor([3] * 6 + [1] * 17)
    lengths = torch.tensor([6] * 6 + [19] * 17)
    assert torch.equal(plan.window_rows, stack.window_rows_for(per_token, batch.positions, lengths))
    # request 3's six tokens are all within its window; request 1 keeps its sinks (2, 3) and its
    # last 8 positions (11-18), not positions 4-10
    assert (plan.window_rows[:6] >= 0).all()
    kept = plan.window_rows[6:] >= 0
    assert kept.tolist() == [True, True] + [False] * 7 + [True] * 8
    window_rows, sink_rows = plan.sink_copy
    assert window_rows.tolist() == [3 * rows + p for p in range(4)] + [rows + 2, rows + 3]
    assert len(set(sink_rows.tolist())) == 6
    assert (plan.extend_lens, plan.prefix_lens, plan.shared) == ([6, 17], [0, 2], None)


def test_extend_plan_without_a_sink_store_copies_nothing():
    assert plan_extend(pool(sink_rows=0), extend_batch(), [3, 1]).sink_copy is None


def test_request_groups_are_planned_once_per_scale_and_dtype():
    plan, plans = plan_extend(pool(), extend_batch(), [3, 1]), FlashInferPlans(False, "cpu")
    first = plan.request_groups(plans, 4, KV_HEADS, FMT.head_dim, 0.125, torch.bfloat16)
    assert plan.request_groups(plans, 4, KV_HEADS, FMT.head_dim, 0.125, torch.bfloat16) is first
    assert [(g.r0, g.r1, g.qo, g.qo_end, g.kv, g.kv_end) for g in first] == [(0, 2, 0, 23, 0, 2)]
    other = plan.request_groups(plans, 4, KV_HEADS, FMT.head_dim, 0.5, torch.bfloat16)
    assert other is not first and other == first  # the same cut, planned again for the new scale


def test_decode_plan_finds_shared_prefixes_only_when_asked_and_worth_it():
    stack = pool()
    common = torch.arange(10, 60)  # requests 1 and 2 hold the same 50 slots (a radix hit), then their own
    kv_indices = torch.cat([common, torch.tensor([70]), common, torch.tensor([71])])
    kv_indptr = torch.tensor([0, 51, 102])
    batch = SimpleNamespace(req_pool_indices=torch.tensor([1, 2]), positions=torch.tensor([50, 50]),
                            seq_lens=torch.tensor([51, 51]))
    plan = plan_decode(stack, batch, kv_indptr, kv_indices, gqa=2, share_prefixes=True)
    assert plan.window_starts.tolist() == [FMT.window_rows_per_request, 2 * FMT.window_rows_per_request]
    assert torch.equal(plan.window_rows, stack.window_rows_for(batch.req_pool_indices, batch.positions, batch.seq_lens))
    assert plan.shared is not None and int(plan.shared.block_end.max()) > FMT.sink_tokens
    assert plan_decode(stack, batch, kv_indptr, kv_indices, gqa=2, share_prefixes=False).shared is None
    alone = SimpleNamespace(req_pool_indices=torch.tensor([1]), positions=torch.tensor([50]), seq_lens=torch.tensor([51]))
    assert plan_decode(stack, alone, kv_indptr[:2], kv_indices[:51], gqa=2, share_prefixes=True).shared is None
