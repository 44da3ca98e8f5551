"""int2_split.cu itself on the CPU (tests/emulated_int2_split.py): whole decode steps whose split
programs run in the CUDA kernel's text, built by g++ with the warp collectives and PTX helpers
emulated, the rest in the Triton interpreter, against the PyTorch reference; partials and output
poisoned; asynchronous copies landing as early and as late as a correct kernel allows. The same
kernel on a GPU: tests/gpu/test_kernels_gpu.py."""

import functools
from dataclasses import replace

import pytest
import torch
from oscar_sglang.kernels import int2_split
from oscar_sglang.kernels import reference as ref
from oscar_sglang.kernels.decode import DECODE_LAUNCH, decode_step
from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.shared_prefix import find_shared_prefixes

import emulated_int2_split
from kernel_cases import Batch, assert_matches, fill_requests, make_cache, store_tokens, window_positions

CUDA_SPLIT = DECODE_LAUNCH.with_split_kernel("cuda")
# the rest of each step runs its Triton kernels on CPU tensors, in the interpreter, which Triton
# picks when a kernel is defined (conftest.py: wherever CUDA is absent)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU only (Triton interpreter); on a GPU tests/gpu runs this kernel")


def emulate(monkeypatch, copies: str = "at_wait", edit=None) -> None:
    """Decode steps on the CPU run int2_split.cu in the emulator wherever it serves the group on
    a GPU."""
    monkeypatch.setattr(int2_split, "serves", lambda gqa, device: gqa <= int2_split.MAX_GQA)
    monkeypatch.setattr(int2_split, "launch", functools.partial(emulated_int2_split.launch, copies=copies, edit=edit))


def poisoned_run(step):
    for scratch in (step.part_o, step.part_lse, step.out):  # a part nobody wrote reads as NaN
        scratch.fill_(float("nan"))
    return step.run()


