"""Programmatic dependent launch (PDL, sm_90 and later): a kernel launched with it may start
while the kernel before it is still running, once every program of that kernel has called
`gdc_launch_dependents` (or ended); it must call `gdc_wait` before reading anything the kernel
before it wrote, and `gdc_wait` returns once that kernel has ended and its writes are visible.
A decode step chains its small launches this way (kernels/decode.py), so each one's start-up
overlaps the tail of the one before it. CUDA-graph capture keeps the chain."""

import torch
import triton


def supported(device: torch.device) -> bool:
    """Whether kernels on `device` can chain as programmatic dependent launches (never in the
    Triton interpreter, which cannot run the griddepcontrol instructions)."""
    return (device.type == "cuda" and not triton.knobs.runtime.interpret
            and torch.cuda.get_device_capability(device)[0] >= 9)
