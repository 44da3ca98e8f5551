"""Clip-ratio grid search on held-out calibration tokens.

Values are chosen by the attention-output error. Keys are chosen by one of KEY_OBJECTIVES, all
measured in the same pass: the attention-output error (the default), or how the keys' INT2 copy
changes attention distributions (attention.key_divergences: attention KL, or peak KL, the
divergence on each query's top INT2 key, which diffuse queries barely move and retrieval
queries do). On SmolLM2-135M (benchmarks/results/quality-server-smollm2-135m-instruct.md and
accuracy-smollm2-135m-instruct.md, 40 trials per point) peak KL chose milder key clips (mean
0.98 against 0.87) and retrieved more passkeys at 1K tokens (harness 85 % against 68 %, intervals
overlapping), but no more at 2K-6K, and cost perplexity (+1.93 against +0.36) and greedy
agreement with BF16: output error stays the default.
"""

import torch

from oscar_sglang.kernels.format import CODE_BITS
from oscar_sglang.kernels.reference import dequantize, quantize, rotate, unrotate
from oscar_sglang.kernels.rotation_file import RotationSet

from .attention import check_unpadded, exact_region, key_divergences, merge_regions, quantized_region
from .kv_formats import from_tokens, to_tokens

DEFAULT_CLIP_GRID = (0.72, 0.76, 0.80, 0.84, 0.88, 0.92, 0.96, 1.0)
KINDS = ("k", "v")
DIVERGENCES = ("attention-kl", "peak-kl")  # the order of attention.key_divergences' results
KEY_OBJECTIVES = ("output-error", "peak-kl", "attention-kl")  # the first is the default


def roundtrips(x: torch.Tensor, rot: torch.Tensor, clips, group_size: int, bits: int):
    """x [B, H, L, D] -> for each clip ratio, x rotated, clipped (as reference.clip_rows),
    `bits`-bit quantized, dequantized and rotated back: a list of [B, H, L, D] float32."""
    rotated = rotate(to_tokens(x), rot)
    # one sort for the whole grid: the same quantiles clip_rows computes one ratio at a time
    taus = torch.quantile(rotated.abs(), torch.tensor(clips, device=x.device), dim=-1, keepdim=True)
    out = []
    for tau in taus:
        codes, scale, minimum = quantize(torch.maximum(torch.minimum(rotated, tau), -tau), group_size, bits)
        out.append(from_tokens(unrotate(dequantize(codes, scale, minimum, group_size), rot), x.shape[0]))
    return out


