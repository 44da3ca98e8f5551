"""Registers, spills and main-loop instruction mix of the OSCAR-2 kernels as an H100 (sm_90) runs
them, measured on any machine: Triton compiles its kernels ahead of time with its bundled ptxas,
NVRTC the CUDA split kernel (int2_split.cu), and cuobjdump reads the cubins, so no GPU is needed.

Every kernel is compiled exactly as the library's host functions launch it (the same arguments,
hence the same specializations and launch options as on a GPU), for one Qwen3-8B layer (H_q 32,
H_kv 8, D 128, G 128; --head-dim 64 for a D = 64 model): decode without and with shared-prefix
blocks, extend over a cached prefix, the write kernel at decode and prefill token counts.
Reported per kernel: registers and stack bytes per thread, shared memory, and per loop (backward
branch) the SASS instructions of one iteration, the local-memory accesses among them (register
spills: STL / LDL), the tensor-core instructions (HMMA, or HGMMA for warpgroup MMAs) and the
count of each opcode; the table shows the main loop, the one with the most tensor-core
instructions, and its most frequent opcodes are printed below it. --key-bits sets the key
code width; --set decode.FIELD=VALUE, extend.FIELD=VALUE and quantize.FIELD=VALUE change a field of
the decode, extend or write launch (kernels.decode.DecodeLaunch, kernels.extend.ExtendLaunch,
kernels.quantize.WriteLaunch).

    python -m benchmarks.tuning.kernel_resources
    python -m benchmarks.tuning.kernel_resources --key-bits 3 --set decode.shared_warps=8

Writes <out-dir>/kernel_resources_sm90_d<D>[_k<BITS>, other than the default][_<FIELD><VALUE>...].json and prints a markdown
table; with --loop-sass also <that stem>_loops.sass, one iteration of each kernel's main loop.
"""

import argparse
import collections
import contextlib
import dataclasses
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from benchmarks.layers import QWEN3_8B
from benchmarks.paths import DEFAULT_RESULTS_DIR
from benchmarks.records import machine_info, markdown_table, now_iso, write_json
from oscar_sglang.kernels import decode as dk
from oscar_sglang.kernels import extend as ek
from oscar_sglang.kernels import quantize as qk
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, SUPPORTED_KEY_BITS

TARGET = GPUTarget("cuda", 90, 32)  # H100
LAUNCHES = {dk: dk.DECODE_LAUNCH, ek: ek.EXTEND_LAUNCH, qk: qk.WRITE_LAUNCH}  # launches that are dataclasses
Q_HEADS, KV_HEADS = QWEN3_8B.q_heads, QWEN3_8B.kv_heads
BATCH, CONTEXT = 4, 1000  # shapes only select specializations; nothing runs
INSTRUCTION_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BACKWARD_BRANCH_RE = re.compile(r"\bBRA\s+0x([0-9a-f]+)")


def bind_launch(kernel: JITFunction, args, kwargs, backend):
    """(options, signature, constexprs, attrs) of `kernel[grid](*args, **kwargs)` for TARGET:
    Triton's own binder picks the specializations (divisibility, constants) from the arguments;
    two launches with equal results run one compiled kernel. Mirrors JITFunction.run of
    Triton 3.6 (private helpers: a Triton upgrade may need this adjusted)."""
    kwargs = {**kwargs, "debug": kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
              "instrumentation_mode": knobs.compilation.instrumentation_mode}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def compile_launch(kernel: JITFunction, args, kwargs, backend):
    """The CompiledKernel that `kernel[grid](*args, **kwargs)` would build for TARGET."""
    options, signature, constexprs, attrs = bind_launch(kernel, args, kwargs, backend)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


