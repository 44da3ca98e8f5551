"""Outlier key rows kept unclipped: the layer-wide clip costs the needle (a few large features make
a key stand out) and saves perplexity (most rows are better clipped). Here the rows that the clip
would cut most keep their range. A harness simulation of a write rule the server does not have;
the stored format is the served one unless a row is widened.

Per layer and KV head, each rotated key row's clipped energy ||x - clip(x)||² / ||x||² at the
file's clip ratio ranks it; the top `fraction` of the sequence's rows after the sinks (a stand-in
for a threshold calibrated per layer) are stored unclipped, at `bits` bits (2: the served width,
no bits added, the reader cannot tell; 4: widened rows cost 2 bits more per element of the row),
the rest as served. Values are the served 2-bit values; sinks and recent positions stay exact.
The served format runs beside them as the control. Writes outlier-rows-NAME.{json,md}.

    python -m benchmarks.outlier_rows --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors --variants 0.1x2,0.25x2,0.1x4
"""

import argparse

import torch

from benchmarks.harness_args import score_beside_served, simulation_parser
from oscar_sglang.calibration.kv_formats import KeyVariant, asymmetric_roundtrip
from oscar_sglang.kernels.reference import clip_rows
from oscar_sglang.kernels.rotation_file import RotationSet

KEY_BITS = 2


def clipped_energy(rows: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """rows [..., D] and them clipped -> the fraction of each row's energy the clip removes [...]."""
    x = rows.float()
    return (x - clipped).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-30)


def outlier_roundtrip(rows: torch.Tensor, start: int, clip: float, fraction: float, bits: int) -> torch.Tensor:
    """rows [B, H, L, D]: the served 2-bit codes clipped at `clip`, except, per batch row and
    head, the `fraction` of positions >= start with the largest clipped energy, which get
    unclipped `bits`-bit codes. float32, same shape."""
    head_dim = rows.shape[-1]
    clipped = clip_rows(rows, clip)
    out = asymmetric_roundtrip(clipped, KEY_BITS, head_dim)
    energy = clipped_energy(rows, clipped)
    energy[:, :, :start] = -1.0
    count = int(fraction * max(rows.shape[2] - start, 0))
    if count:
        top = energy.topk(count, dim=2).indices[..., None].expand(-1, -1, -1, head_dim)
        wide = asymmetric_roundtrip(rows, bits, head_dim)
        out.scatter_(2, top, wide.gather(2, top))
    return out


class OutlierRowKeys(KeyVariant):
    """The served 2-bit keys, the top `fraction` of rows by clipped energy unclipped at `bits`
    bits; the served values."""

    def __init__(self, rotations: RotationSet, head_dim: int, fraction: float, bits: int):
        super().__init__(f"top {fraction:g} rows unclipped, {bits}-bit", rotations, head_dim, key_bits=KEY_BITS)
        self.fraction, self.wide_bits = fraction, bits
        self.bits = self.mean_bits(KEY_BITS + fraction * (bits - KEY_BITS) + self.format.meta_bits_per_element)

    def quantize_keys(self, layer, rows):
        return outlier_roundtrip(rows, self.sink, self.rotations.k_clip[layer], self.fraction, self.wide_bits)


def parse_variant(text: str) -> tuple[float, int]:
    """"0.1x2" -> (fraction 0.1, bits 2)."""
    fraction, _, bits = text.partition("x")
    try:
        f, b = float(fraction), int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected FRACTIONxBITS, e.g. 0.1x2") from None
    if not 0 < f < 1 or b not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"variant {text!r}: fraction in (0, 1), bits 2, 3 or 4")
    return f, b


def main(argv=None) -> int:
    p = simulation_parser(__doc__, "rotation file whose rotations and clips are used")
    p.add_argument("--variants", type=lambda s: [parse_variant(v) for v in s.split(",")], required=True,
                   help="comma list of FRACTIONxBITS, e.g. 0.1x2,0.1x4")
    args = p.parse_args(argv)
    score_beside_served(args, argv, "outlier_rows", "keys",
                        lambda rotations, head_dim: [OutlierRowKeys(rotations, head_dim, f, b) for f, b in args.variants],
                        "outlier-row variants use its rotations and clips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