def requests(fmt: OscarFormat, lens: list[int], kv_heads: int, gqa: int, index_dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(fmt, kv_heads, sum(lens) + 8, len(lens) + 1, True, gen)
    batch = fill_requests(cache, lens, torch.bfloat16, index_dtype, gen)
    q = torch.randn(len(lens), kv_heads * gqa, fmt.head_dim, generator=gen).to(torch.bfloat16)
    return q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, fmt.head_dim ** -0.5


@pytest.mark.parametrize(
    "head_dim, group_size, kv_heads, gqa, sinks, recent, index_dtype, key_bits",
    [
        (64, 32, 2, 1, 4, 8, torch.int64, 2),
        (64, 64, 2, 3, 64, 128, torch.int32, 2),
        (128, 32, 2, 8, 16, 32, torch.int64, 2),
        (128, 64, 3, 4, 64, 128, torch.int32, 2),
        (64, 64, 3, 3, 64, 128, torch.int32, 4),
        (128, 128, 2, 4, 16, 32, torch.int32, 4),
        (64, 32, 2, 7, 64, 128, torch.int64, 3),
        (128, 64, 2, 4, 64, 128, torch.int32, 3),
    ],
)
@pytest.mark.parametrize("copies", ["at_wait", "at_issue"])
def test_cuda_split_programs_match_reference(monkeypatch, head_dim, group_size, kv_heads, gqa, sinks, recent,
                                             index_dtype, key_bits, copies):
    """Requests shorter than the window, one past it, odd lengths, one across many tiles; split
    counts from one to more than the tiles of a program."""
    emulate(monkeypatch, copies)
    fmt = OscarFormat(head_dim, group_size, sink_tokens=sinks, recent_tokens=recent, key_bits=key_bits)
    args = requests(fmt, [1, sinks + recent, sinks + recent + 1, 1500, 17], kv_heads, gqa, index_dtype,
                    seed=head_dim + gqa)
    expected = ref.decode_attention(*args)
    for splits in (None, 1, 7):
        step = decode_step(*args, num_kv_splits=splits, launch=CUDA_SPLIT)
        assert step.split_kernels == "cuda"
        assert_matches(poisoned_run(step), expected, torch.bfloat16)


@pytest.mark.parametrize("stages, key_chains, group_size, window_rows",
                         [(2, 1, 128, 64), (5, 2, 128, 32), (3, 4, 64, 192)])
def test_cuda_split_programs_at_other_launch_parameters(monkeypatch, stages, key_chains, group_size, window_rows):
    """Other launch parameters: DecodeLaunch.cuda_stages and .cuda_key_chains (tune_decode sweeps
    them) and .window_rows_per_program."""
    emulate(monkeypatch)
    args = requests(OscarFormat(128, group_size), [2000, 300], 2, 4, torch.int32, seed=stages)
    launch = replace(CUDA_SPLIT, cuda_stages=stages, cuda_key_chains=key_chains, window_rows_per_program=window_rows)
    step = decode_step(*args, num_kv_splits=3, launch=launch)
    assert_matches(poisoned_run(step), ref.decode_attention(*args), torch.bfloat16)


def test_cuda_and_triton_split_programs_by_request_beside_shared_blocks(monkeypatch):
    """Four requests on a shared prefix with own tails of 1 to 900 tokens and two of their own:
    the INT2 programs of a request in int2_split.cu (SHARED, from own_start) when they read at
    least 64 positions each, else in the Triton kernel, which runs the window programs too."""
    emulate(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    fmt = OscarFormat(128, key_bits=4)
    heads, prefix, own = 2, 2000, [1, 30, 300, 900, 1200, 1200]
    cache = make_cache(fmt, heads, prefix + sum(own), len(own), True, gen)
    perm = torch.randperm(cache.k_codes.shape[0], generator=gen)
    prefix_kv = [torch.randn(prefix, heads, 128, generator=gen).to(torch.bfloat16) for _ in "kv"]
    sequences = []
    for b, slots in enumerate(torch.split(perm[prefix:], own)):
        k, v = (torch.randn(own[b], heads, 128, generator=gen).to(torch.bfloat16) for _ in "kv")
        if b < 4:
            slots, k, v = torch.cat([perm[:prefix], slots]), torch.cat([prefix_kv[0], k]), torch.cat([prefix_kv[1], v])
        store_tokens(cache, k, v, slots, b * fmt.window_rows_per_request, list(range(len(slots))),
                     window_positions(fmt, len(slots)))
        sequences.append(slots)
    indptr = torch.tensor([0] + [len(x) for x in sequences]).cumsum(0)
    batch = Batch(indptr.to(torch.int32), torch.cat(sequences).to(torch.int32),
                  torch.arange(len(own), dtype=torch.int32) * fmt.window_rows_per_request)
    q = torch.randn(len(own), heads * 4, 128, generator=gen).to(torch.bfloat16)
    args = (q, batch.kv_indptr, batch.kv_indices, batch.window_starts, cache, 128 ** -0.5)
    shared = find_shared_prefixes(batch.kv_indptr, batch.kv_indices, fmt, group=4)
    step = decode_step(*args, shared=shared, num_kv_splits=4,
                       launch=replace(DECODE_LAUNCH, cuda_min_pairs=1, cuda_min_positions=64))
    assert step.split_kernels == "by_request"
    ends = [fmt.int2_span(n)[1] for n in batch.kv_indptr.diff().tolist()]
    cuda_takes = [end - int(start) >= step.cuda_min_span for end, start in zip(ends, shared.own_start)]
    assert cuda_takes == [False, False, True, True, True, True], cuda_takes
    assert_matches(poisoned_run(step), ref.decode_attention(*args), torch.bfloat16)


def test_the_emulator_refuses_a_warp_that_diverges_at_a_collective(monkeypatch):
    """A lane leaving its program early while the rest of its warp shuffles is an error, not a
    result."""
    emulate(monkeypatch, edit=lambda text: text.replace("if (span < min_span) return;",
                                                        "if (span < min_span || lane == 5) return;"))
    step = decode_step(*requests(OscarFormat(64), [700], 1, 2, torch.int32, seed=1), launch=CUDA_SPLIT)
    with pytest.raises(RuntimeError, match="thread 6: shfl while lane 5 of its warp has exited"):
        step.run()


@pytest.mark.parametrize("removed", ["cp_async_wait<STAGES - 2>();", "__syncwarp();"])
def test_the_emulator_sees_a_stage_read_before_its_copies_are_visible(monkeypatch, removed):
    """Without the tile loop's cp.async.wait_group, or the __syncwarp after it that shows the
    copies to the other lanes, copies landing as late as allowed leave the stages unwritten: the
    output reads NaN (landing when issued they would not, which is why both are run)."""
    emulate(monkeypatch, edit=lambda text: text.replace(removed, ""))
    step = decode_step(*requests(OscarFormat(64), [700], 1, 2, torch.int32, seed=1), launch=CUDA_SPLIT)
    assert poisoned_run(step).isnan().any()
