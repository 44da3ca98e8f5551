"""OscarTokenToKVPool: SGLang's token-to-KV pool holding OSCAR-2 packed K/V.

Per layer: codes (kernels.format: K [slots, H_kv, key_bits · D/8], V [slots, H_kv, D/4]) uint8
as `k_buffer` / `v_buffer` and fp16 metadata
[slots, H_kv, D/G, 2] as `k_scale_buffer` / `v_scale_buffer` (the names SGLang's slot moves,
size accounting and pointer tables already cover), each stored head-major
(kernels.layer_cache.pool_buffer; slots move by indexing, `_move_kv_cache_impl`, never by
SGLang's copy kernel, which takes a slot's heads to lie together), plus per-request BF16 window rows
[(requests + 1) * (S + W), H_kv, D] (row block 0 is SGLang's padding request) allocated once the
request pool size is known. Rotations and clip ratios of this rank's KV heads live here too,
so a layer's whole state is one `layer(layer_id)` call away (a kernels.layer_cache.LayerCache,
built and validated once per layer after the window rows exist).

The radix tree shares slots; every slot always holds INT2 codes, so sharing needs nothing
from this pool. Window rows belong to the request (indexed by req_pool_idx).

Sink pool: exact BF16 sinks of radix-cached prefixes, kept by slot in `sinks`
(oscar_sglang.sink_store.SinkStore), which `restore_windows` prefers over dequantized codes.
"""

import logging

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, move_kv_cache_native

from oscar_sglang.kernels.format import OscarFormat
from oscar_sglang.kernels.layer_cache import LayerCache, pool_buffer
from oscar_sglang.kernels.quantize import write_kv_int2
from oscar_sglang.kernels.reference import decode_kv
from oscar_sglang.kernels.rotation_file import RotationSet
from oscar_sglang.sink_store import SinkStore

logger = logging.getLogger(__name__)


