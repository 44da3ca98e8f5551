"""The rotation artifact (`NAME.oscar.safetensors`): per-layer R_K, R_V and clip ratios.

Tensors: `layers.{l}.k_rot` / `layers.{l}.v_rot` [H_kv or 1, D, D] float32 (orthogonal),
`layers.{l}.k_clip` / `layers.{l}.v_clip` float32 scalars. String metadata: see
`REQUIRED_METADATA`, and `key_bits`, the key code width the clips were chosen for (files
without it: 2). Loading validates structure, version and orthogonality; matching against a
served model is `RotationSet.check_matches`. Without an artifact (`--oscar-rotations data-free`),
`data_free_rotations` gives the normalized Hadamard · bit-reversal rotation.
"""

import math
import os
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy.linalg import hadamard

from .format import (
    DATA_FREE_ROTATIONS,
    CODE_BITS,
    DEFAULT_K_CLIP,
    DEFAULT_KEY_BITS,
    DEFAULT_V_CLIP,
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_KEY_BITS,
)

REQUIRED_METADATA = (
    "format", "format_version", "model_name", "num_layers", "num_kv_heads", "head_dim",
    "rope_applied", "per_head", "calibration_tokens", "calibration_source", "created_by",
)
ORTHOGONALITY_TOLERANCE = 1e-3
# Files calibrated before the key width was recorded chose their key clips for 2-bit keys.
UNRECORDED_KEY_BITS = CODE_BITS


class RotationFileError(ValueError):
    """A rotation artifact that cannot be used; the message names the problem and the fix."""


def bit_reversal_permutation(n: int) -> torch.Tensor:
    """[n] int64: index i -> i with its log2(n) bits reversed (n a power of two)."""
    bits = n.bit_length() - 1
    if n < 1 or 1 << bits != n:
        raise ValueError(f"bit reversal needs a power of two, got {n}")
    return torch.tensor([int(f"{i:0{bits}b}"[::-1], 2) if bits else 0 for i in range(n)])


def hadamard_bitrev(head_dim: int) -> torch.Tensor:
    """H · P_br: normalized Walsh-Hadamard with columns in bit-reversal order, [D, D] float32.
    Column j of the result is column bitrev(j) of H, so neighbouring directions of a basis
    multiplied in front land in different quantization groups."""
    h = torch.from_numpy(hadamard(head_dim)).double() / math.sqrt(head_dim)
    return h[:, bit_reversal_permutation(head_dim)].float()


@dataclass
class RotationSet:
    """Rotations of every layer. k_rot/v_rot: per layer [H_kv or 1, D, D] float32."""

    k_rot: list[torch.Tensor]
    v_rot: list[torch.Tensor]
    k_clip: list[float]
    v_clip: list[float]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.k_rot)

    @property
    def head_dim(self) -> int:
        return self.k_rot[0].shape[-1]

    def check_matches(self, num_layers: int, num_kv_heads: int, head_dim: int, model: str = "the model"):
        """Raise RotationFileError naming the first field that differs from the served model."""
        source = self.metadata.get("source_path", "the rotation file")
        for name, want in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            have = int(self.metadata[name])
            if have != want:
                raise RotationFileError(
                    f"{source} was calibrated for {name}={have} ({self.metadata['model_name']}), "
                    f"but {model} has {name}={want}; calibrate rotations for this model with "
                    "`oscar-sglang calibrate` or pass --oscar-rotations "
                    f"{DATA_FREE_ROTATIONS} for data-free rotations"
                )

    @property
    def key_bits(self) -> int | None:
        """The key code width the key clips were calibrated for; None for rotations that no
        calibration chose (data-free ones, or sets built without metadata), which suit any."""
        if self.metadata.get("calibration_source", DATA_FREE_ROTATIONS) == DATA_FREE_ROTATIONS:
            return None
        return int(self.metadata.get("key_bits", UNRECORDED_KEY_BITS))

    def served_key_bits(self, asked: int | None) -> int:
        """The key width to serve these rotations with: `asked` (None: not asked) when the key
        clips suit it, else RotationFileError (clips chosen for 2-bit keys cut what 4-bit keys
        would keep, and the reverse); unasked, the calibrated width, or DEFAULT_KEY_BITS for
        rotations no calibration chose."""
        if asked is None:
            return self.key_bits or DEFAULT_KEY_BITS
        if self.key_bits is not None and self.key_bits != asked:
            source = self.metadata.get("source_path", "the rotation file")
            raise RotationFileError(
                f"{source} was calibrated for {self.key_bits}-bit keys, but {asked}-bit keys "
                f"were asked for; drop --oscar-key-bits (the file's width is served), or "
                f"calibrate with `oscar-sglang calibrate --key-bits {asked}`")
        return asked

    def slice_kv_heads(self, start: int, end: int) -> "RotationSet":
        """Rotations of KV heads [start, end) (a tensor-parallel rank's share); shared
        rotations ([1, D, D]) are kept as they are."""
        def cut(rots):
            return [r if r.shape[0] == 1 else r[start:end] for r in rots]
        return RotationSet(cut(self.k_rot), cut(self.v_rot), self.k_clip, self.v_clip, dict(self.metadata))


