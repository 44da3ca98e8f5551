"""Static decode latency: OSCAR against SGLang's BF16 and FP8 KV caches.

For every configuration one process runs SGLang's own `sglang.benchmark.one_batch` (the old
`sglang.bench_one_batch`) over batch × context (dummy weights, identical flags except the KV
option; decode CUDA graphs captured for exactly --batches). Each point sets up `batch` sequences
of `context` tokens, then runs --decode-steps decode steps; its figure is bench_one_batch's
median decode-step latency over those steps, and the grid is preceded by bench_one_batch's own
warm-up run at the first point (1 x 16384 by default). With --max-batch-search (default on) the
largest batch of --max-batch-context-token sequences that fits (KV pool and request slots) is
measured too, trying downwards from what the pool holds until one runs.

Prefill (--prefill, recorded in the settings and printed with the tables):

  synthetic (default): bench_one_batch's own extend runs with the model forward and the sampler
      replaced. Everything it does to set the batch up still happens — ScheduleBatch.init_new,
      prepare_for_extend (request slots, KV slot allocation, req_to_token rows, seq_lens,
      sampling info), ForwardBatch.init_new — and the first decode input is a random token id
      in the vocabulary per sequence. The KV cache then holds whatever its memory held (zeros
      from start-up, or what earlier points' decode steps wrote), not the prompts' K/V; the
      decode step reads the same bytes with the same kernels either way, so its time does not
      depend on those values. A batch that does not fit is refused where a real prefill would
      be: the KV-pool / request-slot check before the point, or the allocation itself.
  model: the real prefill forward, in forwards of at most --prefill-chunk-tokens tokens (a
      100K-token OSCAR prefill takes ~70 s, so the full grid needs millions of prefill tokens).

Request slots: OSCAR caps them (max_running_requests) to what its BF16 window rows hold
(--oscar-window-fraction, default 0.10: 111 slots on an 80 GB H100 at --mem-fraction-static
0.70). That cap does not bind here: batch 32 fits it, and at 100K tokens the KV pool itself
(1.85M tokens at 0.70) holds 18 sequences, so 32 x 100K is refused by the pool, as it is for
BF16 and FP8. --oscar-args passes other OSCAR flags to the oscar configuration (recorded).

Time on one H100 per configuration: process start-up ~15-20 s, decode CUDA-graph capture for
the three batch sizes 10-90 s (Triton / FlashInfer JIT compilation on a fresh host: OSCAR ~75 s,
FlashInfer ~95 s per KV dtype, cached afterwards), then the grid: with the synthetic prefill a
point is its setup (< 1 s) plus 32 decode steps of 10-100 ms, ~15 s for the grid and the
largest-batch search together.

bench_one_batch does not load SGLang plugins (OSCAR is one), so this module is also its
launcher, which every configuration goes through:

    python -m benchmarks.latency one-batch [--prefill synthetic|model] [--prefill-chunk-tokens N] \\
        [--max-batch-context L] -- <bench_one_batch arguments>

It calls sglang.srt.plugins.load_plugins() (before bench_one_batch builds its parser, where the
plugin adds --kv-quant) and then bench_one_batch's cli_main(). Its worker (`latency_test`, which
bench_one_batch runs in-process for TP 1 and in spawned processes for TP > 1) is replaced by
latency_worker(), which loads the plugins again (a spawned rank starts without them) and runs the
stock latency_test with these additions: every point is appended to the result file as soon as it
ends, a point that raises (e.g. out of memory) is recorded and the sweep goes on, the prefill is
synthetic (above) or, with --prefill model, batches of more than N prompt tokens are prefilled in
several forwards (bench_one_batch prefills a whole batch in one forward, which runs out of
activation memory long before the KV pool is full).

The driver prints every point as the launcher records it, and rewrites the JSON and markdown
after each point, so a run cut off keeps what it measured. Results of several invocations with
the same settings on the same GPU merge point by point (the grid shown is the union).

Run from the repository root (on the GPU machine after `source .gpu/install.sh`):

    python -m benchmarks.latency --budget 520
    python -m benchmarks.latency --configs oscar --batches 1,8 --contexts 100000

Writes <results-dir>/<name>.json, .md and .png; logs go to <results-dir>/logs/<name>/.
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from benchmarks.budget import Budget, run_configurations
from benchmarks.cli_args import BASELINE, OSCAR, add_common_args, kv_flags, parse_int_list
from benchmarks.model_dirs import resolve_model_path
from benchmarks.processes import log_tail, managed_process, raise_keyboard_interrupt_on_sigterm, read_jsonl
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

ONE_BATCH = "one-batch"
SETTINGS_ENV = "OSCAR_BENCH_ONE_BATCH"  # launcher options, inherited by spawned TP ranks
SYNTHETIC, MODEL = "synthetic", "model"
PREFILL_MODES = (SYNTHETIC, MODEL)
MAX_BATCH_ATTEMPTS = 3
MIN_DECODE_STEPS = 3
POLL_S = 2.0
# Fields of bench_one_batch's result that time the prefill (meaningless for a synthetic one).
PREFILL_FIELDS = ("prefill_latency", "prefill_throughput", "total_latency", "overall_throughput")

_STOCK = {}


# ---------------------------------------------------------------------------- launcher (GPU side)


def _stock(owner, name):
    """`owner.name` as SGLang defines it, remembered before this module replaces it."""
    return _STOCK.setdefault((owner.__name__, name), getattr(owner, name))


def prefill_groups(lengths, limit):
    """Split request indices into consecutive groups of at most `limit` tokens (>= 1 request each)."""
    from oscar_sglang.extend_groups import request_groups  # imported late: after the plugin hooks are in

    return [list(range(r0, r1)) for r0, r1 in request_groups(lengths, limit)]


def chunked_extend(extend, limit):
    """Wrap _TorchBenchRunner.extend: prefill at most `limit` tokens per forward, merge the batches.

    The decode steps then run on one batch exactly as after a single prefill (the scheduler
    merges prefilled batches into its running batch the same way).
    """

    def run(self, reqs):
        groups = prefill_groups([len(req.origin_input_ids) for req in reqs], limit)
        if len(groups) == 1:
            return extend(self, reqs)
        import torch

        token_ids, logits, batch = [], [], None
        for group in groups:
            ids, group_logits, part = extend(self, [reqs[i] for i in group])
            token_ids.append(ids)
            logits.append(group_logits)
            if batch is None:
                batch = part
            else:
                batch.merge_batch(part)
        logits = None if any(x is None for x in logits) else torch.cat(logits)
        return torch.cat(token_ids), logits, batch

    return run


@contextlib.contextmanager
def instance_overrides(obj, **attrs):
    """Set attributes on `obj` (e.g. shadowing methods of its class); put them back on exit."""
    missing = object()
    saved = {name: vars(obj).get(name, missing) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield obj
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)  # the class attribute shows through again
            else:
                setattr(obj, name, value)


def synthetic_extend(extend):
    """Wrap _TorchBenchRunner.extend: the stock extend with the model forward and the sampler
    replaced, so the batch is set up exactly as for a real prefill (slots, KV allocation,
    req_to_token, seq_lens, sampling info) but nothing is computed. Returns (random next-token
    ids in the vocabulary, int64 on the batch's device, None for the logits, the batch); the ids
    come from a seeded generator, so every TP rank feeds the same ones."""

    def run(self, reqs):
        import torch

        model_runner = self.torch_runner
        vocab_size = model_runner.model_config.vocab_size

        def forward(forward_batch, *args, **kwargs):
            return types.SimpleNamespace(logits_output=types.SimpleNamespace(next_token_logits=None))

        def sample(logits_output, forward_batch, *args, **kwargs):
            generator = torch.Generator().manual_seed(forward_batch.batch_size)
            ids = torch.randint(0, vocab_size, (forward_batch.batch_size,), generator=generator, dtype=torch.int64)
            return ids.to(forward_batch.seq_lens.device)

        with instance_overrides(model_runner, forward=forward, sample=sample):
            return extend(self, reqs)

    return run


@contextlib.contextmanager
def decode_forward_timer(model_runner):
    """Times every decode forward of `model_runner` while open: yields a list that gets, after
    exit, the milliseconds of each decode `model_runner.forward` as its device sees it (on a GPU
    between CUDA events recorded just before and after it: the model's kernels and the graph
    replay's input copies, not the batch preparation and sampling around it)."""
    import torch

    stock = model_runner.forward
    on_gpu = torch.device(model_runner.device).type == "cuda"
    spans, times = [], []

    def forward(forward_batch, *args, **kwargs):
        if not forward_batch.forward_mode.is_decode():
            return stock(forward_batch, *args, **kwargs)
        if not on_gpu:  # the forward ran to completion when it returns
            start = time.perf_counter()
            result = stock(forward_batch, *args, **kwargs)
            times.append((time.perf_counter() - start) * 1000)
            return result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = stock(forward_batch, *args, **kwargs)
        end.record()
        spans.append((start, end))
        return result

    with instance_overrides(model_runner, forward=forward):
        yield times
    if spans:
        torch.cuda.synchronize()
        times.extend(start.elapsed_time(end) for start, end in spans)


def pool_capacity(runner):
    """KV pool tokens and request slots of a bench_one_batch runner."""
    model_runner = runner.torch_runner
    return {
        "max_total_num_tokens": model_runner.max_total_num_tokens,
        "request_slots": model_runner.req_to_token_pool.size,
    }


def max_batch_size(runner, input_len, output_len):
    """Most sequences of input_len + output_len tokens the KV pool and the request slots hold."""
    return min(runner.max_batch_size(input_len, output_len), pool_capacity(runner)["request_slots"])


def capacity_reason(runner, input_len, output_len):
    """Why a batch is refused: how many sequences the KV pool and the request slots hold."""
    pool = pool_capacity(runner)
    return (
        f"KV pool holds {runner.max_batch_size(input_len, output_len)} sequences of "
        f"{input_len}+{output_len} tokens ({pool['max_total_num_tokens']} tokens), "
        f"request slots {pool['request_slots']}"
    )


class PointRecorder:
    """Records bench_one_batch's points to a JSON-lines file as they end (rank 0 writes)."""

    def __init__(self, path, prefill=MODEL):
        self.path = path
        self.prefill = prefill
        self.runner = None
        self.calls = 0

    def write(self, record):
        if self.path:
            with open(self.path, "a") as out:
                out.write(json.dumps(record) + "\n")

    def wrap_load_model(self, load_model):
        """load_model that also remembers the runner and records the pool capacity."""

        def load(*args, **kwargs):
            runner, tokenizer = load_model(*args, **kwargs)
            self.runner = runner
            self.write({"kind": "pool", **pool_capacity(runner)})
            return runner, tokenizer

        return load

    def wrap_run_once(self, run_once):
        """latency_test_run_once that records each call; latency_test's first call is its warm-up."""
        signature = inspect.signature(run_once)

        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            kind = "warmup" if self.calls == 0 else "point"
            self.calls += 1
            return self.measure(
                kind,
                bound["model_runner"],
                bound["batch_size"],
                bound["input_len"],
                bound["output_len"],
                lambda: run_once(*args, **kwargs),
            )

        return run

    def clean(self, result):
        """A point's result as recorded: with a synthetic prefill its prefill timings are replaced
        by `setup_s` (what setting the batch up took)."""
        result = {k: float(v) if hasattr(v, "item") else v for k, v in result.items()}
        if self.prefill == SYNTHETIC:
            setup = result.get("prefill_latency")
            result = {k: v for k, v in result.items() if k not in PREFILL_FIELDS}
            result["setup_s"] = setup
        return result

    def measure(self, kind, runner, batch_size, input_len, output_len, call):
        """Run one point unless it cannot fit; record ok / skipped / failed; its result or None."""
        point = {"kind": kind, "batch_size": batch_size, "input_len": input_len, "output_len": output_len}
        fits = max_batch_size(runner, input_len, output_len)
        if batch_size > fits:
            self.write({**point, "status": "skipped", "reason": capacity_reason(runner, input_len, output_len)})
            return None
        try:
            with decode_forward_timer(runner.torch_runner) as forward_times:
                result = call()
        except Exception as exc:  # an OOM or a kernel error at one point must not lose the others
            import torch

            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if "available_and_evictable_str" in message:  # alloc_token_slots' error path, whose
                # message needs a method bench_one_batch's stand-in tree cache lacks
                message = f"KV slot allocation failed ({message})"
            self.write({**point, "status": "failed", "error": message})
            runner.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        if result and forward_times:
            result = {**result, "median_forward_ms": statistics.median(forward_times)}
        self.write({**point, "status": "ok" if result else "skipped", **self.clean(result or {})})
        return result


def search_max_batch(recorder, one_batch, bench_args, context, tp_rank):
    """Measure the largest batch of `context`-token sequences that fits (a few tries downwards:
    a batch the pool formula admits can still fail in the allocation itself)."""
    runner = recorder.runner
    output_len = bench_args.output_len[0]
    run_once = _stock(one_batch, "latency_test_run_once")
    fits = max_batch_size(runner, context, output_len)
    for batch_size in range(fits, max(fits - MAX_BATCH_ATTEMPTS, 0), -1):
        call = functools.partial(
            run_once,
            run_name=bench_args.run_name,
            model_runner=runner,
            rank_print=print if tp_rank == 0 else (lambda *a, **k: None),
            reqs=one_batch.prepare_synthetic_inputs_for_latency_test(batch_size, context),
            batch_size=batch_size,
            input_len=context,
            output_len=output_len,
            log_decode_step=0,
            profile=False,
            profile_record_shapes=False,
            profile_activities=("CPU", "GPU"),
            profile_prefix="",
            profile_stage="all",
            tp_rank=tp_rank,
        )
        if recorder.measure("max_batch", runner, batch_size, context, output_len, call):
            return
    if fits < 1:
        recorder.write({
            "kind": "max_batch", "status": "skipped", "input_len": context,
            "reason": "no sequence fits: " + capacity_reason(runner, context, output_len),
        })  # fmt: skip


def latency_worker(server_args, port_args, bench_args, gpu_id, tp_rank):
    """bench_one_batch's latency_test for one TP rank, with plugins and per-point recording."""
    from sglang.benchmark import one_batch
    from sglang.srt.plugins import load_plugins

    load_plugins()  # idempotent; a spawned TP rank starts without plugins
    options = {**vars(launcher_parser().parse_args([])), **json.loads(os.environ[SETTINGS_ENV])}
    recorder = PointRecorder(bench_args.result_filename if tp_rank == 0 else None, options["prefill"])
    one_batch.load_model = recorder.wrap_load_model(_stock(one_batch, "load_model"))
    one_batch.latency_test_run_once = recorder.wrap_run_once(_stock(one_batch, "latency_test_run_once"))
    runner_cls = one_batch._TorchBenchRunner
    if options["prefill"] == SYNTHETIC:
        runner_cls.extend = synthetic_extend(_stock(runner_cls, "extend"))
    elif options["prefill_chunk_tokens"] > 0:
        runner_cls.extend = chunked_extend(_stock(runner_cls, "extend"), options["prefill_chunk_tokens"])
    # The recorder writes the result file; stock latency_test would append the same points again.
    stock_args = dataclasses.replace(bench_args, result_filename="")
    _stock(one_batch, "latency_test")(server_args, port_args, stock_args, gpu_id, tp_rank)
    if options["max_batch_context"]:
        search_max_batch(recorder, one_batch, bench_args, options["max_batch_context"], tp_rank)


def launcher_parser():
    """Options of the one-batch launcher (before `--`)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.latency {ONE_BATCH}")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default=SYNTHETIC)
    parser.add_argument(
        "--prefill-chunk-tokens", type=int, default=0, help="--prefill model: 0 = one prefill forward per batch"
    )
    parser.add_argument(
        "--max-batch-context", type=int, help="also measure the largest batch of this context"
    )
    return parser


def split_launcher_argv(argv):
    """(launcher options, bench_one_batch arguments) of `[options] -- arguments`."""
    if "--" not in argv:
        return [], list(argv)
    cut = argv.index("--")
    return list(argv[:cut]), list(argv[cut + 1 :])


def one_batch_main(argv):
    """Run SGLang's bench_one_batch with plugins loaded and latency_worker() as its worker."""
    own, sglang_argv = split_launcher_argv(argv)
    options = launcher_parser().parse_args(own)
    os.environ[SETTINGS_ENV] = json.dumps(vars(options))
    from sglang.benchmark import one_batch
    from sglang.srt.plugins import load_plugins

    load_plugins()  # before cli_main builds its parser: plugins add flags there
    _stock(one_batch, "latency_test")
    one_batch.latency_test = latency_worker  # main() passes it to every TP rank
    sys.argv = ["sglang.benchmark.one_batch", *sglang_argv]
    one_batch.cli_main()
    return 0


# ---------------------------------------------------------------------------- driver


def decode_steps(text):
    """argparse type: the number of timed decode steps (>= 3, their median is reported)."""
    steps = int(text)
    if steps < MIN_DECODE_STEPS:
        raise argparse.ArgumentTypeError(f"need at least {MIN_DECODE_STEPS} decode steps, got {steps}")
    return steps


def build_parser():
    """Command-line flags of the driver."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0]
    )
    add_common_args(parser, mem_fraction_static=0.70, timeout=300.0)
    parser.add_argument(
        "--batches", type=parse_int_list, default=parse_int_list("1,8,32"), help="(default: 1,8,32)"
    )
    parser.add_argument(
        "--contexts",
        type=parse_int_list,
        default=parse_int_list("16384,32768,100000"),
        help="prompt tokens per sequence (default: 16384,32768,100000)",
    )
    parser.add_argument(
        "--decode-steps",
        type=decode_steps,
        default=32,
        help="timed decode steps per point, their median is the figure (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill",
        choices=PREFILL_MODES,
        default=SYNTHETIC,
        help="synthetic: set the batch up without the prefill forward (KV cache not filled); "
        "model: real prefill (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=131072,
        help="--prefill model: prefill a batch in forwards of at most this many tokens; "
        "0: one forward (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the largest batch of --max-batch-context tokens that fits (default: on)",
    )
    parser.add_argument("--max-batch-context", type=int, default=100000, help="(default: %(default)s)")
    parser.add_argument("--name", default="latency", help="results file stem (default: %(default)s)")
    return parser


def launcher_command(config, args, model_path, result_file):
    """The command measuring one configuration; only kv_flags() differs between them."""
    batches = [str(b) for b in args.batches]
    launcher = ["--prefill", args.prefill, "--prefill-chunk-tokens", str(args.prefill_chunk_tokens)]
    if args.max_batch_search:
        launcher += ["--max-batch-context", str(args.max_batch_context)]
    return [
        sys.executable, "-m", "benchmarks.latency", ONE_BATCH, *launcher, "--",
        "--model-path", str(model_path),
        "--load-format", "dummy",
        "--mem-fraction-static", str(args.mem_fraction_static),
        "--cuda-graph-backend-prefill", "disabled",
        "--cuda-graph-bs-decode", *batches,
        *kv_flags(config, args.oscar_rotations, args.oscar_args),
        "--run-name", config,
        "--batch-size", *batches,
        "--input-len", *(str(c) for c in args.contexts),
        "--output-len", str(args.decode_steps + 1),  # bench_one_batch times output_len - 1 steps
        "--result-filename", str(result_file),
    ]  # fmt: skip


def settings(args, model_path):
    """What must match for results of two invocations to share one file (the grid need not:
    points merge; each configuration's record holds its own KV flags)."""
    return {
        "model": model_path.name,
        "load_format": "dummy",
        "decode_steps": args.decode_steps,
        "mem_fraction_static": args.mem_fraction_static,
        "prefill": args.prefill,
        "prefill_chunk_tokens": args.prefill_chunk_tokens if args.prefill == MODEL else None,
        "max_batch_context": args.max_batch_context,
    }


def config_record(records, code):
    """Summarize the launcher's JSON lines and exit code into one configuration's record
    (code None: timed out; "running": still going)."""

    def strip(record):
        return {k: v for k, v in record.items() if k != "kind"}

    if code == "running":
        status = "running"
    else:
        status = "ok" if code == 0 else ("timeout" if code is None else "failed")
    pools = [strip(r) for r in records if r.get("kind") == "pool"]
    return {
        "status": status,
        "exit_code": code if isinstance(code, int) else None,
        "pool": pools[-1] if pools else None,
        "warmup": [strip(r) for r in records if r.get("kind") == "warmup"],
        "points": [strip(r) for r in records if r.get("kind") == "point"],
        "max_batch": [strip(r) for r in records if r.get("kind") == "max_batch"],
    }


def point_key(point):
    return point.get("batch_size"), point.get("input_len")


def merge_record(old, new):
    """`new` with the points of `old` (an earlier invocation, same settings) that `new` lacks;
    `old`'s largest-batch search and pool are kept when `new` has none."""
    if not old:
        return new
    fresh = {point_key(p) for p in new["points"]}
    merged = dict(new)
    merged["points"] = sorted(
        [p for p in old.get("points", []) if point_key(p) not in fresh] + new["points"],
        key=lambda p: (p["batch_size"], p["input_len"]),
    )
    if not new.get("max_batch") and old.get("max_batch"):
        merged["max_batch"] = old["max_batch"]
    if new.get("pool") is None:
        merged["pool"] = old.get("pool")
    merged["earlier_runs"] = old.get("earlier_runs", []) + [
        {k: old.get(k) for k in ("status", "started", "elapsed_s", "command")}
    ]
    return merged


def progress_line(config, record):
    """One line per JSON line the launcher writes, for the driver's log."""
    kind = record.get("kind")
    if kind == "pool":
        return (
            f"   {config}: KV pool {record['max_total_num_tokens']} tokens, "
            f"{record['request_slots']} request slots"
        )
    where = f"{record.get('batch_size', '-')} x {record.get('input_len')}"
    status = record.get("status")
    if status == "ok" and record.get("median_decode_latency") is not None:
        what = f"{record['median_decode_latency'] * 1000:.2f} ms/step (median)"
    elif status == "ok":
        what = "ok"
    else:
        what = f"{status}: {record.get('reason') or record.get('error') or ''}".rstrip(": ")
    return f"   {config}: {kind} {where}: {what}"


def wait_with_progress(proc, result_file, timeout, on_records):
    """Wait for `proc` up to `timeout` s, calling on_records(all, new) whenever the launcher
    has appended lines to `result_file`; its exit code, or None on timeout."""
    deadline = time.monotonic() + max(timeout, 1.0)
    seen = 0
    code = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            code = proc.wait(timeout=min(POLL_S, left))
        except subprocess.TimeoutExpired:
            code = None
        records = read_jsonl(result_file)
        if len(records) > seen:
            on_records(records, records[seen:])
            seen = len(records)
        if code is not None:
            return code
    return None


def run_config(config, args, model_path, logs_dir, timeout=None, on_progress=None):
    """Run the launcher for one configuration, printing its points as they come; its record.
    on_progress(record) gets the record so far after every new point."""
    timeout = args.timeout if timeout is None else timeout
    log = logs_dir / f"{config}.log"
    result_file = logs_dir / f"{config}.jsonl"
    result_file.unlink(missing_ok=True)  # appended to as points end
    cmd = launcher_command(config, args, model_path, result_file)
    started, start = now_iso(), time.monotonic()
    extra = {
        "started": started,
        "command": shlex.join(cmd),
        "log": str(log),
        "kv_flags": kv_flags(config, args.oscar_rotations, args.oscar_args),
        "cuda_graph_bs": list(args.batches),
        "timeout_s": round(timeout, 1),
    }

    def progress(records, new):
        for record in new:
            print(progress_line(config, record), flush=True)
        if on_progress is not None:
            partial = config_record(records, "running")
            partial.update(extra, elapsed_s=round(time.monotonic() - start, 1))
            on_progress(partial)

    interrupted = False
    try:
        with managed_process(cmd, log) as proc:
            code = wait_with_progress(proc, result_file, timeout, progress)
    except KeyboardInterrupt:  # SIGTERM to the driver: the launcher is stopped, keep its points
        interrupted, code = True, None
    record = config_record(read_jsonl(result_file), code)
    if interrupted:
        record["status"] = "interrupted"
    record.update(extra, elapsed_s=round(time.monotonic() - start, 1))
    if record["status"] != "ok":
        record["log_tail"] = log_tail(log)
    return record


def decode_ms(point):
    """Median decode-step latency of an ok point in ms, else None."""
    if point is None or point.get("status") != "ok" or point.get("median_decode_latency") is None:
        return None
    return point["median_decode_latency"] * 1000


def forward_ms(point):
    """Median GPU time of an ok point's decode forwards in ms (`decode_forward_timer`), else None
    (also for points recorded before it was measured)."""
    if point is None or point.get("status") != "ok":
        return None
    return point.get("median_forward_ms")


def find_point(record, batch_size, context):
    """The point of `record` at batch_size × context, or None."""
    for point in record.get("points", []):
        if point["batch_size"] == batch_size and point["input_len"] == context:
            return point
    return None


def cell(point, value):
    """Table cell of a point: value(point), or why there is none."""
    if point is None:
        return None
    return value(point) if point["status"] == "ok" else point["status"]


def max_batch_point(record):
    """The measured largest-batch point of a record, or None."""
    return next((p for p in record.get("max_batch", []) if p.get("status") == "ok"), None)


def grid_of(doc):
    """(batches, contexts) shown: the union over the merged invocations."""
    grid = doc.get("grid") or doc["settings"]
    return grid["batches"], grid["contexts"]


def latency_table(doc, value=decode_ms, unit="ms"):
    """Markdown table: value(point) (default decode ms/step) per point and configuration, with
    the OSCAR / FP8 ratio."""
    configs = doc["configs"]
    batches, contexts = grid_of(doc)
    names = ordered_configs(configs)
    with_ratio = OSCAR in configs and BASELINE in configs
    headers = ["batch x context", *(f"{name} {unit}" for name in names)]
    headers += [f"{OSCAR} / {BASELINE}"] if with_ratio else []
    rows = []
    for batch_size in batches:
        for context in contexts:
            points = {name: find_point(configs[name], batch_size, context) for name in names}
            row = [f"{batch_size} x {context}", *(cell(points[name], value) for name in names)]
            if with_ratio:
                r = ratio(value(points[OSCAR]), value(points[BASELINE]))
                row.append(None if r is None else f"{r:.2f}x")
            rows.append(row)
    return markdown_table(headers, rows)


def in_cuda_graph(record, batch_size):
    """Whether a batch decodes in a captured graph: SGLang pads a batch up to the next captured
    size, and the launcher captures exactly the invocation's --batches."""
    captured = record.get("cuda_graph_bs") or []
    return bool(captured) and batch_size <= max(captured)


def capacity_table(doc):
    """Markdown table: KV pool, request slots and the largest batch per configuration."""
    configs = doc["configs"]
    rows = []
    for name in ordered_configs(configs):
        record = configs[name]
        pool = record.get("pool") or {}
        best = max_batch_point(record)
        rows.append([
            name if record["status"] == "ok" else f"{name} ({record['status']})",
            pool.get("max_total_num_tokens"),
            pool.get("request_slots"),
            best and best["batch_size"],
            decode_ms(best),
            best and best.get("median_decode_throughput"),
            best and ("yes" if in_cuda_graph(record, best["batch_size"]) else "no (eager)"),
        ])  # fmt: skip
    context = doc["settings"].get("max_batch_context")
    headers = ["config", "KV pool tokens", "request slots", f"max batch @ {context}", "decode ms", "decode tok/s"]
    return markdown_table([*headers, "CUDA graph"], rows)


def ratio_lines(doc):
    """OSCAR / FP8-FlashInfer for KV pool tokens and the largest batch."""
    configs = doc["configs"]
    if OSCAR not in configs or BASELINE not in configs:
        return []
    ours, base = configs[OSCAR], configs[BASELINE]
    pool = ratio(
        (ours.get("pool") or {}).get("max_total_num_tokens"), (base.get("pool") or {}).get("max_total_num_tokens")
    )
    best_ours, best_base = max_batch_point(ours), max_batch_point(base)
    batch = ratio(best_ours and best_ours["batch_size"], best_base and best_base["batch_size"])
    pool = "—" if pool is None else f"{pool:.2f}x"
    batch = "—" if batch is None else f"{batch:.2f}x"
    return [f"{OSCAR} / {BASELINE}: KV pool tokens {pool}, largest batch {batch}"]


def notes(doc):
    """What the tables measure, in words (printed above them)."""
    s = doc["settings"]
    lines = [
        (
            f"{s['model']} ({s['load_format']} weights), SGLang bench_one_batch, "
            f"--mem-fraction-static {s['mem_fraction_static']}: median decode-step latency (ms) "
            f"over {s['decode_steps']} decode steps per point, after bench_one_batch's warm-up run."
        )
    ]
    if s.get("prefill") == SYNTHETIC:
        lines.append(
            "Prefill: synthetic. Each point's batch is set up as bench_one_batch's extend does it "
            "(request slots, KV slot allocation, req_to_token, seq_lens) but the prefill forward "
            "is skipped and the first decode tokens are random ids: the KV cache holds stale or "
            "zeroed memory instead of the prompts' K/V, which does not change decode time."
        )
    else:
        chunk = s.get("prefill_chunk_tokens")
        lines.append(f"Prefill: model (real forward, at most {chunk or 'all'} tokens per forward).")
    lines += kv_flag_lines(doc)
    return "\n\n".join(lines)


def forward_section(doc):
    """The GPU-forward table, when any point has that measurement."""
    points = [p for record in doc["configs"].values() for p in record.get("points", [])]
    if not any(forward_ms(p) is not None for p in points):
        return []
    return [
        "GPU time of the decode forward alone (median over the same steps; CUDA events around "
        "ModelRunner.forward): the step above minus bench_one_batch's host-side batch "
        "preparation, sampling and synchronization, which a serving scheduler overlaps with the "
        "previous step's forward.",
        latency_table(doc, forward_ms, "GPU forward ms"),
    ]


def markdown(doc):
    """The whole markdown report."""
    parts = [notes(doc), latency_table(doc), *forward_section(doc), capacity_table(doc), *ratio_lines(doc)]
    return "\n\n".join(parts) + "\n"


def plot(doc, path):
    """Decode latency per point, KV pool capacity and (if searched) the largest batch."""
    configs = doc["configs"]
    batches, contexts = grid_of(doc)
    names = ordered_configs(configs)
    points = [(b, c) for b in batches for c in contexts]
    panels = [
        {
            "title": "decode latency (median)",
            "ylabel": "ms / step",
            "groups": [f"{b}x{c}" for b, c in points],
            "series": {
                name: [decode_ms(find_point(configs[name], b, c)) for b, c in points] for name in names
            },
        },
        {
            "title": "KV pool",
            "ylabel": "tokens",
            "groups": [""],
            "series": {
                name: [(configs[name].get("pool") or {}).get("max_total_num_tokens")] for name in names
            },
        },
    ]
    best = {name: max_batch_point(configs[name]) for name in names}
    if any(best.values()):
        panels.append({
            "title": f"largest batch @ {doc['settings'].get('max_batch_context')} tokens",
            "ylabel": "sequences",
            "groups": [""],
            "series": {name: [best[name] and best[name]["batch_size"]] for name in names},
        })  # fmt: skip
    return plot_panels(path, f"{doc['settings']['model']}: bench_one_batch decode latency", panels)


def results_doc(json_path, run_settings, machine, config, record, previous, args):
    """The results document with `record` merged in (point by point with `previous`'s)."""
    old_configs = (previous or {}).get("configs", {})
    record = merge_record(old_configs.get(config), record)
    doc = merge_results(json_path, "latency", run_settings, machine, {config: record}, previous=previous)
    old_batches, old_contexts = grid_of(previous) if previous and previous.get("grid") else ([], [])
    doc["grid"] = {
        "batches": sorted(set(old_batches) | set(args.batches)),
        "contexts": sorted(set(old_contexts) | set(args.contexts)),
    }
    return doc


def main(argv=None):
    """The driver, or the one-batch launcher when the first argument is `one-batch`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [ONE_BATCH]:
        return one_batch_main(argv[1:])
    args = build_parser().parse_args(argv)
    raise_keyboard_interrupt_on_sigterm()
    budget = Budget(args.timeout, args.budget)
    model_path = resolve_model_path(args)
    json_path = Path(args.results_dir) / f"{args.name}.json"
    logs_dir = Path(args.results_dir) / "logs" / args.name
    if args.dry_run:
        for config in args.configs:
            print(
                f"# {config}\n{shlex.join(launcher_command(config, args, model_path, logs_dir / f'{config}.jsonl'))}"
            )
        return 0
    machine, run_settings = machine_info(), settings(args, model_path)

    def run_one(config, timeout):
        previous = load_compatible(json_path, "latency", run_settings, machine)
        print(f"== {config}: running bench_one_batch (limit {timeout:.0f} s, prefill {args.prefill})", flush=True)

        def on_progress(partial):
            write_results(results_doc(json_path, run_settings, machine, config, partial, previous, args),
                          json_path, markdown)

        record = run_config(config, args, model_path, logs_dir, timeout, on_progress)
        doc = results_doc(json_path, run_settings, machine, config, record, previous, args)
        write_results(doc, json_path, markdown)
        print(f"== {config}: {record['status']} in {record['elapsed_s']} s", flush=True)
        return record, doc

    return run_configurations(args.configs, budget, run_one, markdown, plot, json_path, logs_dir)


if __name__ == "__main__":
    sys.exit(main())