@contextlib.contextmanager
def compiled_instead_of_launched(records: list, tag: str):
    """Inside the block, every Triton launch compiles its kernel for TARGET, appends
    (tag, kernel name, CompiledKernel) to `records` and runs nothing."""
    backend = make_backend(TARGET)
    launch = JITFunction.__getitem__

    def compile_only(kernel, grid):
        def run(*args, **kwargs):
            records.append((tag, kernel.fn.__name__, compile_launch(kernel, args, kwargs, backend)))
        return run

    JITFunction.__getitem__ = compile_only
    try:
        yield
    finally:
        JITFunction.__getitem__ = launch


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def opcode(instruction: str) -> str:
    """'@!P0 LDL.64 R2, [R1+0x8]' -> 'LDL'."""
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(sass: str) -> list[dict]:
    """Per loop (backward branch), one iteration's instructions, spills (STL / LDL),
    tensor-core instructions, count per opcode (most frequent first) and its first and last
    instruction addresses, in address order."""
    instructions = [(int(a, 16), text) for a, text in INSTRUCTION_RE.findall(sass)]
    found = []
    for address, text in instructions:
        target = BACKWARD_BRANCH_RE.search(text)
        if not target or int(target.group(1), 16) >= address:
            continue
        body = [opcode(t) for a, t in instructions if int(target.group(1), 16) <= a <= address]
        found.append({"instructions": len(body), "spills": sum(op in ("STL", "LDL") for op in body),
                      "mma": sum(op in ("HMMA", "HGMMA") for op in body),
                      "opcodes": dict(collections.Counter(body).most_common()),
                      "addresses": [int(target.group(1), 16), address]})
    return found


def loop_text(sass: str, loop: dict) -> str:
    """The SASS of one iteration of `loop` (from `loops(sass)`), one instruction per line."""
    first, last = loop["addresses"]
    return "".join(f"/*{a}*/ {t};\n" for a, t in INSTRUCTION_RE.findall(sass) if first <= int(a, 16) <= last)


def main_loop(found: list[dict]) -> dict:
    """The loop with the most tensor-core instructions, the leaner one of equals (the extend
    kernel's prefix loop rather than its causal chunk loop); zeros without a loop."""
    return max(found, key=lambda loop: (loop["mma"], -loop["instructions"]),
               default={"instructions": 0, "spills": 0, "mma": 0, "opcodes": {}, "addresses": [0, -1]})


def loop_fields(cubin: bytes) -> dict:
    """A row's loop fields: its main loop, every loop, and the main loop's SASS under "loop_sass"
    (which main() writes to a file of its own, not the JSON)."""
    sass = cuobjdump(cubin, "-sass")
    found = loops(sass)
    main = main_loop(found)
    return {"loop": main, "loops": found, "loop_sass": loop_text(sass, main)}


