"""The attention-layer shapes the kernel benchmarks time."""

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionLayer:
    """Head counts and width of one attention layer."""
    title: str
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q_heads // self.kv_heads


QWEN3_8B = AttentionLayer("Qwen3-8B", 32, 8, 128)
LAYERS = {"qwen3-8b": QWEN3_8B, "qwen2.5-0.5b": AttentionLayer("Qwen2.5-0.5B", 14, 2, 64)}
