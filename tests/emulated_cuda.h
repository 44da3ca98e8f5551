// The CUDA built-ins and PTX helper functions int2_split.cu uses, for a CPU (g++), so that the
// kernel's own text runs in the CPU tests (tests/emulated_int2_split.py).
//
// Every thread of a program is a fiber (ucontext) with its own stack; the program's threads run
// one at a time, each until it waits at a warp or block collective (shuffle, vote, mma.sync,
// movmatrix, __syncwarp, __syncthreads). The last thread to arrive computes the collective for
// all and releases them. What the hardware leaves undefined is an error here, reported instead
// of a result: the threads of a warp reaching different collectives, a partial mask, a thread
// exiting while its warp waits, a deadlock, a misaligned asynchronous copy. Threads are ordered
// as the collectives order them; of memory visibility, only that of asynchronous copies is modeled.
//
// Asynchronous copies land at one of the two ends the hardware allows: when issued
// (Copies::at_issue: a stage refilled while another lane still reads it shows) or as late as a
// correct kernel may rely on (Copies::at_wait): once the lane that issued them has waited for
// them (cp.async.wait_group) and then reached a __syncwarp or __syncthreads, the barrier that
// makes them visible to the other threads. Data read before then shows, even by the issuing lane
// itself (stricter than the hardware, which shows it that lane after the wait).
//
// Shared memory (`__shared__`) is static storage in a section of its own, which every program
// starts with filled with 0xff bytes (NaN as fp16 or fp32): a read of what no copy wrote shows.

#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static __attribute__((section("emulated_shared")))
#define __align__(bytes) __attribute__((aligned(bytes)))

struct uint2 {
  unsigned int x, y;
};
struct uint4 {
  unsigned int x, y, z, w;
};
struct Dim3 {
  unsigned int x, y, z;
};

namespace emu {

enum class Copies { at_issue = 0, at_wait = 1 };
constexpr int WARP = 32;
constexpr size_t STACK_BYTES = 256 << 10;
constexpr int MAX_WORDS = 10;  // 32-bit words one thread puts into a collective (mma: a, b, c)

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Thread {
  ucontext_t context;
  Dim3 idx;
  bool exited = false;
  std::vector<Copy> open;                    // cp.async issued since the last commit
  std::vector<std::vector<Copy>> committed;  // oldest group first
  std::vector<Copy> waited;                  // complete, to land at the lane's next barrier
  std::vector<char> stack;
};

// One exchange among the threads of a warp (or of the block, for __syncthreads)
struct Collective {
  int arrived = 0;
  unsigned generation = 0;
  const char* op = nullptr;
  uint32_t in[WARP][MAX_WORDS];
  uint32_t out[WARP][4];
};

struct Program {
  Dim3 idx;
  int threads = 0;
  Copies copies = Copies::at_wait;
  std::vector<Thread> thread;
  std::vector<Collective> warp;
  Collective barrier;
  ucontext_t scheduler;
  int current = 0;
  bool progressed = false;
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Program* program = nullptr;

// the linker's bounds of the `__shared__` variables' section
extern "C" char __start_emulated_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emulated_shared[] __attribute__((weak, visibility("hidden")));

inline Thread& self() { return program->thread[program->current]; }
inline int lane_id() { return program->current % WARP; }

inline void yield() { swapcontext(&self().context, &program->scheduler); }

[[noreturn]] inline void fail(const std::string& message) {
  if (program->error.empty()) program->error = message;
  for (;;) yield();  // never resumed: the scheduler stops at the first error
}

inline std::string where() {
  const Thread& t = self();
  char s[96];
  snprintf(s, sizeof s, "program (%u, %u, %u) thread %u", program->idx.x, program->idx.y, program->idx.z, t.idx.x);
  return s;
}

inline void check_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu)
    fail(where() + ": " + op + " with mask " + std::to_string(mask) + " (emulated: full warps only)");
}