class OscarTokenToKVPool(MHATokenToKVPool):
    def __init__(self, size: int, page_size: int, head_num: int, head_dim: int, layer_num: int,
                 device: str, enable_memory_saver: bool, *, fmt: OscarFormat,
                 rotations: RotationSet, start_layer: int | None = None,
                 end_layer: int | None = None, enable_alt_stream: bool = True,
                 sink_rows_per_request: int = 0):
        """sink_rows_per_request: sink-pool rows per request (oscar_sglang.sizing charges them
        to the window budget); the store holds `allocate_windows(n)`'s n times this many."""
        self.fmt = fmt
        self.k_window: list[torch.Tensor] = []
        self.v_window: list[torch.Tensor] = []
        self._layers: list[LayerCache] = []
        self.window_requests = 0
        self.sink_rows_per_request = sink_rows_per_request
        self.clears = 0
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
                return [pool_buffer(shape, dtype, self.device) for _ in range(self.layer_num)]
            self.k_buffer = buffers(fmt.codes_shape(rows, heads, "k"), torch.uint8)
            self.v_buffer = buffers(fmt.codes_shape(rows, heads, "v"), torch.uint8)
            self.k_scale_buffer = buffers(fmt.meta_shape(rows, heads), torch.float16)
            self.v_scale_buffer = buffers(fmt.meta_shape(rows, heads), torch.float16)
        self.dq_k_buffer = self.dq_v_buffer = None
        self._layers = []
        self.sinks = SinkStore(rows, self.layer_num, heads, fmt.head_dim, self.device, self.memory_saver_adapter)
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
        self._layers = []
        logger.info("OSCAR window rows: %d requests x %d BF16 rows, %.2f GB", num_requests,
                    self.fmt.window_rows_per_request, 2 * len(self.k_window) * self.k_window[0].nbytes / 2**30)
        if self.sink_rows_per_request > 0:
            self.sinks.allocate(num_requests * self.sink_rows_per_request, self.fmt.sink_tokens)

    def clear_slots(self) -> None:
        """Every slot is free (the allocator's clear()): so is every sink row. Counted in
        `clears`, since flush_cache also restarts SGLang's request generations, which the
        backend uses to know which requests' window rows it filled."""
        self.clears += 1
        self.sinks.reset()

    def save_sinks(self, layer_id: int, window_rows: torch.Tensor, sink_rows: torch.Tensor) -> None:
        """Copy one layer's freshly written window rows into their sink-pool rows."""
        i = layer_id - self.start_layer
        self.sinks.save(i, self.k_window[i], self.v_window[i], window_rows, sink_rows)

    def layer(self, layer_id: int) -> LayerCache:
        """The kernels' view of one layer (needs `allocate_windows` first)."""
        if not self._layers:
            self._layers = [LayerCache(self.fmt, self.k_buffer[i], self.k_scale_buffer[i], self.v_buffer[i],
                                       self.v_scale_buffer[i], self.k_window[i], self.v_window[i],
                                       self.k_rot[i], self.v_rot[i], self.k_clip[i], self.v_clip[i])
                            for i in range(self.layer_num)]
        return self._layers[layer_id - self.start_layer]

    def window_starts(self, req_pool_indices: torch.Tensor) -> torch.Tensor:
        """[B] first window row of each request."""
        return req_pool_indices.to(torch.int64) * self.fmt.window_rows_per_request

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

    def restore_windows(self, requests: list[tuple[int, torch.Tensor]]) -> None:
        """Refill newly admitted requests' window rows for their cached prefixes; `requests`:
        (req_pool_idx, slots of positions 0..len-1, e.g. a radix hit) each. Sinks whose slot
        has a sink-pool row get that exact BF16 row, every other restored position the
        dequantized INT2 codes. All requests in one pass per layer: a batch of radix hits costs
        the same few launches per layer as one."""
        fmt = self.fmt
        entries, offset, any_sink = [], 0, False
        for req_pool_idx, slots in requests:  # (request, position, length, index into the slots)
            length = slots.shape[0]
            sink_end, recent_start = fmt.int2_span(length)
            for pos in [*range(sink_end), *range(recent_start, length)]:
                entries.append((req_pool_idx, pos, length, offset + pos))
            offset += length
            any_sink |= sink_end > 0
        if not entries:
            return
        req, pos, length, index = torch.tensor(entries, dtype=torch.int64).to(self.device).unbind(1)
        rows = self.window_rows_for(req, pos, length)
        src = torch.cat([slots for _, slots in requests]).to(self.device)[index].long()
        exact = self.sinks.capacity > 0 and any_sink
        if exact:  # no host sync: slots without a sink row select the dequantized values
            sink_rows = self.sinks.row_of_slot[src]
            has_row = ((pos < fmt.sink_tokens) & (sink_rows >= 0))[:, None, None]
            at = sink_rows.clamp(min=0).long()
        for i in range(self.layer_num):
            for codes, meta, window, store in (
                    (self.k_buffer[i], self.k_scale_buffer[i], self.k_window[i], self.sinks.k),
                    (self.v_buffer[i], self.v_scale_buffer[i], self.v_window[i], self.sinks.v)):
                values = decode_kv(codes[src], meta[src], fmt).to(torch.bfloat16)
                if exact:
                    values = torch.where(has_row, store[i][at], values)
                window[rows] = values

    def get_kv_size_bytes(self):
        k_bytes, v_bytes = super().get_kv_size_bytes()
        return (k_bytes + sum(w.nbytes for w in (*self.k_window, *self.sinks.k)),
                v_bytes + sum(w.nbytes for w in (*self.v_window, *self.sinks.v)))

    def set_kv_buffer(self, layer, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      k_scale=None, v_scale=None, layer_id_override=None, *,
                      window_rows: torch.Tensor | None = None, nonfinite_flag: torch.Tensor | None = None):
        """Rotate, clip, quantize and store new tokens of one layer (kernels.quantize.write_kv_int2).

        loc: [T] slots; cache_k, cache_v: [T, H_kv, D] (keys post-RoPE); window_rows: [T] window
        row of each token (`window_rows_for`, -1: none), which only the 'oscar' attention
        backend knows; nonfinite_flag: the layer's oscar_sglang.nonfinite flag. A write without
        window rows (SGLang's signature: a model or backend writing the cache directly) would
        leave the recent window stale, so it is refused."""
        if window_rows is None or k_scale is not None or v_scale is not None:
            raise RuntimeError(
                "the OSCAR KV pool is written by the 'oscar' attention backend only; a model or "
                "backend that writes the KV cache directly cannot run with --kv-quant oscar")
        layer_id = layer.layer_id if layer_id_override is None else layer_id_override
        write_kv_int2(cache_k, cache_v, loc, self.layer(layer_id), window_rows, nonfinite_flag)

    def _move_kv_cache_impl(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        move_kv_cache_native(self.k_buffer, self.v_buffer, tgt_loc, src_loc)
        # meta is 4-D [slots, H, D/G, 2]; move_kv_cache_native reads any 4-D buffer as a paged
        # [pages, page_size, H, D] layout and would move only head 0: hand it 3-D views
        move_kv_cache_native([m.flatten(2) for m in self.k_scale_buffer],
                             [m.flatten(2) for m in self.v_scale_buffer], tgt_loc, src_loc)
        self.sinks.move(tgt_loc, src_loc)

    def get_cpu_copy(self, indices, mamba_indices=None):
        raise NotImplementedError("KV offload to CPU (hierarchical cache) is not supported with --kv-quant oscar")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        raise NotImplementedError("KV offload to CPU (hierarchical cache) is not supported with --kv-quant oscar")

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("PD-disaggregation KV transfer is not supported with --kv-quant oscar")
