"""Slot soak: 10,000 simulated requests through SGLang's real TokenToKVPoolAllocator, RadixCache
and ReqToTokenPool over the OSCAR pool (CPU, CI, about a minute including SGLang's import).

The scheduler needs a server, so its slot-relevant steps are replayed in its order with the real
SGLang objects and functions (Req.init_next_round_input -> match_prefix, inc/dec_lock_ref,
ReqToTokenPool.alloc/free, alloc_token_slots / evict, cache_unfinished_req (chunked and not),
cache_finished_req with and without insert, evict_from_tree_cache + Req.reset_for_retract):
shared system prompts, partial hits, identical prompts prefilled concurrently (duplicate
slots freed by the insert), chunked prefill, memory pressure (allocation fails -> evict ->
retry), aborts of waiting / chunked / running requests, retractions, then a full drain.

Slot contents are tracked by a shadow tag per slot (token id and position of whoever wrote it):
every radix hit must hand back slots whose tags match the request's own tokens. A small random
sample of requests writes real K/V with write_kv_int2; their codes must survive untouched while
the slots are shared, and window restores (pool.restore_windows, as the backend calls it on
every radix hit) must equal the dequantized codes, except sinks whose slot has a sink-pool row,
which must equal that row (for real K/V: bit-exactly the BF16 sink that was written).

Sink pool: every extend gets sink-pool rows for its new positions < S through the backend's own
forward_plan.assign_sink_rows (the pool is small, so it often runs full and falls back); the plugin's
allocator hooks (applied by SGLang's load_plugins) release them when slots are freed. Every
audit checks that no sink row leaks (free + owned = all, each owned by one slot) and that no
sink row outlives its slot (its slot is held by the tree or a running request and holds a
position < S).
"""

import random
import time
from array import array
from collections import Counter, deque

import pytest
import torch
from sglang.srt.environ import envs
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocation import alloc_token_slots
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import evict_from_tree_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

from oscar_sglang.kernels.reference import decode_kv
from oscar_sglang.kernels.rotation_file import data_free_rotations
from oscar_sglang.pool import OscarTokenToKVPool
from oscar_sglang.sizing import sink_rows_per_request
from pool_cases import FMT, HEADS, HEAD_DIM, LAYERS, assign_sink_rows_of, check_sink_books, map_request_slots, radix_nodes, write_random_kv

SEED = 1234
NUM_REQUESTS = 10_000
CAPACITY = 1024  # token slots: a handful of long requests fill it
MAX_RUNNING = 24  # ReqToTokenPool rows
MAX_CONTEXT = 512
CHUNK = 64  # chunked-prefill size
CHECK_EVERY = 100  # steps between full audits
REAL_KV_WRITES = 8  # write_kv_int2 calls (Triton interpreter: slow, so few)
SYSTEM_PROMPTS = [[(p + 1) * 1000 + i for i in range(n)] for p, n in enumerate((48, 96, 160, 224))]
POS = 4096  # tag = token * POS + position + 1; 0 = never written
# a quarter of the served ratio (sizing.sink_rows_per_request: S rows per request), so that the
# sink pool runs full here and the fallback path is soaked too
SINK_ROWS_PER_REQUEST = sink_rows_per_request(FMT) // 4

pytestmark = pytest.mark.usefixtures("oscar_allocator_hooks")


