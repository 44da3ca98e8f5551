"""Serving benchmark: OSCAR against SGLang's BF16 and FP8 KV caches on an agent workload.

For every configuration one stock SGLang server is started (`python -m sglang.launch_server`,
dummy weights, identical flags except the KV option) and driven by SGLang's own client,
`python -m sglang.benchmark.serving`, with the generated-shared-prefix dataset: several groups
of requests, each group sharing one long system prompt, every request adding a question and
generating a fixed number of tokens, all sent at once (request rate inf).

Recorded per configuration: output tokens/s, requests/s, TTFT and ITL p50/p99 (from the
client's result file), KV pool capacity in tokens, the server's running-request cap, peak running
requests, peak decode throughput (the highest "gen throughput" of the server's decode log lines)
and cache-hit tokens (from the server log; the client's cache report too), the KV flags and the
exact commands. The table ends with the OSCAR / FP8-FlashInfer ratio of every column.

The client's prompts are generated once before the first server starts (`prepare_workload`, into
the cache the client reads). Limits: each configuration (server start-up included) gets
--timeout seconds, cut to what is left of --budget (seconds for the whole invocation) if given;
a configuration that fails or runs out of time is recorded and the next one runs. Every server and client runs in its own process group
with GPU_ENV set, and the group is stopped when its configuration ends, fails or times out, or
when the benchmark is stopped (SIGTERM) or killed. The JSON and markdown are rewritten after
each configuration, so a run cut off keeps the configurations it finished. A configuration cut
off by its limit still gets a bound: its output tok/s is below the workload's output tokens over
the time its measured run surely lasted by the server log (output_tok_s_at_most; the table shows
"< bound" and the OSCAR ratio as "> ratio").

Every server gets --max-running-requests = the client's concurrency + 1, so the KV pool, not a
request cap, limits how many requests run: OSCAR reserves BF16 window rows for that many requests
and gives the rest of the budget to its INT2 pool (start-up refuses if they do not fit). The one
extra: SGLang counts the request in chunked prefill against the cap, and a running batch it marks
full then stays full until a running request finishes, so with the cap equal to the concurrency
the last request waited for the whole batch to finish (seen on the H100: 191 decoding, 1
queued). Other OSCAR flags go to the oscar server only with --oscar-args (recorded with its
results).

Run from the repository root (on the GPU machine after `source .gpu/install.sh`):

    python -m benchmarks.serving --configs fp8-flashinfer,oscar --budget 520
    python -m benchmarks.serving --configs fp8-flashinfer,oscar --system-prompt-len 100000
    python -m benchmarks.serving --configs oscar --dp-size 2     # two GPUs, a model on each
    python -m benchmarks.serving --configs oscar --tp-size 2     # two GPUs, KV heads split
    python -m benchmarks.serving --configs fp8-flashinfer,oscar --tokenizer-worker-num 8

The server tokenizes every prompt in its tokenizer process: one process takes 0.15-0.19 s per
35K-token agent prompt (the development machine's CPU), so the H200 OSCAR server received the
192 requests at ~6 per second, over 33 s, whatever its KV cache (its queue was empty while
requests trickled in). --tokenizer-worker-num N gives every configuration's server N tokenizer
processes (SGLang's flag; recorded in the settings, and the default results name gets a
-tok<N> suffix): with 8, the same server received them within 14 s.

--tp-size / --dp-size go unchanged to every configuration's server (recorded in the settings;
the default results name gets a -tp<N> / -dp<M> suffix). With --dp-size the pool figures of the
table are summed over the DP workers (KV pool tokens, running cap, peak running requests: the
sum of each worker's peak).

Writes <results-dir>/<name>.json, .md and .png; logs go to <results-dir>/logs/<name>/. A run
split over several invocations (e.g. one configuration each) with the same settings on the same
GPU accumulates in one JSON file.
"""

import argparse
import datetime
import re
import shlex
import sys
import time
from pathlib import Path

from benchmarks.budget import Budget, run_configurations
from benchmarks.cli_args import (
    BASELINE,
    OSCAR,
    add_common_args,
    add_parallel_args,
    kv_flags,
    parallel_settings,
    positive_int,
)
from benchmarks.model_dirs import resolve_model_path
from benchmarks.processes import (
    free_port,
    log_tail,
    managed_process,
    raise_keyboard_interrupt_on_sigterm,
    read_jsonl,
    run_logged,
    wait_for_http_ok,
)
from benchmarks.records import (
    kv_flag_lines,
    load_compatible,
    machine_info,
    markdown_table,
    merge_results,
    now_iso,
    ordered_configs,
    plot_panels,
    ratio,
    write_results,
)

