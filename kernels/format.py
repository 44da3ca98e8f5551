"""The OSCAR-2 KV-cache format: the single source of truth for its constants and shapes.

Per token slot, per layer, per KV head, for K and for V separately:

1. rotate  x' = x · R                      (R orthogonal [D, D]; keys post-RoPE)
2. clip    |x'| at the c-quantile of |x'| over the row's D values
3. quantize groups of G consecutive dims to 2 bits, asymmetric:
           m = min, s = (max - min) / 3 (both stored fp16), code = floor((x - m) / s + 1/2) in 0..3
4. pack    "quartered": byte j holds dims j, j + D/4, j + 2D/4, j + 3D/4 in bits
           [1:0], [3:2], [5:4], [7:6], so unpacking gives four contiguous D/4 slices

Buffers per layer: codes [slots, H_kv, D/4] uint8 and meta [slots, H_kv, D/G, 2] fp16
(meta[..., 0] = scale, meta[..., 1] = minimum), for K and for V.
The first `sink_tokens` and the last `recent_tokens` positions of every running sequence are
additionally kept in BF16 (rotated space) in per-request window rows.
"""

from dataclasses import dataclass

FORMAT_NAME = "oscar-2"
FORMAT_VERSION = 1
CODE_BITS = 2
CODES_PER_BYTE = 8 // CODE_BITS
CODE_MAX = (1 << CODE_BITS) - 1
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 128)
META_FIELDS = 2  # scale, minimum
META_BYTES = 2  # each stored as fp16
WINDOW_BYTES = 2  # bf16 window rows
DEFAULT_SINK_TOKENS = 64
DEFAULT_RECENT_TOKENS = 128
DEFAULT_K_CLIP = 0.96
DEFAULT_V_CLIP = 0.92
# What `--oscar-rotations` takes instead of a rotation file to serve the data-free Hadamard
# rotations (kernels.rotations.data_free_rotations) knowingly: lower quality than calibrated
# rotations, unusable on some models. Without either, OSCAR refuses to serve.
DATA_FREE_ROTATIONS = "data-free"


@dataclass(frozen=True)
class OscarFormat:
    """Shape arithmetic of the OSCAR-2 format for one head_dim / group size / window choice."""

    head_dim: int
    group_size: int | None = None
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS

    def __post_init__(self):
        d = self.head_dim
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"OSCAR-2 supports head_dim in {SUPPORTED_HEAD_DIMS}, got {d}; "
                "serve this model with another --kv-quant setting"
            )
        if self.group_size is None:
            object.__setattr__(self, "group_size", d)
        g = self.group_size
        if g not in SUPPORTED_GROUP_SIZES or g > d or d % g:
            allowed = [x for x in SUPPORTED_GROUP_SIZES if x <= d and d % x == 0]
            raise ValueError(
                f"OSCAR-2 group size must be one of {allowed} for head_dim {d}, got {g}; "
                "pass --oscar-group-size with an allowed value"
            )
        if self.sink_tokens < 0 or self.recent_tokens < 1:
            raise ValueError(
                f"sink_tokens must be >= 0 and recent_tokens >= 1, got "
                f"{self.sink_tokens} and {self.recent_tokens}"
            )

    @property
    def packed_dim(self) -> int:
        """Bytes of codes per (token, head): D / 4."""
        return self.head_dim // CODES_PER_BYTE

    @property
    def num_groups(self) -> int:
        """Quantization groups per (token, head): D / G."""
        return self.head_dim // self.group_size

    @property
    def bits_per_element(self) -> float:
        """Physical bits per K or V element in the INT2 pool: 2 + 32 / G."""
        return CODE_BITS + META_FIELDS * META_BYTES * 8 / self.group_size

    @property
    def window_rows(self) -> int:
        """BF16 rows a running request owns: sinks + recent ring."""
        return self.sink_tokens + self.recent_tokens

    def bytes_per_token_head(self) -> int:
        """INT2 bytes for one token of one KV head, K and V together."""
        return 2 * (self.packed_dim + self.num_groups * META_FIELDS * META_BYTES)

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        """INT2 pool bytes of one token slot across all layers (Qwen3-8B: 20,736)."""
        return num_layers * num_kv_heads * self.bytes_per_token_head()

    def window_bytes_per_request(self, num_layers: int, num_kv_heads: int) -> int:
        """BF16 window bytes one running request owns across all layers, K and V."""
        return 2 * num_layers * self.window_rows * num_kv_heads * self.head_dim * WINDOW_BYTES

    def effective_bits(self, context_len: int) -> float:
        """Bits per element of one sequence of `context_len` tokens, BF16 windows included."""
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        exact = min(context_len, self.window_rows)
        return self.bits_per_element + exact * WINDOW_BYTES * 8 / context_len

    def codes_shape(self, slots: int, num_kv_heads: int) -> tuple[int, int, int]:
        return (slots, num_kv_heads, self.packed_dim)

    def meta_shape(self, slots: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        return (slots, num_kv_heads, self.num_groups, META_FIELDS)

    def window_shape(self, requests: int, num_kv_heads: int) -> tuple[int, int, int]:
        """Flat BF16 window rows of one layer: request r owns rows [r*(S+W), (r+1)*(S+W))."""
        return (requests * self.window_rows, num_kv_heads, self.head_dim)

    def window_row(self, request_row: int, position: int) -> int:
        """Row of `position` inside the window rows of a request starting at `request_row`."""
        if position < self.sink_tokens:
            return request_row + position
        return request_row + self.sink_tokens + (position - self.sink_tokens) % self.recent_tokens

    def int2_span(self, visible_len: int) -> tuple[int, int]:
        """Positions [start, end) a query reads from INT2 codes when `visible_len` tokens are
        visible; [0, start) come from the sink rows and [end, visible_len) from the recent ring."""
        start = min(self.sink_tokens, visible_len)
        return start, max(start, visible_len - self.recent_tokens)
