"""OscarAttnBackend's forward paths on the CPU (Triton interpreter): the glue between SGLang's
per-layer call and the kernels (head reshapes, window rows of new tokens, the write, the
attention call), prefill then decode of two requests, against the same backend routed through
the PyTorch reference (SGLANG_OSCAR_REFERENCE_ATTENTION). The backend object skips
TritonAttnBackend.__init__, which needs a model runner; forward metadata is set as SGLang's
Triton backend computes it for these batches."""

from types import SimpleNamespace

import torch
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.rotation_file import data_free_rotations

from oscar_sglang.backend import OscarAttnBackend
from oscar_sglang.extend_groups import FlashInferPlans
from oscar_sglang.forward_plan import plan_extend
from oscar_sglang.nonfinite import NonFiniteReporter
from oscar_sglang.pool import OscarTokenToKVPool
from kernel_cases import assert_codes_match, assert_matches

FMT = OscarFormat(64, 32, sink_tokens=4, recent_tokens=8)
LAYERS, KV_HEADS, GQA = 2, 2, 2
LENS = [13, 20]  # prompt lengths of the two requests (request pool indices 1 and 2)


def make_backend(pool: OscarTokenToKVPool, use_reference: bool) -> OscarAttnBackend:
    backend = OscarAttnBackend.__new__(OscarAttnBackend)
    backend.pool, backend.fmt = pool, pool.fmt
    backend.use_reference, backend.enable_deterministic = use_reference, False
    backend.nonfinite = NonFiniteReporter(LAYERS, 0, "cpu")
    backend.forward_plan = None
    backend.flashinfer_plans = FlashInferPlans(False, "cpu")  # FlashInfer needs CUDA
    return backend


def layer(layer_id: int):
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=KV_HEADS * GQA, tp_k_head_num=KV_HEADS,
                           tp_v_head_num=KV_HEADS, head_dim=FMT.head_dim, scaling=FMT.head_dim ** -0.5,
                           logit_cap=0.0, is_cross_attention=False)


