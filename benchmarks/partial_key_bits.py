"""4-bit keys in only some layers: does retrieval come back when only the layers whose 2-bit keys
move the attention peak most get 4-bit keys? Ranks the layers by peak KL (attention.key_divergences)
with 2-bit keys minus with 4-bit keys on one held-out sequence, then scores passkey retrieval
(harness prompts, Wilson intervals) with 4-bit keys in the top N layers and 2-bit keys elsewhere,
each layer read through the artifact calibrated for its width. Writes partial-key-bits-NAME.{json,md}.

    python -m benchmarks.partial_key_bits --model smollm2-135m-instruct --data paul-graham-essays \\
        --k2 benchmarks/results/smollm2-135m-instruct.oscar.safetensors \\
        --k4 benchmarks/results/smollm2-135m-instruct-k4.oscar.safetensors --layers 6
"""

import argparse
import json
import shlex
import sys

import torch

from benchmarks.cli_args import parse_int_list
from benchmarks.records import markdown_table
from benchmarks.harness_args import add_harness_args
from oscar_sglang.calibration.attention import (
    attention_override,
    check_unpadded,
    exact_region,
    key_divergences,
    windowed_attention,
)
from oscar_sglang.calibration.datasets import resolve_data, token_stream
from oscar_sglang.calibration.harness import FormatResult, RetrievalSettings, machine, retrieval_metrics
from oscar_sglang.calibration.kv_formats import Int2Format, KVFormat
from oscar_sglang.calibration.models import geometry, load_model
from oscar_sglang.calibration.retrieval import Proportion
from oscar_sglang.kernels.rotation_file import load_rotations


class PartialKeyBits(KVFormat):
    """Keys and values of the layers in `wide` read through `k4`, the others through `k2`."""

    def __init__(self, k2: Int2Format, k4: Int2Format, wide: list[int], num_layers: int):
        self.name, self.k2, self.k4, self.wide = f"k4-in-{len(wide)}", k2, k4, set(wide)
        self.sink, self.recent = k2.sink, k2.recent
        self.bits = (k2.bits * (num_layers - len(wide)) + k4.bits * len(wide)) / num_layers

    def kv(self, layer, key, value):
        return (self.k4 if layer in self.wide else self.k2).kv(layer, key, value)

    def effective_bits(self, length):
        return self.bits + min(length, self.sink + self.recent) * 16 / length


class PeakKlRanking:
    """Attention handler: exact attention, and per layer the peak KL of reading its keys
    through each of `formats` (summed over the sequence)."""

    def __init__(self, formats: list[Int2Format], num_layers: int):
        self.formats, self.peak = formats, torch.zeros(num_layers, len(formats), dtype=torch.float64)

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        q, k, v = query.float(), key.float(), value.float()
        sink, recent = self.formats[0].sink, self.formats[0].recent
        _, lse = exact_region(q, k, v, scaling, sink, recent)
        for i, fmt in enumerate(self.formats):
            k_quant = fmt.kv(module.layer_idx, k, v)[1]
            self.peak[module.layer_idx, i] += key_divergences(q, k, k_quant, scaling, sink, recent, lse)[1]
        return windowed_attention(q, k, k, v, v, scaling, sink, recent).to(query.dtype), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_harness_args(p)
    p.add_argument("--k2", required=True, help="artifact calibrated for 2-bit keys")
    p.add_argument("--k4", required=True, help="artifact calibrated for 4-bit keys")
    p.add_argument("--layers", type=parse_int_list, default=[6], help="counts N of 4-bit layers (default 6)")
    p.add_argument("--rank-offset", type=int, default=36000, help="the ranking sequence starts here (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    geo = geometry(model.config)
    k2 = Int2Format("k2", load_rotations(args.k2), geo.head_dim, key_bits=2)
    k4 = Int2Format("k4", load_rotations(args.k4), geo.head_dim, key_bits=4)
    stream = token_stream(tokenizer, resolve_data(args.data))
    ranking = PeakKlRanking([k2, k4], geo.num_layers)
    ids = stream[args.rank_offset:args.rank_offset + args.seq_len][None].to(args.device)
    with torch.inference_mode(), attention_override(model, ranking, "oscar_partial_key_bits"):
        model(ids, use_cache=False, logits_to_keep=1)
    gain = ranking.peak[:, 0] - ranking.peak[:, 1]
    order = gain.argsort(descending=True).tolist()

    formats = [PartialKeyBits(k2, k4, order[:n], geo.num_layers) for n in args.layers]
    results = {f.name: FormatResult(f.name, f.bits, f.effective_bits(args.seq_len)) for f in formats}
    settings = RetrievalSettings(("passkey",), tuple(args.lengths), args.trials, args.haystack_offset, args.prompt_style)
    with torch.inference_mode():
        retrieval_metrics(model, formats, settings.prompts(tokenizer, stream), results)
    rows = [{"format": f.name, "bits_per_element": f.bits, "layers_4bit": sorted(f.wide),
             "passkey": {str(n): Proportion(sum(o), len(o)).as_dict() | {"outcomes": o}
                         for n, o in results[f.name].retrieval["passkey"].items()}} for f in formats]
    report = {"benchmark": "partial_key_bits", "model": name, "machine": machine(args.device),
              "command": shlex.join(["python", "-m", "benchmarks.partial_key_bits",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "layer_order": order, "peak_kl_gain": gain.tolist(), "results": rows}
    stem = args.name or name.lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"partial-key-bits-{stem}.json"
    path.write_text(json.dumps(report, indent=1))
    lengths = [str(n) for n in args.lengths]
    table = markdown_table(["format", "bits/elem", "4-bit layers"] + [f"passkey@{n}" for n in lengths],
                           [[r["format"], f"{r['bits_per_element']:.2f}", " ".join(map(str, r["layers_4bit"]))]
                            + [Proportion(r["passkey"][n]["successes"], r["passkey"][n]["trials"]).text()
                               for n in lengths] for r in rows])
    text = "\n".join([table, "", "Layers by peak-KL gain of 4-bit keys: " + ", ".join(map(str, order)),
                      "", f"command: `{report['command']}`", f"machine: {report['machine']}"])
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
