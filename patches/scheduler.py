"""Hook on sglang.srt.managers.scheduler.Scheduler: deterministic inference aligns OSCAR's
prefill chunks as it does the triton backend's."""

from sglang.srt.plugins.hook_registry import HookType

from oscar_sglang import validation

from .patch import Patch

DETERMINISTIC_CONFIG = "sglang.srt.managers.scheduler.Scheduler.init_deterministic_inference_config"
TRITON_ALIGN_ENV = "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE"  # SGLang's, with its default
TRITON_ALIGN_DEFAULT = 4096


def init_deterministic_inference_config(original, scheduler):
    """AROUND Scheduler.init_deterministic_inference_config(self). Under
    --enable-deterministic-inference SGLang cuts prefill chunks at fixed multiples only for its
    flashinfer and triton backends. OSCAR's extend reads a chunk's prefix from INT2, so where
    a chunk ends must not depend on the batch either: OSCAR aligns like triton."""
    original(scheduler)
    args = scheduler.server_args
    if args.enable_deterministic_inference and validation.scheduler_enabled(args):
        from sglang.srt.utils.common import get_int_env_var

        scheduler.truncation_align_size = get_int_env_var(TRITON_ALIGN_ENV, TRITON_ALIGN_DEFAULT)


PATCHES = (
    Patch(DETERMINISTIC_CONFIG, HookType.AROUND, init_deterministic_inference_config, ("self",),
          "a deterministic request's prefill chunks, and so its output, would depend on its batch"),
)
