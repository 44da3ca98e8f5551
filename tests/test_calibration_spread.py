"""benchmarks/calibration_spread.py end to end on a tiny random model (CPU)."""

import json

import pytest

from benchmarks import calibration_spread
from test_calibration import text_file, tiny_checkpoint


def test_spread_over_slices(tmp_path, capsys):
    model, data = tiny_checkpoint(tmp_path / "model"), text_file(tmp_path / "text.txt", words=8000)
    argv = ["--model", model, "--data", data, "--slices", "2", "--tokens", "512", "--seq-len", "256",
            "--heldout-fraction", "0.5", "--key-bits", "4", "--eval-offset", "2000", "--eval-sequences", "1",
            "--lengths", "640", "--trials", "2", "--prompt-style", "plain", "--out-dir", str(tmp_path / "out"),
            "--artifact-dir", str(tmp_path / "art"), "--name", "tiny"]
    assert calibration_spread.main(argv) == 0
    report = json.loads((tmp_path / "out" / "calibration-spread-tiny.json").read_text())
    slices = report["slices"]
    assert [s["tokens"] for s in slices] == [[0, 512], [512, 1024]]
    assert all(len(s["k_clip"]) == 2 and s["passkey"]["640"]["trials"] == 2 for s in slices)
    assert report["spread"]["delta_ppl_min"] <= report["spread"]["delta_ppl_max"]
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["slice0.oscar.safetensors",
                                                                    "slice1.oscar.safetensors"]
    assert "| slice |" in capsys.readouterr().out


def test_slices_must_end_before_the_evaluation_text(tmp_path):
    with pytest.raises(SystemExit):
        calibration_spread.main(["--model", "m", "--data", "d", "--slices", "3", "--tokens", "1000",
                                 "--eval-offset", "2500"])
