"""CPU tests of benchmarks/latency.py. Nothing here touches a GPU (a stand-in process plays the
one-batch launcher): flags, launcher commands, the launcher's bookkeeping of points, skips and
failures, time limits, progress lines, partial and merged results files, tables and plots. The
synthetic prefill runs through SGLang's real bench_one_batch code (extend, decode,
latency_test_run_once), ScheduleBatch and pools on the CPU, with stand-ins for the model forward
and the sampler only.
"""

import dataclasses
import json
import sys
import time
import types

import pytest
import torch

from bench_cases import MODEL, flag_value, serving_record, without
from benchmarks import cli_args, latency, processes, serving


# ---------------------------------------------------------------------------- arguments


def test_latency_defaults():
    args = latency.build_parser().parse_args([])
    assert args.configs == ["bf16-flashinfer", "fp8-flashinfer", "fp8-triton", "oscar"]
    assert args.batches == [1, 8, 32] and args.contexts == [16384, 32768, 100000]
    assert args.mem_fraction_static == 0.70 and args.decode_steps == 32
    assert args.timeout == 300.0 and args.budget is None
    assert args.prefill == "synthetic" and args.prefill_chunk_tokens == 131072
    assert args.max_batch_search and args.max_batch_context == 100000
    assert not latency.build_parser().parse_args(["--no-max-batch-search"]).max_batch_search


@pytest.mark.parametrize(
    "argv",
    [
        ["--configs", "fp16-magic"],
        ["--configs", "oscar,oscar"],
        ["--batches", "1,x"],
        ["--contexts", "0"],
        ["--decode-steps", "2"],
        ["--oscar-rotations", "/no/such/file.safetensors"],
        ["--prefill", "fake"],
        ["--oscar-args", "oscar-window-fraction 0.3"],
        ["--oscar-args", "--oscar-window-fraction '0.3"],
    ],
)
def test_latency_rejects_bad_flags(argv):
    with pytest.raises(SystemExit):
        latency.build_parser().parse_args(argv)


# ---------------------------------------------------------------------------- commands


def test_launcher_commands_differ_only_in_the_kv_option_and_names():
    args = latency.build_parser().parse_args(
        ["--batches", "1,8", "--contexts", "100000", "--max-batch-search"]
    )
    stripped = set()
    for config in cli_args.KV_CONFIGS:
        cmd = latency.launcher_command(config, args, MODEL, f"/out/{config}.jsonl")
        assert (
            flag_value(cmd, "--run-name") == config and flag_value(cmd, "--result-filename") == f"/out/{config}.jsonl"
        )
        cmd = without(cmd, cli_args.kv_flags(config))
        for flag in ("--run-name", "--result-filename"):
            cmd = without(cmd, [flag, flag_value(cmd, flag)])
        stripped.add(tuple(cmd))
    (cmd,) = stripped
    cmd = list(cmd)
    assert cmd[:4] == [sys.executable, "-m", "benchmarks.latency", "one-batch"]
    own, sglang_argv = latency.split_launcher_argv(cmd[4:])
    assert own == [
        "--prefill", "synthetic", "--prefill-chunk-tokens", "131072", "--max-batch-context", "100000"
    ]  # fmt: skip
    options = latency.launcher_parser().parse_args(own)
    assert (options.prefill, options.max_batch_context) == ("synthetic", 100000)
    assert without(sglang_argv, ["--batch-size", "1", "8"]) != sglang_argv
    assert without(sglang_argv, ["--cuda-graph-bs-decode", "1", "8"]) != sglang_argv
    assert flag_value(sglang_argv, "--input-len") == "100000"
    assert flag_value(sglang_argv, "--output-len") == "33"
    assert flag_value(sglang_argv, "--mem-fraction-static") == "0.7"


def test_launcher_options():
    own, rest = latency.split_launcher_argv(["--prefill-chunk-tokens", "8", "--", "--model-path", "m"])
    assert rest == ["--model-path", "m"]
    options = latency.launcher_parser().parse_args(own)
    assert (options.prefill_chunk_tokens, options.max_batch_context) == (8, None)
    assert options.prefill == "synthetic"
    assert latency.launcher_parser().parse_args(["--prefill", "model"]).prefill == "model"
    assert latency.split_launcher_argv(["--model-path", "m"]) == ([], ["--model-path", "m"])


# ---------------------------------------------------------------------------- one-batch launcher


