"""What limits each kernel of one OSCAR decode step, read from the hardware counters (Nsight
Compute): one Qwen3-8B layer (H_q 32, H_kv 8, D 128) in the served format, per point CONTEXTxBATCH
(with @PREFIX: all requests share the first PREFIX tokens' slots, read through shared-prefix
blocks). Per kernel: duration, DRAM bytes read and their share of the counters' DRAM peak, SM
throughput, achieved and theoretical occupancy and what bounds it, warp instructions per DRAM
byte read, the busiest pipes and the leading warp stall reasons.

The tool runs itself under `ncu` once per point (--point): the child builds random inputs
(benchmarks.gpu_timing.layer_decode_inputs), runs the step until compiled and warm, then once
between cudaProfilerStart and cudaProfilerStop, so only that step's launches are profiled. ncu
replays each kernel with the clocks left as they are (--clock-control none); its durations are of
one launch with L2 warm from the replays and can differ from the benchmarks' CUDA-graph medians.

Writes <out-dir>/decode-profile.json (a list of records, one per point and kernel), .md, and each
point's raw counters as decode-profile/<point>.csv. Run on a GPU machine from the repository root:

    python -m benchmarks.tuning.decode_profile --out-dir benchmarks/results/h100

--summarize rebuilds the .json records and the .md from the CSVs already there (no GPU).
"""

import argparse
import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.records import markdown_table, now_iso, write_json
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS

POINTS = ["131072x1", "32768x8", "32768x32", "131072x32", "33792x64@32768"]
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis"]
METRICS = ["gpu__time_duration.sum", "dram__bytes_read.sum", "smsp__inst_executed.sum"]
# record field -> the raw counter that holds it (as Nsight Compute 2025.3 names them)
FIELDS = {
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "registers": "launch__registers_per_thread",
    "ns": "gpu__time_duration.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "warp_instructions": "smsp__inst_executed.sum",
    "dram_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue_per_cycle": "smsp__issue_active.avg.per_cycle_active",  # a scheduler's issue slots used
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "theoretical_occupancy_pct": "sm__maximum_warps_per_active_cycle_pct",
    "warp_cycles_per_issue": "smsp__average_warp_latency_per_inst_issued.ratio",
}
OCCUPANCY_LIMITS = {  # what bounds the blocks per SM: launch__occupancy_limit_<name>
    "registers": "launch__occupancy_limit_registers",
    "shared memory": "launch__occupancy_limit_shared_mem",
    "warps": "launch__occupancy_limit_warps",
    "blocks": "launch__occupancy_limit_blocks",
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
PIPE = re.compile(r"sm__inst_executed_pipe_([a-z0-9]+(?:_op_[a-z]+)?)\.avg\.pct_of_peak_sustained_active")
TOP = 3  # pipes and stall reasons reported per kernel


def parse_point(text: str) -> tuple[int, int, int]:
    """'CONTEXTxBATCH[@PREFIX]' -> (context, batch, shared prefix)."""
    match = re.fullmatch(r"(\d+)x(\d+)(?:@(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a point is CONTEXTxBATCH or CONTEXTxBATCH@PREFIX, got {text!r}")
    context, batch, prefix = int(match[1]), int(match[2]), int(match[3] or 0)
    if prefix > context:
        raise argparse.ArgumentTypeError(f"the shared prefix {prefix} of {text!r} is longer than its context")
    return context, batch, prefix


def csv_lines(ncu_stdout: str) -> list[str]:
    """The CSV of `ncu --csv --page raw` output (its header, a units row, then one row per launch):
    the lines from the header on that ncu wrote, not the program's own; none without a header."""
    lines = ncu_stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), len(lines))
    return [line for line in lines[start:] if line.startswith('"')]


def kernel_rows(ncu_stdout: str) -> list[dict[str, str]]:
    """The per-kernel rows of `ncu --csv --page raw` output (`csv_lines`), keyed by counter name."""
    return [row for row in csv.DictReader(csv_lines(ncu_stdout)) if row.get("ID", "").isdigit()]


