"""Offline attention-aware rotation calibration (`oscar-sglang calibrate`).

Pass 1 runs the model over calibration sequences and accumulates the rotation targets
(covariance.CovarianceAccumulator); R = U · H · P_br per layer and target (covariance.rotation_from_covariance). Pass 2
runs held-out sequences (never used for the targets) and picks, per layer and for K and V
separately, the target and clip ratio of least held-out error (clip_search.ClipSearch: for values
the attention-output error, for keys the chosen key objective).
Why choose the target: on SmolLM2-135M the plain KᵀK target gave lower held-out key error and
perplexity than the query-weighted one in most layers, while the attention-mass weighted target
won for values (benchmarks/results/accuracy-*-ablations.md). The artifact is written with
kernels.rotation_file.make_rotation_set / save_rotations.
"""

import math
import sys
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, OscarFormat
from oscar_sglang.kernels.rotation_file import RotationSet, data_free_rotations, make_rotation_set, save_rotations

from .attention import attention_override
from .clip_search import DEFAULT_CLIP_GRID, KEY_OBJECTIVES, ClipSearch
from .covariance import TARGETS, CovarianceAccumulator, rotation_from_covariance
from .datasets import DataError, resolve_data, split_sequences, token_stream
from .models import geometry, load_model

TARGET_CHOICES = ("auto", *TARGETS)
DEFAULT_TOKENS = 16384
# The smallest calibration whose spread over disjoint slices was measured (3 slices, Δppl
# +0.019 to +0.038: benchmarks/results/calibration-spread-*-k4.md); below it nobody knows.
MEASURED_MIN_TOKENS = 12288


@dataclass
class CalibrationResult:
    rotations: RotationSet | None
    search: ClipSearch
    candidates: list[RotationSet]  # one per target
    targets: tuple[str, ...]  # candidate targets, in ClipSearch candidate order
    choice: list[list[tuple[int, float]]]  # per layer, K and V: (candidate, clip)
    covariance_tokens: int
    heldout_tokens: int
    key_bits: int
    model_name: str
    num_kv_heads: int
    source: str

    def choose(self, key_objective: str) -> "CalibrationResult":
        """The result whose keys are chosen by `key_objective` (clip_search.KEY_OBJECTIVES):
        the search measured every objective, so this needs no model run. The search (shared
        with this result) is set to that objective, which summary_table reports."""
        self.search.key_objective = key_objective
        choice = self.search.best()
        rotations = make_rotation_set(
            [self.candidates[k[0]].k_rot[layer] for layer, (k, _) in enumerate(choice)],
            [self.candidates[v[0]].v_rot[layer] for layer, (_, v) in enumerate(choice)],
            [k[1] for k, _ in choice], [v[1] for _, v in choice],
            model_name=self.model_name, num_kv_heads=self.num_kv_heads,
            calibration_tokens=self.covariance_tokens,
            calibration_source=f"{self.source} (key clips by {key_objective})", key_bits=self.key_bits)
        return replace(self, rotations=rotations, choice=choice)


def run_model(model, sequences: torch.Tensor, handler, name: str, desc: str) -> None:
    """Forward every sequence [N, L] through `model` with `handler` as its attention function;
    only the attention side effects matter (logits of one position are computed)."""
    device = next(model.parameters()).device
    with torch.inference_mode(), attention_override(model, handler, name):
        for seq in tqdm(sequences, desc=desc, unit="seq"):
            model(seq[None].to(device), use_cache=False, logits_to_keep=1)


def calibrate(model, tokenizer, model_name: str, files: list[str], *, tokens: int, seq_len: int,
              heldout_fraction: float, group_size: int | None, shared: bool, target: str,
              sink: int, recent: int, offset: int = 0, grid=DEFAULT_CLIP_GRID,
              key_objective: str = KEY_OBJECTIVES[0], key_bits: int = DEFAULT_KEY_BITS,
              source: str = "") -> CalibrationResult:
    """Calibrate rotations from `tokens` tokens of `files` in sequences of `seq_len`; a
    `heldout_fraction` of the sequences (at least one) is kept out of the targets for the clip
    search. target "auto" makes rotations from both targets (covariance.TARGETS) and lets the
    held-out attention-output error choose per layer, for K and for V separately. Key clips are
    chosen for `key_bits`-bit keys, which the artifact records."""
    geo = geometry(model.config)
    fmt = OscarFormat(geo.head_dim, group_size, sink, recent, key_bits)  # validates the format settings
    count = math.ceil(tokens / seq_len)
    heldout = max(1, round(count * heldout_fraction))
    if count - heldout < 1:
        raise DataError(f"--tokens {tokens} gives {count} sequence(s) of {seq_len}: need at least "
                         "one for the targets and one held out")
    sequences = split_sequences(token_stream(tokenizer, files), seq_len, count, offset)
    device = next(model.parameters()).device

    acc = CovarianceAccumulator(geo, sink, recent, device)
    run_model(model, sequences[:-heldout], acc, "oscar_calibration_targets", "targets")
    baseline = data_free_rotations(geo.num_layers, geo.num_kv_heads, geo.head_dim)
    targets = TARGETS if target == "auto" else (target,)
    candidates = []
    for t in targets:
        c_k, c_v = acc.matrices(t, shared)
        candidates.append(RotationSet([rotation_from_covariance(c) for c in c_k],
                                      [rotation_from_covariance(c) for c in c_v],
                                      baseline.k_clip, baseline.v_clip))

    search = ClipSearch(candidates, baseline, fmt.group_size, sink, recent, grid, key_objective, key_bits)
    run_model(model, sequences[-heldout:], search, "oscar_calibration_clip", "clip search")
    result = CalibrationResult(None, search, candidates, targets, [], acc.tokens, heldout * seq_len,
                               key_bits, model_name, geo.num_kv_heads, source or ", ".join(files))
    return result.choose(key_objective)


