"""Rotation from a target second-moment matrix: R = U · H · P_br."""

import torch

from oscar_sglang.kernels.rotations import hadamard_bitrev


def rotation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """cov: [H, D, D] symmetric PSD -> R [H, D, D] float32, orthogonal.

    U (columns = eigenvectors of cov, descending eigenvalue; float64 eigh) aligns the energetic
    directions first; H · P_br (normalized Walsh-Hadamard, columns in bit-reversal order) then
    spreads every eigen-direction evenly over all D output dims, and the bit reversal puts
    consecutive eigen-directions into different quantization groups."""
    _, vectors = torch.linalg.eigh(cov.double().cpu())
    u = vectors.flip(-1)  # eigh sorts ascending
    return (u @ hadamard_bitrev(cov.shape[-1]).double()).float()
