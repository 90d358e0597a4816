// A/B timing of builds of the torch-free CPU core in one process (benchmarks/tools/core_ab.sh
// builds them): each library is a build of csrc/kernels/cpu from some revision, dlopen'ed
// privately; the calls alternate between them round by round, so load from other processes hits
// every build alike. One thread, the thread's CPU time; prints min and median ms of the forward
// and backward in fp32 and bf16 at RSIR-T stage 1 (or stage 2 with D = 32), and a checksum of
// every output (out, lse, dq, dk, dv in both dtypes) per library: equal checksums = bitwise
// equal results.
//
//   core_ab ROUNDS D LIB [LIB ...]      env: BATCH (default 8), SEQ=1 (tokens in order, not
//                                       shuffled), HUGE=1 (inputs in transparent huge pages)
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "rsir/params.h"

using rsir::DType;
using rsir::WindowAttentionParams;

namespace {

using Run = void (*)(const WindowAttentionParams&, int64_t, int64_t);
using Items = int64_t (*)(const WindowAttentionParams&);

struct Build {
  std::string path;
  Run forward, backward;
  Items items;
};

Build open_build(const char* path) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    std::fprintf(stderr, "%s\n", dlerror());
    std::exit(1);
  }
  Build b{path, (Run)dlsym(h, "_ZN4rsir3cpu11run_forwardERKNS_21WindowAttentionParamsEll"),
          (Run)dlsym(h, "_ZN4rsir3cpu12run_backwardERKNS_21WindowAttentionParamsEll"),
          (Items)dlsym(h, "_ZN4rsir3cpu14num_work_itemsERKNS_21WindowAttentionParamsE")};
  if (!b.forward || !b.backward || !b.items) {
    std::fprintf(stderr, "%s: not a build of the CPU core\n", path);
    std::exit(1);
  }
  return b;
}

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

// 2 MiB-aligned buffers, madvised for huge pages with HUGE=1.
template <class T>
T* buffer(size_t n) {
  const size_t huge = size_t(2) << 20, bytes = (n * sizeof(T) + huge - 1) / huge * huge;
  void* p = std::aligned_alloc(huge, bytes);
  if (std::getenv("HUGE")) madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0, bytes);
  return static_cast<T*>(p);
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

