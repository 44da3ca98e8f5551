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
from dataclasses import dataclass

from oscar_sglang import config as oscar_config
from oscar_sglang.config import OscarConfig

logger = logging.getLogger(__name__)

BACKEND = "oscar"
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
# SGLang's ServerArgs.__post_init__ returns early for these and so do the checks.
PLACEHOLDER_MODELS = ("none", "dummy")
# layer_types entries (HF configs) that are ordinary full attention, and local attention.
FULL_ATTENTION_TYPES = frozenset({"full_attention", "attention"})
LOCAL_ATTENTION_TYPES = frozenset({"sliding_attention", "chunked_attention", "local_attention"})
# HF config attributes that only hybrid (Mamba / linear-attention) models carry.
HYBRID_MARKERS = ("hybrid_override_pattern", "layers_block_type", "linear_attn_config",
                  "attn_type_list", "mamba_d_state", "mamba_d_ssm", "ssm_cfg")


def refusal(problem: str, fix: str) -> ValueError:
    return ValueError(f"--kv-quant oscar cannot serve {problem}; {fix}")


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
        raise refusal("a server asked for both --kv-quant none and --attention-backend oscar",
                      "drop one of them")
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
    settings.format(shape.head_dim)  # ValueError for unsupported head_dim / group size
    if settings.rotations is not None:
        load_checked_rotations(settings, shape, server_args.model_path)
    else:
        logger.warning("--kv-quant oscar without --oscar-rotations: data-free rotations "
                       "(quality is lower than with calibrated ones)")
    for name in BACKEND_FIELDS:
        setattr(server_args, name, BACKEND)
    logger.info("OSCAR 2-bit KV cache on: %s", settings)
    return settings


def check_server_features(server_args) -> None:
    """Refuse SGLang features that read or move the KV cache in its own layout."""
    others = {name: getattr(server_args, name) for name in BACKEND_FIELDS}
    for name, value in others.items():
        if value not in (None, BACKEND):
            flag = "--" + name.replace("_", "-")
            raise refusal(f"with {flag} {value}: OSCAR brings its own attention backend",
                          f"drop {flag}")
    if server_args.kv_cache_dtype != "auto":
        raise refusal(f"with --kv-cache-dtype {server_args.kv_cache_dtype}: OSCAR is itself the "
                      "KV cache format", "drop --kv-cache-dtype")
    if server_args.speculative_algorithm is not None:
        raise refusal(f"speculative decoding (--speculative-algorithm "
                      f"{server_args.speculative_algorithm}): the draft model's cache and "
                      "verification are not implemented for the OSCAR format",
                      "drop --speculative-algorithm or serve without --kv-quant oscar")
    if server_args.enable_hierarchical_cache:
        raise refusal("with --enable-hierarchical-cache: host offload copies KV slots in "
                      "SGLang's BF16 layout", "drop --enable-hierarchical-cache")
    if server_args.disaggregation_mode != "null":
        raise refusal(f"PD disaggregation (--disaggregation-mode "
                      f"{server_args.disaggregation_mode}): KV transfer moves SGLang's BF16 "
                      "layout", "serve prefill and decode in one server")


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
        raise ValueError(f"--kv-quant oscar could not read the config of {server_args.model_path!r} "
                         f"to check the model ({type(e).__name__}: {e}); pass a local model folder "
                         "or a reachable Hugging Face id") from e


