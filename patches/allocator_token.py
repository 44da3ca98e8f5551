"""Hooks on sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator: slots going back to the
free list release their sink-pool rows (SinkStore.release / OscarTokenToKVPool.clear_slots),
so a reused slot never inherits another sequence's exact sink.

In SGLang 0.5.17 free() is where this allocator puts slots back (free_segment(s) and
free_group_end call it; inside a free group it only queues them), and clear() frees every slot
(also run by __init__ and resize)."""

import sys

from sglang.srt.plugins.hook_registry import HookType

from .patch import Patch

ALLOCATOR = "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator"
TOKEN_FREE = f"{ALLOCATOR}.free"
TOKEN_CLEAR = f"{ALLOCATOR}.clear"


def oscar_pool(allocator):
    """The allocator's KV pool if it is an OscarTokenToKVPool, else None. The pool module is
    only looked up, never imported: an OSCAR pool exists only once it was imported."""
    pool_module = sys.modules.get("oscar_sglang.pool")
    kvcache = getattr(allocator, "_kvcache", None)
    if pool_module is not None and isinstance(kvcache, pool_module.OscarTokenToKVPool):
        return kvcache
    return None


def token_allocator_free(original, allocator, free_index):
    """AROUND TokenToKVPoolAllocator.free(self, free_index): slots reach the free list only
    outside a free group (inside one they are queued, and free_group_end frees them here)."""
    releasing = allocator.is_not_in_free_group
    result = original(allocator, free_index)
    pool = oscar_pool(allocator)
    if releasing and pool is not None:
        pool.sinks.release(free_index)
    return result


def allocator_clear(original, allocator):
    """AROUND {Token,Paged}TokenToKVPoolAllocator.clear(self): every slot is free again."""
    result = original(allocator)
    pool = oscar_pool(allocator)
    if pool is not None:
        pool.clear_slots()
    return result


PATCHES = (
    Patch(TOKEN_FREE, HookType.AROUND, token_allocator_free, ("self", "free_index"),
          "freed slots would keep their sink-pool rows (a leak, and a stale sink for the next owner)"),
    Patch(TOKEN_CLEAR, HookType.AROUND, allocator_clear, ("self",),
          "a flushed cache would keep its sink-pool rows"),
)
