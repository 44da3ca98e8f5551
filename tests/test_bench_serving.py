"""CPU tests of benchmarks/serving.py. Nothing here starts an SGLang server or touches a GPU
(stand-in processes play server and client): flags, commands, server-log parsing (on lines in the
formats SGLang 0.5.17 writes), metrics, time limits and the bound of a cut-off run, results files,
tables and plots.
"""

import json
import sys
import time

import pytest

from bench_cases import MODEL, flag_value, serving_record, without
from benchmarks import cli_args, model_dirs, serving


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


# ---------------------------------------------------------------------------- commands


def test_server_commands_differ_only_in_the_kv_option(tmp_path):
    rotations = tmp_path / "r.safetensors"
    rotations.write_bytes(b"")
    args = serving.build_parser().parse_args(["--oscar-rotations", str(rotations)])
    commands = {c: serving.server_command(c, args, MODEL, 30001) for c in cli_args.KV_CONFIGS}
    stripped = {c: without(cmd, cli_args.kv_flags(c, args.oscar_rotations)) for c, cmd in commands.items()}
    assert len({tuple(cmd) for cmd in stripped.values()}) == 1
    base = stripped["oscar"]
    assert base[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert flag_value(base, "--model-path") == str(MODEL) and flag_value(base, "--load-format") == "dummy"
    assert flag_value(base, "--port") == "30001" and flag_value(base, "--mem-fraction-static") == "0.8"
    assert flag_value(base, "--cuda-graph-backend-prefill") == "disabled"
    # one running slot above the client's 64 in flight: a request in chunked prefill holds one
    assert flag_value(base, "--cuda-graph-max-bs-decode") == "65" and flag_value(base, "--max-running-requests") == "65"
    assert commands["oscar"][-4:] == ["--kv-quant", "oscar", "--oscar-rotations", str(rotations)]


def test_parallel_flags_reach_every_server_alike():
    default = serving.build_parser().parse_args([])
    args = serving.build_parser().parse_args(["--tp-size", "2", "--dp-size", "4"])
    for config in cli_args.KV_CONFIGS:
        plain = serving.server_command(config, default, MODEL, 30001)
        assert "--tp-size" not in plain and "--dp-size" not in plain  # one GPU: unchanged
        cmd = serving.server_command(config, args, MODEL, 30001)
        assert without(cmd, ["--tp-size", "2", "--dp-size", "4"]) == plain
        # before the KV flags, so they stay last (and --oscar-args can still override)
        kv = cli_args.kv_flags(config)
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
    for config in cli_args.KV_CONFIGS:
        plain = serving.server_command(config, default, MODEL, 30001)
        assert "--tokenizer-worker-num" not in plain  # SGLang's default: commands unchanged
        assert without(serving.server_command(config, args, MODEL, 30001), ["--tokenizer-worker-num", "8"]) == plain
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
    assert {flag: flag_value(cmd, flag) for flag in expected} == expected
    assert "--cache-report" in cmd and "--flush-cache" in cmd


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
    bench = {**CLIENT_RESULT, "cache_report": {"total_cached_tokens": 1_900_000, "cache_hit_rate_pct": 90.1}}
    metrics = serving.serving_metrics(bench, serving.parse_server_log(SERVER_LOG))
    assert metrics["output_tok_s"] == 2000.0 and metrics["requests_s"] == 3.5
    assert (metrics["ttft_p50_ms"], metrics["ttft_p99_ms"]) == (100.0, 900.0)
    assert (metrics["itl_p50_ms"], metrics["itl_p99_ms"]) == (20.0, 60.0)
    assert metrics["kv_pool_tokens"] == 412345 and metrics["peak_running_requests"] == 64
    assert metrics["peak_decode_tok_s"] == 2345.67
    assert metrics["cached_tokens"] == 1_900_000 and metrics["server_cached_tokens"] == 262144
    assert serving.serving_metrics({}, {})["output_tok_s"] is None


# ---------------------------------------------------------------------------- results


def test_serving_table_has_the_oscar_ratio_row():
    doc = {
        "configs": {
            "oscar": serving_record("ok", output_tok_s=3000.0, kv_pool_tokens=2_000_000),
            "fp8-flashinfer": serving_record("ok", output_tok_s=1500.0, kv_pool_tokens=500_000),
            "fp8-triton": serving_record("failed"),
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
            "oscar": serving_record("ok", output_tok_s=443.1, kv_pool_tokens=920_853),
            "fp8-flashinfer": serving_record("timeout", output_tok_s_at_most=bound, kv_pool_tokens=292_782),
        }
    }
    lines = serving.table(doc).splitlines()
    assert lines[2].startswith(f"| fp8-flashinfer (timeout) | < {bound:.1f} | — |")
    assert lines[4].startswith(f"| oscar / fp8-flashinfer | > {443.1 / bound:.2f}x | — |")
    assert "| 3.15x |" in lines[4]  # other columns keep plain ratios
    doc["configs"]["oscar"] = serving_record("timeout", output_tok_s_at_most=100.0)
    doc["configs"]["fp8-flashinfer"] = serving_record("ok", output_tok_s=50.0)
    assert serving.table(doc).splitlines()[4].startswith("| oscar / fp8-flashinfer | < 2.00x |")


def test_serving_plot_shows_a_cut_off_run_by_its_bound(monkeypatch):
    drawn = {}
    monkeypatch.setattr(serving, "plot_panels", lambda path, title, panels: drawn.setdefault("panels", panels))
    doc = {
        "settings": {"model": "m", "num_groups": 4, "prompts_per_group": 16, "system_prompt_len": 100000,
                     "question_len": 1024, "output_len": 512},
        "configs": {"oscar": serving_record("ok", output_tok_s=443.1, requests_s=0.9),
                    "fp8-flashinfer": serving_record("timeout", output_tok_s_at_most=91.3)},
    }  # fmt: skip
    serving.plot(doc, "unused.png")
    output, requests = drawn["panels"][0], drawn["panels"][2]
    assert output["title"] == "output tok/s (cut-off runs: upper bound)"
    assert output["series"] == {"fp8-flashinfer (timeout)": [91.3], "oscar": [443.1]}
    assert requests["title"] == "req/s" and requests["series"]["fp8-flashinfer (timeout)"] == [None]


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


# ---------------------------------------------------------------------------- limits, partial results


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
        model = model_dirs.prepare_model_dir(model_dirs.find_shared_models(None), tmp_path / "model")
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
