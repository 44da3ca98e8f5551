"""Registrations in sglang.srt.layers.attention.attention_registry and sglang.srt.server_args'
backend choice lists: the "oscar" attention backend (oscar_sglang.backend), also among the
deterministic ones. These are SGLang's registries, not hooks, so they have no Patch entries."""

from oscar_sglang import validation


def register() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import (
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
        add_deterministic_attention_backend_choices,
    )

    add_attention_backend_choices([validation.BACKEND])
    if validation.BACKEND not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        add_deterministic_attention_backend_choices([validation.BACKEND])
    register_attention_backend(validation.BACKEND)(create_backend)


def create_backend(runner):
    """Factory of the "oscar" attention backend, in a scheduler; SGLang allocates the KV pool
    before it."""
    from oscar_sglang.patches import check_applied

    if not validation.scheduler_enabled(runner.server_args):  # e.g. only as a draft backend
        raise RuntimeError("the 'oscar' attention backend needs the OSCAR KV cache: pass "
                           "--kv-quant oscar (or attention_backend='oscar')")
    check_applied()
    from oscar_sglang.backend import OscarAttnBackend
    from oscar_sglang.pool import OscarTokenToKVPool

    if not isinstance(runner.token_to_kv_pool, OscarTokenToKVPool):
        raise RuntimeError(
            f"the oscar attention backend found a {type(runner.token_to_kv_pool).__name__}, not "
            "an OscarTokenToKVPool: the pool hooks did not run for this model; serve it "
            "without --kv-quant oscar")
    return OscarAttnBackend(runner)