def check_model_config(hf_config, model: str) -> ModelShape:
    """Refuse MLA, hybrid and sliding-window models; return the shape of the others."""
    from sglang.srt.utils.hf_transformers_utils import get_hf_text_config

    text = get_hf_text_config(copy.deepcopy(hf_config))  # it may edit; the original is cached
    fix = "OSCAR supports full-attention MHA/GQA models only: serve it without --kv-quant oscar"
    if getattr(text, "kv_lora_rank", None):
        raise refusal(f"{model}: it uses multi-head latent attention (kv_lora_rank="
                      f"{text.kv_lora_rank})", fix)
    layer_types = set(getattr(text, "layer_types", None) or ())
    other = sorted(layer_types - FULL_ATTENTION_TYPES - LOCAL_ATTENTION_TYPES)
    hybrid = [f"layer_types {other}"] if other else []
    hybrid += [m for m in HYBRID_MARKERS if getattr(text, m, None) is not None]
    if "mamba" in str(getattr(text, "model_type", "")):
        hybrid.append(f"model_type {text.model_type}")
    if hybrid:
        raise refusal(f"{model}: it is a hybrid Mamba/linear-attention model "
                      f"({', '.join(hybrid)})", fix)
    windowed = sorted(layer_types & LOCAL_ATTENTION_TYPES)
    local = [f"layer_types {windowed}"] if windowed else []
    # Qwen2/3 keep sliding_window but switch it off with use_sliding_window=False.
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        local.append(f"sliding_window={text.sliding_window}")
    if getattr(text, "attention_chunk_size", None):
        local.append(f"attention_chunk_size={text.attention_chunk_size}")
    if local:
        raise refusal(f"{model}: it uses sliding-window/chunked attention ({', '.join(local)})",
                      fix)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    v_head_dim = getattr(text, "v_head_dim", None) or head_dim
    if v_head_dim != head_dim:
        raise refusal(f"{model}: its value head_dim {v_head_dim} differs from the key head_dim "
                      f"{head_dim}", fix)
    kv_heads = 1 if getattr(text, "multi_query", False) else (
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    return ModelShape(text.num_hidden_layers, kv_heads, head_dim)


def load_checked_rotations(settings: OscarConfig, shape: ModelShape, model: str):
    """The rotation file of `settings`, checked against the served model (RotationFileError,
    a ValueError, names the mismatching field). Data-free rotations when none is given."""
    from oscar_sglang.kernels.rotations import data_free_rotations, load_rotations

    if settings.rotations is None:
        return data_free_rotations(shape.num_layers, shape.num_kv_heads, shape.head_dim, model)
    rotations = load_rotations(settings.rotations)
    rotations.check_matches(shape.num_layers, shape.num_kv_heads, shape.head_dim, model=model)
    return rotations


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
        raise refusal(f"{server_args.model_path}: SGLang's defaults for it set "
                      f"{', '.join(changed)} after OSCAR was validated",
                      "serve this model without --kv-quant oscar")


def scheduler_enabled(server_args) -> bool:
    """In a scheduler: whether OSCAR is on. The launcher sets every attention backend field to
    "oscar" and --kv-quant exports SGLANG_OSCAR_KV_QUANT; anything else in between means the
    launcher checks did not run (e.g. ServerArgs built before load_plugins())."""
    backends = {getattr(server_args, name) for name in BACKEND_FIELDS}
    env = oscar_config.enabled()
    if backends == {BACKEND} and env is not False:
        return True
    if BACKEND not in backends and not env:
        return False
    raise ValueError(
        f"inconsistent OSCAR configuration in the scheduler: attention backends "
        f"{sorted(map(str, backends))}, {oscar_config.KV_QUANT.env}={env}. The launcher's "
        "checks did not run; start SGLang through sglang.launch_server / `sglang serve` / "
        "Engine with oscar-sglang installed, or build ServerArgs after "
        "sglang.srt.plugins.load_plugins()")


def check_model_runtime(kvc) -> None:
    """In a scheduler, with SGLang's resolved model view (KVCacheConfigurator): the same
    refusals as `check_model_config`, for models its heuristics missed."""
    model = kvc.model_config.model_path
    fix = "OSCAR supports full-attention MHA/GQA models only: serve it without --kv-quant oscar"
    if kvc.use_mla_backend:
        raise refusal(f"{model}: SGLang serves it with multi-head latent attention", fix)
    if kvc.mambaish_config is not None:
        raise refusal(f"{model}: SGLang serves it as a hybrid Mamba/linear-attention model", fix)
    if kvc.is_hybrid_swa or (kvc.sliding_window_size or 0) > 0:
        raise refusal(f"{model}: SGLang serves it with sliding-window attention "
                      f"(window {kvc.sliding_window_size})", fix)
