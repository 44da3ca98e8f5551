"""Accuracy harness (`oscar-sglang evaluate`): the model with each KV-cache format simulated as a
decoding server reads it (formats.py, attention.windowed_attention), on held-out text.

Metrics per format: perplexity; KL divergence and top-1 agreement of the next-token
distribution vs the BF16 cache; passkey retrieval (a random 5-digit key sentence inserted at
depths 10-90% of real text, scored as correct when greedy argmax reproduces every answer token
under teacher forcing). One forward pass per format per sequence.
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

from oscar_sglang.kernels.format import DEFAULT_K_CLIP, DEFAULT_V_CLIP
from oscar_sglang.kernels.rotations import RotationSet, data_free_rotations, load_rotations

from .attention import attention_override, check_unpadded, windowed_attention
from .datasets import DataError, resolve_data, split_sequences, token_stream
from .formats import Fp8Format, Int2Format, Int4Format, Kivi2Format, KVFormat, identity_rotations
from .models import Geometry, geometry, load_model

FORMATS = ("bf16", "fp8", "int4", "kivi2", "int2-naive", "int2-hadamard", "oscar")
REFERENCE = "bf16"
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
# the prompt ends with the space before the key: SmolLM2's tokenizer emits a lone space token
# before digits, after which even the BF16 model often predicts a word; the key's digits are scored
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is "
PASSKEY_ANSWER = "{key}"


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
                  sink: int, recent: int, ablations: dict[str, RotationSet] | None = None) -> list[KVFormat]:
    """KVFormats for `names` (see FORMATS; "oscar" needs `rotations`). `ablations` (label ->
    rotations) adds "oscar-nowindow" (the artifact without BF16 windows) and one "oscar-<label>"
    per extra artifact."""
    def int2(name, rots, s=sink, r=recent):
        return Int2Format(name, rots, geo.head_dim, group_size, s, r)

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
        formats.append(int2("oscar-nowindow", rotations, 0, 0))
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
    passkey: dict[int, list[bool]] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.predictions)

    def row(self) -> dict:
        return {"format": self.name, "bits_per_element": self.bits,
                "effective_bits": self.effective_bits, "perplexity": self.perplexity,
                "kl_vs_bf16": self.kl_sum / self.predictions,
                "top1_agreement": self.top1_sum / self.predictions, "predictions": self.predictions,
                "passkey": {str(n): 100.0 * sum(v) / len(v) for n, v in self.passkey.items()},
                "passkey_trials": {str(n): len(v) for n, v in self.passkey.items()}}


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


def passkey_prompt(tokenizer, filler: torch.Tensor, length: int, depth: float, key: int):
    """(input ids [n], answer ids [a]) of a `length`-token passkey prompt: the needle sentence
    at the sentence boundary nearest `depth` of the filler text, the answer teacher-forced."""
    needle, answer = PASSKEY_NEEDLE.format(key=key), PASSKEY_ANSWER.format(key=key)
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    budget = length - count(PASSKEY_INTRO + needle + PASSKEY_QUESTION + answer)
    if budget < 1 or budget > filler.numel():
        raise DataError(f"passkey length {length} does not fit the prompt and {filler.numel()} "
                        "filler tokens")
    text = tokenizer.decode(filler[:budget].tolist(), clean_up_tokenization_spaces=False)
    cut = text.find(". ", int(depth * len(text)))
    cut = int(depth * len(text)) if cut < 0 else cut + 1
    prompt = PASSKEY_INTRO + text[:cut] + needle + text[cut:].lstrip() + PASSKEY_QUESTION
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:  # the answer must not merge into the prompt
        full_ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
    return torch.tensor(full_ids[:-1]), torch.tensor(full_ids[len(prompt_ids):])


def passkey_metrics(model, tokenizer, formats: list[KVFormat], filler: torch.Tensor,
                    lengths: list[int], trials: int, seed: int, results: dict) -> None:
    """`trials` prompts per length (depths evenly spread over 10-90%, random 5-digit keys)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for length in lengths:
        depths = torch.linspace(0.1, 0.9, trials).tolist() if trials > 1 else [0.5]
        for depth in depths:
            key = int(torch.randint(10000, 100000, (1,), generator=gen))
            prompts.append((length, *passkey_prompt(tokenizer, filler, length, depth, key)))
    for fmt in tqdm(formats, desc="passkey", unit="format"):
        for length, ids, answer in prompts:
            predicted = _logits(model, ids, fmt, keep=answer.numel()).argmax(-1).cpu()
            results[fmt.name].passkey.setdefault(length, []).append(bool((predicted == answer).all()))


