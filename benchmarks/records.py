"""What the benchmarks record and how they report it: the machine (GPUs, host, package versions),
results documents (JSON merged across invocations with the same settings on the same GPU,
written atomically), markdown tables and PNG bar charts.
"""

import contextlib
import datetime
import importlib.metadata
import json
import platform
import shlex
import socket
import subprocess
from pathlib import Path

from benchmarks.cli_args import KV_CONFIGS
from benchmarks.processes import GPU_ENV

PACKAGES = ("sglang", "torch", "flashinfer-python", "triton", "oscar-sglang")


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


def write_results(doc, json_path, markdown):
    """The JSON and its markdown report (the PNG is drawn once at the end)."""
    write_json(json_path, doc)
    write_text(json_path.with_suffix(".md"), markdown(doc))


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