HOST = "127.0.0.1"
CLIENT_SEED = 42  # sglang.benchmark.serving's default --seed
DECODE_LOG_INTERVAL = 10

# (key in a record's "metrics", column header); the table and the chart show these.
METRICS = (
    ("output_tok_s", "output tok/s"),
    ("peak_decode_tok_s", "peak decode tok/s"),
    ("requests_s", "req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
    ("peak_running_requests", "peak running req"),
    ("max_running_requests", "running cap"),
    ("kv_pool_tokens", "KV pool tokens"),
    ("cached_tokens", "cache-hit tokens"),
)

# Formats of SGLang 0.5.17's log lines (scheduler.py, metrics_reporter.py, memory_pool.py).
POOL_RE = re.compile(r"max_total_num_tokens=(\d+),.*max_running_requests=(\d+)")
# The scheduler's log prefix, "[time DP1 TP0]", names the DP worker when --dp-size > 1.
DP_RANK_RE = re.compile(r"^\[[^\]]*\bDP(\d+)\b[^\]]*\]")
RUNNING_RE = re.compile(r"#running-req: (\d+)")
CACHED_RE = re.compile(r"#cached-token: (\d+)")
NEW_TOKEN_RE = re.compile(r"#new-token: (\d+)")
# generated tokens / wall time since the previous decode log line (prefill batches in between
# count as time): its highest value is the throughput of decode alone
GEN_RE = re.compile(r"gen throughput \(token/s\): ([\d.]+)")
# the log's time stamp, whole seconds: "[2026-12-02 15:50:43" (then " DP0 TP0]" or "]")
LOG_TIME_RE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
# uvicorn access-log lines: the client flushes the cache right before its measured run
# (--flush-cache), then sends every request
FLUSH_MARK = '"POST /flush_cache'
REQUEST_MARK = '"POST /generate'
BATCH_MARKS = ("Prefill batch", "Decode batch")
KV_ALLOC_RE = re.compile(
    r"KV [Cc]ache (?:is )?allocated\. dtype: [^,]+, #tokens: \d+, "
    r"(?:K size: ([\d.]+) GB, V size: ([\d.]+) GB|KV size: ([\d.]+) GB)"
)


def build_parser():
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0]
    )
    add_common_args(parser, mem_fraction_static=0.80, timeout=300.0)
    add_parallel_args(parser)
    parser.add_argument("--num-groups", type=int, default=4, help="system prompts (default: %(default)s)")
    parser.add_argument(
        "--prompts-per-group", type=int, default=16, help="requests per system prompt (default: %(default)s)"
    )
    parser.add_argument("--system-prompt-len", type=int, default=32768, help="tokens (default: %(default)s)")
    parser.add_argument("--question-len", type=int, default=1024, help="tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=512, help="tokens (default: %(default)s)")
    parser.add_argument(
        "--max-concurrency", type=int, help="client-side cap on requests in flight (default: all requests)"
    )
    parser.add_argument(
        "--tokenizer-worker-num",
        type=positive_int,
        default=1,
        help="tokenizer processes of every server (SGLang --tokenizer-worker-num; default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument(
        "--name", help="results file stem (default: serving-sp<system-prompt-len>[-tp<N>][-dp<M>][-tok<K>])"
    )
    return parser


def num_requests(args):
    """Requests in the workload (warm-up request not counted)."""
    return args.num_groups * args.prompts_per_group


def concurrency(args):
    """Requests in flight at most: --max-concurrency, else every request of the workload."""
    return args.max_concurrency or num_requests(args)


def running_cap(args):
    """--max-running-requests of every server: one above the client's concurrency (module
    docstring)."""
    return concurrency(args) + 1


# server flags that every configuration gets alike: settings key -> tag in the default results name
SERVER_WIDE = {"tp_size": "tp", "dp_size": "dp", "tokenizer_worker_num": "tok"}


def server_settings(args):
    """The SERVER_WIDE flags beyond SGLang's defaults, as settings: tp_size / dp_size for a
    parallel run, tokenizer_worker_num when not 1; {} by default (so that results files written
    before these flags existed keep matching a default run)."""
    found = dict(parallel_settings(args))
    if args.tokenizer_worker_num != 1:
        found["tokenizer_worker_num"] = args.tokenizer_worker_num
    return found


def server_flags(args):
    """The SGLang flags of server_settings whose value is not the default 1."""
    return [flag for key, value in server_settings(args).items() if value != 1
            for flag in ("--" + key.replace("_", "-"), str(value))]


def default_name(args):
    """Results file stem: serving-sp<system prompt>, plus -tp<N> / -dp<M> for a parallel run and
    -tok<N> for N tokenizer processes."""
    name = f"serving-sp{args.system_prompt_len}"
    for key, value in server_settings(args).items():
        if value != 1:
            name += f"-{SERVER_WIDE[key]}{value}"
    return name


def server_command(config, args, model_path, port):
    """The launch_server command of one configuration; only kv_flags() differs between them
    (--tp-size / --dp-size, when given, go to every configuration alike)."""
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--load-format", "dummy",
        "--host", HOST,
        "--port", str(port),
        "--mem-fraction-static", str(args.mem_fraction_static),
        "--cuda-graph-backend-prefill", "disabled",
        "--cuda-graph-max-bs-decode", str(running_cap(args)),
        # every request the client keeps in flight may run; OSCAR then reserves BF16 rows for
        # that many requests instead of capping them by --oscar-window-fraction
        "--max-running-requests", str(running_cap(args)),
        "--decode-log-interval", str(DECODE_LOG_INTERVAL),
        *server_flags(args),
        *kv_flags(config, args.oscar_rotations, args.oscar_args),
    ]  # fmt: skip


