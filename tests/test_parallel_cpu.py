"""Tensor and data parallelism with --kv-quant oscar, on the CPU (issue #8).

- Launcher: SGLang's real prepare_server_args accepts --tp-size / --dp-size (with a calibrated
  per-head rotation file, checked against the whole model) and DP attention with one attention
  rank per DP group, and refuses the layouts the OSCAR backend does not implement.
- Per rank: for every rank of TP 1/2/4/8/16 on 8 KV heads (16: each head replicated on two
  ranks) and of TP 4 on 2 KV heads, the heads whose rotations oscar_sglang.sizing builds into the
  pool are the heads SGLang's own QKVParallelLinear weight loader gives that rank, and the
  ranks' rotations put together are the whole file. The real hook bodies
  (sizing.compute_cell_size / build_mha_kv_pool / finalize_with_max_running_requests) run under
  get_parallel().override(attn_tp_size, attn_tp_rank): bytes per token, pool heads, window
  rows and sink pool per rank, against SGLang's own per-rank BF16 cell size; each rank logs its
  capacity line.
- The helpers of tests/parallel_cases.py (random checkpoint, per-head rotations,
  agreement and margin, capacity-line parsing).

tests/test_tensor_parallel_slicing.py has the fixed kv_head_range table and one rank's slice.
"""

import json
import logging
import types

import pytest
import torch
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.rotation_file import RotationSet, load_rotations, save_rotations

import parallel_cases
from oscar_sglang import sizing
from oscar_sglang.served_rotations import kv_head_range


pytestmark = pytest.mark.usefixtures("oscar_env")

LAYERS, HEAD_DIM = 2, 128
QWEN3_8B_LIKE = {  # Qwen3-8B's attention (32 query heads, 8 KV heads, head_dim 128), 2 layers
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 512,
    "intermediate_size": 512, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": HEAD_DIM, "num_hidden_layers": LAYERS, "vocab_size": 1000,
    "max_position_embeddings": 4096, "use_sliding_window": False, "torch_dtype": "bfloat16",
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": False,
}
# (query heads, KV heads, TP size): splits, one head per rank, replication, few KV heads
SPLITS = [(32, 8, 1), (32, 8, 2), (32, 8, 4), (32, 8, 8), (32, 8, 16), (8, 2, 4)]


def write_model(tmp_path, **changes):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(QWEN3_8B_LIKE, **changes)))
    return folder


def per_head_file(tmp_path, num_kv_heads=8, seed=3):
    path = tmp_path / f"per-head-{num_kv_heads}.oscar.safetensors"
    save_rotations(str(path), parallel_cases.per_head_rotations(LAYERS, num_kv_heads, HEAD_DIM,
                                                             seed=seed, model_name="tiny"))
    return path


def serve(sglang, model, *flags):
    return sglang.prepare_server_args(
        ["--model-path", str(model), "--device", "cpu", "--kv-quant", "oscar", *flags])


# ---------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("flags", [
    ["--tp-size", "2"],
    ["--tp-size", "8"],
    ["--tp-size", "16"],  # 8 KV heads on 16 ranks: SGLang replicates each head on two
    ["--dp-size", "2"],  # plain DP: a scheduler and a whole model per GPU
    ["--tp-size", "2", "--dp-size", "2"],
    ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"],  # one attention rank per group
])
def test_parallel_servers_pass_the_startup_checks(sglang, tmp_path, flags):
    rotations = per_head_file(tmp_path)  # checked against the whole model, not a rank's heads
    args = serve(sglang, write_model(tmp_path), "--oscar-rotations", str(rotations), *flags)
    assert args._oscar_settings is not None and args._oscar_settings.rotations == str(rotations)
    assert {args.attention_backend, args.prefill_attention_backend,
            args.decode_attention_backend} == {"oscar"}
    given = dict(zip(flags[::2], flags[1::2]))
    assert args.tp_size == int(given.get("--tp-size", 1))
    assert args.dp_size == int(given.get("--dp-size", 1))
    assert args.enable_dp_attention == ("--enable-dp-attention" in flags)
    assert args.disable_prefill_cuda_graph  # decode keeps its CUDA graphs


@pytest.mark.parametrize("flags, message", [
    (["--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"],
     (r"--enable-dp-attention with 2 attention-TP ranks per DP group \(--tp-size 4 --dp-size 2.*"
      r"pass --dp-size 4")),
    (["--tp-size", "8", "--dp-size", "2", "--enable-dp-attention"],
     "--enable-dp-attention with 4 attention-TP ranks per DP group"),
    (["--tp-size", "2", "--dcp-size", "2"], r"decode context parallelism \(--dcp-size 2"),
    (["--tp-size", "2", "--attn-cp-size", "2"], r"attention context parallelism \(--attn-cp-size 2"),
])
def test_parallel_layouts_the_backend_does_not_implement_are_refused(sglang, tmp_path, flags,
                                                                      message):
    with pytest.raises(ValueError, match="--kv-quant oscar does not support " + message):
        serve(sglang, write_model(tmp_path), *flags)


