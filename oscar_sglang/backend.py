"""OscarAttnBackend: SGLang's Triton attention backend with decode and extend running on the
packed OSCAR-2 pool.

Reused from TritonAttnBackend: forward metadata (kv_indptr / kv_indices over req_to_token,
qo_indptr, max_extend_len) and the CUDA-graph capture / replay machinery. Overridden: the KV
write (rotate + quantize + window copies) and both attention kernels. Extend batches (never
captured) also restore the window rows of requests with a radix hit and give the slots of new
sink positions rows of the pool's slot-keyed sink store, copied from the window rows after the
write kernel; decode never touches the sink store. What every layer of a forward reuses is its
ForwardPlan (`forward_plan.py`): the new tokens' window rows, the sink rows to copy, and for a
decode batch of several requests the blocks of requests that hold a cached prefix in the same
slots (radix hits), whose positions the decode kernel reads once per block. The write kernel
flags layers that wrote non-finite K/V (stored as zeros); `oscar_sglang.nonfinite` warns once
per layer. Extend attention runs in request groups (`extend_groups.py`) through FlashInfer on CUDA
(planned at a forward's first layer for all of its layers), through the Triton kernel under
deterministic inference. Setting
SGLANG_OSCAR_REFERENCE_ATTENTION=1 routes attention through the PyTorch reference instead (a
debug switch: slow, needs --disable-cuda-graph).
"""

import os

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from oscar_sglang.extend_groups import FlashInferPlans, extend_in_groups
from oscar_sglang.forward_plan import ForwardPlan, plan_decode, plan_extend
from oscar_sglang.kernels import reference
from oscar_sglang.kernels.decode import DECODE_LAUNCH, decode_attention_int2
from oscar_sglang.kernels.extend import extend_attention_int2
from oscar_sglang.nonfinite import NonFiniteReporter
from oscar_sglang.pool import OscarTokenToKVPool

REFERENCE_ENV = "SGLANG_OSCAR_REFERENCE_ATTENTION"
DETERMINISTIC_KV_SPLITS = 16
# one split kernel at every batch size (DECODE_LAUNCH picks it by the batch's size)
DETERMINISTIC_LAUNCH = DECODE_LAUNCH.with_split_kernel("triton")


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
        self.forward_plan: ForwardPlan | None = None  # this forward's (forward_plan.py)
        # a deterministic request's result must not depend on its batch: the Triton kernel's
        # reduction order does not, and FlashInfer's choice of kernel and schedule might
        self.flashinfer_plans = FlashInferPlans(
            torch.device(self.device).type == "cuda" and not self.use_reference and not self.enable_deterministic,
            self.device)
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
        wrapper = self.flashinfer_plans.plan([(0, 1)], [1], [0], self.num_head, self.num_kv_head, fmt.head_dim,
                                             1.0, dtype)[0]
        extend_attention_int2(q, k, k, qo_indptr, kv_indptr, kv_indices, self.pool.window_starts(request),
                              lay, 1.0, max_extend_len=1, max_prefix_len=1, flashinfer=wrapper)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.nonfinite.check()
        self.forward_plan = None  # a decode forward is planned at its first layer
        if forward_batch.forward_mode.is_extend():
            indices = forward_batch.req_pool_indices.tolist()
            self._restore_windows_of_new_requests(forward_batch, indices)
            self.forward_plan = plan_extend(self.pool, forward_batch, indices)

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

    def _decode_plan(self, layer, forward_batch) -> ForwardPlan:
        """Planned at the first layer and reused by the others, also inside a captured CUDA graph
        (whose replay re-runs the planning on the batch's tensors). Shared-prefix blocks are off
        under deterministic inference: a request's result must not depend on which requests run
        beside it."""
        if layer.layer_id == self.pool.start_layer or self.forward_plan is None:
            meta = self.forward_metadata
            self.forward_plan = plan_decode(self.pool, forward_batch, meta.kv_indptr, meta.kv_indices,
                                            layer.tp_q_head_num // layer.tp_k_head_num,
                                            not self.enable_deterministic)
        return self.forward_plan

    def _extend_plan(self) -> ForwardPlan:
        if self.forward_plan is None or not self.forward_plan.extend_lens:
            raise RuntimeError("forward_extend without an extend plan: init_forward_metadata plans each "
                               "extend forward before its layers run")
        return self.forward_plan

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

    @staticmethod
    def _heads(q, k, v, layer):
        """Per-head views q: [T, H_q, D], k, v: [T, H_kv, D]."""
        d = layer.head_dim
        return (q.reshape(-1, layer.tp_q_head_num, d), k.reshape(-1, layer.tp_k_head_num, d),
                v.reshape(-1, layer.tp_v_head_num, d))

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        self._check_layer(layer, sinks)
        q, k, v = self._heads(q, k, v, layer)
        plan = self._decode_plan(layer, forward_batch)
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v, plan.window_rows)
        meta = self.forward_metadata
        args = (meta.kv_indptr, meta.kv_indices, plan.window_starts, self.pool.layer(layer.layer_id), layer.scaling)
        if self.use_reference:
            o = reference.decode_attention(q, *args).to(q.dtype)
        else:
            # deterministic inference: a split count and a kernel independent of the batch keep
            # every request's reduction order, so its outputs do not depend on what runs beside it
            splits, launch = ((DETERMINISTIC_KV_SPLITS, DETERMINISTIC_LAUNCH) if self.enable_deterministic
                              else (None, DECODE_LAUNCH))
            o = decode_attention_int2(q, *args, num_kv_splits=splits, shared=plan.shared, launch=launch)
        return o.reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        self._check_layer(layer, sinks)
        if k is None or v is None:
            raise NotImplementedError("--kv-quant oscar needs the new tokens' K and V in extend")
        q, k, v = self._heads(q, k, v, layer)
        plan = self._extend_plan()
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v, plan.window_rows)
            if plan.sink_copy is not None:  # the sinks just written, kept by slot
                self.pool.save_sinks(layer.layer_id, *plan.sink_copy)
        meta = self.forward_metadata
        args = (meta.qo_indptr, meta.kv_indptr, meta.kv_indices, plan.window_starts,
                self.pool.layer(layer.layer_id), layer.scaling)
        if self.use_reference:
            o = reference.extend_attention(q, k, v, *args).to(q.dtype)
        else:
            groups = plan.request_groups(self.flashinfer_plans, layer.tp_q_head_num, layer.tp_k_head_num,
                                         layer.head_dim, layer.scaling, q.dtype)
            o = extend_in_groups(q, k, v, args, groups)
        return o.reshape(q.shape[0], -1)
