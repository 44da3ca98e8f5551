"""Startup checks: every configuration the OSCAR KV cache cannot serve exactly is refused with a
ValueError naming the problem and the fix; nothing falls back to a BF16 cache silently.

Where they run (hooks in oscar_sglang.plugin):
- launcher, first thing in ServerArgs.__post_init__ (before SGLang resolves anything, loads
  weights or touches a GPU): `validate_server_args` checks the settings, the server features,
  the model's HF config, the format and the rotation file, then sets the attention backends
  to "oscar"; `check_resolved`, after SGLang's own resolution, checks it kept them.
- scheduler (spawned; it unpickles the launcher's ServerArgs, so __post_init__ does not run
  again), in the first OSCAR pool hook: `scheduler_enabled` checks that the ServerArgs and the
  inherited SGLANG_OSCAR_* environment agree, `check_model_runtime` re-checks the model with
  SGLang's own view of it.
"""

import copy
import json
import logging
import os
from dataclasses import dataclass

from oscar_sglang import config as oscar_config
from oscar_sglang.config import OscarConfig
from oscar_sglang.kernels.format import OscarFormat

logger = logging.getLogger(__name__)

BACKEND = "oscar"
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
# SGLang's ServerArgs.__post_init__ returns early for these and so do the checks.
PLACEHOLDER_MODELS = ("none", "dummy")
# Per-layer kinds in HF configs (`layer_types`, or `layers_block_type` in SGLang's hybrid
# configs): ordinary full attention, local attention; anything else is a Mamba / linear layer.
LAYER_KIND_FIELDS = ("layer_types", "layers_block_type")
FULL_ATTENTION_TYPES = frozenset({"full_attention", "attention"})
LOCAL_ATTENTION_TYPES = frozenset({"sliding_attention", "chunked_attention", "local_attention"})
# HF config attributes that only hybrid (Mamba / linear-attention) models carry.
HYBRID_MARKERS = ("hybrid_override_pattern", "linear_attn_config", "linear_conv_kernel_dim",
                  "attn_type_list", "mamba_d_state", "mamba_d_ssm", "ssm_cfg")


def refusal(problem: str, fix: str) -> ValueError:
    """The error for a configuration OSCAR cannot serve (ValueError, as SGLang's own checks)."""
    return ValueError(f"--kv-quant oscar does not support {problem}; {fix}")


def missing_rotations(model: str) -> ValueError:
    """The error for OSCAR without --oscar-rotations: data-free rotations are an explicit
    choice, since on some models they serve garbage."""
    flag, env = oscar_config.ROTATIONS.flag, oscar_config.ROTATIONS.env
    return ValueError(
        f"--kv-quant oscar needs rotations ({flag} / {env}) and none were given; calibrate a "
        f"rotation file for this model with `oscar-sglang calibrate --model {model} --data "
        "<text files> --tokens 32768 --out NAME.oscar.safetensors` and pass "
        f"`{flag} NAME.oscar.safetensors`, or pass `{flag} {oscar_config.DATA_FREE_ROTATIONS}` "
        "to serve the data-free Hadamard rotations knowingly (lower quality, unusable on some "
        "models)")


MODEL_FIX = ("serve this model without --kv-quant oscar (OSCAR supports full-attention MHA/GQA "
             "models only)")


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache and the rotation file depend on, for the whole model (all TP ranks)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def requested(server_args) -> bool:
    """Whether this server should use OSCAR: SGLANG_OSCAR_KV_QUANT=oscar (--kv-quant oscar) or
    attention_backend="oscar" (the Engine API). Contradictory requests are refused."""
    env = oscar_config.enabled()
    by_backend = server_args.attention_backend == BACKEND
    if env is False and by_backend:
        raise ValueError("--kv-quant none contradicts --attention-backend oscar; drop one of them")
    return bool(env) or by_backend


