import pytest

from oscar_sglang.kernels.format import OscarFormat


def test_qwen3_8b_bytes_per_token():
    fmt = OscarFormat(128)
    assert fmt.group_size == 128
    assert fmt.bits_per_element == 2.25
    assert fmt.bytes_per_token(36, 8) == 20_736


@pytest.mark.parametrize("group,bits", [(32, 3.0), (64, 2.5), (128, 2.25)])
def test_bits_per_element(group, bits):
    assert OscarFormat(128, group).bits_per_element == bits


def test_bytes_per_token_matches_bits():
    fmt = OscarFormat(64, 32)
    elements = 30 * 3 * 64 * 2
    assert fmt.bytes_per_token(30, 3) * 8 == elements * fmt.bits_per_element


def test_effective_bits_counts_windows():
    fmt = OscarFormat(128)
    assert fmt.effective_bits(100) == 2.25 + 16  # every token also held in BF16
    long = fmt.effective_bits(100_000)
    assert 2.25 < long < 2.25 + 16 * 192 / 100_000 + 1e-9


def test_shapes():
    fmt = OscarFormat(128, 64)
    assert fmt.codes_shape(10, 8, "k") == fmt.codes_shape(10, 8, "v") == (10, 8, 32)
    assert fmt.meta_shape(10, 8) == (10, 8, 2, 2)
    assert fmt.window_shape(3, 8) == (3 * 192, 8, 128)


def test_window_rows_and_int2_span():
    fmt = OscarFormat(64, sink_tokens=4, recent_tokens=8)
    assert [fmt.window_row(24, p) for p in (0, 3, 4, 11, 12, 13)] == [24, 27, 28, 35, 28, 29]
    assert fmt.int2_span(3) == (3, 3)
    assert fmt.int2_span(12) == (4, 4)
    assert fmt.int2_span(13) == (4, 5)
    assert fmt.int2_span(1000) == (4, 992)


@pytest.mark.parametrize("head_dim,group", [(96, None), (128, 16), (64, 128), (128, 48), (256, None)])
def test_unsupported_shapes_are_refused(head_dim, group):
    with pytest.raises(ValueError, match="head_dim|group size"):
        OscarFormat(head_dim, group)


def test_four_bit_keys():
    fmt = OscarFormat(64, key_bits=4)
    assert fmt.code_bits("k") == 4 and fmt.code_bits("v") == 2
    assert fmt.codes_shape(10, 3, "k") == (10, 3, 32) and fmt.codes_shape(10, 3, "v") == (10, 3, 16)
    assert fmt.bits_per_element == 3.5  # (4 + 2) / 2 + 32 / 64
    assert fmt.bytes_per_token(30, 3) * 8 == 30 * 3 * 64 * 2 * fmt.bits_per_element
    with pytest.raises(ValueError, match="--oscar-key-bits"):
        OscarFormat(64, key_bits=1)


def test_three_bit_keys():
    fmt = OscarFormat(128, key_bits=3)
    assert fmt.codes_shape(10, 3, "k") == (10, 3, 48) and fmt.codes_shape(10, 3, "v") == (10, 3, 32)
    assert fmt.bits_per_element == 2.75  # (3 + 2) / 2 + 32 / 128
    assert OscarFormat(64, key_bits=3).bits_per_element == 3.0
    assert fmt.bytes_per_token(30, 3) * 8 == 30 * 3 * 128 * 2 * fmt.bits_per_element
