"""Decode-attention kernel microbenchmark: OSCAR-2 INT2 against FlashInfer and SGLang's Triton
decode on BF16 and FP8 caches, for one attention layer: Qwen3-8B's (H_q 32, H_kv 8, D 128) by
default, Qwen2.5-0.5B's (H_q 14, H_kv 2, D 64) with --layer qwen2.5-0.5b.

For every context length × batch size: the median time of one decode step (triton.testing.do_bench
over a CUDA-graph replay, eager when a method cannot be captured), the bytes the step must read
(OSCAR: packed codes + meta of the INT2 span, BF16 window rows, q and out; baselines: their whole
KV, q and out), the achieved GB/s and its share of the HBM bandwidth measured in the same run
(device-to-device copy). Requests use shuffled pages of --page-size tokens; cache contents are
random (no kernel here has data-dependent control flow). A configuration whose buffers do not
fit in free GPU memory is recorded as skipped; a method that fails records its error and the
sweep goes on. oscar-int2-shared is OSCAR with shared-prefix blocks (kernels/shared_prefix.py).

--shared-prefix N gives every request of a batch the same slots (pages) for its first N tokens,
as requests that hit one radix-cached system prompt have. Bytes stay the bytes each request
attends to, so a share of HBM above 100 % means requests were served from L2 by each other.

Run from the repository root on a GPU machine:

    python -m benchmarks.decode_kernels            # full sweep
    python -m benchmarks.decode_kernels --quick    # 32K and 128K at batch 1 and 8

Writes <out-dir>/decode_kernels_<gpu>.json and .png and prints a markdown table.
"""

import argparse
import functools
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import triton
from oscar_sglang.kernels.decode import DECODE_LAUNCH, decode_attention_int2, decode_step
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, SUPPORTED_KEY_BITS, OscarFormat
from oscar_sglang.kernels.shared_prefix import find_shared_prefixes

from benchmarks.cli_args import parse_int_list
from benchmarks.gpu_timing import (FLASHINFER_WORKSPACE_BYTES, PAGE_SIZE, hbm_bandwidth_gbs, median_us,
                                   oscar_decode_bytes, paged_requests, qo_bytes, random_decode_inputs, release)
from benchmarks.layers import LAYERS
from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import machine_info, markdown_table, now_iso, plot_panels, ratio, write_json

CONTEXTS = [4096, 16384, 32768, 65536, 131072]
BATCHES = [1, 8, 32, 64]
QUICK_CONTEXTS, QUICK_BATCHES = [32768, 131072], [1, 8]
METHODS = ["oscar-int2", "oscar-int2-shared", "flashinfer-fp8", "flashinfer-bf16", "sglang-triton-fp8", "sglang-triton-bf16"]
BASELINE = "flashinfer-fp8"
HEADROOM_BYTES = 2 << 30  # free memory kept aside for workspaces and the L2 flush buffer
SGLANG_MAX_KV_SPLITS = 8  # SGLang's default --triton-attention-num-kv-splits


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=parse_int_list, default=CONTEXTS, help="tokens per request (default: %(default)s)")
    parser.add_argument("--batches", type=parse_int_list, default=BATCHES, help="requests per step (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"only contexts {QUICK_CONTEXTS} at batches {QUICK_BATCHES}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    parser.add_argument("--layer", choices=LAYERS, default="qwen3-8b", help="attention layer shape (default: %(default)s)")
    parser.add_argument("--group-size", type=int, help="OSCAR quantization group size (default: the layer's head_dim)")
    parser.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS,
                        help="OSCAR bits per key code (default: %(default)s)")
    parser.add_argument("--int2-split", choices=("default", "cuda", "triton"), default="default",
                        help="kernel of OSCAR's split programs: the library's choice by batch size, or one kernel at every size")
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens whose slots all requests share (default: %(default)s)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="FlashInfer page size and slot-shuffle granularity (default: %(default)s)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per point (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where JSON and PNG go (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------- timing


def enough_memory(nbytes):
    free, _ = torch.cuda.mem_get_info()
    return nbytes + HEADROOM_BYTES <= free


# ---------------------------------------------------------------------------- methods


def bench_oscar(batch, context, args, q, shared=False):
    """OSCAR decode; shared: with `find_shared_prefixes` blocks, computed once outside the timed
    step as a backend computes them once per batch for all layers (their own time is recorded
    as find_shared_us)."""
    layer = LAYERS[args.layer]
    fmt = OscarFormat(layer.head_dim, args.group_size or layer.head_dim, key_bits=args.key_bits)
    slots_total = batch * triton.cdiv(context, args.page_size) * args.page_size
    pool_bytes = (fmt.bytes_per_token(1, layer.kv_heads) * slots_total
                  + fmt.window_bytes_per_request(1, layer.kv_heads) * batch)
    if not enough_memory(pool_bytes):
        return {"status": "skipped", "reason": f"needs {pool_bytes / 2**30:.1f} GiB"}
    inputs = random_decode_inputs(fmt, q, layer.kv_heads, context, args.page_size, args.shared_prefix)
    out = torch.empty_like(q)

    def blocks():
        return find_shared_prefixes(inputs.kv_indptr, inputs.kv_indices, fmt, layer.group)

    prefixes = blocks() if shared else None
    launch = DECODE_LAUNCH if args.int2_split == "default" else DECODE_LAUNCH.with_split_kernel(args.int2_split)

    def step():
        decode_attention_int2(*inputs.args, out=out, shared=prefixes, launch=launch)

    us, mode = median_us(step, args.rep_ms)
    record = {"us": us, "timing": mode, "bytes": oscar_decode_bytes(layer, fmt, batch, context),
              "kv_splits": decode_step(*inputs.args, shared=prefixes, launch=launch).splits}
    if shared:
        record["find_shared_us"] = median_us(blocks, args.rep_ms)[0]
    return record


