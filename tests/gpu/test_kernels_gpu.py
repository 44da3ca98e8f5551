"""OSCAR-2 attention kernels on CUDA at realistic sizes (Qwen3-8B layer: H_q 32, H_kv 8, D 128),
against the PyTorch reference, plus CUDA-graph capture and replay of decode.

Pools are written with the real Triton write path (`quantize.write_kv_int2`) on the GPU.
"""

from dataclasses import replace

import pytest
import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels import shared_prefix
from oscar_sglang.kernels import int2_split as int2_split_kernel
from oscar_sglang.kernels.decode import DECODE_LAUNCH, DecodeLaunch, decode_attention_int2, decode_step
from oscar_sglang.kernels.extend import extend_attention_int2, flashinfer_extend_wrapper, plan_flashinfer_extend
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache
from oscar_sglang.kernels.quantize import write_kv_int2
from oscar_sglang.kernels.shared_prefix import find_shared_prefixes
from kernel_cases import Batch, assert_matches, make_cache

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def write_sequence(cache: LayerCache, slots: torch.Tensor, window_start: int, dtype, gen, scale=1.0):
    """Random K/V for a whole sequence at `slots`, written with `write_kv`."""
    fmt, length = cache.fmt, slots.shape[0]
    heads = cache.k_codes.shape[1]
    k = (torch.randn(length, heads, fmt.head_dim, generator=gen, device=DEVICE) * scale).to(dtype)
    v = torch.randn(length, heads, fmt.head_dim, generator=gen, device=DEVICE).to(dtype)
    write_kv(cache, k, v, slots, window_start)


def write_kv(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, window_start: int):
    """k, v: [L, H_kv, D], a whole sequence, written at `slots` with write_kv_int2; window rows
    get the sinks and the last W positions."""
    fmt, length = cache.fmt, slots.shape[0]
    pos = torch.arange(length, device=DEVICE)
    start, end = fmt.int2_span(length)
    ring = window_start + fmt.sink_tokens + (pos - fmt.sink_tokens) % fmt.recent_tokens
    rows = torch.where(pos < start, window_start + pos, torch.where(pos >= end, ring, -1))
    write_kv_int2(k, v, slots, cache, rows)


def build(fmt: OscarFormat, lens, kv_heads: int, dtype, gen, index_dtype=torch.int32, spare_slots=1024):
    """Cache + decode metadata for requests of the given lengths at shuffled slots and rows."""
    cache = make_cache(fmt, kv_heads, sum(lens) + spare_slots, len(lens) + 2, True, torch.Generator().manual_seed(0),
                       DEVICE)
    slot_perm = torch.randperm(cache.k_codes.shape[0], generator=gen, device=DEVICE)
    row_perm = torch.randperm(len(lens) + 2, generator=gen, device=DEVICE)[:len(lens)] * fmt.window_rows_per_request
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE)
    for b, length in enumerate(lens):
        write_sequence(cache, slot_perm[indptr[b]:indptr[b + 1]], int(row_perm[b]), dtype, gen)
    return cache, Batch(indptr.to(index_dtype), slot_perm[:sum(lens)].to(index_dtype), row_perm.to(index_dtype))


def decode_args(cache, batch, q):
    return (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, cache.fmt.head_dim ** -0.5)


def split_launch(int2_split: str, gqa: int) -> DecodeLaunch:
    """Launch parameters running the split programs in `int2_split`'s kernel at every batch
    size, checked to be the one that runs them for this GQA group."""
    assert int2_split == "triton" or int2_split_kernel.serves(gqa, torch.device(DEVICE))
    return DECODE_LAUNCH.with_split_kernel(int2_split)


