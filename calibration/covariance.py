"""Streaming second moments for the rotation targets (an attention function that accumulates
per-layer, per-KV-head D x D sums in float64 while the model runs, never storing activations),
and the rotation each target gives: R = U · H · P_br."""

import torch

from oscar_sglang.kernels.rotation_file import hadamard_bitrev

from .attention import attention_with_key_mass, check_unpadded
from .models import Geometry

TARGETS = ("attention", "plain")


class CovarianceAccumulator:
    """Attention handler (see attention.attention_override) accumulating, per layer l and KV
    head h, both rotation targets:

    - "attention" (what quantization error costs at the attention output):
        C_K[l, h] = mean over tokens and over the query heads of group h of q qᵀ
                    (logit error is (k - k̂) · q, so key error matters along query directions);
        C_V[l, h] = Vᵀ diag(w) V / Σ w, w_t = squared attention mass of key t from the queries
                    that read it quantized (attention.attention_with_key_mass);
    - "plain": C_K = mean k kᵀ, C_V = mean v vᵀ.

    Sums are float64 on `device`; `matrices` normalizes them."""

    def __init__(self, geometry: Geometry, sink: int, recent: int, device="cpu"):
        self.sink, self.recent = sink, recent
        shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.head_dim)
        self.sums = {(t, kind): torch.zeros(shape, dtype=torch.float64, device=device)
                     for t in TARGETS for kind in "kv"}
        self.weights = {key: torch.zeros(shape[:2], dtype=torch.float64, device=device) for key in self.sums}
        self.tokens = 0  # tokens seen by layer 0

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        check_unpadded(query, key, attention_mask)
        out, mass = attention_with_key_mass(query, key, value, scaling, self.sink, self.recent)
        self.update(module.layer_idx, query, key, value, mass)
        return out.to(query.dtype), None

    def update(self, layer: int, query, key, value, mass) -> None:
        """query [B, H_q, L, D]; key, value [B, H_kv, L, D]; mass [B, H_kv, L]."""
        bsz, heads_kv, length, dim = key.shape
        if layer == 0:
            self.tokens += bsz * length
        q = query.double().reshape(bsz, heads_kv, -1, length, dim)
        k, v, w = key.double(), value.double(), mass.double()
        for target, kind, total, weight in (
                ("attention", "k", torch.einsum("bhgld,bhgle->hde", q, q), bsz * q.shape[2] * length),
                ("attention", "v", torch.einsum("bhl,bhld,bhle->hde", w, v, v), w.sum(dim=(0, 2))),
                ("plain", "k", torch.einsum("bhld,bhle->hde", k, k), bsz * length),
                ("plain", "v", torch.einsum("bhld,bhle->hde", v, v), bsz * length)):
            self.sums[target, kind][layer] += total
            self.weights[target, kind][layer] += weight

    def matrices(self, target: str, shared: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer C_K and C_V of `target`, float64 [H_kv, D, D], or [1, D, D] summed over
        heads when `shared`."""
        def normalize(kind):
            total, weight = self.sums[target, kind], self.weights[target, kind]
            if shared:
                total, weight = total.sum(1, keepdim=True), weight.sum(1, keepdim=True)
            if not bool((weight > 0).all()):
                raise ValueError("no calibration signal for some layer/head: sequences are "
                                 "shorter than sink + recent tokens; use a longer --seq-len")
            return list(total / weight[..., None, None])
        return normalize("k"), normalize("v")


def rotation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """cov: [H, D, D] symmetric PSD -> R [H, D, D] float32, orthogonal.

    k · R = (k · U) · (H · P_br) with U = eigenvectors of cov in descending eigenvalue order
    (float64 eigh). Row r of H · P_br (normalized Walsh-Hadamard, columns in bit-reversal order)
    is constant within every group of G consecutive dims for r < D / G, so the components of k
    along the top D / G eigen-directions become per-group offsets, which the asymmetric group
    minimum stores exactly; every other direction is spread evenly over all D dims."""
    _, vectors = torch.linalg.eigh(cov.double().cpu())
    u = vectors.flip(-1)  # eigh sorts ascending
    return (u @ hadamard_bitrev(cov.shape[-1]).double()).float()
