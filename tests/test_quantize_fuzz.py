"""Fuzzing of the Triton write kernel against `reference.encode_kv` (CPU: Triton interpreter):
random token counts, KV heads, head_dim / group size, dtypes, clip ratios and per-row
magnitudes from 1e-3 to 1e4 mixed within one launch. The window copies must match, nothing
outside the written slots and rows may change, and meta and codes must be what the reference
writes, except on rounding ties.

Why ties, for meta too: the kernel's rotation (tl.dot) sums in another order than the
reference's einsum, so rotated values differ by a few fp32 ulps; when the reference's
unrounded minimum or scale sits that close to the midpoint between two fp16 values, the two
round to neighbours (the fuzzer found one at magnitude 1e4: scale 13659.997 against 13660.0,
fp16 13656 against 13664). Codes are then checked against the kernel's own meta.
"""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.format import CODE_MAX, OscarFormat
from kernel_cases import CODE_POISON, META_POISON, WINDOW_POISON, assert_codes_match, random_rotation, write_poisoned

MAGNITUDES = [1e-3, 1e-1, 1.0, 1e2, 1e4]


def assert_fp16_match(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor, what: str):
    """got, want: fp16 roundings (kernel, reference) of values whose fp32 reference is `exact`;
    where they differ they must be neighbours and `exact` within `slack` of their midpoint."""
    diff = got != want
    if not diff.any():
        return
    g, w = got.float()[diff], want.float()[diff]
    toward = torch.where(got > want, torch.full_like(want, torch.inf), torch.full_like(want, -torch.inf))
    neighbours = torch.nextafter(want, toward).float()[diff] == g
    assert neighbours.all(), f"{what}: {int((~neighbours).sum())} values differ by more than one fp16 step"
    midpoint = (g + w) / 2
    off = (exact[diff] - midpoint).abs()
    assert (off <= slack[diff]).all(), f"{what} differs away from an fp16 rounding tie (off by {off.max():.3g})"


def assert_meta_and_codes_match(got_codes, got_meta, want_meta, clipped, group: int, kind: str):
    """got_*: kernel output at the written slots [T, H, ...]; want_meta: reference meta;
    clipped: the reference's rotated, clipped rows [T, H, D] float32."""
    groups = clipped.unflatten(-1, (-1, group))
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    # a few fp32 ulps of the row's largest value: how far the two rotations may differ
    slack = 1e-5 * clipped.abs().amax(dim=-1, keepdim=True).expand_as(lo)
    assert_fp16_match(got_meta[..., 1], want_meta[..., 1], lo, slack, f"{kind} minimum")
    assert_fp16_match(got_meta[..., 0], want_meta[..., 0], (hi - lo) / 3, slack, f"{kind} scale")
    # the reference's rounding rule (quantize) applied with the kernel's meta
    s, m = got_meta[..., 0].float().unsqueeze(-1), got_meta[..., 1].float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    want_codes = torch.floor((groups - m) * inv + 0.5).clamp(0, CODE_MAX).flatten(-2)
    assert_codes_match(got_codes, ref.pack_int2_quartered(want_codes), clipped, got_meta, group)


@settings(max_examples=12, deadline=None)  # the interpreter takes seconds per launch
@example(tokens=33, heads=4, dims=(64, 32), dtype=torch.float16, per_head=False, clips=(0.96, 0.8), seed=249673)
@given(
    tokens=st.integers(1, 40),
    heads=st.integers(1, 4),
    dims=st.sampled_from([(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    per_head=st.booleans(),
    clips=st.tuples(st.sampled_from([0.8, 0.92, 0.96, 1.0]), st.sampled_from([0.8, 0.92, 0.96, 1.0])),
    seed=st.integers(0, 2**31 - 1),
)
def test_write_kernel_matches_reference_fuzzed(tokens, heads, dims, dtype, per_head, clips, seed):
    d, group = dims
    fmt = OscarFormat(d, group)
    gen = torch.Generator().manual_seed(seed)
    # each (token, head) row gets its own magnitude, so one launch mixes tiny and huge rows
    scale = torch.tensor(MAGNITUDES)[torch.randint(len(MAGNITUDES), (2, tokens, heads, 1), generator=gen)]
    k, v = ((torch.randn(tokens, heads, d, generator=gen) * scale[i]).to(dtype) for i in range(2))
    rot_heads = heads if per_head else 1
    k_rot, v_rot = random_rotation(rot_heads, d, gen), random_rotation(rot_heads, d, gen)
    num_slots = tokens + 5
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    rows = torch.where(torch.rand(tokens, generator=gen) < 0.5, torch.randperm(tokens, generator=gen), -1)

    out = write_poisoned(k, v, slots, k_rot, v_rot, clips, rows, fmt, num_slots)

    unwritten = torch.ones(num_slots, dtype=torch.bool)
    unwritten[slots] = False
    has_row = rows >= 0
    unused_rows = torch.ones(tokens, dtype=torch.bool)
    unused_rows[rows[has_row]] = False
    for kind, x, rot, clip in (("k", k, k_rot, clips[0]), ("v", v, v_rot, clips[1])):
        _, meta, window = ref.encode_kv(x, rot, clip, fmt)
        assert torch.isfinite(meta).all() and torch.isfinite(out[f"{kind}_meta"][slots]).all()
        assert_meta_and_codes_match(out[f"{kind}_codes"][slots], out[f"{kind}_meta"][slots], meta,
                                    ref.clip_rows(ref.rotate(x, rot), clip), group, kind)
        # bf16 roundings of fp32 values that differ only by summation order: one bf16 step,
        # relative to each value (rows of very different magnitude share the launch)
        got_w, want_w = out[f"{kind}_window"][rows[has_row]].float(), window[has_row].float()
        row_max = want_w.abs().amax(dim=-1, keepdim=True)
        assert ((got_w - want_w).abs() <= 1e-2 * want_w.abs() + 1e-4 * row_max).all(), f"{kind} window differs"
        assert (out[f"{kind}_codes"][unwritten] == CODE_POISON).all()
        assert (out[f"{kind}_meta"][unwritten] == META_POISON).all()
        assert (out[f"{kind}_window"][unused_rows] == WINDOW_POISON).all()