def validate_server_args(server_args) -> OscarConfig | None:
    """Launcher check, before SGLang's own __post_init__. Returns the config when OSCAR is on
    (and sets the attention backends to "oscar"), None when it is off."""
    if server_args.model_path.lower() in PLACEHOLDER_MODELS:
        return None
    on = requested(server_args)
    settings = OscarConfig.from_env()
    if not on:
        stray = oscar_config.given_settings()
        if stray:
            names = ", ".join(f"{s.flag} ({s.env})" for s in stray)
            raise ValueError(f"{names} given but the OSCAR KV cache is off; add --kv-quant oscar "
                             "(or attention_backend='oscar') or drop them")
        return None
    check_server_features(server_args)
    hf_config = read_model_config(server_args)
    shape = check_model_config(hf_config, server_args.model_path)
    # ValueError for an unsupported head_dim, group size or window, before the file is read
    OscarFormat(shape.head_dim, settings.group_size, settings.sink_tokens, settings.recent_tokens)
    if settings.rotations is None:
        raise missing_rotations(server_args.model_path)
    # The schedulers load the file again the same way; a RotationFileError (a ValueError) names
    # the unreadable part or the field that differs from the model.
    from oscar_sglang.served_rotations import served_config

    settings, _ = served_config(settings, shape.num_layers, shape.num_kv_heads, shape.head_dim,
                                server_args.model_path)
    for name in BACKEND_FIELDS:
        setattr(server_args, name, BACKEND)
    if server_args.cuda_graph_backend_prefill is None and not server_args.disable_prefill_cuda_graph:
        # Admission restores a radix hit's window rows on the host (not capturable); decode
        # keeps its CUDA graphs.
        server_args.disable_prefill_cuda_graph = True
        logger.info("OSCAR: prefill CUDA graph disabled (decode CUDA graphs stay on)")
    logger.info("OSCAR KV cache on (%.2f bits per element, keys %d bits, values 2): %s",
                settings.format(shape.head_dim).bits_per_element, settings.key_bits, settings)
    return settings


def check_server_features(server_args) -> None:
    """Refuse SGLang features that read or move the KV cache in its own layout."""
    for name in BACKEND_FIELDS:
        value = getattr(server_args, name)
        if value not in (None, BACKEND):
            flag = "--" + name.replace("_", "-")
            raise refusal(f"{flag} {value} (OSCAR brings its own attention backend)",
                          f"drop {flag}")
    if server_args.kv_cache_dtype != "auto":
        raise refusal(f"--kv-cache-dtype {server_args.kv_cache_dtype} (OSCAR is itself the KV "
                      "cache format)", "drop --kv-cache-dtype")
    if server_args.speculative_algorithm is not None:
        raise refusal(f"speculative decoding (--speculative-algorithm "
                      f"{server_args.speculative_algorithm}: the draft model's cache and the "
                      "verify pass are not implemented for the OSCAR format)",
                      "drop --speculative-algorithm or serve without --kv-quant oscar")
    if server_args.enable_hierarchical_cache:
        raise refusal("--enable-hierarchical-cache (host offload copies KV slots in SGLang's "
                      "BF16 layout)", "drop --enable-hierarchical-cache")
    if os.environ.get("SGLANG_USE_HND_KVCACHE", "").lower() in ("1", "true"):
        raise refusal("SGLANG_USE_HND_KVCACHE (SGLang's paged layout: its slot moves would index the "
                      "OSCAR pool as [pages, heads, page_size, dim])", "unset SGLANG_USE_HND_KVCACHE")
    if server_args.enable_two_batch_overlap or server_args.enable_pdmux:
        raise refusal("--enable-two-batch-overlap / --enable-pdmux (they split a batch over "
                      "several attention backends, which the OSCAR backend does not track)",
                      "drop the flag")
    if server_args.disaggregation_mode != "null":
        raise refusal(f"PD disaggregation (--disaggregation-mode "
                      f"{server_args.disaggregation_mode}: the KV transfer moves SGLang's BF16 "
                      "layout)", "serve prefill and decode in one server")
    check_parallelism(server_args)


PARALLEL_FIX = ("use --tp-size (KV heads split over GPUs) and/or --dp-size without "
                "--enable-dp-attention (one full server per GPU group)")


