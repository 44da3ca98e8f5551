"""The Triton write kernel against reference.encode_kv (interpreter on CPU)."""

import pytest
import torch

from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.quantize import WriteLaunch
from kernel_cases import CODE_POISON, META_POISON, WINDOW_POISON, assert_codes_match, random_rotation, write_poisoned


# (tokens, kv_heads, head_dim, group, dtype, per_head, key_bits): a covering subset of
# T in {1, 7, 129} x H in {1, 2, 8} x D in {64, 128} x G in {32, 64, 128} x dtypes x sharing x key bits
CASES = [
    (1, 1, 64, 32, torch.bfloat16, False, 2),
    (7, 2, 64, 64, torch.float16, True, 2),
    (129, 1, 64, 32, torch.bfloat16, True, 4),
    (1, 8, 128, 128, torch.float16, True, 4),
    (7, 8, 128, 32, torch.bfloat16, False, 2),
    (129, 2, 128, 64, torch.float16, False, 2),
    (129, 8, 128, 128, torch.bfloat16, True, 2),
    (7, 1, 128, 128, torch.bfloat16, True, 4),
    (7, 2, 64, 64, torch.float16, False, 4),
    (129, 2, 64, 32, torch.bfloat16, True, 3),
    (7, 8, 128, 64, torch.float16, False, 3),
    (1, 1, 128, 128, torch.bfloat16, True, 3),
]


@pytest.mark.parametrize("tokens,heads,d,group,dtype,per_head,key_bits", CASES)
def test_write_kernel_matches_reference(tokens, heads, d, group, dtype, per_head, key_bits):
    gen = torch.Generator().manual_seed(tokens * 1000 + heads * 10 + d + group)
    fmt = OscarFormat(d, group, key_bits=key_bits)
    k = (torch.randn(tokens, heads, d, generator=gen) * 3).to(dtype)
    v = torch.randn(tokens, heads, d, generator=gen).to(dtype)
    k_rot = random_rotation(heads if per_head else 1, d, gen)
    v_rot = random_rotation(heads if per_head else 1, d, gen)
    num_slots = 2 * tokens + 3
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    rows = torch.where(torch.rand(tokens, generator=gen) < 0.5, torch.randperm(tokens, generator=gen), -1)

    out = write_poisoned(k, v, slots, k_rot, v_rot, (0.96, 0.92), rows, fmt, num_slots)

    unwritten = torch.ones(num_slots, dtype=torch.bool)
    unwritten[slots] = False
    has_row = rows >= 0
    unused_rows = torch.ones(tokens, dtype=torch.bool)
    unused_rows[rows[has_row]] = False
    for kind, x, rot, clip in (("k", k, k_rot, 0.96), ("v", v, v_rot, 0.92)):
        bits = fmt.code_bits(kind)
        codes, meta, window = ref.encode_kv(x, rot, clip, fmt, bits)
        got_meta = out[f"{kind}_meta"][slots]
        assert torch.equal(got_meta, meta), f"{kind} meta differs"
        clipped = ref.clip_rows(ref.rotate(x, rot), clip)
        assert_codes_match(out[f"{kind}_codes"][slots], codes, clipped, meta, group, bits)
        torch.testing.assert_close(out[f"{kind}_window"][rows[has_row]], window[has_row], atol=2e-2, rtol=1e-2)
        assert (out[f"{kind}_codes"][unwritten] == CODE_POISON).all()
        assert (out[f"{kind}_meta"][unwritten] == META_POISON).all()
        assert (out[f"{kind}_window"][unused_rows] == WINDOW_POISON).all()


def test_non_finite_token_is_isolated():
    gen = torch.Generator().manual_seed(3)
    fmt = OscarFormat(64, 32)
    k = torch.randn(9, 2, 64, generator=gen).bfloat16()
    v = torch.randn(9, 2, 64, generator=gen).bfloat16()
    k[4, 1, 10] = float("nan")
    v[6, 0, 3] = float("inf")
    rot = random_rotation(1, 64, gen)
    out = write_poisoned(k, v, torch.arange(9), rot, rot, (0.96, 0.92), torch.full((9,), -1), fmt, 9)
    k_codes, k_meta, v_codes, v_meta = (out[name] for name in ("k_codes", "k_meta", "v_codes", "v_meta"))
    assert (k_meta[4, 1] == 0).all() and (k_codes[4, 1] == 0).all()
    assert (v_meta[6, 0] == 0).all() and (v_codes[6, 0] == 0).all()
    clean_codes, clean_meta, _ = ref.encode_kv(k, rot, 0.96, fmt)
    keep = torch.ones(9, 2, dtype=torch.bool)
    keep[4, 1] = False
    assert torch.equal(k_meta[keep], clean_meta[keep])
    assert torch.isfinite(k_meta).all() and torch.isfinite(v_meta).all()


def test_other_launch_parameters_write_the_same_bytes():
    """A WriteLaunch other than the default (fewer tokens per program, the prefill regime from
    5 tokens on) cuts the work differently and writes the same codes, meta and window rows."""
    gen = torch.Generator().manual_seed(12)
    fmt = OscarFormat(64, 32, key_bits=3)
    k, v = (torch.randn(9, 2, 64, generator=gen).bfloat16() for _ in "kv")
    rot = random_rotation(2, 64, gen)

    def written(launch):
        return write_poisoned(k, v, torch.arange(2, 11), rot, rot, (0.96, 0.92), torch.arange(9), fmt, 11, launch)

    other = WriteLaunch(block_tokens=2, decode_block_tokens=2, decode_max_tokens=4, num_warps=2)
    default, changed = written(WriteLaunch()), written(other)
    for name in default:
        assert torch.equal(default[name], changed[name]), name
