"""Hooks on sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator, for the same reason
as allocator_token's: in SGLang 0.5.17 _release_page_ids is where pages go back to the free list
(free, free_segment and free_group_end all end there), and clear() frees every page."""

from sglang.srt.plugins.hook_registry import HookType

from .allocator_token import allocator_clear, oscar_pool
from .patch import Patch

ALLOCATOR = "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator"
PAGED_RELEASE = f"{ALLOCATOR}._release_page_ids"
PAGED_CLEAR = f"{ALLOCATOR}.clear"


def paged_allocator_release_page_ids(original, allocator, *page_ids):
    """AROUND PagedTokenToKVPoolAllocator._release_page_ids(self, *page_ids): whole pages go
    back to the free list, so every slot of them releases its sink row."""
    result = original(allocator, *page_ids)
    pool = oscar_pool(allocator)
    if pool is not None:
        import torch

        for pages in page_ids:
            if pages.numel():
                offsets = torch.arange(allocator.page_size, device=pages.device)
                pool.sinks.release((pages.to(torch.int64)[:, None] * allocator.page_size
                                        + offsets).flatten())
    return result


PATCHES = (
    Patch(PAGED_RELEASE, HookType.AROUND, paged_allocator_release_page_ids, ("self", "page_ids"),
          "freed pages would keep their slots' sink-pool rows"),
    Patch(PAGED_CLEAR, HookType.AROUND, allocator_clear, ("self",),
          "a flushed cache would keep its sink-pool rows"),
)