def indptr(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def run_layers(backend, forward, batch, tokens, gen):
    """Every layer's output for random q, k, v of `tokens` new tokens, and that k ([layer]
    [tokens, H_kv, D])."""
    outs, keys = [], []
    for i in range(LAYERS):
        q = torch.randn(tokens, KV_HEADS * GQA * FMT.head_dim, generator=gen).bfloat16()
        k = torch.randn(tokens, KV_HEADS * FMT.head_dim, generator=gen).bfloat16()
        v = torch.randn(tokens, KV_HEADS * FMT.head_dim, generator=gen).bfloat16()
        outs.append(getattr(backend, forward)(q, k, v, layer(i), batch))
        keys.append(k.view(tokens, KV_HEADS, FMT.head_dim))
    return outs, keys


def assert_pool_holds(pool, keys, slots, req_idx):
    """The INT2 codes of every position and the BF16 window rows of the sinks and the last W
    positions are what the format says for one request's keys ([layer][L, H_kv, D])."""
    length = slots.shape[0]
    for i in range(LAYERS):
        lay = pool.layer(i)
        codes, meta, window = ref.encode_kv(keys[i], lay.k_rot, lay.k_clip, FMT)
        # the kernel's fp32 rotation may differ from the reference's by an ulp: values then
        # round one fp16 / bf16 step apart, and codes only at rounding ties
        torch.testing.assert_close(lay.k_meta[slots], meta, rtol=2e-3, atol=1e-4)
        clipped = ref.clip_rows(ref.rotate(keys[i], lay.k_rot), lay.k_clip)
        assert_codes_match(lay.k_codes[slots], codes, clipped, lay.k_meta[slots], FMT.group_size)
        start = req_idx * FMT.window_rows_per_request
        for p in [*range(FMT.sink_tokens), *range(length - FMT.recent_tokens, length)]:
            torch.testing.assert_close(lay.k_window[FMT.window_row(start, p)].float(), window[p].float(),
                                       rtol=1e-2, atol=1e-2, msg=f"layer {i}, position {p}")


def prefill_two_requests(reference: bool, requests: int, decode_slots: int, seed: int):
    """A backend (reference path or kernels) over a fresh pool with window rows for `requests`
    requests, after the prefill of requests 1 and 2 (LENS tokens). Returns the pool, the backend,
    the prompts' slots, `decode_slots` more free slots, the random generator and the prefill's
    (outputs, keys) as run_layers gives them."""
    pool = OscarTokenToKVPool(64, 1, KV_HEADS, FMT.head_dim, LAYERS, "cpu", False, fmt=FMT,
                              rotations=data_free_rotations(LAYERS, KV_HEADS, FMT.head_dim),
                              sink_rows_per_request=0)
    pool.allocate_windows(requests)
    backend = make_backend(pool, reference)
    slots = torch.randperm(63, generator=torch.Generator().manual_seed(0))[:sum(LENS) + decode_slots] + 1
    prompt_slots = slots[:sum(LENS)]
    gen = torch.Generator().manual_seed(seed)
    backend.forward_metadata = SimpleNamespace(qo_indptr=indptr(LENS), kv_indptr=indptr([0, 0]),
                                               kv_indices=torch.empty(0, dtype=torch.int64))
    prefill = SimpleNamespace(
        req_pool_indices=torch.tensor([1, 2]), positions=torch.cat([torch.arange(n) for n in LENS]),
        seq_lens=torch.tensor(LENS), out_cache_loc=prompt_slots, extend_seq_lens=torch.tensor(LENS),
        extend_prefix_lens_cpu=[0, 0], extend_seq_lens_cpu=LENS)
    backend.forward_plan = plan_extend(pool, prefill, [1, 2])  # as init_forward_metadata plans it
    prefilled = run_layers(backend, "forward_extend", prefill, sum(LENS), gen)
    return pool, backend, prompt_slots, slots[sum(LENS):], gen, prefilled


def test_prefill_then_decode_matches_reference_path():
    results = {}
    for reference in (False, True):
        pool, backend, prompt_slots, decode_slots, gen, (prefill_out, prefill_keys) = prefill_two_requests(
            reference, requests=3, decode_slots=2, seed=1)
        req = torch.tensor([1, 2])
        parts = prompt_slots.split(LENS)
        seen = [torch.cat([part, decode_slots[b:b + 1]]) for b, part in enumerate(parts)]
        backend.forward_metadata = SimpleNamespace(kv_indptr=indptr([n + 1 for n in LENS]),
                                                   kv_indices=torch.cat(seen))
        decode = SimpleNamespace(req_pool_indices=req, positions=torch.tensor(LENS),
                                 seq_lens=torch.tensor(LENS) + 1, out_cache_loc=decode_slots)
        decode_out, decode_keys = run_layers(backend, "forward_decode", decode, len(LENS), gen)
        results[reference] = (prefill_out, decode_out)
        for b, idx in enumerate(req.tolist()):
            keys = [torch.cat([pk.split(LENS)[b], dk[b:b + 1]]) for pk, dk in zip(prefill_keys, decode_keys)]
            assert_pool_holds(pool, keys, seen[b], idx)
    for got, expected in zip(sum(results[False], []), sum(results[True], [])):
        assert got.shape == expected.shape and got.dtype == torch.bfloat16
        assert torch.isfinite(got).all()
        assert_matches(got, expected.float(), torch.bfloat16)


def test_decode_of_requests_sharing_a_prefix_matches_reference_path():
    """Request 3 holds request 2's first 16 slots (a radix hit, its windows restored from INT2):
    the decode of requests 1-3 reads their common INT2 positions through a shared-prefix block
    and matches the reference path."""
    results = {}
    for reference in (False, True):
        pool, backend, prompt_slots, decode_slots, gen, _ = prefill_two_requests(
            reference, requests=4, decode_slots=3, seed=2)
        first, second = prompt_slots.split(LENS)
        pool.restore_windows([(3, second[:16])])
        seen = [first, second, second[:16]]
        seen = [torch.cat([part, decode_slots[b:b + 1]]) for b, part in enumerate(seen)]
        lengths = [n.shape[0] for n in seen]
        backend.forward_metadata = SimpleNamespace(kv_indptr=indptr(lengths), kv_indices=torch.cat(seen))
        decode = SimpleNamespace(req_pool_indices=torch.tensor([1, 2, 3]), positions=torch.tensor(lengths) - 1,
                                 seq_lens=torch.tensor(lengths), out_cache_loc=decode_slots)
        results[reference] = run_layers(backend, "forward_decode", decode, 3, gen)[0]
        if not reference:
            shared = backend.forward_plan.shared
            assert shared.block_end.max() > FMT.sink_tokens, "requests 2 and 3 must share positions"
    for got, expected in zip(results[False], results[True]):
        assert torch.isfinite(got).all()
        assert_matches(got, expected.float(), torch.bfloat16)


def test_start_up_compile_launch_leaves_the_pool_unchanged():
    """compile_extend_kernels launches both extend kernels over the real pool buffers with zero
    lengths: the pool after a prefill is unchanged, bit for bit."""
    pool, backend, *_ = prefill_two_requests(False, requests=3, decode_slots=0, seed=3)
    backend.num_head, backend.num_kv_head = KV_HEADS * GQA, KV_HEADS
    backend.qo_indptr = torch.zeros(4, dtype=torch.int64)
    backend.kv_indptr = torch.zeros(4, dtype=torch.int32)
    def buffers(lay):
        return lay.k_codes, lay.k_meta, lay.v_codes, lay.v_meta, lay.k_window, lay.v_window

    before = [t.clone() for i in range(LAYERS) for t in buffers(pool.layer(i))]
    backend.compile_extend_kernels(torch.bfloat16)
    after = [t for i in range(LAYERS) for t in buffers(pool.layer(i))]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_mixed_batch_gives_a_decoding_request_its_decode_output():
    """SGLang's --enable-mixed-chunk runs decoding requests inside a prefill batch: forward_extend
    with one new token over the request's whole cached sequence. Request 1's token there gets
    the output the decode path gives the same q, k, v (both read the sinks and recent positions
    from the BF16 window rows), request 2's chunk next to it matches the reference path, and the
    pool holds both requests' positions as the format says."""
    chunk = 5
    mixed, decoded = {}, []
    for reference in (False, True):
        pool, backend, prompt_slots, new_slots, _, (_, prefill_keys) = prefill_two_requests(
            reference, requests=3, decode_slots=1 + chunk, seed=4)
        first, second = prompt_slots.split(LENS)
        gen = torch.Generator().manual_seed(5)
        qkv = [[torch.randn(1 + chunk, heads * FMT.head_dim, generator=gen).bfloat16()
                for heads in (KV_HEADS * GQA, KV_HEADS, KV_HEADS)] for _ in range(LAYERS)]
        backend.forward_metadata = SimpleNamespace(qo_indptr=indptr([1, chunk]), kv_indptr=indptr(LENS),
                                                   kv_indices=torch.cat([first, second]))
        batch = SimpleNamespace(
            req_pool_indices=torch.tensor([1, 2]), positions=torch.cat([torch.tensor(LENS[:1]),
                                                                         torch.arange(LENS[1], LENS[1] + chunk)]),
            seq_lens=torch.tensor([LENS[0] + 1, LENS[1] + chunk]), out_cache_loc=new_slots,
            extend_seq_lens=torch.tensor([1, chunk]), extend_prefix_lens_cpu=LENS, extend_seq_lens_cpu=[1, chunk])
        backend.forward_plan = plan_extend(pool, batch, [1, 2])
        mixed[reference] = [backend.forward_extend(q, k, v, layer(i), batch) for i, (q, k, v) in enumerate(qkv)]
        for b, (slots, idx) in enumerate(((torch.cat([first, new_slots[:1]]), 1),
                                          (torch.cat([second, new_slots[1:]]), 2))):
            new = slice(0, 1) if b == 0 else slice(1, 1 + chunk)
            keys = [torch.cat([pk.split(LENS)[b], k[new].view(-1, KV_HEADS, FMT.head_dim)])
                    for pk, (_, k, _) in zip(prefill_keys, qkv)]
            assert_pool_holds(pool, keys, slots, idx)
        if not reference:  # the same token of request 1 through the decode path, on a fresh pool
            pool, backend, *_ = prefill_two_requests(False, requests=3, decode_slots=1 + chunk, seed=4)
            backend.forward_metadata = SimpleNamespace(kv_indptr=indptr([LENS[0] + 1]),
                                                       kv_indices=torch.cat([first, new_slots[:1]]))
            decode = SimpleNamespace(req_pool_indices=torch.tensor([1]), positions=torch.tensor(LENS[:1]),
                                     seq_lens=torch.tensor([LENS[0] + 1]), out_cache_loc=new_slots[:1])
            decoded = [backend.forward_decode(q[:1], k[:1], v[:1], layer(i), decode) for i, (q, k, v) in enumerate(qkv)]
    for got, expected, single in zip(mixed[False], mixed[True], decoded):
        assert torch.isfinite(got).all()
        assert_matches(got, expected.float(), torch.bfloat16)
        assert_matches(got[:1], single.float(), torch.bfloat16)
