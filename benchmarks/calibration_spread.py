"""How far the calibrator's choices and their quality move with the calibration text: the same
calibration on disjoint slices of the data, each artifact then scored by the accuracy harness on
the same held-out text (perplexity, KL and top-1 against BF16, and retrieval of the slices'
formats). Writes calibration-spread-NAME.{json,md}.

    python -m benchmarks.calibration_spread --model smollm2-135m-instruct --data paul-graham-essays \\
        --slices 3 --tokens 12288 --seq-len 2048 --key-bits 4

Slice i reads tokens [i·T, (i+1)·T); evaluation text and retrieval haystacks start at
--eval-offset, after every slice.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.cli_args import parse_int_list
from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import markdown_table
from oscar_sglang.calibration.calibrate import calibrate
from oscar_sglang.calibration.datasets import resolve_data, split_sequences, token_stream
from oscar_sglang.calibration.harness import FormatResult, RetrievalSettings, language_metrics, machine, retrieval_metrics
from oscar_sglang.calibration.kv_formats import Int2Format, KVFormat
from oscar_sglang.calibration.models import geometry, load_model
from oscar_sglang.calibration.retrieval import PROMPT_STYLES, Proportion
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, SUPPORTED_KEY_BITS
from oscar_sglang.kernels.rotation_file import save_rotations


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="as `oscar-sglang calibrate --model`")
    p.add_argument("--gguf-file")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--slices", type=int, default=3, help="calibrations on disjoint slices (default %(default)s)")
    p.add_argument("--tokens", type=int, required=True, help="tokens per slice, held-out ones included")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS)
    p.add_argument("--eval-offset", type=int, default=40000,
                   help="evaluation text and haystacks start here (default %(default)s)")
    p.add_argument("--eval-sequences", type=int, default=4, help="perplexity windows of --seq-len (default %(default)s)")
    p.add_argument("--lengths", type=parse_int_list, default=[2048], help="passkey lengths (default 2048)")
    p.add_argument("--trials", type=int, default=40,
                   help="passkey prompts per length, 0 for perplexity only (default %(default)s)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat",
                   help="as `oscar-sglang evaluate --prompt-style` (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--artifact-dir", type=Path, help="also save each slice's rotation file here")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--name", help="report stem (default: the model name, lower case)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.slices * args.tokens > args.eval_offset:
        parser.error(f"{args.slices} slices of {args.tokens} tokens overlap the evaluation text at "
                     f"--eval-offset {args.eval_offset}")
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    geo = geometry(model.config)
    files = resolve_data(args.data)
    slices = []
    for i in range(args.slices):
        result = calibrate(model, tokenizer, name, files, tokens=args.tokens, seq_len=args.seq_len,
                           heldout_fraction=args.heldout_fraction, group_size=None, shared=False, target="auto",
                           sink=DEFAULT_SINK_TOKENS, recent=DEFAULT_RECENT_TOKENS, offset=i * args.tokens,
                           key_bits=args.key_bits, source=f"{' '.join(args.data)} slice {i}")
        if args.artifact_dir:
            args.artifact_dir.mkdir(parents=True, exist_ok=True)
            save_rotations(str(args.artifact_dir / f"slice{i}.oscar.safetensors"), result.rotations)
        slices.append(result)

    formats = [KVFormat()] + [Int2Format(f"slice{i}", r.rotations, geo.head_dim, key_bits=args.key_bits)
                              for i, r in enumerate(slices)]
    stream = token_stream(tokenizer, files)
    results = {f.name: FormatResult(f.name, f.bits, f.effective_bits(args.seq_len)) for f in formats}
    language_metrics(model, formats, split_sequences(stream, args.seq_len, args.eval_sequences, args.eval_offset),
                     results)
    if args.trials > 0:
        retrieval = RetrievalSettings(("passkey",), tuple(args.lengths), args.trials, args.eval_offset,
                                      args.prompt_style)
        retrieval_metrics(model, formats[1:], retrieval.prompts(tokenizer, stream), results)

    base = results["bf16"].perplexity
    rows = []
    for i, r in enumerate(slices):
        res = results[f"slice{i}"]
        rows.append({
            "slice": i, "tokens": [i * args.tokens, (i + 1) * args.tokens],
            "k_clip": r.rotations.k_clip, "v_clip": r.rotations.v_clip,
            "heldout_sequences": r.search.heldout_sequences,
            "unsure_layers": r.search.unsure_layers(),  # None: not known (one held-out sequence)
            "perplexity": res.perplexity, "delta_ppl": res.perplexity - base,
            "kl_vs_bf16": res.kl_sum / res.predictions, "top1_agreement": res.top1_sum / res.predictions,
            "passkey": {str(n): Proportion(sum(o), len(o)).as_dict() | {"outcomes": o}
                        for n, o in res.retrieval.get("passkey", {}).items()},
        })
    layers = len(slices[0].rotations.k_clip)
    same = {kind: sum(len({s[f"{kind}_clip"][layer] for s in rows}) == 1 for layer in range(layers)) / layers
            for kind in "kv"}
    deltas = [r["delta_ppl"] for r in rows]
    report = {
        "benchmark": "calibration_spread", "model": name, "machine": machine(args.device),
        "command": shlex.join(["python", "-m", "benchmarks.calibration_spread", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bf16_perplexity": base, "slices": rows,
        "spread": {"delta_ppl_min": min(deltas), "delta_ppl_max": max(deltas),
                   "layers_with_equal_clips": same},
    }
    stem = args.name or name.lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"calibration-spread-{stem}.json"
    json_path.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    json_path.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


def unsure_cell(row: dict) -> str:
    """The unsure-layers cell of a slice: their count, or why it is not known."""
    if row["unsure_layers"] is None:
        return f"not known ({row['heldout_sequences']} held-out sequence)"
    return str(len(row["unsure_layers"]))


def markdown(report: dict) -> str:
    rows = report["slices"]
    lengths = list(rows[0]["passkey"])
    head = ["slice", "tokens", "mean K clip", "mean V clip", "unsure layers", "ppl", "Δppl", "KL vs bf16",
            "top-1 vs bf16"] + [f"passkey@{n}" for n in lengths]
    body = []
    for r in rows:
        body.append([r["slice"], f"{r['tokens'][0]}-{r['tokens'][1] - 1}", f"{sum(r['k_clip']) / len(r['k_clip']):.3f}",
                     f"{sum(r['v_clip']) / len(r['v_clip']):.3f}", unsure_cell(r), f"{r['perplexity']:.3f}",
                     f"{r['delta_ppl']:+.3f}", f"{r['kl_vs_bf16']:.4f}", f"{100 * r['top1_agreement']:.1f}%"]
                    + [Proportion(r["passkey"][n]["successes"], r["passkey"][n]["trials"]).text() for n in lengths])
    spread = report["spread"]
    return "\n".join([
        markdown_table(head, body), "",
        f"BF16 perplexity {report['bf16_perplexity']:.3f}. Δppl over the slices: {spread['delta_ppl_min']:+.3f} to "
        f"{spread['delta_ppl_max']:+.3f}. Layers whose clip every slice chose alike: K "
        f"{100 * spread['layers_with_equal_clips']['k']:.0f} %, V {100 * spread['layers_with_equal_clips']['v']:.0f} %.",
        "", f"command: `{report['command']}`", f"machine: {report['machine']}"])


if __name__ == "__main__":
    raise SystemExit(main())
