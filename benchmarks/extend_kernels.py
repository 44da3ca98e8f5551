"""Extend (chunked-prefill) attention microbenchmark for one Qwen3-8B layer (H_q 32, H_kv 8,
D 128): OSCAR-2's `extend_attention_int2` (prefix gathered from INT2 into a 16-bit scratch, then
attended) as the backend runs it on CUDA (oscar-flashinfer: FlashInfer's ragged prefill over the
scratch) and with the module's Triton attention kernel (oscar-triton-<variant>, a sweep of its
tile sizes), against SGLang's Triton extend kernel on a BF16 cache and, with --flashinfer,
FlashInfer as SGLang's FlashInfer backend runs it on an FP8 or BF16 cache.

FlashInfer methods (`--flashinfer`) follow SGLang 0.5.17's `FlashInferAttnBackend.forward_extend`:
the chunk's own K/V by causal ragged attention (backend "auto"), the cached prefix by
non-causal attention, the two states merged (`flashinfer.merge_state`); without a prefix, the
ragged call alone.

A point is (batch, prefix, chunk): `batch` requests each with `prefix` cached tokens (shuffled
pages, random codes: no kernel here has data-dependent control flow) and a new chunk of `chunk`
tokens, causal. Reported: the median time (triton.testing.do_bench over a CUDA-graph replay)
and TFLOP/s counted as 4·D·H_q per visible (query, key) pair. Every OSCAR method's output is
compared with the first Triton variant's, so one that computes something else is flagged.

    python -m benchmarks.extend_kernels --out-dir benchmarks/results/h100
    python -m benchmarks.extend_kernels --variants default --flashinfer --points 8x32768x1024

Writes <out-dir>/extend_kernels_<gpu>.json and prints a markdown table.
"""

import argparse
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch
from oscar_sglang.kernels import extend as ek

from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import machine_info, markdown_table, now_iso, write_json
from benchmarks.gpu_timing import FLASHINFER_WORKSPACE_BYTES, PAGE_SIZE, layer_decode_inputs, median_us, release
from benchmarks.layers import QWEN3_8B

Q_HEADS, KV_HEADS, D = QWEN3_8B.q_heads, QWEN3_8B.kv_heads, QWEN3_8B.head_dim

POINTS = [(1, 0, 8192), (1, 32768, 8192), (1, 98304, 8192), (8, 32768, 1024)]
FLASHINFER_CACHES = {"flashinfer-fp8": torch.float8_e4m3fn, "flashinfer-bf16": torch.bfloat16}
# tile variants: name -> ExtendLaunch; "default" is the library's own
VARIANTS = {
    "default": ek.EXTEND_LAUNCH,
    "m64": replace(ek.EXTEND_LAUNCH, block_m=64),
    "n32": replace(ek.EXTEND_LAUNCH, block_n=32),
    "w4": replace(ek.EXTEND_LAUNCH, num_warps=4),
    # the gather kernel spills at 4 warps (255 registers) and not at 8 (tuning/kernel_resources.py), yet
    # 8 warps were slower on the H200
    "gather_w8": replace(ek.EXTEND_LAUNCH, gather_warps=8),
    # 128-key tiles: 20 % fewer loop instructions per key and wider warpgroup MMAs at 255
    # registers, 224 KiB of shared memory at 3 stages, 160 KiB at 2 (tuning/kernel_resources.py)
    "s2": replace(ek.EXTEND_LAUNCH, num_stages=2),
    "n128": replace(ek.EXTEND_LAUNCH, block_n=128),
    "n128_s2": replace(ek.EXTEND_LAUNCH, block_n=128, num_stages=2),
}


def parse_points(text):
    """'1x0x8192,8x32768x1024' -> [(batch, prefix, chunk), ...]."""
    return [tuple(int(v) for v in point.split("x")) for point in text.split(",")]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=parse_points, default=POINTS,
                        help="batch x prefix x chunk, comma-separated (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of %(default)s")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench time per point (default: %(default)s)")
    parser.add_argument("--flashinfer", action="store_true",
                        help="also time SGLang's FlashInfer extend on FP8 / BF16 caches")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return parser


