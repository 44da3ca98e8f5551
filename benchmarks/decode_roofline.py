"""Decode attention against the memory roofline: one Qwen3-8B layer's decode step (H_q 32, H_kv 8,
D 128) for OSCAR-2 and for FlashInfer over FP8 and BF16 caches, timed as benchmarks/decode_kernels.py
times them (CUDA-graph replay, median, L2 flushed), over batch {1, 8, 32, 128} × context
{8K, 32K, 128K}, plus the agents case: 64 and 192 requests that share one 32K-token prefix (each
with a 1K-token tail of its own), OSCAR reading it with shared-prefix blocks. Per point: µs, the
bytes the step must read, and their share of the HBM bandwidth that a device-to-device copy
reaches in the same run. The targets of the decode work are printed against the points they apply
to: ≥ 75 % of HBM at batch ≥ 8 and context ≥ 32K, ≥ 60 % at batch 1 and 128K.

Writes <out-dir>/decode-roofline.json (a list of records: gpu, kernel, key_bits, int2_split,
batch, context, shared_prefix, status, us, bytes, hbm_fraction; records of other GPUs already in
the file are kept), .md and .png. Run on a GPU machine from the repository root:

    python -m benchmarks.decode_roofline
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import markdown_table, now_iso, plot_panels, write_json
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS

BATCHES = [1, 8, 32, 128]
CONTEXTS = [8192, 32768, 131072]
SHARED_PREFIX = 32768
SHARED_TAIL = 1024
SHARED_BATCHES = [64, 192]
# decode_kernels' method names: OSCAR alone, OSCAR with shared-prefix blocks, FlashInfer caches
PLAIN_METHODS = ["oscar-int2", "flashinfer-fp8", "flashinfer-bf16"]
SHARED_METHODS = ["oscar-int2-shared", "flashinfer-fp8", "flashinfer-bf16"]
TARGETS = [  # (least batch, least context, least HBM fraction) of the decode work's targets
    (8, 32768, 0.75),
    (1, 131072, 0.60),
]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key-bits", type=int, default=DEFAULT_KEY_BITS, help="OSCAR key code width (default %(default)s)")
    p.add_argument("--page-size", type=int, default=16, help="slot-shuffle granularity (default %(default)s)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time per point (default %(default)s)")
    p.add_argument("--int2-split", choices=("default", "cuda", "triton"), default="default",
                   help="kernel of OSCAR's split programs: the library's choice by batch size, or one kernel at every size")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return p


def target_for(batch: int, context: int) -> float | None:
    """The least HBM fraction the targets ask of this point, None where none applies."""
    wanted = [fraction for least_batch, least_context, fraction in TARGETS
              if batch >= least_batch and context >= least_context]
    return max(wanted) if wanted else None


def records_from_point(gpu: str, key_bits: int, int2_split: str, batch: int, context: int, shared_prefix: int,
                       methods: dict) -> list[dict]:
    """decode_kernels.run_point's {method: record} for one point -> roofline records."""
    records = []
    for kernel, r in methods.items():
        ok = r.get("status") == "ok"
        oscar = kernel.startswith("oscar")
        records.append({"gpu": gpu, "kernel": kernel, "key_bits": key_bits if oscar else None,
                        "int2_split": int2_split if oscar else None,
                        "batch": batch, "context": context,
                        "shared_prefix": shared_prefix, "status": r.get("status"),
                        "us": r["us"] if ok else None, "bytes": r.get("bytes"),
                        "hbm_fraction": r["pct_hbm"] / 100 if ok else None,
                        "note": None if ok else r.get("reason") or r.get("error")})
    return records


def merged(previous: list[dict], new: list[dict]) -> list[dict]:
    """`new` and the records of `previous` measured on other GPUs."""
    gpus = {r["gpu"] for r in new}
    return [r for r in previous if r["gpu"] not in gpus] + new


