"""benchmarks/calibration_spread.py, partial_key_bits.py, code_widths.py, scale_only_codes.py, channel_keys.py,
key_means.py, row_clips.py, outlier_rows.py and key_scaling.py end to end on a tiny random model (CPU)."""

import json

import pytest

from benchmarks import calibration_spread
from tiny_models import text_file, tiny_checkpoint


@pytest.mark.parametrize("trials", [2, 0])
def test_spread_over_slices(tmp_path, capsys, trials):
    model, data = tiny_checkpoint(tmp_path / "model"), text_file(tmp_path / "text.txt", words=8000)
    argv = ["--model", model, "--data", data, "--slices", "2", "--tokens", "512", "--seq-len", "256",
            "--heldout-fraction", "0.5", "--key-bits", "4", "--eval-offset", "2000", "--eval-sequences", "1",
            "--lengths", "640", "--trials", str(trials), "--prompt-style", "plain", "--out-dir", str(tmp_path / "out"),
            "--artifact-dir", str(tmp_path / "art"), "--name", "tiny"]
    assert calibration_spread.main(argv) == 0
    report = json.loads((tmp_path / "out" / "calibration-spread-tiny.json").read_text())
    slices = report["slices"]
    assert [s["tokens"] for s in slices] == [[0, 512], [512, 1024]]
    assert all(len(s["k_clip"]) == 2 for s in slices)
    assert all(s["passkey"] == ({"640": s["passkey"]["640"]} if trials else {}) for s in slices)
    assert all(s["passkey"]["640"]["trials"] == 2 for s in slices if trials)
    assert report["spread"]["delta_ppl_min"] <= report["spread"]["delta_ppl_max"]
    # one held-out sequence per slice: which layers more text could move is not known, not "none"
    assert all(s["heldout_sequences"] == 1 and s["unsure_layers"] is None for s in slices)
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["slice0.oscar.safetensors",
                                                                    "slice1.oscar.safetensors"]
    printed = capsys.readouterr().out
    assert ("passkey@640" in printed) == bool(trials)
    assert "not known (1 held-out sequence)" in printed


def test_slices_must_end_before_the_evaluation_text(tmp_path):
    with pytest.raises(SystemExit):
        calibration_spread.main(["--model", "m", "--data", "d", "--slices", "3", "--tokens", "1000",
                                 "--eval-offset", "2500"])


def test_partial_key_bits(tmp_path, capsys):
    """benchmarks/partial_key_bits.py on the tiny model: rankings and mixed-width formats."""
    from benchmarks import partial_key_bits
    from oscar_sglang.cli import main as cli

    model, data = tiny_checkpoint(tmp_path / "model"), text_file(tmp_path / "text.txt", words=8000)
    common = ["--model", model, "--data", data, "--tokens", "512", "--seq-len", "256", "--heldout-fraction", "0.5"]
    for bits in (2, 4):
        assert cli(["calibrate", *common, "--key-bits", str(bits), "--out", str(tmp_path / f"k{bits}.oscar.safetensors")]) == 0
    assert partial_key_bits.main(["--model", model, "--data", data, "--k2", str(tmp_path / "k2.oscar.safetensors"),
                                  "--k4", str(tmp_path / "k4.oscar.safetensors"), "--layers", "1,2",
                                  "--rank-offset", "1500", "--seq-len", "300", "--lengths", "400", "--trials", "2",
                                  "--haystack-offset", "2000", "--prompt-style", "plain",
                                  "--out-dir", str(tmp_path / "out"), "--name", "tiny"]) == 0
    report = json.loads((tmp_path / "out" / "partial-key-bits-tiny.json").read_text())
    assert sorted(report["layer_order"]) == [0, 1]
    bits = [r["bits_per_element"] for r in report["results"]]
    assert bits == [3.0, 3.5] and [len(r["layers_4bit"]) for r in report["results"]] == [1, 2]
    assert report["results"][0]["layers_4bit"] == report["layer_order"][:1]
    assert "| k4-in-1 |" in capsys.readouterr().out


