"""Accuracy harness (`oscar-sglang evaluate`): the model with each KV-cache format simulated as a
decoding server reads it (kv_formats.py, attention.windowed_attention), on held-out text.

Metrics per format: perplexity; KL divergence and top-1 agreement of the next-token
distribution vs the BF16 cache; retrieval (calibration.retrieval: passkey and multi-needle
prompts built from held-out text, the same ids the server benchmark sends), scored as correct
when greedy argmax reproduces every answer token under teacher forcing, which is exactly when
greedy generation would produce the answer. Rates carry Wilson 95 % intervals. One forward pass
per format per sequence or prompt.
"""

import json
import math
import os
import platform
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from oscar_sglang.kernels.format import DEFAULT_K_CLIP, DEFAULT_KEY_BITS, DEFAULT_V_CLIP
from oscar_sglang.kernels.rotation_file import RotationSet, data_free_rotations, load_rotations

from .attention import attention_override, check_unpadded, windowed_attention
from .datasets import DataError, resolve_data, split_sequences, token_stream
from .retrieval import PROMPT_STYLES, TASKS, PromptBuilder, Proportion, RetrievalPrompt, correct
from .kv_formats import Fp8Format, Int2Format, Int4Format, Kivi2Format, KVFormat, identity_rotations
from .models import Geometry, geometry, load_model

FORMATS = ("bf16", "fp8", "int4", "kivi2", "int2-naive", "int2-hadamard", "oscar")
REFERENCE = "bf16"
class SimulatedCache:
    """Attention handler: every layer reads its keys/values through `fmt` with the format's
    exact windows (attention.windowed_attention)."""

    def __init__(self, fmt: KVFormat):
        self.fmt = fmt

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        k_exact, k_quant, v_exact, v_quant = self.fmt.kv(module.layer_idx, key.float(), value.float())
        out = windowed_attention(query, k_exact, k_quant, v_exact, v_quant, scaling,
                                 self.fmt.sink, self.fmt.recent)
        return out.to(query.dtype), None


def build_formats(names, geo: Geometry, rotations: RotationSet | None, group_size: int | None,
                  sink: int, recent: int, ablations: dict[str, RotationSet] | None = None,
                  key_bits: int = DEFAULT_KEY_BITS) -> list[KVFormat]:
    """KVFormats for `names` (see FORMATS; "oscar" needs `rotations`). `ablations` (label ->
    rotations) adds "oscar-nowindow" (the artifact without BF16 windows), "oscar-keys-only" and
    "oscar-values-only" (only that side read from INT2) and one "oscar-<label>" per extra
    artifact. Artifacts are read with the key bits they were calibrated for; int2-naive and
    int2-hadamard, which have none, with `key_bits`."""
    def int2(name, rots, s=sink, r=recent, sides="kv"):
        return Int2Format(name, rots, geo.head_dim, group_size, s, r, sides, rots.key_bits or key_bits)

    builders = {
        "bf16": KVFormat,
        "fp8": Fp8Format,
        "int4": lambda: Int4Format(min(128, geo.head_dim)),
        "kivi2": lambda: Kivi2Format(recent),
        "int2-naive": lambda: int2("int2-naive", identity_rotations(geo.num_layers, geo.head_dim)),
        "int2-hadamard": lambda: int2("int2-hadamard", data_free_rotations(
            geo.num_layers, geo.num_kv_heads, geo.head_dim)),
        "oscar": lambda: int2("oscar", rotations),
    }
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise DataError(f"unknown formats {unknown}; choose from {','.join(FORMATS)}")
    if rotations is None and ("oscar" in names or ablations is not None):
        raise DataError("format oscar needs --rotations (an artifact from `oscar-sglang calibrate`)")
    formats = [builders[n]() for n in names]
    if ablations is not None:
        formats += [int2("oscar-nowindow", rotations, 0, 0), int2("oscar-keys-only", rotations, sides="k"),
                    int2("oscar-values-only", rotations, sides="v")]
        formats += [int2(f"oscar-{label}", rots) for label, rots in ablations.items()]
    return formats


@dataclass
class FormatResult:
    name: str
    bits: float
    effective_bits: float
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    top1_sum: float = 0.0
    predictions: int = 0
    retrieval: dict[str, dict[int, list[bool]]] = field(default_factory=dict)  # task -> length -> outcomes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.predictions)

    def row(self) -> dict:
        return {"format": self.name, "bits_per_element": self.bits,
                "effective_bits": self.effective_bits, "perplexity": self.perplexity,
                "kl_vs_bf16": self.kl_sum / self.predictions,
                "top1_agreement": self.top1_sum / self.predictions, "predictions": self.predictions,
                "retrieval": {task: {str(n): dict(Proportion(sum(v), len(v)).as_dict(), outcomes=v)
                                     for n, v in by_length.items()}
                              for task, by_length in self.retrieval.items()}}