class ClipSearch:
    """Attention handler that runs the model with exact float32 attention and, per layer,
    measures the squared error of the attention output when only K (V exact) or only V (K exact)
    goes through the quantized cache (keys at `key_bits`, values at 2 bits), as served (sinks and recent positions exact), and the
    divergences of the attention distribution (attention.key_divergences) when K goes through it:

    - for each candidate rotation set and each clip ratio of `grid`;
    - once under `baseline` (the data-free Hadamard rotation with its default clips), for the
      summary.

    Errors are summed over held-out sequences; `relative_errors` divides them by Σ‖output‖²,
    `mean_key_divergences` the divergence sums by the number of (query, head) pairs. `key_objective` (one of
    KEY_OBJECTIVES) is what `best` minimizes for keys."""

    def __init__(self, candidates: list[RotationSet], baseline: RotationSet, group_size: int,
                 sink: int, recent: int, grid=DEFAULT_CLIP_GRID, key_objective: str = KEY_OBJECTIVES[0],
                 key_bits: int = CODE_BITS):
        if key_objective not in KEY_OBJECTIVES:
            raise ValueError(f"key objective must be one of {KEY_OBJECTIVES}, got {key_objective!r}")
        layers = baseline.num_layers
        self.candidates, self.baseline, self.grid = candidates, baseline, tuple(grid)
        self.group_size, self.sink, self.recent = group_size, sink, recent
        self.bits = {"k": key_bits, "v": CODE_BITS}
        self.key_objective = key_objective
        self.errors = torch.zeros(layers, len(KINDS), len(candidates), len(self.grid), dtype=torch.float64)
        self.baseline_errors = torch.zeros(layers, len(KINDS), dtype=torch.float64)
        self.norms = torch.zeros(layers, dtype=torch.float64)
        # [..., 2]: DIVERGENCES
        self.key_divergences = torch.zeros(layers, len(candidates), len(self.grid), 2, dtype=torch.float64)
        self.baseline_key_divergences = torch.zeros(layers, 2, dtype=torch.float64)
        self.queries = torch.zeros(layers, dtype=torch.float64)
        self.sequence_objectives: list[torch.Tensor] = []  # per held-out sequence, as objectives()

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        layer = module.layer_idx
        q, kv = query.float(), {"k": key.float(), "v": value.float()}
        # the exact windows read exact K and V whatever is quantized: attend to them once
        exact = exact_region(q, kv["k"], kv["v"], scaling, self.sink, self.recent)
        reference = merge_regions(quantized_region(q, kv["k"], kv["v"], scaling, self.sink, self.recent), exact)
        self.norms[layer] += reference.double().square().sum().item()
        self.queries[layer] += q.shape[0] * q.shape[1] * q.shape[2]
        if layer == 0:  # a new held-out sequence
            self.sequence_objectives.append(torch.zeros_like(self.errors))
        this_sequence = self.sequence_objectives[-1]

        def divergences(quantized):
            return torch.tensor(key_divergences(q, kv["k"], quantized, scaling, self.sink, self.recent, exact[1]),
                                dtype=torch.float64)

        def error(kind, quantized):
            """Squared output error with only `kind` read from INT2, the other exact."""
            k_quant, v_quant = (quantized, kv["v"]) if kind == "k" else (kv["k"], quantized)
            out = merge_regions(quantized_region(q, k_quant, v_quant, scaling, self.sink, self.recent), exact)
            return (out - reference).double().square().sum().item()

        for i, kind in enumerate(KINDS):
            for c, rotations in enumerate(self.candidates):
                rot = getattr(rotations, f"{kind}_rot")[layer].to(q.device)
                for j, quantized in enumerate(roundtrips(kv[kind], rot, self.grid, self.group_size, self.bits[kind])):
                    err = error(kind, quantized)
                    self.errors[layer, i, c, j] += err
                    if kind == "k":
                        both = divergences(quantized)
                        self.key_divergences[layer, c, j] += both
                        err = self.key_score(err, both)
                    this_sequence[layer, i, c, j] += err
            rot = getattr(self.baseline, f"{kind}_rot")[layer].to(q.device)
            clip = getattr(self.baseline, f"{kind}_clip")[layer]
            quantized = roundtrips(kv[kind], rot, [clip], self.group_size, self.bits[kind])[0]
            self.baseline_errors[layer, i] += error(kind, quantized)
            if kind == "k":
                self.baseline_key_divergences[layer] += divergences(quantized)
        return reference.to(query.dtype), None

    def relative_errors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([layers, 2, candidates, grid], [layers, 2] baseline): error / Σ‖output‖²."""
        norms = self.norms.clamp_min(torch.finfo(torch.float64).tiny)
        return self.errors / norms[:, None, None, None], self.baseline_errors / norms[:, None]

    def key_score(self, error, divergences):
        """The key objective from the output error and the (attention KL, peak KL) pair(s)."""
        if self.key_objective == "output-error":
            return error
        return divergences[..., DIVERGENCES.index(self.key_objective)]

    def mean_key_divergences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([layers, candidates, grid, 2], [layers, 2] baseline): mean DIVERGENCES per
        (query, head)."""
        queries = self.queries.clamp_min(1.0)
        return self.key_divergences / queries[:, None, None, None], self.baseline_key_divergences / queries[:, None]

    def objectives(self) -> torch.Tensor:
        """[layers, 2, candidates, grid]: what `best` minimizes for K and for V."""
        out = self.errors.clone()
        out[:, 0] = self.key_score(self.errors[:, 0], self.key_divergences)
        return out

    def _argmin(self, objectives: torch.Tensor) -> list[list[tuple[int, float]]]:
        flat = objectives.flatten(-2).argmin(dim=-1)  # [layers, 2]
        return [[(j // len(self.grid), self.grid[j % len(self.grid)]) for j in row] for row in flat.tolist()]

    def best(self) -> list[list[tuple[int, float]]]:
        """Per layer, for K and for V, (candidate index, clip ratio) of least objective."""
        return self._argmin(self.objectives())

    def unsure(self) -> list[list[list[float]]]:
        """Per layer, for K and for V, the clip ratios that single held-out sequences would
        have chosen where any of them differs from `best` (empty lists elsewhere, and everywhere
        with fewer than two held-out sequences): the choices more calibration text could move."""
        pooled = self.best()
        alone = [self._argmin(o) for o in self.sequence_objectives] if self.heldout_sequences > 1 else []
        return [[sorted({seq[layer][i][1] for seq in alone})
                 if any(seq[layer][i] != pooled[layer][i] for seq in alone) else [] for i in range(len(KINDS))]
                for layer in range(len(pooled))]

    @property
    def heldout_sequences(self) -> int:
        return len(self.sequence_objectives)

    def unsure_layers(self) -> list[int] | None:
        """Layers where `unsure` found a clip more text could move (K or V), or None with fewer
        than two held-out sequences, where that is not known."""
        if self.heldout_sequences < 2:
            return None
        return [layer for layer, pair in enumerate(self.unsure()) if any(pair)]
