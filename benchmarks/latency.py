"""Static decode latency: OSCAR against SGLang's BF16 and FP8 KV caches.

For every configuration one process runs SGLang's own `sglang.benchmark.one_batch` (the old
`sglang.bench_one_batch`) over batch × context (dummy weights, identical flags except the KV
option). Each point is a prefill of `batch` random sequences of `context` tokens, then
--decode-steps decode steps; its figure is bench_one_batch's median decode-step latency (the
grid is preceded by bench_one_batch's own warm-up run at the smallest point). Optionally
(--max-batch-search) the largest batch of --max-batch-context-token sequences that fits is
measured too.

bench_one_batch does not load SGLang plugins (OSCAR is one), so this module is also its
launcher, which every configuration goes through:

    python -m benchmarks.latency one-batch [--prefill-chunk-tokens N] [--max-batch-context L] \\
        -- <bench_one_batch arguments>

It calls sglang.srt.plugins.load_plugins() (before bench_one_batch builds its parser, where the
plugin adds --kv-quant) and then bench_one_batch's cli_main(). Its worker (`latency_test`, which
bench_one_batch runs in-process for TP 1 and in spawned processes for TP > 1) is replaced by
latency_worker(), which loads the plugins again (a spawned rank starts without them) and runs the
stock latency_test with three additions: every point is appended to the result file as soon as it
ends, a point that raises (e.g. out of memory) is recorded and the sweep goes on, and batches of
more than N prompt tokens are prefilled in several forwards (bench_one_batch prefills a whole
batch in one forward, which runs out of activation memory long before the KV pool is full).

Run from the repository root (on the GPU machine after `source .gpu/install.sh`):

    python -m benchmarks.latency
    python -m benchmarks.latency --configs oscar --batches 1,8 --contexts 100000 --max-batch-search

Writes <results-dir>/<name>.json, .md and .png; logs go to <results-dir>/logs/<name>/.
"""

import argparse
import dataclasses
import functools
import inspect
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks.common import (
    BASELINE,
    OSCAR,
    add_common_args,
    kv_flags,
    log_tail,
    machine_info,
    markdown_table,
    merge_results,
    now_iso,
    ordered_configs,
    parse_int_list,
    plot_panels,
    raise_keyboard_interrupt_on_sigterm,
    ratio,
    read_jsonl,
    resolve_model_path,
    run_logged,
    write_json,
)

ONE_BATCH = "one-batch"
SETTINGS_ENV = "OSCAR_BENCH_ONE_BATCH"  # launcher options, inherited by spawned TP ranks
MAX_BATCH_ATTEMPTS = 3
MIN_DECODE_STEPS = 3

_STOCK = {}


# ---------------------------------------------------------------------------- launcher (GPU side)


def _stock(owner, name):
    """`owner.name` as SGLang defines it, remembered before this module replaces it."""
    return _STOCK.setdefault((owner.__name__, name), getattr(owner, name))


def prefill_groups(lengths, limit):
    """Split request indices into consecutive groups of at most `limit` tokens (>= 1 request each)."""
    groups, current, total = [], [], 0
    for index, length in enumerate(lengths):
        if current and total + length > limit:
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += length
    if current:
        groups.append(current)
    return groups


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
        return torch.cat(token_ids), torch.cat(logits), batch

    return run


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


class PointRecorder:
    """Records bench_one_batch's points to a JSON-lines file as they end (rank 0 writes)."""

    def __init__(self, path):
        self.path = path
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

    def measure(self, kind, runner, batch_size, input_len, output_len, call):
        """Run one point unless it cannot fit; record ok / skipped / failed; its result or None."""
        point = {"kind": kind, "batch_size": batch_size, "input_len": input_len, "output_len": output_len}
        fits = max_batch_size(runner, input_len, output_len)
        if batch_size > fits:
            self.write({**point, "status": "skipped", "reason": f"KV pool and request slots hold {fits}"})
            return None
        try:
            result = call()
        except Exception as exc:  # an OOM or a kernel error at one point must not lose the others
            import torch

            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.write({**point, "status": "failed", "error": message})
            runner.clear()
            torch.cuda.empty_cache()
            return None
        self.write({**point, "status": "ok" if result else "skipped", **(result or {})})
        return result


def search_max_batch(recorder, one_batch, bench_args, context, tp_rank):
    """Measure the largest batch of `context`-token sequences that fits (a few tries downwards)."""
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
        recorder.write(
            {"kind": "max_batch", "status": "skipped", "input_len": context, "reason": "no sequence fits"}
        )


