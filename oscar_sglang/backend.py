"""OscarAttnBackend: SGLang's Triton attention backend with decode and extend running on the
packed OSCAR-2 pool.

Reused from TritonAttnBackend: forward metadata (kv_indptr / kv_indices over req_to_token,
qo_indptr, max_extend_len) and the CUDA-graph capture / replay machinery. Overridden: the KV
write (rotate + quantize + window copies) and both attention kernels. Extend batches (never
captured) also restore the window rows of requests with a radix hit and give the slots of new
sink positions rows of the pool's slot-keyed sink store, copied from the window rows after the
write kernel; decode never touches the sink store. A decode batch of several requests finds,
once per forward, the requests that hold a cached prefix in the same slots (radix hits), and the
decode kernel reads those positions once per block of them. The write kernel flags layers that wrote
non-finite K/V (stored as zeros); `oscar_sglang.nonfinite` warns once per layer. Extend
attention runs through FlashInfer on CUDA (planned at a forward's first layer for all of its
layers), through the Triton kernel under deterministic inference. Setting
SGLANG_OSCAR_REFERENCE_ATTENTION=1 routes attention through the PyTorch reference instead (a
debug switch: slow, needs --disable-cuda-graph).
"""

import os
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from oscar_sglang.kernels import reference
from oscar_sglang.kernels.decode import decode_attention_int2
from oscar_sglang.kernels.shared_prefix import find_shared_prefixes
from oscar_sglang.kernels.extend import extend_attention_int2, flashinfer_extend_wrapper, plan_flashinfer_extend
from oscar_sglang.nonfinite import NonFiniteReporter
from oscar_sglang.pool import OscarTokenToKVPool

REFERENCE_ENV = "SGLANG_OSCAR_REFERENCE_ATTENTION"
DETERMINISTIC_KV_SPLITS = 16
EXTEND_SCRATCH_BYTES = 1 << 30  # bound on the extend path's gathered K/V scratch per launch
FLASHINFER_WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended size
# each wrapper holds 8 MiB of device and 8 MiB of page-locked plan buffers; request groups of a
# forward beyond this many go to the Triton attention kernel
MAX_FLASHINFER_PLANS = 8


class OscarAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, OscarTokenToKVPool):
            raise RuntimeError(
                f"the 'oscar' attention backend needs the OSCAR KV pool, but SGLang built "
                f"{type(pool).__name__}: the oscar-sglang pool hook did not apply (check the "
                "plugin log lines above; is oscar-sglang installed in this environment?)")
        self.pool = pool
        self.fmt = pool.fmt
        # TritonAttnBackend reads v_head_dim off the value buffer, whose last dim is D/4 here
        self.v_head_dim = model_runner.model_config.v_head_dim
        pool.allocate_windows(model_runner.req_to_token_pool.size)
        self.req_generation = model_runner.req_to_token_pool.req_generation
        self.window_generation = torch.full_like(self.req_generation, -1)
        self.pool_clears = pool.clears
        self.use_reference = os.environ.get(REFERENCE_ENV, "0") == "1"
        self._token_rows = None
        self._shared = None
        self._sink_copy = None
        self._extend_groups = None
        # a deterministic request's result must not depend on its batch: the Triton kernel's
        # reduction order does not, and FlashInfer's choice of kernel and schedule might
        self.use_flashinfer = (torch.device(self.device).type == "cuda" and not self.use_reference
                               and not self.enable_deterministic)
        self._flashinfer = []  # one wrapper per request group of an extend forward
        self._flashinfer_workspace = (torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
                                      if self.use_flashinfer else None)
        self.nonfinite = NonFiniteReporter(pool.layer_num, pool.start_layer, pool.device)
        if not self.use_reference:
            self.compile_extend_kernels(model_runner.dtype)

    def compile_extend_kernels(self, dtype: torch.dtype) -> None:
        """Run the extend path once, so that Triton compiles its kernels (and FlashInfer loads
        its module) at start-up: SGLang's warm-up request has no cached prefix, and the first
        radix hit would otherwise hold its whole batch for the compile (~3 s on the H200 host).
        The index arrays have serving's dtypes (the indptr buffers' own; SGLang builds extend
        kv_indices as int64); one new token and no prefix, so nothing is read from the pool."""
        fmt, device = self.fmt, self.pool.device
        lay = self.pool.layer(self.pool.start_layer)
        qo_indptr = torch.tensor([0, 1], dtype=self.qo_indptr.dtype, device=device)
        kv_indptr = torch.zeros(2, dtype=self.kv_indptr.dtype, device=device)
        kv_indices = torch.zeros(0, dtype=torch.int64, device=device)
        request = torch.zeros(1, dtype=torch.int64, device=device)
        q = torch.zeros(1, self.num_head, fmt.head_dim, dtype=dtype, device=device)
        k = torch.zeros(1, self.num_kv_head, fmt.head_dim, dtype=dtype, device=device)
        wrapper = self._planned_wrappers([(0, 1)], [1], [0], 1.0, dtype)[0]
        extend_attention_int2(q, k, k, qo_indptr, kv_indptr, kv_indices, self.pool.window_starts(request),
                              lay, 1.0, max_extend_len=1, max_prefix_len=1, flashinfer=wrapper)

    def _planned_wrappers(self, groups, extend_lens, prefix_lens, sm_scale: float, dtype: torch.dtype):
        """For each request group [r0, r1), a FlashInfer wrapper planned for it, or None (the
        Triton kernel) without FlashInfer and for groups past MAX_FLASHINFER_PLANS.

        FlashInfer copies a plan to the GPU asynchronously from the wrapper's page-locked
        buffer. Extend forwards plan after init_forward_metadata's host sync
        (req_pool_indices.tolist()), so every copy of an earlier forward has run by then and
        re-planning a wrapper never overwrites a plan still in flight."""
        if not self.use_flashinfer:
            return [None] * len(groups)
        planned = min(len(groups), MAX_FLASHINFER_PLANS)
        while len(self._flashinfer) < planned:
            self._flashinfer.append(flashinfer_extend_wrapper(self._flashinfer_workspace))
        wrappers = [plan_flashinfer_extend(wrapper, extend_lens[r0:r1], prefix_lens[r0:r1], self.num_head,
                                           self.num_kv_head, self.fmt.head_dim, sm_scale, dtype)
                    for wrapper, (r0, r1) in zip(self._flashinfer, groups[:planned])]
        return wrappers + [None] * (len(groups) - planned)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.nonfinite.check()
        if forward_batch.forward_mode.is_extend():
            indices = forward_batch.req_pool_indices.tolist()
            self._restore_windows_of_new_requests(forward_batch, indices)
            self._sink_copy = self._assign_sink_rows(forward_batch, indices)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not in_capture:  # CUDA-graph replay prepares here; init_forward_metadata is not called
            self.nonfinite.check()

    def _restore_windows_of_new_requests(self, forward_batch, indices):
        """A request seen for the first time whose prefix came from the radix cache gets its
        window rows filled for that prefix: exact sinks from the sink pool where its slots have
        rows, the rest from INT2 codes (its own chunks write them)."""
        if self.pool.clears != self.pool_clears:  # flush_cache restarted the generations at 0
            self.pool_clears = self.pool.clears
            self.window_generation.fill_(-1)
        hits = []
        for idx, prefix in zip(indices, forward_batch.extend_prefix_lens_cpu):
            generation = self.req_generation[idx]
            if self.window_generation[idx] == generation:
                continue
            self.window_generation[idx] = generation
            if prefix > 0:
                hits.append((idx, self.req_to_token[idx, :prefix]))
        if hits:
            self.pool.restore_windows(hits)

    def _assign_sink_rows(self, forward_batch, indices):
        """Sink-pool rows for the slots of this batch's new positions < S (as many as the pool
        has free; the others fall back to dequantization when restored). Returns the
        (window rows, sink rows) pairs forward_extend copies after the write, or None."""
        fmt = self.fmt
        if self.pool.sinks.capacity == 0:
            return None
        tokens, window_rows, offset = [], [], 0
        for idx, prefix, length in zip(indices, forward_batch.extend_prefix_lens_cpu,
                                       forward_batch.extend_seq_lens_cpu):
            first_row = idx * fmt.window_rows
            for pos in range(prefix, min(fmt.sink_tokens, prefix + length)):
                tokens.append(offset + pos - prefix)
                window_rows.append(first_row + pos)
            offset += length
        if not tokens:
            return None
        loc = forward_batch.out_cache_loc
        return self.pool.sinks.assign(loc[torch.tensor(tokens, device=loc.device)], window_rows)

    def _token_windows(self, layer, forward_batch, num_tokens: int, decode: bool):
        """(window_rows [T], window_starts [B]) for this forward; computed at the first layer
        and reused by the others (also inside a captured CUDA graph)."""
        if layer.layer_id == self.pool.start_layer or self._token_rows is None:
            req = forward_batch.req_pool_indices
            if decode:
                per_token = torch.arange(req.shape[0], device=req.device)
            else:
                per_token = torch.repeat_interleave(
                    torch.arange(req.shape[0], device=req.device),
                    forward_batch.extend_seq_lens, output_size=num_tokens)
            rows = self.pool.window_rows_for(req[per_token], forward_batch.positions,
                                             forward_batch.seq_lens[per_token])
            self._token_rows = (rows, self.pool.window_starts(req))
        return self._token_rows

    def _shared_prefixes(self, layer, forward_batch):
        """Shared-prefix blocks of this decode batch (`kernels/shared_prefix.py`), found at the
        first layer and reused by the others (also inside a captured CUDA graph). None for a
        single request, and under deterministic inference: a request's result must not depend
        on which requests run beside it."""
        if self.enable_deterministic or forward_batch.req_pool_indices.shape[0] < 2:
            return None
        if layer.layer_id == self.pool.start_layer or self._shared is None:
            meta = self.forward_metadata
            self._shared = find_shared_prefixes(meta.kv_indptr, meta.kv_indices, self.fmt,
                                                layer.tp_q_head_num // layer.tp_k_head_num)
        return self._shared

    def _save_kv(self, layer, forward_batch, k, v, window_rows):
        """The new tokens into the pool, which writes its own format, with this forward's
        window rows and the layer's non-finite flag (oscar_sglang.nonfinite)."""
        self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, window_rows=window_rows,
                                nonfinite_flag=self.nonfinite.flag(layer.layer_id))

    @staticmethod
    def _check_layer(layer, sinks):
        if sinks is not None or (layer.logit_cap or 0) > 0 or layer.is_cross_attention:
            raise NotImplementedError(
                "--kv-quant oscar supports plain causal self-attention (no attention sinks, "
                "logit soft-capping or cross-attention)")

    def _prepare(self, q, k, v, layer, forward_batch, save_kv_cache: bool, decode: bool):
        """Per-head views q: [T, H_q, D], k, v: [T, H_kv, D]; the new tokens written to the pool
        (unless the caller already saved them). Returns (q, k, v, window starts [B], the kernels'
        arguments after the window starts: the layer's LayerCache and the softmax scale)."""
        d = layer.head_dim
        q = q.reshape(-1, layer.tp_q_head_num, d)
        k = k.reshape(-1, layer.tp_k_head_num, d)
        v = v.reshape(-1, layer.tp_v_head_num, d)
        rows, starts = self._token_windows(layer, forward_batch, q.shape[0], decode=decode)
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v, rows)
        return q, k, v, starts, (self.pool.layer(layer.layer_id), layer.scaling)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        self._check_layer(layer, sinks)
        q, k, v, starts, cache_args = self._prepare(q, k, v, layer, forward_batch, save_kv_cache, decode=True)
        meta = self.forward_metadata
        args = (meta.kv_indptr, meta.kv_indices, starts, *cache_args)
        if self.use_reference:
            o = reference.decode_attention(q, *args).to(q.dtype)
        else:
            # deterministic inference: a split count independent of the batch keeps every
            # request's reduction order, so its outputs do not depend on what runs beside it
            splits = DETERMINISTIC_KV_SPLITS if self.enable_deterministic else None
            o = decode_attention_int2(q, *args, num_kv_splits=splits,
                                      shared=self._shared_prefixes(layer, forward_batch))
        return o.reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        self._check_layer(layer, sinks)
        if k is None or v is None:
            raise NotImplementedError("--kv-quant oscar needs the new tokens' K and V in extend")
        q, k, v, starts, cache_args = self._prepare(q, k, v, layer, forward_batch, save_kv_cache, decode=False)
        if save_kv_cache and self._sink_copy is not None:  # the sinks just written, kept by slot
            self.pool.save_sinks(layer.layer_id, *self._sink_copy)
        meta = self.forward_metadata
        args = (meta.qo_indptr, meta.kv_indptr, meta.kv_indices, starts, *cache_args)
        if self.use_reference:
            o = reference.extend_attention(q, k, v, *args).to(q.dtype)
        else:
            o = extend_in_groups(q, k, v, args, self._request_groups(layer, forward_batch, q))
        return o.reshape(q.shape[0], -1)

    def _request_groups(self, layer, forward_batch, q):
        """This forward's RequestGroups, with FlashInfer plans: consecutive requests whose
        gathered K/V (4 KiB a token for Qwen3-8B) stays within EXTEND_SCRATCH_BYTES; a longer
        request runs alone. Found (and planned) at the first layer, reused by the others."""
        key = (layer.scaling, q.dtype)
        if layer.layer_id == self.pool.start_layer or self._extend_groups is None or self._extend_groups[0] != key:
            prefix_lens = forward_batch.extend_prefix_lens_cpu
            extend_lens = forward_batch.extend_seq_lens_cpu
            per_token = 2 * layer.tp_k_head_num * self.fmt.head_dim * q.element_size()
            ranges = request_groups([p + e for p, e in zip(prefix_lens, extend_lens)],
                                    EXTEND_SCRATCH_BYTES // per_token)
            wrappers = self._planned_wrappers(ranges, extend_lens, prefix_lens, layer.scaling, q.dtype)
            self._extend_groups = (key, [RequestGroup.of(r0, r1, extend_lens, prefix_lens, wrapper)
                                         for (r0, r1), wrapper in zip(ranges, wrappers)])
        return self._extend_groups[1]


@dataclass(frozen=True)
class RequestGroup:
    """Requests [r0, r1) of an extend batch run by one extend_attention_int2 call: their new
    tokens [qo, qo_end) and prefix entries [kv, kv_end) of the batch's arrays (host ints, so
    slicing does not wait for the GPU), and a FlashInfer wrapper planned for them or None."""

    r0: int
    r1: int
    qo: int
    qo_end: int
    kv: int
    kv_end: int
    max_extend: int
    max_prefix: int
    flashinfer: object

    @classmethod
    def of(cls, r0, r1, extend_lens, prefix_lens, flashinfer=None):
        qo, kv = sum(extend_lens[:r0]), sum(prefix_lens[:r0])
        return cls(r0, r1, qo, qo + sum(extend_lens[r0:r1]), kv, kv + sum(prefix_lens[r0:r1]),
                   max(extend_lens[r0:r1]), max(prefix_lens[r0:r1]), flashinfer)


def extend_in_groups(q, k, v, args, groups: list[RequestGroup]):
    """extend_attention_int2 over request groups; args are its arguments after k_new, v_new, for
    the whole batch."""
    if len(groups) == 1:
        g = groups[0]
        return extend_attention_int2(q, k, v, *args, max_extend_len=g.max_extend, max_prefix_len=g.max_prefix,
                                     flashinfer=g.flashinfer)
    qo_indptr, kv_indptr, kv_indices, starts, *pool_args = args
    out = torch.empty_like(q)
    for g in groups:
        tokens = slice(g.qo, g.qo_end)
        extend_attention_int2(
            q[tokens], k[tokens], v[tokens], qo_indptr[g.r0:g.r1 + 1] - g.qo, kv_indptr[g.r0:g.r1 + 1] - g.kv,
            kv_indices[g.kv:g.kv_end], starts[g.r0:g.r1], *pool_args, max_extend_len=g.max_extend,
            max_prefix_len=g.max_prefix, out=out[tokens], flashinfer=g.flashinfer)
    return out


def request_groups(lengths, limit: int) -> list[tuple[int, int]]:
    """Consecutive request ranges [r0, r1) whose lengths sum to at most `limit` (a range of one
    request may exceed it); none for no requests."""
    groups, r0, total = [], 0, 0
    for r, length in enumerate(lengths):
        if r > r0 and total + length > limit:
            groups.append((r0, r))
            r0, total = r, 0
        total += length
    if len(lengths) > r0:
        groups.append((r0, len(lengths)))
    return groups
