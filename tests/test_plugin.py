"""The plugin as SGLang loads it (entry point → load_plugins()): hooks, flags, backend; CPU.

Every test starts with no SGLANG_OSCAR_* variable set and leaves none behind (the flags export
them into os.environ)."""

import json
import os
import subprocess
import sys
import types

import pytest
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS
from oscar_sglang.kernels.rotation_file import data_free_rotations, hadamard_bitrev, make_rotation_set, save_rotations

from oscar_sglang import patches, validation
from oscar_sglang.config import ALL_SETTINGS, OscarConfig

# A tiny Qwen3: enough for SGLang's ServerArgs and for OSCAR's checks (head_dim 128, GQA).
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 4096, "use_sliding_window": False, "torch_dtype": "bfloat16",
}


pytestmark = pytest.mark.usefixtures("oscar_env")


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3))
    return str(tmp_path)


@pytest.fixture
def rotation_file(tmp_path):
    path = str(tmp_path / "tiny.oscar.safetensors")
    save_rotations(path, data_free_rotations(2, 2, 128, "tiny-qwen3"))
    return path


def test_flags_parse_export_and_turn_oscar_on(sglang, model_dir, rotation_file):
    args = sglang.prepare_server_args([
        "--model-path", model_dir, "--device", "cpu", "--kv-quant", "oscar",
        "--oscar-rotations", rotation_file, "--oscar-group-size", "64",
        "--oscar-sink-tokens", "32", "--oscar-recent-tokens", "256",
        "--oscar-window-fraction", "0.2", "--oscar-key-bits", "4"])
    expected = OscarConfig(rotation_file, key_bits=4, group_size=64, sink_tokens=32, recent_tokens=256,
                           window_memory_fraction=0.2)
    assert OscarConfig.from_env() == expected
    assert os.environ["SGLANG_OSCAR_KV_QUANT"] == "oscar"
    assert args._oscar_settings == expected
    assert args.get_attention_backends() == ("oscar", "oscar")
    assert args.attention_backend == "oscar"
    assert args.disable_prefill_cuda_graph  # decode graphs stay; prefill runs eagerly


def calibrated_file(tmp_path, key_bits: int) -> str:
    path = str(tmp_path / f"k{key_bits}.oscar.safetensors")
    rot = hadamard_bitrev(128)[None]
    save_rotations(path, make_rotation_set([rot] * 2, [rot] * 2, [0.9] * 2, [0.9] * 2, model_name="tiny-qwen3",
                                           num_kv_heads=2, calibration_tokens=1, calibration_source="test",
                                           key_bits=key_bits))
    return path


def test_key_bits_other_than_the_calibrated_ones_are_refused(sglang, model_dir, tmp_path):
    with pytest.raises(ValueError, match="calibrated for 2-bit keys.*drop --oscar-key-bits"):
        sglang.prepare_server_args(["--model-path", model_dir, "--device", "cpu", "--kv-quant", "oscar",
                                    "--oscar-rotations", calibrated_file(tmp_path, 2), "--oscar-key-bits", "4"])


@pytest.mark.parametrize("key_bits", [2, 4])
def test_the_key_width_follows_the_rotation_file(sglang, model_dir, tmp_path, key_bits):
    args = sglang.prepare_server_args(["--model-path", model_dir, "--device", "cpu", "--kv-quant", "oscar",
                                       "--oscar-rotations", calibrated_file(tmp_path, key_bits)])
    assert args._oscar_settings.key_bits == key_bits
    assert "SGLANG_OSCAR_KEY_BITS" not in os.environ  # the schedulers read the file themselves


def test_without_kv_quant_sglang_is_untouched(sglang, model_dir):
    args = sglang.prepare_server_args(["--model-path", model_dir, "--device", "cpu"])
    assert args.attention_backend != "oscar"
    assert args._oscar_settings is None
    assert not [s.env for s in ALL_SETTINGS if s.env in os.environ]


def test_bad_flag_value_is_an_argparse_error_naming_it(sglang, model_dir, capsys):
    with pytest.raises(SystemExit):
        sglang.prepare_server_args(["--model-path", model_dir, "--oscar-window-fraction", "1.5"])
    err = capsys.readouterr().err
    assert "SGLANG_OSCAR_WINDOW_FRACTION (--oscar-window-fraction)" in err
    assert "strictly between 0 and 1" in err


