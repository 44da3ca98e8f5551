"""The CUDA split kernel (kernels/int2_split.cu) of this tree against another version of its text,
on one GPU and in one process: the split launch of a decode step that runs it (Qwen3-8B layer:
H_q 32, H_kv 8, D 128; the served key width; the library's split count) at each --shapes point,
the two timed alternately --rounds times (median µs of each, CUDA graph, L2 flushed), after
comparing their partials.

The other version is a folder with its kernels/int2_split.cu and, where it has one,
kernels/int2_split_ptx.cuh; it must take this tree's generated definitions and arguments:

    mkdir -p /tmp/base && git show REV:kernels/int2_split.cu > /tmp/base/int2_split.cu
    python -m benchmarks.tuning.split_kernel_ab --baseline /tmp/base --shapes 32768x8,32768x32

Writes <out-dir>/split_kernel_ab_<gpu>.txt and .json and prints the table.
"""

import argparse
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch
from oscar_sglang.kernels import decode as dk
from oscar_sglang.kernels import int2_split
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, SUPPORTED_KEY_BITS, OscarFormat

from benchmarks.gpu_timing import layer_decode_inputs, median_us, oscar_decode_bytes, release
from benchmarks.layers import QWEN3_8B
from benchmarks.records import machine_info, now_iso


def baseline_source(folder: Path, kernel: int2_split.SplitKernel) -> str:
    """The other version's complete text for `kernel` (no helpers file: they are in its .cu)."""
    helpers = folder / int2_split.PTX_HELPERS.name
    return int2_split.kernel_source(kernel, helpers.read_text() if helpers.exists() else "",
                                    (folder / int2_split.SOURCE.name).read_text())


def partials(planned: int2_split.PlannedLaunch, function, step: dk.DecodeStep) -> torch.Tensor:
    """[B, H_q, parts, D + 1] what `function` writes: part_o beside part_lse, from NaN."""
    step.part_o.fill_(float("nan"))
    step.part_lse.fill_(float("nan"))
    planned.run(function, step.q_rot.device)
    return torch.cat([step.part_o, step.part_lse[..., None]], dim=-1)


def measure(context: int, batch: int, baseline: Path, key_bits: int, rounds: int, rep_ms: int) -> dict:
    """One point: both kernels' partials compared, then their split launches timed alternately."""
    problem = layer_decode_inputs(QWEN3_8B, batch, context, key_bits=key_bits)
    step = dk.decode_step(*problem.args, launch=dk.DECODE_LAUNCH.with_split_kernel("cuda"))
    step.rotate_q()
    planned = int2_split.plan_launch(*step.cuda_split_args())
    device = step.q_rot.device.index
    arch = int2_split.device_arch(device)
    functions = {
        "tree": int2_split.load_function(device, int2_split.compile_kernel(planned.kernel, arch).cubin),
        "baseline": int2_split.load_function(
            device, int2_split.compile_source(baseline_source(baseline, planned.kernel), arch).cubin),
    }
    tree, base = (partials(planned, functions[name], step) for name in ("tree", "baseline"))
    if not torch.equal(tree.isnan(), base.isnan()):
        raise RuntimeError(f"{context}x{batch}: the two kernels leave different partials unwritten")
    written = ~tree.isnan()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            samples[name].append(median_us(lambda: planned.run(function, step.q_rot.device), rep_ms)[0])
    return {
        "context": context, "batch": batch, "splits": step.splits,
        "bytes": oscar_decode_bytes(QWEN3_8B, OscarFormat(QWEN3_8B.head_dim, key_bits=key_bits), batch, context),
        # equal entries (the lse of a part without positions is -inf in both) differ by 0
        "max_abs_difference": torch.where(tree == base, 0.0, (tree - base).abs())[written].max().item(),
        "us": {name: statistics.median(values) for name, values in samples.items()},
        "samples_us": samples,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True,
                        help="folder with the other version's int2_split.cu (and int2_split_ptx.cuh if it has one)")
    parser.add_argument("--shapes", default="32768x8,32768x32,131072x8,131072x1,8192x1",
                        help="CONTEXTxBATCH points (default: %(default)s)")
    parser.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two kernels per point")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench time per measurement")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not (args.baseline / int2_split.SOURCE.name).exists():
        parser.error(f"--baseline {args.baseline} holds no {int2_split.SOURCE.name}: put the other version's "
                     "kernels/int2_split.cu there (git show REV:kernels/int2_split.cu)")
    if not torch.cuda.is_available():
        print("split_kernel_ab needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    device = torch.cuda.get_device_name()
    command = shlex.join([sys.executable, "-m", "benchmarks.tuning.split_kernel_ab", *sys.argv[1:]])
    lines = [f"{device}; {args.key_bits}-bit keys; split launch only, median of {args.rounds} alternated medians",
             f"command: {command}", "",
             "| context × batch | splits | tree µs | baseline µs | tree / baseline | max abs difference |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    points = []
    for context, batch in shapes:
        point = measure(context, batch, args.baseline, args.key_bits, args.rounds, args.rep_ms)
        release()  # the point's buffers, before the next one's
        points.append(point)
        us = point["us"]
        lines.append(f"| {context} × {batch} | {point['splits']} | {us['tree']:.1f} | {us['baseline']:.1f} | "
                     f"{us['tree'] / us['baseline']:.3f} | {point['max_abs_difference']:.3g} |")
        print(lines[-1], flush=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"split_kernel_ab_{slug}.txt").write_text("\n".join(lines) + "\n")
    record = {"benchmark": "split_kernel_ab", "created": now_iso(), "machine": machine_info(), "command": command,
              "baseline": str(args.baseline), "key_bits": args.key_bits, "points": points}
    (args.out_dir / f"split_kernel_ab_{slug}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