uint64_t fnv(const void* p, size_t bytes, uint64_t h) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ROUNDS D LIB [LIB ...]\n", argv[0]);
    return 2;
  }
  const int rounds = std::atoi(argv[1]);
  const int64_t D = std::atoi(argv[2]), B = std::getenv("BATCH") ? std::atoi(std::getenv("BATCH")) : 8;
  const int64_t L = D == 32 ? 28 * 28 : 56 * 56, H = 4, G = 2, N = 49;
  std::vector<Build> builds;
  for (int a = 3; a < argc; ++a) builds.push_back(open_build(argv[a]));

  const size_t n3 = B * L * 3 * H * D, n1 = B * L * H * D;
  float *qkv = buffer<float>(n3), *dout = buffer<float>(n1), *out = buffer<float>(n1), *dqkv = buffer<float>(n3);
  float* lse = buffer<float>(B * H * L);
  uint16_t *qkv16 = buffer<uint16_t>(n3), *dout16 = buffer<uint16_t>(n1), *out16 = buffer<uint16_t>(n1),
           *dqkv16 = buffer<uint16_t>(n3);
  int64_t* index = buffer<int64_t>(B * G * L);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < n3; ++i) qkv16[i] = to_bf16(qkv[i] = normal(rng));
  for (size_t i = 0; i < n1; ++i) dout16[i] = to_bf16(dout[i] = normal(rng));
  for (int64_t bg = 0; bg < B * G; ++bg) {
    std::iota(index + bg * L, index + (bg + 1) * L, 0);
    if (!std::getenv("SEQ")) std::shuffle(index + bg * L, index + (bg + 1) * L, rng);
  }

  auto params = [&](bool bf16) {
    WindowAttentionParams p;
    p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
    p.B = B, p.L = L, p.H = H, p.D = D, p.G = G, p.N = N, p.scale = 1.0 / std::sqrt((double)D);
    const int64_t packed[4] = {L * 3 * H * D, 3 * H * D, D, 1}, plain[4] = {L * H * D, H * D, D, 1};
    const int64_t es = bf16 ? 2 : 4;
    char* in = bf16 ? (char*)qkv16 : (char*)qkv;
    char* grad = bf16 ? (char*)dqkv16 : (char*)dqkv;
    p.q = in, p.k = in + H * D * es, p.v = in + 2 * H * D * es;
    p.dq = grad, p.dk = grad + H * D * es, p.dv = grad + 2 * H * D * es;
    p.out = bf16 ? (void*)out16 : (void*)out;
    p.dout = bf16 ? (const void*)dout16 : (const void*)dout;
    for (int i = 0; i < 4; ++i) {
      p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = p.dq_stride[i] = p.dk_stride[i] = p.dv_stride[i] = packed[i];
      p.out_stride[i] = p.dout_stride[i] = plain[i];
    }
    p.index = index, p.index_bytes = 8, p.index_stride[0] = G * L, p.index_stride[1] = L, p.index_stride[2] = 1;
    p.lse = lse, p.lse_stride[0] = H * L, p.lse_stride[1] = L, p.lse_stride[2] = 1;
    return p;
  };
  const WindowAttentionParams p32 = params(false), p16 = params(true);
  const int64_t items = builds[0].items(p32);

  std::vector<std::vector<double>> ms(4 * builds.size());
  std::vector<uint64_t> sums(builds.size());
  for (int r = 0; r < rounds + 2; ++r) {
    for (size_t b = 0; b < builds.size(); ++b) {
      const Build& x = builds[b];
      const double t0 = cpu_ms();
      x.forward(p32, 0, items);
      const double t1 = cpu_ms();
      uint64_t h = fnv(out, n1 * 4, fnv(lse, B * H * L * 4, 1469598103934665603ull));
      const double t2 = cpu_ms();
      x.forward(p16, 0, items);
      const double t3 = cpu_ms();
      h = fnv(out16, n1 * 2, fnv(lse, B * H * L * 4, h));
      const double t4 = cpu_ms();
      x.backward(p32, 0, items);
      const double t5 = cpu_ms();
      x.backward(p16, 0, items);
      const double t6 = cpu_ms();
      sums[b] = fnv(dqkv16, n3 * 2, fnv(dqkv, n3 * 4, h));
      if (r >= 2) {  // two warm-up rounds
        ms[4 * b].push_back(t1 - t0), ms[4 * b + 1].push_back(t3 - t2);
        ms[4 * b + 2].push_back(t5 - t4), ms[4 * b + 3].push_back(t6 - t5);
      }
    }
  }
  const double flop = 2.0 * 2 * N * N * D * (L / N) * B * H;
  std::printf("B=%ld L=%ld H=%ld D=%ld N=%ld, %d rounds, ms min / median (thread CPU time)\n", (long)B, (long)L,
              (long)H, (long)D, (long)N, rounds);
  for (size_t b = 0; b < builds.size(); ++b) {
    for (int k = 0; k < 4; ++k) std::sort(ms[4 * b + k].begin(), ms[4 * b + k].end());
    auto mm = [&](int k) { return std::to_string(ms[4 * b + k][0]).substr(0, 5) + " / " +
                                  std::to_string(ms[4 * b + k][rounds / 2]).substr(0, 5); };
    const std::string name = builds[b].path.substr(builds[b].path.rfind('/') + 1);
    std::printf("%-16s fwd fp32 %s (%.0f GFLOP/s) | fwd bf16 %s | bwd fp32 %s | bwd bf16 %s | sum %016llx\n",
                name.c_str(), mm(0).c_str(), flop / ms[4 * b][0] / 1e6, mm(1).c_str(), mm(2).c_str(),
                mm(3).c_str(), (unsigned long long)sums[b]);
  }
  return 0;
}
