"""KV budget arithmetic and the pool-configurator hook bodies.

SGLang sizes its token pool as budget // cell_size. Every running request also needs BF16
window rows and its share of the slot-keyed sink pool (SINK_SEQUENCES_PER_REQUEST sequence
starts of S sink rows), taken from the same budget in one of two ways:
- by default OSCAR reports a cell size inflated by 1 / (1 - f), so that a fraction f
  (--oscar-window-fraction) of the budget is left for those rows, then caps
  max_running_requests to the requests they can hold;
- with an explicit --max-running-requests, the rows of that many requests are taken off the
  budget first and the INT2 pool gets the rest, as a user who sets the request count expects.
"""

import logging
import math
import weakref
from dataclasses import dataclass

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.runtime_context import get_exec, get_parallel, get_schedule

from oscar_sglang.config import OscarConfig
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.pool import OscarTokenToKVPool
from oscar_sglang.served_rotations import kv_head_range, served_config

logger = logging.getLogger(__name__)
BF16_BYTES = 2
# Sink-pool rows per running request, in sequence starts of S rows: one start per request lets
# the radix tree keep exact sinks for as many distinct cached sequence starts as there are
# running requests (plenty for many agents sharing a few system prompts). Each start costs
# S / (S + W) of a request's window rows (1/3 at the defaults S = 64, W = 128), charged to the
# same window budget, so raising this lowers the running-request cap.
SINK_SEQUENCES_PER_REQUEST = 1


def sink_rows_per_request(fmt) -> int:
    """Sink-pool rows the pool holds per running request."""
    return SINK_SEQUENCES_PER_REQUEST * fmt.sink_tokens


def sink_bytes_per_request(fmt, num_layers: int, num_kv_heads: int) -> int:
    """BF16 sink-pool bytes per running request across all layers, K and V."""
    return 2 * num_layers * sink_rows_per_request(fmt) * num_kv_heads * fmt.head_dim * BF16_BYTES


def budgeted_cell_bytes(int2_bytes_per_token: int, window_fraction: float) -> int:
    """Bytes per token charged against the KV budget so that `window_fraction` remains."""
    return math.ceil(int2_bytes_per_token / (1.0 - window_fraction))


