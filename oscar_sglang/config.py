"""OSCAR settings: command-line flags ↔ SGLANG_OSCAR_* environment variables → OscarConfig.

SGLang's ServerArgs keeps only its own dataclass fields, so the plugin's flags travel as
environment variables, which the spawned scheduler processes inherit:

    SGLANG_OSCAR_KV_QUANT        --kv-quant               oscar | none (default: none)
    SGLANG_OSCAR_ROTATIONS       --oscar-rotations        rotation file (.oscar.safetensors), or
                                                          data-free (Hadamard rotations, lower
                                                          quality); required with oscar
    SGLANG_OSCAR_KEY_BITS        --oscar-key-bits         2 | 3 | 4 bits per key code (default:
                                                          the width the rotation file was
                                                          calibrated for, 4 for data-free
                                                          rotations; values are always 2); must
                                                          match the file
    SGLANG_OSCAR_GROUP_SIZE      --oscar-group-size       32 | 64 | 128 (default: head_dim)
    SGLANG_OSCAR_SINK_TOKENS     --oscar-sink-tokens      BF16 sink tokens per sequence, >= 0
    SGLANG_OSCAR_RECENT_TOKENS   --oscar-recent-tokens    BF16 recent tokens per sequence, >= 1
    SGLANG_OSCAR_WINDOW_FRACTION --oscar-window-fraction  share of the KV budget for the
                                                          per-request BF16 window rows, in (0, 1)

Defaults of the format settings come from oscar_sglang.kernels.format. This module imports
neither torch nor SGLang, so the plugin can read it at registration time.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from oscar_sglang.kernels.format import (
    DATA_FREE_ROTATIONS,
    DEFAULT_RECENT_TOKENS,
    DEFAULT_SINK_TOKENS,
    SUPPORTED_GROUP_SIZES,
    SUPPORTED_KEY_BITS,
    OscarFormat,
)

KV_QUANT_CHOICES = ("none", "oscar")
# Serving policy, not part of the format: Qwen3-8B's window rows and sink-pool share take 37.7 MB
# per request, so a 60 GB budget holds ~160 running requests and keeps 54 GB for INT2 slots.
DEFAULT_WINDOW_FRACTION = 0.10


@dataclass(frozen=True)
class Setting:
    """One OSCAR setting: its OscarConfig field, environment variable, flag and parser."""

    field: str
    env: str
    flag: str
    allowed: str
    convert: Callable[[str], Any]
    accept: Callable[[Any], bool]

    def parse(self, raw: str) -> Any:
        """The value of `raw`, or ValueError naming the variable, the flag and what is allowed."""
        try:
            value = self.convert(raw)
        except ValueError:
            value = None
        if value is None or not self.accept(value):
            raise ValueError(f"{self.env} ({self.flag}) = {raw!r} is invalid: "
                             f"expected {self.allowed}")
        return value


KV_QUANT = Setting("kv_quant", "SGLANG_OSCAR_KV_QUANT", "--kv-quant",
                   " or ".join(KV_QUANT_CHOICES), str.strip, lambda v: v in KV_QUANT_CHOICES)
ROTATIONS = Setting("rotations", "SGLANG_OSCAR_ROTATIONS", "--oscar-rotations",
                    f"the path of a rotation file or {DATA_FREE_ROTATIONS!r}", str, bool)
SETTINGS = (
    ROTATIONS,
    Setting("key_bits", "SGLANG_OSCAR_KEY_BITS", "--oscar-key-bits",
            f"one of {list(SUPPORTED_KEY_BITS)}", int, lambda v: v in SUPPORTED_KEY_BITS),
    Setting("group_size", "SGLANG_OSCAR_GROUP_SIZE", "--oscar-group-size",
            f"one of {list(SUPPORTED_GROUP_SIZES)}", int, lambda v: v in SUPPORTED_GROUP_SIZES),
    Setting("sink_tokens", "SGLANG_OSCAR_SINK_TOKENS", "--oscar-sink-tokens",
            "an integer >= 0", int, lambda v: v >= 0),
    Setting("recent_tokens", "SGLANG_OSCAR_RECENT_TOKENS", "--oscar-recent-tokens",
            "an integer >= 1", int, lambda v: v >= 1),
    Setting("window_memory_fraction", "SGLANG_OSCAR_WINDOW_FRACTION", "--oscar-window-fraction",
            "a number strictly between 0 and 1", float, lambda v: 0.0 < v < 1.0),
)
ALL_SETTINGS = (KV_QUANT, *SETTINGS)


def _raw(setting: Setting, environ: Mapping[str, str]) -> str | None:
    """The variable's text, None when unset or empty (an empty export means "not given")."""
    return environ.get(setting.env) or None


def enabled(environ: Mapping[str, str] = os.environ) -> bool | None:
    """True for SGLANG_OSCAR_KV_QUANT=oscar, False for none, None when unset."""
    raw = _raw(KV_QUANT, environ)
    return None if raw is None else KV_QUANT.parse(raw) == "oscar"


def given_settings(environ: Mapping[str, str] = os.environ) -> list[Setting]:
    """The OSCAR-only settings (not --kv-quant) present in `environ`."""
    return [s for s in SETTINGS if _raw(s, environ) is not None]


@dataclass(frozen=True)
class OscarConfig:
    """What the OSCAR KV cache is asked to do; `group_size` None means one group per head,
    `rotations` None that none was given (refused at startup; DATA_FREE_ROTATIONS opts in to
    the data-free ones), `key_bits` None that the rotation file decides (served_rotations.
    served_config resolves it wherever the file is read)."""

    rotations: str | None = None
    key_bits: int | None = None
    group_size: int | None = None
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    window_memory_fraction: float = DEFAULT_WINDOW_FRACTION

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "OscarConfig":
        """Read the SGLANG_OSCAR_* variables; unset ones keep their defaults."""
        values = {s.field: s.parse(raw) for s in SETTINGS if (raw := _raw(s, environ)) is not None}
        return cls(**values)

    def format(self, head_dim: int) -> OscarFormat:
        """The format for a model with `head_dim`; ValueError when the model or group size is
        not supported, or the key width is not resolved yet."""
        if self.key_bits is None:
            raise ValueError("OSCAR: the key width is not resolved; resolve it with "
                             "served_rotations.served_config first")
        return OscarFormat(head_dim, self.group_size, self.sink_tokens, self.recent_tokens, self.key_bits)
