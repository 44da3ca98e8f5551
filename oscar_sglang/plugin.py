"""SGLang plugin entry point (`sglang.srt.plugins` → `oscar = oscar_sglang.plugin:register`).

SGLang calls `register()` in the launcher before it parses the command line and first thing in
every scheduler process. It adds:

- flags `--kv-quant {none,oscar}` and `--oscar-*` (an AFTER hook on ServerArgs.add_cli_args).
  ServerArgs drops fields it does not know, so the flags are exported as SGLANG_OSCAR_*
  environment variables (see oscar_sglang.config), which the spawned schedulers inherit;
- the startup checks (oscar_sglang.validation) around ServerArgs.__post_init__;
- the "oscar" attention backend and two AROUND hooks that size and build the OSCAR KV pool.

Command line:

    python -m sglang.launch_server --model-path M --kv-quant oscar --oscar-rotations R

Engine API (settings are the environment variables; attention_backend="oscar" turns it on):

    os.environ["SGLANG_OSCAR_ROTATIONS"] = "R"
    sglang.Engine(model_path="M", attention_backend="oscar")

A hook that fails to apply (SGLang logs and swallows such failures) makes an OSCAR server refuse
to start instead of serving a BF16 cache. Kernels, pool and backend are imported only when used.
"""

import argparse
import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from oscar_sglang import validation
from oscar_sglang.config import (
    ALL_SETTINGS,
    DEFAULT_WINDOW_FRACTION,
    KV_QUANT_CHOICES,
    Setting,
)
from oscar_sglang.kernels.format import (
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    SUPPORTED_GROUP_SIZES,
)

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
ADD_CLI_ARGS = f"{SERVER_ARGS}.add_cli_args"
POST_INIT = f"{SERVER_ARGS}.__post_init__"
COMPUTE_CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size")
FINALIZE_MAX_RUNNING_REQUESTS = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator."
    "finalize_with_max_running_requests")
BUILD_MHA_KV_POOL = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool")
# Without these an OSCAR server would size or build SGLang's BF16 pool.
POOL_TARGETS = (COMPUTE_CELL_SIZE, FINALIZE_MAX_RUNNING_REQUESTS, BUILD_MHA_KV_POOL)

FLAG_HELP = {
    "kv_quant": ("'oscar': store K/V as 2-bit rotated codes (OSCAR-2, oscar-sglang) with BF16 "
                 "sink/recent windows; 'none' (default): SGLang's own KV cache"),
    "rotations": ("rotation file written by `oscar-sglang calibrate --out "
                  "NAME.oscar.safetensors`, checked against the model at startup; default: "
                  "data-free Hadamard rotations (lower quality)"),
    "group_size": "quantization group size along head_dim; default: head_dim",
    "sink_tokens": f"first tokens of every sequence kept in BF16 (default {DEFAULT_SINK_TOKENS})",
    "recent_tokens": (f"most recent tokens of every sequence kept in BF16 "
                      f"(default {DEFAULT_RECENT_TOKENS})"),
    "window_memory_fraction": (f"share of the KV-cache memory for the per-request BF16 window "
                               f"rows; running requests are capped to what it holds "
                               f"(default {DEFAULT_WINDOW_FRACTION})"),
}
FLAG_CHOICES = {"kv_quant": KV_QUANT_CHOICES, "group_size": SUPPORTED_GROUP_SIZES}
FLAG_METAVARS = {"rotations": "PATH", "sink_tokens": "N", "recent_tokens": "N",
                 "window_memory_fraction": "F"}


def register() -> None:
    # The hooks that refuse come first: if a later step raises, they still apply and refuse.
    HookRegistry.register(ADD_CLI_ARGS, _add_cli_args, HookType.AFTER)
    HookRegistry.register(POST_INIT, _validate_before_post_init, HookType.BEFORE)
    HookRegistry.register(POST_INIT, _check_after_post_init, HookType.AFTER)
    HookRegistry.register(COMPUTE_CELL_SIZE, _compute_cell_size, HookType.AROUND)
    HookRegistry.register(FINALIZE_MAX_RUNNING_REQUESTS, _finalize_max_running_requests, HookType.AROUND)
    HookRegistry.register(BUILD_MHA_KV_POOL, _build_mha_kv_pool, HookType.AROUND)

    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    add_attention_backend_choices([validation.BACKEND])
    register_attention_backend(validation.BACKEND)(_create_backend)