def paged_pool(layer, batch, context, page_size, dtype):
    """K and V caches [pages, page_size, H_kv, D] of `dtype` with random contents (None when
    they do not fit) and their size in bytes."""
    pages = batch * triton.cdiv(context, page_size)
    shape = (pages, page_size, layer.kv_heads, layer.head_dim)
    nbytes = 2 * pages * page_size * layer.kv_heads * layer.head_dim * dtype.itemsize
    if not enough_memory(nbytes):
        return None, nbytes
    if dtype == torch.bfloat16:
        return [torch.empty(shape, dtype=dtype, device="cuda").normal_() for _ in "kv"], nbytes
    # FP8: random bit patterns of modest positive values (no NaN encodings)
    return [torch.empty(shape, dtype=torch.uint8, device="cuda").random_(0, 0x48).view(dtype) for _ in "kv"], nbytes


def bench_flashinfer(batch, context, args, q, caches, pages):
    import flashinfer

    layer = LAYERS[args.layer]
    kv_dtype = caches[0].dtype
    # what SGLang 0.5.17 picks (flashinfer_backend.should_use_tensor_core): FP8, or GQA >= 4
    tensor_cores = kv_dtype == torch.float8_e4m3fn or layer.group >= 4
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
    pages_per_req = pages.shape[1]
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per_req
    last = torch.full((batch,), context - (pages_per_req - 1) * args.page_size, dtype=torch.int32, device="cuda")
    wrapper.plan(indptr, pages.reshape(-1).to(torch.int32), last, layer.q_heads, layer.kv_heads, layer.head_dim,
                 args.page_size, q_data_type=q.dtype, kv_data_type=kv_dtype, sm_scale=layer.head_dim ** -0.5)
    out = torch.empty_like(q)
    kwargs = {"k_scale": 1.0, "v_scale": 1.0} if kv_dtype != torch.bfloat16 else {}
    us, mode = median_us(lambda: wrapper.run(q, (caches[0], caches[1]), out=out, **kwargs), args.rep_ms)
    return {"us": us, "timing": mode, "tensor_cores": tensor_cores}


def bench_sglang_triton(batch, context, args, q, caches, slots):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    layer = LAYERS[args.layer]
    k_buffer = caches[0].view(-1, layer.kv_heads, layer.head_dim)
    v_buffer = caches[1].view(-1, layer.kv_heads, layer.head_dim)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * context
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    num_kv_splits = torch.empty(batch, dtype=torch.int32, device="cuda")
    # the split count SGLang's Triton backend computes for these lengths (default settings)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, seq_lens, batch, 1, layer.q_heads, layer.kv_heads, SGLANG_MAX_KV_SPLITS,
        torch.cuda.get_device_properties(0).multi_processor_count, MAX_NUM_SEQ=max(256, triton.next_power_of_2(batch)))
    logits = torch.empty(batch, layer.q_heads, SGLANG_MAX_KV_SPLITS, layer.head_dim, dtype=torch.float32, device="cuda")
    lse = torch.empty(batch, layer.q_heads, SGLANG_MAX_KV_SPLITS, dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)
    us, mode = median_us(lambda: decode_attention_fwd(
        q, k_buffer, v_buffer, out, indptr, slots, logits, lse, num_kv_splits, SGLANG_MAX_KV_SPLITS,
        layer.head_dim ** -0.5, 1.0, 1.0), args.rep_ms)
    return {"us": us, "timing": mode}