def evaluate(model, tokenizer, formats: list[KVFormat], files: list[str], *, seq_len: int,
             sequences: int, offset: int, passkey_lengths: list[int], passkey_trials: int,
             seed: int = 0) -> list[FormatResult]:
    """Perplexity/KL/top-1 on `sequences` x `seq_len` tokens of `files` from token `offset`,
    then passkey prompts whose filler is the text that follows them."""
    if formats[0].name != REFERENCE:
        raise ValueError("the first format must be the BF16 reference")
    stream = token_stream(tokenizer, files)
    results = {f.name: FormatResult(f.name, f.bits, f.effective_bits(seq_len)) for f in formats}
    language_metrics(model, formats, split_sequences(stream, seq_len, sequences, offset), results)
    if passkey_lengths:
        filler = stream[offset + sequences * seq_len:]
        passkey_metrics(model, tokenizer, formats, filler, passkey_lengths, passkey_trials, seed, results)
    return list(results.values())


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({os.cpu_count()}-core host)"
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"torch threads {torch.get_num_threads()}")


def markdown(report: dict) -> str:
    rows = report["results"]
    lengths = list(rows[0]["passkey"])
    base = rows[0]["perplexity"]
    head = ["format", "bits/elem", f"eff. bits @{report['config']['seq_len']}", "ppl", "Δppl",
            "KL vs bf16", "top-1 vs bf16"] + [f"passkey@{n} (%)" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["format"], f"{r['bits_per_element']:.2f}", f"{r['effective_bits']:.2f}",
                 f"{r['perplexity']:.3f}", f"{r['perplexity'] - base:+.3f}", f"{r['kl_vs_bf16']:.4f}",
                 f"{100 * r['top1_agreement']:.1f}%"] + [f"{r['passkey'][n]:.0f}" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *report["checks"], "", f"command: `{report['command']}`", f"machine: {report['machine']}"]
    return "\n".join(lines)


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
    for n, acc in by["oscar"]["passkey"].items():
        ref = by[REFERENCE]["passkey"][n]
        out.append(f"- passkey@{n}: OSCAR {acc:.0f}% vs BF16 {ref:.0f}% (target within 2 points): "
                   f"{'met' if acc >= ref - 2 else 'MISSED'}")
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
    # (title, rows, values, log scale): errors span orders of magnitude (naive INT2 vs FP8)
    panels = [("Δ perplexity vs bf16", quantized, [r["perplexity"] - rows[0]["perplexity"] for r in quantized], True),
              ("KL vs bf16 (nats/token)", quantized, [r["kl_vs_bf16"] for r in quantized], True)]
    panels += [(f"passkey@{n} (%)", rows, [r["passkey"][n] for r in rows], False) for n in rows[0]["passkey"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, subset, values, log) in zip(axes[0], panels, strict=True):
        names = [r["format"] for r in subset]
        bars = ax.bar(names, values, color=["tab:red" if n.startswith("oscar") else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=60)
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
                            args.recent_tokens, ablations)
    lengths = [int(n) for n in args.passkey_lengths.split(",") if n] if args.passkey_lengths else []
    results = evaluate(model, tokenizer, formats, resolve_data(args.data), seq_len=args.seq_len,
                       sequences=args.sequences, offset=args.offset_tokens, passkey_lengths=lengths,
                       passkey_trials=args.passkey_trials, seed=args.seed)
    rows = [r.row() for r in results]
    report = {
        "command": shlex.join(["oscar-sglang", *args.argv]), "machine": machine(args.device),
        "model": name, "geometry": asdict(geo),
        "config": {"seq_len": args.seq_len, "sequences": args.sequences, "offset_tokens": args.offset_tokens,
                   "data": args.data, "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens,
                   "group_size": args.group_size or geo.head_dim, "passkey_trials": args.passkey_trials,
                   "default_clips": {"k": DEFAULT_K_CLIP, "v": DEFAULT_V_CLIP}},
        "rotations": dict(rotations.metadata) if rotations else None,
        "results": rows, "checks": checks(rows),
    }
    paths = write_report(report, args.out_dir, args.name or name.lower())
    print(markdown(report))
    print("wrote " + ", ".join(paths))
    return 0
