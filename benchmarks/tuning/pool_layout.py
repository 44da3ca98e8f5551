"""The pool's memory layout against the decode step, on one GPU, for a Qwen3-8B layer (H_q 32,
H_kv 8, D 128): the same codes and meta timed in the server's head-major buffers
(`layer_cache.pool_buffer`: [H_kv, slots, ...] in memory) and in slot-major copies ([slots, H_kv,
...] contiguous, every slot's heads together), through `decode_attention_int2` at its defaults.
Requests on shuffled 16-slot pages, CUDA-graph replay, L2 flushed; %HBM is the bytes a step must
read over the measured device-to-device copy rate. The outputs of both layouts must be equal.

    python -m benchmarks.tuning.pool_layout --out-dir benchmarks/results/h100

Writes <out-dir>/pool-layout.json and .md and prints the table.
"""

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch
from oscar_sglang.kernels.decode import decode_attention_int2, decode_step
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, OscarFormat

from benchmarks.cli_args import pairs_of
from benchmarks.gpu_timing import (PAGE_SIZE, hbm_bandwidth_gbs, median_us, oscar_decode_bytes, random_decode_inputs,
                                   release)
from benchmarks.layers import QWEN3_8B
from benchmarks.records import machine_info, markdown_table, now_iso, write_json, write_text

SHAPES = [(131072, 1), (131072, 8), (131072, 32), (32768, 32), (32768, 128)]  # (context, batch)


def time_layouts(fmt: OscarFormat, context: int, batch: int, bandwidth: float, rep_ms: int) -> dict:
    """µs and HBM share of one decode step over each layout of the same pool contents."""
    torch.manual_seed(0)
    q = torch.randn(batch, QWEN3_8B.q_heads, QWEN3_8B.head_dim, device="cuda").to(torch.bfloat16)
    inputs = random_decode_inputs(fmt, q, QWEN3_8B.kv_heads, context, PAGE_SIZE)
    served = inputs.cache
    copied = replace(served, **{name: getattr(served, name).contiguous()  # slot-major copies
                                for name in ("k_codes", "v_codes", "k_meta", "v_meta")})
    nbytes = oscar_decode_bytes(QWEN3_8B, fmt, batch, context)
    step = decode_step(*inputs.args)
    record = {"context": context, "batch": batch, "bytes": nbytes, "split_kernels": step.split_kernels,
              "kv_splits": step.splits}
    outputs = {}
    for layout, cache in (("head_major", served), ("slot_major", copied)):
        args = (*inputs.args[:4], cache, inputs.sm_scale)
        out = torch.empty_like(q)
        us, _ = median_us(lambda: decode_attention_int2(*args, out=out), rep_ms)
        record[layout] = {"us": us, "hbm_fraction": nbytes / (us * 1e-6) / (bandwidth * 1e9)}
        outputs[layout] = out
    record["outputs_equal"] = torch.equal(outputs["head_major"], outputs["slot_major"])
    del inputs, served, copied, outputs
    release()
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=pairs_of(int, lambda c, b: c > 0 and b > 0, "CONTEXTxBATCH"),
                        default=SHAPES, help="comma-separated CONTEXTxBATCH (default %(default)s)")
    parser.add_argument("--key-bits", type=int, default=DEFAULT_KEY_BITS, help="OSCAR key code width")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench time per point")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    fmt = OscarFormat(QWEN3_8B.head_dim, key_bits=args.key_bits)
    bandwidth = hbm_bandwidth_gbs(args.rep_ms)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device-to-device copy {bandwidth:.0f} GB/s", flush=True)
    records = []
    for context, batch in args.shapes:
        record = time_layouts(fmt, context, batch, bandwidth, args.rep_ms)
        records.append(record)
        print(f"  {context} x {batch}: head-major {record['head_major']['us']:.1f} us, "
              f"slot-major {record['slot_major']['us']:.1f} us, outputs equal: {record['outputs_equal']}", flush=True)

    rows = [[f"{r['batch']} × {r['context']}", f"{r['split_kernels']}@{r['kv_splits']}",
             f"{r['head_major']['us']:.1f} ({r['head_major']['hbm_fraction']:.0%})",
             f"{r['slot_major']['us']:.1f} ({r['slot_major']['hbm_fraction']:.0%})",
             f"{r['slot_major']['us'] / r['head_major']['us']:.2f}", "yes" if r["outputs_equal"] else "NO"]
            for r in records]
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.tuning.pool_layout", *sys.argv[1:]])
    markdown = "\n".join([
        f"# Pool layout against the decode step ({gpu}, copy {bandwidth:.0f} GB/s, {args.key_bits}-bit keys)", "",
        markdown_table(["batch × context", "split kernels@splits", "head-major µs (HBM)", "slot-major µs (HBM)",
                        "slot / head", "outputs equal"], rows),
        "", f"command: `{command}`", ""])
    doc = {"benchmark": "pool_layout", "updated": now_iso(), "command": command, "machine": machine_info(),
           "gpu": gpu, "key_bits": args.key_bits, "hbm_copy_gbps": bandwidth, "records": records}
    write_json(args.out_dir / "pool-layout.json", doc)
    write_text(args.out_dir / "pool-layout.md", markdown)
    print(markdown)
    if not all(r["outputs_equal"] for r in records):
        sys.exit("the layouts gave different outputs")


if __name__ == "__main__":
    main()