def test_refused_layouts_are_fine_without_oscar(sglang, tmp_path):
    """The refusal is OSCAR's, not SGLang's: the same flags pass without --kv-quant oscar."""
    args = sglang.prepare_server_args(["--model-path", str(write_model(tmp_path)), "--device", "cpu",
                                       "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"])
    assert args.enable_dp_attention and args.attention_backend != "oscar"


def test_resolved_parallel_layouts_are_checked_again():
    """check_resolved (after SGLang's own __post_init__) refuses them too."""
    from oscar_sglang import validation

    resolved = types.SimpleNamespace(
        model_path="m", attention_backend="oscar", prefill_attention_backend="oscar",
        decode_attention_backend="oscar", kv_cache_dtype="auto", speculative_algorithm=None,
        enable_hierarchical_cache=False, tp_size=4, dp_size=2, enable_dp_attention=True,
        dcp_size=1, attn_cp_size=1, enable_prefill_cp=False)
    with pytest.raises(ValueError, match="2 attention-TP ranks per DP group"):
        validation.check_resolved(resolved)
    validation.check_resolved(types.SimpleNamespace(**{**vars(resolved), "dp_size": 4}))


# ---------------------------------------------------------------------------- heads per rank


def sglang_kv_heads(total_heads, total_kv_heads, tp_size, tp_rank):
    """The KV heads SGLang's QKVParallelLinear weight loader gives this rank: a k_proj weight
    whose rows of head h hold h goes through its loader, the rank's K rows are read back."""
    from sglang.srt.layers.linear import QKVParallelLinear

    linear = QKVParallelLinear(16, HEAD_DIM, total_heads, total_kv_heads, bias=False,
                               params_dtype=torch.float32, tp_rank=tp_rank, tp_size=tp_size)
    k_proj = torch.arange(total_kv_heads, dtype=torch.float32).repeat_interleave(HEAD_DIM)
    linear.weight_loader(linear.weight, k_proj[:, None].expand(-1, 16).contiguous(), "k")
    q_rows = linear.num_heads * HEAD_DIM
    k_rows = linear.weight[q_rows:q_rows + linear.num_kv_heads * HEAD_DIM, 0]
    return [int(h) for h in k_rows.view(-1, HEAD_DIM)[:, 0]]


