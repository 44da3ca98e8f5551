"""Which requests of a decode batch share their cached prefix, for `decode_attention_int2`.

Requests that hit one radix-cached prefix hold the same slots for its positions. Grouped, the
decode kernel reads and unpacks a shared INT2 tile once for several requests, their query heads
stacked in one tensor-core dot (M = members × GQA group), instead of once per request with M =
GQA group (4 of the dot's 16 rows for Qwen3-8B). Blocks hold 4 Qwen3-8B requests (16 rows), or
16 (64 rows) in batches of WIDE_BLOCKS_MIN_BATCH requests or more (not with 3-bit keys).

`find_shared_prefixes` runs on the device with static shapes and no host sync, so it can be
captured in a CUDA graph:
1. key of request b: the slot of its first INT2 position (S), or a unique negative key when it
   has no INT2 span;
2. requests sorted by key; each run of equal keys is cut into blocks of up to `members`
   consecutive requests (the first member of a block is its leader);
3. each request's common span with its leader: `_common_span_kernel` compares their slots from
   position S on, a tile at a time, and stops at the first difference or at the shorter INT2 end;
4. block end e = the smallest common end of its members; a block of one request gets e = S;
5. the blocks of two or more requests, which share positions, are moved first (in order), so
   the decode kernel's programs loop over those alone: launched for every possible block, as a
   static grid must be, most would find nothing to read.
Request b then reads INT2 positions [S, e) through its block and [e, end_b) alone (a request
of a one-request block: [start_b, end_b)).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .format import OscarFormat

# query rows a shared block aims at (the tensor-core dot's M). From WIDE_BLOCKS_MIN_BATCH requests
# on, blocks are 4x wider: each unpacked INT2 tile serves 64 rows (16 requests at GQA 4) through
# warpgroup MMAs, 19 % faster for 192 requests sharing 32K tokens on an H200, while smaller batches,
# whose blocks would stay part empty, were up to 24 % slower (RESULTS.md, "Wide blocks"). Not with
# 3-bit keys: their wide kernel made an illegal memory access on an H100 at 4 warps (narrow
# blocks, and wide ones at 8 warps, ran right; 8 warps cost 4-bit keys 2.1x the time)
SHARED_DOT_ROWS = 16
WIDE_SHARED_DOT_ROWS = 64
WIDE_BLOCKS_MIN_BATCH = 48
NARROW_ONLY_KEY_BITS = (3,)
COMMON_SPAN_BLOCK = 1024  # positions compared per step of `_common_span_kernel`


@dataclass
class SharedPrefixes:
    """Blocks of requests that share INT2 positions [S, block_end) (block i's row; the
    `sharing` blocks of two or more requests come first, blocks past the last one have no
    members). B = the batch size; every request is in exactly one block.

    members: [B, R] int32 request ids of each block, -1 where none (R = members per block);
    block_end: [B] int32 end of each block's shared positions (S when nothing is shared);
    own_start: [B] int32 first INT2 position request b reads alone;
    sharing: [1] int32 the number of blocks of two or more requests.
    """

    members: torch.Tensor
    block_end: torch.Tensor
    own_start: torch.Tensor
    sharing: torch.Tensor


def shared_dot_rows(batch: int, key_bits: int) -> int:
    """Query rows a block of a decode batch of `batch` requests aims at, for keys of `key_bits`."""
    wide = batch >= WIDE_BLOCKS_MIN_BATCH and key_bits not in NARROW_ONLY_KEY_BITS
    return WIDE_SHARED_DOT_ROWS if wide else SHARED_DOT_ROWS


def block_members(group: int, batch: int, key_bits: int, dot_rows: int | None = None) -> int:
    """Requests per block for a GQA group in a batch of `batch` requests: as many as fill
    `dot_rows` query rows (None: `shared_dot_rows(batch, key_bits)`)."""
    return max(1, (dot_rows or shared_dot_rows(batch, key_bits)) // group)


@triton.jit
def _common_span_kernel(kv_indptr_ptr, kv_indices_ptr, leader_ptr, end_ptr, out_ptr, S: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Program b: the first position p >= S at which request b's slot differs from its leader's,
    or the smaller of their INT2 ends -> out[b] (int32). A leader's span is its INT2 end, found
    without comparing (every request of a batch without shared prefixes leads its own block)."""
    b = tl.program_id(0)
    lead = tl.load(leader_ptr + b)
    hi = tl.minimum(tl.load(end_ptr + b), tl.load(end_ptr + lead))
    own = tl.load(kv_indptr_ptr + b).to(tl.int64)
    theirs = tl.load(kv_indptr_ptr + lead).to(tl.int64)
    common = tl.where(lead == b, hi, tl.minimum(S, hi))
    searching = common < hi
    while searching:
        pos = common + tl.arange(0, BLOCK)
        ok = pos < hi
        mine = tl.load(kv_indices_ptr + own + pos, mask=ok, other=0)
        lead_slot = tl.load(kv_indices_ptr + theirs + pos, mask=ok, other=0)
        step_end = tl.minimum(common + BLOCK, hi)
        first_diff = tl.min(tl.where(ok & (mine != lead_slot), pos, step_end), axis=0)
        searching = (first_diff == step_end) & (step_end < hi)
        common = first_diff
    tl.store(out_ptr + b, common.to(tl.int32))


