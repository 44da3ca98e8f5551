"""Every hook of oscar_sglang.patches against the installed SGLang: its target exists with the
parameters the hook relies on, so an SGLang upgrade that moves or reshapes one fails here."""

import importlib
import inspect

import pytest

from oscar_sglang import patches


def resolve(target: str):
    """"module.Class.method" -> the method as the class holds it."""
    module, cls, name = target.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), cls), name)


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: f"{p.kind.value}:{p.target.rsplit('.', 2)[-2]}."
                         f"{p.target.rsplit('.', 1)[-1]}")
def test_target_exists_with_the_expected_parameters(patch):
    target = inspect.unwrap(resolve(patch.target))  # other plugins' hooks may wrap it too
    assert tuple(inspect.signature(target).parameters) == patch.parameters
    assert patch.why and patch.hook.__doc__, "every patch says why and documents its hook"


def test_one_module_per_sglang_module():
    """patches/NAME.py holds the hooks on SGLang module ...NAME (allocator_token: allocator.token)."""
    modules = (patches.server_args, patches.pool_configurator, patches.kv_cache_configurator,
               patches.allocator_token, patches.allocator_paged, patches.scheduler)
    assert sum(len(m.PATCHES) for m in modules) == len(patches.PATCHES)
    for module in modules:
        name = module.__name__.rsplit(".", 1)[1]
        for patch in module.PATCHES:
            sglang_module = patch.target.rsplit(".", 2)[0]
            assert sglang_module.endswith("." + name.replace("_", ".")) or sglang_module.endswith("." + name)
    assert set(patches.REQUIRED) <= set(patches.PATCHES)