def run_point(batch, context, args, methods, hbm_gbs):
    """All methods at one (batch, context); returns method -> record."""
    layer = LAYERS[args.layer]
    q = torch.randn(batch, layer.q_heads, layer.head_dim, device="cuda").to(torch.bfloat16)
    records = {}

    def attempt(name, bench, *bench_args, **extra):
        if name not in methods:
            return
        t0 = time.time()
        try:
            record = {**bench(batch, context, args, q, *bench_args), **extra}
        except Exception as exc:  # noqa: BLE001  (one failing method must not stop the sweep)
            record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:800]}
        record.setdefault("status", "ok")
        if record["status"] == "ok":
            record["gbps"] = record["bytes"] / (record["us"] * 1e-6) / 1e9
            record["pct_hbm"] = 100 * record["gbps"] / hbm_gbs
        records[name] = record
        shown = f"{record['us']:.1f} us, {record['pct_hbm']:.0f}% HBM" if record["status"] == "ok" else record.get("reason", record.get("error"))
        print(f"  {name:20s} {record['status']:8s} {shown}  [{time.time() - t0:.0f}s]", flush=True)
        release()

    attempt("oscar-int2", bench_oscar)
    attempt("oscar-int2-shared", functools.partial(bench_oscar, shared=True))
    pages, slots, _ = paged_requests(batch, context, args.page_size, args.shared_prefix)
    for dtype, tag in ((torch.float8_e4m3fn, "fp8"), (torch.bfloat16, "bf16")):
        wanted = [m for m in (f"flashinfer-{tag}", f"sglang-triton-{tag}") if m in methods]
        if not wanted:
            continue
        caches, nbytes = paged_pool(layer, batch, context, args.page_size, dtype)
        if caches is None:
            for name in wanted:
                records[name] = {"status": "skipped", "reason": f"needs {nbytes / 2**30:.1f} GiB"}
                print(f"  {name:20s} skipped  {records[name]['reason']}", flush=True)
            continue
        read = 2 * batch * context * layer.kv_heads * layer.head_dim * dtype.itemsize + qo_bytes(layer, batch)
        attempt(f"flashinfer-{tag}", bench_flashinfer, caches, pages, bytes=read)
        attempt(f"sglang-triton-{tag}", bench_sglang_triton, caches, slots, bytes=read)
        caches = None
        release()
    return records


# ---------------------------------------------------------------------------- report


def table(points, methods):
    headers = ["context", "batch"] + [f"{m} us (%HBM)" for m in methods] + [f"speedup vs {BASELINE}"]
    rows = []
    for point in points:
        cells = []
        for m in methods:
            r = point["methods"].get(m, {})
            cells.append(f"{r['us']:.1f} ({r['pct_hbm']:.0f}%)" if r.get("status") == "ok" else r.get("status"))
        oscar, base = point["methods"].get("oscar-int2", {}), point["methods"].get(BASELINE, {})
        speedup = ratio(base.get("us"), oscar.get("us"))
        rows.append([point["context"], point["batch"], *cells, f"{speedup:.2f}x" if speedup else None])
    return markdown_table(headers, rows)


def plot(path, points, methods, batches, contexts, device, layer):
    panels = []
    for batch in batches:
        series = {m: [] for m in methods}
        for context in contexts:
            point = next((p for p in points if p["batch"] == batch and p["context"] == context), None)
            for m in methods:
                r = point["methods"].get(m, {}) if point else {}
                series[m].append(r.get("us") if r.get("status") == "ok" else None)
        panels.append({"title": f"batch {batch}", "ylabel": "µs per decode step (one layer)",
                       "groups": [f"{c // 1024}K" for c in contexts], "series": series})
    title = f"{layer.title} layer (H_q {layer.q_heads}, H_kv {layer.kv_heads}, D {layer.head_dim})"
    return plot_panels(path, f"Decode attention, {title} — {device}", panels)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; choose from {METHODS}", file=sys.stderr)
        return 2
    contexts, batches = (QUICK_CONTEXTS, QUICK_BATCHES) if args.quick else (args.contexts, args.batches)
    device = torch.cuda.get_device_name()
    torch.manual_seed(0)
    started = time.time()
    hbm = hbm_bandwidth_gbs(args.rep_ms)
    print(f"{device}: device-to-device copy {hbm:.0f} GB/s", flush=True)

    points = []
    for context in contexts:
        for batch in batches:
            print(f"context {context}, batch {batch}", flush=True)
            points.append({"context": context, "batch": batch, "methods": run_point(batch, context, args, methods, hbm)})

    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    shared = f"_sp{args.shared_prefix}" if args.shared_prefix else ""
    layer_tag = "" if args.layer == "qwen3-8b" else f"_{args.layer}"
    stem = args.out_dir / f"decode_kernels_{slug}{layer_tag}{'_quick' if args.quick else ''}{shared}"
    doc = {
        "benchmark": "decode_kernels",
        "updated": now_iso(),
        "device": device,
        "command": shlex.join([sys.executable, "-m", "benchmarks.decode_kernels", *(sys.argv[1:] if argv is None else argv)]),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "machine": machine_info(),
        "settings": {**asdict(LAYERS[args.layer]), "group_size": args.group_size or LAYERS[args.layer].head_dim,
                     "key_bits": args.key_bits, "int2_split": args.int2_split,
                     "page_size": args.page_size, "shared_prefix": args.shared_prefix, "q_dtype": "bfloat16", "rep_ms": args.rep_ms},
        "hbm_copy_gbps": hbm,
        "seconds": time.time() - started,
        "points": points,
    }
    write_json(stem.with_suffix(".json"), doc)
    plotted = plot(stem.with_suffix(".png"), points, methods, batches, contexts, device, LAYERS[args.layer])
    print()
    print(table(points, methods))
    print(f"\nwrote {stem.with_suffix('.json')}" + (f" and {stem.with_suffix('.png')}" if plotted else ""))
    print(f"total {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