def bench_command(args, model_path, port, output_file):
    """The sglang.benchmark.serving command (identical for every configuration)."""
    return [
        sys.executable, "-m", "sglang.benchmark.serving",
        "--backend", "sglang",
        "--host", HOST,
        "--port", str(port),
        "--model", str(model_path),
        "--tokenizer", str(model_path),
        "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", str(args.num_groups),
        "--gsp-prompts-per-group", str(args.prompts_per_group),
        "--gsp-system-prompt-len", str(args.system_prompt_len),
        "--gsp-question-len", str(args.question_len),
        "--gsp-output-len", str(args.output_len),
        "--request-rate", "inf",
        "--max-concurrency", str(concurrency(args)),
        "--flush-cache",
        "--cache-report",
        "--disable-tqdm",
        "--output-file", str(output_file),
    ]  # fmt: skip


def prepare_workload(args, model_path):
    """Generate the client's prompts once, before any server starts, into the cache file that
    sglang.benchmark.serving loads them from (~/.cache/sglang/benchmark/gen_shared_prefix_*):
    4 × 48 prompts of 33K tokens take ~35 s, which would otherwise count against the first
    configuration's time limit. Seeded as the client seeds itself (bench_command keeps its
    default --seed), so these are the prompts it would make. Returns the dataset rows."""
    import random

    import numpy as np
    from sglang.benchmark.datasets import get_dataset
    from sglang.benchmark.utils import get_tokenizer

    random.seed(CLIENT_SEED)
    np.random.seed(CLIENT_SEED)
    client_args = argparse.Namespace(
        dataset_name="generated-shared-prefix",
        seed=CLIENT_SEED,
        gsp_num_groups=args.num_groups,
        gsp_prompts_per_group=args.prompts_per_group,
        gsp_system_prompt_len=args.system_prompt_len,
        gsp_question_len=args.question_len,
        gsp_output_len=args.output_len,
    )
    return get_dataset(client_args, get_tokenizer(str(model_path)))


def settings(args, model_path):
    """What must match for results of two invocations to share one file (each configuration's
    record holds its own KV flags)."""
    return {
        "model": model_path.name,
        "load_format": "dummy",
        "dataset": "generated-shared-prefix",
        "num_groups": args.num_groups,
        "prompts_per_group": args.prompts_per_group,
        "system_prompt_len": args.system_prompt_len,
        "question_len": args.question_len,
        "output_len": args.output_len,
        "request_rate": "inf",
        "max_concurrency": concurrency(args),
        "mem_fraction_static": args.mem_fraction_static,
        **server_settings(args),
    }


def dp_worker(line):
    """The DP rank in a log line's prefix ("[time DP1 TP0] ..."), None without one."""
    match = DP_RANK_RE.match(line)
    return None if match is None else int(match.group(1))