def data_free_rotations(num_layers: int, num_kv_heads: int, head_dim: int, model_name: str = "") -> RotationSet:
    """Hadamard · bit-reversal for every layer, shared across heads, default clip ratios."""
    rot = hadamard_bitrev(head_dim)[None]
    meta = _metadata(model_name, num_layers, num_kv_heads, head_dim, per_head=False,
                     calibration_tokens=0, calibration_source=DATA_FREE_ROTATIONS)
    return RotationSet([rot] * num_layers, [rot] * num_layers,
                       [DEFAULT_K_CLIP] * num_layers, [DEFAULT_V_CLIP] * num_layers, meta)


def _metadata(model_name, num_layers, num_kv_heads, head_dim, per_head, calibration_tokens,
              calibration_source, rope_applied=True) -> dict[str, str]:
    return {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "model_name": model_name,
        "num_layers": str(num_layers), "num_kv_heads": str(num_kv_heads), "head_dim": str(head_dim),
        "rope_applied": str(rope_applied).lower(), "per_head": str(per_head).lower(),
        "calibration_tokens": str(calibration_tokens), "calibration_source": calibration_source,
        "created_by": f"oscar-sglang {version('oscar-sglang')}",
    }


def make_rotation_set(k_rot, v_rot, k_clip, v_clip, *, model_name: str, num_kv_heads: int,
                      calibration_tokens: int, calibration_source: str,
                      key_bits: int = DEFAULT_KEY_BITS) -> RotationSet:
    """Assemble a RotationSet with complete metadata (what the calibrator writes)."""
    meta = _metadata(model_name, len(k_rot), num_kv_heads, k_rot[0].shape[-1],
                     per_head=k_rot[0].shape[0] > 1, calibration_tokens=calibration_tokens,
                     calibration_source=calibration_source)
    meta["key_bits"] = str(key_bits)
    return RotationSet([r.float() for r in k_rot], [r.float() for r in v_rot],
                       [float(c) for c in k_clip], [float(c) for c in v_clip], meta)


def save_rotations(path: str, rotations: RotationSet) -> None:
    tensors = {}
    for layer in range(rotations.num_layers):
        # separate contiguous storage per tensor: safetensors refuses shared or strided ones
        tensors[f"layers.{layer}.k_rot"] = rotations.k_rot[layer].float().clone(memory_format=torch.contiguous_format)
        tensors[f"layers.{layer}.v_rot"] = rotations.v_rot[layer].float().clone(memory_format=torch.contiguous_format)
        tensors[f"layers.{layer}.k_clip"] = torch.tensor(rotations.k_clip[layer], dtype=torch.float32)
        tensors[f"layers.{layer}.v_clip"] = torch.tensor(rotations.v_clip[layer], dtype=torch.float32)
    meta = {k: v for k, v in rotations.metadata.items() if k != "source_path"}
    save_file(tensors, path, metadata=meta)