// Put `words` into this thread's slot of its warp's exchange `op`; the last lane to arrive runs
// compute(collective) over all 32 slots. Returns this lane's out row.
template <class Compute>
const uint32_t* warp_exchange(const char* op, const uint32_t* words, int n, Compute compute) {
  const int warp = program->current / WARP, lane = lane_id();
  for (int l = 0; l < WARP; ++l)
    if (program->thread[warp * WARP + l].exited)
      fail(where() + ": " + op + " while lane " + std::to_string(l) + " of its warp has exited");
  Collective& c = program->warp[warp];
  if (c.arrived == 0) c.op = op;
  if (c.op != op) fail(where() + ": reached " + op + " while its warp's other lanes wait at " + c.op);
  for (int i = 0; i < n; ++i) c.in[lane][i] = words[i];
  program->progressed = true;
  const unsigned generation = c.generation;
  if (++c.arrived == WARP) {
    compute(c);
    c.arrived = 0;
    ++c.generation;
  } else {
    while (c.generation == generation) yield();
  }
  return c.out[lane];
}

inline int exited_threads() {
  int n = 0;
  for (const Thread& t : program->thread) n += t.exited;
  return n;
}

inline void release_barrier_if_complete() {
  Collective& b = program->barrier;
  if (b.arrived > 0 && b.arrived + exited_threads() == program->threads) {
    b.arrived = 0;
    ++b.generation;
    program->progressed = true;
  }
}

// the copies this thread has waited for land (Copies::at_wait), before it reaches a barrier
inline void land_waited_copies() {
  for (const Copy& c : self().waited) memcpy(c.dst, c.src, c.bytes);
  self().waited.clear();
}

inline void syncthreads() {
  land_waited_copies();
  Collective& b = program->barrier;
  const unsigned generation = b.generation;
  ++b.arrived;
  program->progressed = true;
  release_barrier_if_complete();
  while (b.generation == generation) yield();
}

inline void run_thread() {
  program->body(program->body_arg);
  self().exited = true;
  program->progressed = true;
  release_barrier_if_complete();
}

// Runs one program of `threads` threads to completion; false (and the error) if it went wrong.
inline bool run_program(Program& p) {
  program = &p;
  if (__start_emulated_shared) memset(__start_emulated_shared, 0xff, __stop_emulated_shared - __start_emulated_shared);
  p.progressed = true;
  for (int i = 0; i < p.threads; ++i) {
    Thread& t = p.thread[i];
    t.idx = Dim3{(unsigned)i, 0, 0};
    t.exited = false;
    t.open.clear();
    t.committed.clear();
    t.waited.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.data();
    t.context.uc_stack.ss_size = t.stack.size();
    t.context.uc_link = &p.scheduler;
    makecontext(&t.context, run_thread, 0);
  }
  for (Collective& c : p.warp) c.arrived = 0;
  p.barrier.arrived = 0;
  for (;;) {
    bool running = false;
    if (!p.progressed) {
      std::string waits;
      for (size_t w = 0; w < p.warp.size(); ++w)
        if (p.warp[w].arrived) waits += " warp " + std::to_string(w) + " at " + p.warp[w].op + ";";
      p.error = "deadlock:" + waits + " block barrier: " + std::to_string(p.barrier.arrived) + " arrived";
      return false;
    }
    p.progressed = false;
    for (int i = 0; i < p.threads; ++i) {
      if (p.thread[i].exited) continue;
      running = true;
      p.current = i;
      swapcontext(&p.scheduler, &p.thread[i].context);
      if (!p.error.empty()) return false;
    }
    if (!running) return true;
  }
}