def table(records: list[dict], gpu: str) -> str:
    """One row per point of `gpu`: each kernel's µs and HBM share, the target and whether OSCAR
    meets it."""
    mine = [r for r in records if r["gpu"] == gpu]
    kernels = list(dict.fromkeys(r["kernel"].replace("-shared", "") for r in mine))
    points = list(dict.fromkeys((r["batch"], r["context"], r["shared_prefix"]) for r in mine))
    rows = []
    for batch, context, shared in points:
        at = {r["kernel"].replace("-shared", ""): r for r in mine
              if (r["batch"], r["context"], r["shared_prefix"]) == (batch, context, shared)}
        cells = []
        for kernel in kernels:
            r = at.get(kernel)
            cells.append(f"{r['us']:.1f} ({100 * r['hbm_fraction']:.0f} %)" if r and r["us"] is not None
                         else (r or {}).get("status"))
        target = None if shared else target_for(batch, context)
        oscar = at.get("oscar-int2", {}).get("hbm_fraction")
        verdict = None if target is None or oscar is None else ("met" if oscar >= target else "missed")
        rows.append([batch, context, shared or None, *cells,
                     None if target is None else f"{100 * target:.0f} %", verdict])
    return markdown_table(["batch", "context", "shared prefix", *[f"{k} µs (HBM)" for k in kernels],
                           "target", "OSCAR"], rows)


def plot(path: Path, records: list[dict], gpu: str):
    """HBM share per kernel: one panel per batch size, contexts as groups."""
    mine = [r for r in records if r["gpu"] == gpu and not r["shared_prefix"]]
    panels = []
    for batch in sorted({r["batch"] for r in mine}):
        contexts = sorted({r["context"] for r in mine if r["batch"] == batch})
        series = {}
        for r in mine:
            if r["batch"] == batch:
                series.setdefault(r["kernel"], [None] * len(contexts))[contexts.index(r["context"])] = (
                    None if r["hbm_fraction"] is None else 100 * r["hbm_fraction"])
        panels.append({"title": f"batch {batch}", "ylabel": "% of HBM bandwidth",
                       "groups": [f"{c // 1024}K" for c in contexts], "series": series})
    return plot_panels(path, f"Decode attention against the memory roofline — {gpu}", panels)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("decode_roofline needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.decode_kernels import run_point
    from benchmarks.gpu_timing import hbm_bandwidth_gbs

    gpu = torch.cuda.get_device_name()
    torch.manual_seed(0)
    started = time.time()
    hbm = hbm_bandwidth_gbs(args.rep_ms)
    print(f"{gpu}: device-to-device copy {hbm:.0f} GB/s", flush=True)
    point_args = argparse.Namespace(layer="qwen3-8b", page_size=args.page_size, rep_ms=args.rep_ms, group_size=128,
                                    key_bits=args.key_bits, shared_prefix=0, int2_split=args.int2_split)
    records = []
    for context in CONTEXTS:
        for batch in BATCHES:
            print(f"context {context}, batch {batch}", flush=True)
            methods = run_point(batch, context, point_args, PLAIN_METHODS, hbm)
            records += records_from_point(gpu, args.key_bits, args.int2_split, batch, context, 0, methods)
    point_args.shared_prefix = SHARED_PREFIX
    for batch in SHARED_BATCHES:
        context = SHARED_PREFIX + SHARED_TAIL
        print(f"context {context} ({SHARED_PREFIX} shared), batch {batch}", flush=True)
        methods = run_point(batch, context, point_args, SHARED_METHODS, hbm)
        records += records_from_point(gpu, args.key_bits, args.int2_split, batch, context, SHARED_PREFIX, methods)

    path = args.out_dir / "decode-roofline.json"
    old = json.loads(path.read_text()) if path.exists() else {"records": [], "commands": {}, "hbm_copy_gbps": {}}
    command = shlex.join([sys.executable, "-m", "benchmarks.decode_roofline", *(sys.argv[1:] if argv is None else argv)])
    doc = {"benchmark": "decode_roofline", "updated": now_iso(),
           "commands": {**old["commands"], gpu: command}, "hbm_copy_gbps": {**old["hbm_copy_gbps"], gpu: hbm},
           "records": merged(old["records"], records)}
    write_json(path, doc)
    gpus = list(dict.fromkeys(r["gpu"] for r in doc["records"]))
    text = "\n\n".join(f"## {g} (copy {doc['hbm_copy_gbps'][g]:.0f} GB/s)\n\n{table(doc['records'], g)}\n\n"
                       f"command: `{doc['commands'][g]}`" for g in gpus)
    path.with_suffix(".md").write_text(f"# Decode attention against the memory roofline\n\n{text}\n")
    plot(path.with_suffix(".png"), doc["records"], gpu)
    print(text)
    print(f"\nwrote {path} (.md, .png) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
