"""Helpers shared by the serving and latency benchmarks.

The KV configurations compared (the oscar one takes extra flags through --oscar-args), the
dummy-weight model folder, process management (every child runs in its own process group with
GPU_ENV set, is stopped with its group when its configuration ends, fails or times out, and gets
SIGTERM if the benchmark itself is killed), time limits (per configuration, and an optional
budget for the whole invocation), machine facts, the results files (JSON merged across
invocations with the same settings on the same GPU, markdown table, PNG chart).
"""

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import lzma
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from oscar_sglang.config import DATA_FREE_ROTATIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "oscar-bench"
DEFAULT_MODEL = "qwen3-8b"
TOKENIZER_DIR = "qwen-tokenizer"

# Set for every process the benchmarks start: NVLink multicast stays off on the lent machines.
GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# The only flags that differ between configurations; everything else is shared.
KV_CONFIGS = {
    "bf16-flashinfer": ["--attention-backend", "flashinfer"],
    "bf16-triton": ["--attention-backend", "triton"],
    "fp8-flashinfer": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "flashinfer"],
    "fp8-triton": ["--kv-cache-dtype", "fp8_e4m3", "--attention-backend", "triton"],
    "oscar": ["--kv-quant", "oscar"],
}
DEFAULT_CONFIGS = "bf16-flashinfer,fp8-flashinfer,fp8-triton,oscar"
OSCAR = "oscar"
BASELINE = "fp8-flashinfer"

PACKAGES = ("sglang", "torch", "flashinfer-python", "triton", "oscar-sglang")

# A budget (--budget) keeps this much for stopping the running configuration's process group
# (SIGTERM, up to 30 s grace) and writing the results; a configuration is not started with less
# than MIN_CONFIG_S of it left.
BUDGET_MARGIN_S = 45.0
MIN_CONFIG_S = 60.0


# ---------------------------------------------------------------------------- arguments


def parse_configs(text):
    """argparse type: comma-separated configuration names, validated, order kept."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KV_CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {unknown or text!r}; choose from {', '.join(KV_CONFIGS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"configuration listed twice in {text!r}")
    return names


def parse_int_list(text):
    """argparse type: comma-separated positive integers, returned sorted and unique."""
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def flag_list(text):
    """argparse type: extra command-line flags in one shell-quoted string."""
    try:
        flags = shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {exc}") from None
    if flags and not flags[0].startswith("-"):
        raise argparse.ArgumentTypeError(f"expected flags (starting with -), got {text!r}")
    return flags


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def existing_file(text):
    """argparse type: a path that must name an existing file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def add_common_args(parser, mem_fraction_static, timeout):
    """Add the flags both benchmarks share (configurations, model, output places, limits)."""
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs(DEFAULT_CONFIGS),
        help=f"comma-separated, from {', '.join(KV_CONFIGS)} (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        help="model folder (default: a dummy-weight Qwen3-8B folder prepared in --work-dir)",
    )
    parser.add_argument(
        "--shared-models",
        type=Path,
        help="folder holding qwen3-8b/ and qwen-tokenizer/ (default: shared/models, "
        "../shared/models or .gpu/models, whichever exists)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="for the model folder (default: %(default)s)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="JSON, markdown, PNG and logs/ go here (default: benchmarks/results)",
    )
    parser.add_argument(
        "--mem-fraction-static", type=float, default=mem_fraction_static, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help="seconds allowed per configuration, start-up included (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole invocation: each configuration's limit is cut to what is "
        f"left minus {BUDGET_MARGIN_S:.0f} s (stopping and writing results), and a configuration "
        f"with less than {MIN_CONFIG_S:.0f} s left is not started (default: no budget)",
    )
    parser.add_argument(
        "--oscar-rotations",
        type=existing_file,
        help="rotation artifact passed to the oscar configuration (default: --oscar-rotations "
        f"{DATA_FREE_ROTATIONS}, the data-free rotations: the servers run dummy weights, whose "
        "throughput does not depend on them)",
    )
    parser.add_argument(
        "--oscar-args",
        type=flag_list,
        default=[],
        help="extra flags for the oscar configuration only, one quoted string, e.g. "
        "--oscar-args='--oscar-window-fraction 0.3' (recorded with its results)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and exit without running them"
    )


def add_parallel_args(parser):
    """--tp-size / --dp-size, passed unchanged to every configuration's server."""
    parser.add_argument(
        "--tp-size",
        type=positive_int,
        default=1,
        help="tensor parallelism of every configuration's server (SGLang --tp-size: KV heads "
        "and weights split over that many GPUs; default: %(default)s)",
    )
    parser.add_argument(
        "--dp-size",
        type=positive_int,
        default=1,
        help="data parallelism of every configuration's server (SGLang --dp-size: that many "
        "schedulers, each with a whole model on --tp-size GPUs, requests spread round robin; "
        "default: %(default)s)",
    )


