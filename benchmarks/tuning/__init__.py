"""Tuning tools of the kernels: launch-parameter sweeps on a GPU (tune_decode) and the sm_90
resources of every kernel compiled on the CPU (kernel_resources)."""
