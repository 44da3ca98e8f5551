"""Every change oscar-sglang makes to stock SGLang 0.5.17, as HookRegistry hooks (no diffs to
site-packages): one module per SGLang module touched, each Patch naming the symbol it wraps and
why, plus the attention-backend registration. tests/test_patches.py checks every target against
the installed SGLang, so an upgrade that moves or reshapes one fails at test time."""

from sglang.srt.plugins.hook_registry import HookRegistry

from . import (
    allocator_paged,
    allocator_token,
    attention_registry,
    kv_cache_configurator,
    pool_configurator,
    scheduler,
    server_args,
)

PATCHES = (*server_args.PATCHES, *pool_configurator.PATCHES, *kv_cache_configurator.PATCHES,
           *allocator_token.PATCHES, *allocator_paged.PATCHES, *scheduler.PATCHES)
# Without these an OSCAR server would size or build SGLang's BF16 pool, or leak sink-pool rows
# (and hand a reused slot a stale exact sink): it refuses to start instead.
REQUIRED = (*pool_configurator.PATCHES, *kv_cache_configurator.PATCHES, *allocator_token.PATCHES,
            *allocator_paged.PATCHES)


def register() -> None:
    """Install every patch (the server-argument ones first: if a later step raises, the refusals
    still apply) and the attention backend."""
    for patch in PATCHES:
        HookRegistry.register(patch.target, patch.hook, patch.kind)
    attention_registry.register()


def check_applied() -> None:
    """RuntimeError unless SGLang applied every REQUIRED patch and registered the backend
    (SGLang logs and swallows hooks that fail to apply)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from oscar_sglang import validation

    missing = [p.target for p in REQUIRED if p.target not in HookRegistry._patched]
    if validation.BACKEND not in ATTENTION_BACKENDS:
        missing.append(f"attention backend {validation.BACKEND!r}")
    if missing:
        raise RuntimeError(
            f"oscar-sglang could not hook {', '.join(missing)} into this SGLang (see the "
            "'Failed to apply hooks' / 'Failed to execute general plugin' log above), so "
            "--kv-quant oscar cannot work; install the sglang version oscar-sglang pins")