def parallel_settings(args):
    """{"tp_size": N, "dp_size": M} for a parallel run, {} for one GPU (so that results files
    written before these flags existed keep matching a default run)."""
    sizes = {name: getattr(args, name, 1) for name in ("tp_size", "dp_size")}
    return sizes if any(value != 1 for value in sizes.values()) else {}


def kv_flags(config, oscar_rotations=None, oscar_args=()):
    """SGLang flags selecting the KV cache and attention backend of one configuration
    (the oscar configuration also gets its rotation file, data-free without one, and
    --oscar-args)."""
    flags = list(KV_CONFIGS[config])
    if config == OSCAR:
        rotations = DATA_FREE_ROTATIONS if oscar_rotations is None else str(oscar_rotations)
        flags += ["--oscar-rotations", rotations, *oscar_args]
    return flags


class Budget:
    """Per-configuration time limits under an optional budget for the whole invocation."""

    def __init__(self, per_config, total=None, clock=time.monotonic):
        self.per_config = per_config
        self.clock = clock
        self.deadline = None if total is None else clock() + total

    def config_timeout(self):
        """Seconds the next configuration may run, or None if too little budget is left."""
        if self.deadline is None:
            return self.per_config
        left = self.deadline - self.clock() - BUDGET_MARGIN_S
        if left < MIN_CONFIG_S:
            return None
        return min(self.per_config, left)


def run_configurations(configs, budget, run_one, markdown, plot, json_path, logs_dir):
    """The drivers' loop: run_one(config, timeout) -> (record, results doc so far) for every
    configuration the budget still allows, then the markdown report printed and the PNG drawn.
    Returns the exit status: 0 all ok, 1 any failed or not started, 130 interrupted."""
    failed, doc = [], None
    for config in configs:
        timeout = budget.config_timeout()
        if timeout is None:
            print(f"== {config}: not started, the --budget is spent", flush=True)
            failed.append(config)
            continue
        record, doc = run_one(config, timeout)
        if record["status"] != "ok":
            failed.append(config)
        if record["status"] == "interrupted":
            print(f"interrupted; results so far: {json_path}", flush=True)
            return 130
    if doc is None:
        return 1
    print(markdown(doc))
    plot(doc, json_path.with_suffix(".png"))
    print(f"results: {json_path} (.md, .png); logs: {logs_dir}")
    return 1 if failed else 0


@contextlib.contextmanager
def module_constants(module, overrides):
    """`module`'s constants (name -> value) set to `overrides` inside the block, restored after:
    how the kernel sweeps try launch parameters of the library's own kernels."""
    saved = {name: getattr(module, name) for name in overrides}
    for name, value in overrides.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def write_results(doc, json_path, markdown):
    """The JSON and its markdown report (the PNG is drawn once at the end)."""
    write_json(json_path, doc)
    write_text(json_path.with_suffix(".md"), markdown(doc))


# ---------------------------------------------------------------------------- model folder


def find_shared_models(explicit=None):
    """The folder with the dummy-model configs and the tokenizer (see shared/models/README.md)."""
    candidates = (
        [Path(explicit)]
        if explicit
        else [
            REPO_ROOT / "shared" / "models",
            REPO_ROOT.parent / "shared" / "models",
            REPO_ROOT / ".gpu" / "models",
        ]
    )
    for folder in candidates:
        if (folder / DEFAULT_MODEL / "config.json").is_file() and (folder / TOKENIZER_DIR).is_dir():
            return folder
    raise FileNotFoundError(
        "no shared models folder with qwen3-8b/config.json and qwen-tokenizer/ in "
        + ", ".join(map(str, candidates))
        + "; pass --shared-models or --model-path"
    )


def prepare_model_dir(shared_models, work_dir, model=DEFAULT_MODEL):
    """Create (once) a servable dummy-weight folder: config.json plus the Qwen tokenizer files.

    tokenizer.json is taken as is or decompressed from tokenizer.json.xz.
    """
    shared_models = Path(shared_models)
    target = Path(work_dir) / f"{model}-dummy"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_models / model / "config.json", target / "config.json")
    tokenizer = shared_models / TOKENIZER_DIR
    shutil.copyfile(tokenizer / "tokenizer_config.json", target / "tokenizer_config.json")
    if not (target / "tokenizer.json").is_file():
        partial = target / "tokenizer.json.partial"
        if (tokenizer / "tokenizer.json").is_file():
            shutil.copyfile(tokenizer / "tokenizer.json", partial)
        else:
            with lzma.open(tokenizer / "tokenizer.json.xz") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        partial.rename(target / "tokenizer.json")
    return target


def resolve_model_path(args):
    """--model-path if given, else the prepared dummy Qwen3-8B folder."""
    if args.model_path is not None:
        return args.model_path.resolve()
    return prepare_model_dir(find_shared_models(args.shared_models), args.work_dir).resolve()


