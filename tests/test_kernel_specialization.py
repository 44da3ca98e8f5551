"""A serving process must not compile kernels mid-run: Triton compiles a new variant whenever a
launch's specialization (pointer alignment, integer divisibility, constexprs) is new, and on the
H200 host each compile stalled the scheduler for ~3 s. The extend path receives its index arrays
as slices (a batch split into scratch-bounded groups, `extend_groups.extend_in_groups`) and
the write kernel a per-layer entry of one flags tensor, so their alignment varies from launch to
launch; these launches must all bind to one specialization. Checked with Triton's own binder for
sm_90 (`benchmarks.tuning.kernel_resources.bind_launch`) in a process without the interpreter; nothing
is compiled or run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def variants_per_kernel() -> dict:
    """Run this file as a script; returns {kernel name: distinct specializations}."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_slices_and_layers_bind_one_variant_per_kernel():
    variants = variants_per_kernel()
    assert variants == {"_extend_attention_kernel": 1, "_gather_kv_kernel": 1, "_write_kv_kernel": 1}


def probe() -> dict:
    import torch
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    from benchmarks.tuning.kernel_resources import TARGET, bind_launch
    from oscar_sglang.kernels.extend import extend_attention_int2
    from oscar_sglang.kernels.format import OscarFormat
    from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer
    from oscar_sglang.kernels.quantize import write_kv_int2

    backend = make_backend(TARGET)
    keys: dict[str, set] = {}

    def record(kernel, grid):
        def run(*args, **kwargs):
            options, signature, constexprs, attrs = bind_launch(kernel, args, kwargs, backend)
            keys.setdefault(kernel.fn.__name__, set()).add(repr((options, signature, constexprs, attrs)))
        return run

    JITFunction.__getitem__ = record
    fmt = OscarFormat(HEAD_DIM)
    slots, requests = 4096, 9
    codes = [pool_buffer(fmt.codes_shape(slots, KV_HEADS, kind), torch.uint8, "cpu") for kind in "kv"]
    metas = [pool_buffer(fmt.meta_shape(slots, KV_HEADS), torch.float16, "cpu") for _ in "kv"]
    windows = [torch.zeros(fmt.window_shape(requests, KV_HEADS), dtype=torch.bfloat16) for _ in "kv"]
    rots = [torch.eye(HEAD_DIM).expand(KV_HEADS, HEAD_DIM, HEAD_DIM).contiguous() for _ in "kv"]
    pool = LayerCache(fmt, codes[0], metas[0], codes[1], metas[1], windows[0], windows[1], rots[0], rots[1])

    # one batch's index arrays, then groups of its requests starting at every offset parity
    prefix, chunk = [300, 257, 1, 1000, 33, 64, 5, 700], [16, 1, 40, 8, 3, 64, 9, 2]
    kv_indptr = torch.tensor([0, *prefix], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    qo_indptr = torch.tensor([0, *chunk], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kv_indices = torch.arange(int(kv_indptr[-1]), dtype=torch.int64)
    starts = torch.arange(len(prefix), dtype=torch.int64) * fmt.window_rows_per_request
    tokens = int(qo_indptr[-1])
    q = torch.zeros(tokens, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    k = torch.zeros(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    for r0, r1 in [(0, 8), (0, 3), (1, 2), (3, 8), (5, 7)]:
        qo, kv = int(qo_indptr[r0]), int(kv_indptr[r0])
        qo_end, kv_end = int(qo_indptr[r1]), int(kv_indptr[r1])
        extend_attention_int2(q[qo:qo_end], k[qo:qo_end], k[qo:qo_end], qo_indptr[r0:r1 + 1] - qo,
                              kv_indptr[r0:r1 + 1] - kv, kv_indices[kv:kv_end], starts[r0:r1], pool,
                              HEAD_DIM ** -0.5, max_extend_len=max(chunk[r0:r1]),
                              max_prefix_len=max(prefix[r0:r1]))

    flags = torch.zeros(36, dtype=torch.int32)  # one entry per layer, as NonFiniteReporter holds them
    for layer in range(5):
        new = torch.zeros(512, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        loc = torch.arange(512, dtype=torch.int64)
        write_kv_int2(new, new, loc, pool, loc, flags[layer])
    return {name: len(found) for name, found in sorted(keys.items())}


if __name__ == "__main__":
    print(json.dumps(probe()))
