"""The decode step's split programs (BF16 window and INT2) as CUDA C++ (int2_split.cu), compiled
at run time by NVRTC for the GPU at hand, and the key-register plan that kernel's INT2 unpacking
is generated from.

A position's key codes are an MMA row: the 4 threads of the row each read a quarter of its bytes
(`key_chunks`) and turn them into f16x2 operand registers (`key_registers`), each lane one code
as the fp16 subnormal c · 2^f · 2^-24 of its bit field f. Which dim a lane stands for depends on
the thread (`lane_code`); the query fragment of thread t holds q'_dim · multiplier · 2^-f for the
same lanes (`query_fragment`, generated as constants per register plus a shift per thread), so
the MMA sums q'·c over the whole key without the codes ever being put in dim order. Registers
are ordered by quantization group, two per MMA.

Used for GQA groups of up to MAX_GQA query heads on GPUs with mma.sync and cp.async (sm_80+);
`decode.py` keeps its Triton split kernel for the rest and for the Triton interpreter.
"""

import ctypes
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from .format import CODE_BITS, META_BYTES, META_FIELDS, OscarFormat
from .layer_cache import LayerCache

THREADS_PER_ROW = 4  # threads of an m16n8k16 fragment sharing a row
MAX_GQA = 8  # the MMA's N: query heads of one KV head a program serves
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 f16, cp.async, movmatrix
WARPS = 4  # warps per program, each with its own tiles and softmax state
# programs an SM runs at once (4 x 128 threads at <= 128 registers), which the split count aims
# at: one wave of them was faster than two on an H100 (results/h100/int2-split-cuda)
PROGRAMS_PER_SM = 4
VALUE_CHUNK = 16  # bytes per asynchronous copy of a value row
SOURCE = Path(__file__).with_name("int2_split.cu")
PTX_HELPERS = Path(__file__).with_name("int2_split_ptx.cuh")  # what SOURCE calls for each PTX instruction
C_INTS = {32: "int", 64: "long long"}