# ---------------------------------------------------------------------------- processes


def child_env():
    """Environment for every process the benchmarks start."""
    return {**os.environ, **GPU_ENV, "PYTHONUNBUFFERED": "1"}


def free_port():
    """A TCP port that is free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid):
    """Pids of the live (not zombie) processes in process group `pgid`, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.append(int(stat.parent.name))
    return members


def stop_process_group(proc, grace=30.0):
    """Stop `proc` and everything in its process group: SIGTERM, then SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None and not group_members(proc.pid):
            return


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """Run in the child before exec: SIGTERM it when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def managed_process(cmd, log_path):
    """Start `cmd` in a new process group with output to `log_path`; stop the group on exit."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            yield proc
        finally:
            stop_process_group(proc)


def run_logged(cmd, log_path, timeout):
    """Run `cmd` to completion with output to `log_path`; its exit code, or None on timeout."""
    with managed_process(cmd, log_path) as proc:
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            return None


def wait_for_http_ok(url, proc, timeout):
    """Poll `url` until it answers 200; raise if `proc` exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def raise_keyboard_interrupt_on_sigterm():
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt so cleanup blocks run."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def log_tail(path, lines=40):
    """The last `lines` lines of a text file ('' if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_jsonl(path):
    """The JSON objects of a JSON-lines file ([] if it does not exist).

    A line that does not parse (a writer killed mid-line) is left out.
    """
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


# ---------------------------------------------------------------------------- machine


def _nvidia_smi_gpus():
    query = "name,memory.total,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    fields = query.split(",")
    return [
        dict(zip(fields, (part.strip() for part in line.split(",")))) for line in out.splitlines() if line
    ]


def _torch_gpus():
    import torch

    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]


def package_versions():
    """Installed versions of the packages that decide the numbers."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def machine_info():
    """GPUs (nvidia-smi, else torch), host, Python and package versions."""
    return {
        "gpus": _nvidia_smi_gpus() or _torch_gpus(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "env": GPU_ENV,
    }


# ---------------------------------------------------------------------------- results


def now_iso():
    """The current UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _gpu_names(machine):
    return [gpu.get("name") for gpu in machine.get("gpus", [])]


def load_compatible(path, benchmark, settings, machine, quiet=False):
    """The results document at `path` if its benchmark, settings and GPU match, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = {}
    same = (
        old.get("benchmark") == benchmark
        and old.get("settings") == settings
        and _gpu_names(old.get("machine", {})) == _gpu_names(machine)
    )
    if same:
        return old
    if not quiet:
        print(f"note: {path} holds results of other settings or another GPU; replacing them")
    return None


_LOAD = object()


def merge_results(path, benchmark, settings, machine, configs, previous=_LOAD):
    """The results document at `path` with `configs` (name → record) added or replaced.

    Records from an earlier invocation are kept only when its benchmark, settings and GPU
    match, so a run split over several invocations (one configuration each) ends in one file.
    `previous`: what load_compatible() returned for `path`, if already loaded (None: nothing kept).
    """
    if previous is _LOAD:
        previous = load_compatible(path, benchmark, settings, machine)
    kept = (previous or {}).get("configs", {})
    return {
        "benchmark": benchmark,
        "updated": now_iso(),
        "settings": settings,
        "machine": machine,
        "configs": {**kept, **configs},
    }


def write_json(path, doc):
    """Write `doc` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def write_text(path, text):
    """Write a text file atomically (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def kv_flag_lines(doc):
    """'config: `flags`' for every configuration of a results doc that recorded its KV flags."""
    lines = []
    for name in ordered_configs(doc["configs"]):
        flags = doc["configs"][name].get("kv_flags")
        if flags:
            lines.append(f"{name}: `{shlex.join(flags)}`")
    return lines


def ordered_configs(configs):
    """Configuration names in the canonical KV_CONFIGS order."""
    return [name for name in KV_CONFIGS if name in configs]


def fmt(value, digits=1):
    """A table cell: numbers with `digits` decimals (integers as is), '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(numerator, denominator):
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def markdown_table(headers, rows):
    """A GitHub markdown table; cells are formatted with fmt()."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_panels(path, title, panels):
    """Save a PNG with one bar-chart panel per entry of `panels`; False if matplotlib is absent.

    Each panel is a dict: title, ylabel, groups (x labels) and series (label → one value or
    None per group; None bars are left out).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no PNG written")
        return False
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        groups, series = panel["groups"], panel["series"]
        width = 0.8 / max(len(series), 1)
        for k, (label, values) in enumerate(series.items()):
            xs = [g + (k - (len(series) - 1) / 2) * width for g, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            ax.bar(xs, ys, width, label=label)
        tilt = len(groups) > 3
        ax.set_xticks(
            range(len(groups)), groups, rotation=30 if tilt else 0, ha="right" if tilt else "center"
        )
        ax.set_title(panel["title"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