def number(text: str | None) -> float | None:
    """A counter's value as a float (ncu may group digits with commas), None where absent."""
    if text is None:
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def top_named(row: dict[str, str], pattern: re.Pattern) -> list[tuple[str, float]]:
    """The TOP largest counters whose names match `pattern`, as (its group 1, value)."""
    found = [(m[1], number(value)) for name, value in row.items()
             if (m := pattern.fullmatch(name)) and m[1] != "selected"]  # "selected": issuing, not a stall
    return sorted(((n, v) for n, v in found if v is not None), key=lambda item: -item[1])[:TOP]


def kernel_record(row: dict[str, str]) -> dict:
    """One launch's fields (FIELDS), what bounds its occupancy, its busiest pipes and stalls."""
    rec = {"kernel": short_name(row.get("Kernel Name", "?"))}
    rec.update({field: number(row.get(counter)) for field, counter in FIELDS.items()})
    limits = {name: number(row.get(counter)) for name, counter in OCCUPANCY_LIMITS.items()}
    limits = {name: v for name, v in limits.items() if v is not None}
    rec["blocks_per_sm_limit"] = min(limits.values()) if limits else None
    rec["occupancy_bound_by"] = [n for n, v in limits.items() if v == rec["blocks_per_sm_limit"]]
    rec["busiest_pipes_pct"] = top_named(row, PIPE)
    rec["top_stalls_per_issue"] = top_named(row, STALL)
    ns, dram, inst = rec["ns"], rec["dram_read_bytes"], rec["warp_instructions"]
    rec["us"] = ns / 1e3 if ns else None
    rec["dram_read_gbs"] = dram / ns if ns and dram is not None else None
    rec["warp_instructions_per_byte"] = inst / dram if dram and inst is not None else None
    return rec


def short_name(name: str) -> str:
    """A kernel's name without template arguments or parameter lists."""
    return re.split(r"[<(]", name, maxsplit=1)[0].strip()


