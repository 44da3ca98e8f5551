"""SGLang plugin entry point (`sglang.srt.plugins` → `oscar = oscar_sglang.plugin:register`).

SGLang calls `register()` in the launcher before it parses the command line and first thing in
every scheduler process. It adds:

- flags `--kv-quant {none,oscar}` and `--oscar-*` (an AFTER hook on ServerArgs.add_cli_args).
  ServerArgs drops fields it does not know, so the flags are exported as SGLANG_OSCAR_*
  environment variables (see oscar_sglang.config), which the spawned schedulers inherit;
- the startup checks (oscar_sglang.validation) around ServerArgs.__post_init__;
- the "oscar" attention backend and AROUND hooks that size and build the OSCAR KV pool;
- for --enable-deterministic-inference: "oscar" among SGLang's deterministic backends, and an
  AROUND hook on Scheduler.init_deterministic_inference_config that aligns prefill chunks;
- AROUND hooks on the token allocators' release points (TokenToKVPoolAllocator.free / .clear,
  PagedTokenToKVPoolAllocator._release_page_ids / .clear) that release the sink-pool rows of
  slots going back to the free list (OscarTokenToKVPool.release_sink_rows / reset_sink_rows).

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
import sys

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from oscar_sglang import validation
from oscar_sglang.config import (
    ALL_SETTINGS,
    DATA_FREE_ROTATIONS,
    DEFAULT_WINDOW_FRACTION,
    KV_QUANT_CHOICES,
    Setting,
)
from oscar_sglang.kernels.format import (
    DEFAULT_KEY_BITS,
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    SUPPORTED_GROUP_SIZES,
    SUPPORTED_KEY_BITS,
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
# The only places where SGLang 0.5.17's allocators put slots back on their free list:
# TokenToKVPoolAllocator.free (free_segment(s) and free_group_end call it; inside a free group it
# only queues) and PagedTokenToKVPoolAllocator._release_page_ids (free, free_segment and
# free_group_end all end there), plus clear() (every slot free; also run by __init__/resize).
TOKEN_ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"
PAGED_ALLOCATOR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
TOKEN_FREE = f"{TOKEN_ALLOCATOR}.free"
TOKEN_CLEAR = f"{TOKEN_ALLOCATOR}.clear"
PAGED_RELEASE = f"{PAGED_ALLOCATOR}._release_page_ids"
PAGED_CLEAR = f"{PAGED_ALLOCATOR}.clear"
ALLOCATOR_TARGETS = (TOKEN_FREE, TOKEN_CLEAR, PAGED_RELEASE, PAGED_CLEAR)
DETERMINISTIC_CONFIG = "sglang.srt.managers.scheduler.Scheduler.init_deterministic_inference_config"
TRITON_ALIGN_ENV = "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE"  # SGLang's, with its default
TRITON_ALIGN_DEFAULT = 4096
# Without these an OSCAR server would size or build SGLang's BF16 pool, or leak sink-pool rows
# (and hand a reused slot a stale exact sink).
POOL_TARGETS = (COMPUTE_CELL_SIZE, FINALIZE_MAX_RUNNING_REQUESTS, BUILD_MHA_KV_POOL,
                *ALLOCATOR_TARGETS)

FLAG_HELP = {
    "kv_quant": ("'oscar': store K/V as 2-bit rotated codes (OSCAR-2, oscar-sglang) with BF16 "
                 "sink/recent windows; 'none' (default): SGLang's own KV cache"),
    "rotations": ("rotation file written by `oscar-sglang calibrate --out "
                  "NAME.oscar.safetensors`, checked against the model at startup, or "
                  f"'{DATA_FREE_ROTATIONS}': data-free Hadamard rotations (lower quality, "
                  "unusable on some models); required with --kv-quant oscar"),
    "key_bits": (f"bits per key code: {DEFAULT_KEY_BITS} (default; 2.25-2.5 bits per element with "
                 "values) or 4 (3.25-3.5 bits per element, keeps what long prompts hide better); "
                 "the rotation file must be calibrated for it (`oscar-sglang calibrate --key-bits`)"),
    "group_size": "quantization group size along head_dim; default: head_dim",
    "sink_tokens": f"first tokens of every sequence kept in BF16 (default {DEFAULT_SINK_TOKENS})",
    "recent_tokens": (f"most recent tokens of every sequence kept in BF16 "
                      f"(default {DEFAULT_RECENT_TOKENS})"),
    "window_memory_fraction": (f"share of the KV-cache memory for the per-request BF16 window "
                               f"rows; running requests are capped to what it holds "
                               f"(default {DEFAULT_WINDOW_FRACTION})"),
}
FLAG_CHOICES = {"kv_quant": KV_QUANT_CHOICES, "group_size": SUPPORTED_GROUP_SIZES,
                "key_bits": SUPPORTED_KEY_BITS}
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
    HookRegistry.register(TOKEN_FREE, _token_allocator_free, HookType.AROUND)
    HookRegistry.register(PAGED_RELEASE, _paged_allocator_release_page_ids, HookType.AROUND)
    HookRegistry.register(TOKEN_CLEAR, _allocator_clear, HookType.AROUND)
    HookRegistry.register(PAGED_CLEAR, _allocator_clear, HookType.AROUND)

    HookRegistry.register(DETERMINISTIC_CONFIG, _init_deterministic_inference_config, HookType.AROUND)

    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import (
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
        add_deterministic_attention_backend_choices,
    )

    add_attention_backend_choices([validation.BACKEND])
    if validation.BACKEND not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        add_deterministic_attention_backend_choices([validation.BACKEND])
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


def _oscar_pool(allocator):
    """The allocator's KV pool if it is an OscarTokenToKVPool, else None. The pool module is
    only looked up, never imported: an OSCAR pool exists only once it was imported."""
    pool_module = sys.modules.get("oscar_sglang.pool")
    kvcache = getattr(allocator, "_kvcache", None)
    if pool_module is not None and isinstance(kvcache, pool_module.OscarTokenToKVPool):
        return kvcache
    return None


def _token_allocator_free(original, allocator, free_index):
    """AROUND TokenToKVPoolAllocator.free(self, free_index): slots reach the free list only
    outside a free group (inside one they are queued, and free_group_end frees them here)."""
    releasing = allocator.is_not_in_free_group
    result = original(allocator, free_index)
    pool = _oscar_pool(allocator)
    if releasing and pool is not None:
        pool.release_sink_rows(free_index)
    return result


def _paged_allocator_release_page_ids(original, allocator, *page_ids):
    """AROUND PagedTokenToKVPoolAllocator._release_page_ids(self, *page_ids): whole pages go
    back to the free list, so every slot of them releases its sink row."""
    result = original(allocator, *page_ids)
    pool = _oscar_pool(allocator)
    if pool is not None:
        import torch

        for pages in page_ids:
            if pages.numel():
                offsets = torch.arange(allocator.page_size, device=pages.device)
                pool.release_sink_rows((pages.to(torch.int64)[:, None] * allocator.page_size
                                        + offsets).flatten())
    return result


def _allocator_clear(original, allocator):
    """AROUND {Token,Paged}TokenToKVPoolAllocator.clear(self): every slot is free again."""
    result = original(allocator)
    pool = _oscar_pool(allocator)
    if pool is not None:
        pool.reset_sink_rows()
    return result


def _init_deterministic_inference_config(original, scheduler):
    """AROUND Scheduler.init_deterministic_inference_config(self). Under
    --enable-deterministic-inference SGLang cuts prefill chunks at fixed multiples only for its
    flashinfer and triton backends. OSCAR's extend reads a chunk's prefix from INT2, so where
    a chunk ends must not depend on the batch either: OSCAR aligns like triton."""
    original(scheduler)
    args = scheduler.server_args
    if args.enable_deterministic_inference and validation.scheduler_enabled(args):
        from sglang.srt.utils.common import get_int_env_var

        scheduler.truncation_align_size = get_int_env_var(TRITON_ALIGN_ENV, TRITON_ALIGN_DEFAULT)


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
