"""KV-cache formats under test: what a key / value tensor reads back as after the cache stored it.

Every format maps one layer's key and value [B, H_kv, L, D] (post-RoPE, float32) to
(k_exact, k_quant, v_exact, v_quant): the values a query reads for a position inside its exact
windows (the first `sink` positions and its last `recent` ones) and outside them. Formats
without windows have sink = recent = 0 and only the quantized pair is read.
"""

import torch

from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, OscarFormat
from oscar_sglang.kernels.reference import decode_kv, encode_kv, rotate, unrotate
from oscar_sglang.kernels.rotation_file import RotationSet

BF16_BITS = 16
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
META_BITS = 32  # fp16 scale + fp16 minimum per quantization group
KIVI_BLOCK = 32


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def range_roundtrip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                    meta_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """x [..., n] quantized on [lo, hi] [..., 1] to `bits`-bit codes (minimum and scale stored as
    `meta_dtype`, fp8 saturating; round half up; values outside clamp to the end levels) and
    dequantized: float32, x's shape."""
    def stored(t):
        if meta_dtype == torch.float8_e4m3fn:
            t = t.clamp(-FP8_MAX, FP8_MAX)
        return t.to(meta_dtype).float()

    levels = (1 << bits) - 1
    m, s = stored(lo), stored((hi - lo) / levels)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return torch.floor((x.float() - m) * inv + 0.5).clamp(0, levels) * s + m


