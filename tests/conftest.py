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

    from oscar_sglang.patches import allocator_paged, allocator_token

    load_plugins()
    missing = [p.target for p in (*allocator_token.PATCHES, *allocator_paged.PATCHES)
               if p.target not in HookRegistry._patched]
    assert not missing, f"allocator hooks not applied: {missing}"


@pytest.fixture
def nan_scratch(monkeypatch):
    """torch.empty returns NaN-filled float tensors while the test runs, so a kernel that reads
    scratch it never wrote (partials, dequantized prefixes) produces NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def oscar_env(monkeypatch):
    """No SGLANG_OSCAR_* variable set during the test, and none left behind by it."""
    from oscar_sglang.config import ALL_SETTINGS

    for setting in ALL_SETTINGS:
        monkeypatch.setenv(setting.env, "")  # records "unset" so that undo removes it again
        monkeypatch.delenv(setting.env)


@pytest.fixture(scope="module")
def sglang():
    """SGLang's server_args module after its own plugin loading, as launch_server / Engine /
    the schedulers do it."""
    from sglang.srt import server_args
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return server_args


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
