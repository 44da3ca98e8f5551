"""The kernels' GPU code paths (inline-PTX unpacking, native 16-bit dots, warpgroup MMAs) compile
for an H100 without one: `benchmarks/tuning/kernel_resources.py` compiles every kernel as the host
functions launch it, for sm_90, with Triton's bundled ptxas, in a process without the
interpreter. The Qwen3-8B decode kernels must keep their main loops free of register spills
(the register cap that lets four programs share an SM relies on it) and on the tensor cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_rotate_q_kernel", "_decode_split_kernel", "_decode_reduce_kernel", "_common_span_kernel",
           "_decode_shared_kernel", "_extend_attention_kernel", "_gather_kv_kernel", "_write_kv_kernel",
           "oscar_int2_split"}
ATTENTION = {"_decode_split_kernel", "_decode_shared_kernel", "_extend_attention_kernel", "oscar_int2_split"}


def kernel_resources(head_dim: int, key_bits: int, out_dir: Path) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.tuning.kernel_resources", "--head-dim", str(head_dim),
                          "--key-bits", str(key_bits), "--out-dir", str(out_dir), "--loop-sass"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    width = "" if key_bits == DEFAULT_KEY_BITS else f"_k{key_bits}"
    return json.loads((out_dir / f"kernel_resources_sm90_d{head_dim}{width}.json").read_text())["rows"]


@pytest.mark.parametrize("head_dim, key_bits", [(64, 2), (128, 2), (64, 3), (128, 3), (128, 4)])
def test_every_kernel_compiles_for_sm90(head_dim, key_bits, tmp_path):
    rows = kernel_resources(head_dim, key_bits, tmp_path)
    assert {r["kernel"] for r in rows} == KERNELS
    sass = next(tmp_path.glob("*_loops.sass")).read_text().split("// ")[1:]  # one section per row, in order
    assert len(sass) == len(rows)
    for r, section in zip(rows, sass):
        assert r["registers"] > 0
        assert sum(r["loop"]["opcodes"].values()) == r["loop"]["instructions"]
        title, *instructions = section.strip().splitlines()
        assert title.startswith(f"{r['launch']} / {r['kernel']}") and len(instructions) == r["loop"]["instructions"]
        if r["kernel"] in ATTENTION:
            assert r["loop"]["mma"] > 0, f"{r['kernel']} ({r['launch']}) runs its main loop without tensor cores"
    if head_dim == 128:
        # wide shared-prefix blocks (64 query rows, from 48 requests on) trade spills for one
        # unpack per 64 rows; whether that pays is a GPU timing (tune_decode --sections shared)
        spilling = [(r["launch"], r["kernel"], r["loop"]["spills"]) for r in rows
                    if r["kernel"] in {"_decode_split_kernel", "_decode_shared_kernel", "oscar_int2_split"}
                    and r["loop"]["spills"]
                    and not r["launch"].startswith("decode, wide")]
        assert not spilling, f"register spills in the decode main loop: {spilling}"
