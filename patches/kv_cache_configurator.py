"""Hook on sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator: build the OSCAR
pool instead of SGLang's MHA pool."""

from sglang.srt.plugins.hook_registry import HookType

from oscar_sglang import validation

from .patch import Patch

BUILD_MHA_KV_POOL = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool"


def build_mha_kv_pool(original, configurator, **kwargs):
    """AROUND KVCacheConfigurator._build_mha_kv_pool(self, *, max_total_num_tokens,
    mha_pool_class, quant_method=None)."""
    if not validation.scheduler_enabled(configurator.server_args):
        return original(configurator, **kwargs)
    from oscar_sglang.sizing import build_mha_kv_pool as build_oscar_pool

    return build_oscar_pool(original, configurator, **kwargs)


PATCHES = (
    Patch(BUILD_MHA_KV_POOL, HookType.AROUND, build_mha_kv_pool,
          ("self", "max_total_num_tokens", "mha_pool_class", "quant_method"),
          "SGLang would build its BF16 pool"),
)
