"""benchmarks/decode_roofline.py's records and report, from decode_kernels-shaped points (the
timing itself needs a GPU)."""

from benchmarks import decode_roofline as roof


def point(us_oscar, pct_oscar):
    return {"oscar-int2": {"status": "ok", "us": us_oscar, "bytes": 10**9, "pct_hbm": pct_oscar},
            "flashinfer-fp8": {"status": "ok", "us": 900.0, "bytes": 3 * 10**9, "pct_hbm": 80.0},
            "flashinfer-bf16": {"status": "skipped", "reason": "needs 90.0 GiB"}}


def test_records_keep_each_kernel_and_why_a_point_is_missing():
    records = roof.records_from_point("H100", 4, "cuda", 8, 32768, 0, point(400.0, 76.0))
    by_kernel = {r["kernel"]: r for r in records}
    assert by_kernel["oscar-int2"]["hbm_fraction"] == 0.76 and by_kernel["oscar-int2"]["key_bits"] == 4
    assert by_kernel["flashinfer-fp8"]["key_bits"] is None and by_kernel["flashinfer-fp8"]["us"] == 900.0
    skipped = by_kernel["flashinfer-bf16"]
    assert skipped["us"] is None and skipped["hbm_fraction"] is None and skipped["note"] == "needs 90.0 GiB"


def test_targets_apply_where_the_issue_sets_them():
    assert roof.target_for(8, 32768) == 0.75 and roof.target_for(128, 131072) == 0.75
    assert roof.target_for(1, 131072) == 0.60
    assert roof.target_for(1, 32768) is None and roof.target_for(8, 8192) is None


def test_a_rerun_replaces_its_gpu_and_keeps_the_others():
    h100 = roof.records_from_point("H100", 4, "cuda", 1, 8192, 0, point(50.0, 20.0))
    h200 = roof.records_from_point("H200", 4, "cuda", 1, 8192, 0, point(40.0, 18.0))
    again = roof.records_from_point("H100", 4, "cuda", 1, 8192, 0, point(45.0, 22.0))
    merged = roof.merged(h100 + h200, again)
    assert [r for r in merged if r["gpu"] == "H200"] == h200
    assert [r for r in merged if r["gpu"] == "H100"] == again


def test_table_says_where_oscar_meets_the_target():
    records = (roof.records_from_point("H100", 4, "cuda", 8, 32768, 0, point(400.0, 76.0))
               + roof.records_from_point("H100", 4, "cuda", 1, 131072, 0, point(90.0, 41.0))
               + roof.records_from_point("H100", 4, "cuda", 64, 33792, 32768,
                                         {"oscar-int2-shared": point(300.0, 150.0)["oscar-int2"]})
               + roof.records_from_point("H200", 4, "cuda", 8, 32768, 0, point(1.0, 99.0)))
    rows = roof.table(records, "H100").splitlines()[2:]
    assert len(rows) == 3  # H100's points only
    assert rows[0].endswith("| 75 % | met |") and "400.0 (76 %)" in rows[0]
    assert rows[1].endswith("| 60 % | missed |")
    assert "300.0 (150 %)" in rows[2] and rows[2].endswith("| — | — |")  # shared prefix: no target


def test_plot_is_written(tmp_path):
    records = (roof.records_from_point("H100", 4, "cuda", 1, 8192, 0, point(50.0, 20.0))
               + roof.records_from_point("H100", 4, "cuda", 8, 32768, 0, point(400.0, 76.0)))
    assert roof.plot(tmp_path / "roofline.png", records, "H100")
    assert (tmp_path / "roofline.png").stat().st_size > 0