def test_engine_style_attention_backend_turns_oscar_on(sglang, model_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_OSCAR_ROTATIONS", "data-free")
    monkeypatch.setenv("SGLANG_OSCAR_GROUP_SIZE", "32")
    args = sglang.ServerArgs(model_path=model_dir, device="cpu", attention_backend="oscar")
    assert [getattr(args, f) for f in validation.BACKEND_FIELDS] == ["oscar"] * 3
    assert args._oscar_settings == OscarConfig(rotations="data-free", group_size=32, key_bits=DEFAULT_KEY_BITS)
    # The launcher's os.environ is left alone, so a later Engine in this process is not OSCAR.
    assert "SGLANG_OSCAR_KV_QUANT" not in os.environ


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for setting in ALL_SETTINGS:
        assert setting.flag in out.stdout and setting.env in out.stdout
    assert "--kv-quant {none,oscar}" in out.stdout
    assert "--oscar-group-size {32,64,128}" in out.stdout


def test_hooks_backend_and_choice_are_installed(sglang):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
    from sglang.srt.plugins.hook_registry import HookRegistry

    for patch in patches.PATCHES:
        assert patch.target in HookRegistry._patched
    assert ATTENTION_BACKENDS["oscar"] is patches.attention_registry.create_backend
    assert "oscar" in sglang.ATTENTION_BACKEND_CHOICES
    assert hasattr(DefaultPoolConfigurator._compute_cell_size, "__wrapped__")
    assert hasattr(KVCacheConfigurator._build_mha_kv_pool, "__wrapped__")
    for method in (TokenToKVPoolAllocator.free, TokenToKVPoolAllocator.clear,
                   PagedTokenToKVPoolAllocator._release_page_ids, PagedTokenToKVPoolAllocator.clear):
        assert hasattr(method, "__wrapped__"), method
    # add_cli_args stays a staticmethod through the hook registry.
    assert isinstance(sglang.ServerArgs.__dict__["add_cli_args"], staticmethod)


@pytest.mark.parametrize("target", [patches.kv_cache_configurator.BUILD_MHA_KV_POOL, patches.allocator_token.TOKEN_FREE,
                                    patches.allocator_paged.PAGED_RELEASE, patches.allocator_token.TOKEN_CLEAR])
def test_unapplied_pool_hook_refuses_instead_of_serving_bf16(sglang, model_dir, monkeypatch, target):
    from sglang.srt.plugins.hook_registry import HookRegistry

    patched = HookRegistry._patched - {target}
    monkeypatch.setattr(HookRegistry, "_patched", patched)
    monkeypatch.setenv("SGLANG_OSCAR_ROTATIONS", "data-free")
    with pytest.raises(RuntimeError, match=f"could not hook .*{target.rsplit('.', 1)[1]}"):
        sglang.ServerArgs(model_path=model_dir, device="cpu", attention_backend="oscar")


def _server_args(backend=None, prefill=None, decode=None):
    return types.SimpleNamespace(attention_backend=backend, prefill_attention_backend=prefill,
                                 decode_attention_backend=decode)


def _kvc(server_args):
    return types.SimpleNamespace(server_args=server_args, use_mla_backend=False,
                                 mambaish_config=None, is_hybrid_swa=False,
                                 sliding_window_size=None,
                                 model_config=types.SimpleNamespace(model_path="tiny"))


def test_pool_hooks_call_sglang_when_oscar_is_off():
    calls = []

    def original(*args, **kwargs):
        calls.append((args, kwargs))
        return "sglang"

    off = _kvc(_server_args("triton"))
    assert patches.pool_configurator.compute_cell_size(original, "configurator", off, 3) == "sglang"
    assert patches.kv_cache_configurator.build_mha_kv_pool(original, off, max_total_num_tokens=8,
                                                   mha_pool_class=object, quant_method=None) == "sglang"
    assert calls == [(("configurator", off, 3), {}),
                     ((off,), dict(max_total_num_tokens=8, mha_pool_class=object,
                                   quant_method=None))]


def test_pool_hooks_call_oscar_pool_when_on(monkeypatch):
    sizing = types.ModuleType("oscar_sglang.sizing")
    sizing.compute_cell_size = lambda *args: ("cell", args)
    sizing.build_mha_kv_pool = lambda *args, **kwargs: ("pool", args, kwargs)
    monkeypatch.setitem(sys.modules, "oscar_sglang.sizing", sizing)
    on = _kvc(_server_args("oscar", "oscar", "oscar"))
    assert patches.pool_configurator.compute_cell_size(len, "cfg", on, 3) == ("cell", (len, "cfg", on, 3))
    assert patches.kv_cache_configurator.build_mha_kv_pool(len, on, max_total_num_tokens=8, mha_pool_class=object) == (
        "pool", (len, on), dict(max_total_num_tokens=8, mha_pool_class=object))


def test_backend_factory_refuses_a_bf16_pool(sglang, monkeypatch):
    pool, backend = types.ModuleType("oscar_sglang.pool"), types.ModuleType("oscar_sglang.backend")
    pool.OscarTokenToKVPool = type("OscarTokenToKVPool", (), {})
    backend.OscarAttnBackend = lambda runner: ("backend", runner)
    monkeypatch.setitem(sys.modules, "oscar_sglang.pool", pool)
    monkeypatch.setitem(sys.modules, "oscar_sglang.backend", backend)
    runner = types.SimpleNamespace(server_args=_server_args("oscar", "oscar", "oscar"),
                                   token_to_kv_pool=object())
    with pytest.raises(RuntimeError, match="not an OscarTokenToKVPool"):
        patches.attention_registry.create_backend(runner)
    runner.token_to_kv_pool = pool.OscarTokenToKVPool()
    assert patches.attention_registry.create_backend(runner) == ("backend", runner)


@pytest.mark.parametrize("env, args, expected", [
    (None, _server_args("triton"), False),
    (None, _server_args("oscar", "oscar", "oscar"), True),
    ("oscar", _server_args("oscar", "oscar", "oscar"), True),
    ("oscar", _server_args("triton"), ValueError),  # launcher checks did not run
    (None, _server_args("oscar"), ValueError),  # ServerArgs built before load_plugins()
    ("none", _server_args("oscar", "oscar", "oscar"), ValueError),
])
def test_scheduler_sees_a_consistent_configuration(monkeypatch, env, args, expected):
    if env is not None:
        monkeypatch.setenv("SGLANG_OSCAR_KV_QUANT", env)
    if expected is ValueError:
        with pytest.raises(ValueError, match="launcher's checks did not run"):
            validation.scheduler_enabled(args)
    else:
        assert validation.scheduler_enabled(args) is expected


def test_backend_factory_refuses_without_oscar():
    runner = types.SimpleNamespace(server_args=_server_args("triton"), token_to_kv_pool=None)
    with pytest.raises(RuntimeError, match="needs the OSCAR KV cache: pass --kv-quant oscar"):
        patches.attention_registry.create_backend(runner)


def test_deterministic_inference_is_accepted_and_aligns_prefill_chunks(sglang, model_dir):
    from sglang.srt.managers.scheduler import Scheduler

    def original(scheduler):
        scheduler.truncation_align_size = None  # what SGLang sets for backends it does not know

    off = types.SimpleNamespace(server_args=_server_args("triton", "triton", "triton"))
    off.server_args.enable_deterministic_inference = True
    patches.scheduler.init_deterministic_inference_config(original, off)
    assert off.truncation_align_size is None

    args = sglang.prepare_server_args(["--model-path", model_dir, "--device", "cpu", "--kv-quant", "oscar",
                                       "--oscar-rotations", "data-free",
                                       "--enable-deterministic-inference"])
    assert args.attention_backend == "oscar" and args.enable_deterministic_inference
    assert hasattr(Scheduler.init_deterministic_inference_config, "__wrapped__")
    on = types.SimpleNamespace(server_args=_server_args("oscar", "oscar", "oscar"))
    on.server_args.enable_deterministic_inference = True
    patches.scheduler.init_deterministic_inference_config(original, on)
    assert on.truncation_align_size == patches.scheduler.TRITON_ALIGN_DEFAULT