def make_extend_problem(batch, prefix, chunk):
    """extend_attention_int2's positional arguments."""
    decode = layer_decode_inputs(QWEN3_8B, batch, max(prefix, PAGE_SIZE))
    stride = max(prefix, PAGE_SIZE)
    slots = decode.kv_indices.view(batch, stride)[:, :prefix].reshape(-1).contiguous()
    kv_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * prefix
    qo_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * chunk
    q = torch.randn(batch * chunk, Q_HEADS, D, device="cuda").to(torch.bfloat16)
    k, v = (torch.randn(batch * chunk, KV_HEADS, D, device="cuda").to(torch.bfloat16) for _ in "kv")
    return q, k, v, qo_indptr, kv_indptr, slots, decode.window_starts, decode.cache, decode.sm_scale


def causal_tflop(batch, prefix, chunk):
    return 4 * D * Q_HEADS * batch * (chunk * prefix + chunk * (chunk + 1) / 2) / 1e12


def bench_oscar(problem, prefix, chunk, rep_ms, launch: ek.ExtendLaunch, flashinfer=None):
    """(µs, output) of extend_attention_int2 with the given launch parameters and FlashInfer
    wrapper (None: the Triton attention kernel)."""
    out = torch.empty_like(problem[0])
    us, _ = median_us(lambda: ek.extend_attention_int2(*problem, max_extend_len=chunk, max_prefix_len=prefix,
                                                       out=out, flashinfer=flashinfer, launch=launch), rep_ms)
    return us, out


def bench_oscar_flashinfer(problem, batch, prefix, chunk, rep_ms):
    """(µs, output) of extend_attention_int2 through FlashInfer, planned as the backend plans it."""
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    wrapper = ek.plan_flashinfer_extend(ek.flashinfer_extend_wrapper(workspace), [chunk] * batch, [prefix] * batch,
                                        Q_HEADS, KV_HEADS, D, problem[8], problem[0].dtype)
    return bench_oscar(problem, prefix, chunk, rep_ms, ek.EXTEND_LAUNCH, wrapper)


def bench_sglang_bf16(problem, chunk, rep_ms):
    """µs of SGLang's Triton extend kernel over a BF16 cache holding the same prefix slots."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    q, k, v, qo_indptr, kv_indptr, slots = problem[:6]
    slot_count = int(slots.max()) + 1 if slots.numel() else 1
    k_buf, v_buf = (torch.randn(slot_count, KV_HEADS, D, device="cuda").to(torch.bfloat16) for _ in "kv")
    out = torch.empty_like(q)
    us, _ = median_us(lambda: extend_attention_fwd(
        q, k, v, out, k_buf, v_buf, qo_indptr, kv_indptr, slots, None, True, None, chunk, 1.0, 1.0,
        sm_scale=D ** -0.5), rep_ms)
    return us


def flashinfer_ragged(qo_indptr, kv_indptr, causal, dtype):
    """A planned FlashInfer ragged prefill wrapper (SGLang's backend choice, "auto")."""
    import flashinfer

    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="auto")
    wrapper.plan(qo_indptr, kv_indptr, Q_HEADS, KV_HEADS, D, causal=causal, sm_scale=D ** -0.5,
                 q_data_type=dtype, kv_data_type=dtype)
    return wrapper


def flashinfer_paged_prefix(qo_indptr, kv_indptr, slots, kv_dtype, q_dtype):
    """A planned FlashInfer paged prefill wrapper over a page-size-1 cache (SGLang's default
    page size and its prefill backend, "fa2"), non-causal: the cached prefix."""
    import flashinfer

    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    last_page_len = torch.ones(qo_indptr.shape[0] - 1, dtype=torch.int32, device="cuda")
    wrapper.plan(qo_indptr, kv_indptr, slots.to(torch.int32), last_page_len, Q_HEADS, KV_HEADS, D, 1,
                 causal=False, sm_scale=D ** -0.5, q_data_type=q_dtype, kv_data_type=kv_dtype)
    return wrapper