def asymmetric_roundtrip(x: torch.Tensor, bits: int, group: int, meta_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Quantize groups of `group` consecutive values of the last dim to `bits` bits, asymmetric
    (minimum and scale as `meta_dtype`, fp16 by default; round half up, as kernels.reference does
    for 2 bits), and dequantize: float32, same shape."""
    g = x.float().unflatten(-1, (-1, group))
    return range_roundtrip(g, g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits, meta_dtype).flatten(-2)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] (attention layout) -> [B*L, H, D] (cache layout, one row per token)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def from_tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of `to_tokens`: [B*L, H, D] -> [B, H, L, D]."""
    return x.reshape(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)


def rotated_roundtrip(x: torch.Tensor, rot: torch.Tensor, quantize) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, quantized) of x [B, H, L, D] read in the space of rot [H or 1, D, D]: the rotated
    rows stored in BF16, and `quantize` of them (rotated [B, H, L, D] -> float32 of that shape),
    each rotated back."""
    rot, batch = rot.to(x.device), x.shape[0]
    rotated = from_tokens(rotate(to_tokens(x), rot), batch)

    def back(y):
        return from_tokens(unrotate(to_tokens(y), rot), batch)

    return back(bf16(rotated)), back(quantize(rotated))


class KVFormat:
    """Base: exact BF16 storage, no windows. Subclasses override `kv` and the bit counts."""

    name = "bf16"
    bits = BF16_BITS  # physical bits per stored K or V element
    sink = 0
    recent = 0

    def kv(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        k, v = bf16(key), bf16(value)
        return k, k, v, v

    def effective_bits(self, length: int) -> float:
        """Bits per element of one `length`-token sequence, full-precision copies included."""
        return self.bits


class Fp8Format(KVFormat):
    """FP8 e4m3 with scale 1.0 (values beyond ±448 saturate, as a satfinite conversion does)."""

    name, bits = "fp8", 8

    def kv(self, layer, key, value):
        def cast(x):
            return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        k, v = cast(key), cast(value)
        return k, k, v, v


class Int4Format(KVFormat):
    """INT4, per token, asymmetric, groups of `group` dims."""

    name = "int4"

    def __init__(self, group: int):
        self.group = group
        self.bits = 4 + META_BITS / group

    def kv(self, layer, key, value):
        k, v = asymmetric_roundtrip(key, 4, self.group), asymmetric_roundtrip(value, 4, self.group)
        return k, k, v, v


class Kivi2Format(KVFormat):
    """KIVI-2: keys quantized per channel over blocks of 32 consecutive tokens, values per token
    in groups of 32 dims, 2 bits; the last `recent` tokens (KIVI's residual) stay in BF16.

    Only whole blocks are quantized: a partial last block lies inside every query's residual
    (recent >= 32), which matches KIVI flushing the residual a block at a time."""

    name = "kivi2"
    bits = 2 + META_BITS / KIVI_BLOCK

    def __init__(self, recent: int = DEFAULT_RECENT_TOKENS):
        if recent < KIVI_BLOCK:
            raise ValueError(f"KIVI's residual must hold at least one {KIVI_BLOCK}-token block")
        self.recent = recent

    def kv(self, layer, key, value):
        k_exact, v_exact = bf16(key), bf16(value)
        whole = key.shape[2] // KIVI_BLOCK * KIVI_BLOCK
        blocks = key[:, :, :whole].unflatten(2, (-1, KIVI_BLOCK)).transpose(-1, -2)  # [B,H,n,D,32]
        k_quant = k_exact.clone()
        k_quant[:, :, :whole] = asymmetric_roundtrip(blocks, 2, KIVI_BLOCK).transpose(-1, -2).flatten(2, 3)
        return k_exact, k_quant, v_exact, asymmetric_roundtrip(value, 2, KIVI_BLOCK)

    def effective_bits(self, length):
        residual = min(length, self.recent)
        return (self.bits * (length - residual) + BF16_BITS * residual) / length


class Int2Format(KVFormat):
    """OSCAR-2 as the server stores it (kernels.reference.encode_kv / decode_kv): rotate, clip,
    2-bit value groups and `key_bits`-bit key groups; sinks and recent positions read from the
    BF16 rotated copy. `sides` "k" or "v" reads only keys or only values from INT2 and the other
    side exact (a diagnosis: which side loses what)."""

    def __init__(self, name: str, rotations: RotationSet, head_dim: int, group_size: int | None = None,
                 sink: int = DEFAULT_SINK_TOKENS, recent: int = DEFAULT_RECENT_TOKENS, sides: str = "kv",
                 key_bits: int = DEFAULT_KEY_BITS):
        self.name, self.rotations, self.sides = name, rotations, sides
        self.format = OscarFormat(head_dim, group_size, key_bits=key_bits)
        self.bits = self.format.bits_per_element
        self.sink, self.recent = sink, recent

    def _roundtrip(self, x, rot, clip, bits):
        rot = rot.to(x.device)
        codes, meta, window = encode_kv(to_tokens(x), rot, clip, self.format, bits)
        exact = unrotate(window.float(), rot)
        quant = unrotate(decode_kv(codes, meta, self.format), rot)
        return from_tokens(exact, x.shape[0]), from_tokens(quant, x.shape[0])

    def kv(self, layer, key, value):
        r = self.rotations
        k_exact, k_quant = self._roundtrip(key, r.k_rot[layer], r.k_clip[layer], self.format.code_bits("k"))
        v_exact, v_quant = self._roundtrip(value, r.v_rot[layer], r.v_clip[layer], self.format.code_bits("v"))
        return (k_exact, k_quant if "k" in self.sides else k_exact,
                v_exact, v_quant if "v" in self.sides else v_exact)

    def effective_bits(self, length):
        return self.bits + min(length, self.sink + self.recent) * BF16_BITS / length


class KeyVariant(Int2Format):
    """Int2Format with its keys read through `quantize_keys` in the space of `key_rotation` (the
    rotation file's key rotation unless a subclass picks another) and the served 2-bit values: the
    base of the harness simulations of key formats the server does not have."""

    def mean_bits(self, key_bits: float) -> float:
        """Bits per element of keys stored at `key_bits` (meta included) beside the served values."""
        return (key_bits + self.format.code_bits("v") + self.format.meta_bits_per_element) / 2

    def key_rotation(self, layer: int) -> torch.Tensor:
        return self.rotations.k_rot[layer]

    def quantize_keys(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Rotated keys [B, H, L, D] -> what the format reads back, float32 of that shape."""
        raise NotImplementedError

    def kv(self, layer, key, value):
        r = self.rotations
        k_exact, k_quant = rotated_roundtrip(key, self.key_rotation(layer), lambda rows: self.quantize_keys(layer, rows))
        v_exact, v_quant = self._roundtrip(value, r.v_rot[layer], r.v_clip[layer], self.format.code_bits("v"))
        return k_exact, k_quant, v_exact, v_quant


def identity_rotations(num_layers: int, head_dim: int) -> RotationSet:
    """No rotation and no clipping (clip quantile 1.0 = the row maximum): naive INT2."""
    eye = [torch.eye(head_dim)[None]] * num_layers
    return RotationSet(eye, eye, [1.0] * num_layers, [1.0] * num_layers)