# The held-out text, passkey prompts and report name the harness-variant scripts read on the tiny model.
TINY_SCORING = ["--seq-len", "300", "--sequences", "1", "--offset-tokens", "1500", "--lengths", "400", "--trials", "2",
                "--haystack-offset", "2000", "--prompt-style", "plain", "--name", "tiny"]


def calibrated_tiny_model(tmp_path, *calibrate_flags):
    """(model, data, rotation file) of a tiny random checkpoint calibrated on its own text."""
    from oscar_sglang.cli import main as cli

    model, data = tiny_checkpoint(tmp_path / "model"), text_file(tmp_path / "text.txt", words=8000)
    art = str(tmp_path / "tiny.oscar.safetensors")
    assert cli(["calibrate", "--model", model, "--data", data, "--tokens", "512", "--seq-len", "256",
                "--heldout-fraction", "0.5", *calibrate_flags, "--out", art]) == 0
    return model, data, art


def test_code_widths(tmp_path, capsys):
    """benchmarks/code_widths.py on the tiny model: each width pair's bits, error order and table."""
    from benchmarks import code_widths

    model, data, art = calibrated_tiny_model(tmp_path)
    assert code_widths.main(["--model", model, "--data", data, "--rotations", art, "--widths", "8x8,3x2,1x1",
                             *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "code-widths-tiny.json").read_text())
    rows = {r["format"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "k8v8", "k3v2", "k1v1"]
    assert [rows[n]["bits_per_element"] for n in ("k8v8", "k3v2", "k1v1")] == [8.5, 3.0, 1.5]
    # fewer bits, further from BF16 (the windows keep every format close at 300 tokens, not equal)
    assert 0 < rows["k8v8"]["kl_vs_bf16"] < rows["k3v2"]["kl_vs_bf16"] < rows["k1v1"]["kl_vs_bf16"]
    assert all(rows[n]["retrieval"]["passkey"]["400"]["trials"] == 2 for n in rows)  # BF16 too: the bar
    assert "| k3v2 | 3.00 |" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["3", "3x", "0x2", "9x2", "axb", ""])
def test_code_widths_refuses_bad_pairs(text):
    from benchmarks import code_widths

    with pytest.raises(SystemExit):
        code_widths.main(["--model", "m", "--data", "d", "--rotations", "r", "--widths", text])


def test_scale_only_codes(tmp_path, capsys):
    """benchmarks/scale_only_codes.py on the tiny model: the control and each width's bits, error
    order and table."""
    from benchmarks import scale_only_codes

    model, data, art = calibrated_tiny_model(tmp_path)
    assert scale_only_codes.main(["--model", model, "--data", data, "--rotations", art, "--widths", "4x4,1x1",
                                  *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "scale-only-codes-tiny.json").read_text())["results"]}
    assert list(rows) == ["bf16", "served k4v2 (control)", "scale-only k4v4", "scale-only k1v1"]
    head_dim = 64  # the tiny model's
    assert rows["scale-only k4v4"]["bits_per_element"] == 4 + 16 / head_dim
    assert 0 < rows["scale-only k4v4"]["kl_vs_bf16"] < rows["scale-only k1v1"]["kl_vs_bf16"]
    assert rows["scale-only k1v1"]["retrieval"]["passkey"]["400"]["trials"] == 2
    assert "| scale-only k1v1 | 1.25 |" in capsys.readouterr().out