class Soak:
    def __init__(self):
        self.rng = random.Random(SEED)
        self.gen = torch.Generator().manual_seed(SEED)
        self.pool = OscarTokenToKVPool(CAPACITY, 1, HEADS, HEAD_DIM, LAYERS, "cpu", False, fmt=FMT,
                                       rotations=data_free_rotations(LAYERS, HEADS, HEAD_DIM),
                                       sink_rows_per_request=SINK_ROWS_PER_REQUEST)
        self.allocator = TokenToKVPoolAllocator(CAPACITY, torch.uint8, "cpu", self.pool, need_sort=False)
        self.rtp = ReqToTokenPool(MAX_RUNNING, MAX_CONTEXT, "cpu", False)
        self.pool.allocate_windows(self.rtp.size)
        self.cache = RadixCache(CacheInitParams(
            disable=False, req_to_token_pool=self.rtp, token_to_kv_pool_allocator=self.allocator,
            page_size=1))
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.spawned = self.done = 0
        self.recent_prompts: list[list[int]] = []
        self.events = Counter()
        self.tag = torch.zeros(CAPACITY + 1, dtype=torch.int64)
        self.real = torch.full((CAPACITY + 1,), -1, dtype=torch.int64)
        self.snap = [[b.clone() for b in bufs] for bufs in self.buffers()]
        self.sampled: set[str] = set()
        self.sample_rng = random.Random(SEED + 1)  # leaves the workload's random stream alone
        self.real_writes = 0
        # the exact BF16 sink a real write left in a slot's window row: [slot, K/V, layer, H, D],
        # valid while exact_tag[slot] == tag[slot]
        self.exact_sink = torch.zeros(CAPACITY + 1, 2, LAYERS, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        self.exact_tag = torch.zeros(CAPACITY + 1, dtype=torch.int64)

    def buffers(self):
        p = self.pool
        return p.k_buffer, p.k_scale_buffer, p.v_buffer, p.v_scale_buffer

    # ---- workload ----------------------------------------------------------------------------

    def spawn(self):
        rng = self.rng
        roll = rng.random()
        if roll < 0.12 and self.recent_prompts:  # an exact repeat: full hit or concurrent duplicate
            ids = list(rng.choice(self.recent_prompts))
        else:
            system = rng.choice(SYSTEM_PROMPTS) if roll < 0.85 else []
            if system and rng.random() < 0.3:  # cut inside a cached prompt: partial hits, splits
                system = system[:rng.randint(1, len(system))]
            ids = system + [50_000 + rng.randrange(6) for _ in range(rng.randint(1, 80))]
            self.recent_prompts = (self.recent_prompts + [ids])[-16:]
        req = Req(f"r{self.spawned}", "", array("q", ids), SamplingParams(max_new_tokens=rng.randint(1, 14)))
        if self.real_writes < REAL_KV_WRITES and rng.random() < 0.002:
            self.sampled.add(req.rid)
        self.spawned += 1
        self.waiting.append(req)

    # ---- slots -------------------------------------------------------------------------------

    def row(self, req: Req) -> torch.Tensor:
        return self.rtp.req_to_token[req.req_pool_idx]

    def headroom(self) -> int:
        return self.allocator.available_size() + self.cache.evictable_size()

    def alloc_or_evict(self, n: int) -> torch.Tensor:
        out = self.allocator.alloc(n)
        if out is None:
            self.events["alloc_failed_then_evicted"] += 1
            result = self.cache.evict(EvictParams(num_tokens=n - self.allocator.available_size()))
            self.events["evicted_tokens"] += result.num_tokens_evicted
            out = self.allocator.alloc(n)
        assert out is not None, f"{n} slots not available after eviction"
        return out

    def extend(self, req: Req):
        """alloc_for_extend for one request with its extend_range set; tags the new slots."""
        prefix, end = req.extend_range
        assert len(req.prefix_indices) == prefix
        self.rtp.alloc([req])
        new = self.alloc_or_evict(end - prefix)
        map_request_slots(self.rtp, req, prefix, end, new)
        fill = req.full_untruncated_fill_ids
        # the backend's extend metadata: sink-pool rows for new positions < S, while rows last
        sink_copy = assign_sink_rows_of(self.pool, req.req_pool_idx, prefix, new)
        wanted = max(0, min(FMT.sink_tokens, end) - prefix)
        got = 0 if sink_copy is None else sink_copy[1].numel()
        if got and self.sample_rng.random() < 0.02:  # some of them with real K/V too
            self.sampled.add(req.rid)
        self.events["sink_rows_assigned"] += got
        self.events["sink_pool_short"] += got < wanted
        self.write(req, new, torch.tensor(fill[prefix:end]), torch.arange(prefix, end), sink_copy)

    def write(self, req: Req, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
              sink_copy=None, decode: bool = False):
        assert (slots > 0).all(), "the padding slot was handed out"
        self.tag[slots] = tokens * POS + positions + 1
        self.exact_tag[slots] = 0  # a rewrite with the same token and position has another sink
        if req.rid not in self.sampled or self.real_writes >= REAL_KV_WRITES or decode:
            if sink_copy is not None:  # forward_extend after the (here skipped) write kernel
                for layer in range(LAYERS):
                    self.pool.save_sinks(layer, *sink_copy)
            return
        self.real_writes += 1
        n = slots.numel()
        rows = self.pool.window_rows_for(torch.full((n,), req.req_pool_idx), positions,
                                         torch.full((n,), int(positions[-1]) + 1))
        write_random_kv(self.pool, slots, rows, sink_copy, self.gen)
        sinks = positions < FMT.sink_tokens
        for kv, windows in enumerate((self.pool.k_window, self.pool.v_window)):
            for layer in range(LAYERS):
                self.exact_sink[slots[sinks], kv, layer] = windows[layer][rows[sinks]]
        self.exact_tag[slots[sinks]] = self.tag[slots[sinks]]
        self.real[slots] = self.tag[slots]
        for snaps, bufs in zip(self.snap, self.buffers()):
            for snap, buf in zip(snaps, bufs):
                snap[slots] = buf[slots]

    def check_hit(self, req: Req):
        """A radix hit must hand back slots holding this request's tokens; slots with real K/V
        must hold the codes written then; the backend's window restore must match them."""
        prefix = req.prefix_indices
        n = prefix.numel()
        if n == 0:
            return
        self.events["hits"] += 1
        ids = torch.tensor(req.full_untruncated_fill_ids[:n])
        assert torch.equal(self.tag[prefix], ids * POS + torch.arange(n) + 1), "radix hit: wrong slots"
        live = prefix[self.real[prefix] == self.tag[prefix]]
        if live.numel():
            self.events["hits_on_real_kv"] += 1
            for snaps, bufs in zip(self.snap, self.buffers()):
                for snap, buf in zip(snaps, bufs):
                    assert torch.equal(buf[live], snap[live]), "shared slot's codes were overwritten"

    def restore(self, req: Req):
        """OscarAttnBackend._restore_windows_of_new_requests for a request with a radix hit."""
        n = len(req.prefix_indices)
        if n == 0:
            return
        slots = self.row(req)[:n]
        self.pool.restore_windows([(req.req_pool_idx, slots)])
        head = slots[:FMT.sink_tokens].long()
        real_sinks = bool((self.exact_tag[head] == self.tag[head]).any())
        if self.events["hits"] % 25 and req.rid not in self.sampled and not real_sinks:
            return
        self.events["restores_checked"] += 1
        start = req.req_pool_idx * FMT.window_rows_per_request
        sink_end, recent_start = FMT.int2_span(n)
        positions = [*range(sink_end), *range(recent_start, n)]
        rows = torch.tensor([FMT.window_row(start, p) for p in positions])
        src = slots[positions].long()
        sink_rows = self.pool.sinks.row_of_slot[src].long()
        exact = (torch.tensor(positions) < FMT.sink_tokens) & (sink_rows >= 0)
        self.events["exact_sink_restores"] += bool(exact.any())
        real = exact & (self.exact_tag[src] == self.tag[src])
        self.events["exact_sink_restores_on_real_kv"] += bool(real.any())
        for layer in range(LAYERS):
            lay = self.pool.layer(layer)
            for kv, (codes, meta, window, store) in enumerate((
                    (lay.k_codes, lay.k_meta, lay.k_window, self.pool.sinks.k[layer]),
                    (lay.v_codes, lay.v_meta, lay.v_window, self.pool.sinks.v[layer]))):
                want = decode_kv(codes[src], meta[src], FMT).to(torch.bfloat16)
                want[exact] = store[sink_rows[exact]]
                assert torch.equal(window[rows], want), "restored window rows != sink rows / codes"
                assert torch.equal(window[rows[real]], self.exact_sink[src[real], kv, layer]), (
                    "restored sink != the BF16 sink written into that slot")

    # ---- request endings ---------------------------------------------------------------------

    def release(self, req: Req, insert: bool):
        """release_kv_cache: cache_finished_req + free the request row."""
        self.cache.cache_finished_req(req, is_insert=insert, kv_len_to_handle=req.kv_committed_len)
        self.rtp.free(req)
        req.kv = None

    def finish(self, req: Req):
        self.release(req, insert=True)
        self.done += 1

    def abort(self):
        choices = ["waiting"] * bool(self.waiting) + ["running"] * bool(self.running) + \
                  ["chunked"] * (self.chunked is not None)
        if not choices:
            return
        kind = self.rng.choice(choices)
        self.events[f"abort_{kind}"] += 1
        if kind == "waiting":  # nothing allocated yet
            self.waiting.remove(self.rng.choice(self.waiting))
        elif kind == "running":
            req = self.running.pop(self.rng.randrange(len(self.running)))
            self.release(req, insert=False)
        else:  # Scheduler.process_pending_chunked_abort
            self.release(self.chunked, insert=False)
            self.chunked = None
        self.done += 1

    def retract(self, req: Req):
        """release_req of retract_decode: free without insert, evict, reset, re-queue first."""
        self.running.remove(req)
        self.release(req, insert=False)
        evict_from_tree_cache(self.cache, len(self.running) * envs.SGLANG_RETRACT_DECODE_STEPS.get())
        req.reset_for_retract()
        self.waiting.appendleft(req)
        self.events["retractions"] += 1

    # ---- one scheduler iteration ---------------------------------------------------------------

    def prefill_done(self, req: Req):
        """process_batch_result_prefill for a request whose prompt is now fully in KV."""
        req.output_ids.append(60_000 + self.rng.randrange(4))
        if len(req.output_ids) >= req.sampling_params.max_new_tokens:
            self.finish(req)
        else:
            before = self.allocator.available_size()
            self.cache.cache_unfinished_req(req)
            if self.allocator.available_size() > before:
                self.events["duplicate_slots_freed"] += 1
            self.running.append(req)

    def make_room(self, need: int):
        """Retract decode requests (fewest outputs, longest prompt first) until `need` fits."""
        while self.headroom() < need and self.running:
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
            self.retract(victim)

    def prefill(self):
        admitted = []
        if self.chunked is not None:
            req = self.chunked
            self.cache.cache_unfinished_req(req, chunked=True)  # stash_chunked_request
            prefix = len(req.prefix_indices)
            end = min(prefix + CHUNK, len(req.full_untruncated_fill_ids))
            req.set_extend_range(prefix, end)  # PrefillAdder.add_chunked_req
            self.make_room(end - prefix)
            self.extend(req)
            if end == len(req.full_untruncated_fill_ids):
                self.chunked = None
                admitted.append(req)
        for _ in range(self.rng.randint(0, 4)):
            if not self.waiting or self.rtp.available_size() == 0:
                break
            req = self.waiting.popleft()
            req.init_next_round_input(self.cache)
            self.check_hit(req)
            prefix, total = len(req.prefix_indices), len(req.full_untruncated_fill_ids)
            if 0 < prefix < total - 1:  # the rest of the prompt is prefilled
                self.events["partial_hits"] += 1
            elif prefix == total - 1:  # everything but the last token (match_prefix's limit)
                self.events["full_hits"] += 1
            chunk = total - prefix > CHUNK
            if chunk and self.chunked is not None:  # one chunked request at a time
                self.waiting.appendleft(req)
                break
            self.cache.inc_lock_ref(req.last_node)
            end = prefix + CHUNK if chunk else total
            if self.headroom() < end - prefix + len(self.running):
                self.cache.dec_lock_ref(req.last_node)
                self.waiting.appendleft(req)
                self.events["admission_deferred"] += 1
                break
            req.set_extend_range(prefix, end)
            self.extend(req)
            self.restore(req)
            if chunk:
                self.chunked = req
                self.events["chunked_requests"] += 1
            else:
                admitted.append(req)
        for req in admitted:
            self.prefill_done(req)

    def decode(self):
        if self.running and self.rng.random() < 0.01:
            self.events["forced_retractions"] += 1
            self.retract(self.rng.choice(self.running))
        self.make_room(len(self.running))
        if not self.running:
            return
        batch = list(self.running)
        slots = alloc_token_slots(self.cache, len(batch))  # alloc_for_decode, page_size 1
        for req, slot in zip(batch, slots):
            pos = req.kv_committed_len
            self.rtp.write((req.req_pool_idx, pos), slot)
            req.kv_committed_len += 1
            req.kv.kv_allocated_len += 1
            token = req.output_ids[-1]
            self.write(req, slot.view(1), torch.tensor([token]), torch.tensor([pos]), decode=True)
            req.output_ids.append(60_000 + self.rng.randrange(4))
            if len(req.output_ids) >= req.sampling_params.max_new_tokens:
                self.running.remove(req)
                self.finish(req)

    # ---- audit ---------------------------------------------------------------------------------

    def nodes(self):
        return radix_nodes(self.cache)

    def audit(self):
        live = self.running + ([self.chunked] if self.chunked is not None else [])
        free = torch.cat([self.allocator.free_pages, self.allocator.release_pages])
        assert free.numel() == free.unique().numel(), "a slot is on the free list twice"
        nodes = list(self.nodes())
        tree = torch.cat([n.value for n in nodes]) if nodes else torch.empty(0, dtype=torch.int64)
        assert tree.numel() == tree.unique().numel(), "two tree nodes share a slot"
        owned, expected_locks = [], Counter()
        for req in live:
            owned.append(self.row(req)[req.cache_protected_len:req.kv.kv_allocated_len].to(torch.int64))
            path, node = [], req.last_node
            while node is not self.cache.root_node:
                expected_locks[id(node)] += 1
                path.insert(0, node.value)
                node = node.parent
            path = torch.cat(path) if path else torch.empty(0, dtype=torch.int64)
            assert torch.equal(self.row(req)[:req.cache_protected_len].to(torch.int64), path)
        everything = torch.cat([free.to(torch.int64), tree.to(torch.int64), *owned])
        assert everything.numel() == CAPACITY, (
            f"free {free.numel()} + tree {tree.numel()} + running "
            f"{sum(o.numel() for o in owned)} != {CAPACITY}")
        assert torch.equal(everything.sort().values, torch.arange(1, CAPACITY + 1)), "slot leaked or doubled"
        assert self.cache.root_node.lock_ref == 1
        protected = 0
        for node in nodes:
            assert node.lock_ref == expected_locks[id(node)], "lock_ref out of step with requests"
            protected += len(node.key) if node.lock_ref else 0
            assert (node in self.cache.evictable_leaves) == (not node.children and node.lock_ref == 0)
        assert self.cache.protected_size() == protected
        assert self.cache.evictable_size() + protected == tree.numel()
        rows = self.rtp.free_slots + [r.req_pool_idx for r in live]
        assert sorted(rows) == list(range(1, self.rtp.size + 1)), "req-pool rows leaked"
        # sink pool: no row leaks, none outlives its slot, only sink positions own one
        owners = check_sink_books(self.pool, free.tolist())
        held = torch.cat([tree.to(torch.int64), *owned])
        assert torch.isin(owners, held).all(), "a sink row outlives its slot"
        assert (((self.tag[owners] - 1) % POS) < FMT.sink_tokens).all(), "a non-sink slot owns a sink row"
        self.events["sink_rows_in_use_max"] = max(self.events["sink_rows_in_use_max"], owners.numel())
        self.events["audits"] += 1

    def run(self):
        step = 0
        while self.spawned < NUM_REQUESTS or self.waiting or self.running or self.chunked:
            for _ in range(self.rng.randint(0, 6)):
                if self.spawned < NUM_REQUESTS and len(self.waiting) < 64:
                    self.spawn()
            if self.rng.random() < 0.03:
                self.abort()
            self.prefill()
            self.decode()
            step += 1
            if step % CHECK_EVERY == 0:
                self.audit()
            assert step < 20 * NUM_REQUESTS, "soak does not make progress"
        self.audit()
        return step


def test_slot_soak():
    started = time.monotonic()
    soak = Soak()
    steps = soak.run()
    assert soak.done == NUM_REQUESTS

    # drained: no request holds anything, every lock released
    assert all(node.lock_ref == 0 for node in soak.nodes())
    assert soak.cache.protected_size() == 0
    assert soak.rtp.available_size() == soak.rtp.size
    assert soak.allocator.available_size() + soak.cache.evictable_size() == CAPACITY
    soak.cache.evict(EvictParams(num_tokens=CAPACITY))
    assert soak.cache.total_size() == 0 and not list(soak.nodes())
    assert soak.allocator.available_size() == CAPACITY
    soak.audit()
    assert soak.pool.sinks.used_rows() == 0
    assert soak.pool.sinks.free_rows() == soak.pool.sinks.capacity

    ev = soak.events
    print(f"\nslot soak: {NUM_REQUESTS} requests, {steps} steps, "
          f"{time.monotonic() - started:.1f} s, {dict(ev)}, real KV writes {soak.real_writes}")
    # every path was taken, more than a token number of times
    for event, at_least in (("hits", 5000), ("partial_hits", 2000), ("full_hits", 200),
                            ("duplicate_slots_freed", 200), ("chunked_requests", 1000),
                            ("alloc_failed_then_evicted", 1000), ("admission_deferred", 200),
                            ("retractions", 150), ("abort_running", 20), ("abort_waiting", 20),
                            ("abort_chunked", 10), ("restores_checked", 100), ("audits", 50),
                            ("sink_rows_assigned", 5000), ("sink_pool_short", 100),
                            ("exact_sink_restores", 50), ("exact_sink_restores_on_real_kv", 3)):
        assert ev[event] >= at_least, f"soak exercised {event} only {ev[event]} times"
    assert soak.real_writes >= 3 and ev["hits_on_real_kv"] >= 1
    assert ev["sink_rows_in_use_max"] == soak.pool.sinks.capacity  # ran full
