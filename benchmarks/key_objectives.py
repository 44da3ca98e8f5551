"""The key clip objectives side by side: one calibration (one clip search measures every
objective), then one rotation file per objective of clip_search.KEY_OBJECTIVES and one with the
default objective's rotations and unclipped keys, for the harness and the server benchmark to
compare. Prints and writes the per-layer key clips.

    python -m benchmarks.key_objectives --model smollm2-135m-instruct --data paul-graham-essays \\
        --tokens 16384 --seq-len 2048 --out-dir benchmarks/results/key-objectives

writes NAME-<objective>.oscar.safetensors, NAME-keys-unclipped.oscar.safetensors and
key-objectives.md (the clips, the command).
"""

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from oscar_sglang.calibration.calibrate import calibrate
from oscar_sglang.calibration.clip_search import KEY_OBJECTIVES
from oscar_sglang.calibration.datasets import resolve_data
from oscar_sglang.calibration.models import load_model
from oscar_sglang.kernels.format import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from oscar_sglang.kernels.rotation_file import save_rotations

UNCLIPPED = "keys-unclipped"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="as `oscar-sglang calibrate --model`")
    p.add_argument("--gguf-file")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--offset-tokens", type=int, default=0)
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--name", help="artifact stem (default: the model name, lower case)")
    args = p.parse_args(argv)
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    stem = args.name or name.lower()
    result = calibrate(model, tokenizer, name, resolve_data(args.data), tokens=args.tokens,
                       seq_len=args.seq_len, heldout_fraction=args.heldout_fraction, group_size=None,
                       shared=False, target="auto", sink=DEFAULT_SINK_TOKENS, recent=DEFAULT_RECENT_TOKENS,
                       offset=args.offset_tokens, source=" ".join(args.data))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    clips = {}
    for objective in KEY_OBJECTIVES:
        chosen = result.choose(objective)
        save_rotations(str(args.out_dir / f"{stem}-{objective}.oscar.safetensors"), chosen.rotations)
        clips[objective] = chosen.rotations.k_clip
    default = result.choose(KEY_OBJECTIVES[0]).rotations
    unclipped = replace(default, k_clip=[1.0] * default.num_layers,
                        metadata=dict(default.metadata, calibration_source=default.metadata["calibration_source"]
                                      + ", keys unclipped"))
    save_rotations(str(args.out_dir / f"{stem}-{UNCLIPPED}.oscar.safetensors"), unclipped)
    head = "| layer | " + " | ".join(f"K clip, {o}" for o in KEY_OBJECTIVES) + " | V clip |"
    lines = [head, "|---" * (len(KEY_OBJECTIVES) + 2) + "|"]
    for layer in range(default.num_layers):
        lines.append(f"| {layer} | " + " | ".join(f"{clips[o][layer]:.2f}" for o in KEY_OBJECTIVES)
                     + f" | {default.v_clip[layer]:.2f} |")
    lines += ["", "mean K clip: " + ", ".join(f"{o} {sum(clips[o]) / len(clips[o]):.3f}" for o in KEY_OBJECTIVES),
              "", f"{result.covariance_tokens} target tokens, {result.heldout_tokens} held-out tokens.",
              f"command: `{shlex.join(['python', '-m', 'benchmarks.key_objectives', *(argv or sys.argv[1:])])}`"]
    text = "\n".join(lines)
    (args.out_dir / "key-objectives.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
