"""Which key and value code widths keep retrieval: a harness simulation of widths the served format
does not have (it stores 2- or 4-bit keys and 2-bit values, kernels/format.py), to say which one
is worth building. Each KEYxVALUE width pair reads one layer's keys and values through a rotation
file's rotations and clips, quantized asymmetrically per token in groups of head_dim at that width
(kv_formats.asymmetric_roundtrip), with the BF16 windows as served; scored by passkey retrieval
(harness prompts, Wilson intervals) and by perplexity, KL and top-1 against BF16 on held-out text.
A 1-bit side is clipped at the |x| quantile that puts a Gaussian's two levels at ±E|x|
(ONE_BIT_CLIP) instead of the file's clips, which were chosen for 2 bits. Writes
code-widths-NAME.{json,md}.

    python -m benchmarks.code_widths --model smollm2-135m-instruct --data paul-graham-essays \\
        --rotations benchmarks/results/smollm2-135m-instruct-k4.oscar.safetensors --widths 3x2,3x1
"""

import argparse

from benchmarks.cli_args import pairs_of
from benchmarks.harness_args import (
    add_harness_args,
    add_scoring_args,
    model_and_rotations,
    score_formats,
    write_formats_report,
)
from oscar_sglang.calibration.datasets import resolve_data, token_stream
from oscar_sglang.calibration.kv_formats import META_BITS, Int2Format, KVFormat, asymmetric_roundtrip, rotated_roundtrip
from oscar_sglang.kernels.reference import clip_rows
from oscar_sglang.kernels.rotation_file import RotationSet

# P(|x| < sqrt(2/pi)·sigma) for a Gaussian: clipping there puts the 1-bit levels at ±E|x|, the
# levels of the optimal 1-bit quantizer.
ONE_BIT_CLIP = 0.576


# "3x2,3x1" -> [(3, 2), (3, 1)]: key bits x value bits, each 1..8
parse_widths = pairs_of(int, lambda pair: all(1 <= b <= 8 for b in pair), "KEYxVALUE bit pairs such as 3x2,3x1")


class CodeWidths(Int2Format):
    """Keys at `key_bits` and values at `value_bits` in the rotated space of `rotations`, one
    quantization group per head; sinks and recent positions exact (BF16), as served (Int2Format's
    windows and bit accounting, other code widths)."""

    def __init__(self, rotations: RotationSet, head_dim: int, key_bits: int, value_bits: int):
        super().__init__(f"k{key_bits}v{value_bits}", rotations, head_dim)
        self.widths, self.head_dim = {"k": key_bits, "v": value_bits}, head_dim
        self.bits = (key_bits + value_bits) / 2 + META_BITS / head_dim

    def _roundtrip(self, x, rot, clip, bits):
        clip = ONE_BIT_CLIP if bits == 1 else clip
        return rotated_roundtrip(x, rot, lambda rows: asymmetric_roundtrip(clip_rows(rows, clip), bits, self.head_dim))

    def kv(self, layer, key, value):
        r = self.rotations
        k_exact, k_quant = self._roundtrip(key, r.k_rot[layer], r.k_clip[layer], self.widths["k"])
        v_exact, v_quant = self._roundtrip(value, r.v_rot[layer], r.v_clip[layer], self.widths["v"])
        return k_exact, k_quant, v_exact, v_quant


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_harness_args(p)
    p.add_argument("--rotations", required=True, help="rotation file whose rotations and clips are used")
    p.add_argument("--widths", type=parse_widths, required=True, help="KEYxVALUE bit pairs, e.g. 3x2,3x1")
    add_scoring_args(p)
    args = p.parse_args(argv)
    model, tokenizer, name, geo, rotations = model_and_rotations(args)
    formats = [KVFormat()] + [CodeWidths(rotations, geo.head_dim, k, v) for k, v in args.widths]
    stream = token_stream(tokenizer, resolve_data(args.data))
    rows = score_formats(model, tokenizer, formats, stream, args)
    write_formats_report(args, argv, "code_widths", name, rows, "keys x values",
                         [f"rotations: {args.rotations} ({rotations.metadata.get('calibration_source')}, "
                          f"key clips for {rotations.key_bits}-bit keys)"],
                         rotations=dict(rotations.metadata), one_bit_clip=ONE_BIT_CLIP)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