def _logits(model, ids: torch.Tensor, fmt: KVFormat, keep: int = 0) -> torch.Tensor:
    """float32 logits [L or keep, V] of one sequence [L] read through `fmt`."""
    device = next(model.parameters()).device
    with torch.inference_mode(), attention_override(model, SimulatedCache(fmt), "oscar_simulated_cache"):
        return model(ids[None].to(device), use_cache=False, logits_to_keep=keep).logits[0].float()


def language_metrics(model, formats: list[KVFormat], sequences: torch.Tensor, results: dict) -> None:
    """Adds NLL, KL(BF16 || format) and top-1 agreement over every next-token prediction of
    `sequences` [N, L] to `results` (name -> FormatResult); formats[0] must be BF16."""
    bar = tqdm(total=len(sequences) * len(formats), desc="perplexity/KL", unit="pass")
    for seq in sequences:
        target = seq[1:].to(next(model.parameters()).device)
        reference = None
        for fmt in formats:
            logp = _logits(model, seq, fmt)[:-1].log_softmax(-1)
            if reference is None:
                reference = logp
            r = results[fmt.name]
            r.nll_sum -= logp.gather(-1, target[:, None]).sum().item()
            r.kl_sum += (reference.exp() * (reference - logp)).sum().item()
            r.top1_sum += (logp.argmax(-1) == reference.argmax(-1)).sum().item()
            r.predictions += target.numel()
            bar.update()
    bar.close()


def retrieval_metrics(model, formats: list[KVFormat], prompts: list[RetrievalPrompt], results: dict) -> None:
    """Scores every prompt under every format into results[name].retrieval."""
    for fmt in tqdm(formats, desc="retrieval", unit="format"):
        for p in prompts:
            ids = torch.tensor(p.prompt + p.answer[:-1])
            predicted = _logits(model, ids, fmt, keep=len(p.answer)).argmax(-1).tolist()
            outcomes = results[fmt.name].retrieval.setdefault(p.task, {}).setdefault(p.length, [])
            outcomes.append(correct(p, predicted))


@dataclass(frozen=True)
class RetrievalSettings:
    """What builds the retrieval prompts; the server benchmark records the same fields, and
    equal settings give equal prompts."""

    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096, 6000)
    trials: int = 40
    haystack_offset: int = 40000
    style: str = PROMPT_STYLES[0]
    needles: int = 4
    seed: int = 0

    def prompts(self, tokenizer, stream: torch.Tensor) -> list[RetrievalPrompt]:
        builder = PromptBuilder(tokenizer, stream[self.haystack_offset:], self.style, self.needles, self.seed)
        return [p for task in self.tasks for p in builder.build(task, list(self.lengths), self.trials)]


def evaluate(model, tokenizer, formats: list[KVFormat], stream: torch.Tensor, *, seq_len: int,
             sequences: int, offset: int, retrieval: RetrievalSettings | None) -> list[FormatResult]:
    """Perplexity/KL/top-1 on `sequences` x `seq_len` tokens of the token stream (`token_stream`)
    from token `offset`, then the retrieval prompts of `retrieval` (None: none), for every format,
    the first (BF16) included: the bar the others are held to is BF16 on the same prompts."""
    if formats[0].name != REFERENCE:
        raise ValueError("the first format must be the BF16 reference")
    results = {f.name: FormatResult(f.name, f.bits, f.effective_bits(seq_len)) for f in formats}
    language_metrics(model, formats, split_sequences(stream, seq_len, sequences, offset), results)
    if retrieval is not None and retrieval.tasks and retrieval.lengths:
        retrieval_metrics(model, formats, retrieval.prompts(tokenizer, stream), results)
    return list(results.values())


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({os.cpu_count()}-core host)"
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"torch threads {torch.get_num_threads()}")


def _rates(row: dict) -> list[tuple[str, str, dict]]:
    """(task, length, proportion dict) of a result row, in table order."""
    return [(task, n, p) for task, by_length in row["retrieval"].items() for n, p in by_length.items()]


def _text(p: dict) -> str:
    return Proportion(p["successes"], p["trials"]).text()


