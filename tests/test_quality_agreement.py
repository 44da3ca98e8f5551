"""benchmarks.quality_agreement: harness and server outcomes compared prompt by prompt."""

import json
from dataclasses import asdict

import pytest

from benchmarks.quality_agreement import AgreementError, compare, main
from oscar_sglang.calibration.harness import RetrievalSettings
from oscar_sglang.calibration.retrieval import Proportion

SETTINGS = RetrievalSettings(tasks=("passkey",), lengths=(1024, 2048), trials=4)


def harness_doc(outcomes):
    """outcomes: format -> length -> [bool]"""
    rows = [{"format": f, "retrieval": {"passkey": {str(n): dict(Proportion(sum(v), len(v)).as_dict(), outcomes=v)
                                                    for n, v in by_length.items()}}}
            for f, by_length in outcomes.items()]
    return {"config": {"retrieval": json.loads(json.dumps(asdict(SETTINGS)))}, "results": rows}


def server_doc(outcomes, **changes):
    """outcomes: config -> length -> [bool]"""
    configs = {c: {"status": "ok", "retrieval": {"passkey": {"cold": {"outcomes": [
        {"length": n, "correct": x} for n, v in by_length.items() for x in v]}}}}
        for c, by_length in outcomes.items()}
    return {"settings": dict(asdict(SETTINGS), **changes), "configs": configs}


def test_rows_pair_formats_with_configs_prompt_by_prompt():
    h = harness_doc({"bf16": {1024: [True] * 4, 2048: [True, True, False, True]},
                     "int2-hadamard": {1024: [True, False, False, False], 2048: [False] * 4}})
    s = server_doc({"bf16": {1024: [True] * 4, 2048: [True, False, False, True]},
                    "oscar-data-free": {1024: [True, True, False, False], 2048: [True] * 4}})
    rows = compare(h, s, [("bf16", "bf16"), ("int2-hadamard", "oscar-data-free"), ("oscar", "oscar")])
    assert [(r["format"], r["config"], r["length"]) for r in rows] == [
        ("bf16", "bf16", 1024), ("bf16", "bf16", 2048),
        ("int2-hadamard", "oscar-data-free", 1024), ("int2-hadamard", "oscar-data-free", 2048)]
    assert [r["same_verdict"] for r in rows] == [1.0, 0.75, 0.75, 0.0]
    assert [r["intervals_overlap"] for r in rows] == [True, True, True, False]
    assert rows[1]["server"]["successes"] == 2 and rows[1]["harness"]["successes"] == 3


def test_only_shared_task_lengths_are_compared():
    h = harness_doc({"bf16": {1024: [True] * 4, 2048: [True] * 4}})
    s = server_doc({"bf16": {2048: [True] * 4, 4096: [False] * 4}}, lengths=[2048, 4096])
    assert [r["length"] for r in compare(h, s, [("bf16", "bf16")])] == [2048]


def test_different_prompts_or_counts_are_refused():
    h = harness_doc({"bf16": {1024: [True] * 4, 2048: [True] * 4}})
    with pytest.raises(AgreementError, match="seed 0 .harness. vs 1 .server."):
        compare(h, server_doc({"bf16": {1024: [True] * 4, 2048: [True] * 4}}, seed=1), [("bf16", "bf16")])
    with pytest.raises(AgreementError, match="3 server outcomes, 4 in the harness"):
        compare(h, server_doc({"bf16": {1024: [True] * 3, 2048: [True] * 4}}), [("bf16", "bf16")])


def test_cli_writes_markdown_and_json(tmp_path, capsys):
    (tmp_path / "accuracy-m.json").write_text(json.dumps(harness_doc({"oscar": {1024: [True] * 4, 2048: [True] * 4}})))
    (tmp_path / "quality-server-m.json").write_text(json.dumps(server_doc({"oscar": {1024: [True] * 4, 2048: [False] * 4}})))
    assert main(["--harness", str(tmp_path / "accuracy-m.json"), "--server", str(tmp_path / "quality-server-m.json")]) == 0
    md = (tmp_path / "quality-agreement-m.md").read_text()
    assert "| oscar | oscar | passkey | 2048 | 100 % [51, 100] | 0 % [0, 49] | NO | 0 % |" in md
    assert "Intervals overlap in 1 of 2 rows" in md and "same verdict on 50.0 %" in md
    assert len(json.loads((tmp_path / "quality-agreement-m.json").read_text())["rows"]) == 2
    assert "passkey" in capsys.readouterr().out