class _ExportAction(argparse._StoreAction):
    """Store the value and export it as the setting's environment variable. Subclasses
    _StoreAction because SGLang's --config YAML merger accepts only store actions."""

    def __init__(self, *args, setting: Setting, **kwargs):
        super().__init__(*args, **kwargs)
        self.setting = setting

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        os.environ[self.setting.env] = str(values)


def _argtype(setting: Setting):
    def parse(raw: str):
        try:
            return setting.parse(raw)
        except ValueError as e:  # argparse would replace the message with a generic one
            raise argparse.ArgumentTypeError(str(e)) from e
    return parse


def _add_cli_args(_result, parser: argparse.ArgumentParser) -> None:
    """AFTER ServerArgs.add_cli_args(parser) (a staticmethod)."""
    group = parser.add_argument_group("OSCAR 2-bit KV cache (oscar-sglang)")
    for setting in ALL_SETTINGS:
        group.add_argument(
            setting.flag, action=_ExportAction, setting=setting, type=_argtype(setting),
            choices=FLAG_CHOICES.get(setting.field), metavar=FLAG_METAVARS.get(setting.field),
            help=f"{FLAG_HELP[setting.field]}. Environment: {setting.env}.")


def _validate_before_post_init(server_args) -> None:
    """BEFORE ServerArgs.__post_init__(self): refusals come before SGLang resolves anything."""
    settings = validation.validate_server_args(server_args)
    if settings is not None:
        _check_hooks_applied()
    # A private attribute: ServerArgs refuses public writes once resolved, and this one only
    # tells the AFTER hook whether this instance was validated.
    server_args._oscar_settings = settings


def _check_after_post_init(_result, server_args) -> None:
    """AFTER ServerArgs.__post_init__(self)."""
    if getattr(server_args, "_oscar_settings", None) is not None:
        validation.check_resolved(server_args)


def _check_hooks_applied() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    missing = [t for t in POOL_TARGETS if t not in HookRegistry._patched]
    if validation.BACKEND not in ATTENTION_BACKENDS:
        missing.append(f"attention backend {validation.BACKEND!r}")
    if missing:
        raise RuntimeError(
            f"oscar-sglang could not hook {', '.join(missing)} into this SGLang (see the "
            "'Failed to apply hooks' / 'Failed to execute general plugin' log above), so "
            "--kv-quant oscar cannot work; install the sglang version oscar-sglang pins")


def _compute_cell_size(original, configurator, kvc, num_layers: int) -> int:
    """AROUND DefaultPoolConfigurator._compute_cell_size(self, kvc, num_layers)."""
    if not validation.scheduler_enabled(kvc.server_args):
        return original(configurator, kvc, num_layers)
    validation.check_model_runtime(kvc)
    from oscar_sglang.sizing import compute_cell_size

    return compute_cell_size(original, configurator, kvc, num_layers)


def _finalize_max_running_requests(original, configurator, config):
    """AROUND DefaultPoolConfigurator.finalize_with_max_running_requests(self, config):
    cap running requests to the BF16 window rows (set up by the cell-size hook)."""
    if not hasattr(configurator, "_oscar"):
        return original(configurator, config)
    from oscar_sglang.sizing import finalize_with_max_running_requests

    return finalize_with_max_running_requests(original, configurator, config)


def _build_mha_kv_pool(original, configurator, **kwargs):
    """AROUND KVCacheConfigurator._build_mha_kv_pool(self, *, max_total_num_tokens,
    mha_pool_class, quant_method=None)."""
    if not validation.scheduler_enabled(configurator.server_args):
        return original(configurator, **kwargs)
    from oscar_sglang.sizing import build_mha_kv_pool

    return build_mha_kv_pool(original, configurator, **kwargs)


def _create_backend(runner):
    """Factory of the "oscar" attention backend, in a scheduler; SGLang allocates the KV pool
    before it."""
    if not validation.scheduler_enabled(runner.server_args):  # e.g. only as a draft backend
        raise RuntimeError("the 'oscar' attention backend needs the OSCAR KV cache: pass "
                           "--kv-quant oscar (or attention_backend='oscar')")
    _check_hooks_applied()
    from oscar_sglang.backend import OscarAttnBackend
    from oscar_sglang.pool import OscarTokenToKVPool

    if not isinstance(runner.token_to_kv_pool, OscarTokenToKVPool):
        raise RuntimeError(
            f"the oscar attention backend found a {type(runner.token_to_kv_pool).__name__}, not "
            "an OscarTokenToKVPool: the pool hooks did not run for this model; serve it "
            "without --kv-quant oscar")
    return OscarAttnBackend(runner)