class FakeRunner:
    """The parts of bench_one_batch's _TorchBenchRunner the launcher uses."""

    def __init__(self, tokens, slots=2048):
        self.torch_runner = types.SimpleNamespace(
            max_total_num_tokens=tokens, req_to_token_pool=types.SimpleNamespace(size=slots), device="cpu",
            forward=None,  # fake_run_once runs no forward
        )
        self.cleared = 0

    def max_batch_size(self, input_len, output_len):
        return self.torch_runner.max_total_num_tokens // (input_len + output_len)

    def clear(self):
        self.cleared += 1


def fake_run_once(run_name, model_runner, rank_print, reqs, batch_size, input_len, output_len, *rest, **kw):
    """Same leading parameters as bench_one_batch's latency_test_run_once."""
    if batch_size == 3:
        raise torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2 GiB")
    return {"batch_size": batch_size, "median_decode_latency": 0.01 * batch_size}


def test_recorder_records_warmup_points_skips_and_failures(tmp_path):
    out = tmp_path / "r.jsonl"
    recorder = latency.PointRecorder(out)
    runner = FakeRunner(tokens=4 * 110)
    run = recorder.wrap_run_once(fake_run_once)
    assert run("cfg", runner, print, [], 1, 100, 10, 0, False) is not None  # warm-up
    assert run("cfg", runner, print, [], 2, 100, 10, 0, False)["median_decode_latency"] == 0.02
    assert run("cfg", runner, print, [], 5, 100, 10, 0, False) is None  # 5 > 4 sequences fit
    assert (
        run(
            run_name="cfg",
            model_runner=runner,
            rank_print=print,
            reqs=[],
            batch_size=3,
            input_len=100,
            output_len=10,
        )
        is None
    )
    records = processes.read_jsonl(out)
    assert [(r["kind"], r["batch_size"], r["status"]) for r in records] == [
        ("warmup", 1, "ok"),
        ("point", 2, "ok"),
        ("point", 5, "skipped"),
        ("point", 3, "failed"),
    ]
    assert records[2]["reason"] == "KV pool holds 4 sequences of 100+10 tokens (440 tokens), request slots 2048"
    assert records[3]["error"] == "OutOfMemoryError: CUDA out of memory."
    assert runner.cleared == 1


def test_max_batch_size_respects_request_slots():
    assert latency.max_batch_size(FakeRunner(tokens=10 * 110, slots=3), 100, 10) == 3
    assert latency.max_batch_size(FakeRunner(tokens=10 * 110), 100, 10) == 10


def test_prefill_groups():
    assert latency.prefill_groups([100] * 4, 250) == [[0, 1], [2, 3]]
    assert latency.prefill_groups([300, 10, 10], 250) == [[0], [1, 2]]
    assert latency.prefill_groups([5, 5], 10) == [[0, 1]]


class FakeBatch:
    def __init__(self, reqs):
        self.reqs = list(reqs)

    def merge_batch(self, other):
        self.reqs += other.reqs


def test_chunked_extend_prefills_in_groups_and_merges():
    calls = []

    def extend(self, reqs):
        calls.append(len(reqs))
        ids = torch.tensor([len(r.origin_input_ids) for r in reqs])
        return ids, torch.zeros(len(reqs), 3), FakeBatch(reqs)

    reqs = [types.SimpleNamespace(origin_input_ids=[0] * n) for n in (60, 50, 40, 30)]
    run = latency.chunked_extend(extend, limit=100)
    ids, logits, batch = run(None, reqs)
    assert calls == [1, 2, 1]
    assert ids.tolist() == [60, 50, 40, 30] and logits.shape == (4, 3)
    assert batch.reqs == reqs
    calls.clear()
    assert run(None, reqs[3:])[2].reqs == reqs[3:] and calls == [1]


def test_config_record_sorts_the_launcher_lines():
    records = [
        {"kind": "pool", "max_total_num_tokens": 1000, "request_slots": 2048},
        {"kind": "warmup", "batch_size": 1, "input_len": 16, "status": "ok"},
        {"kind": "point", "batch_size": 1, "input_len": 16, "status": "ok", "median_decode_latency": 0.01},
        {"kind": "max_batch", "batch_size": 9, "input_len": 100, "status": "failed", "error": "x"},
    ]
    record = latency.config_record(records, 0)
    assert record["status"] == "ok" and record["pool"] == {
        "max_total_num_tokens": 1000,
        "request_slots": 2048,
    }
    assert [p["batch_size"] for p in record["points"]] == [1] and "kind" not in record["points"][0]
    assert record["max_batch"][0]["status"] == "failed" and len(record["warmup"]) == 1
    assert latency.config_record([], None)["status"] == "timeout"
    assert latency.config_record([], 1)["status"] == "failed"