def find_shared_prefixes(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, fmt: OscarFormat,
                         group: int, dot_rows: int | None = None) -> SharedPrefixes:
    """Blocks of a decode batch (see the module docstring). kv_indptr: [B + 1], kv_indices:
    [total] int32/int64 as for `decode_attention_int2` (request b's positions 0..L_b-1 at slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]]); group: query heads per KV head; dot_rows: the
    query rows a block aims at (None: the fastest measured, `shared_dot_rows`). Any block width
    gives the same attention output; it only changes how the work is shared."""
    batch = kv_indptr.shape[0] - 1
    device = kv_indptr.device
    members = block_members(group, batch, fmt.key_bits, dot_rows)
    sinks = fmt.sink_tokens
    index = torch.arange(batch, device=device)
    lengths = (kv_indptr[1:] - kv_indptr[:-1]).long()
    start = lengths.clamp(max=sinks)
    end = torch.maximum(start, lengths - fmt.recent_tokens)
    key = -1 - index  # unique: requests without INT2 positions share nothing
    if kv_indices.shape[0] > 0:
        first = (kv_indptr[:-1].long() + sinks).clamp(max=kv_indices.shape[0] - 1)
        key = torch.where(end > sinks, kv_indices[first].long(), key)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    new_run = torch.ones(batch, dtype=torch.bool, device=device)
    new_run[1:] = sorted_key[1:] != sorted_key[:-1]
    run_start = torch.cummax(torch.where(new_run, index, 0), dim=0).values
    place = (index - run_start) % members  # 0 at every run start: each run starts a block
    block_of_sorted = torch.cumsum(place == 0, dim=0) - 1
    block = torch.full((batch, members), -1, dtype=torch.int32, device=device)
    block[block_of_sorted, place] = order.to(torch.int32)
    block_of = torch.empty_like(block_of_sorted)
    block_of[order] = block_of_sorted
    leader = block[block_of, 0].contiguous()
    common = torch.empty(batch, dtype=torch.int32, device=device)
    if batch > 0:
        _common_span_kernel[(batch,)](kv_indptr, kv_indices, leader, end.to(torch.int32), common,
                                      S=sinks, BLOCK=COMMON_SPAN_BLOCK)
    shared_end = torch.full((batch,), sinks, dtype=torch.int32, device=device)
    shared_end = shared_end.scatter_reduce(0, block_of, common, "amin", include_self=False)
    grouped = (block >= 0).sum(dim=1) > 1
    block_end = torch.where(grouped, shared_end, sinks).to(torch.int32)
    own_start = torch.where(grouped[block_of], block_end[block_of].long(), start).to(torch.int32)
    first = torch.sort((~grouped).to(torch.uint8), stable=True).indices  # step 5
    return SharedPrefixes(block[first], block_end[first], own_start, grouped.sum().to(torch.int32).reshape(1))