def parse_server_log(text):
    """KV pool size, peak running requests, peak decode throughput and prefix-cache hits from a
    server log. With several DP workers (--dp-size) the pool size, running cap, peak running
    requests and peak decode throughput are summed over them (each worker's last pool line,
    each worker's own peaks)."""
    stats = {"peak_running_requests": None, "cached_tokens": None, "new_tokens": None}
    pools, peaks, gen_peaks = {}, {}, {}
    for line in text.splitlines():
        pool = POOL_RE.search(line)
        if pool:
            pools[dp_worker(line)] = tuple(map(int, pool.groups()))
        for n in RUNNING_RE.findall(line):
            worker = dp_worker(line)
            peaks[worker] = max(peaks.get(worker, 0), int(n))
        for rate in GEN_RE.findall(line):
            worker = dp_worker(line)
            gen_peaks[worker] = max(gen_peaks.get(worker, 0.0), float(rate))
    if pools:
        stats["max_total_num_tokens"] = sum(tokens for tokens, _ in pools.values())
        stats["max_running_requests"] = sum(requests for _, requests in pools.values())
        if len(pools) > 1:
            stats["dp_workers"] = len(pools)
    if peaks:
        stats["peak_running_requests"] = sum(peaks.values())
    if gen_peaks:
        stats["peak_decode_tok_s"] = sum(gen_peaks.values())
    cached = [int(n) for n in CACHED_RE.findall(text)]
    if cached:
        stats["cached_tokens"] = sum(cached)
        stats["new_tokens"] = sum(int(n) for n in NEW_TOKEN_RE.findall(text))
    allocations = KV_ALLOC_RE.findall(text)
    if allocations:
        k_gb, v_gb, kv_gb = allocations[-1]
        stats["kv_cache_gb"] = float(kv_gb) if kv_gb else float(k_gb) + float(v_gb)
    return stats


def log_time(line):
    """The time stamp of a server log line (datetime, whole seconds), None without one."""
    match = LOG_TIME_RE.match(line)
    return None if match is None else datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")


def measured_run_at_least_s(text):
    """Seconds the client's measured run had surely lasted by the server log's last prefill or
    decode batch: from the first request after the client's last cache flush, plus 1 s because
    log times are whole seconds (the run starts before that request arrives), to that batch's
    whole second. For a run cut off by its time limit, the workload's output tokens over this is
    more than its output tok/s could have been. None without a flush followed by a request and a
    batch."""
    lines = text.splitlines()
    flushes = [i for i, line in enumerate(lines) if FLUSH_MARK in line]
    if not flushes:
        return None
    after = lines[flushes[-1]:]
    first_request = next((log_time(line) for line in after if REQUEST_MARK in line), None)
    batches = [log_time(line) for line in after if any(mark in line for mark in BATCH_MARKS)]
    if first_request is None or not batches or batches[-1] is None:
        return None
    lasted = (batches[-1] - first_request).total_seconds() - 1.0
    return lasted if lasted > 0 else None


def serving_metrics(bench, server):
    """The figures compared across configurations, from the client result and the server log."""
    cache = bench.get("cache_report") or {}
    return {
        "output_tok_s": bench.get("output_throughput"),
        "peak_decode_tok_s": server.get("peak_decode_tok_s"),
        "requests_s": bench.get("request_throughput"),
        "ttft_p50_ms": bench.get("median_ttft_ms"),
        "ttft_p99_ms": bench.get("p99_ttft_ms"),
        "itl_p50_ms": bench.get("median_itl_ms"),
        "itl_p99_ms": bench.get("p99_itl_ms"),
        "completed": bench.get("completed"),
        "peak_running_requests": server.get("peak_running_requests"),
        "kv_pool_tokens": server.get("max_total_num_tokens"),
        "max_running_requests": server.get("max_running_requests"),
        "kv_cache_gb": server.get("kv_cache_gb"),
        "cached_tokens": cache.get("total_cached_tokens"),
        "cache_hit_rate_pct": cache.get("cache_hit_rate_pct"),
        "server_cached_tokens": server.get("cached_tokens"),
    }


def output_tok_s_at_most(args, server_log_text):
    """For a run cut off by its time limit: the workload's output tokens over the seconds its
    measured run surely lasted (measured_run_at_least_s), a bound its output tok/s is below;
    None if the log does not show how long it ran."""
    lasted = measured_run_at_least_s(server_log_text)
    return None if lasted is None else round(num_requests(args) * args.output_len / lasted, 1)