def latency_worker(server_args, port_args, bench_args, gpu_id, tp_rank):
    """bench_one_batch's latency_test for one TP rank, with plugins and per-point recording."""
    from sglang.benchmark import one_batch
    from sglang.srt.plugins import load_plugins

    load_plugins()  # idempotent; a spawned TP rank starts without plugins
    options = json.loads(os.environ[SETTINGS_ENV])
    recorder = PointRecorder(bench_args.result_filename if tp_rank == 0 else None)
    one_batch.load_model = recorder.wrap_load_model(_stock(one_batch, "load_model"))
    one_batch.latency_test_run_once = recorder.wrap_run_once(_stock(one_batch, "latency_test_run_once"))
    if options["prefill_chunk_tokens"] > 0:
        runner_cls = one_batch._TorchBenchRunner
        runner_cls.extend = chunked_extend(_stock(runner_cls, "extend"), options["prefill_chunk_tokens"])
    # The recorder writes the result file; stock latency_test would append the same points again.
    stock_args = dataclasses.replace(bench_args, result_filename="")
    _stock(one_batch, "latency_test")(server_args, port_args, stock_args, gpu_id, tp_rank)
    if options["max_batch_context"]:
        search_max_batch(recorder, one_batch, bench_args, options["max_batch_context"], tp_rank)


