"""Test configuration: Triton kernels run under the interpreter wherever CUDA is absent, and
tests marked `gpu` are skipped there."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def oscar_allocator_hooks():
    """The plugin loaded as SGLang loads it (entry point -> load_plugins()), so the allocator
    hooks that release sink-pool rows wrap SGLang's real allocators."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from oscar_sglang import plugin

    load_plugins()
    missing = [t for t in plugin.ALLOCATOR_TARGETS if t not in HookRegistry._patched]
    assert not missing, f"allocator hooks not applied: {missing}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