# ---------------------------------------------------------------------------- results


def _latency_doc():
    def point(batch, context, status="ok", latency_s=None):
        p = {"batch_size": batch, "input_len": context, "status": status}
        if latency_s is not None:
            p.update(median_decode_latency=latency_s, median_decode_throughput=batch / latency_s)
        return p

    return {
        "settings": {
            "model": "qwen3-8b-dummy",
            "load_format": "dummy",
            "decode_steps": 32,
            "mem_fraction_static": 0.7,
            "prefill": "synthetic",
            "prefill_chunk_tokens": None,
            "max_batch_context": 100000,
        },
        "grid": {"batches": [1, 8], "contexts": [100000]},
        "configs": {
            "fp8-flashinfer": {
                "status": "ok",
                "kv_flags": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "flashinfer"],
                "cuda_graph_bs": [1, 8],
                "pool": {"max_total_num_tokens": 500_000, "request_slots": 2048},
                "points": [point(1, 100000, latency_s=0.012), point(8, 100000, "skipped")],
                "max_batch": [point(4, 100000, latency_s=0.03)],
            },
            "oscar": {
                "status": "ok",
                "kv_flags": ["--kv-quant", "oscar", "--oscar-window-fraction", "0.3"],
                "cuda_graph_bs": [1, 8],
                "pool": {"max_total_num_tokens": 3_000_000, "request_slots": 2048},
                "points": [point(1, 100000, latency_s=0.006), point(8, 100000, "failed")],
                "max_batch": [point(29, 100000, "failed"), point(28, 100000, latency_s=0.05)],
            },
        },
    }


def test_latency_tables():
    doc = _latency_doc()
    lines = latency.latency_table(doc).splitlines()
    assert lines[0] == "| batch x context | fp8-flashinfer ms | oscar ms | oscar / fp8-flashinfer |"
    assert lines[2] == "| 1 x 100000 | 12.0 | 6.0 | 0.50x |"
    assert lines[3] == "| 8 x 100000 | skipped | failed | — |"
    assert "GPU forward" not in latency.markdown(doc)  # no point measured it
    doc["configs"]["oscar"]["points"][0]["median_forward_ms"] = 4.5
    forward = latency.latency_table(doc, latency.forward_ms, "GPU forward ms").splitlines()
    assert forward[0] == "| batch x context | fp8-flashinfer GPU forward ms | oscar GPU forward ms | oscar / fp8-flashinfer |"
    assert forward[2] == "| 1 x 100000 | — | 4.5 | — |"  # FP8's point predates the measurement
    assert latency.forward_section(doc)[1] in latency.markdown(doc)
    capacity = latency.capacity_table(doc).splitlines()
    assert capacity[0].startswith("| config | KV pool tokens | request slots | max batch @ 100000 |")
    assert capacity[2] == "| fp8-flashinfer | 500000 | 2048 | 4 | 30.0 | 133.3 | yes |"
    assert capacity[3] == "| oscar | 3000000 | 2048 | 28 | 50.0 | 560.0 | no (eager) |"


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert latency.plot(_latency_doc(), tmp_path / "latency.png")
    doc = {
        "settings": {"model": "m", "num_groups": 4, "prompts_per_group": 16, "system_prompt_len": 32768,
                     "question_len": 1024, "output_len": 512},
        "configs": {"oscar": serving_record("ok", output_tok_s=3000.0), "fp8-flashinfer": serving_record("failed")},
    }  # fmt: skip
    assert serving.plot(doc, tmp_path / "serving.png")
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "serving.png").stat().st_size > 0


# ---------------------------------------------------------------------------- drivers, with stand-ins


def test_latency_run_config_reads_what_the_launcher_wrote(tmp_path, monkeypatch):
    lines = [
        {"kind": "pool", "max_total_num_tokens": 1000, "request_slots": 2048},
        {"kind": "point", "batch_size": 1, "input_len": 16, "status": "ok", "median_decode_latency": 0.01},
    ]
    script = "import sys; open(sys.argv[1], 'a').write(sys.argv[2]); sys.exit(int(sys.argv[3]))"
    for code, status in ((0, "ok"), (3, "failed")):
        monkeypatch.setattr(
            latency,
            "launcher_command",
            lambda config, args, model_path, out, code=code: [
                sys.executable, "-c", script, str(out), "".join(json.dumps(x) + "\n" for x in lines), str(code)
            ],
        )  # fmt: skip
        record = latency.run_config("oscar", latency.build_parser().parse_args([]), MODEL, tmp_path)
        assert record["status"] == status and record["points"][0]["median_decode_latency"] == 0.01
        assert record["pool"]["max_total_num_tokens"] == 1000