def test_scale_only_levels_are_lloyd_max():
    """The 1-bit levels are ±E|x| of a unit Gaussian; on Gaussian rows 2-bit scale-only codes
    err less than unclipped asymmetric ones, and every width errs less than the one below."""
    import math

    import torch
    from benchmarks.scale_only_codes import lloyd_max_levels, scale_only_roundtrip
    from oscar_sglang.calibration.kv_formats import asymmetric_roundtrip

    assert torch.allclose(lloyd_max_levels(1), torch.tensor([-1.0, 1.0]) * math.sqrt(2 / math.pi))
    assert torch.allclose(lloyd_max_levels(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=1e-4)
    rows = torch.randn(4000, 3, 64, generator=torch.Generator().manual_seed(0))
    errors = [(scale_only_roundtrip(rows, b) - rows).pow(2).mean().item() for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)
    assert errors[1] < 0.7 * (asymmetric_roundtrip(rows, 2, 64) - rows).pow(2).mean().item()


def test_channel_keys(tmp_path, capsys):
    """benchmarks/channel_keys.py on the tiny model: the control and each block's bits, error and
    table, every --tasks task scored for every row (BF16, the bar, included); blocks longer than
    the recent window are refused."""
    from benchmarks import channel_keys

    model, data, art = calibrated_tiny_model(tmp_path)
    assert channel_keys.main(["--model", model, "--data", data, "--rotations", art, "--blocks", "32,128",
                              *TINY_SCORING, "--tasks", "passkey,multi-needle-one", "--lengths", "700",
                              "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "channel-keys-tiny.json").read_text())["results"]}
    assert list(rows) == ["bf16", "served k4v2 (control)", "channel keys, blocks of 32", "channel keys, blocks of 128"]
    head_dim = 64  # the tiny model's
    assert rows["channel keys, blocks of 128"]["bits_per_element"] == (2 + 32 / 128 + 2 + 32 / head_dim) / 2
    assert all(rows[n]["kl_vs_bf16"] > 0 for n in list(rows)[1:])
    assert all(rows[n]["retrieval"][task]["700"]["trials"] == 2
               for n in rows for task in ("passkey", "multi-needle-one"))
    out = capsys.readouterr().out
    assert "| passkey@700 | multi-needle-one@700 |" in out and "| channel keys, blocks of 128 | 2.38 |" in out
    with pytest.raises(ValueError, match="blocks of 256 positions exceed the 128-position recent window"):
        channel_keys.main(["--model", model, "--data", data, "--rotations", art, "--blocks", "256",
                           *TINY_SCORING, "--out-dir", str(tmp_path / "out")])


def test_channel_roundtrip_keeps_each_directions_extremes():
    """Positions before `start` and after the last whole block come back as given; inside each
    block every direction's minimum and maximum come back (up to fp16), the rest on 4 levels."""
    import torch
    from benchmarks.channel_keys import channel_roundtrip

    x = torch.randn(2, 3, 301, 16, generator=torch.Generator().manual_seed(1))
    y = channel_roundtrip(x, 64, 50, 2)
    assert torch.equal(y[:, :, :64], x[:, :, :64]) and torch.equal(y[:, :, 264:], x[:, :, 264:])
    block, back = x[:, :, 114:164], y[:, :, 114:164]
    torch.testing.assert_close(back.amax(2), block.amax(2), atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(back.amin(2), block.amin(2), atol=5e-3, rtol=1e-3)
    assert all(len(back[0, 0, :, d].unique()) <= 4 for d in range(16))

def test_channel_keys_bases(tmp_path):
    """--bases: the eigen and raw directions score as their own rows; an unknown basis is refused."""
    from benchmarks import channel_keys

    model, data, art = calibrated_tiny_model(tmp_path)
    assert channel_keys.main(["--model", model, "--data", data, "--rotations", art, "--blocks", "64",
                              "--bases", "eigen,raw", *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "channel-keys-tiny.json").read_text())["results"]}
    assert list(rows)[2:] == ["channel keys, blocks of 64, eigen directions", "channel keys, blocks of 64, raw directions"]
    assert rows[list(rows)[2]]["kl_vs_bf16"] != rows[list(rows)[3]]["kl_vs_bf16"]
    with pytest.raises(SystemExit):
        channel_keys.main(["--model", model, "--data", data, "--rotations", art, "--blocks", "64", "--bases", "pca"])


def test_key_means(tmp_path, capsys):
    """benchmarks/key_means.py on the tiny model: block and calibrated means, with the file's clips
    and a given one, their bits, and the table."""
    from benchmarks import key_means

    model, data, art = calibrated_tiny_model(tmp_path)
    assert key_means.main(["--model", model, "--data", data, "--rotations", art, "--variants",
                           "block32,calibrated:1.0", "--mean-tokens", "600", *TINY_SCORING,
                           "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "key-means-tiny.json").read_text())["results"]}
    assert list(rows)[2:] == ["keys minus block 32 mean, file clips", "keys minus calibrated mean, clip 1.0"]
    head_dim = 64  # the tiny model's
    assert rows["keys minus block 32 mean, file clips"]["bits_per_element"] == (2 + 32 / head_dim + 16 / 32 + 2.5) / 2
    assert rows["keys minus calibrated mean, clip 1.0"]["bits_per_element"] == 2.5
    assert all(rows[n]["kl_vs_bf16"] > 0 and rows[n]["retrieval"]["passkey"]["400"]["trials"] == 2
               for n in list(rows)[2:])
    assert "| keys minus calibrated mean, clip 1.0 | 2.50 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        key_means.main(["--model", model, "--data", data, "--rotations", art, "--variants", "mean"])


def test_block_means_are_causal_per_block():
    """Each whole block after `start` gets its own directions' means (fp16); the sinks and the
    partial last block get zero, so no position's mean reads a later block."""
    import torch
    from benchmarks.key_means import block_means

    x = torch.randn(1, 2, 150, 8, generator=torch.Generator().manual_seed(2))
    m = block_means(x, 10, 64)
    assert torch.equal(m[:, :, :10], torch.zeros_like(m[:, :, :10])) and torch.equal(m[:, :, 138:], torch.zeros_like(m[:, :, 138:]))
    torch.testing.assert_close(m[:, :, 74:138], x[:, :, 74:138].mean(2, keepdim=True).expand(-1, -1, 64, -1), atol=2e-3, rtol=1e-3)


def test_row_clips(tmp_path, capsys):
    """benchmarks/row_clips.py on the tiny model: both candidate kinds at the served bits."""
    from benchmarks import row_clips

    model, data, art = calibrated_tiny_model(tmp_path)
    assert row_clips.main(["--model", model, "--data", data, "--rotations", art, "--variants", "quantile,shrink",
                           *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "row-clips-tiny.json").read_text())["results"]}
    assert list(rows)[2:] == ["row clips by error, quantile", "row clips by error, shrink"]
    assert all(rows[n]["bits_per_element"] == 2.5 and rows[n]["kl_vs_bf16"] > 0 for n in list(rows)[2:])
    assert "| row clips by error, shrink | 2.50 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        row_clips.main(["--model", model, "--data", data, "--rotations", art, "--variants", "mse"])


def test_row_clip_picks_each_rows_least_error():
    """best_of keeps, per row, the candidate of least squared error, which is never worse than the
    unclipped codes (a candidate of both kinds) and is strictly better on Gaussian rows overall."""
    import torch
    from benchmarks.row_clips import best_of, candidates

    rows = torch.randn(1, 3, 257, 64, generator=torch.Generator().manual_seed(3))
    for kind in ("quantile", "shrink"):
        options = candidates(rows, kind, 2)
        picked = best_of(rows, options)
        errors = (options - rows[None]).pow(2).sum(-1)
        torch.testing.assert_close((picked - rows).pow(2).sum(-1), errors.min(0).values)
        assert (errors.min(0).values <= errors[0]).all() and errors.min(0).values.sum() < 0.9 * errors[0].sum()


def test_channel_keys_fp8_meta(tmp_path):
    """--meta fp8 halves the per-block meta bits and names its rows."""
    from benchmarks import channel_keys

    model, data, art = calibrated_tiny_model(tmp_path)
    for meta in ("fp16", "fp8"):
        assert channel_keys.main(["--model", model, "--data", data, "--rotations", art, "--blocks", "32", "--meta", meta,
                                  *TINY_SCORING, "--out-dir", str(tmp_path / meta)]) == 0
    fp16, fp8 = (json.loads((tmp_path / m / "channel-keys-tiny.json").read_text())["results"][2] for m in ("fp16", "fp8"))
    assert fp8["format"] == "channel keys, blocks of 32, fp8 meta"
    assert fp16["bits_per_element"] - fp8["bits_per_element"] == 16 / 32 / 2
    assert fp8["kl_vs_bf16"] > 0 and fp8["kl_vs_bf16"] != fp16["kl_vs_bf16"]


def test_fp8_meta_saturates_instead_of_overflowing():
    """range_roundtrip with fp8 meta: ranges beyond e4m3's ±448 saturate (no NaN), ordinary rows
    come back on at most 4 levels within fp8 precision of the row's extremes, and on Gaussian
    rows the fp8 meta adds under 2 % to the fp16 meta's squared error."""
    import torch
    from oscar_sglang.calibration.kv_formats import asymmetric_roundtrip

    rows = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    rows[0] *= 1000
    back = asymmetric_roundtrip(rows, 2, 32, torch.float8_e4m3fn)
    assert torch.isfinite(back).all()
    assert all(len(r.unique()) <= 4 for r in back)
    torch.testing.assert_close(back[1:].amin(-1), rows[1:].amin(-1), rtol=0.07, atol=0.02)
    gaussian = torch.randn(4000, 32, generator=torch.Generator().manual_seed(0))
    errors = [(asymmetric_roundtrip(gaussian, 2, 32, dtype) - gaussian).pow(2).mean().item()
              for dtype in (torch.float16, torch.float8_e4m3fn)]
    assert errors[0] <= errors[1] < 1.02 * errors[0]


def test_outlier_rows(tmp_path, capsys):
    """benchmarks/outlier_rows.py on the tiny model: widened rows add their bits, same-width
    rows add none; malformed variants are refused."""
    from benchmarks import outlier_rows

    model, data, art = calibrated_tiny_model(tmp_path)
    assert outlier_rows.main(["--model", model, "--data", data, "--rotations", art, "--variants", "0.25x2,0.25x4",
                              *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "outlier-rows-tiny.json").read_text())["results"]}
    assert list(rows)[2:] == ["top 0.25 rows unclipped, 2-bit", "top 0.25 rows unclipped, 4-bit"]
    assert rows["top 0.25 rows unclipped, 2-bit"]["bits_per_element"] == 2.5
    assert rows["top 0.25 rows unclipped, 4-bit"]["bits_per_element"] == 2.5 + 0.25 * 2 / 2
    assert "| top 0.25 rows unclipped, 4-bit | 2.75 |" in capsys.readouterr().out
    for bad in ("0.1", "1.5x2", "0.1x5"):
        with pytest.raises(SystemExit):
            outlier_rows.main(["--model", model, "--data", data, "--rotations", art, "--variants", bad])


def test_outlier_roundtrip_widens_the_most_clipped_rows():
    """The rows whose energy the clip cuts most, after `start`, come back unclipped; every other
    row is the served clipped code."""
    import torch
    from benchmarks.outlier_rows import clipped_energy, outlier_roundtrip
    from oscar_sglang.calibration.kv_formats import asymmetric_roundtrip
    from oscar_sglang.kernels.reference import clip_rows

    rows = torch.randn(1, 2, 120, 64, generator=torch.Generator().manual_seed(5))
    rows[0, 1, 70, 5] = 12.0
    rows[0, 0, 3, 9] = 30.0  # a sink: never widened
    back = outlier_roundtrip(rows, 10, 0.9, 0.1, 2)
    served = asymmetric_roundtrip(clip_rows(rows, 0.9), 2, 64)
    widened = (back != served).any(-1)
    assert widened.sum(-1).le(11).all()  # int(0.1 * 110) rows per head, fewer if a code is unchanged
    assert widened[0, 1, 70] and not widened[0, 0, 3]
    energy = clipped_energy(rows, clip_rows(rows, 0.9))
    assert energy[0, 1, 70] == energy[0, 1, 10:].max()
    torch.testing.assert_close(back[0, 1, 70], asymmetric_roundtrip(rows[0, 1, 70], 2, 64))


def test_key_scaling(tmp_path, capsys):
    """benchmarks/key_scaling.py on the tiny model: the file's 2-bit keys and the scaled variants
    at the same bits, power 0 (no scale) close to the file's keys unclipped."""
    from benchmarks import key_scaling

    model, data, art = calibrated_tiny_model(tmp_path, "--key-bits", "2")
    assert key_scaling.main(["--model", model, "--data", data, "--rotations", art, "--variants", "0.5x1.0,0x0.9",
                             "--calibration-tokens", "512", *TINY_SCORING, "--out-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "key-scaling-tiny.json").read_text())
    rows = {r["format"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "file", "scaled-p0.5-clip1", "scaled-p0-clip0.9"]
    assert len({rows[n]["bits_per_element"] for n in list(rows)[1:]}) == 1
    assert all(0 < rows[n]["kl_vs_bf16"] for n in list(rows)[1:])
    assert all(rows[n]["retrieval"]["passkey"]["400"]["trials"] == 2 for n in list(rows)[1:])
    assert "| scaled-p0.5-clip1 |" in capsys.readouterr().out


def test_key_transforms_scale_the_query_eigenbasis():
    """M · M⁻¹ = I, and M = U diag(1/a) H P_br with a_c = (s_c / √λ_c)^(2·power), a_0 = 1: at power
    0.5 the modeled score error (Σ λ a²)(Σ s² / a²) over directions 1.. reaches its Cauchy-Schwarz
    bound (Σ √λ s)², below power 0's (no scale)."""
    import torch
    from benchmarks.key_scaling import key_transforms
    from oscar_sglang.kernels.rotation_file import hadamard_bitrev

    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 16, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    c_q, c_k = x @ x.transpose(-1, -2), y @ y.transpose(-1, -2)
    forward, backward = key_transforms(c_q, c_k, 0.5)
    torch.testing.assert_close(forward @ backward, torch.eye(16).expand(2, 16, 16), atol=1e-4, rtol=0)
    lam, u = torch.linalg.eigh(c_q)
    lam, u = lam.flip(-1), u.flip(-1)
    s2 = torch.diagonal(u.transpose(-1, -2) @ c_k @ u, dim1=-2, dim2=-1)
    inverse_a = torch.diagonal(u.transpose(-1, -2) @ forward.double() @ hadamard_bitrev(16).double().T, dim1=-2, dim2=-1)
    a = 1 / inverse_a
    torch.testing.assert_close(a[:, 1:], (s2[:, 1:].sqrt() / lam[:, 1:].sqrt()) ** 0.5, rtol=1e-4, atol=0)
    torch.testing.assert_close(a[:, 0], torch.ones(2, dtype=torch.float64), rtol=1e-4, atol=0)
    lam, s2, a2 = lam[:, 1:], s2[:, 1:], a[:, 1:] ** 2
    optimum = (lam * a2).sum(-1) * (s2 / a2).sum(-1)
    torch.testing.assert_close(optimum, (lam.sqrt() * s2.sqrt()).sum(-1) ** 2, rtol=1e-4, atol=0)
    assert (optimum < lam.sum(-1) * s2.sum(-1)).all()
