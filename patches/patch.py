"""One hook into SGLang: what it wraps, how, and which of the target's parameters it relies on."""

from collections.abc import Callable
from dataclasses import dataclass

from sglang.srt.plugins.hook_registry import HookType


@dataclass(frozen=True)
class Patch:
    """`hook` registered on `target` ("module.Class.method" in SGLang) as a `kind` hook.
    `parameters`: the target's parameter names, as the hook calls or receives them in the pinned
    SGLang (tests/test_patches.py checks them); `why`: what would go wrong without it."""

    target: str
    kind: HookType
    hook: Callable
    parameters: tuple[str, ...]
    why: str
