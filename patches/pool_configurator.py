"""Hooks on sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator: the KV budget
buys OSCAR slots (oscar_sglang.sizing), not BF16 ones."""

from sglang.srt.plugins.hook_registry import HookType

from oscar_sglang import validation

from .patch import Patch

CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
COMPUTE_CELL_SIZE = f"{CONFIGURATOR}._compute_cell_size"
FINALIZE_MAX_RUNNING_REQUESTS = f"{CONFIGURATOR}.finalize_with_max_running_requests"


def compute_cell_size(original, configurator, kvc, num_layers: int) -> int:
    """AROUND DefaultPoolConfigurator._compute_cell_size(self, kvc, num_layers)."""
    if not validation.scheduler_enabled(kvc.server_args):
        return original(configurator, kvc, num_layers)
    validation.check_model_runtime(kvc)
    from oscar_sglang.sizing import compute_cell_size as oscar_cell_size

    return oscar_cell_size(original, configurator, kvc, num_layers)


def finalize_max_running_requests(original, configurator, config):
    """AROUND DefaultPoolConfigurator.finalize_with_max_running_requests(self, config):
    cap running requests to the BF16 window rows (set up by the cell-size hook)."""
    from oscar_sglang.sizing import finalize_with_max_running_requests, sizing_of

    if sizing_of(configurator) is None:
        return original(configurator, config)
    return finalize_with_max_running_requests(original, configurator, config)


PATCHES = (
    Patch(COMPUTE_CELL_SIZE, HookType.AROUND, compute_cell_size, ("self", "kvc", "num_layers"),
          "SGLang would size the pool in BF16 bytes per token"),
    Patch(FINALIZE_MAX_RUNNING_REQUESTS, HookType.AROUND, finalize_max_running_requests, ("self", "config"),
          "more requests could run than the BF16 window rows hold"),
)
