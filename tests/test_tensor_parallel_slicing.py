"""Per-rank KV-head slicing of rotations (what a tensor-parallel rank's pool loads)."""

import pytest
import torch

from oscar_sglang.kernels.rotation_file import make_rotation_set
from oscar_sglang.served_rotations import kv_head_range


@pytest.mark.parametrize("total,tp,expected", [
    (8, 1, [(0, 8)]),
    (8, 2, [(0, 4), (4, 8)]),
    (8, 8, [(h, h + 1) for h in range(8)]),
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer KV heads than ranks: replicated
    (1, 2, [(0, 1), (0, 1)]),
])
def test_kv_head_range_follows_sglang_split(total, tp, expected):
    assert [kv_head_range(total, tp, rank) for rank in range(tp)] == expected


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="cannot be split"):
        kv_head_range(6, 4, 0)


def test_slice_keeps_each_ranks_own_rotations():
    heads, d = 4, 64
    per_head = torch.linalg.qr(torch.randn(2, heads, d, d))[0]
    shared = torch.linalg.qr(torch.randn(2, 1, d, d))[0]
    rs = make_rotation_set(list(per_head), list(shared), [0.9, 0.95], [0.8, 0.85],
                           model_name="tiny", num_kv_heads=heads, calibration_tokens=0,
                           calibration_source="test")
    rank1 = rs.slice_kv_heads(*kv_head_range(heads, 2, 1))
    assert torch.equal(rank1.k_rot[0], per_head[0, 2:4]) and torch.equal(rank1.k_rot[1], per_head[1, 2:4])
    assert torch.equal(rank1.v_rot[0], shared[0])  # shared rotations serve every rank as they are
    assert rank1.k_clip == rs.k_clip and rank1.metadata["num_kv_heads"] == "4"