def test_decode_default_picks_the_split_kernel_by_pairs():
    """int2_split.cu from DecodeLaunch.cuda_min_pairs (request, KV head) pairs on, the Triton
    split kernel below that; beside shared-prefix blocks both, by request; all give the
    reference's output."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    fmt = OscarFormat(128, key_bits=4)
    for requests in (DECODE_LAUNCH.cuda_min_pairs // 8, DECODE_LAUNCH.cuda_min_pairs // 8 - 1):
        enough = requests * 8 >= DECODE_LAUNCH.cuda_min_pairs
        cache, batch = build(fmt, [3000] * requests, 8, torch.bfloat16, gen)
        q = torch.randn(requests, 32, 128, generator=gen, device=DEVICE).to(torch.bfloat16)
        args = decode_args(cache, batch, q)
        step = decode_step(*args)
        assert step.split_kernels == ("cuda" if enough else "triton")
        assert_matches(step.run(), ref.decode_attention(*args), torch.bfloat16)
        shared = shared_prefix.find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, 4)
        step = decode_step(*args, shared=shared)
        assert step.split_kernels == ("by_request" if enough else "triton")
        assert_matches(step.run(), ref.decode_attention(*args), torch.bfloat16)


def test_split_by_request_beside_shared_blocks_in_a_cuda_graph():
    """Both split kernels in one step: four requests on a 20K-token prefix with own tails of 1 to
    9000 tokens and two of 12000 tokens of their own, the INT2 programs of each in int2_split.cu
    when they read at least 512 positions each, else in the Triton kernel; captured in a CUDA
    graph, replayed into poisoned partials and output."""
    gen = torch.Generator(DEVICE).manual_seed(6)
    fmt = OscarFormat(128, key_bits=4)
    heads, dtype, prefix = 8, torch.bfloat16, 20000
    own = [1, 300, 3000, 9000, 12000, 12000]
    cache = make_cache(fmt, heads, prefix + sum(own), len(own) + 2, True, torch.Generator().manual_seed(0), DEVICE)
    perm = torch.randperm(cache.k_codes.shape[0], generator=gen, device=DEVICE)
    prefix_kv = [torch.randn(prefix, heads, 128, generator=gen, device=DEVICE).to(dtype) for _ in "kv"]
    sequences = []
    for b, slots in enumerate(torch.split(perm[prefix:], own)):
        k, v = (torch.randn(own[b], heads, 128, generator=gen, device=DEVICE).to(dtype) for _ in "kv")
        if b < 4:
            slots, k, v = torch.cat([perm[:prefix], slots]), torch.cat([prefix_kv[0], k]), torch.cat([prefix_kv[1], v])
        write_kv(cache, k, v, slots, b * fmt.window_rows_per_request)
        sequences.append(slots)
    indptr = torch.tensor([0] + [x.shape[0] for x in sequences], device=DEVICE).cumsum(0)
    batch = Batch(indptr.to(torch.int32), torch.cat(sequences).to(torch.int32),
                  torch.arange(len(own), dtype=torch.int32, device=DEVICE) * fmt.window_rows_per_request)
    q = torch.randn(len(own), heads * 4, 128, generator=gen, device=DEVICE).to(dtype)
    args = decode_args(cache, batch, q)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, group=4)
    step = decode_step(*args, shared=shared, num_kv_splits=4, launch=replace(DECODE_LAUNCH, cuda_min_positions=512))
    assert step.split_kernels == "by_request"
    ends = [fmt.int2_span(n)[1] for n in batch.kv_indptr.diff().tolist()]
    cuda_takes = [end - int(start) >= step.cuda_min_span for end, start in zip(ends, shared.own_start)]
    assert cuda_takes == [False, False, True, True, True, True], cuda_takes
    step.run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.run()
    for scratch in (step.part_o, step.part_lse, step.out):  # a part neither kernel wrote reads as NaN
        scratch.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(step.out, ref.decode_attention(*args), dtype)


@pytest.mark.parametrize("int2_split", ["cuda", "triton"])
@pytest.mark.parametrize("dtype, key_bits, group_size",
                         [(torch.bfloat16, 2, 128), (torch.float16, 2, 128), (torch.bfloat16, 3, 128),
                          (torch.bfloat16, 4, 128), (torch.bfloat16, 4, 64)])
def test_decode_qwen3_layer(dtype, key_bits, group_size, int2_split):
    gen = torch.Generator(DEVICE).manual_seed(0)
    fmt = OscarFormat(128, group_size, key_bits=key_bits)
    cache, batch = build(fmt, [32768, 5000, 193, 1], 8, dtype, gen)
    q = torch.randn(4, 32, 128, generator=gen, device=DEVICE).to(dtype)
    args = decode_args(cache, batch, q)
    out = torch.full_like(q, float("nan"))
    decode_attention_int2(*args, out=out, launch=split_launch(int2_split, 4))
    assert_matches(out, ref.decode_attention(*args), dtype)


@pytest.mark.parametrize(
    "head_dim, group_size, kv_heads, gqa, sinks, recent, index_dtype, key_bits",
    [
        (64, 32, 4, 1, 4, 8, torch.int64, 2),
        (64, 64, 2, 3, 64, 128, torch.int32, 2),
        (128, 32, 2, 8, 16, 32, torch.int64, 2),
        (128, 64, 8, 4, 64, 128, torch.int32, 2),
        (64, 64, 3, 3, 64, 128, torch.int32, 4),
        (128, 32, 2, 8, 16, 32, torch.int64, 4),
        (64, 32, 3, 7, 64, 128, torch.int64, 3),
        (128, 64, 8, 4, 64, 128, torch.int32, 3),
    ],
)
@pytest.mark.parametrize("int2_split", ["cuda", "triton"])
def test_decode_shapes(head_dim, group_size, kv_heads, gqa, sinks, recent, index_dtype, key_bits, int2_split):
    gen = torch.Generator(DEVICE).manual_seed(head_dim + gqa)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=sinks, recent_tokens=recent, key_bits=key_bits)
    lens = [1, sinks + recent, sinks + recent + 1, 3000, 17]
    cache, batch = build(fmt, lens, kv_heads, torch.bfloat16, gen, index_dtype)
    q = torch.randn(len(lens), kv_heads * gqa, head_dim, generator=gen, device=DEVICE).to(torch.bfloat16)
    args = decode_args(cache, batch, q)
    expected = ref.decode_attention(*args)
    for splits in (None, 1, 7):
        assert_matches(decode_attention_int2(*args, num_kv_splits=splits, launch=split_launch(int2_split, gqa)),
                       expected, torch.bfloat16)


def planned_flashinfer(chunks, prefixes, q_heads, kv_heads, head_dim, dtype):
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=DEVICE)
    return plan_flashinfer_extend(flashinfer_extend_wrapper(workspace), chunks, prefixes, q_heads, kv_heads,
                                  head_dim, head_dim ** -0.5, dtype)


@pytest.mark.parametrize("attention", ["flashinfer", "triton"])
@pytest.mark.parametrize(
    "dtype, head_dim, kv_heads, gqa, prefixes, chunks, key_bits",
    [
        # Qwen3-8B: prefixes from INT2 and windows, long chunks without a prefix (a prompt's
        # first chunk) beside one-token chunks (decode requests in a mixed batch)
        (torch.bfloat16, 128, 8, 4, [32768, 0, 300, 0, 77], [512, 700, 1, 2500, 1], 2),
        (torch.float16, 128, 8, 4, [32768, 0, 300, 0, 77], [512, 700, 1, 2500, 1], 2),
        (torch.bfloat16, 64, 3, 3, [5000, 1, 0, 129], [333, 65, 17, 1], 2),
        (torch.bfloat16, 64, 3, 3, [5000, 1, 0, 129], [333, 65, 17, 1], 4),
        (torch.bfloat16, 128, 8, 4, [32768, 0, 300, 0, 77], [512, 700, 1, 2500, 1], 3),
    ],
)
def test_extend_matches_reference(attention, dtype, head_dim, kv_heads, gqa, prefixes, chunks, key_bits):
    """Both attention paths of extend_attention_int2 (FlashInfer over the gathered K/V, as the
    backend runs it on CUDA, and the Triton kernel) against the reference, into a NaN-poisoned
    output, with non-finite rows among the new K/V (the pool stores them as zeros)."""
    gen = torch.Generator(DEVICE).manual_seed(head_dim + gqa)
    fmt = OscarFormat(head_dim, key_bits=key_bits)
    cache, batch = build(fmt, prefixes, kv_heads, dtype, gen)
    n, q_heads = sum(chunks), kv_heads * gqa
    q = torch.randn(n, q_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    k[n // 2, 1, 3], v[n - 1, 0, 0] = float("nan"), float("inf")
    qo_indptr = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    args = (q, k, v, qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, head_dim ** -0.5)
    wrapper = None
    if attention == "flashinfer":
        wrapper = planned_flashinfer(chunks, prefixes, q_heads, kv_heads, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    extend_attention_int2(*args, max_extend_len=max(chunks), max_prefix_len=max(prefixes), out=out,
                          flashinfer=wrapper)
    assert_matches(out, ref.extend_attention(*args), dtype)


@pytest.mark.parametrize("int2_split", ["cuda", "triton"])
def test_decode_cuda_graph_replay_with_new_lengths(int2_split):
    """Capture decode once, then change every request's length (new tokens written to the pool
    and kv_indptr / kv_indices updated in place) and replay, back and forth: the output follows
    the new state."""
    gen = torch.Generator(DEVICE).manual_seed(2)
    fmt = OscarFormat(128)
    lens, grown = [4000, 150, 20000], [4001, 400, 20001]
    cache, batch = build(fmt, grown, 8, torch.bfloat16, gen, spare_slots=16)
    slots = [batch.kv_indices[batch.kv_indptr[b]:batch.kv_indptr[b + 1]].clone() for b in range(len(lens))]

    def set_lengths(lengths):
        indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
        batch.kv_indptr.copy_(indptr.to(batch.kv_indptr.dtype))
        batch.kv_indices[:indptr[-1]].copy_(torch.cat([s[:n] for s, n in zip(slots, lengths)]))
        # the window rows must describe the current length: rewrite each sequence's prefix
        for b, n in enumerate(lengths):
            write_sequence(cache, slots[b][:n], int(batch.window_starts[b]), torch.bfloat16,
                           torch.Generator(DEVICE).manual_seed(b))

    set_lengths(lens)
    q = torch.randn(len(lens), 32, 128, generator=gen, device=DEVICE).to(torch.bfloat16)
    out = torch.empty_like(q)
    args = decode_args(cache, batch, q)
    launch = split_launch(int2_split, 4)
    decode_attention_int2(*args, out=out, launch=launch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention_int2(*args, out=out, launch=launch)

    for lengths in (lens, grown, lens):
        set_lengths(lengths)
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        n = int(batch.kv_indptr[-1])
        current = (q, batch.kv_indptr, batch.kv_indices[:n], batch.window_starts, cache, 128 ** -0.5)
        assert_matches(out, ref.decode_attention(*current), torch.bfloat16)


def test_write_then_decode_in_a_cuda_graph():
    """A decode step as the backend runs it, captured once: the write kernel stores each
    request's newest token (its K/V in the recent window ring) and decode attends to it at once;
    every replay with new K/V/q must see the token just written, never the one before."""
    gen = torch.Generator(DEVICE).manual_seed(5)
    fmt = OscarFormat(128)
    lens = [3001, 150, 20001]
    cache, batch = build(fmt, lens, 8, torch.bfloat16, gen)
    last = batch.kv_indptr[1:].long() - 1
    slots = batch.kv_indices[last]
    rows = torch.tensor([fmt.window_row(int(batch.window_starts[b]), n - 1) for b, n in enumerate(lens)],
                        device=DEVICE)
    k, v = (torch.empty(len(lens), 8, 128, dtype=torch.bfloat16, device=DEVICE) for _ in "kv")
    q = torch.empty(len(lens), 32, 128, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(q)

    def fresh():
        for x in (k, v, q):
            x.copy_(torch.randn(x.shape, generator=gen, device=DEVICE).to(x.dtype))

    def step():
        write_kv_int2(k, v, slots, cache, rows)
        decode_attention_int2(*decode_args(cache, batch, q), out=out)

    fresh()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(8):
        fresh()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, ref.decode_attention(*decode_args(cache, batch, q)), torch.bfloat16)


def test_shared_prefix_decode_in_a_cuda_graph():
    """find_shared_prefixes and the shared decode captured in one CUDA graph (as a backend would
    capture them), replayed after the batch changed in place from six requests on one 20K-token
    prefix to three of them on it and three on sequences of their own: both match the reference."""
    gen = torch.Generator(DEVICE).manual_seed(3)
    fmt = OscarFormat(128)
    prefix, own = 20000, [300, 1, 4000, 57, 900, 2]
    alone = [n + 5000 for n in own]
    heads, dtype = 8, torch.bfloat16
    cache = make_cache(fmt, heads, prefix + sum(own) + sum(alone), len(own) + 2, True,
                       torch.Generator().manual_seed(0), DEVICE)
    perm = torch.randperm(cache.k_codes.shape[0], generator=gen, device=DEVICE)
    prefix_slots = perm[:prefix]
    own_slots = list(torch.split(perm[prefix:prefix + sum(own)], own))
    alone_slots = list(torch.split(perm[prefix + sum(own):], alone))

    def kv(length):
        return [torch.randn(length, heads, 128, generator=gen, device=DEVICE).to(dtype) for _ in "kv"]

    prefix_kv = kv(prefix)
    windows = [b * fmt.window_rows_per_request for b in range(len(own))]
    shared_layout = [(True, own_slots[b]) for b in range(len(own))]
    mixed_layout = [(b % 2 == 0, own_slots[b] if b % 2 == 0 else alone_slots[b]) for b in range(len(own))]
    capacity = len(own) * prefix + sum(own) + sum(alone)  # every request lists its prefix slots
    batch = Batch(torch.zeros(len(own) + 1, dtype=torch.int32, device=DEVICE),
                  torch.zeros(capacity, dtype=torch.int32, device=DEVICE),
                  torch.tensor(windows, dtype=torch.int32, device=DEVICE))

    def set_layout(layout):
        sequences = []
        for b, (on_prefix, slots) in enumerate(layout):
            k, v = kv(slots.shape[0])
            if on_prefix:
                slots = torch.cat([prefix_slots, slots])
                k, v = torch.cat([prefix_kv[0], k]), torch.cat([prefix_kv[1], v])
            write_kv(cache, k, v, slots, windows[b])
            sequences.append(slots)
        lengths = torch.tensor([0] + [s.shape[0] for s in sequences], device=DEVICE).cumsum(0)
        batch.kv_indptr.copy_(lengths.to(torch.int32))
        batch.kv_indices[:int(lengths[-1])].copy_(torch.cat(sequences).to(torch.int32))

    set_layout(shared_layout)
    q = torch.randn(len(own), 32, 128, generator=gen, device=DEVICE).to(dtype)
    out = torch.empty_like(q)
    args = decode_args(cache, batch, q)

    def step():
        shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, group=4)
        decode_attention_int2(*args, out=out, shared=shared)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for layout in (shared_layout, mixed_layout):
        set_layout(layout)
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        n = int(batch.kv_indptr[-1])
        current = (q, batch.kv_indptr, batch.kv_indices[:n], batch.window_starts, cache, 128 ** -0.5)
        assert_matches(out, ref.decode_attention(*current), dtype)


@pytest.mark.parametrize("head_dim, key_bits", [(128, 2), (128, 3), (128, 4), (64, 3), (64, 4)])
def test_shared_blocks_of_a_wide_batch_match_reference(head_dim, key_bits):
    """A batch large enough for wide shared-prefix blocks (`shared_prefix.WIDE_BLOCKS_MIN_BATCH`):
    requests on one 6K-token prefix, with own tails of 1 to 300 tokens, read it in the blocks the
    library picks (16 requests: 64 query rows at uncapped registers; 3-bit keys: 4 requests) at
    its default launch parameters; then with the reduce merging its partials in chunks of 8
    (`decode.reduce_plan`'s choice once one load per program fits a single query row)."""
    gen = torch.Generator(DEVICE).manual_seed(5)
    fmt = OscarFormat(head_dim, key_bits=key_bits)
    heads, gqa, dtype = 8, 4, torch.bfloat16
    batch_size = shared_prefix.WIDE_BLOCKS_MIN_BATCH + 4
    prefix, own = 6000, [1 + (37 * b) % 300 for b in range(batch_size)]
    cache = make_cache(fmt, heads, prefix + sum(own), batch_size, True, torch.Generator().manual_seed(0), DEVICE)
    perm = torch.randperm(cache.k_codes.shape[0], generator=gen, device=DEVICE)
    prefix_kv = [torch.randn(prefix, heads, head_dim, generator=gen, device=DEVICE).to(dtype) for _ in "kv"]
    sequences = []
    for b, (slots, n) in enumerate(zip(torch.split(perm[prefix:], own), own)):
        tail = [torch.randn(n, heads, head_dim, generator=gen, device=DEVICE).to(dtype) for _ in "kv"]
        slots = torch.cat([perm[:prefix], slots])
        write_kv(cache, torch.cat([prefix_kv[0], tail[0]]), torch.cat([prefix_kv[1], tail[1]]), slots,
                 b * fmt.window_rows_per_request)
        sequences.append(slots)
    indptr = torch.tensor([0] + [s.shape[0] for s in sequences], device=DEVICE).cumsum(0)
    batch = Batch(indptr.to(torch.int32), torch.cat(sequences).to(torch.int32),
                  torch.arange(batch_size, dtype=torch.int32, device=DEVICE) * fmt.window_rows_per_request)
    q = torch.randn(batch_size, heads * gqa, head_dim, generator=gen, device=DEVICE).to(dtype)
    args = decode_args(cache, batch, q)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, group=gqa)
    assert shared.members.shape == (batch_size, shared_prefix.shared_dot_rows(batch_size, key_bits) // gqa)
    out = torch.full_like(q, float("nan"))
    decode_attention_int2(*args, out=out, shared=shared)
    want = ref.decode_attention(*args)
    assert_matches(out, want, dtype)
    step = decode_step(*args, shared=shared, launch=replace(DECODE_LAUNCH, reduce_rows=1, reduce_parts=8))
    assert step.reduction_block.parts == 8 < step.parts
    step.out.fill_(float("nan"))
    assert_matches(step.run(), want, dtype)
