// Run-time choice of the kernel build for this processor, and the per-thread scratch.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#if defined(__linux__) && defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
namespace avx512amx {
extern const bool kCompiled;  // false where the compiler has no AMX support (GCC < 11, Clang < 12)
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end);
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end);
}  // namespace avx512amx
#else
#define RSIR_X86_DISPATCH 0
#endif

namespace {

using Kernel = void (*)(const WindowAttentionParams&, int64_t, int64_t);

// The AMX build: compiled in, CPUID.(7, 1).EAX bit 5 (AVX512-BF16) and CPUID.(7, 0).EDX bits 22
// (AMX-BF16) and 24 (AMX-TILE), and Linux's permission for this process to use the tile data
// state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+; refused on older kernels and where the
// hypervisor hides the state): without it the first tile instruction raises SIGILL.
bool amx_usable() {
#if defined(__linux__) && defined(__GNUC__) && defined(__x86_64__)
  unsigned a, b, c, d;
  if (!avx512amx::kCompiled) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

struct Table {
  Kernel forward, backward;
  const char* name;
};

Table pick() {
#if RSIR_X86_DISPATCH
  // RSIR_CPU_ISA: "generic" forces the baseline build, "avx2" caps the choice at AVX2 + FMA,
  // "avx512" at AVX-512 without AMX
  const char* force = std::getenv("RSIR_CPU_ISA");
  const bool generic_only = force && force[0] == 'g';
  const bool avx2_at_most = force && std::strncmp(force, "avx2", 4) == 0;
  const bool avx512_at_most = force && std::strcmp(force, "avx512") == 0;
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (!generic_only && !avx2_at_most && !avx512_at_most && has_avx512 && amx_usable())
    return {avx512amx::forward, avx512amx::backward, "avx512+amx"};
  if (!generic_only && !avx2_at_most && has_avx512)
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
