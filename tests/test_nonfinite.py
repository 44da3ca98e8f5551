"""Non-finite K/V end to end (CPU: Triton interpreter): a NaN / Inf (token, head) row written by
`write_kv_int2` is stored as zeros, in the INT2 pool and in the BF16 window copy alike; decode
and extend attention stay finite, requests and KV heads that do not read the row are
bit-identical to a run without it, and the affected ones match the reference attention over
the same pool. The write kernel flags the layer, and `NonFiniteReporter` turns the flags into
one warning per layer."""

import logging
from types import SimpleNamespace

import pytest
import torch

from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache
from oscar_sglang.kernels.quantize import write_kv_int2
from oscar_sglang.nonfinite import NonFiniteReporter
from kernel_cases import Batch, assert_matches, make_cache, new_tokens, run_decode, run_extend, window_positions

FMT = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
KV_HEADS, GQA = 2, 2
BAD_HEAD = 1  # KV head of the bad row; query heads [BAD_HEAD * GQA, (BAD_HEAD + 1) * GQA) read it
LENS = [40, 23, 13]  # request 0 holds the bad token; int2_span(40) = [4, 32)
NAN, INF = float("nan"), float("inf")
# the interpreter rotates NaN / Inf rows with numpy, which warns about them
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in matmul:RuntimeWarning")


def write_sequence(cache: LayerCache, k, v, slots, window_start: int, flag=None):
    """Positions 0..L-1 of one request through write_kv_int2, window rows as a request of
    length L holds them (sinks and the last W positions)."""
    fmt, length = cache.fmt, k.shape[0]
    window = set(window_positions(fmt, length))
    rows = torch.tensor([fmt.window_row(window_start, p) if p in window else -1 for p in range(length)])
    write_kv_int2(k, v, slots, cache, rows, flag)


def filled_pool(position=None, tensors="", value=0.0):
    """The pool of LENS (same random data every call), with `value` written into one element
    of request 0's (position, BAD_HEAD) row of the K and/or V named in `tensors`.
    Returns the cache, the decode batch, the flag the writes set and the bad row's slot."""
    gen = torch.Generator().manual_seed(0)
    num_slots = sum(LENS) + 8
    cache = make_cache(FMT, KV_HEADS, num_slots, len(LENS) + 1, True, gen)
    slot_perm = torch.randperm(num_slots, generator=gen)
    flag = torch.zeros(1, dtype=torch.int32)
    indptr, starts = [0], []
    for b, length in enumerate(LENS):
        k, v = (torch.randn(length, KV_HEADS, FMT.head_dim, generator=gen).bfloat16() for _ in "kv")
        if b == 0:
            for name in tensors:
                {"k": k, "v": v}[name][position, BAD_HEAD, 5] = value
        slots = slot_perm[indptr[-1]:indptr[-1] + length]
        start = (b + 1) * FMT.window_rows_per_request
        write_sequence(cache, k, v, slots, start, flag)
        indptr.append(indptr[-1] + length)
        starts.append(start)
    batch = Batch(torch.tensor(indptr), slot_perm[:indptr[-1]], torch.tensor(starts))
    return cache, batch, flag, None if position is None else int(slot_perm[position])


def assert_row_zeroed(bad: LayerCache, clean: LayerCache, slot: int, position: int, tensors: str):
    """The bad (slot, BAD_HEAD) row is zeros wherever it is stored; everything else is as in
    the clean pool (the other KV head of the same token included)."""
    start = FMT.window_rows_per_request  # request 0's first window row (filled_pool: request b at (b + 1) * (S + W))
    in_window = position in window_positions(FMT, LENS[0])
    for name in "kv":
        parts = ("codes", "meta", "window")
        codes, meta, window = (getattr(bad, f"{name}_{part}") for part in parts)
        clean_codes, clean_meta, clean_window = (getattr(clean, f"{name}_{part}") for part in parts)
        touched = torch.zeros(codes.shape[:2], dtype=torch.bool)
        if name in tensors:
            touched[slot, BAD_HEAD] = True
            assert (codes[slot, BAD_HEAD] == 0).all() and (meta[slot, BAD_HEAD] == 0).all()
            if in_window:
                assert (window[FMT.window_row(start, position), BAD_HEAD] == 0).all()
        assert torch.equal(codes[~touched], clean_codes[~touched])
        assert same(meta[~touched], clean_meta[~touched])
        rows = torch.ones(window.shape[:2], dtype=torch.bool)
        if name in tensors and in_window:
            rows[FMT.window_row(start, position), BAD_HEAD] = False
        assert same(window[rows], clean_window[rows])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN poison (of unused slots and window rows) included."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# (what holds the bad row, position in request 0 of length 40, poisoned tensors, value)