def window_request_capacity(max_tokens: int, cell_bytes: int, window_fraction: float,
                            window_bytes_per_request: int) -> int:
    """Requests whose window rows fit in the share of the budget set aside for them
    (one row block is SGLang's padding request)."""
    window_budget = max_tokens * cell_bytes * window_fraction
    return int(window_budget // window_bytes_per_request) - 1


@dataclass(frozen=True)
class PoolSizing:
    """What the cell-size hook decided about one configurator's pool, for its finalize hook.
    Bytes are across the rank's layers and KV heads."""

    fmt: OscarFormat
    explicit_requests: bool  # --max-running-requests given: its window rows come off the budget first
    page_size: int
    window_fraction: float
    window_bytes: int  # BF16 window rows of one running request
    sink_bytes: int  # one running request's share of the sink pool
    int2_bytes: int  # one token slot
    bf16_bytes: int  # one token of a BF16 cache, for the capacity log


# one entry per DefaultPoolConfigurator between its two hooks, dropped with it
_SIZINGS: "weakref.WeakKeyDictionary[object, PoolSizing]" = weakref.WeakKeyDictionary()


def sizing_of(configurator) -> PoolSizing | None:
    """The PoolSizing `compute_cell_size` recorded for `configurator`, None if it did not run."""
    return _SIZINGS.get(configurator)


def compute_cell_size(original, configurator, kvc, num_layers: int) -> int:
    """AROUND hook body of DefaultPoolConfigurator._compute_cell_size."""
    model = kvc.model_config
    # The key width, which sets the bytes per token, may come from the rotation file.
    config, _ = served_config(OscarConfig.from_env(), model.num_hidden_layers,
                              model.get_total_num_kv_heads(), model.head_dim, model.model_path)
    fmt = config.format(model.head_dim)
    heads = model.get_num_kv_heads(get_parallel().attn_tp_size)
    int2 = fmt.bytes_per_token(num_layers, heads)
    schedule = get_schedule()
    sizing = _SIZINGS[configurator] = PoolSizing(
        fmt=fmt, explicit_requests=schedule.max_running_requests is not None, page_size=schedule.page_size,
        window_fraction=config.window_memory_fraction,
        window_bytes=fmt.window_bytes_per_request(num_layers, heads),
        sink_bytes=sink_bytes_per_request(fmt, num_layers, heads),
        int2_bytes=int2, bf16_bytes=2 * num_layers * heads * model.head_dim * BF16_BYTES)
    return int2 if sizing.explicit_requests else budgeted_cell_bytes(int2, sizing.window_fraction)


def tokens_after_window_rows(budget_bytes: int, requests: int, per_request_bytes: int,
                             int2_bytes_per_token: int, page_size: int) -> int:
    """INT2 tokens (whole pages) left in `budget_bytes` once `requests` running requests (plus
    SGLang's padding request) have their window and sink rows."""
    left = budget_bytes - (requests + 1) * per_request_bytes
    return max(0, left // int2_bytes_per_token) // page_size * page_size


def finalize_with_max_running_requests(original, configurator, config):
    """AROUND hook body of DefaultPoolConfigurator.finalize_with_max_running_requests: cap
    max_running_requests to the window rows (and their share of the sink pool) and log the
    capacity next to BF16's."""
    config = original(configurator, config)
    sizing = _SIZINGS[configurator]
    budget = config.max_total_num_tokens * configurator._cell_size
    per_request = sizing.window_bytes + sizing.sink_bytes
    if sizing.explicit_requests:
        tokens = tokens_after_window_rows(budget, config.max_running_requests, per_request,
                                          sizing.int2_bytes, sizing.page_size)
        if tokens < config.max_running_requests:
            raise ValueError(
                f"OSCAR: the BF16 window rows of --max-running-requests {config.max_running_requests} "
                f"({per_request / 2**20:.1f} MB each, with the sink-pool share) leave "
                f"{tokens} KV tokens of the {budget / 2**30:.1f} GiB budget; lower "
                "--max-running-requests or raise --mem-fraction-static")
        config.max_total_num_tokens = tokens
    else:
        fit = window_request_capacity(config.max_total_num_tokens, configurator._cell_size,
                                      sizing.window_fraction, per_request)
        if fit < 1:
            raise ValueError(
                f"OSCAR: the KV budget leaves no room for BF16 window rows ({per_request / 2**20:.1f} "
                "MB per request with its sink-pool share); raise --mem-fraction-static or "
                "--oscar-window-fraction")
        if config.max_running_requests > fit:
            logger.info("OSCAR: max_running_requests capped from %d to %d by the window rows "
                        "(--oscar-window-fraction %.2f; or pass --max-running-requests)",
                        config.max_running_requests, fit, sizing.window_fraction)
            config.max_running_requests = fit
    tokens, fmt = config.max_total_num_tokens, sizing.fmt
    bf16_tokens = budget // sizing.bf16_bytes
    logger.info(
        "OSCAR-2 KV cache: %.2f bits/element (%d-bit keys, 2-bit values, group %d), %d bytes/token, "
        "%d tokens; BF16 KV would "
        "hold %d tokens in the same budget (%.2fx); window rows for %d running requests; "
        "sink pool of %d BF16 rows (%.2f GB)",
        fmt.bits_per_element, fmt.key_bits, fmt.group_size, sizing.int2_bytes, tokens, bf16_tokens,
        tokens / max(bf16_tokens, 1), config.max_running_requests,
        config.max_running_requests * sink_rows_per_request(fmt),
        config.max_running_requests * sizing.sink_bytes / 2**30)
    return config


def build_mha_kv_pool(original, configurator, *, max_total_num_tokens: int, mha_pool_class,
                      quant_method=None, **kwargs):
    """AROUND hook body of KVCacheConfigurator._build_mha_kv_pool: build the OSCAR pool."""
    if mha_pool_class is not MHATokenToKVPool or quant_method is not None or configurator.post_capture_kv_active:
        raise ValueError("--kv-quant oscar supports only the default per-layer KV layout "
                         "(no page-major layout, FP4 KV or post-capture KV backing)")
    model = configurator.model_config
    parallel = get_parallel()
    total_heads = model.get_total_num_kv_heads()
    config, rotations = served_config(OscarConfig.from_env(), model.num_hidden_layers, total_heads,
                                      model.head_dim, model.model_path)
    fmt = config.format(model.head_dim)
    rotations = rotations.slice_kv_heads(*kv_head_range(total_heads, parallel.attn_tp_size, parallel.attn_tp_rank))
    layers = configurator.layer_info
    return OscarTokenToKVPool(
        max_total_num_tokens, page_size=configurator.pool_page_size,
        head_num=model.get_num_kv_heads(parallel.attn_tp_size), head_dim=model.head_dim,
        layer_num=layers.num_effective_layers, device=configurator.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        fmt=fmt, rotations=rotations, start_layer=layers.start_layer, end_layer=layers.end_layer,
        sink_rows_per_request=sink_rows_per_request(fmt))
