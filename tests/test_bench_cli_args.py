"""CPU tests of benchmarks/cli_args.py: the argparse types, the KV flags of every configuration,
and --oscar-args reaching the oscar configuration of both benchmarks only.
"""

from pathlib import Path

from bench_cases import MODEL, flag_value
from benchmarks import cli_args, latency, serving


def test_int_lists_are_sorted_and_unique():
    assert cli_args.parse_int_list("32, 1,8,1") == [1, 8, 32]


def test_configs_keep_their_order():
    assert cli_args.parse_configs(" oscar ,fp8-flashinfer") == ["oscar", "fp8-flashinfer"]


def test_kv_flags():
    assert cli_args.kv_flags("bf16-flashinfer") == ["--attention-backend", "flashinfer"]
    assert cli_args.kv_flags("fp8-flashinfer") == [
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--attention-backend",
        "flashinfer",
    ]
    assert cli_args.kv_flags("fp8-triton") == ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "triton"]
    # without an artifact, the data-free rotations knowingly (dummy weights: quality is moot)
    assert cli_args.kv_flags("oscar") == ["--kv-quant", "oscar", "--oscar-rotations", "data-free"]
    rotations = Path("r.safetensors")
    assert cli_args.kv_flags("oscar", rotations) == [
        "--kv-quant",
        "oscar",
        "--oscar-rotations",
        "r.safetensors",
    ]
    assert cli_args.kv_flags("fp8-triton", rotations) == cli_args.kv_flags("fp8-triton")
    extra = ["--oscar-window-fraction", "0.3"]
    assert cli_args.kv_flags("oscar", None, extra) == [
        "--kv-quant", "oscar", "--oscar-rotations", "data-free", *extra
    ]  # fmt: skip
    assert cli_args.kv_flags("fp8-flashinfer", rotations, extra) == cli_args.kv_flags("fp8-flashinfer")


def test_oscar_args_reach_the_oscar_server_only(tmp_path):
    args = serving.build_parser().parse_args(["--oscar-args", "--oscar-window-fraction 0.3"])
    assert args.oscar_args == ["--oscar-window-fraction", "0.3"]
    assert serving.server_command("oscar", args, MODEL, 1)[-6:] == [
        "--kv-quant", "oscar", "--oscar-rotations", "data-free", "--oscar-window-fraction", "0.3"
    ]  # fmt: skip
    assert "--oscar-window-fraction" not in serving.server_command("fp8-flashinfer", args, MODEL, 1)
    args = latency.build_parser().parse_args(["--oscar-args=--oscar-window-fraction 0.3"])
    cmd = latency.launcher_command("oscar", args, MODEL, "/out/oscar.jsonl")
    assert flag_value(cmd, "--oscar-window-fraction") == "0.3"
    assert "--oscar-window-fraction" not in latency.launcher_command("fp8-triton", args, MODEL, "/o")


def test_choice_list_names_what_is_unknown():
    import argparse

    import pytest

    parse = cli_args.choice_list(("rotated", "eigen"), "bases")
    assert parse("eigen,rotated") == ["eigen", "rotated"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown bases \['pca'\]; choose from rotated,eigen"):
        parse("eigen,pca")
