"""Tensor- and data-parallel serving with the OSCAR KV cache on two GPUs (issue #8).

Needs at least two CUDA GPUs (skipped otherwise); run it on `nvidia-h200-x2`. Every process it
starts gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1
(benchmarks.processes.GPU_ENV, through processes.managed_process), the benchmark's servers and client
included.

test_tp2_greedy_matches_tp1_as_bf16_does — the same greedy requests (OSCAR_PARALLEL_PROMPTS,
default 16, fixed token-id prompts of 64-1536 tokens, OSCAR_PARALLEL_NEW_TOKENS, default 48, new
tokens each, sent one by one) on four servers: OSCAR and stock BF16 (triton backend) at
--tp-size 1 (both at once, one per GPU) and --tp-size 2 (one after the other). Per KV format it
reports the generations identical between TP=2 and TP=1 and the first divergence of the others
(with TP=1's top-2 logprob gap there); OSCAR must agree about as well as BF16 does (margin below).
It also checks the OSCAR TP=2 server's startup log: one capacity line per rank (SGLang prefixes
them "TP0" / "TP1"), each with half of TP=1's bytes per token (4 of the 8 KV heads), and window
rows allocated on both ranks; and that the TP=2 OSCAR server then serves the prompts
concurrently (batched decode CUDA graphs with padding, radix hits on repeated prompts).

  Weights: SGLang's --load-format dummy gives a TP=2 rank other weights than the same slice at
  TP=1 (initialize_dummy_weights seeds every tensor alike, so a shard holds the first numel
  values of the generator, not its slice of the full tensor), so TP=2 and TP=1 would be two
  different models. These servers load a random-weight checkpoint instead, written once to
  /tmp/oscar-gpu-tests/models/ with Qwen3-8B's config (N(0, 0.02) matrices, unit norms;
  OSCAR_PARALLEL_LAYERS, default 36, sets num_hidden_layers), and OSCAR gets a rotation file
  with a distinct random rotation per layer and KV head, so each rank must load its own heads'.

  Margin: greedy decoding diverges at the first position whose top-2 logit gap is smaller than
  the numerical difference between the two runs. BF16's TP=2-vs-TP=1 agreement measures how
  many such near-ties this model and prompt set have under TP's other reduction order. OSCAR
  stores K/V as 4-level codes: a value that moves by one BF16 ulp between TP=1 and TP=2 can
  cross a rounding boundary and change by a whole quantization step, so OSCAR is expected to
  meet a few more near-ties. Allowed: OSCAR_PARALLEL_MARGIN (default 0.125) of the prompts fewer
  identical generations (2 of 16) and 0.125 less mean agreed fraction of the new tokens. A rank
  that attends the wrong K/V (pool or window rows mixed up between ranks or requests) derails
  nearly every prompt within the first decode steps, far outside that margin.

test_dp2_throughput_vs_dp1 — `python -m benchmarks.serving --configs oscar` on the shared-prefix
agent workload (OSCAR_PARALLEL_DP_GROUPS x OSCAR_PARALLEL_DP_PER_GROUP requests, defaults 4 x
32, all in flight; system prompts of OSCAR_PARALLEL_DP_SYSTEM_LEN tokens, default 8192,
questions of 256 and 512 output tokens: decode-bound), once with --dp-size 1 and once with
--dp-size 2 (two schedulers, a dummy Qwen3-8B on each GPU, requests round robin); both must
complete and DP=2's output throughput must reach
OSCAR_PARALLEL_DP_MIN_SPEEDUP (default 1.2) times DP=1's. Results: /tmp/oscar-gpu-tests/
parallel-bench/serving-parallel-dp{1,2}.{json,md}.

test_dp_attention_one_rank_per_group — only with OSCAR_PARALLEL_DP_ATTENTION=1: an OSCAR server
with --tp-size 2 --dp-size 2 --enable-dp-attention (one attention rank per DP group, which
oscar-sglang allows; more are refused at startup) serves the prompts one by one and at once.

Expected wall time on nvidia-h200-x2: about 5 min for the TP test (checkpoint ~1 min once, 4
server starts), 3 min for the DP test. Summary: /tmp/oscar-gpu-tests/parallel-summary.json.
All helpers below the constants are plain functions, usable without a GPU
(tests/test_parallel_cpu.py covers them).
"""

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import sys
import time