@dataclasses.dataclass
class FakeBenchArgs:
    """The BenchArgs fields the launcher reads."""

    run_name: str = "oscar"
    batch_size: tuple = (1, 2, 5)
    input_len: tuple = (100,)
    output_len: tuple = (10,)
    result_filename: str = ""


def _fake_sglang(monkeypatch, runner):
    """Stand-in sglang modules: plugins loader and a bench_one_batch whose latency_test does
    what the real one does with its module globals (load_model, warm-up, then the sweep)."""
    one_batch = types.ModuleType("sglang.benchmark.one_batch")
    seen = {"plugins": 0, "argv": None, "stock_result_filename": None}

    def load_plugins():
        seen["plugins"] += 1

    def latency_test(server_args, port_args, bench_args, gpu_id, tp_rank):
        seen["stock_result_filename"] = bench_args.result_filename
        model_runner, _ = one_batch.load_model(server_args, port_args, gpu_id, tp_rank)
        first = (bench_args.batch_size[0], bench_args.input_len[0], bench_args.output_len[0])
        one_batch.latency_test_run_once("w", model_runner, print, [], *first, 0, False)
        for bs in bench_args.batch_size:
            one_batch.latency_test_run_once(
                bench_args.run_name, model_runner, print, [], bs, 100, 10, 0, False
            )

    def cli_main():
        seen["argv"] = list(sys.argv)
        one_batch.latency_test(None, None, FakeBenchArgs(result_filename=sys.argv[-1]), 0, 0)

    class TorchBenchRunner:
        def extend(self, reqs):
            raise AssertionError("not called here")

    one_batch.__dict__.update(
        load_model=lambda *args: (runner, None),
        latency_test=latency_test,
        latency_test_run_once=fake_run_once,
        prepare_synthetic_inputs_for_latency_test=lambda batch_size, input_len: [],
        cli_main=cli_main,
        _TorchBenchRunner=TorchBenchRunner,
    )
    plugins = types.ModuleType("sglang.srt.plugins")
    plugins.load_plugins = load_plugins
    modules = {
        "sglang": types.ModuleType("sglang"),
        "sglang.srt": types.ModuleType("sglang.srt"),
        "sglang.srt.plugins": plugins,
        "sglang.benchmark": types.ModuleType("sglang.benchmark"),
        "sglang.benchmark.one_batch": one_batch,
    }
    modules["sglang.srt"].plugins = plugins
    modules["sglang.benchmark"].one_batch = one_batch
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(latency, "_STOCK", {})
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.setenv(latency.SETTINGS_ENV, "{}")
    return one_batch, seen


@pytest.mark.parametrize(
    "prefill, wrapper", [([], "synthetic_extend"), (["--prefill", "model"], "chunked_extend")]
)
def test_one_batch_launcher_loads_plugins_and_records_every_point(tmp_path, monkeypatch, prefill, wrapper):
    runner = FakeRunner(tokens=3 * 110)  # three 100 + 10 token sequences fit
    one_batch, seen = _fake_sglang(monkeypatch, runner)
    out = tmp_path / "r.jsonl"
    argv = [*prefill, "--prefill-chunk-tokens", "64", "--max-batch-context", "100", "--", "--model-path", "m", str(out)]
    assert latency.main(["one-batch", *argv]) == 0
    assert seen["argv"] == ["sglang.benchmark.one_batch", "--model-path", "m", str(out)]
    assert seen["plugins"] == 2  # launcher (before the parser) and worker (for spawned TP ranks)
    assert seen["stock_result_filename"] == ""  # the recorder writes the file, not stock latency_test
    assert one_batch.latency_test is latency.latency_worker
    assert one_batch._TorchBenchRunner.extend.__qualname__.startswith(wrapper)
    records = processes.read_jsonl(out)
    summary = [(r["kind"], r.get("batch_size"), r["status"]) for r in records[1:]]
    assert records[0] == {"kind": "pool", "max_total_num_tokens": 330, "request_slots": 2048}
    assert summary == [
        ("warmup", 1, "ok"),
        ("point", 1, "ok"),
        ("point", 2, "ok"),
        ("point", 5, "skipped"),
        ("max_batch", 3, "failed"),  # fake_run_once raises an OOM at batch 3
        ("max_batch", 2, "ok"),
    ]
    record = latency.config_record(records, 0)
    assert latency.max_batch_point(record)["batch_size"] == 2