def run_child(point: str, key_bits: int) -> int:
    """Build the point's step, warm it, and run it once inside the profiled range."""
    import torch
    from oscar_sglang.kernels import decode as dk
    from oscar_sglang.kernels.shared_prefix import find_shared_prefixes

    from benchmarks.gpu_timing import layer_decode_inputs
    from benchmarks.layers import QWEN3_8B

    context, batch, prefix = parse_point(point)
    inputs = layer_decode_inputs(QWEN3_8B, batch, context, shared_prefix=prefix, key_bits=key_bits)
    shared = (find_shared_prefixes(inputs.kv_indptr, inputs.kv_indices, inputs.cache.fmt, QWEN3_8B.group)
              if prefix else None)
    step = dk.decode_step(*inputs.args, shared=shared)
    for _ in range(3):
        step.run()
    torch.cuda.synchronize()
    print(f"point {point}: split kernels {step.split_kernels}, {step.splits} splits, {step.shared_splits} shared "
          f"splits, {step.parts} partials, reduce block {tuple(step.reduction_block)}, "
          f"rotation block {step.rotation_block}", flush=True)
    torch.cuda.profiler.start()
    step.run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def profile_point(ncu: str, point: str, key_bits: int, timeout_s: int) -> tuple[str, str]:
    """(ncu's stdout, the child's summary line) of one point."""
    command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
               "--print-units", "base", *[a for s in SECTIONS for a in ("--section", s)],
               "--metrics", ",".join(METRICS),
               sys.executable, "-m", "benchmarks.tuning.decode_profile", "--child", point, "--key-bits", str(key_bits)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    summary = next((line for line in done.stdout.splitlines() if line.startswith("point ")), "")
    if done.returncode != 0 or not kernel_rows(done.stdout):
        raise RuntimeError(f"ncu on {point} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout, summary


def table(records: list[dict]) -> str:
    headers = ["point", "kernel", "grid", "regs", "µs", "DRAM GB/s", "DRAM %", "SM %", "issue slots %",
               "occ. achieved / theor. %", "bound by", "warp inst / B", "busiest pipes %", "top stalls (per issue)"]
    rows = [[r["point"], r["kernel"], r["grid"], r["registers"], r["us"], r["dram_read_gbs"], r["dram_pct"],
             r["sm_pct"], None if r["issue_per_cycle"] is None else 100 * r["issue_per_cycle"],
             f"{r['achieved_occupancy_pct'] or 0:.0f} / {r['theoretical_occupancy_pct'] or 0:.0f}",
             ", ".join(r["occupancy_bound_by"]),
             None if r["warp_instructions_per_byte"] is None else round(r["warp_instructions_per_byte"], 3),
             ", ".join(f"{n} {v:.0f}" for n, v in r["busiest_pipes_pct"]),
             ", ".join(f"{n} {v:.2f}" for n, v in r["top_stalls_per_issue"])] for r in records]
    return markdown_table(headers, rows)


def csv_path(out_dir: Path, point: str) -> Path:
    return out_dir / "decode-profile" / f"{point.replace('@', '_sp')}.csv"


def write_report(out_dir: Path, doc: dict) -> Path:
    """decode-profile.json and .md from `doc` (gpu, key_bits, command, points, steps), the
    records read from the points' CSVs."""
    doc["records"] = [{"gpu": doc["gpu"], "key_bits": doc["key_bits"], "point": point, **kernel_record(row)}
                      for point in doc["points"] for row in kernel_rows(csv_path(out_dir, point).read_text())]
    path = out_dir / "decode-profile.json"
    write_json(path, doc)
    steps = "\n".join(f"- {s}" for s in doc["steps"])
    path.with_suffix(".md").write_text(
        f"# Decode step counters ({doc['gpu']}, {doc['key_bits']}-bit keys)\n\n{steps}\n\n{table(doc['records'])}\n\n"
        f"command: `{doc['command']}`\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", default=",".join(POINTS), help="CONTEXTxBATCH[@PREFIX],... (default %(default)s)")
    p.add_argument("--key-bits", type=int, default=DEFAULT_KEY_BITS, help="key code width (default %(default)s)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per point (default %(default)s)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--summarize", action="store_true",
                   help="rebuild the .json records and .md from the CSVs and steps already in --out-dir (no GPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one point, run under ncu by the parent
    args = p.parse_args(argv)
    if args.child:
        return run_child(args.child, args.key_bits)
    if args.summarize:
        doc = json.loads((args.out_dir / "decode-profile.json").read_text())
        print(f"wrote {write_report(args.out_dir, doc)} (.md)")
        return 0
    points = args.points.split(",")
    for point in points:
        parse_point(point)
    ncu = shutil.which("ncu")
    if ncu is None:
        print("decode_profile needs Nsight Compute's `ncu` on the PATH", file=sys.stderr)
        return 2
    import torch

    gpu = torch.cuda.get_device_name()
    (args.out_dir / "decode-profile").mkdir(parents=True, exist_ok=True)
    started, summaries = time.time(), []
    for point in points:
        stdout, summary = profile_point(ncu, point, args.key_bits, args.timeout)
        csv_path(args.out_dir, point).write_text("\n".join(csv_lines(stdout)) + "\n")
        summaries.append(summary)
        print(summary, flush=True)
        print(table([{"point": point, **kernel_record(r)} for r in kernel_rows(stdout)]), flush=True)
    command = shlex.join([sys.executable, "-m", "benchmarks.tuning.decode_profile",
                          *(sys.argv[1:] if argv is None else argv)])
    doc = {"benchmark": "decode_profile", "updated": now_iso(), "gpu": gpu, "key_bits": args.key_bits,
           "command": command, "points": points, "steps": summaries}
    path = write_report(args.out_dir, doc)
    print(f"wrote {path} (.md, decode-profile/*.csv) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