import pytest
import torch

import parallel_cases
import server_helpers
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, OscarFormat
from parallel_cases import (
    INIT_STD,
    SEED,
    agreement,
    capacity_lines,
    int2_bytes_per_token,
    per_head_rotations,
    prompt_set,
    random_model_config,
    speedup,
    window_lines,
    within_margin,
)
from server_helpers import LOG_DIR, greedy_body, post, processes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def _env_number(name, default, kind=float):
    raw = os.environ.get(name, "").strip()
    return kind(raw) if raw else default


LAYERS = _env_number("OSCAR_PARALLEL_LAYERS", 36, int)
PROMPTS = _env_number("OSCAR_PARALLEL_PROMPTS", 16, int)
NEW_TOKENS = _env_number("OSCAR_PARALLEL_NEW_TOKENS", 48, int)
MARGIN = _env_number("OSCAR_PARALLEL_MARGIN", 0.125)
DP_GROUPS = _env_number("OSCAR_PARALLEL_DP_GROUPS", 4, int)
DP_PER_GROUP = _env_number("OSCAR_PARALLEL_DP_PER_GROUP", 32, int)
DP_SYSTEM_LEN = _env_number("OSCAR_PARALLEL_DP_SYSTEM_LEN", 8192, int)
DP_QUESTION_LEN = _env_number("OSCAR_PARALLEL_DP_QUESTION_LEN", 256, int)
DP_OUTPUT_LEN = _env_number("OSCAR_PARALLEL_DP_OUTPUT_LEN", 512, int)
DP_MIN_SPEEDUP = _env_number("OSCAR_PARALLEL_DP_MIN_SPEEDUP", 1.2)
DP_ATTENTION = os.environ.get("OSCAR_PARALLEL_DP_ATTENTION", "0") == "1"

REQUEST_TIMEOUT = 600.0
BENCH_TIMEOUT = 420.0  # per benchmark invocation (one server start + the client)

SERVER_FLAGS = ["--context-length", "4096", "--mem-fraction-static", "0.50",
                "--cuda-graph-backend-prefill", "disabled", "--cuda-graph-bs-decode", "1", "4",
                "--max-running-requests", "4", "--sampling-backend", "pytorch"]
KV = {"bf16": ["--attention-backend", "triton"], "oscar": ["--kv-quant", "oscar"]}
SUMMARY = LOG_DIR / "parallel-summary.json"

# ---------------------------------------------------------------------------- servers


def greedy_result(answer):
    """(output ids, top-2 logprob gap per position, cached prompt tokens) of a /generate answer."""
    meta = answer["meta_info"]
    gaps = []
    for top in meta.get("output_top_logprobs") or []:
        values = sorted((entry[0] for entry in top or []), reverse=True)
        gaps.append(values[0] - values[1] if len(values) >= 2 else None)
    return {"ids": list(answer["output_ids"]), "gaps": gaps,
            "cached": meta.get("cached_tokens")}


def run_one_by_one(port, prompts, new_tokens=NEW_TOKENS):
    return [greedy_result(post(port, "/generate", greedy_body(ids, new_tokens),
                               timeout=REQUEST_TIMEOUT)) for ids in prompts]


def run_concurrent(port, prompts, new_tokens=NEW_TOKENS):
    def one(ids):
        return greedy_result(post(port, "/generate", greedy_body(ids, new_tokens),
                                  timeout=REQUEST_TIMEOUT))

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