@dataclass(frozen=True)
class KeyChunk:
    """Bytes of a key row (kernels.format) that each thread of the row reads: thread t reads
    [start + t·size, start + (t+1)·size)."""

    start: int
    size: int
    field_bits: int  # 2: a quartered 2-bit plane; 1: the 3-bit keys' paired 1-bit plane

    @property
    def words(self) -> int:
        """32-bit registers the chunk loads into (a 2-byte chunk fills one, zero-extended)."""
        return max(1, self.size // 4)


def key_chunks(fmt: OscarFormat) -> list[KeyChunk]:
    """A thread's share of a key row: a quarter of every plane, read so that all threads unpack
    their bytes with the same instructions."""
    p = fmt.packed_dim
    if fmt.key_bits == 2:
        return [KeyChunk(0, p // THREADS_PER_ROW, CODE_BITS)]
    if fmt.key_bits == 4:  # both planes are quartered 2-bit planes: one contiguous read
        return [KeyChunk(0, 2 * p // THREADS_PER_ROW, CODE_BITS)]
    return [KeyChunk(0, p // THREADS_PER_ROW, CODE_BITS), KeyChunk(p, p // (2 * THREADS_PER_ROW), 1)]


@dataclass(frozen=True)
class KeyRegister:
    """One f16x2 operand: the thread's word `word` (bytes chunk_byte.. of `chunk`), its lanes
    holding bytes (0, 2) of the word (half 0), (1, 3) (half 1, after >> 8) or, for a 2-byte
    chunk, bytes (0, 1); masked to the field_bits-wide field at bit field_bit of each lane."""

    chunk: KeyChunk
    word: int
    chunk_byte: int
    half: int
    field_bit: int

    def lane_bytes(self) -> tuple[int, int]:
        """Offsets in the chunk of the bytes lanes 0 and 1 hold."""
        if self.chunk.size == 2:
            return 0, 1
        return self.chunk_byte + self.half, self.chunk_byte + 2 + self.half

    @property
    def mask(self) -> int:
        return (((1 << self.chunk.field_bits) - 1) << self.field_bit) * 0x00010001

    def c_expr(self) -> str:
        w = f"w[{self.word}]"
        if self.chunk.size == 2:
            spread = f"__byte_perm({w}, 0, 0x4140)"  # bytes 0, 1 into the low bytes of the lanes
        else:
            spread = f"({w} >> 8)" if self.half else w
        return f"{spread} & {self.mask:#010x}u"


def lane_code(fmt: OscarFormat, reg: KeyRegister, t: int, lane: int) -> tuple[int, float, bool]:
    """(dim, weight, low plane) of the code lane `lane` of `reg` holds in thread t: the lane's
    integer value times 2^-field_bit times weight is that code's share of the key (weight 4 for
    the high plane of 3- and 4-bit keys); low plane: the code is in the plane every key has
    (its dims appear once there, which the minimum's term Σ q' counts)."""
    p = fmt.packed_dim
    byte = reg.chunk.start + t * reg.chunk.size + reg.lane_bytes()[lane]
    if reg.chunk.field_bits == 1:  # paired byte i, bit k: quartered byte 2i + k % 2, slice k // 2
        i, k = byte - p, reg.field_bit
        return 2 * i + k % 2 + (k // 2) * p, 4.0, False
    slice_ = reg.field_bit // CODE_BITS
    if byte < p:
        return byte + slice_ * p, 1.0, True
    return byte - p + slice_ * p, 4.0, False


def key_registers(fmt: OscarFormat) -> list[KeyRegister]:
    """A thread's key registers for one position, ordered by quantization group (MMA m takes
    registers 2m and 2m + 1, which share a group)."""
    regs, word = [], 0
    for chunk in key_chunks(fmt):
        halves = (0,) if chunk.size == 2 else (0, 1)
        for w in range(chunk.words):
            for half in halves:
                for bit in range(0, 8, chunk.field_bits):
                    regs.append(KeyRegister(chunk, word + w, 4 * w, half, bit))
        word += chunk.words
    regs.sort(key=lambda r: register_group(fmt, r))
    groups = [register_group(fmt, r) for r in regs]
    assert all(groups[i] == groups[i + 1] for i in range(0, len(regs), 2)), "a group holds an odd register count"
    return regs


def register_group(fmt: OscarFormat, reg: KeyRegister) -> int:
    """The quantization group of every code `reg` holds (the same in all threads and lanes)."""
    groups = {lane_code(fmt, reg, t, lane)[0] // fmt.group_size for t in range(THREADS_PER_ROW) for lane in (0, 1)}
    assert len(groups) == 1, f"register {reg} spans groups {groups}"
    return groups.pop()


@dataclass(frozen=True)
class QueryFragment:
    """`lane_code` over all threads, factored into what the thread adds and what the register
    holds, so the kernel's query fragment needs no table indexed by the thread: lane `lane` of
    key register r in thread t stands for dim dims[r][lane] + dim_steps[0]·(t & 1) +
    dim_steps[1]·(t >> 1), and the query enters it times scales[r][lane] · thread_weights[t]
    (the code's weight times 2^-field_bit); its dims count in Σ q' when sums[r] and thread_sums[t]."""

    dims: tuple[tuple[int, int], ...]
    scales: tuple[tuple[float, float], ...]
    sums: tuple[bool, ...]
    dim_steps: tuple[int, int]
    thread_weights: tuple[float, ...]
    thread_sums: tuple[bool, ...]


def query_fragment(fmt: OscarFormat) -> QueryFragment:
    """The factored `lane_code` of `key_registers(fmt)`; raises if some thread's codes do not
    follow the thread-0 codes by one shift of dims and one factor of weight."""
    regs = key_registers(fmt)
    codes = [[[lane_code(fmt, r, t, lane) for lane in (0, 1)] for r in regs] for t in range(THREADS_PER_ROW)]
    dim_steps = (codes[1][0][0][0] - codes[0][0][0][0], codes[2][0][0][0] - codes[0][0][0][0])
    # a thread's weights are the register's times the thread's (one of them is 1 in every format)
    thread_weights = tuple(codes[t][0][0][1] / codes[0][0][0][1] for t in range(THREADS_PER_ROW))
    thread_sums = tuple(any(low for r in codes[t] for _, _, low in r) for t in range(THREADS_PER_ROW))
    fragment = QueryFragment(
        dims=tuple((c[0][0], c[1][0]) for c in codes[0]),
        scales=tuple((c[0][1] / (1 << r.field_bit), c[1][1] / (1 << r.field_bit)) for r, c in zip(regs, codes[0])),
        sums=tuple(any(codes[t][i][lane][2] for t, lane in itertools.product(range(THREADS_PER_ROW), (0, 1)))
                   for i in range(len(regs))),
        dim_steps=dim_steps, thread_weights=thread_weights, thread_sums=thread_sums)
    for t, i, lane in itertools.product(range(THREADS_PER_ROW), range(len(regs)), (0, 1)):
        dim, weight, low = codes[t][i][lane]
        factored = (fragment.dims[i][lane] + dim_steps[0] * (t & 1) + dim_steps[1] * (t >> 1),
                    fragment.scales[i][lane] * (1 << regs[i].field_bit) * thread_weights[t],
                    fragment.sums[i] and thread_sums[t])
        assert factored == (dim, weight, low), f"{fmt}: thread {t}'s register {i} lane {lane} is {codes[t][i][lane]}"
    return fragment


def key_chunk(fmt: OscarFormat) -> int:
    """Bytes per asynchronous copy of a key row (rows of 24 bytes: 3-bit keys at D 64)."""
    return 16 if fmt.key_packed_dim % 16 == 0 else 8


def meta_row(fmt: OscarFormat) -> int:
    """Bytes of one position's meta, K or V: a (scale, minimum) word per group, one copy."""
    return META_FIELDS * META_BYTES * fmt.num_groups


@dataclass(frozen=True)
class SplitKernel:
    """One compiled variant of int2_split.cu: the format, the GQA group (query heads per KV
    head), the widths in bits of kv_indptr, kv_indices and window_starts, whether requests read
    a shared prefix elsewhere (own_start), the BF16 window rows a window program reads
    (DecodeLaunch.window_rows_per_program), the cp.async pipeline depth per warp and the number
    of independent accumulators the key MMAs of a tile alternate between."""

    fmt: OscarFormat
    gqa: int
    index_bits: tuple[int, int, int]
    shared: bool
    window_rows: int
    stages: int
    key_chains: int


def generated_header(kernel: SplitKernel) -> str:
    """The definitions int2_split.cu expects before its text (see its header comment)."""
    fmt = kernel.fmt
    regs, chunks = key_registers(fmt), key_chunks(fmt)
    lines = [f"#define {name} {value}" for name, value in (
        ("D", fmt.head_dim), ("P", fmt.packed_dim), ("KEY_BYTES", fmt.key_packed_dim), ("NG", fmt.num_groups),
        ("GROUP_SIZE", fmt.group_size), ("GQA", kernel.gqa), ("S_TOK", fmt.sink_tokens),
        ("W_TOK", fmt.recent_tokens), ("WIN_ROWS", kernel.window_rows), ("WIN_DIMS", window_lane_dims(fmt)),
        ("SHARED", int(kernel.shared)),
        ("STAGES", kernel.stages), ("KEY_CHAINS", max(1, kernel.key_chains // fmt.num_groups)),
        ("INDPTR_T", C_INTS[kernel.index_bits[0]]), ("INDEX_T", C_INTS[kernel.index_bits[1]]),
        ("WSTART_T", C_INTS[kernel.index_bits[2]]),
        ("WARPS", WARPS), ("KEY_CHUNK", key_chunk(fmt)), ("VALUE_CHUNK", VALUE_CHUNK), ("META_ROW", meta_row(fmt)),
        ("KEY_REGS", len(regs)), ("KEY_WORDS", sum(c.words for c in chunks)))]
    lines.append("__device__ __forceinline__ void load_key_words(const unsigned char* row, int t, unsigned int* w) {")
    word = 0
    for c in chunks:
        at = f"row + {c.start} + t * {c.size}"
        vector = {16: "uint4", 8: "uint2"}.get(c.size)
        if vector:
            fields = "xyzw"[:c.words]
            lines.append(f"  {{ const {vector} v = *reinterpret_cast<const {vector}*>({at}); "
                         + " ".join(f"w[{word + i}] = v.{f};" for i, f in enumerate(fields)) + " }")
        else:
            kind = "unsigned int" if c.size == 4 else "unsigned short"
            lines.append(f"  w[{word}] = *reinterpret_cast<const {kind}*>({at});")
        word += c.words
    lines.append("}")
    lines.append("__device__ __forceinline__ unsigned int key_reg(const unsigned int* w, int r) {\n  switch (r) {")
    lines += [f"    case {i}: return {r.c_expr()};" for i, r in enumerate(regs)]
    lines.append("  }\n  return 0;\n}")
    lines.append("__device__ __forceinline__ int key_mma_group(int m) {\n  switch (m) {")
    lines += [f"    case {m}: return {register_group(fmt, regs[2 * m])};" for m in range(len(regs) // 2)]
    lines.append("  }\n  return 0;\n}")

    q = query_fragment(fmt)
    lines += [f"#define Q_STEP_T0 {q.dim_steps[0]}", f"#define Q_STEP_T1 {q.dim_steps[1]}"]

    def by_thread(name: str, values) -> None:  # a select over t, folded where the values agree
        chain = " : ".join(f"t == {t} ? {float(v)!r}f" for t, v in enumerate(values[:-1]))
        lines.append(f"__device__ __forceinline__ float {name}(int t) {{ return {chain} : {float(values[-1])!r}f; }}")

    def by_register(kind: str, name: str, cases: list[str]) -> None:  # folded once the register loop is unrolled
        lines.append(f"__device__ __forceinline__ {kind} {name}(int r, int lane) {{\n  switch (r) {{")
        lines.extend(f"    case {i}: return {c};" for i, c in enumerate(cases))
        lines.append("  }\n  return 0;\n}")

    by_thread("q_thread_weight", q.thread_weights)
    by_thread("q_thread_sum", q.thread_sums)
    by_register("int", "key_q_dim", [f"lane ? {d1} : {d0}" for d0, d1 in q.dims])
    by_register("float", "key_q_scale", [f"lane ? {s1!r}f : {s0!r}f" for s0, s1 in q.scales])
    by_register("bool", "key_q_sum", [str(x).lower() for x in q.sums])  # the same for both lanes
    return "\n".join(lines) + "\n"


def kernel_source(kernel: SplitKernel, helpers: str, text: str | None = None) -> str:
    """int2_split.cu for `kernel`: `helpers` (the functions it calls for PTX instructions:
    PTX_HELPERS on a GPU), the generated definitions, then its text (SOURCE's, or another
    version's for an A/B)."""
    return helpers + generated_header(kernel) + (SOURCE.read_text() if text is None else text)


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    log: str


@functools.cache
def compile_kernel(kernel: SplitKernel, arch: str) -> Compiled:
    """int2_split.cu for `kernel`, compiled by NVRTC to a cubin for `arch` ("sm_90"); no GPU
    needed. The log holds ptxas's register and spill report."""
    return compile_source(kernel_source(kernel, PTX_HELPERS.read_text()), arch)


def compile_source(source: str, arch: str) -> Compiled:
    """A complete text of the kernel (`kernel_source`, or another version's for an A/B) by NVRTC."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"int2_split.cu", 0, [], [])
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    _, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * log_size
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.decode(errors="replace").rstrip("\x00")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC could not compile int2_split.cu for {arch}:\n{log}")
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    nvrtc.nvrtcDestroyProgram(prog)
    return Compiled(cubin, log)


def device_arch(device_index: int) -> str:
    """NVRTC's name of the device's architecture ("sm_90")."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def serves(gqa: int, device: torch.device) -> bool:
    """Whether the CUDA kernel runs this decode (else decode.py's Triton split kernel does)."""
    return (device.type == "cuda" and gqa <= MAX_GQA
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY)


@functools.cache
def _function(device_index: int, kernel: SplitKernel):
    return load_function(device_index, compile_kernel(kernel, device_arch(device_index)).cubin)


def load_function(device_index: int, cubin: bytes):
    """The kernel of `cubin` loaded on the device (a CUfunction)."""
    from cuda.bindings import driver

    # the module goes into the device's primary context, torch's; made current through the driver
    # rather than by a stream operation, which CUDA-graph capture would refuse on first use
    device = _checked(driver.cuDeviceGet(device_index))
    _checked(driver.cuCtxSetCurrent(_checked(driver.cuDevicePrimaryCtxRetain(device))))
    module = _checked(driver.cuModuleLoadData(cubin))
    return _checked(driver.cuModuleGetFunction(module, b"oscar_int2_split"))


def _checked(result):
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return values[0] if values else None


def window_lane_dims(fmt: OscarFormat) -> int:
    """Dims of a window row each lane of a window program reads (a warp reads a whole row)."""
    return fmt.head_dim // 32


def check_layout(cache: LayerCache) -> list[int]:
    """The byte strides (slot, head) of k_codes, v_codes and the meta, checked against what the
    kernel's asynchronous copies need: every row aligned to the copy size, slot strides below
    4 GiB; and the window rows aligned to what a lane of a window program reads."""
    fmt = cache.fmt
    strides = []
    for name, buf, unit in (("k_codes", cache.k_codes, key_chunk(fmt)), ("v_codes", cache.v_codes, VALUE_CHUNK),
                            ("k_meta", cache.k_meta, meta_row(fmt)), ("v_meta", cache.v_meta, meta_row(fmt))):
        steps = [buf.stride(0) * buf.element_size(), buf.stride(1) * buf.element_size()]
        if buf.data_ptr() % unit or any(x % unit for x in steps) or steps[0] >= 1 << 32:
            raise ValueError(f"{name} rows must be {unit}-byte aligned with a slot stride below 4 GiB for the CUDA "
                             f"split kernel, got address {buf.data_ptr():#x} and byte strides {steps}; allocate the "
                             "pool with layer_cache.pool_buffer, or decode with DecodeLaunch(int2_split='triton')")
        if name != "v_meta":
            strides += steps
    window = cache.k_window  # K and V share strides (LayerCache); the kernel takes them in elements
    unit = window_lane_dims(fmt)
    if window.data_ptr() % (unit * window.element_size()) or any(x % unit or x >= 1 << 32 for x in window.stride()[:2]):
        raise ValueError(f"k_window/v_window rows must be {unit * window.element_size()}-byte aligned with strides below "
                         f"2^32 elements for the CUDA split kernel, got address {window.data_ptr():#x} and strides "
                         f"{window.stride()}; allocate the pool contiguous, or decode with DecodeLaunch(int2_split='triton')")
    return strides


@dataclass(frozen=True)
class SplitPrograms:
    """The split programs one launch runs for each (request, KV head): the INT2 parts 0 ..
    splits - 1 of the requests whose own span (INT2 positions read alone) is at least min_span,
    then window_programs window parts (0: decode.py's Triton split kernel runs them, and the INT2
    parts of the other requests)."""

    splits: int
    window_programs: int
    window_rows: int  # rows per window program
    min_span: int = 0


@dataclass(frozen=True)
class PlannedLaunch:
    """One launch of int2_split.cu: the compiled variant, the grid (H_kv, B, programs per pair) of
    WARPS · 32-thread programs, and the kernel's arguments in its parameter order."""

    kernel: SplitKernel
    grid: tuple[int, int, int]
    args: list

    def argument_pointers(self) -> ctypes.Array:
        """The arguments' addresses, as cuLaunchKernel takes them (alive while `args` is)."""
        return (ctypes.c_void_p * len(self.args))(*[ctypes.addressof(a) for a in self.args])

    def run(self, function, device: torch.device) -> None:
        """Launch `function` (load_function) with these arguments on the device's current stream."""
        from cuda.bindings import driver

        pointers = self.argument_pointers()
        stream = torch.cuda.current_stream(device).cuda_stream
        _checked(driver.cuLaunchKernel(function, *self.grid, WARPS * 32, 1, 1, 0, stream,
                                       ctypes.addressof(pointers), 0))


def plan_launch(qr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
                own_start: torch.Tensor | None, cache: LayerCache, part_o: torch.Tensor, part_lse: torch.Tensor,
                programs: SplitPrograms, stages: int, key_chains: int) -> PlannedLaunch:
    """`launch`'s arguments (see there) as a PlannedLaunch, the pool's layout checked first."""
    batch, q_heads, _ = qr.shape
    fmt, kv_heads = cache.fmt, cache.kv_heads
    k_codes, v_codes, k_meta, v_meta = cache.k_codes, cache.v_codes, cache.k_meta, cache.v_meta
    gqa = q_heads // kv_heads
    index_bits = tuple(torch.iinfo(x.dtype).bits for x in (kv_indptr, kv_indices, window_starts))
    strides = check_layout(cache)  # before compiling: a pool the copies cannot read fails at once
    kernel = SplitKernel(fmt, gqa, index_bits, own_start is not None, programs.window_rows, stages, key_chains)
    args = [ctypes.c_void_p(x.data_ptr()) for x in (qr, kv_indptr, kv_indices)]
    args.append(ctypes.c_void_p((own_start if own_start is not None else kv_indptr).data_ptr()))
    args += [ctypes.c_void_p(x.data_ptr()) for x in (window_starts, cache.k_window, cache.v_window)]
    args += [ctypes.c_uint32(cache.k_window.stride(0)), ctypes.c_uint32(cache.k_window.stride(1))]
    # strides: (slot, head) of k_codes, v_codes and the meta; a head's in 64 bits (head-major pools)
    slot_head = (ctypes.c_uint32, ctypes.c_uint64)
    args += [ctypes.c_void_p(k_codes.data_ptr()), ctypes.c_void_p(v_codes.data_ptr())]
    args += [slot_head[i % 2](s) for i, s in enumerate(strides[:4])]
    args += [ctypes.c_void_p(k_meta.data_ptr()), ctypes.c_void_p(v_meta.data_ptr())]
    args += [slot_head[i % 2](s) for i, s in enumerate(strides[4:])]
    args += [ctypes.c_void_p(part_o.data_ptr()), ctypes.c_void_p(part_lse.data_ptr())]
    args += [ctypes.c_int(q_heads), ctypes.c_int(programs.splits), ctypes.c_int(part_o.shape[2])]
    args.append(ctypes.c_int(programs.min_span))
    return PlannedLaunch(kernel, (kv_heads, batch, programs.splits + programs.window_programs), args)


def launch(qr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, window_starts: torch.Tensor,
           own_start: torch.Tensor | None, cache: LayerCache, part_o: torch.Tensor, part_lse: torch.Tensor,
           programs: SplitPrograms, stages: int, key_chains: int) -> None:
    """Launch grid (H_kv, B, splits + window programs) on the current stream
    (capturable in a CUDA graph).

    qr: [B, H_q, D] fp32 rotated, pre-scaled queries (decode.py's q_rot); kv_indptr [B + 1],
    kv_indices and window_starts [B] int32/int64; own_start: [B] int32 first position each request
    reads alone (None: the INT2 span's start); cache: the layer's pool buffers; part_o
    [B, H_q, parts, D] and part_lse [B, H_q, parts] fp32 get the parts `programs` runs;
    stages, key_chains: as in SplitKernel."""
    planned = plan_launch(qr, kv_indptr, kv_indices, window_starts, own_start, cache, part_o, part_lse, programs,
                          stages, key_chains)
    planned.run(_function(qr.device.index, planned.kernel), qr.device)
