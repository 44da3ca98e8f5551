"""Scale-only codes: does the per-token minimum earn its 16 bits? A harness simulation of a format
the server does not have. Each KEYxVALUE width pair reads one layer's keys and values through a
rotation file's rotations, then quantizes every rotated token row (one group per head) to the
Lloyd-Max levels of a unit Gaussian times the row's RMS, stored as one fp16 scale: no minimum and
no clipping (the Lloyd-Max levels are the optimal clip for a Gaussian row, which the rotation
makes of each row). That is 16 instead of 32 meta bits per group; sinks and recent positions stay
exact (BF16) as served. The served format at the file's key width (asymmetric, fp16 scale and
minimum, the file's clips) runs beside it as the control. Scored by passkey retrieval (harness
prompts, Wilson intervals) and by perplexity, KL and top-1 against BF16 on held-out text. Writes
scale-only-codes-NAME.{json,md}.

    python -m benchmarks.scale_only_codes --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct.oscar.safetensors --widths 2x2,3x2
"""

import functools

import torch
from scipy.stats import norm

from benchmarks.cli_args import pairs_of
from benchmarks.harness_args import score_beside_served, simulation_parser
from oscar_sglang.calibration.kv_formats import Int2Format, rotated_roundtrip
from oscar_sglang.kernels.rotation_file import RotationSet

SCALE_BITS = 16  # one fp16 scale per group

# "2x2,3x2" -> [(2, 2), (3, 2)]: key bits x value bits, each 1..4
parse_widths = pairs_of(int, lambda pair: all(1 <= b <= 4 for b in pair), "KEYxVALUE bit pairs such as 2x2,3x2")


@functools.cache
def lloyd_max_levels(bits: int, iterations: int = 500) -> torch.Tensor:
    """The 2**bits reconstruction levels minimizing the mean squared error of a unit Gaussian
    (Lloyd's iteration: thresholds at midpoints, levels at the conditional means), ascending."""
    levels = norm.ppf((torch.arange(1 << bits, dtype=torch.float64) + 0.5).numpy() / (1 << bits))
    for _ in range(iterations):
        edges = [-float("inf"), *((levels[1:] + levels[:-1]) / 2), float("inf")]
        levels = [(norm.pdf(a) - norm.pdf(b)) / (norm.cdf(b) - norm.cdf(a)) for a, b in zip(edges[:-1], edges[1:])]
        levels = torch.tensor(levels, dtype=torch.float64).numpy()
    return torch.tensor(levels, dtype=torch.float32)


def scale_only_roundtrip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows [..., D] to the nearest Lloyd-Max level times the row's RMS (fp16), dequantized:
    float32, same shape."""
    levels = lloyd_max_levels(bits).to(x.device)
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt().half().float()
    unit = x.float() / torch.where(rms > 0, rms, torch.ones_like(rms))
    codes = torch.bucketize(unit.contiguous(), (levels[1:] + levels[:-1]) / 2)
    return levels[codes] * rms


class ScaleOnlyCodes(Int2Format):
    """Keys at `key_bits` and values at `value_bits` as scale-only Lloyd-Max codes in the rotated
    space of `rotations`; Int2Format's windows and bit accounting."""

    def __init__(self, rotations: RotationSet, head_dim: int, key_bits: int, value_bits: int):
        super().__init__(f"scale-only k{key_bits}v{value_bits}", rotations, head_dim)
        self.widths = {"k": key_bits, "v": value_bits}
        self.bits = (key_bits + value_bits) / 2 + SCALE_BITS / head_dim

    def kv(self, layer, key, value):
        r, (kb, vb) = self.rotations, (self.widths["k"], self.widths["v"])
        k_exact, k_quant = rotated_roundtrip(key, r.k_rot[layer], lambda rows: scale_only_roundtrip(rows, kb))
        v_exact, v_quant = rotated_roundtrip(value, r.v_rot[layer], lambda rows: scale_only_roundtrip(rows, vb))
        return k_exact, k_quant, v_exact, v_quant


def main(argv=None) -> int:
    p = simulation_parser(__doc__, "rotation file whose rotations (and, for the control, clips) are used")
    p.add_argument("--widths", type=parse_widths, required=True, help="KEYxVALUE bit pairs, e.g. 2x2,3x2")
    args = p.parse_args(argv)
    score_beside_served(args, argv, "scale_only_codes", "keys x values",
                        lambda rotations, head_dim: [ScaleOnlyCodes(rotations, head_dim, k, v) for k, v in args.widths],
                        "scale-only rows ignore its clips",
                        lloyd_max_levels={b: lloyd_max_levels(b).tolist() for b in (1, 2, 3, 4)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
