"""Rotations for the served model: load (or data-free ones when asked for), validate against the
model, slice to this tensor-parallel rank's KV heads."""

import functools
import logging
import os
from dataclasses import replace

from oscar_sglang.config import DATA_FREE_ROTATIONS, OscarConfig
from oscar_sglang.kernels.rotation_file import RotationSet, data_free_rotations, load_rotations
from oscar_sglang.validation import missing_rotations

logger = logging.getLogger(__name__)


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """KV heads [start, end) held by `tp_rank`, following SGLang's split: contiguous shares
    when total >= tp_size, otherwise each rank holds one head replicated over
    tp_size / total ranks."""
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise ValueError(f"{total_kv_heads} KV heads cannot be split over tp_size={tp_size}")
        share = total_kv_heads // tp_size
        return tp_rank * share, (tp_rank + 1) * share
    head = tp_rank * total_kv_heads // tp_size
    return head, head + 1


def rotations_for_model(path: str | None, num_layers: int, num_kv_heads: int, head_dim: int,
                        model_name: str) -> RotationSet:
    """The validated RotationSet for a model with these dimensions (all KV heads): `path` is a
    rotation file or DATA_FREE_ROTATIONS; None is refused. Its `served_key_bits` says which key
    width it serves."""
    if path is None:
        raise missing_rotations(model_name)
    if path == DATA_FREE_ROTATIONS:
        logger.warning(
            "OSCAR: --oscar-rotations %s; using data-free Hadamard rotations, whose quality is "
            "lower than calibrated ones and can be unusable on some models (run `oscar-sglang "
            "calibrate`)", DATA_FREE_ROTATIONS)
        return data_free_rotations(num_layers, num_kv_heads, head_dim, model_name)
    rotations = load_rotations(path)
    rotations.check_matches(num_layers, num_kv_heads, head_dim, model=model_name or "the served model")
    return rotations


def served_config(config: OscarConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                  model_name: str) -> tuple[OscarConfig, RotationSet]:
    """`config` with its key width resolved (RotationSet.served_key_bits: the one asked for, or
    the file's) and the validated rotations for all KV heads. The scheduler asks twice (cell
    size, then the pool): the file is read once per process while it stays unchanged on disk.
    Callers must not modify the returned RotationSet."""
    path = config.rotations
    stamp = None
    if path not in (None, DATA_FREE_ROTATIONS) and os.path.exists(path):
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
    return _served_config(config, num_layers, num_kv_heads, head_dim, model_name, stamp)


@functools.lru_cache(maxsize=4)
def _served_config(config, num_layers, num_kv_heads, head_dim, model_name, stamp):
    rotations = rotations_for_model(config.rotations, num_layers, num_kv_heads, head_dim, model_name)
    return replace(config, key_bits=rotations.served_key_bits(config.key_bits)), rotations