def check_parallelism(server_args) -> None:
    """Refuse the parallel layouts the OSCAR backend does not implement. Tensor parallelism
    (each rank holds its own KV heads: oscar_sglang.sizing slices rotations and pools by head),
    plain data parallelism (separate schedulers, each with the whole model) and DP attention
    with one attention rank per DP group (--dp-size = --tp-size) need nothing from it. Also run
    after SGLang's resolution (`check_resolved`), which may switch some of these on."""
    dcp = getattr(server_args, "dcp_size", 1) or 1
    if dcp > 1:
        raise refusal(f"decode context parallelism (--dcp-size {dcp}: each rank would store one "
                      f"token in {dcp} of a sequence and merge partial attention across ranks, "
                      "which the OSCAR backend and its BF16 window rows do not do)", PARALLEL_FIX)
    cp = getattr(server_args, "attn_cp_size", 1) or 1
    if cp > 1 or getattr(server_args, "enable_prefill_cp", False):
        raise refusal(f"attention context parallelism (--attn-cp-size {cp} / --enable-prefill-cp: "
                      "a prefill split over ranks is attended by SGLang's context-parallel "
                      "backends, not by the OSCAR backend)", PARALLEL_FIX)
    tp, dp = getattr(server_args, "tp_size", 1) or 1, getattr(server_args, "dp_size", 1) or 1
    if getattr(server_args, "enable_dp_attention", False) and dp > 1 and tp // dp > 1:
        # With several attention-TP ranks per DP group SGLang pads each rank's extend tokens to
        # a multiple of tp/dp (ForwardBatch.prepare_mlp_sync_batch); the OSCAR backend maps
        # every token of an extend batch to a request and has no row for padding tokens.
        raise refusal(f"--enable-dp-attention with {tp // dp} attention-TP ranks per DP group "
                      f"(--tp-size {tp} --dp-size {dp}: SGLang pads prefill batches to a multiple "
                      f"of {tp // dp} tokens, which the OSCAR backend does not handle)",
                      f"pass --dp-size {tp} (one attention rank per DP group) or "
                      + PARALLEL_FIX)


def read_model_config(server_args):
    """The model's HF config exactly as SGLang's ModelConfig will read it (same cached
    get_config call: local folders work offline, Mistral/GGUF/SGLang-only configs too)."""
    from sglang.srt.utils.hf_transformers_utils import get_config

    kwargs = {}
    if server_args.decrypted_config_file:
        kwargs["_configuration_file"] = server_args.decrypted_config_file.strip()
    try:
        return get_config(server_args.model_path, trust_remote_code=server_args.trust_remote_code,
                          revision=server_args.revision,
                          model_override_args=json.loads(server_args.json_model_override_args),
                          model_config_parser=server_args.model_config_parser, **kwargs)
    except Exception as e:  # any failure here means we cannot vouch for the model
        raise ValueError(f"--kv-quant oscar could not read the config of "
                         f"{server_args.model_path!r} to check the model ({type(e).__name__}: "
                         f"{e}); pass a local model folder or a reachable Hugging Face id") from e


