"""int2_split.cu on the CPU: its text, with tests/emulated_cuda.h in place of the PTX helpers,
compiled by g++ and run on CPU tensors with the arguments `int2_split.launch` gives the driver,
so the CPU tests check the CUDA kernel's own indexing, pipeline and arithmetic."""

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from oscar_sglang.kernels import int2_split

EMULATED_CUDA = Path(__file__).with_name("emulated_cuda.h")
COPIES = {"at_issue": 0, "at_wait": 1}  # emulated_cuda.h's Copies
ENTRY = """
extern "C" int emulate_launch(unsigned gx, unsigned gy, unsigned gz, int threads, int copies, void** args,
                              char* error, int error_size) {
  return emu::launch(oscar_int2_split, Dim3{gx, gy, gz}, threads, copies, args, error, error_size);
}
"""


def source(kernel: int2_split.SplitKernel) -> str:
    """The C++ text the emulator builds for `kernel`: int2_split.cu with emulated_cuda.h."""
    return int2_split.kernel_source(kernel, EMULATED_CUDA.read_text()) + ENTRY


@functools.cache
def library(text: str) -> ctypes.CDLL:
    """`text` (from `source`) built for this CPU, cached under the temp folder by its hash."""
    folder = Path(tempfile.gettempdir()) / "oscar-emulated-int2-split"
    folder.mkdir(exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.so"
    if not path.exists():
        src = path.with_suffix(".cpp")
        src.write_text(text)
        if shutil.which("g++") is None:
            raise RuntimeError("g++ not found: the CPU tests of int2_split.cu build it with g++ (Debian: apt install g++)")
        built = subprocess.run(["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-o", f"{path}.part", str(src)],
                               capture_output=True, text=True)
        if built.returncode:
            raise RuntimeError(f"g++ could not build the emulated int2_split.cu ({src}):\n{built.stderr[-4000:]}")
        Path(f"{path}.part").rename(path)
    lib = ctypes.CDLL(str(path))
    lib.emulate_launch.restype = ctypes.c_int
    return lib


def launch(*args, copies: str = "at_wait", edit: Callable[[str], str] | None = None) -> None:
    """`int2_split.launch` for CPU tensors (same arguments), asynchronous copies completing
    `copies` (emulated_cuda.h); raises what the emulator found undefined. edit: a change to the
    kernel's text (tests that break it on purpose)."""
    planned = int2_split.plan_launch(*args)
    assert all(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args[:4])
    text = source(planned.kernel)
    pointers = planned.argument_pointers()
    error = ctypes.create_string_buffer(1024)
    failed = library(edit(text) if edit else text).emulate_launch(
        *planned.grid, int2_split.WARPS * 32, COPIES[copies], pointers, error, len(error))
    if failed:
        raise RuntimeError(f"int2_split.cu went wrong in the emulator: {error.value.decode()}")
