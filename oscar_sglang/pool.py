"""OscarTokenToKVPool: SGLang's token-to-KV pool holding OSCAR-2 packed K/V.

Per layer: codes [slots, H_kv, D/4] uint8 as `k_buffer` / `v_buffer` and fp16 metadata
[slots, H_kv, D/G, 2] as `k_scale_buffer` / `v_scale_buffer` (the names SGLang's slot moves,
size accounting and pointer tables already cover), plus per-request BF16 window rows
[(requests + 1) * (S + W), H_kv, D] (row block 0 is SGLang's padding request) allocated once the
request pool size is known. Rotations and clip ratios of this rank's KV heads live here too,
so a layer's whole state is one `layer(layer_id)` call away.

The radix tree shares slots; every slot always holds INT2 codes, so sharing needs nothing
from this pool. Window rows belong to the request (indexed by req_pool_idx).
"""

import logging
from dataclasses import dataclass

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, move_kv_cache_native

from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.reference import decode_kv
from oscar_sglang.kernels.rotations import RotationSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OscarLayer:
    """Everything the kernels need for one layer (tensors on the pool's device)."""

    k_codes: torch.Tensor
    k_meta: torch.Tensor
    v_codes: torch.Tensor
    v_meta: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor
    k_rot: torch.Tensor
    v_rot: torch.Tensor
    k_clip: float
    v_clip: float


class OscarTokenToKVPool(MHATokenToKVPool):
    def __init__(self, size: int, page_size: int, head_num: int, head_dim: int, layer_num: int,
                 device: str, enable_memory_saver: bool, *, fmt: OscarFormat,
                 rotations: RotationSet, start_layer: int | None = None,
                 end_layer: int | None = None, enable_alt_stream: bool = True):
        self.fmt = fmt
        self.k_window: list[torch.Tensor] = []
        self.v_window: list[torch.Tensor] = []
        self.window_requests = 0
        # dtype uint8 also keeps model code that writes BF16 caches directly off this pool
        super().__init__(size, page_size, torch.uint8, head_num, head_dim, layer_num, device,
                         enable_memory_saver, start_layer=start_layer, end_layer=end_layer,
                         enable_alt_stream=enable_alt_stream)
        first = self.start_layer
        self.k_rot = [r.to(device) for r in rotations.k_rot[first:first + layer_num]]
        self.v_rot = [r.to(device) for r in rotations.v_rot[first:first + layer_num]]
        self.k_clip = rotations.k_clip[first:first + layer_num]
        self.v_clip = rotations.v_clip[first:first + layer_num]

    def _create_buffers(self):
        rows = self.size + self.page_size
        fmt, heads = self.fmt, self.head_num
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            def buffers(shape, dtype):
                return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.layer_num)]
            self.k_buffer = buffers(fmt.codes_shape(rows, heads), torch.uint8)
            self.v_buffer = buffers(fmt.codes_shape(rows, heads), torch.uint8)
            self.k_scale_buffer = buffers(fmt.meta_shape(rows, heads), torch.float16)
            self.v_scale_buffer = buffers(fmt.meta_shape(rows, heads), torch.float16)
        self.dq_k_buffer = self.dq_v_buffer = None
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def allocate_windows(self, num_requests: int) -> None:
        """BF16 window rows for request indices 0..num_requests (0 is SGLang's padding row)."""
        if self.window_requests >= num_requests:
            return
        shape = self.fmt.window_shape(num_requests + 1, self.head_num)
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k_window = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(self.layer_num)]
            self.v_window = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(self.layer_num)]
        self.window_requests = num_requests
        logger.info("OSCAR window rows: %d requests x %d BF16 rows, %.2f GB", num_requests,
                    self.fmt.window_rows, 2 * len(self.k_window) * self.k_window[0].nbytes / 2**30)

    def layer(self, layer_id: int) -> OscarLayer:
        i = layer_id - self.start_layer
        return OscarLayer(self.k_buffer[i], self.k_scale_buffer[i], self.v_buffer[i], self.v_scale_buffer[i],
                          self.k_window[i], self.v_window[i], self.k_rot[i], self.v_rot[i],
                          self.k_clip[i], self.v_clip[i])

    def window_starts(self, req_pool_indices: torch.Tensor) -> torch.Tensor:
        """[B] first window row of each request."""
        return req_pool_indices.to(torch.int64) * self.fmt.window_rows

    def window_rows_for(self, req_pool_indices: torch.Tensor, positions: torch.Tensor,
                        visible_len: torch.Tensor) -> torch.Tensor:
        """Window row each new token is copied to (-1: none). All tensors [T], one entry per new
        token: its request's req_pool_idx, its position, and the request's length after this
        forward. A token keeps a BF16 copy if it is a sink or within the last W positions."""
        fmt = self.fmt
        pos = positions.to(torch.int64)
        start = self.window_starts(req_pool_indices)
        sink = pos < fmt.sink_tokens
        recent = pos >= visible_len.to(torch.int64) - fmt.recent_tokens
        ring = start + fmt.sink_tokens + (pos - fmt.sink_tokens).remainder(fmt.recent_tokens)
        return torch.where(sink, start + pos, torch.where(recent, ring, -1))

    def restore_windows(self, req_pool_idx: int, slots: torch.Tensor) -> None:
        """Refill a newly admitted request's window rows for its cached prefix (slots of
        positions 0..len-1, e.g. a radix hit) by dequantizing their INT2 codes."""
        fmt, length = self.fmt, slots.shape[0]
        sink_end, recent_start = fmt.int2_span(length)
        positions = torch.cat([torch.arange(sink_end), torch.arange(recent_start, length)])
        if positions.numel() == 0:
            return
        positions = positions.to(slots.device)
        rows = self.window_rows_for(torch.full_like(positions, req_pool_idx), positions,
                                    torch.full_like(positions, length))
        src = slots[positions].long()
        for i in range(self.layer_num):
            for codes, meta, window in ((self.k_buffer[i], self.k_scale_buffer[i], self.k_window[i]),
                                        (self.v_buffer[i], self.v_scale_buffer[i], self.v_window[i])):
                window[rows] = decode_kv(codes[src], meta[src], fmt).to(torch.bfloat16)

    def get_kv_size_bytes(self):
        k_bytes, v_bytes = super().get_kv_size_bytes()
        return (k_bytes + sum(w.nbytes for w in self.k_window),
                v_bytes + sum(w.nbytes for w in self.v_window))

    def set_kv_buffer(self, *args, **kwargs):
        raise RuntimeError(
            "the OSCAR KV pool is written by the 'oscar' attention backend only; a model or "
            "backend that writes the KV cache directly cannot run with --kv-quant oscar")

    def _move_kv_cache_impl(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        move_kv_cache_native(self.k_buffer, self.v_buffer, tgt_loc, src_loc)
        # meta is 4-D [slots, H, D/G, 2]; move_kv_cache_native reads any 4-D buffer as a paged
        # [pages, page_size, H, D] layout and would move only head 0: hand it 3-D views
        move_kv_cache_native([m.flatten(2) for m in self.k_scale_buffer],
                             [m.flatten(2) for m in self.v_scale_buffer], tgt_loc, src_loc)

    def get_cpu_copy(self, indices, mamba_indices=None):
        raise NotImplementedError("KV offload to CPU (hierarchical cache) is not supported with --kv-quant oscar")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        raise NotImplementedError("KV offload to CPU (hierarchical cache) is not supported with --kv-quant oscar")

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("PD-disaggregation KV transfer is not supported with --kv-quant oscar")
