"""CPU tests of benchmarks/serving.py, benchmarks/latency.py and benchmarks/common.py.

Nothing here starts SGLang or touches a GPU (stand-in processes play server and client): flags, commands, log parsing (on lines in the
formats SGLang 0.5.17 writes), the one-batch launcher's bookkeeping, results files and tables.
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
    assert args.mem_fraction_static == 0.80 and args.timeout == 900.0
    assert serving.concurrency(args) == 64
    assert serving.concurrency(serving.build_parser().parse_args(["--max-concurrency", "8"])) == 8


def test_latency_defaults():
    args = latency.build_parser().parse_args([])
    assert args.configs == ["bf16-flashinfer", "fp8-flashinfer", "fp8-triton", "oscar"]
    assert args.batches == [1, 8, 32] and args.contexts == [16384, 32768, 100000]
    assert args.mem_fraction_static == 0.70 and args.decode_steps == 32
    assert not args.max_batch_search and args.max_batch_context == 100000


@pytest.mark.parametrize(
    "argv",
    [
        ["--configs", "fp16-magic"],
        ["--configs", "oscar,oscar"],
        ["--batches", "1,x"],
        ["--contexts", "0"],
        ["--decode-steps", "2"],
        ["--oscar-rotations", "/no/such/file.safetensors"],
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
    assert common.kv_flags("oscar") == ["--kv-quant", "oscar"]
    rotations = Path("r.safetensors")
    assert common.kv_flags("oscar", rotations) == [
        "--kv-quant",
        "oscar",
        "--oscar-rotations",
        "r.safetensors",
    ]
    assert common.kv_flags("fp8-triton", rotations) == common.kv_flags("fp8-triton")


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
    assert _value(base, "--cuda-graph-max-bs-decode") == "64"
    assert commands["oscar"][-4:] == ["--kv-quant", "oscar", "--oscar-rotations", str(rotations)]


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
    assert own == ["--prefill-chunk-tokens", "131072", "--max-batch-context", "100000"]
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
    assert stats["cached_tokens"] == 262144
    assert stats["new_tokens"] == 16384
    assert stats["kv_cache_gb"] == pytest.approx(56.62)


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
    assert metrics["cached_tokens"] == 1_900_000 and metrics["server_cached_tokens"] == 262144
    assert serving.serving_metrics({}, {})["output_tok_s"] is None


# ---------------------------------------------------------------------------- one-batch launcher


class FakeRunner:
    """The parts of bench_one_batch's _TorchBenchRunner the launcher uses."""

    def __init__(self, tokens, slots=2048):
        self.torch_runner = types.SimpleNamespace(
            max_total_num_tokens=tokens, req_to_token_pool=types.SimpleNamespace(size=slots)
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
    assert records[2]["reason"] == "KV pool and request slots hold 4"
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
    assert lines[0].startswith("| config | output tok/s | req/s | TTFT p50 ms")
    assert lines[2].startswith("| fp8-flashinfer | 1500.0 |")  # canonical order, not insertion order
    assert lines[3].startswith("| fp8-triton (failed) | — |")
    assert lines[5].startswith("| oscar / fp8-flashinfer | 2.00x | — |")
    assert "| 4.00x |" in lines[5]


def _latency_doc():
    def point(batch, context, status="ok", latency_s=None):
        p = {"batch_size": batch, "input_len": context, "status": status}
        if latency_s is not None:
            p.update(median_decode_latency=latency_s, median_decode_throughput=batch / latency_s)
        return p

    return {
        "settings": {
            "model": "qwen3-8b-dummy",
            "batches": [1, 8],
            "contexts": [100000],
            "max_batch_context": 100000,
        },
        "configs": {
            "fp8-flashinfer": {
                "status": "ok",
                "pool": {"max_total_num_tokens": 500_000, "request_slots": 2048},
                "points": [point(1, 100000, latency_s=0.012), point(8, 100000, "skipped")],
                "max_batch": [point(4, 100000, latency_s=0.03)],
            },
            "oscar": {
                "status": "ok",
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


def test_one_batch_launcher_loads_plugins_and_records_every_point(tmp_path, monkeypatch):
    runner = FakeRunner(tokens=3 * 110)  # three 100 + 10 token sequences fit
    one_batch, seen = _fake_sglang(monkeypatch, runner)
    out = tmp_path / "r.jsonl"
    argv = ["--prefill-chunk-tokens", "64", "--max-batch-context", "100", "--", "--model-path", "m", str(out)]
    assert latency.main(["one-batch", *argv]) == 0
    assert seen["argv"] == ["sglang.benchmark.one_batch", "--model-path", "m", str(out)]
    assert seen["plugins"] == 2  # launcher (before the parser) and worker (for spawned TP ranks)
    assert seen["stock_result_filename"] == ""  # the recorder writes the file, not stock latency_test
    assert one_batch.latency_test is latency.latency_worker
    assert one_batch._TorchBenchRunner.extend.__qualname__.startswith("chunked_extend")
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
