"""GPU timing for the kernel benchmarks (decode_kernels, decode_roofline, extend_kernels,
tuning/tune_decode): the median of one call replayed from a CUDA graph with L2 flushed between
calls, the device-to-device copy rate the HBM shares are taken against and the bytes an OSCAR
decode step must read, shuffled paged requests and random OSCAR decode inputs over them, and
freeing memory between configurations."""

import gc

import torch
import triton
import triton.testing
from oscar_sglang.kernels.decode import DecodeInputs
from oscar_sglang.kernels.format import DEFAULT_KEY_BITS, WINDOW_BYTES, OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer

from benchmarks.layers import AttentionLayer

FLASHINFER_WORKSPACE_BYTES = 512 << 20  # the baselines' FlashInfer workspace
PAGE_SIZE = 16  # tokens per page of the shuffled requests unless a benchmark is told otherwise


def capture(fn):
    """fn replayed from a CUDA graph (launch overhead out of the measurement), else fn itself."""
    fn()  # compiles / JITs outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001  (a method that cannot be captured is timed eagerly)
        torch.cuda.synchronize()
        print(f"    (no CUDA graph: {type(exc).__name__}: {exc}; timing eagerly)")
        return fn, "eager"
    return graph.replay, "cudagraph"


def median_us(fn, rep_ms):
    """Median microseconds of one call (L2 flushed between calls by do_bench) and the mode."""
    run, mode = capture(fn)
    return triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median") * 1e3, mode


def hbm_bandwidth_gbs(rep_ms, nbytes=4 << 30):
    """Device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=rep_ms, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def qo_bytes(layer: AttentionLayer, batch: int, dtype_bytes: int = 2) -> int:
    """Bytes of one decode step's queries and outputs."""
    return 2 * batch * layer.q_heads * layer.head_dim * dtype_bytes


def oscar_decode_bytes(layer: AttentionLayer, fmt: OscarFormat, batch: int, context: int) -> int:
    """What one OSCAR decode step must read: INT2 span codes + meta, window rows, q and out."""
    start, end = fmt.int2_span(context)
    int2_tokens, window_tokens = end - start, context - (end - start)
    per_request = layer.kv_heads * (int2_tokens * fmt.bytes_per_token_head()
                                    + window_tokens * 2 * layer.head_dim * WINDOW_BYTES)
    return batch * per_request + qo_bytes(layer, batch)


def paged_requests(batch, context, page_size, shared_prefix):
    """Shuffled pages for `batch` requests of `context` tokens, the first shared_prefix tokens'
    pages (rounded down to whole pages) common to all: page ids [B, pages] (int64), per-token
    slots [B * context] (int64), kv_indptr in tokens [B + 1] (int32)."""
    pages_per_req = triton.cdiv(context, page_size)
    pages = torch.randperm(batch * pages_per_req, device="cuda").view(batch, pages_per_req)
    shared = min(shared_prefix, context) // page_size
    pages[:, :shared] = pages[0, :shared]
    offsets = torch.arange(context, device="cuda")
    slots = (pages[:, offsets // page_size] * page_size + offsets % page_size).reshape(-1)
    indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * context
    return pages, slots, indptr


def random_decode_inputs(fmt: OscarFormat, q: torch.Tensor, kv_heads: int, context: int, page_size: int,
                         shared_prefix: int = 0) -> DecodeInputs:
    """`decode_attention_int2`'s inputs for q [B, H_q, D] over B requests of `context` tokens on
    shuffled pages (`paged_requests`): random codes, scales and minimums of realistic size in the
    server pool's head-major buffers, BF16 window rows at shuffled request rows, random orthogonal
    rotations."""
    batch = q.shape[0]
    slots_total = batch * triton.cdiv(context, page_size) * page_size
    _, slots, indptr = paged_requests(batch, context, page_size, shared_prefix)
    codes = [pool_buffer(fmt.codes_shape(slots_total, kv_heads, kind), torch.uint8, "cuda").random_(0, 256)
             for kind in "kv"]
    metas = []
    for _ in "kv":
        meta = pool_buffer(fmt.meta_shape(slots_total, kv_heads), torch.float16, "cuda")
        meta[..., 0].uniform_(0.01, 0.1)  # scale
        meta[..., 1].uniform_(-0.2, -0.05)  # minimum
        metas.append(meta)
    windows = [torch.empty(fmt.window_shape(batch, kv_heads), dtype=torch.bfloat16, device="cuda").normal_()
               for _ in "kv"]
    d = fmt.head_dim
    rots = [torch.linalg.qr(torch.randn(kv_heads, d, d, device="cuda"))[0] for _ in "kv"]
    window_starts = torch.randperm(batch, device="cuda", dtype=torch.int32) * fmt.window_rows_per_request
    cache = LayerCache(fmt, codes[0], metas[0], codes[1], metas[1], windows[0], windows[1], rots[0], rots[1])
    return DecodeInputs(q, indptr, slots.to(torch.int32), window_starts, cache, d ** -0.5)


def layer_decode_inputs(layer: AttentionLayer, batch: int, context: int, seed: int = 0,
                        shared_prefix: int = 0, key_bits: int = DEFAULT_KEY_BITS) -> DecodeInputs:
    """`random_decode_inputs` for `layer` in the served format with `key_bits`-bit keys (the served
    default unless given), pages of PAGE_SIZE, q [B, H_q, D] BF16 drawn after seeding torch with `seed`."""
    torch.manual_seed(seed)
    q = torch.randn(batch, layer.q_heads, layer.head_dim, device="cuda").to(torch.bfloat16)
    fmt = OscarFormat(layer.head_dim, key_bits=key_bits)
    return random_decode_inputs(fmt, q, layer.kv_heads, context, PAGE_SIZE, shared_prefix)


def release():
    gc.collect()
    torch.cuda.empty_cache()