# ---------------------------------------------------------------------------- synthetic prefill, real SGLang on CPU


# A tiny Qwen3 config: enough for SGLang's ServerArgs and ModelConfig.
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 4096, "use_sliding_window": False, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.fixture
def cpu_sglang(tmp_path, monkeypatch):
    """SGLang's real bench_one_batch module, ServerArgs published for a CPU run (torch_native
    attention: req_to_token written without Triton), and a factory of bench runners: SGLang's
    real _TorchBenchRunner over a stand-in ModelRunner holding real pools (ReqToTokenPool,
    MHATokenToKVPool, TokenToKVPoolAllocator) whose forward / sample stand in for the model."""
    one_batch = pytest.importorskip("sglang.benchmark.one_batch")
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang.srt.server_args import ServerArgs

    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3))
    context = get_context()
    for owner, name in (
        (context, "_server_args"), (context, "_config_bags"), (context, "_overrides_log"),
        (context, "_publish_role"), (context.parallel, "_config"),
        (context.flags.capture, "enable_torch_compile"),
    ):  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))  # put back after the test
    server_args = ServerArgs(model_path=str(tmp_path), device="cpu", attention_backend="torch_native")
    context.set_server_args(server_args)
    model_config = ModelConfig.from_server_args(server_args)
    monkeypatch.setattr(latency, "_STOCK", {})
    monkeypatch.setattr(one_batch._TorchBenchRunner, "extend", one_batch._TorchBenchRunner.extend)
    from sglang.srt.model_executor import forward_batch_info

    # on a CUDA host SGLang picks a CUDA kernel for decode positions; these tensors are on the CPU
    monkeypatch.setattr(forward_batch_info, "clamp_position", forward_batch_info._clamp_position_native)

    def make(tokens=400, slots=4, max_total_num_tokens=None, context_len=512):
        calls = []

        def forward(forward_batch, *args, **kwargs):
            calls.append(forward_batch.forward_mode.name)
            logits = torch.zeros(forward_batch.batch_size, model_config.vocab_size)
            return types.SimpleNamespace(logits_output=types.SimpleNamespace(next_token_logits=logits))

        def sample(logits_output, forward_batch):
            calls.append("sample")
            return torch.argmax(logits_output.next_token_logits, -1)

        kv_pool = MHATokenToKVPool(tokens, 1, torch.bfloat16, 2, 128, 2, "cpu", False)
        model_runner = types.SimpleNamespace(
            server_args=server_args,
            device="cpu",
            model_config=model_config,
            req_to_token_pool=ReqToTokenPool(slots, context_len, "cpu", False),
            token_to_kv_pool_allocator=TokenToKVPoolAllocator(tokens, torch.bfloat16, "cpu", kv_pool, need_sort=False),
            max_total_num_tokens=tokens if max_total_num_tokens is None else max_total_num_tokens,
            is_draft_worker=False,
            ngram_embedding_manager=types.SimpleNamespace(enabled=False),
            forward=forward,
            sample=sample,
            calls=calls,
        )  # fmt: skip
        return one_batch._TorchBenchRunner(model_runner)

    with get_parallel().override(moe_ep_size=1):  # no distributed groups on this machine
        yield one_batch, make


def _reqs(one_batch, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in lengths]
    return one_batch.prepare_synthetic_inputs_for_latency_test(len(inputs), max(lengths), inputs)


