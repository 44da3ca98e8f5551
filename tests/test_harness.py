"""Accuracy harness: the windowed two-score-set attention, the formats, simulated decode equal to
token-by-token decoding over the reference OSCAR-2 cache, and `oscar-sglang evaluate` end to end
on a tiny random-weight Llama."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from oscar_sglang.calibration import attention
from oscar_sglang.calibration.attention import attention_override, windowed_attention
from oscar_sglang.calibration.kv_formats import (
    Fp8Format,
    Int2Format,
    Int4Format,
    Kivi2Format,
    KVFormat,
    identity_rotations,
)
from oscar_sglang.calibration.harness import SimulatedCache
from oscar_sglang.cli import main
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache
from oscar_sglang.kernels.reference import decode_attention, encode_kv
from oscar_sglang.kernels.rotation_file import data_free_rotations, make_rotation_set
from tiny_models import text_file, tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """See test_calibration.one_thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_windowed(q, k_e, k_q, v_e, v_q, scaling, sink, recent):
    """Brute force: full L x L score sets, chosen per (query, key)."""
    group = q.shape[1] // k_e.shape[1]
    k_e, k_q, v_e, v_q = (x.repeat_interleave(group, 1) for x in (k_e, k_q, v_e, v_q))
    i, t = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
    exact = (t < sink) | (i - t < recent)
    scores = torch.where(exact, q @ k_e.mT, q @ k_q.mT) * scaling
    probs = scores.masked_fill(t > i, float("-inf")).softmax(-1)
    return (torch.where(exact, probs, 0) @ v_e + torch.where(exact, 0, probs) @ v_q).transpose(1, 2)


@pytest.mark.parametrize("length,sink,recent", [(70, 4, 8), (70, 0, 0), (70, 0, 5), (70, 3, 0),
                                                (10, 4, 8), (300, 64, 128), (2, 1, 1)])
def test_windowed_attention_matches_dense(length, sink, recent):
    torch.manual_seed(length + sink + recent)
    q, k, v = torch.randn(2, 6, length, 64), torch.randn(2, 2, length, 64), torch.randn(2, 2, length, 64)
    k_q, v_q = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    want = dense_windowed(q, k, k_q, v, v_q, 0.125, sink, recent)
    for block in (16, 256):  # independent of how queries are chunked
        got = windowed_attention(q, k, k_q, v, v_q, 0.125, sink, recent, block=block)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_blocked_lse_attention_matches_cpu_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64)
    out, lse = attention._attention_with_lse(q, k, v, 0.125)
    out_b, lse_b = attention.attention_with_lse_blocked(q, k, v, 0.125)
    torch.testing.assert_close(out_b, out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse_b, lse, atol=2e-6, rtol=1e-5)


def test_format_bits_and_roundtrips():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 100, 64) * 3, torch.randn(1, 2, 100, 64)
    assert KVFormat().bits == 16 and Fp8Format().bits == 8
    assert Int4Format(64).bits == 4.5 and Kivi2Format().bits == 3.0
    geo_rot = data_free_rotations(1, 2, 64)
    int2 = Int2Format("int2-hadamard", geo_rot, 64, 32, 4, 8, key_bits=2)
    assert int2.bits == 3.0 and Int2Format("oscar", geo_rot, 64, key_bits=2).bits == 2.5
    assert Int2Format("oscar", geo_rot, 64).bits == 3.5  # 4-bit keys unless told
    assert int2.effective_bits(96) == pytest.approx(3.0 + 12 * 16 / 96)
    # fp8 saturates instead of producing NaN
    big = torch.full((1, 1, 1, 64), 1e4)
    assert torch.equal(Fp8Format().kv(0, big, big)[1], torch.full_like(big, 448.0))
    # int4 / kivi / int2 errors ordered as their bits
    err = {f.name: (f.kv(0, k, v)[1] - k).square().mean() for f in
           (Int4Format(64), Kivi2Format(), Int2Format("naive", identity_rotations(1, 64), 64, key_bits=2))}
    assert err["int4"] < err["kivi2"] and err["int4"] < err["naive"]
    # KIVI: a partial last key block stays exact (it is inside every query's residual)
    k_exact, k_quant, _, _ = Kivi2Format().kv(0, k, v)
    assert torch.equal(k_quant[:, :, 96:], k_exact[:, :, 96:])
    assert not torch.equal(k_quant[:, :, :96], k_exact[:, :, :96])