def launcher_parser():
    """Options of the one-batch launcher (before `--`)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.latency {ONE_BATCH}")
    parser.add_argument(
        "--prefill-chunk-tokens", type=int, default=0, help="0: one prefill forward per batch"
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
    add_common_args(parser, mem_fraction_static=0.70, timeout=900.0)
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
        help="timed decode steps per point (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=131072,
        help="prefill a batch in forwards of at most this many tokens; 0: one forward (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-search", action="store_true", help="also measure the largest batch that fits"
    )
    parser.add_argument("--max-batch-context", type=int, default=100000, help="(default: %(default)s)")
    parser.add_argument("--name", default="latency", help="results file stem (default: %(default)s)")
    return parser


def launcher_command(config, args, model_path, result_file):
    """The command measuring one configuration; only kv_flags() differs between them."""
    batches = [str(b) for b in args.batches]
    launcher = ["--prefill-chunk-tokens", str(args.prefill_chunk_tokens)]
    if args.max_batch_search:
        launcher += ["--max-batch-context", str(args.max_batch_context)]
    return [
        sys.executable, "-m", "benchmarks.latency", ONE_BATCH, *launcher, "--",
        "--model-path", str(model_path),
        "--load-format", "dummy",
        "--mem-fraction-static", str(args.mem_fraction_static),
        "--cuda-graph-backend-prefill", "disabled",
        "--cuda-graph-bs-decode", *batches,
        *kv_flags(config, args.oscar_rotations),
        "--run-name", config,
        "--batch-size", *batches,
        "--input-len", *(str(c) for c in args.contexts),
        "--output-len", str(args.decode_steps + 1),  # bench_one_batch times output_len - 1 steps
        "--result-filename", str(result_file),
    ]  # fmt: skip


def settings(args, model_path):
    """What must match for results of two invocations to share one file."""
    return {
        "model": model_path.name,
        "load_format": "dummy",
        "batches": args.batches,
        "contexts": args.contexts,
        "decode_steps": args.decode_steps,
        "mem_fraction_static": args.mem_fraction_static,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "max_batch_context": args.max_batch_context if args.max_batch_search else None,
        "oscar_rotations": args.oscar_rotations.name if args.oscar_rotations else None,
    }


def config_record(records, code):
    """Summarize the launcher's JSON lines and exit code into one configuration's record."""

    def strip(record):
        return {k: v for k, v in record.items() if k != "kind"}

    status = "ok" if code == 0 else ("timeout" if code is None else "failed")
    pools = [strip(r) for r in records if r["kind"] == "pool"]
    return {
        "status": status,
        "exit_code": code,
        "pool": pools[-1] if pools else None,
        "warmup": [strip(r) for r in records if r["kind"] == "warmup"],
        "points": [strip(r) for r in records if r["kind"] == "point"],
        "max_batch": [strip(r) for r in records if r["kind"] == "max_batch"],
    }


def run_config(config, args, model_path, logs_dir):
    """Run the launcher for one configuration; its record."""
    log = logs_dir / f"{config}.log"
    result_file = logs_dir / f"{config}.jsonl"
    result_file.unlink(missing_ok=True)  # appended to as points end
    cmd = launcher_command(config, args, model_path, result_file)
    started, start = now_iso(), time.monotonic()
    code = run_logged(cmd, log, args.timeout)
    record = config_record(read_jsonl(result_file), code)
    record.update(
        started=started, elapsed_s=round(time.monotonic() - start, 1), command=shlex.join(cmd), log=str(log)
    )
    if record["status"] != "ok":
        record["log_tail"] = log_tail(log)
    return record


def decode_ms(point):
    """Median decode-step latency of an ok point in ms, else None."""
    if point is None or point.get("status") != "ok":
        return None
    return point["median_decode_latency"] * 1000


def find_point(record, batch_size, context):
    """The point of `record` at batch_size × context, or None."""
    for point in record.get("points", []):
        if point["batch_size"] == batch_size and point["input_len"] == context:
            return point
    return None


def cell(point):
    """Table cell of a point: decode ms, or why there is none."""
    if point is None:
        return None
    return decode_ms(point) if point["status"] == "ok" else point["status"]


def max_batch_point(record):
    """The measured largest-batch point of a record, or None."""
    return next((p for p in record.get("max_batch", []) if p.get("status") == "ok"), None)


def latency_table(doc):
    """Markdown table: decode ms/step per point and configuration, with the OSCAR / FP8 ratio."""
    configs, grid = doc["configs"], doc["settings"]
    names = ordered_configs(configs)
    with_ratio = OSCAR in configs and BASELINE in configs
    headers = ["batch x context", *(f"{name} ms" for name in names)]
    headers += [f"{OSCAR} / {BASELINE}"] if with_ratio else []
    rows = []
    for batch_size in grid["batches"]:
        for context in grid["contexts"]:
            points = {name: find_point(configs[name], batch_size, context) for name in names}
            row = [f"{batch_size} x {context}", *(cell(points[name]) for name in names)]
            if with_ratio:
                r = ratio(decode_ms(points[OSCAR]), decode_ms(points[BASELINE]))
                row.append(None if r is None else f"{r:.2f}x")
            rows.append(row)
    return markdown_table(headers, rows)


def capacity_table(doc):
    """Markdown table: KV pool, request slots and the largest batch per configuration.

    "CUDA graph" says whether that batch decodes in a captured graph: SGLang pads a batch up to
    the next captured size, and the launcher captures exactly --batches.
    """
    configs, grid = doc["configs"], doc["settings"]
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
            best and best["median_decode_throughput"],
            best and ("yes" if best["batch_size"] <= max(grid["batches"]) else "no (eager)"),
        ])  # fmt: skip
    label = f"@ {grid['max_batch_context']}" if grid["max_batch_context"] else "(not searched)"
    headers = ["config", "KV pool tokens", "request slots", f"max batch {label}", "decode ms", "decode tok/s"]
    return markdown_table([*headers, "CUDA graph"], rows)


def plot(doc, path):
    """Decode latency per point, KV pool capacity and (if searched) the largest batch."""
    configs, grid = doc["configs"], doc["settings"]
    names = ordered_configs(configs)
    points = [(b, c) for b in grid["batches"] for c in grid["contexts"]]
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
    if grid["max_batch_context"]:
        best = {name: max_batch_point(configs[name]) for name in names}
        panels.append({
            "title": f"largest batch @ {grid['max_batch_context']} tokens",
            "ylabel": "sequences",
            "groups": [""],
            "series": {name: [best[name] and best[name]["batch_size"]] for name in names},
        })  # fmt: skip
    return plot_panels(path, f"{grid['model']}: bench_one_batch decode latency", panels)


def main(argv=None):
    """The driver, or the one-batch launcher when the first argument is `one-batch`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [ONE_BATCH]:
        return one_batch_main(argv[1:])
    args = build_parser().parse_args(argv)
    raise_keyboard_interrupt_on_sigterm()
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
    failed = []
    for config in args.configs:
        print(f"== {config}: running bench_one_batch", flush=True)
        record = run_config(config, args, model_path, logs_dir)
        doc = merge_results(json_path, "latency", run_settings, machine, {config: record})
        write_json(json_path, doc)
        print(f"== {config}: {record['status']} in {record['elapsed_s']} s", flush=True)
        if record["status"] != "ok":
            failed.append(config)
    markdown = latency_table(doc) + "\n\n" + capacity_table(doc)
    print(markdown)
    json_path.with_suffix(".md").write_text(markdown + "\n")
    plot(doc, json_path.with_suffix(".png"))
    print(f"results: {json_path} (.md, .png); logs: {logs_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
