"""benchmarks/tuning/split_kernel_ab.py on the CPU: the other version's text is assembled as this
tree's is, an older layout (PTX helpers inside int2_split.cu) compiles for an H100, and a folder
without the kernel is refused before any GPU work. Its timings need a GPU."""

import sys

import pytest
from oscar_sglang.kernels import int2_split
from oscar_sglang.kernels.decode import DECODE_LAUNCH
from oscar_sglang.kernels.format import OscarFormat

from benchmarks.tuning import split_kernel_ab

KERNEL = int2_split.SplitKernel(OscarFormat(128, key_bits=4), 4, (32, 32, 32), False,
                                DECODE_LAUNCH.window_rows_per_program, DECODE_LAUNCH.cuda_stages,
                                DECODE_LAUNCH.cuda_key_chains)


def test_this_trees_folder_gives_its_own_source():
    folder = int2_split.SOURCE.parent
    assert split_kernel_ab.baseline_source(folder, KERNEL) == int2_split.kernel_source(
        KERNEL, int2_split.PTX_HELPERS.read_text())


def test_a_version_with_its_helpers_inside_the_kernel_file_compiles(tmp_path):
    # the generated definitions first, then helpers and kernel from one file
    (tmp_path / "int2_split.cu").write_text(int2_split.PTX_HELPERS.read_text() + int2_split.SOURCE.read_text())
    compiled = int2_split.compile_source(split_kernel_ab.baseline_source(tmp_path, KERNEL), "sm_90")
    assert "0 bytes spill stores" in compiled.log


def test_a_folder_without_the_kernel_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["split_kernel_ab", "--baseline", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        split_kernel_ab.main()
    assert exit_.value.code == 2
    assert "holds no int2_split.cu" in capsys.readouterr().err
