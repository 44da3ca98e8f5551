"""CPU tests of benchmarks/serving.py, benchmarks/latency.py and benchmarks/common.py.

Nothing here starts an SGLang server or touches a GPU (stand-in processes play server, client
and one-batch launcher): flags, commands, log parsing (on lines in the formats SGLang 0.5.17
writes), the one-batch launcher's bookkeeping, time limits, progress lines, partial and merged
results files and tables. The synthetic prefill runs through SGLang's real bench_one_batch code
(extend, decode, latency_test_run_once), ScheduleBatch and pools on the CPU, with stand-ins for
the model forward and the sampler only.
"""

import dataclasses
import json
import lzma
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

# `benchmarks` lives at the repository root, which `python -m pytest` puts on sys.path; appended
# (never prepended: the root also holds kernels/, a name an installed package uses) for plain pytest.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks import common, latency, serving  # noqa: E402

MODEL = Path("/models/qwen3-8b-dummy")
GPU = {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}


def _without(cmd, flags):
    """`cmd` with the first occurrence of the contiguous sub-list `flags` removed."""
    for i in range(len(cmd) - len(flags) + 1):
        if cmd[i : i + len(flags)] == flags:
            return cmd[:i] + cmd[i + len(flags) :]
    raise AssertionError(f"{flags} not in {cmd}")


def _value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


# ---------------------------------------------------------------------------- arguments


def test_serving_defaults():
    args = serving.build_parser().parse_args([])
    assert args.configs == ["bf16-flashinfer", "fp8-flashinfer", "fp8-triton", "oscar"]
    assert (args.num_groups, args.prompts_per_group) == (4, 16)
    assert (args.system_prompt_len, args.question_len, args.output_len) == (32768, 1024, 512)
    assert args.mem_fraction_static == 0.80 and args.timeout == 300.0
    assert args.budget is None and args.oscar_args == []
    assert (args.tp_size, args.dp_size) == (1, 1)
    assert serving.concurrency(args) == 64
    assert serving.concurrency(serving.build_parser().parse_args(["--max-concurrency", "8"])) == 8


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


def test_int_lists_are_sorted_and_unique():
    assert common.parse_int_list("32, 1,8,1") == [1, 8, 32]


def test_configs_keep_their_order():
    assert common.parse_configs(" oscar ,fp8-flashinfer") == ["oscar", "fp8-flashinfer"]


# ---------------------------------------------------------------------------- commands


def test_kv_flags():
    assert common.kv_flags("bf16-flashinfer") == ["--attention-backend", "flashinfer"]
    assert common.kv_flags("fp8-flashinfer") == [
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--attention-backend",
        "flashinfer",
    ]
    assert common.kv_flags("fp8-triton") == ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "triton"]
    # without an artifact, the data-free rotations knowingly (dummy weights: quality is moot)
    assert common.kv_flags("oscar") == ["--kv-quant", "oscar", "--oscar-rotations", "data-free"]
    rotations = Path("r.safetensors")
    assert common.kv_flags("oscar", rotations) == [
        "--kv-quant",
        "oscar",
        "--oscar-rotations",
        "r.safetensors",
    ]
    assert common.kv_flags("fp8-triton", rotations) == common.kv_flags("fp8-triton")
    extra = ["--oscar-window-fraction", "0.3"]
    assert common.kv_flags("oscar", None, extra) == [
        "--kv-quant", "oscar", "--oscar-rotations", "data-free", *extra
    ]  # fmt: skip
    assert common.kv_flags("fp8-flashinfer", rotations, extra) == common.kv_flags("fp8-flashinfer")


def test_oscar_args_reach_the_oscar_server_only(tmp_path):
    args = serving.build_parser().parse_args(["--oscar-args", "--oscar-window-fraction 0.3"])
    assert args.oscar_args == ["--oscar-window-fraction", "0.3"]
    assert serving.server_command("oscar", args, MODEL, 1)[-6:] == [
        "--kv-quant", "oscar", "--oscar-rotations", "data-free", "--oscar-window-fraction", "0.3"
    ]  # fmt: skip
    assert "--oscar-window-fraction" not in serving.server_command("fp8-flashinfer", args, MODEL, 1)
    args = latency.build_parser().parse_args(["--oscar-args=--oscar-window-fraction 0.3"])
    cmd = latency.launcher_command("oscar", args, MODEL, "/out/oscar.jsonl")
    assert _value(cmd, "--oscar-window-fraction") == "0.3"
    assert "--oscar-window-fraction" not in latency.launcher_command("fp8-triton", args, MODEL, "/o")


