"""LayerCache: one layer's OSCAR-2 cache as the write, decode and extend kernels take it."""

from dataclasses import dataclass

import torch

from .format import DEFAULT_K_CLIP, DEFAULT_V_CLIP, META_FIELDS, OscarFormat


def pool_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed codes or meta buffer of shape [slots, H_kv, ...] (format.codes_shape, meta_shape)
    stored head-major, [H_kv, slots, ...] in memory: every kernel reads one KV head at a time, and
    this way a page of slots is one run of bytes per head rather than pieces of 16-64 bytes in
    every slot's row of all heads, which the heads' programs fetch at different times (H100,
    4-bit keys: 1,431 against 2,186 us at 32 x 128K, results/h100/pool-layout.md)."""
    slots, heads, *rest = shape
    return torch.zeros(heads, slots, *rest, dtype=dtype, device=device).transpose(0, 1)


@dataclass(frozen=True)
class LayerCache:
    """The buffers, rotations and clip ratios of one layer, validated once at construction.

    k_codes: [slots, H_kv, key_bits · D/8] uint8, v_codes: [slots, H_kv, D/4] uint8
    (fmt.codes_shape); k_meta, v_meta: [slots, H_kv, D/G, 2] fp16 (scale, minimum), sharing
    strides (any strides with contiguous rows; the pool's are head-major: pool_buffer); k_window,
    v_window: [rows, H_kv, D] bf16 window rows (rotated space), sharing strides; k_rot, v_rot: [H_kv or 1, D, D] orthogonal, stored float32 contiguous; k_clip,
    v_clip: the clip quantiles in (0, 1] the write kernel applies.
    """

    fmt: OscarFormat
    k_codes: torch.Tensor
    k_meta: torch.Tensor
    v_codes: torch.Tensor
    v_meta: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor
    k_rot: torch.Tensor
    v_rot: torch.Tensor
    k_clip: float = DEFAULT_K_CLIP
    v_clip: float = DEFAULT_V_CLIP

    def __post_init__(self):
        fmt, heads, d = self.fmt, self.k_codes.shape[1], self.fmt.head_dim
        for kind, codes in (("k", self.k_codes), ("v", self.v_codes)):
            want = fmt.codes_shape(1, heads, kind)[1:]
            if tuple(codes.shape[1:]) != want or codes.dtype != torch.uint8:
                raise ValueError(f"{kind} codes must be uint8 [slots, {want[0]}, {want[1]}] for "
                                 f"{fmt.code_bits(kind)}-bit codes, got {codes.dtype} {tuple(codes.shape)}")
        for meta in (self.k_meta, self.v_meta):
            if tuple(meta.shape[1:]) != fmt.meta_shape(1, heads)[1:] or meta.dtype != torch.float16:
                raise ValueError(f"meta must be fp16 [slots, H_kv, {fmt.num_groups}, 2], got {tuple(meta.shape)}")
        for window in (self.k_window, self.v_window):
            if tuple(window.shape[1:]) != (heads, d) or window.dtype != torch.bfloat16:
                raise ValueError(f"windows must be bf16 [rows, H_kv, {d}], got {tuple(window.shape)}")
        if self.k_meta.stride() != self.v_meta.stride():
            raise ValueError("K and V meta buffers must share strides")
        if self.k_window.stride() != self.v_window.stride():
            raise ValueError("K and V window buffers must share strides")
        for buf in (self.k_codes, self.v_codes, self.k_meta, self.k_window):
            if buf.stride(-1) != 1:
                raise ValueError("pool buffers must be contiguous in their last dim")
        if self.k_meta.stride(-2) != META_FIELDS:
            raise ValueError("meta groups must be contiguous")
        for name in ("k_rot", "v_rot"):
            rot = getattr(self, name)
            if rot.dim() != 3 or rot.shape[0] not in (1, heads) or tuple(rot.shape[1:]) != (d, d):
                raise ValueError(f"rotations must be [H_kv or 1, {d}, {d}], got {tuple(rot.shape)}")
            object.__setattr__(self, name, rot.float().contiguous())

    @property
    def kv_heads(self) -> int:
        return self.k_codes.shape[1]

    def rotation(self, kind: str) -> tuple[torch.Tensor, int]:
        """The rotation of kind "k" or "v" and its per-head stride (0 when all heads share it)."""
        rot = self.k_rot if kind == "k" else self.v_rot
        return rot, rot.stride(0) if rot.shape[0] > 1 else 0