class ReferenceDecodeCache:
    """Attention handler decoding one token at a time through the reference OSCAR-2 write path
    (encode_kv into codes / meta / BF16 window rows) and reference decode_attention."""

    def __init__(self, rotations, fmt: OscarFormat, num_layers, heads_kv, length):
        self.rot, self.fmt, self.position = rotations, fmt, 0
        rows = fmt.window_rows_per_request
        self.buffers = [{
            kind: (torch.zeros(fmt.codes_shape(length, heads_kv, kind), dtype=torch.uint8),
                   torch.zeros(fmt.meta_shape(length, heads_kv), dtype=torch.float16),
                   torch.zeros(rows, heads_kv, fmt.head_dim, dtype=torch.bfloat16))
            for kind in "kv"} for _ in range(num_layers)]

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer, pos, r = module.layer_idx, self.position, self.rot
        for kind, x in (("k", key), ("v", value)):
            codes, meta, window = encode_kv(x[0].transpose(0, 1), getattr(r, f"{kind}_rot")[layer],
                                            getattr(r, f"{kind}_clip")[layer], self.fmt, self.fmt.code_bits(kind))
            buf_codes, buf_meta, buf_window = self.buffers[layer][kind]
            buf_codes[pos], buf_meta[pos] = codes[0], meta[0]
            buf_window[self.fmt.window_row(0, pos)] = window[0]
        (kc, km, kw), (vc, vm, vw) = self.buffers[layer]["k"], self.buffers[layer]["v"]
        cache = LayerCache(self.fmt, kc, km, vc, vm, kw, vw, r.k_rot[layer], r.v_rot[layer])
        out = decode_attention(query[0].transpose(0, 1), torch.tensor([0, pos + 1]), torch.arange(pos + 1),
                               torch.tensor([0]), cache, scaling)
        return out[None].to(query.dtype), None


def test_simulated_decode_equals_token_by_token(tmp_path):
    # one float64 layer and signed-permutation rotations: K/V and their rotation come out bitwise
    # equal whether computed for 48 tokens or one at a time, so no BF16 rounding or INT2 code
    # can flip between the two paths and any difference is in what each query reads
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint(tmp_path / "m", num_layers=1)).double().eval()
    length, sink, recent, group = 48, 4, 8, 32
    gen = torch.Generator().manual_seed(1)
    k_rot, v_rot = ([torch.stack([torch.eye(64)[torch.randperm(64, generator=gen)] *
                                  (torch.randint(0, 2, (64,), generator=gen) * 2 - 1) for _ in range(2)])]
                    for _ in range(2))
    rotations = make_rotation_set(k_rot, v_rot, [0.9], [0.92], model_name="tiny",
                                  num_kv_heads=2, calibration_tokens=0, calibration_source="test")
    ids = torch.randint(0, 256, (length,), generator=gen)
    fmt = Int2Format("oscar", rotations, 64, group, sink, recent)
    with torch.no_grad(), attention_override(model, SimulatedCache(fmt), "oscar_test_simulated"):
        simulated = model(ids[None], use_cache=False).logits[0]

    cache = ReferenceDecodeCache(rotations, OscarFormat(64, group, sink, recent, fmt.format.key_bits), 1, 2, length)
    stepped = []
    with torch.no_grad(), attention_override(model, cache, "oscar_test_decode"):
        for pos in range(length):
            cache.position = pos
            out = model(ids[None, pos:pos + 1], position_ids=torch.tensor([[pos]]), use_cache=False)
            stepped.append(out.logits[0, 0])
    torch.testing.assert_close(torch.stack(stepped), simulated, atol=1e-5, rtol=1e-5)
    # the INT2 part matters: an exact-attention run differs
    assert (model(ids[None], use_cache=False).logits[0] - simulated).abs().max() > 1e-2


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    model, data = tiny_checkpoint(d / "model"), text_file(d / "text.txt", words=8000)
    art = str(d / "tiny.oscar.safetensors")
    common = ["--data", data, "--group-size", "32", "--sink-tokens", "4", "--recent-tokens", "32"]
    assert main(["calibrate", "--model", model, "--tokens", "512", "--seq-len", "256", "--out", art,
                 "--heldout-fraction", "0.5", "--key-bits", "2", *common]) == 0
    return d, model, art, common


