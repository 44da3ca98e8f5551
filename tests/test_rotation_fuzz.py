"""Fuzzing of the rotation artifact loader: whatever bytes sit at the path, `load_rotations`
either returns a RotationSet that satisfies everything the loader promises, or raises
RotationFileError naming the file — never another exception, never a hang.

The artifact is small and per-head (2 layers, 2 KV heads, head_dim 64), so a corrupted
num_kv_heads / head_dim / num_layers can never match the tensors' shapes or count: anything
that loads must still match the original model exactly. What can load after damage is payload
bits that keep every matrix orthogonal within ORTHOGONALITY_TOLERANCE and every clip ratio in
(0, 1], and descriptive metadata (model name, calibration source, flags): nothing in the file
checks those.
"""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oscar_sglang.kernels.format import FORMAT_NAME, FORMAT_VERSION
from oscar_sglang.kernels.rotation_file import (
    ORTHOGONALITY_TOLERANCE,
    REQUIRED_METADATA,
    RotationFileError,
    RotationSet,
    load_rotations,
    make_rotation_set,
    save_rotations,
)

LAYERS, HEADS, DIM = 2, 2, 64
FUZZ = settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Artifact:
    """A valid artifact's bytes, with a short repr: hypothesis prints its test's arguments."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self):
        return f"Artifact({len(self.data)} bytes)"

    @property
    def header_end(self) -> int:
        """Offset of the first payload byte: 8-byte little-endian header length, then JSON."""
        return 8 + int.from_bytes(self.data[:8], "little")

    @property
    def header(self) -> dict:
        return json.loads(self.data[8:self.header_end])

    def with_header(self, header: dict) -> bytes:
        blob = json.dumps(header).encode()
        return struct.pack("<Q", len(blob)) + blob + self.data[self.header_end:]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Artifact:
    gen = torch.Generator().manual_seed(0)

    def rot():
        return torch.linalg.qr(torch.randn(HEADS, DIM, DIM, generator=gen, dtype=torch.float64))[0].float()

    rs = make_rotation_set([rot() for _ in range(LAYERS)], [rot() for _ in range(LAYERS)], [0.96, 0.9],
                           [0.92, 1.0], model_name="fuzz", num_kv_heads=HEADS, calibration_tokens=7,
                           calibration_source="unit test")
    path = str(tmp_path_factory.mktemp("artifact") / "good.oscar.safetensors")
    save_rotations(path, rs)
    assert_valid(load_rotations(path))
    with open(path, "rb") as f:
        return Artifact(f.read())


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    """One path, overwritten by every example."""
    return str(tmp_path_factory.mktemp("fuzz") / "x.oscar.safetensors")


def load_or_refusal(path: str, data: bytes) -> RotationSet | RotationFileError:
    """Write `data` to `path` and load it; any exception but RotationFileError fails the test."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        return load_rotations(path)
    except RotationFileError as e:
        message = str(e)
        assert repr(path) in message and "calibrate" in message, f"unclear refusal: {message}"
        return e


def assert_valid(rs: RotationSet):
    """What load_rotations promises of a set it returns (and what the kernels rely on)."""
    meta = rs.metadata
    assert all(k in meta for k in REQUIRED_METADATA)
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == str(FORMAT_VERSION)
    rs.check_matches(LAYERS, HEADS, DIM)  # per-head shapes pin every dimension
    assert rs.num_layers == len(rs.v_rot) == len(rs.k_clip) == len(rs.v_clip) == LAYERS
    for rot in rs.k_rot + rs.v_rot:
        assert rot.dtype == torch.float32 and rot.shape == (HEADS, DIM, DIM)
        r = rot.double()
        err = (r.mT @ r - torch.eye(DIM, dtype=torch.float64)).abs().max()
        assert err <= ORTHOGONALITY_TOLERANCE * 1.01, f"non-orthogonal rotation loaded (error {err:.2e})"
    for clip in rs.k_clip + rs.v_clip:
        assert isinstance(clip, float) and 0.0 < clip <= 1.0


def assert_refused_or_valid(result):
    if not isinstance(result, RotationFileError):
        assert_valid(result)


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=4096),
    # a plausible header length first, so that header parsing (not only the length check) runs
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 4096), st.binary(max_size=4096)),
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
))
def test_random_bytes_are_refused(target, data):
    assert isinstance(load_or_refusal(target, data), RotationFileError)


@FUZZ
@given(cut=st.data())
def test_truncated_artifact_is_refused(good, target, cut):
    # half the cuts inside the length prefix or the JSON header, half anywhere
    end = cut.draw(st.one_of(st.integers(0, good.header_end), st.integers(0, len(good.data) - 1)))
    assert isinstance(load_or_refusal(target, good.data[:end]), RotationFileError)


@FUZZ
@given(edits=st.data())
def test_damaged_artifact_is_refused_or_valid(good, target, edits):
    data = bytearray(good.data)
    for _ in range(edits.draw(st.integers(1, 4))):
        # the header is under 1 % of the file: aim half the edits at it
        where = edits.draw(st.one_of(st.integers(0, good.header_end - 1), st.integers(0, len(data) - 1)))
        if edits.draw(st.booleans()):
            data[where] ^= 1 << edits.draw(st.integers(0, 7))
        else:
            data[where] = edits.draw(st.integers(0, 255))
    assert_refused_or_valid(load_or_refusal(target, bytes(data)))


@FUZZ
@given(edit=st.data())
def test_rewritten_header_field_is_refused_or_valid(good, target, edit):
    """Well-formed JSON with one metadata value or tensor entry replaced: reaches the checks
    after parsing (integers, format, dtypes, shapes, tensor names) far more often than bytes do."""
    header = good.header
    key = edit.draw(st.sampled_from(sorted(header)))
    if key == "__metadata__":
        field = edit.draw(st.sampled_from(sorted(header[key])))
        header[key][field] = edit.draw(st.one_of(
            st.text(max_size=12), st.integers(-3, 10**12).map(str), st.sampled_from(["0", "1", "3", "128", " 2"])))
    elif edit.draw(st.booleans()):
        renamed = edit.draw(st.sampled_from(["layers.0.k_rot", "layers.9.v_rot", "extra", "layers.1.v_clip"]))
        header[renamed] = header.pop(key)
    else:
        entry = header[key]
        entry[edit.draw(st.sampled_from(["dtype", "shape"]))] = edit.draw(st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "I32", "U32", "F64", "U8", "BOOL", "F4", "F8_E4M3", "C64"]),
            st.lists(st.integers(0, 128), max_size=4)))
    assert_refused_or_valid(load_or_refusal(target, good.with_header(header)))


@pytest.mark.parametrize("value, message", [
    ("0", "num_layers='0'.*positive integer"),
    ("J4", "num_layers='J4'.*positive integer"),
    ("1", "holds 8 tensors, but its metadata says 1 layers"),
    ("99999999999", "holds 8 tensors"),  # refused without building 4e11 names
])
def test_bad_layer_count_named(good, target, value, message):
    header = good.header
    header["__metadata__"]["num_layers"] = value
    with open(target, "wb") as f:
        f.write(good.with_header(header))
    with pytest.raises(RotationFileError, match=message):
        load_rotations(target)


def test_wrong_dtype_named(good, target):
    header = good.header
    header["layers.1.k_rot"]["dtype"] = "I32"
    with open(target, "wb") as f:
        f.write(good.with_header(header))
    with pytest.raises(RotationFileError, match=r"layers.1.k_rot .* is torch.int32, expected float32"):
        load_rotations(target)