def markdown(report: dict) -> str:
    rows = report["results"]
    base = rows[0]["perplexity"]
    head = ["format", "bits/elem", f"eff. bits @{report['config']['seq_len']}", "ppl", "Δppl",
            "KL vs bf16", "top-1 vs bf16"] + [f"{task}@{n}" for task, n, _ in _rates(rows[0])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["format"], f"{r['bits_per_element']:.2f}", f"{r['effective_bits']:.2f}",
                 f"{r['perplexity']:.3f}", f"{r['perplexity'] - base:+.3f}", f"{r['kl_vs_bf16']:.4f}",
                 f"{100 * r['top1_agreement']:.1f}%"] + [_text(p) for _, _, p in _rates(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Retrieval: % correct of the trials, [Wilson 95 % interval].", "", *report["checks"], "",
              f"command: `{report['command']}`", f"machine: {report['machine']}"]
    return "\n".join(lines)


RETRIEVAL_TOLERANCE = 0.05  # OSCAR within 5 points of BF16


def checks(rows: list[dict]) -> list[str]:
    """The accuracy targets, evaluated on these results (only those whose formats ran)."""
    by = {r["format"]: r for r in rows}
    if "oscar" not in by:
        return []
    def delta(name):
        return by[name]["perplexity"] - by[REFERENCE]["perplexity"]
    out = []
    for other, limit in (("int2-hadamard", 0.5), ("kivi2", 1.0)):
        if other in by:
            ok = delta("oscar") <= limit * delta(other)
            out.append(f"- OSCAR Δppl {delta('oscar'):+.3f} vs {other} Δppl {delta(other):+.3f} "
                       f"(target ≤ {limit:g}×): {'met' if ok else 'MISSED'}")
    for (task, n, acc), (_, _, ref) in zip(_rates(by["oscar"]), _rates(by[REFERENCE]), strict=True):
        ok = acc["rate"] >= ref["rate"] - RETRIEVAL_TOLERANCE
        out.append(f"- {task}@{n}: OSCAR {_text(acc)} vs BF16 {_text(ref)} (target within "
                   f"{100 * RETRIEVAL_TOLERANCE:.0f} points): {'met' if ok else 'MISSED'}")
    return out


def write_report(report: dict, out_dir: str, stem: str) -> list[str]:
    """accuracy-<stem>.{json,md,png} under out_dir; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"accuracy-{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    rows = report["results"]
    quantized = rows[1:]  # the BF16 reference is 0 on the error panels
    tasks = list(rows[0]["retrieval"])
    fig, axes = plt.subplots(1, 2 + len(tasks), figsize=(4.8 * (2 + len(tasks)), 4.5), squeeze=False)
    # errors span orders of magnitude (naive INT2 vs FP8): log scale
    for ax, (title, values) in zip(axes[0], [
            ("Δ perplexity vs bf16", [r["perplexity"] - rows[0]["perplexity"] for r in quantized]),
            ("KL vs bf16 (nats/token)", [r["kl_vs_bf16"] for r in quantized])]):
        names = [r["format"] for r in quantized]
        bars = ax.bar(names, values, color=["tab:red" if n.startswith("oscar") else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=60)
    for ax, task in zip(axes[0][2:], tasks):
        for r in rows:
            by_length = r["retrieval"][task]
            x = [int(n) for n in by_length]
            y = [100 * p["rate"] for p in by_length.values()]
            err = [[100 * (p["rate"] - p["wilson95"][0]) for p in by_length.values()],
                   [100 * (p["wilson95"][1] - p["rate"]) for p in by_length.values()]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=r["format"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("% correct (Wilson 95 %)")
        ax.set_ylim(-5, 105)
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']}: KV-cache formats, seq-len {report['config']['seq_len']}")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return [str(p) for p in paths]


def _ablation_rotations(specs: list[str]) -> dict[str, RotationSet]:
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            raise DataError(f"--ablation-rotations takes LABEL=PATH, got {spec!r}")
        out[label] = load_rotations(path)
    return out


def run(args) -> int:
    """`oscar-sglang evaluate` (arguments: see oscar_sglang/cli.py)."""
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    geo = geometry(model.config)
    names = [n for n in args.formats.split(",") if n]
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    rotations = load_rotations(args.rotations) if args.rotations else None
    ablations = _ablation_rotations(args.ablation_rotations) if args.ablations else None
    for rots in [rotations, *(ablations or {}).values()]:
        if rots is not None:
            rots.check_matches(geo.num_layers, geo.num_kv_heads, geo.head_dim, model=name)
    formats = build_formats(names, geo, rotations, args.group_size, args.sink_tokens,
                            args.recent_tokens, ablations, args.key_bits)
    retrieval = RetrievalSettings(tuple(args.tasks), tuple(args.lengths), args.trials,
                                  args.haystack_offset, args.prompt_style, args.needles, args.seed)
    results = evaluate(model, tokenizer, formats, token_stream(tokenizer, resolve_data(args.data)), seq_len=args.seq_len,
                       sequences=args.sequences, offset=args.offset_tokens, retrieval=retrieval)
    rows = [r.row() for r in results]
    report = {
        "command": shlex.join(["oscar-sglang", *args.argv]), "machine": machine(args.device),
        "model": name, "geometry": asdict(geo),
        "config": {"seq_len": args.seq_len, "sequences": args.sequences, "offset_tokens": args.offset_tokens,
                   "data": args.data, "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens,
                   "group_size": args.group_size or geo.head_dim, "retrieval": asdict(retrieval),
                   "uncalibrated_key_bits": args.key_bits,
                   "default_clips": {"k": DEFAULT_K_CLIP, "v": DEFAULT_V_CLIP}},
        "rotations": dict(rotations.metadata) if rotations else None,
        "results": rows, "checks": checks(rows),
    }
    paths = write_report(report, args.out_dir, args.name or name.lower())
    print(markdown(report))
    print("wrote " + ", ".join(paths))
    return 0