def test_synthetic_extend_sets_the_batch_up_like_the_real_one(cpu_sglang):
    one_batch, make = cpu_sglang
    stock = one_batch._TorchBenchRunner.extend
    synthetic = latency.synthetic_extend(stock)
    real_runner, fake_runner = make(), make()
    own_forward = fake_runner.torch_runner.forward
    real_ids, real_logits, real = stock(real_runner, _reqs(one_batch, [100, 60, 80]))
    ids, logits, batch = synthetic(fake_runner, _reqs(one_batch, [100, 60, 80]))
    assert real_runner.torch_runner.calls == ["EXTEND", "sample"]
    assert fake_runner.torch_runner.calls == []  # no model forward, no sampler
    assert fake_runner.torch_runner.forward is own_forward  # the stand-ins are gone again
    assert logits is None and real_logits is not None
    assert ids.dtype == torch.int64 and ids.shape == real_ids.shape == (3,)
    assert ids.device == batch.seq_lens.device and 0 <= ids.min() and ids.max() < 1000
    for field in ("seq_lens", "seq_lens_cpu", "orig_seq_lens", "req_pool_indices", "out_cache_loc", "input_ids"):
        assert torch.equal(getattr(batch, field), getattr(real, field)), field
    assert (batch.prefix_lens, batch.extend_lens, batch.seq_lens_sum) == ([0, 0, 0], [100, 60, 80], 240)
    assert batch.forward_mode == real.forward_mode and batch.sampling_info is not None
    def rows(runner, b):
        return runner.torch_runner.req_to_token_pool.req_to_token[b.req_pool_indices]

    assert torch.equal(rows(fake_runner, batch), rows(real_runner, real))
    allocator = fake_runner.torch_runner.token_to_kv_pool_allocator
    assert allocator.available_size() == 400 - 240
    assert [len(set(rows(fake_runner, batch)[i, :n].tolist())) for i, n in enumerate((100, 60, 80))] == [100, 60, 80]
    assert [r.kv_committed_len for r in batch.reqs] == [100, 60, 80]


def test_decode_runs_after_a_synthetic_prefill(cpu_sglang):
    """SGLang's own decode() (prepare_for_decode, ForwardBatch, forward, sample) on the batch."""
    one_batch, make = cpu_sglang
    runner = make()
    runner_cls = type(runner)
    runner_cls.extend = latency.synthetic_extend(runner_cls.extend)  # put back by the fixture
    ids, _, batch = runner.extend(_reqs(one_batch, [50, 70]))
    for step in range(1, 4):
        previous = ids
        ids, _ = runner.decode(previous, batch)
        assert batch.seq_lens.tolist() == [50 + step, 70 + step]
        assert torch.equal(batch.input_ids, previous)  # the synthetic ids fed the first step
    assert runner.torch_runner.calls == ["DECODE", "sample"] * 3
    assert runner.torch_runner.token_to_kv_pool_allocator.available_size() == 400 - 120 - 2 * 3
    row = runner.torch_runner.req_to_token_pool.req_to_token[batch.req_pool_indices[0]]
    assert len(set(row[:53].tolist())) == 53  # the decode tokens got their own slots


def test_recorded_points_with_a_synthetic_prefill(cpu_sglang, tmp_path):
    """bench_one_batch's real latency_test_run_once, recorded; a batch the pool formula admits
    but the allocator cannot hold is recorded as failed, and the max-batch search goes on down."""
    one_batch, make = cpu_sglang
    runner_cls = one_batch._TorchBenchRunner
    runner_cls.extend = latency.synthetic_extend(runner_cls.extend)
    out = tmp_path / "r.jsonl"
    recorder = latency.PointRecorder(out, "synthetic")
    run = recorder.wrap_run_once(one_batch.latency_test_run_once)
    runner = make(tokens=400, slots=4)
    forward = runner.torch_runner.forward
    args = ("cfg", runner, print)
    assert run(*args, _reqs(one_batch, [100]), 1, 100, 4, 0, False, False, ("CPU",), "", "all", 0)  # warm-up
    result = run(*args, _reqs(one_batch, [100, 100]), 2, 100, 4, 0, False, False, ("CPU",), "", "all", 0)
    assert result["median_decode_latency"] > 0
    assert run(*args, _reqs(one_batch, [100] * 4), 4, 100, 4, 0, False, False, ("CPU",), "", "all", 0) is None
    records = processes.read_jsonl(out)
    assert [(r["kind"], r["batch_size"], r["status"]) for r in records] == [
        ("warmup", 1, "ok"), ("point", 2, "ok"), ("point", 4, "skipped")
    ]  # fmt: skip
    point = records[1]
    assert point["setup_s"] >= 0 and point["median_decode_latency"] > 0
    assert 0 < point["median_forward_ms"] < point["median_decode_latency"] * 1000
    assert vars(runner.torch_runner)["forward"] is forward  # the timer is gone again
    assert not set(latency.PREFILL_FIELDS) & set(point)
    assert "KV pool holds 3 sequences of 100+4 tokens" in records[2]["reason"]
    assert runner.torch_runner.calls == ["DECODE", "sample"] * 3 * 2  # output_len 4: 3 decode steps each

    # The pool formula says 4 sequences of 96 + 4 fit (max_total_num_tokens 400), the allocator
    # holds 280 slots: 4 and 3 fail in the allocation, 2 then runs.
    out.unlink()
    recorder = latency.PointRecorder(out, "synthetic")
    recorder.runner = make(tokens=280, slots=8, max_total_num_tokens=400)
    bench_args = types.SimpleNamespace(run_name="cfg", output_len=(4,))
    latency.search_max_batch(recorder, one_batch, bench_args, 96, 0)
    records = processes.read_jsonl(out)
    assert [(r["kind"], r["batch_size"], r["status"]) for r in records] == [
        ("max_batch", 4, "failed"), ("max_batch", 3, "failed"), ("max_batch", 2, "ok")
    ]  # fmt: skip
    assert records[0]["error"].startswith("KV slot allocation failed"), records[0]["error"]
    assert records[2]["median_decode_latency"] > 0
    assert latency.max_batch_point(latency.config_record(records, 0))["batch_size"] == 2


