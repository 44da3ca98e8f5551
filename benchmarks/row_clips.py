"""Clips chosen per key row: does picking each row's clip by its own quantization error keep both
the needle (rows whose few large features make them stand out, which a layer-wide clip cuts) and
the perplexity (rows whose spread a clip helps)? A harness simulation of a write path the server
does not have; the stored format is the served one (2-bit per-token keys, fp16 scale and minimum),
so the bits per element are unchanged.

Each rotated key row is quantized under every candidate clip and keeps the one of least squared
error in the rotated space, ties to the milder clip:

- "quantile": the candidates are clips at quantiles of |x| (clip_rows), GRID;
- "shrink": the row's [min, max] shrunk about its midpoint by each factor of SHRINK (no sort: what
  a write kernel can afford per row).

Values are the served 2-bit values; sinks and recent positions stay exact. The served format runs
beside them as the control. Writes row-clips-NAME.{json,md}.

    python -m benchmarks.row_clips --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors --variants quantile,shrink
"""

import torch

from benchmarks.cli_args import choice_list
from benchmarks.harness_args import score_beside_served, simulation_parser
from oscar_sglang.calibration.kv_formats import KeyVariant, asymmetric_roundtrip, range_roundtrip
from oscar_sglang.kernels.reference import clip_rows
from oscar_sglang.kernels.rotation_file import RotationSet

KEY_BITS = 2
GRID = (1.0, 0.96, 0.92, 0.88, 0.84, 0.80, 0.76)
SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
KINDS = ("quantile", "shrink")


def candidates(rows: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """rows [..., D] -> every candidate's dequantized rows [C, ..., D]."""
    x = rows.float()
    if kind == "quantile":
        return torch.stack([asymmetric_roundtrip(clip_rows(x, c), bits, x.shape[-1]) for c in GRID])
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    return torch.stack([range_roundtrip(x, mid - f * (mid - lo), mid + f * (hi - mid), bits) for f in SHRINK])


def best_of(rows: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    """options [C, B, H, L, D] of rows [B, H, L, D]: per row the option of least squared error;
    the first of equal ones."""
    err = options - rows.float()[None]
    pick = (err * err).sum(-1).argmin(0)  # [B, H, L]; argmin returns the first minimum
    return torch.gather(options, 0, pick[None, ..., None].expand(1, *options.shape[1:]))[0]


class RowClippedKeys(KeyVariant):
    """The served 2-bit keys with each row's clip chosen by its own error; the served values."""

    def __init__(self, rotations: RotationSet, head_dim: int, kind: str):
        super().__init__(f"row clips by error, {kind}", rotations, head_dim, key_bits=KEY_BITS)
        self.kind = kind

    def quantize_keys(self, layer, rows):
        return best_of(rows, candidates(rows, self.kind, KEY_BITS))


def main(argv=None) -> int:
    p = simulation_parser(__doc__, "rotation file whose rotations (and the values' clips) are used")
    p.add_argument("--variants", type=choice_list(KINDS, "variants"), required=True, help="comma list of quantile, shrink")
    args = p.parse_args(argv)
    score_beside_served(args, argv, "row_clips", "keys",
                        lambda rotations, head_dim: [RowClippedKeys(rotations, head_dim, v) for v in args.variants],
                        "row-clip rows ignore its key clips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