def check_model_config(hf_config, model: str) -> ModelShape:
    """Refuse MLA, hybrid and sliding-window models; return the shape of the others."""
    from sglang.srt.utils.hf_transformers_utils import get_hf_text_config

    text = get_hf_text_config(copy.deepcopy(hf_config))  # it may edit; the original is cached
    if getattr(text, "kv_lora_rank", None):
        raise refusal(f"multi-head latent attention ({model} has kv_lora_rank="
                      f"{text.kv_lora_rank})", MODEL_FIX)
    layer_types = {kind for f in LAYER_KIND_FIELDS for kind in getattr(text, f, None) or ()}
    other = sorted(layer_types - FULL_ATTENTION_TYPES - LOCAL_ATTENTION_TYPES)
    hybrid = [f"layer kinds {other}"] if other else []
    hybrid += [m for m in HYBRID_MARKERS if getattr(text, m, None) is not None]
    if "mamba" in str(getattr(text, "model_type", "")):
        hybrid.append(f"model_type {text.model_type}")
    if hybrid:
        raise refusal(f"hybrid Mamba/linear-attention models ({model} has "
                      f"{', '.join(hybrid)})", MODEL_FIX)
    windowed = sorted(layer_types & LOCAL_ATTENTION_TYPES)
    local = [f"layer kinds {windowed}"] if windowed else []
    # Qwen2/3 keep sliding_window but switch it off with use_sliding_window=False.
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        local.append(f"sliding_window={text.sliding_window}")
    if getattr(text, "attention_chunk_size", None):
        local.append(f"attention_chunk_size={text.attention_chunk_size}")
    if local:
        raise refusal(f"sliding-window/chunked attention ({model} has {', '.join(local)})",
                      MODEL_FIX)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    v_head_dim = getattr(text, "v_head_dim", None) or head_dim
    if v_head_dim != head_dim:
        raise refusal(f"a value head_dim other than the key head_dim ({model} has {v_head_dim} "
                      f"and {head_dim})", MODEL_FIX)
    kv_heads = 1 if getattr(text, "multi_query", False) else (
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    return ModelShape(text.num_hidden_layers, kv_heads, head_dim)


def check_resolved(server_args) -> None:
    """After SGLang's own __post_init__: its model-specific resolution must not have changed
    what OSCAR was validated for."""
    changed = [f"{name}={getattr(server_args, name)!r}" for name in BACKEND_FIELDS
               if getattr(server_args, name) != BACKEND]
    if server_args.kv_cache_dtype != "auto":
        changed.append(f"kv_cache_dtype={server_args.kv_cache_dtype!r}")
    if server_args.speculative_algorithm is not None:
        changed.append(f"speculative_algorithm={server_args.speculative_algorithm!r}")
    if server_args.enable_hierarchical_cache:
        changed.append("enable_hierarchical_cache=True")
    if changed:
        raise refusal(f"what SGLang's defaults for {server_args.model_path} set after OSCAR "
                      f"was validated: {', '.join(changed)}", "serve this model without "
                      "--kv-quant oscar")
    check_parallelism(server_args)


def scheduler_enabled(server_args) -> bool:
    """In a scheduler: whether OSCAR is on. The launcher sets every attention backend field to
    "oscar" and --kv-quant exports SGLANG_OSCAR_KV_QUANT; anything else in between means the
    launcher checks did not run (e.g. ServerArgs built before load_plugins())."""
    backends = {getattr(server_args, name) for name in BACKEND_FIELDS}
    env = oscar_config.enabled()
    env_name = oscar_config.KV_QUANT.env
    if backends == {BACKEND} and env is not False:
        return True
    if BACKEND not in backends and not env:
        return False
    raise ValueError(
        f"inconsistent OSCAR configuration in the scheduler: attention backends "
        f"{sorted(map(str, backends))}, {env_name}={os.environ.get(env_name, '(unset)')}. The "
        "launcher's checks did not run; start SGLang through sglang.launch_server / `sglang "
        "serve` / Engine with oscar-sglang installed, or build ServerArgs after "
        "sglang.srt.plugins.load_plugins()")


def check_model_runtime(kvc) -> None:
    """In a scheduler, with SGLang's resolved model view (KVCacheConfigurator): the same
    refusals as `check_model_config`, for models its heuristics missed."""
    model = kvc.model_config.model_path
    if kvc.use_mla_backend:
        raise refusal(f"multi-head latent attention (SGLang serves {model} with it)", MODEL_FIX)
    if kvc.mambaish_config is not None:
        raise refusal(f"hybrid Mamba/linear-attention models (SGLang serves {model} as one)",
                      MODEL_FIX)
    if kvc.is_hybrid_swa or (kvc.sliding_window_size or 0) > 0:
        raise refusal(f"sliding-window attention (SGLang serves {model} with window "
                      f"{kvc.sliding_window_size})", MODEL_FIX)