def run_config(config, args, model_path, logs_dir, timeout=None):
    """Start the server of `config`, run the client against it, stop it; the record.

    `timeout` (default --timeout) covers start-up and the client together."""
    timeout = args.timeout if timeout is None else timeout
    port = args.port or free_port()
    server_log = logs_dir / f"{config}.server.log"
    bench_log = logs_dir / f"{config}.bench.log"
    bench_out = logs_dir / f"{config}.bench.jsonl"
    bench_out.unlink(missing_ok=True)  # the client appends
    server_cmd = server_command(config, args, model_path, port)
    bench_cmd = bench_command(args, model_path, port, bench_out)
    record = {
        "status": "failed",
        "started": now_iso(),
        "kv_flags": kv_flags(config, args.oscar_rotations, args.oscar_args),
        "timeout_s": round(timeout, 1),
        "server_command": shlex.join(server_cmd),
        "bench_command": shlex.join(bench_cmd),
        "server_log": str(server_log),
        "bench_log": str(bench_log),
    }
    start = time.monotonic()
    bench = {}
    try:
        with managed_process(server_cmd, server_log) as server:
            wait_for_http_ok(f"http://{HOST}:{port}/health", server, timeout)
            record["startup_s"] = round(time.monotonic() - start, 1)
            code = run_logged(bench_cmd, bench_log, timeout - (time.monotonic() - start))
        if code is None:
            raise TimeoutError(f"benchmark client did not finish within the {timeout:.0f} s limit")
        if code != 0:
            raise RuntimeError(f"benchmark client exited with code {code}")
        results = read_jsonl(bench_out)
        if not results:
            raise RuntimeError(f"benchmark client wrote no result to {bench_out}")
        bench = {k: v for k, v in results[-1].items() if k != "server_info"}
        record["status"] = "ok" if bench.get("completed") == num_requests(args) else "incomplete"
    except (RuntimeError, TimeoutError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):  # SIGTERM to the benchmark; the server is stopped
            record["status"], record["error"] = "interrupted", "benchmark stopped"
        else:
            record["status"] = "timeout" if isinstance(exc, TimeoutError) else "failed"
            record["error"] = str(exc)
        record["server_log_tail"] = log_tail(server_log)
        record["bench_log_tail"] = log_tail(bench_log)
    log_text = server_log.read_text(errors="replace") if server_log.is_file() else ""
    server = parse_server_log(log_text)
    record.update(
        elapsed_s=round(time.monotonic() - start, 1),
        metrics=serving_metrics(bench, server),
        server=server,
        bench=bench,
    )
    if record["status"] == "timeout":
        record["metrics"]["output_tok_s_at_most"] = output_tok_s_at_most(args, log_text)
    return record


def config_label(name, record):
    """A configuration's name, with its status unless it finished ("oscar (timeout)")."""
    return name if record["status"] == "ok" else f"{name} ({record['status']})"


def metric_cell(metrics, key):
    """A table cell: the metric, or "< bound" for the output tok/s of a run cut off by its time
    limit (output_tok_s_at_most)."""
    bound = metrics.get("output_tok_s_at_most") if key == "output_tok_s" else None
    value = metrics.get(key)
    return f"< {bound:.1f}" if value is None and bound is not None else value


def ratio_cell(ours, base, key):
    """OSCAR / FP8-FlashInfer of one metric; where one side's output tok/s is only bounded
    (a run cut off by its time limit), the ratio is bounded the same way ("> 4.84x")."""
    r = ratio(ours.get(key), base.get(key))
    if r is not None:
        return f"{r:.2f}x"
    if key != "output_tok_s":
        return None
    above = ratio(ours.get(key), base.get("output_tok_s_at_most"))
    below = ratio(ours.get("output_tok_s_at_most"), base.get(key))
    if above is not None:
        return f"> {above:.2f}x"
    return None if below is None else f"< {below:.2f}x"


def table(doc):
    """Markdown table: one row per configuration, then the OSCAR / FP8-FlashInfer ratios."""
    configs = doc["configs"]
    rows = []
    for name in ordered_configs(configs):
        record = configs[name]
        rows.append([config_label(name, record), *(metric_cell(record["metrics"], key) for key, _ in METRICS)])
    if OSCAR in configs and BASELINE in configs:
        ours, base = configs[OSCAR]["metrics"], configs[BASELINE]["metrics"]
        rows.append([f"{OSCAR} / {BASELINE}", *(ratio_cell(ours, base, key) for key, _ in METRICS)])
    return markdown_table(["config", *(header for _, header in METRICS)], rows)


