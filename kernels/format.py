"""The OSCAR-2 KV-cache format: the single source of truth for its constants and shapes.

Per token slot, per layer, per KV head, for K and for V separately:

1. rotate  x' = x · R                      (R orthogonal [D, D]; keys post-RoPE)
2. clip    |x'| at the c-quantile of |x'| over the row's D values
3. quantize groups of G consecutive dims to b bits, asymmetric (b = 2 for values, key_bits for
           keys): m = min, s = (max - min) / (2^b - 1) (both stored fp16),
           code = floor((x - m) / s + 1/2) in 0..2^b - 1
4. pack    bits [1:0] of every code in a 2-bit plane, "quartered": byte j holds dims j, j + D/4,
           j + 2D/4, j + 3D/4 in bits [1:0], [3:2], [5:4], [7:6], so unpacking gives four
           contiguous D/4 slices. Keys wider than 2 bits add a high plane after it with the code
           bits above bit 1: 4-bit keys a second quartered 2-bit plane (bits [3:2]), 3-bit keys
           a 1-bit plane of D/8 bytes, "paired": bit 2 of every code in a quartered plane h,
           whose bytes j = 2i, 2i + 1 share byte i as h_2i | h_2i+1 << 1 (h uses only the even
           bits). Either high plane reads as a quartered 2-bit plane c_1 (for 3-bit keys
           h_2i = byte i & 0x55, h_2i+1 = byte i >> 1 & 0x55), so a key is c = c_0 + 4·c_1
           through the same 2-bit unpacking

Buffers per layer: codes [slots, H_kv, b·D/8] uint8 (the high plane from byte D/4 on) and meta
[slots, H_kv, D/G, 2] fp16 (meta[..., 0] = scale, meta[..., 1] = minimum), for K and for V, stored
head-major (layer_cache.pool_buffer: indexed by slot, laid out by KV head). Keys
at 4 bits keep the needle a long prompt hides where 2-bit keys lose it (values at 2 bits do not:
benchmarks/results/accuracy-smollm2-135m-instruct-passkey-diagnosis.md); 3-bit keys keep it to
about 2K tokens on SmolLM2 (benchmarks/results/quality-server-smollm2-135m-instruct-k3.md).
The first `sink_tokens` and the last `recent_tokens` positions of every running sequence are
additionally kept in BF16 (rotated space) in per-request window rows.
"""

from dataclasses import dataclass

FORMAT_NAME = "oscar-2"
FORMAT_VERSION = 1
CODE_BITS = 2
CODES_PER_BYTE = 8 // CODE_BITS
CODE_MAX = (1 << CODE_BITS) - 1
SUPPORTED_KEY_BITS = (2, 3, 4)
# The key width served, calibrated for and evaluated when nothing else says: 2-bit keys lose facts
# hidden in long prompts that 4-bit keys keep (benchmarks/results/quality-server-*). A rotation
# file records the width it was calibrated for and the server follows it.
DEFAULT_KEY_BITS = 4
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
# rotations (kernels.rotation_file.data_free_rotations) knowingly: lower quality than calibrated
# rotations, unusable on some models. Without either, OSCAR refuses to serve.
DATA_FREE_ROTATIONS = "data-free"


@dataclass(frozen=True)
class OscarFormat:
    """Shape arithmetic of the OSCAR-2 format for one head_dim / group size / window choice."""

    head_dim: int
    group_size: int | None = None
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    key_bits: int = CODE_BITS

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
        if self.key_bits not in SUPPORTED_KEY_BITS:
            raise ValueError(f"OSCAR-2 key bits must be one of {SUPPORTED_KEY_BITS}, got {self.key_bits}; "
                             "pass --oscar-key-bits with an allowed value")
        if self.sink_tokens < 0 or self.recent_tokens < 1:
            raise ValueError(
                f"sink_tokens must be >= 0 and recent_tokens >= 1, got "
                f"{self.sink_tokens} and {self.recent_tokens}"
            )

    @property
    def packed_dim(self) -> int:
        """Bytes of one 2-bit code plane per (token, head): D / 4 (a value's codes)."""
        return self.head_dim // CODES_PER_BYTE

    @property
    def key_packed_dim(self) -> int:
        """Bytes of a key's codes per (token, head): key_bits · D / 8."""
        return self.key_bits * self.head_dim // 8

    @property
    def num_groups(self) -> int:
        """Quantization groups per (token, head): D / G."""
        return self.head_dim // self.group_size

    @property
    def meta_bits_per_element(self) -> float:
        """Bits per element of the (scale, minimum) pairs: 32 / G."""
        return META_FIELDS * META_BYTES * 8 / self.group_size

    @property
    def bits_per_element(self) -> float:
        """Physical bits per element in the pool, K and V averaged: (key_bits + 2) / 2 + 32 / G
        (2.25 at 2-bit keys and G = 128, 3.0 at 3-bit keys and G = 64, 3.5 at 4-bit keys and
        G = 64)."""
        return (self.key_bits + CODE_BITS) / 2 + self.meta_bits_per_element

    @property
    def window_rows_per_request(self) -> int:
        """BF16 rows a running request owns: sinks + recent ring."""
        return self.sink_tokens + self.recent_tokens

    def bytes_per_token_head(self) -> int:
        """Pool bytes (codes and meta) for one token of one KV head, K and V together."""
        return self.key_packed_dim + self.packed_dim + 2 * self.num_groups * META_FIELDS * META_BYTES

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        """INT2 pool bytes of one token slot across all layers (Qwen3-8B: 20,736)."""
        return num_layers * num_kv_heads * self.bytes_per_token_head()

    def window_bytes_per_request(self, num_layers: int, num_kv_heads: int) -> int:
        """BF16 window bytes one running request owns across all layers, K and V."""
        return 2 * num_layers * self.window_rows_per_request * num_kv_heads * self.head_dim * WINDOW_BYTES

    def effective_bits(self, context_len: int) -> float:
        """Bits per element of one sequence of `context_len` tokens, BF16 windows included."""
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        exact = min(context_len, self.window_rows_per_request)
        return self.bits_per_element + exact * WINDOW_BYTES * 8 / context_len

    def codes_shape(self, slots: int, num_kv_heads: int, kind: str) -> tuple[int, int, int]:
        """Codes buffer of kind "k" (key_packed_dim bytes per row) or "v" (one 2-bit plane)."""
        return (slots, num_kv_heads, self.key_packed_dim if kind == "k" else self.packed_dim)

    def code_bits(self, kind: str) -> int:
        """Bits of one code of kind "k" or "v"."""
        return self.key_bits if kind == "k" else CODE_BITS

    def meta_shape(self, slots: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        return (slots, num_kv_heads, self.num_groups, META_FIELDS)

    def window_shape(self, requests: int, num_kv_heads: int) -> tuple[int, int, int]:
        """Flat BF16 window rows of one layer: request r owns rows [r*(S+W), (r+1)*(S+W))."""
        return (requests * self.window_rows_per_request, num_kv_heads, self.head_dim)

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