def test_server_commands_differ_only_in_the_kv_option(tmp_path):
    rotations = tmp_path / "r.safetensors"
    rotations.write_bytes(b"")
    args = serving.build_parser().parse_args(["--oscar-rotations", str(rotations)])
    commands = {c: serving.server_command(c, args, MODEL, 30001) for c in common.KV_CONFIGS}
    stripped = {c: _without(cmd, common.kv_flags(c, args.oscar_rotations)) for c, cmd in commands.items()}
    assert len({tuple(cmd) for cmd in stripped.values()}) == 1
    base = stripped["oscar"]
    assert base[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert _value(base, "--model-path") == str(MODEL) and _value(base, "--load-format") == "dummy"
    assert _value(base, "--port") == "30001" and _value(base, "--mem-fraction-static") == "0.8"
    assert _value(base, "--cuda-graph-backend-prefill") == "disabled"
    # one running slot above the client's 64 in flight: a request in chunked prefill holds one
    assert _value(base, "--cuda-graph-max-bs-decode") == "65" and _value(base, "--max-running-requests") == "65"
    assert commands["oscar"][-4:] == ["--kv-quant", "oscar", "--oscar-rotations", str(rotations)]


def test_parallel_flags_reach_every_server_alike():
    default = serving.build_parser().parse_args([])
    args = serving.build_parser().parse_args(["--tp-size", "2", "--dp-size", "4"])
    for config in common.KV_CONFIGS:
        plain = serving.server_command(config, default, MODEL, 30001)
        assert "--tp-size" not in plain and "--dp-size" not in plain  # one GPU: unchanged
        cmd = serving.server_command(config, args, MODEL, 30001)
        assert _without(cmd, ["--tp-size", "2", "--dp-size", "4"]) == plain
        # before the KV flags, so they stay last (and --oscar-args can still override)
        kv = common.kv_flags(config)
        assert cmd[-len(kv) - 4 :] == ["--tp-size", "2", "--dp-size", "4", *kv]
    assert serving.server_flags(serving.build_parser().parse_args(["--dp-size", "2"])) == ["--dp-size", "2"]
    # the client is the same whatever the server's parallelism
    assert serving.bench_command(args, MODEL, 1, "/o") == serving.bench_command(default, MODEL, 1, "/o")


def test_parallel_sizes_are_recorded_and_name_the_results():
    default = serving.build_parser().parse_args([])
    assert "tp_size" not in serving.settings(default, MODEL)  # old results files keep matching
    assert serving.default_name(default) == "serving-sp32768"
    args = serving.build_parser().parse_args(["--dp-size", "2", "--system-prompt-len", "4096"])
    recorded = serving.settings(args, MODEL)
    assert (recorded["tp_size"], recorded["dp_size"]) == (1, 2)
    assert serving.default_name(args) == "serving-sp4096-dp2"
    args = serving.build_parser().parse_args(["--tp-size", "2", "--dp-size", "2"])
    assert serving.default_name(args) == "serving-sp32768-tp2-dp2"
    doc = {"settings": serving.settings(args, MODEL), "configs": {}}
    assert "Every server: `--tp-size 2` `--dp-size 2`; KV pool tokens" in serving.notes(doc)
    assert "Every server" not in serving.notes({"settings": serving.settings(default, MODEL), "configs": {}})


def test_tokenizer_workers_reach_every_server_alike_and_are_recorded():
    default = serving.build_parser().parse_args([])
    args = serving.build_parser().parse_args(["--tokenizer-worker-num", "8"])
    for config in common.KV_CONFIGS:
        plain = serving.server_command(config, default, MODEL, 30001)
        assert "--tokenizer-worker-num" not in plain  # SGLang's default: commands unchanged
        assert _without(serving.server_command(config, args, MODEL, 30001), ["--tokenizer-worker-num", "8"]) == plain
    assert "tokenizer_worker_num" not in serving.settings(default, MODEL)
    assert serving.settings(args, MODEL)["tokenizer_worker_num"] == 8
    assert serving.default_name(args) == "serving-sp32768-tok8"
    assert "Every server: `--tokenizer-worker-num 8`." in serving.notes(
        {"settings": serving.settings(args, MODEL), "configs": {}})


@pytest.mark.parametrize("flag", ["--tp-size", "--dp-size", "--tokenizer-worker-num"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_parallel_sizes_must_be_positive_integers(flag, value):
    with pytest.raises(SystemExit):
        serving.build_parser().parse_args([flag, value])


def test_bench_command_uses_the_shared_prefix_workload():
    args = serving.build_parser().parse_args(["--num-groups", "2", "--system-prompt-len", "100000"])
    cmd = serving.bench_command(args, MODEL, 30001, "/out/x.jsonl")
    assert cmd[:3] == [sys.executable, "-m", "sglang.benchmark.serving"]
    expected = {
        "--backend": "sglang",
        "--port": "30001",
        "--tokenizer": str(MODEL),
        "--dataset-name": "generated-shared-prefix",
        "--gsp-num-groups": "2",
        "--gsp-prompts-per-group": "16",
        "--gsp-system-prompt-len": "100000",
        "--gsp-question-len": "1024",
        "--gsp-output-len": "512",
        "--request-rate": "inf",
        "--max-concurrency": "32",
        "--output-file": "/out/x.jsonl",
    }
    assert {flag: _value(cmd, flag) for flag in expected} == expected
    assert "--cache-report" in cmd and "--flush-cache" in cmd


def test_launcher_commands_differ_only_in_the_kv_option_and_names():
    args = latency.build_parser().parse_args(
        ["--batches", "1,8", "--contexts", "100000", "--max-batch-search"]
    )
    stripped = set()
    for config in common.KV_CONFIGS:
        cmd = latency.launcher_command(config, args, MODEL, f"/out/{config}.jsonl")
        assert (
            _value(cmd, "--run-name") == config and _value(cmd, "--result-filename") == f"/out/{config}.jsonl"
        )
        cmd = _without(cmd, common.kv_flags(config))
        for flag in ("--run-name", "--result-filename"):
            cmd = _without(cmd, [flag, _value(cmd, flag)])
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
    assert _without(sglang_argv, ["--batch-size", "1", "8"]) != sglang_argv
    assert _without(sglang_argv, ["--cuda-graph-bs-decode", "1", "8"]) != sglang_argv
    assert _value(sglang_argv, "--input-len") == "100000"
    assert _value(sglang_argv, "--output-len") == "33"
    assert _value(sglang_argv, "--mem-fraction-static") == "0.7"


def test_launcher_options():
    own, rest = latency.split_launcher_argv(["--prefill-chunk-tokens", "8", "--", "--model-path", "m"])
    assert rest == ["--model-path", "m"]
    options = latency.launcher_parser().parse_args(own)
    assert (options.prefill_chunk_tokens, options.max_batch_context) == (8, None)
    assert options.prefill == "synthetic"
    assert latency.launcher_parser().parse_args(["--prefill", "model"]).prefill == "model"
    assert latency.split_launcher_argv(["--model-path", "m"]) == ([], ["--model-path", "m"])


# ---------------------------------------------------------------------------- server log

# Lines in the formats of sglang 0.5.17: server_args dump (launch), scheduler.py (pool line),
# memory_pool.py (allocation), metrics_reporter.py (prefill / decode batches, with and without
# the TP prefix and forward-iteration counter).
SERVER_LOG = """\
[2026-11-23 10:00:00] server_args=ServerArgs(model_path='/m', max_running_requests=None, max_total_tokens=None)
[2026-11-23 10:00:20 TP0] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 412345, K size: 28.31 GB, V size: 28.31 GB
[2026-11-23 10:00:40 TP0] max_total_num_tokens=412345, chunked_prefill_size=8192, max_prefill_tokens=16384, max_running_requests=2048, context_len=131072, available_gpu_mem=12.34 GB
[2026-11-23 10:01:00 TP0] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.02, #running-req: 0, #queue-req: 63, #pending-token: 0, cuda graph: False, input throughput (token/s): 0.00
[2026-11-23 10:01:02 TP0] Prefill batch, #new-seq: 8, #new-token: 8192, #cached-token: 262144, token usage: 0.10, #running-req: 5, #queue-req: 50, #pending-token: 0, cuda graph: False, input throughput (token/s): 4096.00
[2026-11-23 10:01:09 TP0] Decode batch, #running-req: 64, #token: 123456, token usage: 0.30, cuda graph: True, gen throughput (token/s): 2345.67, #queue-req: 0
[2026-11-23 10:01:10] Decode batch [1234], #running-req: 60, #token: 120000, token usage: 0.29, cuda graph: True, gen throughput (token/s): 2300.00, #queue-req: 0
"""


def test_parse_server_log():
    stats = serving.parse_server_log(SERVER_LOG)
    assert stats["max_total_num_tokens"] == 412345
    assert stats["max_running_requests"] == 2048
    assert stats["peak_running_requests"] == 64
    assert stats["peak_decode_tok_s"] == 2345.67
    assert stats["cached_tokens"] == 262144
    assert stats["new_tokens"] == 16384
    assert stats["kv_cache_gb"] == pytest.approx(56.62)


# --dp-size 2: every DP worker prints its own pool line and batch lines.
DP_SERVER_LOG = """\
[2026-11-23 10:00:40 DP0] max_total_num_tokens=700000, chunked_prefill_size=8192, max_prefill_tokens=16384, max_running_requests=64, context_len=131072, available_gpu_mem=12.34 GB
[2026-11-23 10:00:41 DP1] max_total_num_tokens=700016, chunked_prefill_size=8192, max_prefill_tokens=16384, max_running_requests=64, context_len=131072, available_gpu_mem=12.30 GB
[2026-11-23 10:01:00 DP0] Prefill batch, #new-seq: 1, #new-token: 4096, #cached-token: 0, token usage: 0.02, #running-req: 0, #queue-req: 31, #pending-token: 0, cuda graph: False, input throughput (token/s): 0.00
[2026-11-23 10:01:00 DP1] Prefill batch, #new-seq: 2, #new-token: 4096, #cached-token: 4096, token usage: 0.02, #running-req: 1, #queue-req: 30, #pending-token: 0, cuda graph: False, input throughput (token/s): 0.00
[2026-11-23 10:01:09 DP0] Decode batch, #running-req: 32, #token: 123456, token usage: 0.30, cuda graph: True, gen throughput (token/s): 2345.67, #queue-req: 0
[2026-11-23 10:01:09 DP1] Decode batch, #running-req: 30, #token: 120000, token usage: 0.29, cuda graph: True, gen throughput (token/s): 2300.00, #queue-req: 0
[2026-11-23 10:01:19 DP1] Decode batch, #running-req: 31, #token: 120000, token usage: 0.29, cuda graph: True, gen throughput (token/s): 2300.00, #queue-req: 0
"""


def test_parse_server_log_sums_the_dp_workers():
    stats = serving.parse_server_log(DP_SERVER_LOG)
    assert stats["dp_workers"] == 2
    assert stats["max_total_num_tokens"] == 1_400_016 and stats["max_running_requests"] == 128
    assert stats["peak_running_requests"] == 32 + 31  # each worker's own peak
    assert stats["peak_decode_tok_s"] == pytest.approx(2345.67 + 2300.0)
    assert stats["cached_tokens"] == 4096 and stats["new_tokens"] == 8192
    assert serving.dp_worker("[2026-11-23 10:00:40 DP1 TP0] x") == 1
    assert serving.dp_worker("[2026-11-23 10:00:40 TP1] x #running-req: DP3") is None
    assert "dp_workers" not in serving.parse_server_log(SERVER_LOG)  # one worker: as before


def test_parse_server_log_single_kv_size_and_empty():
    line = "[t] Post-capture KV sizing: KV cache allocated. dtype: torch.uint8, #tokens: 9, KV size: 7.50 GB, avail mem=1.00 GB"
    assert serving.parse_server_log(line)["kv_cache_gb"] == 7.5
    assert serving.parse_server_log("") == {
        "peak_running_requests": None,
        "cached_tokens": None,
        "new_tokens": None,
    }


def test_serving_metrics_from_client_result_and_log():
    bench = {
        "output_throughput": 2000.0,
        "request_throughput": 3.5,
        "median_ttft_ms": 100.0,
        "p99_ttft_ms": 900.0,
        "median_itl_ms": 20.0,
        "p99_itl_ms": 60.0,
        "completed": 64,
        "cache_report": {"total_cached_tokens": 1_900_000, "cache_hit_rate_pct": 90.1},
    }
    metrics = serving.serving_metrics(bench, serving.parse_server_log(SERVER_LOG))
    assert metrics["output_tok_s"] == 2000.0 and metrics["requests_s"] == 3.5
    assert (metrics["ttft_p50_ms"], metrics["ttft_p99_ms"]) == (100.0, 900.0)
    assert (metrics["itl_p50_ms"], metrics["itl_p99_ms"]) == (20.0, 60.0)
    assert metrics["kv_pool_tokens"] == 412345 and metrics["peak_running_requests"] == 64
    assert metrics["peak_decode_tok_s"] == 2345.67
    assert metrics["cached_tokens"] == 1_900_000 and metrics["server_cached_tokens"] == 262144
    assert serving.serving_metrics({}, {})["output_tok_s"] is None


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
    records = common.read_jsonl(out)
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


def test_merge_results_keeps_matching_runs_only(tmp_path):
    path = tmp_path / "r.json"
    doc = common.merge_results(path, "latency", {"a": 1}, GPU, {"oscar": {"status": "ok"}})
    common.write_json(path, doc)
    merged = common.merge_results(path, "latency", {"a": 1}, GPU, {"fp8-triton": {"status": "ok"}})
    assert set(merged["configs"]) == {"oscar", "fp8-triton"}
    assert set(common.merge_results(path, "latency", {"a": 2}, GPU, {"x": {}})["configs"]) == {"x"}
    h200 = {"gpus": [{"name": "NVIDIA H200"}]}
    assert set(common.merge_results(path, "latency", {"a": 1}, h200, {"x": {}})["configs"]) == {"x"}
    assert json.loads(path.read_text())["settings"] == {"a": 1}


def test_markdown_table_formatting():
    table = common.markdown_table(["a", "b", "c", "d"], [["x", 1.234, None, 7]])
    assert table.splitlines() == ["| a | b | c | d |", "|---|---|---|---|", "| x | 1.2 | — | 7 |"]
    assert common.ratio(1.0, 0) is None and common.ratio(None, 2.0) is None and common.ratio(1.0, 4.0) == 0.25


def _serving_record(status, **metrics):
    return {"status": status, "metrics": metrics}


def test_serving_table_has_the_oscar_ratio_row():
    doc = {
        "configs": {
            "oscar": _serving_record("ok", output_tok_s=3000.0, kv_pool_tokens=2_000_000),
            "fp8-flashinfer": _serving_record("ok", output_tok_s=1500.0, kv_pool_tokens=500_000),
            "fp8-triton": _serving_record("failed"),
        }
    }
    lines = serving.table(doc).splitlines()
    assert lines[0].startswith("| config | output tok/s | peak decode tok/s | req/s | TTFT p50 ms")
    assert lines[2].startswith("| fp8-flashinfer | 1500.0 |")  # canonical order, not insertion order
    assert lines[3].startswith("| fp8-triton (failed) | — |")
    assert lines[5].startswith("| oscar / fp8-flashinfer | 2.00x | — | — |")
    assert "| 4.00x |" in lines[5]


# A run cut off by its limit (sglang 0.5.17 formats): the client's warm-up request, its cache
# flush, the measured run's requests, and batches until the server was stopped.
CUT_OFF_LOG = """\
[2026-12-02 15:50:20] INFO:     127.0.0.1:1 - "POST /generate HTTP/1.1" 200 OK
[2026-12-02 15:50:29] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.06, #running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 499.65
[2026-12-02 15:50:43] Cache flushed successfully!
[2026-12-02 15:50:43] INFO:     127.0.0.1:2 - "POST /flush_cache HTTP/1.1" 200 OK
[2026-12-02 15:50:44 DP0] INFO:     127.0.0.1:3 - "POST /generate HTTP/1.1" 200 OK
[2026-12-02 15:50:45] INFO:     127.0.0.1:4 - "POST /generate HTTP/1.1" 200 OK
[2026-12-02 15:51:13] Decode batch, #running-req: 2, #token: 215352, token usage: 0.74, cuda graph: True, gen throughput (token/s): 165.98, #queue-req: 62
[2026-12-02 15:56:44] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.34, #running-req: 1, #queue-req: 25, #pending-token: 0, cuda graph: False, input throughput (token/s): 4424.14
[2026-12-02 15:56:48] INFO:     Stopping parent process [4726]
"""


def test_measured_run_at_least_counts_from_the_first_request_after_the_flush():
    # 15:50:44 (first request after the flush) + 1 s -> 15:56:44 (last batch)
    assert serving.measured_run_at_least_s(CUT_OFF_LOG) == 359.0
    no_flush = "".join(line + "\n" for line in CUT_OFF_LOG.splitlines() if "flush" not in line)
    assert serving.measured_run_at_least_s(no_flush) is None
    no_batch_after = "".join(line + "\n" for line in CUT_OFF_LOG.splitlines()[:6])
    assert serving.measured_run_at_least_s(no_batch_after) is None
    assert serving.log_time("[2026-12-02 15:50:44 DP0 TP0] x").second == 44
    assert serving.log_time("Stopping") is None


def test_cut_off_run_gets_an_output_bound_and_a_bounded_ratio():
    args = serving.build_parser().parse_args(["--num-groups", "4", "--prompts-per-group", "16"])
    bound = serving.output_tok_s_at_most(args, CUT_OFF_LOG)
    assert bound == round(64 * 512 / 359.0, 1)
    assert serving.output_tok_s_at_most(args, "") is None
    doc = {
        "configs": {
            "oscar": _serving_record("ok", output_tok_s=443.1, kv_pool_tokens=920_853),
            "fp8-flashinfer": _serving_record("timeout", output_tok_s_at_most=bound, kv_pool_tokens=292_782),
        }
    }
    lines = serving.table(doc).splitlines()
    assert lines[2].startswith(f"| fp8-flashinfer (timeout) | < {bound:.1f} | — |")
    assert lines[4].startswith(f"| oscar / fp8-flashinfer | > {443.1 / bound:.2f}x | — |")
    assert "| 3.15x |" in lines[4]  # other columns keep plain ratios
    doc["configs"]["oscar"] = _serving_record("timeout", output_tok_s_at_most=100.0)
    doc["configs"]["fp8-flashinfer"] = _serving_record("ok", output_tok_s=50.0)
    assert serving.table(doc).splitlines()[4].startswith("| oscar / fp8-flashinfer | < 2.00x |")


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
        "configs": {"oscar": _serving_record("ok", output_tok_s=3000.0), "fp8-flashinfer": _serving_record("failed")},
    }  # fmt: skip
    assert serving.plot(doc, tmp_path / "serving.png")
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "serving.png").stat().st_size > 0


def test_serving_plot_shows_a_cut_off_run_by_its_bound(monkeypatch):
    drawn = {}
    monkeypatch.setattr(serving, "plot_panels", lambda path, title, panels: drawn.setdefault("panels", panels))
    doc = {
        "settings": {"model": "m", "num_groups": 4, "prompts_per_group": 16, "system_prompt_len": 100000,
                     "question_len": 1024, "output_len": 512},
        "configs": {"oscar": _serving_record("ok", output_tok_s=443.1, requests_s=0.9),
                    "fp8-flashinfer": _serving_record("timeout", output_tok_s_at_most=91.3)},
    }  # fmt: skip
    serving.plot(doc, "unused.png")
    output, requests = drawn["panels"][0], drawn["panels"][2]
    assert output["title"] == "output tok/s (cut-off runs: upper bound)"
    assert output["series"] == {"fp8-flashinfer (timeout)": [91.3], "oscar": [443.1]}
    assert requests["title"] == "req/s" and requests["series"]["fp8-flashinfer (timeout)"] == [None]


# ---------------------------------------------------------------------------- model folder, processes


def test_prepare_model_dir_decompresses_the_tokenizer(tmp_path):
    shared = tmp_path / "models"
    (shared / "qwen3-8b").mkdir(parents=True)
    (shared / "qwen3-8b" / "config.json").write_text('{"model_type": "qwen3"}')
    (shared / "qwen-tokenizer").mkdir()
    (shared / "qwen-tokenizer" / "tokenizer_config.json").write_text("{}")
    (shared / "qwen-tokenizer" / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"model": {}}'))
    assert common.find_shared_models(shared) == shared
    folder = common.prepare_model_dir(shared, tmp_path / "work")
    assert folder == tmp_path / "work" / "qwen3-8b-dummy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "tokenizer.json").read_text() == '{"model": {}}'
    assert common.prepare_model_dir(shared, tmp_path / "work") == folder  # idempotent
    with pytest.raises(FileNotFoundError):
        common.find_shared_models(tmp_path / "nothing")


def test_managed_process_stops_the_whole_group(tmp_path):
    start = time.monotonic()
    with common.managed_process(["bash", "-c", "sleep 60 & sleep 60 & wait"], tmp_path / "p.log") as proc:
        time.sleep(0.3)
        assert len(common.group_members(proc.pid)) >= 3
    assert common.group_members(proc.pid) == []
    assert time.monotonic() - start < 10


def test_run_logged_times_out_and_reports_exit_codes(tmp_path):
    assert common.run_logged(["bash", "-c", "echo hi; exit 3"], tmp_path / "a.log", 30) == 3
    assert (tmp_path / "a.log").read_text() == "hi\n"
    assert common.run_logged(["sleep", "30"], tmp_path / "b.log", 1) is None


def test_wait_for_http_ok_fails_fast_when_the_server_dies(tmp_path):
    proc = subprocess.Popen(["bash", "-c", "exit 2"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with code 2"):
        common.wait_for_http_ok(f"http://127.0.0.1:{common.free_port()}/health", proc, 30)


# ---------------------------------------------------------------------------- drivers, with stand-ins

# Stand-ins for launch_server (prints a log, answers /health), the serving client (writes a
# result line like sglang.benchmark.serving) and the one-batch launcher (writes its JSON lines).
FAKE_SERVER = """
import http.server, sys
print(sys.argv[2], flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""
FAKE_CLIENT = "import json, sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
CLIENT_RESULT = {
    "completed": 64,
    "output_throughput": 2000.0,
    "request_throughput": 3.5,
    "median_ttft_ms": 100.0,
    "p99_ttft_ms": 900.0,
    "median_itl_ms": 20.0,
    "p99_itl_ms": 60.0,
    "server_info": {"big": "dropped"},
}


def _fake_serving(monkeypatch, client_result=CLIENT_RESULT, server_code=FAKE_SERVER):
    monkeypatch.setattr(serving, "prepare_workload", lambda args, model_path: [])
    monkeypatch.setattr(
        serving,
        "server_command",
        lambda config, args, model_path, port: [sys.executable, "-c", server_code, str(port), SERVER_LOG],
    )
    monkeypatch.setattr(
        serving,
        "bench_command",
        lambda args, model_path, port, out: [
            sys.executable,
            "-c",
            FAKE_CLIENT,
            str(out),
            json.dumps(client_result),
        ],
    )


def test_serving_main_runs_each_config_and_writes_results(tmp_path, monkeypatch):
    _fake_serving(monkeypatch)
    monkeypatch.setattr(serving, "raise_keyboard_interrupt_on_sigterm", lambda: None)  # keep pytest's handler
    argv = [
        "--model-path",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "res"),
        "--configs",
        "fp8-flashinfer,oscar",
    ]
    assert serving.main(argv) == 0
    doc = json.loads((tmp_path / "res" / "serving-sp32768.json").read_text())
    assert doc["benchmark"] == "serving" and doc["settings"]["system_prompt_len"] == 32768
    oscar = doc["configs"]["oscar"]
    assert oscar["status"] == "ok" and "server_info" not in oscar["bench"]
    assert oscar["metrics"]["output_tok_s"] == 2000.0 and oscar["metrics"]["kv_pool_tokens"] == 412345
    assert "| oscar / fp8-flashinfer | 1.00x |" in (tmp_path / "res" / "serving-sp32768.md").read_text()
    assert (tmp_path / "res" / "logs" / "serving-sp32768" / "oscar.server.log").is_file()


def test_serving_records_failures_and_incomplete_runs(tmp_path, monkeypatch):
    args = serving.build_parser().parse_args(["--timeout", "20"])
    _fake_serving(monkeypatch, client_result={**CLIENT_RESULT, "completed": 60})
    assert serving.run_config("oscar", args, MODEL, tmp_path)["status"] == "incomplete"
    _fake_serving(monkeypatch, server_code="import sys; print('boom'); sys.exit(1)")
    record = serving.run_config("oscar", args, MODEL, tmp_path)
    assert record["status"] == "failed" and "exited with code 1" in record["error"]
    assert "boom" in record["server_log_tail"]


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
    records = common.read_jsonl(out)
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


def test_children_die_with_the_benchmark(tmp_path):
    """A child of managed_process gets SIGTERM when the process that started it is killed."""
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from benchmarks import common\n"
        "with common.managed_process(['sleep', '60'], sys.argv[2]) as proc:\n"
        "    print(proc.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    driver = subprocess.Popen(
        [sys.executable, "-c", script, repo, str(tmp_path / "s.log")], stdout=subprocess.PIPE
    )
    child = int(driver.stdout.readline())
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 5
    while common.group_members(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert common.group_members(child) == []


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
    records = common.read_jsonl(out)
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
    records = common.read_jsonl(out)
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


def test_budget_cuts_each_configuration_to_what_is_left():
    now = [0.0]
    budget = common.Budget(300.0, 520.0, clock=lambda: now[0])
    assert budget.config_timeout() == 300.0
    now[0] = 200.0
    assert budget.config_timeout() == 520.0 - 200.0 - common.BUDGET_MARGIN_S
    now[0] = 520.0 - common.BUDGET_MARGIN_S - common.MIN_CONFIG_S + 1
    assert budget.config_timeout() is None
    assert common.Budget(300.0).config_timeout() == 300.0


def test_children_get_the_gpu_environment(tmp_path):
    script = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(common.GPU_ENV)!r}}}))"
    assert common.run_logged([sys.executable, "-c", script], tmp_path / "env.log", 30) == 0
    assert json.loads((tmp_path / "env.log").read_text()) == common.GPU_ENV


def test_load_compatible_and_merge_with_a_loaded_document(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert common.load_compatible(path, "latency", {"a": 1}, GPU) is None
    common.write_json(path, common.merge_results(path, "latency", {"a": 1}, GPU, {"x": {"n": 1}}))
    previous = common.load_compatible(path, "latency", {"a": 1}, GPU)
    assert previous["configs"] == {"x": {"n": 1}}
    doc = common.merge_results(path, "latency", {"a": 1}, GPU, {"y": {}}, previous=previous)
    assert set(doc["configs"]) == {"x", "y"}
    assert common.load_compatible(path, "latency", {"a": 2}, GPU) is None
    assert "replacing them" in capsys.readouterr().out
    assert set(common.merge_results(path, "latency", {"a": 1}, GPU, {"y": {}}, previous=None)["configs"]) == {"y"}


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


def test_serving_timeout_is_recorded_and_the_server_stopped(tmp_path, monkeypatch):
    silent = "import time; print('loading', flush=True); time.sleep(60)"  # never answers /health
    _fake_serving(monkeypatch, server_code=silent)
    args = serving.build_parser().parse_args([])
    start = time.monotonic()
    record = serving.run_config("oscar", args, MODEL, tmp_path, timeout=3)
    assert time.monotonic() - start < 20
    assert record["status"] == "timeout" and "did not answer within 3 s" in record["error"]
    assert "loading" in record["server_log_tail"] and record["timeout_s"] == 3
    assert record["metrics"]["output_tok_s_at_most"] is None  # the log shows no measured run


def test_serving_client_cut_off_by_the_limit_gets_the_bound_from_the_server_log(tmp_path, monkeypatch):
    _fake_serving(monkeypatch)
    monkeypatch.setattr(
        serving,
        "server_command",
        lambda config, args, model_path, port: [sys.executable, "-c", FAKE_SERVER, str(port), CUT_OFF_LOG],
    )
    monkeypatch.setattr(serving, "bench_command", lambda args, model_path, port, out: ["sleep", "60"])
    args = serving.build_parser().parse_args([])
    record = serving.run_config("fp8-flashinfer", args, MODEL, tmp_path, timeout=4)
    assert record["status"] == "timeout" and "benchmark client did not finish" in record["error"]
    assert record["metrics"]["output_tok_s_at_most"] == round(64 * 512 / 359.0, 1)


def test_serving_markdown_names_the_workload_and_flags(tmp_path, monkeypatch):
    _fake_serving(monkeypatch)
    monkeypatch.setattr(serving, "raise_keyboard_interrupt_on_sigterm", lambda: None)
    res = tmp_path / "res"
    argv = ["--model-path", str(tmp_path), "--results-dir", str(res), "--configs", "oscar,fp8-flashinfer",
            "--oscar-args", "--oscar-window-fraction 0.3"]  # fmt: skip
    assert serving.main(argv) == 0
    doc = json.loads((res / "serving-sp32768.json").read_text())
    assert doc["configs"]["oscar"]["kv_flags"] == [
        "--kv-quant", "oscar", "--oscar-rotations", "data-free", "--oscar-window-fraction", "0.3"
    ]  # fmt: skip
    assert doc["configs"]["oscar"]["metrics"]["max_running_requests"] == 2048
    md = (res / "serving-sp32768.md").read_text()
    assert "4 system prompts of 32768 tokens x 16 questions of 1024 tokens, 512 output tokens" in md
    assert "oscar: `--kv-quant oscar --oscar-rotations data-free --oscar-window-fraction 0.3`" in md
    header = next(line for line in md.splitlines() if line.startswith("| config |"))
    assert "| peak running req | running cap | KV pool tokens |" in header
    assert md.splitlines()[-1].startswith("| oscar / fp8-flashinfer | 1.00x |")


def test_prepare_workload_fills_the_cache_the_client_loads(tmp_path, monkeypatch):
    """The real dataset code of sglang.benchmark.serving, on the offline Qwen tokenizer: the
    prompts land in the cache file the client reads, with the requested lengths."""
    shared = pytest.importorskip("sglang.benchmark.datasets.generated_shared_prefix")
    from sglang.benchmark.utils import get_tokenizer

    try:
        model = common.prepare_model_dir(common.find_shared_models(None), tmp_path / "model")
    except FileNotFoundError:
        pytest.skip("no shared models folder (../shared/models)")
    monkeypatch.setenv("HOME", str(tmp_path))  # the client's cache lives under ~/.cache
    args = serving.build_parser().parse_args(
        ["--num-groups", "2", "--prompts-per-group", "3", "--system-prompt-len", "64",
         "--question-len", "16", "--output-len", "8"])  # fmt: skip
    rows = serving.prepare_workload(args, model)
    assert len(rows) == 6 and {row.output_len for row in rows} == {8}
    cache = shared.get_gen_prefix_cache_path(serving.CLIENT_SEED, 2, 3, 64, 16, 8, get_tokenizer(str(model)))
    assert cache.is_file() and cache.is_relative_to(tmp_path)
    assert [row.prompt for row in serving.prepare_workload(args, model)] == [row.prompt for row in rows]