@contextlib.contextmanager
def servers_up(specs, model):
    """Start every (name, flags) of `specs` at once on `model`, wait until all answer
    /health_generate, yield {name: Server}; stop them all on exit."""
    with contextlib.ExitStack() as stack:
        started = {}
        for name, flags in specs:
            port = processes.free_port()
            log = LOG_DIR / f"{name}.log"
            cmd = server_helpers.server_command(model, port, flags)
            proc = stack.enter_context(processes.managed_process(cmd, log))
            started[name] = server_helpers.Server(name, port, log, proc)
        for name, server in started.items():
            try:
                processes.wait_for_http_ok(server_helpers.url(server.port, "/health_generate"),
                                           server.proc, timeout=server_helpers.STARTUP_TIMEOUT)
            except Exception as e:
                raise RuntimeError(f"server {name!r} did not start ({e}); log {server.log}:\n"
                                   f"{processes.log_tail(server.log, 60)}") from e
        yield started


def server_flags(kv, tp, rotations, base_gpu=0, extra=()):
    flags = [*SERVER_FLAGS, "--tp-size", str(tp), *KV[kv], *extra]
    if kv == "oscar":
        flags += ["--oscar-rotations", str(rotations)]
    if base_gpu:
        flags += ["--base-gpu-id", str(base_gpu)]
    return flags


