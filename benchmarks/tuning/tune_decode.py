"""Tuning sweep of the OSCAR-2 kernels on one GPU, for a Qwen3-8B layer (H_q 32, H_kv 8, D 128):

- decode: `decode_attention_int2` with other launch parameters (a DecodeLaunch: positions per
  tile, warps, register cap, pipeline stages) and split counts around the default, at several
  context × batch shapes (--shapes), optionally with a prefix all requests share (--shared-prefix,
  as in benchmarks/decode_kernels.py);
- shared: `decode_attention_int2` with shared-prefix blocks (`kernels/shared_prefix.py`, found
  outside the timing) at the --shapes with --shared-prefix, for block sizes (query rows per
  block, from the batch size) and launch parameters of the shared-prefix kernel
  (DecodeLaunch.shared_warps, .shared_max_registers);
- the decode step's pieces: q rotation and reduce (also with one request / query row per program), a step whose
  context fits the BF16 windows;
- the write kernel (write_kv_int2) at decode and prefill token counts, and other tokens per
  program / warps.

Every point is the median of triton.testing.do_bench over a CUDA-graph replay, L2 flushed between
calls; %HBM is the bytes a decode step must read over the measured device-to-device copy rate.
The cache has the served key width unless --key-bits says otherwise.

    python -m benchmarks.tuning.tune_decode --out-dir benchmarks/results/h100
    python -m benchmarks.tuning.tune_decode --sections decode --shapes 33792x192 --shared-prefix 32768
    python -m benchmarks.tuning.tune_decode --sections shared --shapes 33792x8,33792x64,33792x192 --shared-prefix 32768

Writes <out-dir>/tune_decode_<gpu>.txt and .json and prints the table.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton
from oscar_sglang.kernels import decode as dk
from oscar_sglang.kernels import quantize as qk
from oscar_sglang.kernels import shared_prefix as sp
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, SUPPORTED_KEY_BITS, OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer

from benchmarks.gpu_timing import hbm_bandwidth_gbs, layer_decode_inputs, median_us, oscar_decode_bytes
from benchmarks.layers import QWEN3_8B

Q_HEADS, KV_HEADS, D, GROUP = QWEN3_8B.q_heads, QWEN3_8B.kv_heads, QWEN3_8B.head_dim, QWEN3_8B.group
DEV = "cuda"
SHAPES = [(4096, 1), (32768, 1), (100000, 1), (131072, 1), (4096, 8), (32768, 8), (131072, 8)]
SECTIONS = ("write", "pieces", "decode", "shared")
# decode launch variants; the first is the library default. 8 warps and 64 or 256 positions per
# tile were slower everywhere (results/h100/tune_decode_large_batch*.txt in git history), and so
# were register caps of 96 and 80, which fit 5 and 6 programs per SM (results/h100/tune_decode_register_caps.txt),
# and one- or two-warp programs over 64 positions (results/h100/tune_decode_small_programs.txt),
# programmatic dependent launches (results/h100/decode-pdl-ab.md) and one softmax state per warp
# (results/h100/tune_decode_pdl_warp_states.txt)
SPLIT_VARIANTS = {
    "default": dk.DECODE_LAUNCH,
    # each split kernel at every batch size (the default picks one by the batch's size)
    "triton": dk.DECODE_LAUNCH.with_split_kernel("triton"),
    "cuda": dk.DECODE_LAUNCH.with_split_kernel("cuda"),
    "cuda_chains4": replace(dk.DECODE_LAUNCH.with_split_kernel("cuda"), cuda_key_chains=4),
    "cuda_stages3": replace(dk.DECODE_LAUNCH.with_split_kernel("cuda"), cuda_stages=3),
    "cuda_stages6": replace(dk.DECODE_LAUNCH.with_split_kernel("cuda"), cuda_stages=6),
    # the reduce's programs per query head: each loads D / N rows of R_V and all its head's partials
    "reduce2": replace(dk.DECODE_LAUNCH, reduce_dim_programs=2),
    "reduce8": replace(dk.DECODE_LAUNCH, reduce_dim_programs=8),
    # query heads of a KV head, then requests, per reduce program while their partials fit 256 rows
    # (64 by default)
    "reduce_rows256": replace(dk.DECODE_LAUNCH, reduce_rows=256),
    # the reduce loading all partials at once everywhere, or merging 4 at a time where the model
    # prefers chunks (reduce_plan)
    "reduce_one_load": replace(dk.DECODE_LAUNCH, reduce_parts=None),
    "reduce_parts4": replace(dk.DECODE_LAUNCH, reduce_parts=4),
}
# shared-prefix variants: the query rows a block aims at (find_shared_prefixes' dot_rows) and the
# launch; the first is the library default (wide blocks from WIDE_BLOCKS_MIN_BATCH requests on),
# then each split kernel beside the blocks, then 16-row and 64-row blocks at every batch size.
# 32-row blocks and 1-warp programs were slower (benchmarks/results/h200/tune_decode_shared_wide_blocks.txt
# in git history)
SHARED_VARIANTS = {  # name: (query rows a block aims at, None: the library's choice; launch)
    "default": (None, dk.DECODE_LAUNCH),
    "triton": (None, dk.DECODE_LAUNCH.with_split_kernel("triton")),
    "cuda": (None, dk.DECODE_LAUNCH.with_split_kernel("cuda")),
    "rows16": (sp.SHARED_DOT_ROWS, dk.DECODE_LAUNCH),
    "rows64": (sp.WIDE_SHARED_DOT_ROWS, dk.DECODE_LAUNCH),
    # 8 warps: no spills in the main loop with 4-bit keys (kernel_resources), 4 warps spill there
    "rows64_w8": (sp.WIDE_SHARED_DOT_ROWS, replace(dk.DECODE_LAUNCH, shared_warps=8)),
    # shared-prefix steps have 16-64 partials per query row: 4 heads per reduce program up to 256 rows
    "reduce_rows256": (None, replace(dk.DECODE_LAUNCH, reduce_rows=256)),
    "reduce_one_load": (None, replace(dk.DECODE_LAUNCH, reduce_parts=None)),
    "reduce_parts4": (None, replace(dk.DECODE_LAUNCH, reduce_parts=4)),
    # wide blocks' splits aimed at two or four waves of the two programs that fit an SM rather than
    # one (16 or 33 splits at 64 requests on a 32K prefix, against 8)
    "wide_splits4": (None, replace(dk.DECODE_LAUNCH, wide_shared_programs_per_sm=4)),
    "wide_splits8": (None, replace(dk.DECODE_LAUNCH, wide_shared_programs_per_sm=8)),
}
# write kernel: tokens -> [(tokens per program, warps)]; the library default is timed too
WRITE_TOKENS = [1, 2, 8, 32, 64, 256, 8192]
WRITE_VARIANTS = {8: [(8, 4)], 64: [(16, 4)], 256: [(4, 4)]}


def decode_bytes(batch, context, key_bits):
    return oscar_decode_bytes(QWEN3_8B, OscarFormat(D, key_bits=key_bits), batch, context)


def decode_variant(problem: dk.DecodeInputs, splits: int, launch: dk.DecodeLaunch):
    """One decode step with `splits` INT2 splits per (request, KV head) and `launch`."""
    return dk.decode_attention_int2(*problem.args, num_kv_splits=splits, launch=launch)


def split_only(problem: dk.DecodeInputs, splits):
    """The split kernel of a default decode step alone (its rotated q prepared outside the
    timing): a callable for time_us."""
    step = dk.decode_step(*problem.args, num_kv_splits=splits)
    step.rotate_q()
    return step.split


def write_variant(k, v, slots, rows, cache: LayerCache, block_t, warps):
    """write_kv_int2 with `block_t` tokens per program (prefill and decode alike) and `warps`."""
    launch = qk.WriteLaunch(block_tokens=block_t, decode_block_tokens=block_t, num_warps=warps)
    qk.write_kv_int2(k, v, slots, cache, rows, launch=launch)


def time_us(fn, rep=25):
    """Median µs of one call replayed from a CUDA graph, L2 flushed between calls."""
    return median_us(fn, rep)[0]


def write_setup(tokens, key_bits):
    """(k, v, slots, window rows, LayerCache) of a write of `tokens` tokens."""
    fmt = OscarFormat(D, key_bits=key_bits)
    slots_total = max(2 * tokens, 1024)
    rows_total = max(tokens, 64 * fmt.window_rows_per_request)
    bufs = []
    for kind in "kv":
        bufs += [pool_buffer(fmt.codes_shape(slots_total, KV_HEADS, kind), torch.uint8, DEV),
                 pool_buffer(fmt.meta_shape(slots_total, KV_HEADS), torch.float16, DEV)]
    bufs += [torch.zeros(rows_total, KV_HEADS, D, dtype=torch.bfloat16, device=DEV) for _ in "kv"]
    k = torch.randn(tokens, KV_HEADS, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(tokens, KV_HEADS, D, device=DEV).to(torch.bfloat16)
    slots = torch.randperm(slots_total, device=DEV)[:tokens]
    rows = torch.randperm(rows_total, device=DEV)[:tokens]
    rots = [torch.linalg.qr(torch.randn(KV_HEADS, D, D, device=DEV))[0].contiguous() for _ in "kv"]
    return k, v, slots, rows, LayerCache(fmt, *bufs, *rots, 0.96, 0.92)


def warm(kind, key_bits):
    """Compile one group of kernels (a worker process; fills the Triton cache)."""
    if kind.startswith("split:"):
        variant = SPLIT_VARIANTS[kind[6:]]
        for batch in (1, 8):
            decode_variant(layer_decode_inputs(QWEN3_8B, batch, 4096, key_bits=key_bits), 8, variant)
            decode_variant(layer_decode_inputs(QWEN3_8B, batch, 4096, key_bits=key_bits), 64, variant)
    else:
        tokens, block_t, warps = map(int, kind[6:].split(","))
        k, v, slots, rows, cache = write_setup(tokens, key_bits)
        write_variant(k, v, slots, rows, cache, block_t, warps)
    torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=8, help="parallel compile workers")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s")
    parser.add_argument("--shapes", default=",".join(f"{c}x{b}" for c, b in SHAPES),
                        help="decode shapes CONTEXTxBATCH (default: %(default)s)")
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens whose slots all requests share")
    parser.add_argument("--splits", type=lambda text: sorted({int(x) for x in text.split(",")}),
                        help="INT2 split counts the default and single-kernel variants are timed at (default: half, "
                             "once, twice and four times the library's count)")
    parser.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS,
                        help="OSCAR key code width (default: the served one, %(default)s)")
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    if args.warm:
        warm(args.warm, args.key_bits)
        return 0
    if not torch.cuda.is_available():
        print("tune_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.time()
    kinds = [f"split:{n}" for n in SPLIT_VARIANTS] if "decode" in sections else []
    kinds += [f"write:{t},{bt},{w}" for t, vs in WRITE_VARIANTS.items() for bt, w in vs if "write" in sections]
    procs = []
    for kind in kinds:
        while sum(p.poll() is None for _, p in procs) >= args.jobs:
            time.sleep(0.2)
        procs.append((kind, subprocess.Popen([sys.executable, "-m", "benchmarks.tuning.tune_decode", "--warm", kind,
                                              "--key-bits", str(args.key_bits)],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = set()
    for kind, p in procs:
        text = p.communicate()[0]
        if p.returncode:
            failed.add(kind)
            print(f"[{kind}] failed:\n{text[-2000:]}", flush=True)

    device = torch.cuda.get_device_name()
    hbm = hbm_bandwidth_gbs(50)
    lines = [f"{device}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs; torch {torch.__version__}, "
             f"triton {triton.__version__}; device-to-device copy {hbm:.0f} GB/s; {args.key_bits}-bit keys; "
             f"compiled in {time.time() - started:.0f}s",
             "command: " + shlex.join([sys.executable, "-m", "benchmarks.tuning.tune_decode", *sys.argv[1:]]), ""]
    results = {"decode": {}, "pieces": {}, "write": {}, "shared": {}}

    lines.append("write_kv_int2 (K and V, H_kv 8, D 128, every token also to a window row), us:")
    for tokens in WRITE_TOKENS if "write" in sections else []:
        k, v, slots, rows, cache = write_setup(tokens, args.key_bits)
        cells = []
        us = time_us(lambda: qk.write_kv_int2(k, v, slots, cache, rows))
        results["write"][f"T{tokens}"] = {"default": us}
        cells.append(f"default {us:.1f}")
        for block_t, warps in WRITE_VARIANTS.get(tokens, []):
            if f"write:{tokens},{block_t},{warps}" in failed:
                continue
            us = time_us(lambda: write_variant(k, v, slots, rows, cache, block_t, warps))
            results["write"][f"T{tokens}"][f"{block_t}tok_{warps}w"] = us
            cells.append(f"{block_t} tok/{warps} warps {us:.1f}")
        lines.append(f"  T = {tokens:>5}: " + ", ".join(cells))
        print(lines[-1], flush=True)
    save(args.out_dir, device, lines, results, hbm)

    lines.append("decode pieces, us:")
    for batch in (1, 8, 32, 128) if "pieces" in sections else []:
        problem = layer_decode_inputs(QWEN3_8B, batch, 32768, key_bits=args.key_bits)
        step = dk.decode_step(*problem.args)  # the library's split kernel and count at this batch
        splits = step.splits
        step.run()  # the reduce kernel then merges real partials
        rotate = time_us(step.rotate_q)
        reduce = time_us(step.reduce)
        block = step.reduction_block
        one_row = dk.decode_step(*problem.args, launch=replace(dk.DECODE_LAUNCH, reduce_rows=1, rotate_rows=1))
        one_row.run()
        reduce_one_row = time_us(one_row.reduce)
        rotate_one_request = time_us(one_row.rotate_q)
        chunked = {}
        for name in ("reduce_one_load", "reduce_parts4"):
            variant = dk.decode_step(*problem.args, launch=SPLIT_VARIANTS[name])
            variant.run()
            chunked[name] = (time_us(variant.reduce), variant.reduction_block)
        parts = step.parts
        small = {}
        for context in (192, 1024):
            p2 = layer_decode_inputs(QWEN3_8B, batch, context, key_bits=args.key_bits)
            small[context] = time_us(lambda: dk.decode_attention_int2(*p2.args))
        tiny = torch.empty(1, device=DEV)
        floor = time_us(lambda: tiny.zero_())
        split_alone = {}
        for context in (32768, 131072):
            p3 = layer_decode_inputs(QWEN3_8B, batch, context, key_bits=args.key_bits)
            split_alone[context] = time_us(split_only(p3, splits))
            p3 = None  # frees the buffers before the next problem
        results["pieces"][f"B{batch}"] = {"rotate_q": rotate, "rotate_one_request": rotate_one_request,
                                          "rotate_requests": step.rotation_block,
                                          "reduce": reduce, "reduce_one_row": reduce_one_row,
                                          "reduce_block": block._asdict(), "one_memset": floor,
                                          **{name: {"reduce": t, "reduce_block": b._asdict()}
                                             for name, (t, b) in chunked.items()},
                                          **{f"step@{c}": t for c, t in small.items()},
                                          **{f"split_kernel@{c}": t for c, t in split_alone.items()}}
        lines.append(f"  batch {batch}: rotate_q {rotate:.1f} (one request per program {rotate_one_request:.1f}), reduce ({parts} partials, {block.requests} requests x "
                     f"{block.heads} heads per program) {reduce:.1f} (one of each {reduce_one_row:.1f}; "
                     + "; ".join(f"{n} {t:.1f} at {b.requests} x {b.heads}" for n, (t, b) in chunked.items())
                     + f"), whole step at "
                     f"context 192 (windows only) {small[192]:.1f}, at 1024 {small[1024]:.1f}; a 1-element memset "
                     f"{floor:.1f} (the timing floor); split kernel alone " + ", ".join(
                         f"at {c}: {t:.1f} ({100 * decode_bytes(batch, c, args.key_bits) / (t * 1e-6) / 1e9 / hbm:.0f}%)"
                         for c, t in split_alone.items()))
        print(lines[-1], flush=True)

    lines.append("decode step, us (%HBM of the bytes it must read) per split-kernel variant and splits"
                 + (f", the first {args.shared_prefix} tokens' slots shared by all requests:" if args.shared_prefix else ":"))
    for context, batch in shapes if "decode" in sections else []:
        problem = layer_decode_inputs(QWEN3_8B, batch, context, shared_prefix=args.shared_prefix, key_bits=args.key_bits)
        nbytes = decode_bytes(batch, context, args.key_bits)
        cells = []
        for name, variant in SPLIT_VARIANTS.items():
            if f"split:{name}" in failed:
                continue
            default_splits = dk.decode_step(*problem.args, launch=variant).splits
            trial = [default_splits] if name not in ("default", "triton", "cuda") else args.splits or sorted(
                {max(1, default_splits // 2), default_splits, min(dk.MAX_KV_SPLITS, 2 * default_splits),
                 min(dk.MAX_KV_SPLITS, 4 * default_splits)})
            for splits in trial:
                us = time_us(lambda: decode_variant(problem, splits, variant))
                results["decode"].setdefault(f"{context}x{batch}", {})[f"{name}@{splits}"] = us
                pct = 100 * nbytes / (us * 1e-6) / 1e9 / hbm
                cells.append(f"{name}@{splits} {us:.1f} ({pct:.0f}%)")
        lines.append(f"  {context:>6} x {batch}: " + "; ".join(cells))
        print(lines[-1], flush=True)
        save(args.out_dir, device, lines, results, hbm)
        problem = None  # frees the buffers before the next shape
        torch.cuda.empty_cache()

    if "shared" in sections:
        shared_section(shapes, args.shared_prefix, args.key_bits, lines, results, hbm)
        save(args.out_dir, device, lines, results, hbm)

    lines.append(f"total {time.time() - started:.0f}s")
    save(args.out_dir, device, lines, results, hbm)
    print("\n".join(lines))
    return 0


def shared_section(shapes, shared_prefix, key_bits, lines, results, hbm):
    """Decode steps with shared-prefix blocks per SHARED_VARIANTS entry (blocks found outside
    the timing, their search and the step's reduce kernel timed apart)."""
    lines.append(f"decode step with shared-prefix blocks, us (%HBM of the bytes a step reads without blocks), "
                 f"the first {shared_prefix} tokens' slots shared by all requests:")
    for context, batch in shapes:
        problem = layer_decode_inputs(QWEN3_8B, batch, context, shared_prefix=shared_prefix, key_bits=key_bits)
        nbytes = decode_bytes(batch, context, key_bits)
        cells = []
        for name, (dot_rows, launch) in SHARED_VARIANTS.items():
            def find():
                return sp.find_shared_prefixes(problem.kv_indptr, problem.kv_indices, problem.cache.fmt, GROUP, dot_rows)
            try:
                blocks = find()
                step = dk.decode_step(*problem.args, shared=blocks, launch=launch)
                us = time_us(step.run)
                reduce = time_us(step.reduce)
                search = time_us(find)
            except Exception as exc:  # noqa: BLE001  (a variant that fails to compile must not stop the sweep)
                cells.append(f"{name} failed: {type(exc).__name__}")
                continue
            results["shared"].setdefault(f"{context}x{batch}", {})[name] = {"step": us, "reduce": reduce, "find": search}
            cells.append(f"{name} {us:.1f} ({100 * nbytes / (us * 1e-6) / 1e9 / hbm:.0f}%; reduce {reduce:.1f}, "
                         f"{step.parts} partials; search {search:.1f})")
        lines.append(f"  {context:>6} x {batch}: " + "; ".join(cells))
        print(lines[-1], flush=True)
        problem = None  # frees the buffers before the next shape
        torch.cuda.empty_cache()


def save(out_dir, device, lines, results, hbm):
    """Write what has been measured so far (a run cut short keeps its finished sections)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"tune_decode_{slug}.txt").write_text("\n".join(lines) + "\n")
    (out_dir / f"tune_decode_{slug}.json").write_text(json.dumps({"hbm_copy_gbps": hbm, **results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