def bench_flashinfer_cache(problem, prefix, rep_ms, kv_dtype):
    """µs of FlashInfer extend with the prefix in a paged cache of kv_dtype (random contents:
    only the time is compared)."""
    import flashinfer

    q, k, v, qo_indptr, kv_indptr, slots = problem[:6]
    ragged = flashinfer_ragged(qo_indptr, qo_indptr, True, q.dtype)
    if prefix == 0:
        return median_us(lambda: ragged.run(q, k, v), rep_ms)[0]
    slot_count = int(slots.max()) + 1
    shape = (slot_count, 1, KV_HEADS, D)
    if kv_dtype == torch.bfloat16:
        cache = tuple(torch.randn(shape, device="cuda").to(kv_dtype) for _ in "kv")
    else:  # random bit patterns of modest positive values (no NaN encodings)
        cache = tuple(torch.empty(shape, dtype=torch.uint8, device="cuda").random_(0, 0x48).view(kv_dtype)
                      for _ in "kv")
    paged = flashinfer_paged_prefix(qo_indptr, kv_indptr, slots, kv_dtype, q.dtype)
    scales = {"k_scale": 1.0, "v_scale": 1.0} if kv_dtype != torch.bfloat16 else {}

    def extend():
        o_new, lse_new = ragged.run(q, k, v, return_lse=True)
        o_pre, lse_pre = paged.run(q, cache, return_lse=True, **scales)
        return flashinfer.merge_state(o_new, lse_new, o_pre, lse_pre)

    return median_us(extend, rep_ms)[0]


def timed(record, name, bench, reference):
    """record["methods"][name] = {"us", "tflops"} from bench() -> µs or (µs, output), or {"error"}
    if it raised; an output is compared with `reference` (the first OSCAR variant's) when given.
    Returns the output (None without one)."""
    out = None
    try:
        got = bench()
        us, out = got if isinstance(got, tuple) else (got, None)
        result = {"us": us, "tflops": record["tflop"] / (us * 1e-6)}
        if out is not None and reference is not None:
            result["max_abs_diff_vs_first"] = (out.float() - reference).abs().max().item()
    except Exception as exc:  # noqa: BLE001  (a method or variant that fails must not stop the sweep)
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    record["methods"][name] = result
    print(f"  {record['batch']}x{record['prefix']}x{record['chunk']} {name}: {result}", flush=True)
    return out


def run_point(point, variants, rep_ms, flashinfer):
    """One point: OSCAR through FlashInfer and every Triton tile variant, SGLang's Triton kernel on
    a BF16 cache and, with `flashinfer`, SGLang's FlashInfer on FP8 and BF16 caches."""
    batch, prefix, chunk = point
    problem = make_extend_problem(*point)
    record = {"batch": batch, "prefix": prefix, "chunk": chunk, "tflop": causal_tflop(*point), "methods": {}}
    reference = None
    for name in variants:
        out = timed(record, f"oscar-triton-{name}",
                    lambda: bench_oscar(problem, prefix, chunk, rep_ms, VARIANTS[name]), reference)
        if reference is None and out is not None:
            reference = out.float()
    timed(record, "oscar-flashinfer", lambda: bench_oscar_flashinfer(problem, batch, prefix, chunk, rep_ms), reference)
    timed(record, "sglang-triton-bf16", lambda: bench_sglang_bf16(problem, chunk, rep_ms), None)
    if flashinfer:
        for name, kv_dtype in FLASHINFER_CACHES.items():
            timed(record, name, lambda: bench_flashinfer_cache(problem, prefix, rep_ms, kv_dtype), None)
    release()
    return record


def table(points, methods):
    headers = ["batch x prefix x chunk"] + [f"{m} µs (TFLOP/s)" for m in methods]
    rows = []
    for point in points:
        cells = []
        for m in methods:
            r = point["methods"].get(m, {})
            cells.append(f"{r['us']:.0f} ({r['tflops']:.0f})" if "us" in r else "error")
        rows.append([f"{point['batch']}x{point['prefix']}x{point['chunk']}", *cells])
    return markdown_table(headers, rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("extend_kernels needs a CUDA GPU")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    points = [run_point(point, variants, args.rep_ms, args.flashinfer) for point in args.points]
    methods = ["oscar-flashinfer"] + [f"oscar-triton-{v}" for v in variants] + ["sglang-triton-bf16"]
    if args.flashinfer:
        methods += [*FLASHINFER_CACHES]
    print(table(points, methods))
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / f"extend_kernels_{gpu}.json", {
        "benchmark": "extend_kernels", "created": now_iso(), "machine": machine_info(),
        "command": "python -m benchmarks.extend_kernels " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "variants": {v: VARIANTS[v] for v in variants}, "points": points})


if __name__ == "__main__":
    main()
