// Run-time choice of the kernel build for this processor, and the per-thread scratch.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "rsir/params.h"
#include "window_attention_cpu.h"

namespace rsir {
namespace cpu {

namespace generic {
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end);
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end);
}  // namespace generic

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RSIR_X86_DISPATCH 1
namespace avx2 {
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end);
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end);
}  // namespace avx2
namespace avx512 {
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end);
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end);
}  // namespace avx512
#else
#define RSIR_X86_DISPATCH 0
#endif

namespace {

using Kernel = void (*)(const WindowAttentionParams&, int64_t, int64_t);

struct Table {
  Kernel forward, backward;
  const char* name;
};

Table pick() {
#if RSIR_X86_DISPATCH
  // RSIR_CPU_ISA: "generic" forces the baseline build, "avx2" caps the choice at AVX2 + FMA
  const char* force = std::getenv("RSIR_CPU_ISA");
  const bool generic_only = force && force[0] == 'g';
  const bool avx2_at_most = force && std::strncmp(force, "avx2", 4) == 0;
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!generic_only && !avx2_at_most && has_avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return {avx512::forward, avx512::backward, "avx512"};
  if (!generic_only && has_avx2)
    return {avx2::forward, avx2::backward, "avx2+fma"};
#endif
  return {generic::forward, generic::backward, "generic"};
}

const Table& table() {
  static const Table t = pick();
  return t;
}

struct Scratch {
  void* ptr = nullptr;
  int64_t bytes = 0;
  void release() {
    std::free(ptr);
    ptr = nullptr;
    bytes = 0;
  }
  ~Scratch() { release(); }
};

thread_local Scratch t_scratch;

// A call's scratch is O(N^2) (the score matrix): kept for the next call up to this size
// (every window up to a few hundred tokens), released when the call returns above it, so that
// one call with a huge window does not leave its buffers resident in every thread.
constexpr int64_t kScratchKeepBytes = int64_t(16) << 20;

void trim_scratch() {
  if (t_scratch.bytes > kScratchKeepBytes) t_scratch.release();
}

}  // namespace

void* thread_scratch(int64_t bytes) {
  Scratch& s = t_scratch;
  if (bytes > s.bytes) {
    s.release();
    const int64_t rounded = (bytes + 4095) / 4096 * 4096;
    s.ptr = std::aligned_alloc(64, (size_t)rounded);
    if (!s.ptr) throw std::bad_alloc();
    s.bytes = rounded;
  }
  return s.ptr;
}

int64_t thread_scratch_bytes() { return t_scratch.bytes; }

int64_t num_work_items(const WindowAttentionParams& p) { return p.B * p.G * p.num_windows(); }

void run_forward(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  table().forward(p, begin, end);
  trim_scratch();
}

void run_backward(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  table().backward(p, begin, end);
  trim_scratch();
}

const char* isa_name() { return table().name; }

}  // namespace cpu
}  // namespace rsir
