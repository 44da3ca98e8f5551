"""Command-line arguments of the benchmarks: argparse types, the flags the serving and latency
benchmarks share (configurations, model, output places, limits, --oscar-args, parallelism) and
the table of KV configurations they compare, with the SGLang flags that select each one (the
oscar configuration also gets its rotation file and the extra flags given with --oscar-args).
"""

import argparse
import shlex
from pathlib import Path

from benchmarks.budget import BUDGET_MARGIN_S, MIN_CONFIG_S
from benchmarks.paths import DEFAULT_RESULTS_DIR, DEFAULT_WORK_DIR
from oscar_sglang.config import DATA_FREE_ROTATIONS

# The only flags that differ between configurations; everything else is shared.
KV_CONFIGS = {
    "bf16-flashinfer": ["--attention-backend", "flashinfer"],
    "bf16-triton": ["--attention-backend", "triton"],
    "fp8-flashinfer": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "flashinfer"],
    "fp8-triton": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "triton"],
    "oscar": ["--kv-quant", "oscar"],
}
DEFAULT_CONFIGS = "bf16-flashinfer,fp8-flashinfer,fp8-triton,oscar"
OSCAR = "oscar"
BASELINE = "fp8-flashinfer"


def pairs_of(convert, accept, described: str):
    """argparse type: comma-separated AxB pairs, "3x2,3x1" -> [(3, 2), (3, 1)], each number read
    by `convert`; every pair must pass `accept`, else the error says the flag takes `described`."""
    def parse(text):
        try:
            pairs = [tuple(convert(x) for x in item.split("x")) for item in text.split(",") if item]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 or not accept(p) for p in pairs):
            raise argparse.ArgumentTypeError(f"takes {described}, got {text!r}")
        return pairs
    return parse


def parse_configs(text):
    """argparse type: comma-separated configuration names, validated, order kept."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KV_CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {unknown or text!r}; choose from {', '.join(KV_CONFIGS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"configuration listed twice in {text!r}")
    return names


def parse_int_list(text):
    """argparse type: comma-separated positive integers, returned sorted and unique."""
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def flag_list(text):
    """argparse type: extra command-line flags in one shell-quoted string."""
    try:
        flags = shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {exc}") from None
    if flags and not flags[0].startswith("-"):
        raise argparse.ArgumentTypeError(f"expected flags (starting with -), got {text!r}")
    return flags


def choice_list(choices, what: str):
    """argparse type: a comma list whose every item is one of `choices` ("unknown WHAT [...]")."""
    def parse(text):
        items = text.split(",")
        unknown = [i for i in items if i not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {','.join(choices)}")
        return items
    return parse


def int_at_least(minimum: int):
    """argparse type: an integer >= `minimum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)


def existing_file(text):
    """argparse type: a path that must name an existing file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def add_common_args(parser, mem_fraction_static, timeout):
    """Add the flags both benchmarks share (configurations, model, output places, limits)."""
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs(DEFAULT_CONFIGS),
        help=f"comma-separated, from {', '.join(KV_CONFIGS)} (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        help="model folder (default: a dummy-weight Qwen3-8B folder prepared in --work-dir)",
    )
    parser.add_argument(
        "--shared-models",
        type=Path,
        help="folder holding qwen3-8b/ and qwen-tokenizer/ (default: shared/models, "
        "../shared/models or .gpu/models, whichever exists)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="for the model folder (default: %(default)s)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="JSON, markdown, PNG and logs/ go here (default: benchmarks/results)",
    )
    parser.add_argument(
        "--mem-fraction-static", type=float, default=mem_fraction_static, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help="seconds allowed per configuration, start-up included (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole invocation: each configuration's limit is cut to what is "
        f"left minus {BUDGET_MARGIN_S:.0f} s (stopping and writing results), and a configuration "
        f"with less than {MIN_CONFIG_S:.0f} s left is not started (default: no budget)",
    )
    parser.add_argument(
        "--oscar-rotations",
        type=existing_file,
        help="rotation artifact passed to the oscar configuration (default: --oscar-rotations "
        f"{DATA_FREE_ROTATIONS}, the data-free rotations: the servers run dummy weights, whose "
        "throughput does not depend on them)",
    )
    parser.add_argument(
        "--oscar-args",
        type=flag_list,
        default=[],
        help="extra flags for the oscar configuration only, one quoted string, e.g. "
        "--oscar-args='--oscar-window-fraction 0.3' (recorded with its results)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and exit without running them"
    )


def add_parallel_args(parser):
    """--tp-size / --dp-size, passed unchanged to every configuration's server."""
    parser.add_argument(
        "--tp-size",
        type=positive_int,
        default=1,
        help="tensor parallelism of every configuration's server (SGLang --tp-size: KV heads "
        "and weights split over that many GPUs; default: %(default)s)",
    )
    parser.add_argument(
        "--dp-size",
        type=positive_int,
        default=1,
        help="data parallelism of every configuration's server (SGLang --dp-size: that many "
        "schedulers, each with a whole model on --tp-size GPUs, requests spread round robin; "
        "default: %(default)s)",
    )


def parallel_settings(args):
    """{"tp_size": N, "dp_size": M} for a parallel run, {} for one GPU (so that results files
    written before these flags existed keep matching a default run)."""
    sizes = {name: getattr(args, name, 1) for name in ("tp_size", "dp_size")}
    return sizes if any(value != 1 for value in sizes.values()) else {}


def kv_flags(config, oscar_rotations=None, oscar_args=()):
    """SGLang flags selecting the KV cache and attention backend of one configuration
    (the oscar configuration also gets its rotation file, data-free without one, and
    --oscar-args)."""
    flags = list(KV_CONFIGS[config])
    if config == OSCAR:
        rotations = DATA_FREE_ROTATIONS if oscar_rotations is None else str(oscar_rotations)
        flags += ["--oscar-rotations", rotations, *oscar_args]
    return flags
