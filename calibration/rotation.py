"""Rotation from a target second-moment matrix: R = U · H · P_br."""

import torch

from oscar_sglang.kernels.rotations import hadamard_bitrev


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