def load_rotations(path: str) -> RotationSet:
    """Read and validate an artifact; every problem is a RotationFileError naming it."""
    if not os.path.isfile(path):
        raise RotationFileError(
            f"rotation file {path!r} does not exist; pass the path written by `oscar-sglang "
            f"calibrate --out`, or pass --oscar-rotations {DATA_FREE_ROTATIONS} for data-free "
            "rotations")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
        raise RotationFileError(
            f"rotation file {path!r} is not a readable safetensors file ({e}); it may be truncated "
            "or corrupted: calibrate it again") from e
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise RotationFileError(f"rotation file {path!r} lacks metadata {missing}; it was not "
                                "written by `oscar-sglang calibrate`: calibrate it again")
    if metadata["format"] != FORMAT_NAME or metadata["format_version"] != str(FORMAT_VERSION):
        raise RotationFileError(
            f"rotation file {path!r} has format {metadata['format']} version "
            f"{metadata['format_version']}, this oscar-sglang reads {FORMAT_NAME} version "
            f"{FORMAT_VERSION}: calibrate it again with this version")
    num_layers, heads, dim = (_positive_int(metadata, k, path) for k in ("num_layers", "num_kv_heads", "head_dim"))
    if metadata.get("key_bits", str(UNRECORDED_KEY_BITS)) not in [str(b) for b in SUPPORTED_KEY_BITS]:
        raise RotationFileError(f"rotation file {path!r} has key_bits={metadata['key_bits']!r} in its "
                                f"metadata, expected one of {list(SUPPORTED_KEY_BITS)}: calibrate it again")
    # counted first: a corrupted num_layers must not make us build a huge set of names
    if len(tensors) != 4 * num_layers:
        raise RotationFileError(
            f"rotation file {path!r} holds {len(tensors)} tensors, but its metadata says "
            f"{num_layers} layers ({4 * num_layers} tensors): calibrate it again")
    unexpected = sorted(set(tensors) - {f"layers.{layer}.{kind}_{part}" for layer in range(num_layers)
                                        for kind in "kv" for part in ("rot", "clip")})
    if unexpected:
        raise RotationFileError(
            f"rotation file {path!r} holds {unexpected[0]!r}, which is not one of the "
            f"layers.{{0..{num_layers - 1}}}.{{k,v}}_{{rot,clip}} its metadata calls for: "
            "calibrate it again")
    bad_dtype = next((n for n in sorted(tensors) if tensors[n].dtype != torch.float32), None)
    if bad_dtype is not None:
        raise RotationFileError(f"{bad_dtype} in {path!r} is {tensors[bad_dtype].dtype}, expected "
                                "float32: calibrate it again")
    rots = {"k": [], "v": []}
    clips = {"k": [], "v": []}
    for layer in range(num_layers):
        for kind in "kv":
            name = f"layers.{layer}.{kind}_rot"
            rot = tensors[name]
            if rot.ndim != 3 or rot.shape[0] not in (1, heads) or rot.shape[1:] != (dim, dim):
                raise RotationFileError(f"{name} in {path!r} has shape {tuple(rot.shape)}, expected "
                                        f"[1 or {heads}, {dim}, {dim}]: calibrate it again")
            err = (rot.transpose(1, 2) @ rot - torch.eye(dim)).abs().max().item()
            if not err <= ORTHOGONALITY_TOLERANCE:
                raise RotationFileError(f"{name} in {path!r} is not orthogonal (max |RᵀR - I| = "
                                        f"{err:.2e}): calibrate it again")
            clip_t = tensors[f"layers.{layer}.{kind}_clip"]
            clip = float(clip_t) if clip_t.ndim == 0 else float("nan")
            if not 0.0 < clip <= 1.0:
                raise RotationFileError(f"layers.{layer}.{kind}_clip in {path!r} is {clip_t.tolist()}, "
                                        "expected a quantile in (0, 1]: calibrate it again")
            rots[kind].append(rot)
            clips[kind].append(clip)
    # sorted: safetensors hands the header's metadata back in no fixed order, and reports copy it
    metadata = dict(sorted(metadata.items()), source_path=path)
    return RotationSet(rots["k"], rots["v"], clips["k"], clips["v"], metadata)


def _positive_int(metadata: dict[str, str], key: str, path: str) -> int:
    value = metadata[key]
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        raise RotationFileError(f"rotation file {path!r} has {key}={value!r} in its metadata, "
                                "expected a positive integer: calibrate it again")
    return int(value)
