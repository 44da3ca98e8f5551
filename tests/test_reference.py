"""Properties of the PyTorch reference quantizer (the oracle of every kernel)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.format import OscarFormat

dims = st.sampled_from([64, 128])
groups = st.sampled_from([32, 64, 128])
seeds = st.integers(0, 2**31 - 1)


def rows(seed, n, d, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * magnitude


@given(seeds, dims)
def test_pack_unpack_identity(seed, d):
    codes = torch.randint(0, 4, (5, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = ref.pack_int2_quartered(codes)
    assert packed.shape == (5, d // 4)
    assert torch.equal(ref.unpack_int2_quartered(packed), codes)


def test_quartered_layout():
    codes = torch.zeros(128, dtype=torch.uint8)
    codes[[5, 5 + 32, 5 + 64, 5 + 96]] = torch.tensor([1, 2, 3, 1], dtype=torch.uint8)
    packed = ref.pack_int2_quartered(codes)
    assert packed[5] == 1 | 2 << 2 | 3 << 4 | 1 << 6
    assert packed.sum() == packed[5]


@given(seeds, dims)
def test_four_bit_codes_pack_as_two_planes(seed, d):
    codes = torch.randint(0, 16, (5, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = ref.pack_codes(codes, 4)
    assert packed.shape == (5, d // 2)
    # plane 0 holds the low bit pairs, plane 1 the high ones, each quartered
    assert torch.equal(packed[:, :d // 4], ref.pack_int2_quartered(codes & 3))
    assert torch.equal(packed[:, d // 4:], ref.pack_int2_quartered(codes >> 2))
    assert torch.equal(ref.unpack_codes(packed, 4), codes)


def test_three_bit_codes_pack_bit_two_paired():
    codes = torch.zeros(64, dtype=torch.uint8)
    codes[[3, 2, 3 + 16, 6 + 48]] = torch.tensor([4, 7, 5, 6], dtype=torch.uint8)
    packed = ref.pack_codes(codes, 3)
    assert packed.shape == (24,)
    # bit 2 of dim s·16 + 2i + t sits in bit 2s + t of high-plane byte i
    assert packed[16 + 1] == 1 << 1 | 1 << 0 | 1 << 3  # dims 3 (i 1, t 1), 2 (i 1, t 0), 19 (s 1, i 1, t 1)
    assert packed[16 + 3] == 1 << 6  # dim 54 (s 3, i 3, t 0)
    assert packed[16:].sum() == packed[17] + packed[19]
    assert torch.equal(packed[:16], ref.pack_int2_quartered(codes & 3))


@given(seeds, dims)
def test_three_bit_high_plane_reads_as_a_quartered_plane(seed, d):
    """The kernels' reading of the paired plane (kernels.format) gives c >> 2 quartered."""
    codes = torch.randint(0, 8, (5, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = ref.pack_codes(codes, 3)
    assert torch.equal(ref.unpack_codes(packed, 3), codes)
    high = packed[:, d // 4:]
    as_quartered = torch.stack([high & 0x55, (high >> 1) & 0x55], dim=-1).flatten(-2)
    assert torch.equal(as_quartered, ref.pack_int2_quartered(codes >> 2))


@settings(max_examples=60)
@given(seeds, dims, groups, st.sampled_from([1e-3, 1.0, 1e3]), st.sampled_from([2, 3, 4]))
def test_error_bounded_by_half_step(seed, d, g, magnitude, bits):
    if g > d:
        g = d
    x = rows(seed, 7, d, magnitude)
    codes, scale, minimum = ref.quantize(x, g, bits)
    assert codes.shape == (7, bits * d // 8)
    assert int(ref.unpack_codes(codes, bits).max()) <= (1 << bits) - 1
    xhat = ref.dequantize(codes, scale, minimum, g)
    step = scale.float().repeat_interleave(g, dim=-1)
    # fp16 rounding of the minimum and of the scale (times at most 2^bits - 1 steps)
    slack = (1 << bits) * 1.5e-3 * x.abs().amax(dim=-1, keepdim=True)
    assert ((xhat - x).abs() <= step / 2 + slack).all()


def test_mixed_magnitudes_across_groups():
    x = torch.cat([torch.randn(1, 32) * 1e-3, torch.randn(1, 32) * 1e3], dim=-1)
    codes, scale, minimum = ref.quantize(x, 32)
    xhat = ref.dequantize(codes, scale, minimum, 32)
    small = (xhat[:, :32] - x[:, :32]).abs().max()
    assert small <= scale[0, 0].float() / 2 + 1e-5  # the large group does not swamp the small one


def test_constant_rows_reconstruct_exactly():
    x = torch.full((3, 64), 0.75)
    x[1] = -2.5
    codes, scale, minimum = ref.quantize(x, 32)
    assert (scale == 0).all()
    assert torch.equal(ref.dequantize(codes, scale, minimum, 32), x)


@given(seeds, st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_row_is_isolated(seed, bad):
    x = rows(seed, 6, 64)
    clean = ref.quantize(x, 32)
    x[2, 17] = bad
    dirty = ref.quantize(x, 32)
    keep = torch.tensor([0, 1, 3, 4, 5])
    for a, b in zip(clean, dirty):
        assert torch.equal(a[keep], b[keep])
    codes, scale, minimum = (t[2] for t in dirty)
    assert (codes == 0).all() and (scale == 0).all() and (minimum == 0).all()


def test_clip_rows_quantile():
    x = torch.arange(1.0, 101.0)[None] * torch.tensor([[1.0] * 50 + [-1.0] * 50])
    clipped = ref.clip_rows(x, 0.9)
    tau = torch.quantile(x.abs(), 0.9)
    assert clipped.abs().max() == tau
    assert clipped[0, 0] == 1.0


def test_encode_kv_round_trip_rotation():
    fmt = OscarFormat(64, 32)
    x = torch.randn(5, 2, 64).bfloat16()
    rot = torch.linalg.qr(torch.randn(2, 64, 64))[0]
    codes, meta, window = ref.encode_kv(x, rot, 1.0, fmt)
    assert codes.shape == (5, 2, 16) and meta.shape == (5, 2, 2, 2)
    back = ref.unrotate(window.float(), rot)
    assert torch.allclose(back, x.float(), atol=3e-2)
    approx = ref.unrotate(ref.decode_kv(codes, meta, fmt), rot)
    rel = (approx - x.float()).norm() / x.float().norm()
    assert rel < 0.5  # 2-bit rotated quantization of gaussian rows


def test_four_bit_keys_round_trip_closer():
    fmt = OscarFormat(64, 64, key_bits=4)
    x = torch.randn(9, 2, 64).bfloat16()
    rot = torch.linalg.qr(torch.randn(2, 64, 64))[0]
    errors = {}
    for bits in (2, 4):
        codes, meta, _ = ref.encode_kv(x, rot, 1.0, fmt, bits)
        assert codes.shape == (9, 2, bits * 8)
        approx = ref.unrotate(ref.decode_kv(codes, meta, fmt), rot)
        errors[bits] = ((approx - x.float()).norm() / x.float().norm()).item()
    assert errors[4] < errors[2] / 3  # 15 levels against 3: a quarter of the step
