"""Warn once per layer when the model writes non-finite K/V, without a host sync per step.

The write kernel stores a non-finite (token, head) row as zeros and sets that layer's element
of `NonFiniteReporter.flags` (kernels/quantize.write_kv_int2, `nonfinite_flag`), inside CUDA
graphs too. `check()` runs once per forward, before the model (eager and graph replay): it
reads the host copy of the flags made by an earlier call once that copy's event has completed,
and starts the next asynchronous copy, so a warning comes a step or so after the overflow and
the scheduler never waits on the GPU. Flags are never cleared: each layer is reported once per
process, and no flag can be lost between a copy and a clear.
"""

import logging

import torch

logger = logging.getLogger(__name__)


class NonFiniteReporter:
    def __init__(self, num_layers: int, start_layer: int, device: str | torch.device):
        """Flags for layers [start_layer, start_layer + num_layers) (this pipeline rank's)."""
        self.start_layer = start_layer
        self.flags = torch.zeros(num_layers, dtype=torch.int32, device=device)
        self._flag_views = self.flags.split(1)  # made once: captured graphs keep their pointers
        self._reported: set[int] = set()
        if self.flags.is_cuda:
            self._host = torch.zeros(num_layers, dtype=torch.int32, pin_memory=True)
            self._copied = torch.cuda.Event()
            self._copy_pending = False

    def flag(self, layer_id: int) -> torch.Tensor:
        """[1] int32 element of `flags` for the write kernel of layer `layer_id`."""
        return self._flag_views[layer_id - self.start_layer]

    def check(self) -> None:
        """Warn for layers flagged since the last report; never blocks on the GPU."""
        if len(self._reported) == len(self._flag_views):
            return
        if not self.flags.is_cuda:
            self._report(self.flags.tolist())
            return
        if self._copy_pending:
            if not self._copied.query():
                return
            self._report(self._host.tolist())
        self._host.copy_(self.flags, non_blocking=True)
        self._copied.record()
        self._copy_pending = True

    def _report(self, flags: list[int]) -> None:
        for i, flagged in enumerate(flags):
            layer = self.start_layer + i
            if flagged and layer not in self._reported:
                self._reported.add(layer)
                logger.warning("OSCAR: layer %d produced non-finite K/V values; they are stored as "
                               "zeros (the model's activations overflowed)", layer)
