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
import json
import shlex
import sys

import torch

from benchmarks.records import markdown_table
from benchmarks.harness_args import add_harness_args
from oscar_sglang.calibration.datasets import resolve_data, split_sequences, token_stream
from oscar_sglang.calibration.harness import (
    FormatResult,
    RetrievalSettings,
    language_metrics,
    machine,
    retrieval_metrics,
)
from oscar_sglang.calibration.kv_formats import (
    META_BITS,
    Int2Format,
    KVFormat,
    asymmetric_roundtrip,
    from_tokens,
    to_tokens,
)
from oscar_sglang.calibration.models import geometry, load_model
from oscar_sglang.calibration.retrieval import Proportion
from oscar_sglang.kernels.reference import clip_rows, rotate, unrotate
from oscar_sglang.kernels.rotation_file import RotationSet, load_rotations

# P(|x| < sqrt(2/pi)·sigma) for a Gaussian: clipping there puts the 1-bit levels at ±E|x|, the
# levels of the optimal 1-bit quantizer.
ONE_BIT_CLIP = 0.576


def parse_widths(text: str) -> list[tuple[int, int]]:
    """"3x2,3x1" -> [(3, 2), (3, 1)]: key bits x value bits, each 1..8."""
    try:
        pairs = [tuple(int(b) for b in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not all(1 <= b <= 8 for b in p) for p in pairs):
        raise argparse.ArgumentTypeError(f"--widths takes KEYxVALUE bit pairs such as 3x2,3x1, got {text!r}")
    return pairs


class CodeWidths(Int2Format):
    """Keys at `key_bits` and values at `value_bits` in the rotated space of `rotations`, one
    quantization group per head; sinks and recent positions exact (BF16), as served (Int2Format's
    windows and bit accounting, other code widths)."""

    def __init__(self, rotations: RotationSet, head_dim: int, key_bits: int, value_bits: int):
        super().__init__(f"k{key_bits}v{value_bits}", rotations, head_dim)
        self.widths, self.head_dim = {"k": key_bits, "v": value_bits}, head_dim
        self.bits = (key_bits + value_bits) / 2 + META_BITS / head_dim

    def _roundtrip(self, x, rot, clip, bits):
        rot = rot.to(x.device)
        rotated = rotate(to_tokens(x), rot)
        quant = asymmetric_roundtrip(clip_rows(rotated, ONE_BIT_CLIP if bits == 1 else clip), bits, self.head_dim)
        exact = unrotate(rotated.to(torch.bfloat16).float(), rot)
        return from_tokens(exact, x.shape[0]), from_tokens(unrotate(quant, rot), x.shape[0])

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
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=2, help="held-out sequences for perplexity (default %(default)s)")
    p.add_argument("--offset-tokens", type=int, default=40000)
    args = p.parse_args(argv)
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    geo = geometry(model.config)
    rotations = load_rotations(args.rotations)
    rotations.check_matches(geo.num_layers, geo.num_kv_heads, geo.head_dim, model=name)
    formats = [KVFormat()] + [CodeWidths(rotations, geo.head_dim, k, v) for k, v in args.widths]
    results = {f.name: FormatResult(f.name, f.bits, f.effective_bits(args.seq_len)) for f in formats}
    stream = token_stream(tokenizer, resolve_data(args.data))
    settings = RetrievalSettings(("passkey",), tuple(args.lengths), args.trials, args.haystack_offset, args.prompt_style)
    with torch.inference_mode():
        language_metrics(model, formats, split_sequences(stream, args.seq_len, args.sequences, args.offset_tokens), results)
        retrieval_metrics(model, formats[1:], settings.prompts(tokenizer, stream), results)
    rows = [results[f.name].row() for f in formats]
    report = {"benchmark": "code_widths", "model": name, "machine": machine(args.device),
              "command": shlex.join(["python", "-m", "benchmarks.code_widths", *(sys.argv[1:] if argv is None else argv)]),
              "rotations": dict(rotations.metadata), "one_bit_clip": ONE_BIT_CLIP, "results": rows}
    stem = args.name or name.lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"code-widths-{stem}.json"
    path.write_text(json.dumps(report, indent=1))
    lengths = [str(n) for n in args.lengths]
    reference = rows[0]["perplexity"]

    def passkey(row, n):
        outcome = row["retrieval"].get("passkey", {}).get(n)
        return Proportion(outcome["successes"], outcome["trials"]).text() if outcome else "—"

    table = markdown_table(
        ["keys x values", "bits/elem", "ppl (Δ)", "KL vs BF16", "top-1 vs BF16"] + [f"passkey@{n}" for n in lengths],
        [[r["format"], f"{r['bits_per_element']:.2f}", f"{r['perplexity']:.3f} ({r['perplexity'] - reference:+.3f})",
          f"{r['kl_vs_bf16']:.4f}", f"{100 * r['top1_agreement']:.1f} %"] + [passkey(r, n) for n in lengths]
         for r in rows])
    text = "\n".join([table, "", f"rotations: {args.rotations} ({rotations.metadata.get('calibration_source')}, "
                      f"key clips for {rotations.key_bits}-bit keys)", f"command: `{report['command']}`",
                      f"machine: {report['machine']}"])
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
