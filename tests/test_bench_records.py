"""CPU tests of benchmarks/records.py: results documents merged across invocations only when
their benchmark, settings and GPU match, and markdown table cells.
"""

import json

from benchmarks import records

GPU = {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}


def test_merge_results_keeps_matching_runs_only(tmp_path):
    path = tmp_path / "r.json"
    doc = records.merge_results(path, "latency", {"a": 1}, GPU, {"oscar": {"status": "ok"}})
    records.write_json(path, doc)
    merged = records.merge_results(path, "latency", {"a": 1}, GPU, {"fp8-triton": {"status": "ok"}})
    assert set(merged["configs"]) == {"oscar", "fp8-triton"}
    assert set(records.merge_results(path, "latency", {"a": 2}, GPU, {"x": {}})["configs"]) == {"x"}
    h200 = {"gpus": [{"name": "NVIDIA H200"}]}
    assert set(records.merge_results(path, "latency", {"a": 1}, h200, {"x": {}})["configs"]) == {"x"}
    assert json.loads(path.read_text())["settings"] == {"a": 1}


def test_markdown_table_formatting():
    table = records.markdown_table(["a", "b", "c", "d"], [["x", 1.234, None, 7]])
    assert table.splitlines() == ["| a | b | c | d |", "|---|---|---|---|", "| x | 1.2 | — | 7 |"]
    assert records.ratio(1.0, 0) is None and records.ratio(None, 2.0) is None and records.ratio(1.0, 4.0) == 0.25


def test_load_compatible_and_merge_with_a_loaded_document(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert records.load_compatible(path, "latency", {"a": 1}, GPU) is None
    records.write_json(path, records.merge_results(path, "latency", {"a": 1}, GPU, {"x": {"n": 1}}))
    previous = records.load_compatible(path, "latency", {"a": 1}, GPU)
    assert previous["configs"] == {"x": {"n": 1}}
    doc = records.merge_results(path, "latency", {"a": 1}, GPU, {"y": {}}, previous=previous)
    assert set(doc["configs"]) == {"x", "y"}
    assert records.load_compatible(path, "latency", {"a": 2}, GPU) is None
    assert "replacing them" in capsys.readouterr().out
    assert set(records.merge_results(path, "latency", {"a": 1}, GPU, {"y": {}}, previous=None)["configs"]) == {"y"}
