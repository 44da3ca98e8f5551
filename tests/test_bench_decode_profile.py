"""benchmarks/tuning/decode_profile.py's reading of Nsight Compute's raw CSV (profiling itself
needs a GPU and ncu)."""

import argparse
import json

import pytest

from benchmarks.tuning import decode_profile as prof

HEADER = ['"ID"', '"Kernel Name"', '"launch__grid_size"', '"launch__registers_per_thread"',
          '"gpu__time_duration.sum"', '"dram__bytes_read.sum"', '"smsp__inst_executed.sum"',
          '"sm__throughput.avg.pct_of_peak_sustained_elapsed"',
          '"launch__occupancy_limit_registers"', '"launch__occupancy_limit_shared_mem"',
          '"launch__occupancy_limit_warps"',
          '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"',
          '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"',
          '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"',
          '"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"',
          '"sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active"',
          '"sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active"',
          '"smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"', '"gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"']
UNITS = ['""', '""', '""', '"register/thread"', '"nsecond"', '"byte"', '"inst"', '"%"', '"block"', '"block"',
         '"block"', '"ratio"', '"ratio"', '"ratio"', '"ratio"', '"%"', '"%"', '"ratio"', '"%"']
SPLIT = ['"0"', '"_decode_split_kernel"', '"1,536"', '"128"', '"52,600"', '"109,051,904"', '"20,000,000"',
         '"81.5"', '"4"', '"3"', '"16"', '"1.7"', '"0.2"', '"0.9"', '"n/a"', '"61.0"', '"12.5"', '"1.0"', '"57.1"']
REDUCE = ['"1"', '"oscar_int2_split(float const*, int)"', '"128"', '"54"', '"7,500"', '"0"', '"10,000"',
          '"10.0"', '"2"', '"8"', '"8"', '"3.0"', '"0.1"', '"0.4"', '"0.0"', '"5.0"', '"0.0"', '"1.0"', '"9.0"']


def ncu_output(*rows):
    lines = ["point 131072x1: split kernels triton", "==PROF== Connected to process 1"]
    lines += [",".join(r) for r in (HEADER, UNITS, *rows)]
    return "\n".join(lines + ["==PROF== Disconnected from process 1"])


def test_rows_skip_the_programs_lines_and_the_units_row():
    rows = prof.kernel_rows(ncu_output(SPLIT, REDUCE))
    assert [r["ID"] for r in rows] == ["0", "1"]
    assert prof.kernel_rows("no profile here\n") == []


def test_a_kernels_record_reads_its_limits_pipes_and_stalls():
    split, other = (prof.kernel_record(r) for r in prof.kernel_rows(ncu_output(SPLIT, REDUCE)))
    assert split["kernel"] == "_decode_split_kernel" and split["grid"] == 1536 and split["registers"] == 128
    assert split["us"] == pytest.approx(52.6) and split["dram_read_gbs"] == pytest.approx(109051904 / 52600)
    assert split["warp_instructions_per_byte"] == pytest.approx(20e6 / 109051904)
    assert split["blocks_per_sm_limit"] == 3 and split["occupancy_bound_by"] == ["shared memory"]
    assert split["busiest_pipes_pct"] == [("alu", 61.0), ("tensor_op_hmma", 12.5)]
    assert split["dram_pct"] == 57.1
    # "selected" (1.0: the issue itself) is not a stall
    assert [n for n, _ in split["top_stalls_per_issue"]] == ["long_scoreboard", "wait", "barrier"]
    assert split["issue_per_cycle"] is None  # a counter ncu did not report stays missing
    assert other["kernel"] == "oscar_int2_split" and other["warp_instructions_per_byte"] is None
    assert other["occupancy_bound_by"] == ["registers"]
    assert "long_scoreboard 1.70" in prof.table([{"point": "131072x1", **split}])


def test_points_name_context_batch_and_prefix():
    assert prof.parse_point("33792x64@32768") == (33792, 64, 32768)
    assert prof.parse_point("131072x1") == (131072, 1, 0)
    for bad in ("131072", "1x2@3", "x1"):
        with pytest.raises(argparse.ArgumentTypeError):
            prof.parse_point(bad)


def test_summarize_rebuilds_the_report_from_the_saved_counters(tmp_path):
    (tmp_path / "decode-profile").mkdir()
    prof.csv_path(tmp_path, "33792x64@32768").write_text("\n".join(",".join(r) for r in (HEADER, UNITS, SPLIT, REDUCE)))
    doc = {"gpu": "H100", "key_bits": 4, "command": "ncu run", "points": ["33792x64@32768"],
           "steps": ["point 33792x64@32768: split kernels by_request"]}
    (tmp_path / "decode-profile.json").write_text(json.dumps(doc))
    assert prof.main(["--summarize", "--out-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "decode-profile.json").read_text())["records"]
    assert [(r["point"], r["kernel"]) for r in records] == [("33792x64@32768", "_decode_split_kernel"),
                                                            ("33792x64@32768", "oscar_int2_split")]
    report = (tmp_path / "decode-profile.md").read_text()
    assert "split kernels by_request" in report and "| 33792x64@32768 | oscar_int2_split |" in report