template <class... A, size_t... I>
void call_kernel(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// cuLaunchKernel on the CPU: `args` as the driver takes them (each entry points at a value).
template <class... A>
int launch(void (*kernel)(A...), Dim3 grid, int threads, int copies, void** args, char* error, int error_size) {
  struct Call {
    void (*kernel)(A...);
    void** args;
  } call{kernel, args};
  Program p;
  p.threads = threads;
  p.copies = static_cast<Copies>(copies);
  p.thread.resize(threads);
  for (Thread& t : p.thread) t.stack.resize(STACK_BYTES);
  p.warp.resize((threads + WARP - 1) / WARP);
  p.body = [](void* c) {
    auto* call = static_cast<Call*>(c);
    call_kernel(call->kernel, call->args, std::index_sequence_for<A...>{});
  };
  p.body_arg = &call;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        p.idx = Dim3{x, y, z};
        p.error.clear();
        if (!run_program(p)) {
          snprintf(error, error_size, "%s", p.error.c_str());
          program = nullptr;
          return 1;
        }
      }
  program = nullptr;
  return 0;
}

template <class To, class From>
To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  memcpy(&to, &x, sizeof to);
  return to;
}
inline uint32_t bits(float x) { return bit_cast<uint32_t>(x); }
inline float from_bits(uint32_t u) { return bit_cast<float>(u); }
inline uint16_t half_bits(float x) { return bit_cast<uint16_t>(static_cast<_Float16>(x)); }  // nearest even, as cvt.rn
inline float half_value(uint16_t u) { return static_cast<float>(bit_cast<_Float16>(u)); }
inline float half_lane(uint32_t word, int lane) { return half_value(static_cast<uint16_t>(word >> (16 * lane))); }


}  // namespace emu