def describe(tag: str, name: str, kernel) -> dict:
    """One row: the kernel's resources and its main loop (`loop_fields`)."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(kernel.asm["cubin"], "-res-usage"))
    return {"launch": tag, "kernel": name, "num_warps": kernel.metadata.num_warps, "maxnreg": kernel.metadata.maxnreg,
            "registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)),
            "shared_bytes": kernel.metadata.shared, **loop_fields(kernel.asm["cubin"])}


def describe_cuda_split(head_dim: int, key_bits: int, decode_launch) -> dict:
    """The row of int2_split.cu, the CUDA kernel that runs the decode step's split programs on a
    GPU (kernels/int2_split.py), compiled by NVRTC for sm_90 as decode launches it for this layer
    (its report from ptxas's log)."""
    from oscar_sglang.kernels import int2_split
    from oscar_sglang.kernels.format import OscarFormat

    fmt = OscarFormat(head_dim, key_bits=key_bits)
    kernel = int2_split.SplitKernel(fmt, Q_HEADS // KV_HEADS, (32, 32, 32), False, decode_launch.window_rows_per_program,
                                    decode_launch.cuda_stages, decode_launch.cuda_key_chains)
    compiled = int2_split.compile_kernel(kernel, f"sm_{TARGET.arch}")
    usage = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", compiled.log)
    stack = re.search(r"(\d+) bytes stack frame", compiled.log)
    return {"launch": "decode", "kernel": "oscar_int2_split", "num_warps": int2_split.WARPS, "maxnreg": None,
            "registers": int(usage.group(1)), "stack_bytes": int(stack.group(1)), "shared_bytes": int(usage.group(2)),
            **loop_fields(compiled.cubin)}


def launches(head_dim: int, key_bits: int, decode_launch, extend_launch, write_launch):
    """(tag, host call) pairs covering every kernel, on CPU tensors of one layer."""
    from oscar_sglang.kernels.decode import decode_attention_int2
    from oscar_sglang.kernels.extend import extend_attention_int2
    from oscar_sglang.kernels.format import OscarFormat
    from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer
    from oscar_sglang.kernels.quantize import write_kv_int2
    from oscar_sglang.kernels.shared_prefix import WIDE_SHARED_DOT_ROWS, find_shared_prefixes

    fmt = OscarFormat(head_dim, key_bits=key_bits)
    slots = BATCH * CONTEXT
    kv_indptr = torch.arange(BATCH + 1, dtype=torch.int32) * CONTEXT
    kv_indices = torch.arange(slots, dtype=torch.int32)
    starts = torch.arange(BATCH, dtype=torch.int32) * fmt.window_rows_per_request
    codes = [pool_buffer(fmt.codes_shape(slots, KV_HEADS, kind), torch.uint8, "cpu") for kind in "kv"]
    metas = [pool_buffer(fmt.meta_shape(slots, KV_HEADS), torch.float16, "cpu") for _ in "kv"]
    windows = [torch.zeros(fmt.window_shape(BATCH, KV_HEADS), dtype=torch.bfloat16) for _ in "kv"]
    rots = [torch.eye(head_dim).expand(KV_HEADS, head_dim, head_dim).contiguous() for _ in "kv"]
    cache = LayerCache(fmt, codes[0], metas[0], codes[1], metas[1], windows[0], windows[1], rots[0], rots[1])
    q = torch.zeros(BATCH, Q_HEADS, head_dim, dtype=torch.bfloat16)
    decode_args = (q, kv_indptr, kv_indices, starts, cache, head_dim ** -0.5)
    chunk = 256
    qo_indptr = torch.arange(BATCH + 1, dtype=torch.int32) * chunk
    new = [torch.zeros(BATCH * chunk, heads, head_dim, dtype=torch.bfloat16) for heads in (Q_HEADS, KV_HEADS, KV_HEADS)]

    def write(tokens):
        k = torch.zeros(tokens, KV_HEADS, head_dim, dtype=torch.bfloat16)
        write_kv_int2(k, k.clone(), kv_indices[:tokens], cache, kv_indices[:tokens], torch.zeros(1, dtype=torch.int32),
                      launch=write_launch)

    return [
        ("decode", lambda: decode_attention_int2(*decode_args, launch=decode_launch)),
        ("decode, shared-prefix blocks", lambda: decode_attention_int2(
            *decode_args, shared=find_shared_prefixes(kv_indptr, kv_indices, fmt, Q_HEADS // KV_HEADS),
            launch=decode_launch)),
        ("decode, wide shared-prefix blocks", lambda: decode_attention_int2(
            *decode_args, shared=find_shared_prefixes(kv_indptr, kv_indices, fmt, Q_HEADS // KV_HEADS,
                                                      WIDE_SHARED_DOT_ROWS), launch=decode_launch)),
        ("extend", lambda: extend_attention_int2(*new, qo_indptr, kv_indptr, kv_indices, starts, cache,
                                                 head_dim ** -0.5, max_extend_len=chunk, max_prefix_len=CONTEXT,
                                                 launch=extend_launch)),
        ("write, decode", lambda: write(BATCH)),
        ("write, prefill", lambda: write(chunk * BATCH)),
    ]


def parse_setting(text: str):
    """'decode.shared_warps=8' -> (the kernels.decode module, 'shared_warps', 8): a field of the
    launch dataclass of kernels/decode.py, extend.py or quantize.py (LAUNCHES)."""
    match = re.fullmatch(r"(\w+)\.(\w+)=(.+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected LAUNCH.FIELD=VALUE, got {text!r}")
    modules = {m.__name__.rsplit(".", 1)[1]: m for m in LAUNCHES}
    if match.group(1) not in modules:
        raise argparse.ArgumentTypeError(f"LAUNCH is one of {sorted(modules)}, got {match.group(1)!r}")
    module, name = modules[match.group(1)], match.group(2)
    fields = [f.name for f in dataclasses.fields(LAUNCHES[module])]
    if name not in fields:
        raise argparse.ArgumentTypeError(f"{match.group(1)} settings are fields of {type(LAUNCHES[module]).__name__}: "
                                         f"{fields}, got {name!r}")
    value = match.group(3)
    return module, name, None if value == "None" else int(value)


def table(rows: list) -> str:
    headers = ["launch", "kernel", "warps", "maxnreg", "registers", "stack B", "shared B",
               "loop instructions", "loop spills", "loop MMA"]
    return markdown_table(headers, [
        [r["launch"], r["kernel"], r["num_warps"], r["maxnreg"], r["registers"], r["stack_bytes"],
         r["shared_bytes"], r["loop"]["instructions"], r["loop"]["spills"], r["loop"]["mma"]] for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
    parser.add_argument("--key-bits", type=int, choices=SUPPORTED_KEY_BITS, default=DEFAULT_KEY_BITS,
                        help="key code width (default %(default)s)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="LAUNCH.FIELD=VALUE",
                        help="a field of a launch dataclass: decode.FIELD, extend.FIELD or quantize.FIELD (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--loop-sass", action="store_true",
                        help="also write every kernel's main-loop SASS, one iteration each, to <stem>_loops.sass")
    args = parser.parse_args(argv)
    if knobs.runtime.interpret:
        sys.exit("kernel_resources compiles the GPU code paths: run it with TRITON_INTERPRET unset")
    records = []
    launch = dict(LAUNCHES)
    for module, name, value in args.set:
        launch[module] = dataclasses.replace(launch[module], **{name: value})
    for tag, call in launches(args.head_dim, args.key_bits, launch[dk], launch[ek], launch[qk]):
        with compiled_instead_of_launched(records, tag):
            call()
    # a kernel launched twice alike in one call (extend dequantizes K, then V) is one row
    rows = [describe(*record) for i, record in enumerate(records)
            if (record[0], record[2].hash) not in {(r[0], r[2].hash) for r in records[:i]}]
    rows.append(describe_cuda_split(args.head_dim, args.key_bits, launch[dk]))
    print(table(rows))
    print("\nmain-loop instruction mix (the 12 most frequent opcodes):")
    for r in rows:
        if r["loop"]["opcodes"]:
            mix = ", ".join(f"{op} {n}" for op, n in list(r["loop"]["opcodes"].items())[:12])
            print(f"  {r['launch']} / {r['kernel']}: {mix}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    width = "" if args.key_bits == DEFAULT_KEY_BITS else f"_k{args.key_bits}"
    settings = "".join(f"_{name}{value}" for _, name, value in args.set)
    stem = args.out_dir / f"kernel_resources_sm90_d{args.head_dim}{width}{settings}"
    sass = [(f"{r['launch']} / {r['kernel']}", r.pop("loop_sass")) for r in rows]
    if args.loop_sass:
        stem.with_name(stem.name + "_loops.sass").write_text(
            "".join(f"// {name}: main loop, one iteration\n{text}\n" for name, text in sass))
    write_json(stem.with_suffix(".json"), {
        "benchmark": "kernel_resources", "created": now_iso(), "machine": machine_info(),
        "command": "python -m benchmarks.tuning.kernel_resources " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "target": f"{TARGET.backend} sm_{TARGET.arch}", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
