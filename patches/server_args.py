"""Hooks on sglang.srt.server_args.ServerArgs: the OSCAR flags and the startup checks.

ServerArgs keeps only its own dataclass fields, so the flags are exported as SGLANG_OSCAR_*
environment variables (oscar_sglang.config), which the spawned scheduler processes inherit.
"""

import argparse
import os

from sglang.srt.plugins.hook_registry import HookType

from oscar_sglang import validation
from oscar_sglang.config import ALL_SETTINGS, DATA_FREE_ROTATIONS, DEFAULT_WINDOW_FRACTION, KV_QUANT_CHOICES, Setting
from oscar_sglang.kernels.format import (
    DEFAULT_KEY_BITS,
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    SUPPORTED_GROUP_SIZES,
    SUPPORTED_KEY_BITS,
)

from .patch import Patch

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
ADD_CLI_ARGS = f"{SERVER_ARGS}.add_cli_args"
POST_INIT = f"{SERVER_ARGS}.__post_init__"

FLAG_HELP = {
    "kv_quant": ("'oscar': store K/V as rotated low-bit codes (OSCAR-2, oscar-sglang: 2-bit "
                 "values, 4-, 3- or 2-bit keys) with BF16 sink/recent windows; 'none' (default): "
                 "SGLang's own KV cache"),
    "rotations": ("rotation file written by `oscar-sglang calibrate --out "
                  "NAME.oscar.safetensors`, checked against the model at startup, or "
                  f"'{DATA_FREE_ROTATIONS}': data-free Hadamard rotations (lower quality, "
                  "unusable on some models); required with --kv-quant oscar"),
    "key_bits": ("bits per key code: 4 (3.25-3.5 bits per element with the 2-bit values; keeps "
                 "what long prompts hide), 3 (2.75-3.0, 1.18x the tokens of 4; on SmolLM2 keeps "
                 "facts up to about 2K tokens back) or 2 (2.25-2.5, 1.44x the tokens of 4, loses "
                 "facts hidden in long prompts); default: the width the rotation file was "
                 "calibrated for "
                 f"(`oscar-sglang calibrate --key-bits`), {DEFAULT_KEY_BITS} for {DATA_FREE_ROTATIONS} "
                 "rotations; a file calibrated for another width is refused"),
    "group_size": "quantization group size along head_dim; default: head_dim",
    "sink_tokens": f"first tokens of every sequence kept in BF16 (default {DEFAULT_SINK_TOKENS})",
    "recent_tokens": (f"most recent tokens of every sequence kept in BF16 "
                      f"(default {DEFAULT_RECENT_TOKENS})"),
    "window_memory_fraction": (f"share of the KV-cache memory for the per-request BF16 window "
                               f"rows; running requests are capped to what it holds "
                               f"(default {DEFAULT_WINDOW_FRACTION})"),
}
FLAG_CHOICES = {"kv_quant": KV_QUANT_CHOICES, "group_size": SUPPORTED_GROUP_SIZES,
                "key_bits": SUPPORTED_KEY_BITS}
FLAG_METAVARS = {"rotations": "PATH", "sink_tokens": "N", "recent_tokens": "N",
                 "window_memory_fraction": "F"}


class _ExportAction(argparse._StoreAction):
    """Store the value and export it as the setting's environment variable. Subclasses
    _StoreAction because SGLang's --config YAML merger accepts only store actions."""

    def __init__(self, *args, setting: Setting, **kwargs):
        super().__init__(*args, **kwargs)
        self.setting = setting

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        os.environ[self.setting.env] = str(values)


def _argtype(setting: Setting):
    def parse(raw: str):
        try:
            return setting.parse(raw)
        except ValueError as e:  # argparse would replace the message with a generic one
            raise argparse.ArgumentTypeError(str(e)) from e
    return parse


def add_cli_args(_result, parser: argparse.ArgumentParser) -> None:
    """AFTER ServerArgs.add_cli_args(parser) (a staticmethod)."""
    group = parser.add_argument_group("OSCAR 2-bit KV cache (oscar-sglang)")
    for setting in ALL_SETTINGS:
        group.add_argument(
            setting.flag, action=_ExportAction, setting=setting, type=_argtype(setting),
            choices=FLAG_CHOICES.get(setting.field), metavar=FLAG_METAVARS.get(setting.field),
            help=f"{FLAG_HELP[setting.field]}. Environment: {setting.env}.")


def validate_before_post_init(server_args) -> None:
    """BEFORE ServerArgs.__post_init__(self): refusals come before SGLang resolves anything."""
    from oscar_sglang.patches import check_applied

    settings = validation.validate_server_args(server_args)
    if settings is not None:
        check_applied()
    # A private attribute: ServerArgs refuses public writes once resolved, and this one only
    # tells the AFTER hook whether this instance was validated.
    server_args._oscar_settings = settings


def check_after_post_init(_result, server_args) -> None:
    """AFTER ServerArgs.__post_init__(self)."""
    if getattr(server_args, "_oscar_settings", None) is not None:
        validation.check_resolved(server_args)


# The hooks that refuse come first: if a later registration raises, they still apply and refuse.
PATCHES = (
    Patch(ADD_CLI_ARGS, HookType.AFTER, add_cli_args, ("parser",),
          "--kv-quant and --oscar-* would be unknown flags"),
    Patch(POST_INIT, HookType.BEFORE, validate_before_post_init, ("self",),
          "unsupported settings, models and rotation files would be found only after the weights load"),
    Patch(POST_INIT, HookType.AFTER, check_after_post_init, ("self",),
          "SGLang's own resolution could switch the attention backend away from oscar"),
)