@pytest.mark.parametrize("total_heads, total_kv, tp", SPLITS)
def test_each_rank_slices_the_heads_sglang_loads(tmp_path, total_heads, total_kv, tp):
    rotations = load_rotations(str(per_head_file(tmp_path, total_kv)))
    slices = []
    for rank in range(tp):
        heads = sglang_kv_heads(total_heads, total_kv, tp, rank)
        start, end = kv_head_range(total_kv, tp, rank)
        assert list(range(start, end)) == heads, f"rank {rank}/{tp}"
        mine = rotations.slice_kv_heads(start, end)
        for layer in range(LAYERS):
            assert torch.equal(mine.k_rot[layer], rotations.k_rot[layer][heads])
            assert torch.equal(mine.v_rot[layer], rotations.v_rot[layer][heads])
        slices.append((heads, mine))
    # put together, the ranks hold every head exactly tp / total times (1 without replication)
    copies = max(1, tp // total_kv)
    assert sorted(h for heads, _ in slices for h in heads) == sorted(list(range(total_kv)) * copies)
    if copies == 1:
        for layer in range(LAYERS):
            assert torch.equal(torch.cat([s.k_rot[layer] for _, s in slices]), rotations.k_rot[layer])
            assert torch.equal(torch.cat([s.v_rot[layer] for _, s in slices]), rotations.v_rot[layer])


@pytest.fixture
def published(tmp_path, monkeypatch, sglang):
    """SGLang's ServerArgs published for a CPU run of the 8-KV-head model (what the pool hooks
    read through get_schedule / get_exec), its ModelConfig, and a per-head rotation file in
    SGLANG_OSCAR_ROTATIONS; everything put back after the test."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import get_context

    model = write_model(tmp_path)
    context = get_context()
    for owner, name in ((context, "_server_args"), (context, "_config_bags"),
                        (context, "_overrides_log"), (context, "_publish_role"),
                        (context.parallel, "_config"),
                        (context.flags.capture, "enable_torch_compile")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    server_args = sglang.ServerArgs(model_path=str(model), device="cpu",
                                    attention_backend="torch_native")
    context.set_server_args(server_args)
    rotations = per_head_file(tmp_path)
    monkeypatch.setenv("SGLANG_OSCAR_ROTATIONS", str(rotations))
    return types.SimpleNamespace(server_args=server_args, rotations=load_rotations(str(rotations)),
                                 model_config=ModelConfig.from_server_args(server_args))


class Configurator:
    """Stands in for SGLang's DefaultPoolConfigurator (the attribute its cell-size code reads)."""

    kv_cache_dtype_str = "auto"


def rank_pool(published, tp, rank):
    """Run the hook bodies as rank `rank` of attention-TP `tp`: (cell bytes, the configurator's
    OSCAR info, SGLang's own BF16 cell bytes, the pool, the capacity log record's message)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.pool_configurator import (
        DefaultPoolConfigurator,
        MemoryPoolConfig,
    )
    from sglang.srt.runtime_context import get_parallel

    model_config = published.model_config
    layer_info = types.SimpleNamespace(start_layer=0, end_layer=LAYERS, num_effective_layers=LAYERS)
    kvc = types.SimpleNamespace(
        model_config=model_config, server_args=published.server_args, layer_info=layer_info,
        kv_cache_dtype=torch.bfloat16, use_mla_backend=False, is_draft_worker=False)
    with get_parallel().override(attn_tp_size=tp, attn_tp_rank=rank):
        configurator = Configurator()
        cell = sizing.compute_cell_size(None, configurator, kvc, LAYERS)
        stock = DefaultPoolConfigurator._compute_cell_size.__wrapped__(configurator, kvc, LAYERS)
        pool = sizing.build_mha_kv_pool(
            None, types.SimpleNamespace(model_config=model_config, layer_info=layer_info,
                                        device="cpu", pool_page_size=1,
                                        post_capture_kv_active=False),
            max_total_num_tokens=64, mha_pool_class=MHATokenToKVPool)
        configurator._cell_size = cell
        config = MemoryPoolConfig(max_total_num_tokens=(64 << 20) // cell, max_running_requests=2048)
        config = sizing.finalize_with_max_running_requests(lambda _, c: c, configurator, config)
    return cell, sizing.sizing_of(configurator), stock, pool, config


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_each_rank_sizes_and_builds_its_own_heads(published, caplog, tp):
    fmt = OscarFormat(HEAD_DIM, key_bits=published.rotations.served_key_bits(None))  # the file's width
    total = QWEN3_8B_LIKE["num_key_value_heads"]
    full_int2 = fmt.bytes_per_token(LAYERS, total)
    caplog.set_level(logging.INFO, logger="oscar_sglang.sizing")
    for rank in range(tp):
        caplog.clear()
        cell, info, stock, pool, config = rank_pool(published, tp, rank)
        heads = published.model_config.get_num_kv_heads(tp)  # SGLang's per-rank count
        assert heads == max(1, total // tp)
        # bytes per token: this rank's heads only, in the ratio SGLang's BF16 cell has
        assert info.int2_bytes == fmt.bytes_per_token(LAYERS, heads) == full_int2 * heads // total
        assert stock == info.bf16_bytes == 2 * LAYERS * heads * HEAD_DIM * 2
        assert cell == sizing.budgeted_cell_bytes(info.int2_bytes, 0.10)
        # the pool: this rank's heads, with their own rotations
        start, end = kv_head_range(total, tp, rank)
        assert pool.head_num == heads == end - start
        assert pool.k_buffer[0].shape == fmt.codes_shape(64 + 1, heads, "k")
        assert pool.k_scale_buffer[0].shape == fmt.meta_shape(64 + 1, heads)
        for layer in range(LAYERS):
            assert torch.equal(pool.k_rot[layer], published.rotations.k_rot[layer][start:end])
            assert torch.equal(pool.v_rot[layer], published.rotations.v_rot[layer][start:end])
        # window rows and sink pool per rank: what the budget charged is what gets allocated
        pool.allocate_windows(3)
        window = sum(w.nbytes for w in (*pool.k_window, *pool.v_window))
        sink = sum(w.nbytes for w in (*pool.sinks.k, *pool.sinks.v))
        assert pool.k_window[0].shape == (4 * fmt.window_rows_per_request, heads, HEAD_DIM)
        assert window == 4 * info.window_bytes and sink == 3 * info.sink_bytes
        # each rank logs its own capacity line; with SGLang's "[time TPr]" prefix the GPU
        # test's parser reads it back
        (message,) = [r.getMessage() for r in caplog.records if "OSCAR-2 KV cache" in r.getMessage()]
        (line,) = parallel_cases.capacity_lines(f"[2026-11-23 10:00:00 TP{rank}] {message}")
        assert line["tp"] == rank and line["bytes_per_token"] == info.int2_bytes
        assert line["tokens"] == config.max_total_num_tokens
        assert line["requests"] == config.max_running_requests


# ---------------------------------------------------------------------------- GPU-test helpers


def test_random_checkpoint_loads_into_transformers_qwen3(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = dict(QWEN3_8B_LIKE, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, hidden_size=64)
    parallel_cases.write_random_checkpoint(tmp_path, config, seed=5)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    state = load_file(str(tmp_path / "model.safetensors"))
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
    model.load_state_dict(state, strict=True)  # every name and shape of a Qwen3 checkpoint
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    q = state["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - parallel_cases.INIT_STD) < 0.003
    assert torch.equal(state["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    again = tmp_path / "again"
    parallel_cases.write_random_checkpoint(again, config, seed=5)
    assert torch.equal(load_file(str(again / "model.safetensors"))["lm_head.weight"],
                       state["lm_head.weight"])  # seeded: the same file every time


def test_per_head_rotations_are_orthogonal_and_distinct(tmp_path):
    rotations = load_rotations(str(per_head_file(tmp_path, 4)))  # the loader checks orthogonality
    assert isinstance(rotations, RotationSet) and rotations.metadata["per_head"] == "true"
    k = rotations.k_rot[0]
    assert k.shape == (4, HEAD_DIM, HEAD_DIM)
    assert not torch.allclose(k[0], k[1]) and not torch.allclose(k[0], rotations.v_rot[0][0])


def test_prompt_set_is_fixed_and_has_no_shared_prefixes():
    a, b = parallel_cases.prompt_set(16), parallel_cases.prompt_set(16)
    assert a == b and len({p[0] for p in a}) == 16
    assert all(64 <= len(p) <= 1536 for p in a)
    assert all(parallel_cases.TOKEN_LO <= t < parallel_cases.TOKEN_HI for p in a for t in p)


def _run(*outputs, gaps=0.5):
    return [{"ids": list(ids), "gaps": [gaps] * len(ids)} for ids in outputs]


def test_agreement_and_margin():
    ref = _run([1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [1, 1, 1, 1])
    bf16 = parallel_cases.agreement(ref, _run([1, 2, 3, 4], [5, 6, 0, 0], [9, 9, 9, 9], [1, 1, 1, 1]))
    assert bf16["identical"] == 3 and bf16["divergences"] == [
        {"index": 1, "position": 2, "top2_gap": 0.5}]
    assert bf16["mean_agreed_fraction"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    close = parallel_cases.agreement(ref, _run([1, 2, 3, 4], [5, 6, 7, 0], [9, 9, 9, 0], [1, 1, 1, 1]))
    assert parallel_cases.within_margin(close, bf16, margin=0.25) == []
    broken = parallel_cases.agreement(ref, _run([0] * 4, [0] * 4, [9, 0, 0, 0], [1, 0, 0, 0]))
    problems = parallel_cases.within_margin(broken, bf16, margin=0.25)
    assert len(problems) == 2 and "0/4 generations identical, BF16 3/4" in problems[0]


def test_capacity_lines_name_their_ranks():
    text = (
        "[2026-11-23 15:17:28] OSCAR-2 KV cache: 2.25 bits/element (2-bit keys, 2-bit values, group 128), "
        "20736 bytes/token, "
        "747517 tokens; BF16 KV would hold 116799 tokens in the same budget (6.40x); window rows for "
        "8 running requests; sink pool of 512 BF16 rows (0.07 GB)\n"
        "[2026-11-23 15:17:28.123 DP1 TP1] OSCAR-2 KV cache: 3.25 bits/element (4-bit keys, 2-bit values, "
        "group 128), 10368 "
        "bytes/token, 1500000 tokens; BF16 KV would hold 233598 tokens in the same budget (6.42x); "
        "window rows for 8 running requests; sink pool of 512 BF16 rows (0.04 GB)\n"
        "[2026-11-23 15:17:29 TP0] OSCAR window rows: 8 requests x 192 BF16 rows, 0.12 GB\n"
    )
    single, ranked = parallel_cases.capacity_lines(text)
    assert (single["tp"], single["dp"], single["bytes_per_token"]) == (None, None, 20736)
    assert (ranked["tp"], ranked["dp"], ranked["tokens"], ranked["ratio"]) == (1, 1, 1_500_000, 6.42)
    assert parallel_cases.window_lines(text) == ["2026-11-23 15:17:29 TP0"]
    qwen3_8b = {"head_dim": 128, "num_hidden_layers": 36}
    assert parallel_cases.int2_bytes_per_token(qwen3_8b, 4) == 14976  # 4-bit keys, 4 KV heads
    assert parallel_cases.int2_bytes_per_token(qwen3_8b, 4, key_bits=2) == 10368
    assert parallel_cases.speedup({"metrics": {"output_tok_s": 1000.0}},
                               {"metrics": {"output_tok_s": 1700.0}}) == pytest.approx(1.7)
    assert parallel_cases.speedup({"metrics": {}}, {"metrics": {"output_tok_s": 1.0}}) is None