def test_chunked_extend_keeps_missing_logits_missing():
    def extend(self, reqs):
        return torch.ones(len(reqs), dtype=torch.int64), None, FakeBatch(reqs)

    reqs = [types.SimpleNamespace(origin_input_ids=[0] * 60) for _ in range(3)]
    ids, logits, batch = latency.chunked_extend(extend, limit=100)(None, reqs)
    assert ids.tolist() == [1, 1, 1] and logits is None and batch.reqs == reqs


def test_instance_overrides_put_everything_back():
    class Thing:
        def forward(self):
            return "class"

    thing = Thing()
    thing.sample = "own"
    with latency.instance_overrides(thing, forward=lambda: "stand-in", sample="other"):
        assert thing.forward() == "stand-in" and thing.sample == "other"
    assert thing.forward() == "class" and vars(thing) == {"sample": "own"}
    with pytest.raises(ValueError), latency.instance_overrides(thing, forward=None):
        raise ValueError
    assert thing.forward() == "class"


# ---------------------------------------------------------------------------- limits, progress, partial results


def _point(batch, context, status="ok", latency_s=0.01):
    return {"batch_size": batch, "input_len": context, "status": status, "median_decode_latency": latency_s}


def test_merge_record_keeps_earlier_points_the_new_run_lacks():
    old = {"status": "timeout", "started": "t0", "elapsed_s": 1, "command": "c0",
           "pool": {"max_total_num_tokens": 9}, "points": [_point(1, 16), _point(8, 16, latency_s=0.5)],
           "max_batch": [_point(30, 100)]}  # fmt: skip
    new = {"status": "ok", "started": "t1", "pool": None, "points": [_point(8, 16, latency_s=0.2), _point(32, 16)],
           "max_batch": []}  # fmt: skip
    merged = latency.merge_record(old, new)
    assert [(p["batch_size"], p["median_decode_latency"]) for p in merged["points"]] == [
        (1, 0.01), (8, 0.2), (32, 0.01)
    ]  # fmt: skip
    assert merged["status"] == "ok" and merged["pool"] == {"max_total_num_tokens": 9}
    assert merged["max_batch"] == old["max_batch"]
    assert merged["earlier_runs"] == [{"status": "timeout", "started": "t0", "elapsed_s": 1, "command": "c0"}]
    assert latency.merge_record(None, new) is new


def test_progress_lines():
    line = latency.progress_line
    assert line("oscar", {"kind": "pool", "max_total_num_tokens": 5, "request_slots": 2}) == (
        "   oscar: KV pool 5 tokens, 2 request slots"
    )
    assert line("oscar", {"kind": "point", **_point(8, 100000, latency_s=0.01234)}) == (
        "   oscar: point 8 x 100000: 12.34 ms/step (median)"
    )
    skipped = {"kind": "point", "batch_size": 32, "input_len": 100000, "status": "skipped", "reason": "KV pool holds 18"}
    assert line("bf16", skipped) == "   bf16: point 32 x 100000: skipped: KV pool holds 18"
    assert line("x", {"kind": "max_batch", "input_len": 9, "status": "skipped"}) == "   x: max_batch - x 9: skipped"