def write_summary(key, value):
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    summary[key] = value
    SUMMARY.write_text(json.dumps(summary, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def random_model():
    """(model folder, rotation file) of the random-weight Qwen3-8B-shaped checkpoint; written
    on GPU 0 in a child process the first time (reused while its spec matches)."""
    dummy = server_helpers.model_dir()  # config + tokenizer + chat template
    config = random_model_config(json.loads((dummy / "config.json").read_text()), LAYERS)
    folder = LOG_DIR / "models" / f"qwen3-8b-random-L{LAYERS}"
    stamp = {"config": config, "seed": SEED, "std": INIT_STD}
    marker = folder / "complete.json"
    if not marker.is_file() or json.loads(marker.read_text()) != stamp:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.monotonic()
        (folder / "spec.json").write_text(json.dumps(config))
        code = processes.run_logged(
            ["env", "CUDA_VISIBLE_DEVICES=0", sys.executable, parallel_cases.__file__, "write-checkpoint",
             str(folder)], LOG_DIR / "parallel-checkpoint.log", timeout=900)
        assert code == 0, processes.log_tail(LOG_DIR / "parallel-checkpoint.log", 40)
        from oscar_sglang.kernels.rotation_file import save_rotations

        save_rotations(str(folder / "rotations.oscar.safetensors"),
                       per_head_rotations(LAYERS, config["num_key_value_heads"],
                                          config["head_dim"], model_name=folder.name))
        marker.write_text(json.dumps(stamp))
        print(f"\nrandom checkpoint written in {time.monotonic() - started:.0f} s: {folder}")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(dummy / name, folder / name)
    return folder, folder / "rotations.oscar.safetensors"


# ---------------------------------------------------------------------------- tests


def test_tp2_greedy_matches_tp1_as_bf16_does(random_model):
    model, rotations = random_model
    prompts = prompt_set(PROMPTS)
    runs, logs = {}, {}
    started = time.monotonic()
    # TP=1: both servers at once, OSCAR on GPU 0 and BF16 on GPU 1
    specs = [("parallel-oscar-tp1", server_flags("oscar", 1, rotations)),
             ("parallel-bf16-tp1", server_flags("bf16", 1, rotations, base_gpu=1))]
    with servers_up(specs, model) as servers:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {kv: pool.submit(run_one_by_one, servers[f"parallel-{kv}-tp1"].port, prompts)
                       for kv in KV}
            for kv, future in futures.items():
                runs[(kv, 1)] = future.result()
        for kv in KV:
            logs[(kv, 1)] = servers[f"parallel-{kv}-tp1"].log_text()
    concurrent_ok = None
    for kv in KV:  # TP=2: one server at a time on both GPUs
        name = f"parallel-{kv}-tp2"
        with servers_up([(name, server_flags(kv, 2, rotations))], model) as servers:
            server = servers[name]
            runs[(kv, 2)] = run_one_by_one(server.port, prompts)
            if kv == "oscar":  # batched decode graphs with padding, then radix hits
                batched = run_concurrent(server.port, prompts) + run_concurrent(server.port, prompts)
                concurrent_ok = {
                    "complete": all(len(r["ids"]) == NEW_TOKENS for r in batched),
                    "cached_tokens_second_pass": sum(r["cached"] or 0 for r in batched[len(prompts):]),
                    "alive": server.alive()}
            logs[(kv, 2)] = server.log_text()
    wall = time.monotonic() - started

    stats = {kv: agreement(runs[(kv, 1)], runs[(kv, 2)]) for kv in KV}
    tp1_capacity, tp2_capacity = capacity_lines(logs[("oscar", 1)]), capacity_lines(logs[("oscar", 2)])
    report = {"prompts": len(prompts), "new_tokens": NEW_TOKENS, "layers": LAYERS,
              "margin": MARGIN, "wall_s": round(wall, 1), "agreement": stats,
              "oscar_capacity_tp1": tp1_capacity, "oscar_capacity_tp2": tp2_capacity,
              "oscar_window_lines_tp2": window_lines(logs[("oscar", 2)]),
              "oscar_tp2_concurrent": concurrent_ok}
    write_summary("tp", report)
    print("\nTP=2 vs TP=1, greedy, " f"{len(prompts)} prompts x {NEW_TOKENS} new tokens ({wall:.0f} s):")
    for kv, s in stats.items():
        print(f"  {kv:5s}: {s['identical']}/{s['n']} identical, mean agreed fraction "
              f"{s['mean_agreed_fraction']:.3f}, divergences {s['divergences']}")
    print("  OSCAR capacity TP=1:", tp1_capacity)
    print("  OSCAR capacity TP=2 (per rank):", tp2_capacity)
    print("  OSCAR TP=2 concurrent:", concurrent_ok)

    for key, results in runs.items():
        assert all(len(r["ids"]) == NEW_TOKENS for r in results), f"{key}: incomplete generations"
    # one capacity line per rank, each for half of the KV heads
    assert len(tp1_capacity) == 1, tp1_capacity
    assert sorted(line["tp"] for line in tp2_capacity) == [0, 1], tp2_capacity
    config = json.loads((model / "config.json").read_text())
    heads = config["num_key_value_heads"]
    assert tp1_capacity[0]["bytes_per_token"] == int2_bytes_per_token(config, heads), tp1_capacity
    # BF16 over the codes' bits (4.9x at the default 4-bit keys), less the window rows
    codes_ratio = 16 / OscarFormat(config["head_dim"], key_bits=DEFAULT_KEY_BITS).bits_per_element
    for line in tp2_capacity:
        assert line["bytes_per_token"] == int2_bytes_per_token(config, heads // 2), line
        assert line["ratio"] >= 0.75 * codes_ratio, line  # as at TP=1
    assert sorted(re.search(r"TP(\d+)", p).group(1) for p in report["oscar_window_lines_tp2"]) == ["0", "1"]
    assert concurrent_ok and concurrent_ok["complete"] and concurrent_ok["alive"], concurrent_ok
    assert concurrent_ok["cached_tokens_second_pass"] > 0, concurrent_ok  # radix hits under TP
    problems = within_margin(stats["oscar"], stats["bf16"], MARGIN)
    assert not problems, "; ".join(problems)


def run_serving_benchmark(dp):
    """`python -m benchmarks.serving --configs oscar --dp-size dp` on the small shared-prefix
    workload; its record of the oscar configuration (with the exact commands)."""
    results = LOG_DIR / "parallel-bench"
    name = f"serving-parallel-dp{dp}"
    json_path = results / f"{name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.serving", "--configs", "oscar", "--dp-size", str(dp),
           "--num-groups", str(DP_GROUPS), "--prompts-per-group", str(DP_PER_GROUP),
           "--system-prompt-len", str(DP_SYSTEM_LEN), "--question-len", str(DP_QUESTION_LEN),
           "--output-len", str(DP_OUTPUT_LEN), "--results-dir", str(results), "--name", name,
           "--work-dir", str(LOG_DIR / "models"), "--timeout", str(BENCH_TIMEOUT - 30)]
    log = LOG_DIR / f"{name}.log"
    code = processes.run_logged(cmd, log, BENCH_TIMEOUT)
    doc = json.loads(json_path.read_text()) if json_path.is_file() else {}
    record = (doc.get("configs") or {}).get("oscar", {})
    record["exit_code"], record["command"] = code, " ".join(cmd)
    return record, log


def test_dp2_throughput_vs_dp1():
    records = {}
    for dp in (1, 2):
        records[dp], log = run_serving_benchmark(dp)
        assert records[dp].get("status") == "ok", (
            f"DP={dp}: {records[dp].get('status')} {records[dp].get('error', '')}\n"
            f"{processes.log_tail(log, 30)}\n{records[dp].get('server_log_tail', '')}")
    ratio = speedup(records[1], records[2])
    brief = {dp: {k: records[dp]["metrics"].get(k) for k in
                  ("output_tok_s", "requests_s", "ttft_p50_ms", "itl_p50_ms",
                   "peak_running_requests", "kv_pool_tokens", "max_running_requests")}
             for dp in records}
    write_summary("dp", {"workload": {"groups": DP_GROUPS, "per_group": DP_PER_GROUP,
                                      "system_prompt_len": DP_SYSTEM_LEN,
                                      "question_len": DP_QUESTION_LEN, "output_len": DP_OUTPUT_LEN},
                         "metrics": brief, "speedup": ratio,
                         "commands": {dp: records[dp]["command"] for dp in records}})
    print(f"\nOSCAR shared-prefix serving, {DP_GROUPS}x{DP_PER_GROUP} requests: DP=1 {brief[1]}; "
          f"DP=2 {brief[2]}; output throughput DP=2 / DP=1 = {ratio}")
    assert ratio is not None and ratio >= DP_MIN_SPEEDUP, (
        f"DP=2 gives {ratio}x DP=1's output throughput (want >= {DP_MIN_SPEEDUP})")


@pytest.mark.skipif(not DP_ATTENTION, reason="opt-in: OSCAR_PARALLEL_DP_ATTENTION=1")
def test_dp_attention_one_rank_per_group(random_model):
    model, rotations = random_model
    prompts = prompt_set(PROMPTS)
    name = "parallel-oscar-dpattn"
    flags = server_flags("oscar", 2, rotations, extra=["--dp-size", "2", "--enable-dp-attention"])
    with servers_up([(name, flags)], model) as servers:
        server = servers[name]
        one_by_one = run_one_by_one(server.port, prompts)
        batched = run_concurrent(server.port, prompts)
        alive, text = server.alive(), server.log_text()
    capacity = capacity_lines(text)
    write_summary("dp_attention", {"capacity": capacity,
                                   "one_by_one_vs_concurrent": agreement(one_by_one, batched)})
    print("\nDP attention capacity lines:", capacity)
    assert alive
    assert all(len(r["ids"]) == NEW_TOKENS for r in one_by_one + batched)
    assert sorted(line["dp"] for line in capacity) == [0, 1], capacity
    config = json.loads((model / "config.json").read_text())
    full = int2_bytes_per_token(config, config["num_key_value_heads"])  # every head on each rank
    assert all(line["bytes_per_token"] == full for line in capacity), capacity