def plot(doc, path):
    """One bar panel per metric, a bar per configuration; a run cut off by its time limit shows
    its output tok/s bound (output_tok_s_at_most), and the panel says so."""
    configs = doc["configs"]
    labels = {name: config_label(name, configs[name]) for name in ordered_configs(configs)}
    panels = []
    for key, header in METRICS:
        series, bounded = {}, False
        for name, label in labels.items():
            metrics = configs[name]["metrics"]
            value = metrics.get(key)
            if value is None and key == "output_tok_s" and metrics.get("output_tok_s_at_most") is not None:
                value, bounded = metrics["output_tok_s_at_most"], True
            series[label] = [value]
        title = f"{header} (cut-off runs: upper bound)" if bounded else header
        panels.append({"title": title, "ylabel": header, "groups": [""], "series": series})
    s = doc["settings"]
    title = (
        f"{s['model']}: {s['num_groups']} groups x {s['prompts_per_group']} requests, "
        f"system prompt {s['system_prompt_len']}, question {s['question_len']}, output {s['output_len']}"
    )
    return plot_panels(path, title, panels)


def notes(doc):
    """The workload and the KV flags, in words (printed above the table)."""
    s = doc["settings"]
    lines = [
        (
            f"{s['model']} ({s['load_format']} weights), sglang.benchmark.serving {s['dataset']}: "
            f"{s['num_groups']} system prompts of {s['system_prompt_len']} tokens x "
            f"{s['prompts_per_group']} questions of {s['question_len']} tokens, {s['output_len']} "
            f"output tokens each, request rate {s['request_rate']}, at most {s['max_concurrency']} "
            f"in flight; --mem-fraction-static {s['mem_fraction_static']}."
        )
    ]
    parallel = {key: s[key] for key in SERVER_WIDE if key in s}
    if parallel:
        lines.append(
            "Every server: "
            + " ".join(f"`--{key.replace('_', '-')} {value}`" for key, value in parallel.items())
            + (
                "; KV pool tokens, running cap and peak running requests are summed over the DP workers."
                if parallel.get("dp_size", 1) > 1
                else "."
            )
        )
    lines += kv_flag_lines(doc)
    return "\n\n".join(lines)


def markdown(doc):
    """The whole markdown report."""
    return notes(doc) + "\n\n" + table(doc) + "\n"


def main(argv=None):
    """Run every configuration, writing the results after each one; exit 1 if any failed."""
    args = build_parser().parse_args(argv)
    raise_keyboard_interrupt_on_sigterm()
    budget = Budget(args.timeout, args.budget)
    model_path = resolve_model_path(args)
    name = args.name or default_name(args)
    json_path = Path(args.results_dir) / f"{name}.json"
    logs_dir = Path(args.results_dir) / "logs" / name
    if args.dry_run:
        port = args.port or 30000
        for config in args.configs:
            print(f"# {config}\n{shlex.join(server_command(config, args, model_path, port))}")
        print(
            f"# client\n{shlex.join(bench_command(args, model_path, port, logs_dir / 'CONFIG.bench.jsonl'))}"
        )
        return 0
    machine, run_settings = machine_info(), settings(args, model_path)
    started = time.monotonic()
    prepare_workload(args, model_path)
    print(f"== workload prepared in {time.monotonic() - started:.0f} s", flush=True)

    def run_one(config, timeout):
        print(f"== {config}: starting server (limit {timeout:.0f} s)", flush=True)
        record = run_config(config, args, model_path, logs_dir, timeout)
        previous = load_compatible(json_path, "serving", run_settings, machine)
        doc = merge_results(json_path, "serving", run_settings, machine, {config: record}, previous=previous)
        write_results(doc, json_path, markdown)
        m = record["metrics"]
        print(
            f"== {config}: {record['status']} in {record['elapsed_s']} s {record.get('error', '')}; "
            f"output tok/s {m.get('output_tok_s')}, peak running {m.get('peak_running_requests')}, "
            f"KV pool tokens {m.get('kv_pool_tokens')}",
            flush=True,
        )
        return record, doc

    return run_configurations(args.configs, budget, run_one, markdown, plot, json_path, logs_dir)


if __name__ == "__main__":
    sys.exit(main())