#define threadIdx (emu::self().idx)
#define blockIdx (emu::program->idx)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __int_as_float(int x) { return emu::from_bits(static_cast<uint32_t>(x)); }
inline float __uint_as_float(unsigned int x) { return emu::from_bits(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __log2f(float x) { return std::log2(x); }

// default mode: selector nibble i picks byte (s >> 4i) & 7 of the 8 bytes {y, x}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned int>((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

template <class T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  emu::check_mask(mask, "__shfl_sync");
  const uint32_t words[2] = {emu::bit_cast<uint32_t>(value), static_cast<uint32_t>(src_lane & (emu::WARP - 1))};
  const uint32_t* out = emu::warp_exchange("shfl", words, 2, [](emu::Collective& c) {
    for (int l = 0; l < emu::WARP; ++l) c.out[l][0] = c.in[c.in[l][1]][0];
  });
  return emu::bit_cast<T>(out[0]);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return __shfl_sync(mask, value, emu::lane_id() ^ lane_mask);
}

inline int __any_sync(unsigned mask, int predicate) {
  emu::check_mask(mask, "__any_sync");
  const uint32_t word = predicate != 0;
  return emu::warp_exchange("vote.any", &word, 1, [](emu::Collective& c) {
    uint32_t any = 0;
    for (int l = 0; l < emu::WARP; ++l) any |= c.in[l][0];
    for (int l = 0; l < emu::WARP; ++l) c.out[l][0] = any;
  })[0];
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_mask(mask, "__syncwarp");
  emu::land_waited_copies();
  emu::warp_exchange("syncwarp", nullptr, 0, [](emu::Collective&) {});
}

inline void __syncthreads() { emu::syncthreads(); }

// ---------------------------------------------------------------- int2_split_ptx.cuh's functions

// shared addresses: offsets in the `__shared__` section
inline unsigned int smem_addr(const void* p) {
  return static_cast<unsigned int>(static_cast<const char*>(p) - emu::__start_emulated_shared);
}

template <int BYTES>
void cp_async(unsigned int dst, const void* src) {
  if (dst % BYTES || reinterpret_cast<uintptr_t>(src) % BYTES)
    emu::fail(emu::where() + ": cp.async of " + std::to_string(BYTES) + " bytes from a misaligned address");
  char* to = emu::__start_emulated_shared + dst;
  if (emu::program->copies == emu::Copies::at_issue)
    memcpy(to, src, BYTES);
  else
    emu::self().open.push_back({to, src, BYTES});
}

inline void cp_async_commit() {
  emu::Thread& t = emu::self();
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}

template <int N>
void cp_async_wait() {
  emu::Thread& t = emu::self();
  while (static_cast<int>(t.committed.size()) > N) {
    t.waited.insert(t.waited.end(), t.committed.front().begin(), t.committed.front().end());
    t.committed.erase(t.committed.begin());
  }
}

// mma.sync.m16n8k16.row.col f32 += f16 * f16: lane l = 4g + t holds A rows g, g + 8 and columns
// 2t, 2t + 1 (a0: row g, a1: row g + 8; a2, a3 the same at columns + 8), B rows 2t, 2t + 1 (b0)
// and 2t + 8, 2t + 9 (b1) of column g, C rows g (c0, c1) and g + 8 (c2, c3) at columns 2t, 2t + 1
inline void mma(float* c, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3, unsigned int b0,
                unsigned int b1) {
  const uint32_t words[10] = {a0, a1, a2, a3, b0, b1, emu::bits(c[0]), emu::bits(c[1]), emu::bits(c[2]),
                              emu::bits(c[3])};
  const uint32_t* out = emu::warp_exchange("mma.sync.m16n8k16", words, 10, [](emu::Collective& x) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < emu::WARP; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int j = 0; j < 2; ++j) {
        A[g][2 * t + j] = emu::half_lane(x.in[l][0], j);
        A[g + 8][2 * t + j] = emu::half_lane(x.in[l][1], j);
        A[g][2 * t + 8 + j] = emu::half_lane(x.in[l][2], j);
        A[g + 8][2 * t + 8 + j] = emu::half_lane(x.in[l][3], j);
        B[2 * t + j][g] = emu::half_lane(x.in[l][4], j);
        B[2 * t + 8 + j][g] = emu::half_lane(x.in[l][5], j);
        C[g][2 * t + j] = emu::from_bits(x.in[l][6 + j]);
        C[g + 8][2 * t + j] = emu::from_bits(x.in[l][8 + j]);
      }
    }
    for (int l = 0; l < emu::WARP; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        double sum = 0.0;  // the products are exact in fp32; their sum here has no rounding to speak of
        for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
        x.out[l][e] = emu::bits(static_cast<float>(sum + C[row][col]));
      }
    }
  });
  for (int e = 0; e < 4; ++e) c[e] = emu::from_bits(out[e]);
}

inline unsigned int pack_half2(float lo, float hi) {
  return emu::half_bits(lo) | static_cast<unsigned int>(emu::half_bits(hi)) << 16;
}

// movmatrix.m8n8.trans.b16: lane l holds row l / 4, columns 2(l % 4), +1 of an 8x8 matrix, before
// and after
inline unsigned int transpose8x8(unsigned int x) {
  return emu::warp_exchange("movmatrix.trans", &x, 1, [](emu::Collective& c) {
    for (int l = 0; l < emu::WARP; ++l) {
      const int row = l >> 2;
      uint32_t r = 0;
      for (int j = 0; j < 2; ++j) {
        const int col = 2 * (l & 3) + j;  // element (row, col) of the result is (col, row) of the input
        const uint32_t src = c.in[col * 4 + row / 2][0];
        r |= ((src >> (16 * (row & 1))) & 0xffffu) << (16 * j);
      }
      c.out[l][0] = r;
    }
  })[0];
}

inline void unpack_meta(unsigned int w, float& scale, float& minimum) {
  scale = emu::half_lane(w, 0);
  minimum = emu::half_lane(w, 1);
}

inline float exp2_approx(float x) {  // .ftz: subnormal inputs and results are zero
  if (std::fabs(x) < 1.17549435e-38f) x = 0.0f;
  const float r = std::exp2(x);
  return r < 1.17549435e-38f ? 0.0f : r;
}
