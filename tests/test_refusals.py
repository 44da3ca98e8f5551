"""Every configuration OSCAR cannot serve is refused at startup, in the launcher, with a message
naming the problem; CPU only (the refusals come before SGLang looks for a GPU)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import types
from dataclasses import replace

import pytest
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS
from oscar_sglang.kernels.rotation_file import RotationSet, data_free_rotations, make_rotation_set, save_rotations

from oscar_sglang import validation
from oscar_sglang.config import OscarConfig

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 4096, "use_sliding_window": False, "torch_dtype": "bfloat16",
}
TINY_MLA = {  # DeepSeek-V2-Lite-shaped
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "vocab_size": 1000,
}
TINY_QWEN3_NEXT = {  # Gated DeltaNet layers with a full-attention layer every 4th
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
    "num_hidden_layers": 4, "full_attention_interval": 4, "vocab_size": 1000,
}
QWEN3_8B_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                               "qwen3-8b", "config.json")


pytestmark = pytest.mark.usefixtures("oscar_env")


def write_model(tmp_path, config=TINY_QWEN3, **changes):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(config, **changes)))
    return str(folder)


def write_rotations(tmp_path, num_layers=2, num_kv_heads=2, head_dim=128, scale=1.0):
    path = str(tmp_path / f"r{num_layers}-{num_kv_heads}-{head_dim}-{scale}.oscar.safetensors")
    rot = data_free_rotations(num_layers, num_kv_heads, head_dim, "another-model")
    rot = RotationSet([r * scale for r in rot.k_rot], rot.v_rot, rot.k_clip, rot.v_clip,
                      rot.metadata)
    save_rotations(path, rot)
    return path


def serve(sglang, model, *flags):
    return sglang.prepare_server_args(
        ["--model-path", model, "--device", "cpu", "--kv-quant", "oscar", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation .*--disaggregation-mode prefill"),
    (["--enable-two-batch-overlap"], "--enable-two-batch-overlap"),
    (["--attention-backend", "triton"], "--attention-backend triton"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend triton"),
])
def test_server_features(sglang, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        serve(sglang, write_model(tmp_path), *flags)


def test_sglangs_paged_hnd_layout_is_refused(sglang, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    with pytest.raises(ValueError, match="SGLANG_USE_HND_KVCACHE"):
        serve(sglang, write_model(tmp_path))


@pytest.mark.parametrize("config, changes, message", [
    (TINY_MLA, {}, "multi-head latent attention .*has kv_lora_rank=512"),
    (TINY_QWEN3, {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1},
     "sliding-window/chunked attention .*sliding_attention.*sliding_window=4096"),
    (TINY_QWEN3_NEXT, {}, "hybrid Mamba/linear-attention models .*linear_attention"),
])
def test_unsupported_attention(sglang, tmp_path, config, changes, message):
    with pytest.raises(ValueError, match=message):
        serve(sglang, write_model(tmp_path, config, **changes))


def test_head_dim_96(sglang, tmp_path):
    with pytest.raises(ValueError, match=r"head_dim in \(64, 128\), got 96"):
        serve(sglang, write_model(tmp_path, head_dim=96))


def test_group_size_larger_than_head_dim(sglang, tmp_path):
    with pytest.raises(ValueError, match=r"group size must be one of \[32, 64\] for head_dim 64"):
        serve(sglang, write_model(tmp_path, head_dim=64), "--oscar-group-size", "128")


def test_group_size_not_supported(sglang, tmp_path, capsys):
    with pytest.raises(SystemExit):
        serve(sglang, write_model(tmp_path), "--oscar-group-size", "48")
    assert "--oscar-group-size" in capsys.readouterr().err


@pytest.mark.parametrize("env, raw, allowed", [
    ("SGLANG_OSCAR_KV_QUANT", "int2", "none or oscar"),
    ("SGLANG_OSCAR_GROUP_SIZE", "48", "one of [32, 64, 128]"),
    ("SGLANG_OSCAR_SINK_TOKENS", "-1", "an integer >= 0"),
    ("SGLANG_OSCAR_RECENT_TOKENS", "0", "an integer >= 1"),
    ("SGLANG_OSCAR_WINDOW_FRACTION", "ten percent", "strictly between 0 and 1"),
])
def test_bad_environment_value_names_variable_and_allowed_values(sglang, tmp_path, monkeypatch,
                                                                  env, raw, allowed):
    monkeypatch.setenv("SGLANG_OSCAR_KV_QUANT", "oscar")
    monkeypatch.setenv(env, raw)
    with pytest.raises(ValueError) as refused:
        sglang.ServerArgs(model_path=write_model(tmp_path), device="cpu")
    assert env in str(refused.value) and allowed in str(refused.value)


def test_no_rotations_is_refused_naming_the_fix(sglang, tmp_path):
    """Data-free rotations serve garbage on some models, so they are never a silent default."""
    model = write_model(tmp_path)
    with pytest.raises(ValueError) as refused:
        serve(sglang, model)
    message = str(refused.value)
    assert "--kv-quant oscar needs rotations (--oscar-rotations / SGLANG_OSCAR_ROTATIONS)" in message
    assert (f"`oscar-sglang calibrate --model {model} --data <text files> --tokens 32768 --out "
            "NAME.oscar.safetensors`") in message
    assert "`--oscar-rotations NAME.oscar.safetensors`" in message
    assert "`--oscar-rotations data-free`" in message


@pytest.mark.parametrize("env, backend", [
    ({}, "oscar"),  # the Engine API: attention_backend="oscar"
    ({"SGLANG_OSCAR_KV_QUANT": "oscar"}, None),
])
def test_engine_without_rotations_is_refused(sglang, tmp_path, monkeypatch, env, backend):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="needs rotations .*`oscar-sglang calibrate .*`--oscar-"
                                         "rotations data-free`"):
        sglang.ServerArgs(model_path=write_model(tmp_path), device="cpu",
                          attention_backend=backend)


def test_data_free_rotations_are_served_when_asked_for(sglang, tmp_path, caplog):
    logger = logging.getLogger("oscar_sglang.served_rotations")
    logger.addHandler(caplog.handler)  # SGLang's logging setup replaces the root's handlers
    try:
        args = serve(sglang, write_model(tmp_path), "--oscar-rotations", "data-free")
    finally:
        logger.removeHandler(caplog.handler)
    # data-free rotations suit any key width: the default one is served
    assert args._oscar_settings == OscarConfig(rotations="data-free", key_bits=DEFAULT_KEY_BITS)
    assert OscarConfig.from_env() == OscarConfig(rotations="data-free")
    assert args.attention_backend == "oscar"
    assert "using data-free Hadamard rotations" in caplog.text


@pytest.mark.parametrize("kind", ["data-free", "file"])
def test_engine_with_rotations_in_the_environment_is_accepted(sglang, tmp_path, monkeypatch,
                                                              kind):
    rotations = write_rotations(tmp_path) if kind == "file" else kind
    monkeypatch.setenv("SGLANG_OSCAR_ROTATIONS", rotations)
    args = sglang.ServerArgs(model_path=write_model(tmp_path), device="cpu",
                             attention_backend="oscar")
    assert args._oscar_settings == OscarConfig(rotations=rotations, key_bits=DEFAULT_KEY_BITS)
    assert args.attention_backend == "oscar"


def test_scheduler_refuses_missing_rotations_too():
    """The pool hook loads the rotations again (oscar_sglang.sizing): no fallback there either."""
    from oscar_sglang.served_rotations import rotations_for_model

    with pytest.raises(ValueError, match="needs rotations .*`oscar-sglang calibrate --model m "):
        rotations_for_model(None, 2, 2, 128, "m")


@pytest.mark.parametrize("flags", [["--oscar-key-bits", "3"], []])
def test_a_file_calibrated_for_three_bit_keys_serves_them(sglang, tmp_path, flags):
    """The width the file records is served, whether asked for or left to the file."""
    rotations = str(tmp_path / "k3.oscar.safetensors")
    rot = data_free_rotations(2, 2, 128, "another-model")
    save_rotations(rotations, make_rotation_set(rot.k_rot, rot.v_rot, rot.k_clip, rot.v_clip, model_name="m",
                                                num_kv_heads=2, calibration_tokens=1, calibration_source="test",
                                                key_bits=3))
    args = serve(sglang, write_model(tmp_path), "--oscar-rotations", rotations, *flags)
    assert args._oscar_settings == OscarConfig(rotations=rotations, key_bits=3)


def test_missing_rotation_file(sglang, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        serve(sglang, write_model(tmp_path), "--oscar-rotations", str(tmp_path / "no.safetensors"))


@pytest.mark.parametrize("field, shape", [
    ("num_layers", {"num_layers": 3}),
    ("num_kv_heads", {"num_kv_heads": 4}),
    ("head_dim", {"head_dim": 64}),
])
def test_rotation_file_for_another_model(sglang, tmp_path, field, shape):
    wrong = write_rotations(tmp_path, **shape)
    with pytest.raises(ValueError, match=f"calibrated for {field}=.* has {field}="):
        serve(sglang, write_model(tmp_path), "--oscar-rotations", wrong)


def test_truncated_rotation_file(sglang, tmp_path):
    path = write_rotations(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="not a readable safetensors file.*truncated"):
        serve(sglang, write_model(tmp_path), "--oscar-rotations", path)


def test_non_orthogonal_rotation_file(sglang, tmp_path):
    path = write_rotations(tmp_path, scale=2.0)
    with pytest.raises(ValueError, match="layers.0.k_rot .* is not orthogonal"):
        serve(sglang, write_model(tmp_path), "--oscar-rotations", path)


def test_unreadable_model_config(sglang, tmp_path):
    with pytest.raises(ValueError, match="could not read the config"):
        serve(sglang, str(tmp_path))


def test_oscar_settings_without_oscar(sglang, tmp_path):
    with pytest.raises(ValueError, match=r"--oscar-sink-tokens \(SGLANG_OSCAR_SINK_TOKENS\) given "
                                         "but the OSCAR KV cache is off"):
        sglang.prepare_server_args(["--model-path", write_model(tmp_path), "--device", "cpu",
                                    "--oscar-sink-tokens", "16"])


def test_kv_quant_none_with_oscar_backend(sglang, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_OSCAR_KV_QUANT", "none")
    with pytest.raises(ValueError, match="--kv-quant none contradicts --attention-backend oscar"):
        sglang.ServerArgs(model_path=write_model(tmp_path), device="cpu", attention_backend="oscar")


def test_sglang_changing_a_validated_field_after_the_checks():
    resolved = types.SimpleNamespace(model_path="m", attention_backend="oscar",
                                     prefill_attention_backend="oscar",
                                     decode_attention_backend="triton", kv_cache_dtype="fp8_e4m3",
                                     speculative_algorithm=None, enable_hierarchical_cache=False)
    with pytest.raises(ValueError, match="after OSCAR was validated: decode_attention_backend="
                                         "'triton', kv_cache_dtype='fp8_e4m3'"):
        validation.check_resolved(resolved)


@pytest.mark.parametrize("attribute, value, message", [
    ("use_mla_backend", True, "multi-head latent attention"),
    ("mambaish_config", object(), "hybrid Mamba/linear-attention"),
    ("is_hybrid_swa", True, "sliding-window"),
    ("sliding_window_size", 4096, r"sliding-window attention \(SGLang serves m with window 4096\)"),
])
def test_scheduler_refuses_what_sglang_resolved(attribute, value, message):
    kvc = types.SimpleNamespace(use_mla_backend=False, mambaish_config=None, is_hybrid_swa=False,
                                sliding_window_size=None,
                                model_config=types.SimpleNamespace(model_path="m"))
    setattr(kvc, attribute, value)
    with pytest.raises(ValueError, match=message):
        validation.check_model_runtime(kvc)


def test_matching_rotation_file_is_accepted(sglang, tmp_path):
    args = serve(sglang, write_model(tmp_path), "--oscar-rotations", write_rotations(tmp_path))
    assert args._oscar_settings == replace(OscarConfig.from_env(), key_bits=DEFAULT_KEY_BITS)
    assert args.attention_backend == "oscar"


def test_launch_server_exits_naming_the_field(tmp_path):
    """The real command on a machine without a GPU: refused before SGLang looks for one."""
    model = tmp_path / "qwen3-8b"
    model.mkdir()
    if os.path.exists(QWEN3_8B_CONFIG):
        shutil.copy(QWEN3_8B_CONFIG, model / "config.json")
    else:  # the same shape, for checkouts without ../shared
        (model / "config.json").write_text(json.dumps(dict(
            TINY_QWEN3, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
            num_hidden_layers=36)))
    other = write_rotations(tmp_path, num_layers=28, num_kv_heads=8)
    out = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
         "--kv-quant", "oscar", "--oscar-rotations", other],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "calibrated for num_layers=28" in out.stderr and "has num_layers=36" in out.stderr