def test_evaluate_cli_end_to_end(calibrated, capsys):
    d, model, art, common = calibrated
    shared = str(d / "shared.oscar.safetensors")
    assert main(["calibrate", "--model", model, "--tokens", "512", "--seq-len", "256", "--out", shared,
                 "--shared-across-heads", "--heldout-fraction", "0.5", "--key-bits", "4", *common]) == 0
    out_dir = d / "results"
    assert main(["evaluate", "--model", model, "--rotations", art, "--seq-len", "160", "--sequences", "1",
                 "--offset-tokens", "2000", "--lengths", "640,900", "--trials", "2", "--prompt-style",
                 "plain", "--haystack-offset", "2200", "--needles", "2",
                 "--out-dir", str(out_dir), "--name", "tiny", "--ablations", "--key-bits", "4",
                 "--ablation-rotations", f"shared={shared}", *common]) == 0
    report = json.loads((out_dir / "accuracy-tiny.json").read_text())
    assert (out_dir / "accuracy-tiny.png").stat().st_size > 0
    assert "| format |" in (out_dir / "accuracy-tiny.md").read_text()
    rows = {r["format"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "fp8", "int4", "kivi2", "int2-naive", "int2-hadamard", "oscar",
                          "oscar-nowindow", "oscar-keys-only", "oscar-values-only", "oscar-shared"]
    # one side exact: each half-quantized format is closer to BF16 than OSCAR, neither is exact
    for half in ("oscar-keys-only", "oscar-values-only"):
        assert 0 < rows[half]["kl_vs_bf16"] < rows["oscar"]["kl_vs_bf16"]
    assert rows["bf16"]["kl_vs_bf16"] == pytest.approx(0, abs=1e-9) and rows["bf16"]["top1_agreement"] == 1
    assert rows["oscar"]["bits_per_element"] == 3.0 and rows["int4"]["bits_per_element"] == 4.5
    # artifacts keep the key bits they were calibrated for; --key-bits sets the uncalibrated ones'
    assert rows["oscar-shared"]["bits_per_element"] == 4.0  # (4 + 2) / 2 + 32 / 32
    assert rows["int2-hadamard"]["bits_per_element"] == rows["int2-naive"]["bits_per_element"] == 4.0
    assert all(r["predictions"] == 159 for r in rows.values())
    for r in rows.values():
        assert list(r["retrieval"]) == ["passkey", "multi-needle-one", "multi-needle-all"]
        for by_length in r["retrieval"].values():
            assert list(by_length) == ["640", "900"]
            assert all(p["trials"] == 2 and len(p["outcomes"]) == 2 and 0 <= p["wilson95"][0] <= p["rate"]
                       for p in by_length.values())
    assert report["config"]["retrieval"]["lengths"] == [640, 900]
    assert "passkey@640" in (out_dir / "accuracy-tiny.md").read_text()
    assert any("multi-needle-all@900: OSCAR" in c for c in report["checks"])
    assert rows["oscar-nowindow"]["kl_vs_bf16"] > rows["oscar"]["kl_vs_bf16"]
    assert report["rotations"]["model_name"] == "model" and report["command"].startswith("oscar-sglang evaluate")
    assert "| oscar |" in capsys.readouterr().out


def test_evaluate_refuses_mismatching_model(calibrated, tmp_path):
    _, _, art, common = calibrated
    other = tiny_checkpoint(tmp_path / "three-layers", num_layers=3)
    with pytest.raises(SystemExit, match="num_layers=2.*num_layers=3"):
        main(["evaluate", "--model", other, "--rotations", art, "--seq-len", "64", "--sequences", "1",
              "--tasks", "", "--out-dir", str(tmp_path), *common])


def test_asymmetric_roundtrip_at_two_bits_matches_reference():
    from oscar_sglang.calibration.kv_formats import asymmetric_roundtrip
    from oscar_sglang.kernels.reference import dequantize, quantize

    x = torch.randn(5, 3, 64) * 4
    codes, scale, minimum = quantize(x, 32)
    assert torch.equal(asymmetric_roundtrip(x, 2, 32), dequantize(codes, scale, minimum, 32))