# A stand-in launcher: writes the pool line and two points, then (optionally) hangs.
FAKE_LAUNCHER = """
import json, sys, time
out, hang = sys.argv[1], sys.argv[2] == "hang"
lines = [{"kind": "pool", "max_total_num_tokens": 1000, "request_slots": 111},
         {"kind": "warmup", "batch_size": 1, "input_len": 16, "output_len": 4, "status": "ok", "median_decode_latency": 0.5},
         {"kind": "point", "batch_size": 1, "input_len": 16, "output_len": 4, "status": "ok", "median_decode_latency": 0.01},
         {"kind": "point", "batch_size": 8, "input_len": 16, "output_len": 4, "status": "ok", "median_decode_latency": 0.02}]
for line in lines:
    with open(out, "a") as f:
        f.write(json.dumps(line) + "\\n")
    time.sleep(0.3)
if hang:
    time.sleep(60)
"""


def _fake_launcher(monkeypatch, mode):
    monkeypatch.setattr(
        latency, "launcher_command",
        lambda config, args, model_path, out: [sys.executable, "-c", FAKE_LAUNCHER, str(out), mode],
    )  # fmt: skip
    monkeypatch.setattr(latency, "POLL_S", 0.2)
    monkeypatch.setattr(latency, "raise_keyboard_interrupt_on_sigterm", lambda: None)  # keep pytest's handler


def test_latency_run_prints_points_and_keeps_them_on_timeout(tmp_path, monkeypatch, capsys):
    _fake_launcher(monkeypatch, "hang")
    res = tmp_path / "res"
    argv = ["--model-path", str(tmp_path), "--results-dir", str(res), "--configs", "oscar",
            "--batches", "1,8", "--contexts", "16", "--timeout", "4"]  # fmt: skip
    start = time.monotonic()
    assert latency.main(argv) == 1
    assert time.monotonic() - start < 30
    out = capsys.readouterr().out
    assert "   oscar: KV pool 1000 tokens, 111 request slots" in out
    assert "   oscar: point 8 x 16: 20.00 ms/step (median)" in out
    assert "== oscar: timeout" in out
    doc = json.loads((res / "latency.json").read_text())
    record = doc["configs"]["oscar"]
    assert record["status"] == "timeout" and [p["batch_size"] for p in record["points"]] == [1, 8]
    assert record["kv_flags"] == ["--kv-quant", "oscar", "--oscar-rotations", "data-free"]
    assert record["cuda_graph_bs"] == [1, 8]
    assert doc["settings"]["prefill"] == "synthetic" and doc["grid"] == {"batches": [1, 8], "contexts": [16]}
    md = (res / "latency.md").read_text()
    assert "Prefill: synthetic" in md and "| 8 x 16 | 20.0 |" in md


def test_latency_partial_results_are_written_while_a_config_runs(tmp_path, monkeypatch):
    _fake_launcher(monkeypatch, "hang")
    args = latency.build_parser().parse_args(["--configs", "oscar"])
    seen = []

    def on_progress(record):
        seen.append((record["status"], len(record["points"])))
        if len(record["points"]) == 2:
            raise KeyboardInterrupt  # as SIGTERM to the driver would
    record = latency.run_config("oscar", args, MODEL, tmp_path, timeout=30, on_progress=on_progress)
    assert seen[-1] == ("running", 2) and all(status == "running" for status, _ in seen)
    assert record["status"] == "interrupted" and len(record["points"]) == 2
    assert record["elapsed_s"] < 20  # the launcher was stopped, not waited for


def test_latency_runs_merge_point_by_point(tmp_path, monkeypatch):
    _fake_launcher(monkeypatch, "exit")
    res = tmp_path / "res"
    base = ["--model-path", str(tmp_path), "--results-dir", str(res), "--contexts", "16"]
    assert latency.main([*base, "--configs", "oscar", "--batches", "1,8"]) == 0
    assert latency.main([*base, "--configs", "fp8-flashinfer", "--batches", "32"]) == 0
    doc = json.loads((res / "latency.json").read_text())
    assert doc["grid"] == {"batches": [1, 8, 32], "contexts": [16]}
    assert set(doc["configs"]) == {"oscar", "fp8-flashinfer"}
    md = (res / "latency.md").read_text()
    assert "| 1 x 16 | 10.0 | 10.0 | 1.00x |" in md and "| 32 x 16 | — | — | — |" in md
    assert "oscar / fp8-flashinfer: KV pool tokens 1.00x" in md


def test_latency_budget_spent_leaves_configs_unstarted(tmp_path, monkeypatch, capsys):
    _fake_launcher(monkeypatch, "exit")
    argv = ["--model-path", str(tmp_path), "--results-dir", str(tmp_path / "res"), "--budget", "10"]
    assert latency.main(argv) == 1
    assert capsys.readouterr().out.count("not started, the --budget is spent") == 4