def summary_table(result: CalibrationResult) -> str:
    """Per-layer markdown table: chosen target and clip for K and V; the key objective (for
    output-error, the relative error) and the value output error (relative) of that choice
    against the data-free Hadamard rotation with its default clips; and the clips single
    held-out sequences would have chosen where they disagree (ClipSearch.unsure). A closing line
    names the unsure layers."""
    search = result.search
    rel, base_err = search.relative_errors()
    div, base_div = search.mean_key_divergences()
    kl, base_kl = search.key_score(rel[:, 0], div), search.key_score(base_err[:, 0], base_div)
    unsure = search.unsure()
    grid = search.grid
    head = ["K target", "K clip", f"K {search.key_objective}", "K Hadamard", "K reduction", "K unsure",
            "V target", "V clip", "V err", "V err Hadamard", "V reduction", "V unsure"]
    lines = ["| layer | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    totals = torch.zeros(2, 2, dtype=torch.float64)
    for layer, ((kc, kclip), (vc, vclip)) in enumerate(result.choice):
        pairs = [(kl[layer, kc, grid.index(kclip)].item(), base_kl[layer].item()),
                 (rel[layer, 1, vc, grid.index(vclip)].item(), base_err[layer, 1].item())]
        cells = []
        for i, ((cand, clip), (err, ref)) in enumerate(zip(result.choice[layer], pairs)):
            totals[i] += torch.tensor([err, ref], dtype=torch.float64)
            doubt = "/".join(f"{c:.2f}" for c in unsure[layer][i])
            cells += [result.targets[cand], f"{clip:.2f}", f"{err:.3e}", f"{ref:.3e}", _reduction(err, ref), doubt]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    n = len(result.choice)
    mean = []
    for err, ref in totals.tolist():
        mean += ["", "", f"{err / n:.3e}", f"{ref / n:.3e}", _reduction(err, ref), ""]
    lines.append("| mean | " + " | ".join(mean) + " |")
    doubtful, sequences = search.unsure_layers(), search.heldout_sequences
    if doubtful is None:
        lines.append(f"\nunsure layers: not known with {sequences} held-out sequence; pass more "
                     "--tokens or a larger --heldout-fraction")
    elif doubtful:
        lines.append(f"\nunsure layers (single held-out sequences chose other clips): {doubtful}; "
                     "more --tokens would settle them")
    else:
        lines.append(f"\nunsure layers: none (all {sequences} held-out sequences agree)")
    return "\n".join(lines)


def _reduction(err: float, ref: float) -> str:
    return f"{100 * (1 - err / ref):.1f}%" if ref > 0 else "n/a"


def run(args) -> int:
    """`oscar-sglang calibrate` (arguments: see oscar_sglang/cli.py)."""
    if args.tokens < MEASURED_MIN_TOKENS:
        print(f"warning: --tokens {args.tokens} is below {MEASURED_MIN_TOKENS}, the smallest calibration "
              "whose spread over text slices was measured; the rotations and clips may move with the "
              f"text (default {DEFAULT_TOKENS})", file=sys.stderr)
    model, tokenizer, name = load_model(args.model, args.gguf_file, args.device)
    result = calibrate(
        model, tokenizer, name, resolve_data(args.data), tokens=args.tokens, seq_len=args.seq_len,
        heldout_fraction=args.heldout_fraction, group_size=args.group_size,
        shared=args.shared_across_heads, target=args.target, sink=args.sink_tokens,
        recent=args.recent_tokens, offset=args.offset_tokens, grid=args.clip_grid,
        key_objective=args.key_objective, key_bits=args.key_bits,
        source=f"{' '.join(args.data)} (target {args.target}, tokens from offset {args.offset_tokens})")
    save_rotations(args.out, result.rotations)
    print(summary_table(result))
    print(f"wrote {args.out}: {result.rotations.num_layers} layers, {args.key_bits}-bit keys, "
          f"{'shared' if args.shared_across_heads else 'per-head'} rotations, "
          f"{result.covariance_tokens} target tokens, {result.heldout_tokens} held-out tokens")
    return 0
