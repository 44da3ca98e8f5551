"""Clip-ratio grid search on held-out calibration tokens, by attention-output error."""

import torch

from oscar_sglang.kernels.reference import dequantize_int2, quantize_int2, rotate, unrotate
from oscar_sglang.kernels.rotations import RotationSet

from .attention import check_unpadded, exact_region, merge_regions, quantized_region
from .formats import from_tokens, to_tokens

DEFAULT_CLIP_GRID = (0.72, 0.76, 0.80, 0.84, 0.88, 0.92, 0.96, 1.0)
KINDS = ("k", "v")


def int2_roundtrips(x: torch.Tensor, rot: torch.Tensor, clips, group_size: int):
    """x [B, H, L, D] -> for each clip ratio, x rotated, clipped (as reference.clip_rows),
    2-bit quantized, dequantized and rotated back: a list of [B, H, L, D] float32."""
    rotated = rotate(to_tokens(x), rot)
    # one sort for the whole grid: the same quantiles clip_rows computes one ratio at a time
    taus = torch.quantile(rotated.abs(), torch.tensor(clips, device=x.device), dim=-1, keepdim=True)
    out = []
    for tau in taus:
        codes, scale, minimum = quantize_int2(torch.maximum(torch.minimum(rotated, tau), -tau), group_size)
        out.append(from_tokens(unrotate(dequantize_int2(codes, scale, minimum, group_size), rot), x.shape[0]))
    return out


class ClipSearch:
    """Attention handler that runs the model with exact float32 attention and, per layer,
    measures the squared error of the attention output when only K (V exact) or only V (K exact)
    goes through the INT2 cache, as served (sinks and recent positions exact):

    - for each candidate rotation set and each clip ratio of `grid`;
    - once under `baseline` (the data-free Hadamard rotation with its default clips), for the
      summary.

    Errors are summed over held-out sequences; `relative_errors` divides them by Σ‖output‖²."""

    def __init__(self, candidates: list[RotationSet], baseline: RotationSet, group_size: int,
                 sink: int, recent: int, grid=DEFAULT_CLIP_GRID):
        layers = baseline.num_layers
        self.candidates, self.baseline, self.grid = candidates, baseline, tuple(grid)
        self.group_size, self.sink, self.recent = group_size, sink, recent
        self.errors = torch.zeros(layers, len(KINDS), len(candidates), len(self.grid), dtype=torch.float64)
        self.baseline_errors = torch.zeros(layers, len(KINDS), dtype=torch.float64)
        self.norms = torch.zeros(layers, dtype=torch.float64)

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        layer = module.layer_idx
        q, kv = query.float(), {"k": key.float(), "v": value.float()}
        # the exact windows read exact K and V whatever is quantized: attend to them once
        exact = exact_region(q, kv["k"], kv["v"], scaling, self.sink, self.recent)
        reference = merge_regions(quantized_region(q, kv["k"], kv["v"], scaling, self.sink, self.recent), exact)
        self.norms[layer] += reference.double().square().sum().item()

        def error(kind, quantized):
            """Squared output error with only `kind` read from INT2, the other exact."""
            k_quant, v_quant = (quantized, kv["v"]) if kind == "k" else (kv["k"], quantized)
            out = merge_regions(quantized_region(q, k_quant, v_quant, scaling, self.sink, self.recent), exact)
            return (out - reference).double().square().sum().item()

        for i, kind in enumerate(KINDS):
            for c, rotations in enumerate(self.candidates):
                rot = getattr(rotations, f"{kind}_rot")[layer].to(q.device)
                for j, quantized in enumerate(int2_roundtrips(kv[kind], rot, self.grid, self.group_size)):
                    self.errors[layer, i, c, j] += error(kind, quantized)
            rot = getattr(self.baseline, f"{kind}_rot")[layer].to(q.device)
            clip = getattr(self.baseline, f"{kind}_clip")[layer]
            self.baseline_errors[layer, i] += error(kind, int2_roundtrips(kv[kind], rot, [clip], self.group_size)[0])
        return reference.to(query.dtype), None

    def relative_errors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([layers, 2, candidates, grid], [layers, 2] baseline): error / Σ‖output‖²."""
        norms = self.norms.clamp_min(torch.finfo(torch.float64).tiny)
        return self.errors / norms[:, None, None, None], self.baseline_errors / norms[:, None]

    def best(self) -> list[list[tuple[int, float]]]:
        """Per layer, for K and for V, (candidate index, clip ratio) of least error."""
        flat = self.errors.flatten(-2).argmin(dim=-1)  # [layers, 2]
        return [[(j // len(self.grid), self.grid[j % len(self.grid)]) for j in row] for row in flat.tolist()]
