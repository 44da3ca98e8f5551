"""GPU timing for the kernel benchmarks (decode_kernels, decode_roofline, extend_kernels,
tuning/tune_decode): the median of one call replayed from a CUDA graph with L2 flushed between
calls, the device-to-device copy rate the HBM shares are taken against, shuffled paged requests,
and freeing memory between configurations."""

import gc

import torch
import triton
import triton.testing

FLASHINFER_WORKSPACE_BYTES = 512 << 20  # the baselines' FlashInfer workspace


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


def release():
    gc.collect()
    torch.cuda.empty_cache()