DECODE_CASES = [
    ("int2", 10, "k", NAN),
    ("int2", 20, "v", INF),
    ("sink", 2, "kv", INF),
    ("recent", 39, "kv", NAN),  # the token this decode step writes
    ("recent", 35, "k", -INF),
]


@pytest.mark.parametrize("where, position, tensors, value", DECODE_CASES)
def test_decode_isolates_non_finite_row(where, position, tensors, value):
    start, end = FMT.int2_span(LENS[0])
    assert (start <= position < end) == (where == "int2")
    clean, batch, clean_flag, _ = filled_pool()
    bad, _, bad_flag, slot = filled_pool(position, tensors, value)
    assert clean_flag.item() == 0 and bad_flag.item() == 1
    assert_row_zeroed(bad, clean, slot, position, tensors)

    q = torch.randn(len(LENS), KV_HEADS * GQA, FMT.head_dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    got_clean, _ = run_decode(clean, batch, q)
    got, expected = run_decode(bad, batch, q)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1:], got_clean[1:]), "another request's output changed"
    other_heads = [h for h in range(KV_HEADS * GQA) if h // GQA != BAD_HEAD]
    assert torch.equal(got[0, other_heads], got_clean[0, other_heads]), "another KV head's output changed"
    assert_matches(got, expected, torch.bfloat16)


# prefixes LENS with chunks CHUNKS: L = 45 for request 0, int2_span(45) = [4, 37); positions
# [37, 40) of its prefix come from its recent rows
CHUNKS = [5, 3, 1]
EXTEND_CASES = [("int2", 10, "kv", NAN), ("sink", 1, "k", INF), ("recent", 38, "v", NAN)]


@pytest.mark.parametrize("where, position, tensors, value", EXTEND_CASES)
def test_extend_isolates_non_finite_prefix_row(where, position, tensors, value):
    start, end = FMT.int2_span(LENS[0] + CHUNKS[0])
    assert (start <= position < end) == (where == "int2")
    clean, batch, _, _ = filled_pool()
    bad, _, bad_flag, slot = filled_pool(position, tensors, value)
    assert bad_flag.item() == 1
    q, k, v, qo_indptr = new_tokens(CHUNKS, KV_HEADS, GQA, FMT.head_dim, torch.bfloat16,
                                    torch.Generator().manual_seed(2))
    args = (q, k, v, qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts)
    got_clean, _ = run_extend(clean, *args)
    got, expected = run_extend(bad, *args)
    assert torch.isfinite(got).all()
    first = CHUNKS[0]
    assert torch.equal(got[first:], got_clean[first:]), "another request's output changed"
    other_heads = [h for h in range(KV_HEADS * GQA) if h // GQA != BAD_HEAD]
    assert torch.equal(got[:first, other_heads], got_clean[:first, other_heads]), "another KV head's output changed"
    assert_matches(got, expected, torch.bfloat16)


@pytest.mark.parametrize("tensors, value", [("k", NAN), ("v", INF), ("kv", -INF)])
def test_extend_isolates_non_finite_chunk_row(tensors, value):
    """A non-finite row of the chunk being prefilled counts as zeros for the chunk's later
    tokens too (as the pool stores it), so their outputs stay finite and match the reference."""
    _, batch, _, _ = filled_pool()
    pool, _, _, _ = filled_pool()
    q, k, v, qo_indptr = new_tokens(CHUNKS, KV_HEADS, GQA, FMT.head_dim, torch.bfloat16,
                                    torch.Generator().manual_seed(3))
    args = (qo_indptr, batch.kv_indptr, batch.kv_indices, batch.window_starts)
    got_clean, _ = run_extend(pool, q, k, v, *args)
    bad_token = 1  # request 0's second chunk token: tokens 2..4 attend to it
    for name, x in (("k", k), ("v", v)):
        if name in tensors:
            x[bad_token, BAD_HEAD, 3] = value
    got, expected = run_extend(pool, q, k, v, *args)
    assert torch.isfinite(got).all()
    assert torch.equal(got[CHUNKS[0]:], got_clean[CHUNKS[0]:]), "another request's output changed"
    other_heads = [h for h in range(KV_HEADS * GQA) if h // GQA != BAD_HEAD]
    assert torch.equal(got[:, other_heads], got_clean[:, other_heads]), "another KV head's output changed"
    assert_matches(got, expected, torch.bfloat16)


@pytest.mark.parametrize("case", ["clean", "nan_k", "inf_v", "overflow", "masked_tail"])
def test_write_kernel_flag(case):
    """The flag is set exactly when some row of the launch is non-finite after rotation, the
    reference's `finite_rows` being the judge; masked-off tail tokens never set it."""
    gen = torch.Generator().manual_seed(3)
    tokens = 7 if case == "masked_tail" else 9  # 7: the last program of 4 tokens has a masked tail
    k, v = (torch.randn(tokens, KV_HEADS, 64, generator=gen).bfloat16() for _ in "kv")
    if case == "nan_k":
        k[4, 1, 10] = NAN
    elif case == "inf_v":
        v[8, 0, 0] = INF
    elif case == "overflow":  # finite bf16 input whose rotation overflows float32
        v[3, 1] = 3e38
    rot = torch.linalg.qr(torch.randn(1, 64, 64, generator=gen, dtype=torch.float64))[0].float()
    fmt = OscarFormat(64, 32)
    flags = torch.zeros(3, dtype=torch.int32)
    write_kv_int2(k, v, torch.arange(tokens), zero_cache(fmt, tokens, rot, 0.96, 0.92), nonfinite_flag=flags[1:2])
    any_bad = not all(ref.finite_rows(ref.rotate(x, rot)).all() for x in (k, v))
    assert any_bad == (case in ("nan_k", "inf_v", "overflow"))
    assert flags.tolist() == [0, int(any_bad), 0]


def test_write_kernel_flag_is_sticky():
    """A clean launch after a bad one leaves the flag set (the reporter reads it later)."""
    fmt = OscarFormat(64)
    flag = torch.zeros(1, dtype=torch.int32)
    rot = torch.eye(64)[None]
    for value in (NAN, 1.0):
        x = torch.ones(2, KV_HEADS, 64).bfloat16()
        x[0, 0, 0] = value
        write_kv_int2(x, x, torch.arange(2), zero_cache(fmt, 2, rot, 1.0, 1.0), nonfinite_flag=flag)
        assert flag.item() == 1


def zero_cache(fmt: OscarFormat, slots: int, rot: torch.Tensor, k_clip: float, v_clip: float) -> LayerCache:
    """A zeroed layer of KV_HEADS heads and `slots` slots (and window rows), one rotation for K and V."""
    def codes(kind):
        return torch.zeros(fmt.codes_shape(slots, KV_HEADS, kind), dtype=torch.uint8)

    def meta():
        return torch.zeros(fmt.meta_shape(slots, KV_HEADS), dtype=torch.float16)

    def window():
        return torch.zeros(slots, KV_HEADS, fmt.head_dim, dtype=torch.bfloat16)

    return LayerCache(fmt, codes("k"), meta(), codes("v"), meta(), window(), window(), rot, rot, k_clip, v_clip)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "oscar_sglang.nonfinite"]


def test_reporter_warns_once_per_layer(caplog):
    caplog.set_level(logging.WARNING, logger="oscar_sglang.nonfinite")
    reporter = NonFiniteReporter(num_layers=4, start_layer=10, device="cpu")
    reporter.check()
    assert warnings_of(caplog) == []  # clean: nothing
    reporter.flag(12).fill_(1)
    reporter.check()
    reporter.flag(12).fill_(1)  # the same layer again, in a later step
    reporter.check()
    assert warnings_of(caplog) == [
        "OSCAR: layer 12 produced non-finite K/V values; they are stored as zeros (the model's "
        "activations overflowed)"]
    reporter.flag(10).fill_(1)
    reporter.flag(13).fill_(1)
    reporter.check()
    reporter.check()
    assert [m.split(" produced")[0] for m in warnings_of(caplog)] == [
        "OSCAR: layer 12", "OSCAR: layer 10", "OSCAR: layer 13"]


def test_reporter_flag_is_a_view_of_its_layer():
    reporter = NonFiniteReporter(num_layers=3, start_layer=0, device="cpu")
    assert reporter.flag(1).shape == (1,) and reporter.flag(1).dtype == torch.int32
    assert reporter.flag(1).data_ptr() == reporter.flags[1:].data_ptr()
    assert reporter.flag(1) is reporter.flag(1)  # the same object every step (CUDA-graph pointers)


def test_reporter_with_write_kernel(caplog):
    """Two layers write; the one with an Inf row is reported, once, the clean one not."""
    caplog.set_level(logging.WARNING, logger="oscar_sglang.nonfinite")
    reporter = NonFiniteReporter(num_layers=2, start_layer=0, device="cpu")
    fmt = OscarFormat(64)
    rot = torch.eye(64)[None]
    for step in range(2):
        for layer in range(2):
            x = torch.randn(3, KV_HEADS, 64).bfloat16()
            if layer == 1:
                x[1, 0, 7] = INF
            write_kv_int2(x, x, torch.arange(3), zero_cache(fmt, 3, rot, 0.96, 0.92), nonfinite_flag=reporter.flag(layer))
        reporter.check()
    assert len(warnings_of(caplog)) == 1 and warnings_of(caplog)[0].startswith("OSCAR: layer 1 produced")


@pytest.mark.gpu
def test_reporter_cuda_never_blocks(caplog):
    """On CUDA the report comes from an earlier call's asynchronous copy."""
    caplog.set_level(logging.WARNING, logger="oscar_sglang.nonfinite")
    reporter = NonFiniteReporter(num_layers=2, start_layer=0, device="cuda")
    reporter.flag(1).fill_(1)
    reporter.check()  # starts the copy
    torch.cuda.synchronize()
    reporter.check()  # reads it
    assert len(warnings_of(caplog)) == 1 and warnings_of(caplog)[0].startswith("OSCAR: layer 1 produced")


def test_backend_passes_flags_and_checks_on_graph_replay(caplog, monkeypatch):
    """OscarAttnBackend wiring without a model runner: its KV write flags the layer's element,
    and the CUDA-graph replay preparation (init_forward_metadata_out_graph, which replaces
    init_forward_metadata there) checks the flags, but not while a graph is being captured."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    from oscar_sglang.backend import OscarAttnBackend
    from oscar_sglang.kernels.rotation_file import data_free_rotations
    from oscar_sglang.pool import OscarTokenToKVPool

    caplog.set_level(logging.WARNING, logger="oscar_sglang.nonfinite")
    monkeypatch.setattr(TritonAttnBackend, "init_forward_metadata_out_graph", lambda self, fb, in_capture=False: None)
    backend = OscarAttnBackend.__new__(OscarAttnBackend)
    backend.pool = OscarTokenToKVPool(4, 1, KV_HEADS, FMT.head_dim, 2, "cpu", False, fmt=FMT,
                                      rotations=data_free_rotations(8, KV_HEADS, FMT.head_dim),
                                      start_layer=6, end_layer=8)
    backend.pool.allocate_windows(1)
    backend.fmt = FMT
    backend.nonfinite = NonFiniteReporter(num_layers=2, start_layer=6, device="cpu")
    k = torch.randn(2, KV_HEADS, FMT.head_dim).bfloat16()
    k[1, 0, 3] = NAN
    backend._save_kv(SimpleNamespace(layer_id=7), SimpleNamespace(out_cache_loc=torch.tensor([3, 0])), k, k.abs(),
                     torch.tensor([-1, -1]))
    assert (backend.pool.k_scale_buffer[1][0, 0] == 0).all()  # layer 7, slot 0, KV head 0: stored as zeros
    assert backend.nonfinite.flags.tolist() == [0, 1]
    backend.init_forward_metadata_out_graph(None, in_capture=True)
    assert warnings_of(caplog) == []
    backend.init_forward_metadata_out_graph(None)
    assert len(warnings_of(caplog)) == 1 and warnings_of(caplog)[0].startswith("OSCAR: layer 7 produced")
