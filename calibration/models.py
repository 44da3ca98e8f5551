"""Loading a Llama / Qwen2 / Qwen3-family causal LM with transformers, and its KV geometry."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oscar_sglang.kernels.format import SUPPORTED_HEAD_DIMS

from .datasets import DataError, resolve_model

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class Geometry:
    """Attention shape of a model: what a rotation artifact must match."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


def geometry(config) -> Geometry:
    """Geometry of a transformers config; refuses architectures the OSCAR-2 cache cannot serve."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise DataError(f"model_type {config.model_type!r} is not supported; calibration handles "
                        f"{SUPPORTED_MODEL_TYPES}")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise DataError(f"layer types {sorted(layer_types)}: sliding-window attention is not "
                        "supported by the OSCAR-2 cache")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise DataError(f"head_dim {head_dim} is not supported by OSCAR-2 ({SUPPORTED_HEAD_DIMS})")
    return Geometry(config.num_hidden_layers, config.num_attention_heads,
                    config.num_key_value_heads, head_dim)


def model_name(path: str, gguf_file: str | None) -> str:
    """A readable name for artifact metadata: the GGUF stem or the checkpoint directory name."""
    if gguf_file:
        return Path(gguf_file).name.removesuffix(".gguf")
    return Path(path.rstrip("/")).name


def load_model(model: str, gguf_file: str | None = None, device: str = "cpu"):
    """(model, tokenizer, name) in float32 eval mode. `model` is a checkpoint directory (or the
    alias of datasets.SMOLLM2_MODEL); with `gguf_file`, transformers dequantizes the GGUF weights
    to ordinary float tensors, so attention is the stock module code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable; fail fast
    path, gguf = resolve_model(model, gguf_file)
    if not Path(path).is_dir():
        raise DataError(f"model directory {path!r} does not exist (no model hub is used: pass a local "
                        "checkpoint directory, or the alias smollm2-135m-instruct)")
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).to(device).eval()
    geometry(lm.config)  # refuse unsupported models before any work
    return lm, tokenizer, model_name(path, gguf)
