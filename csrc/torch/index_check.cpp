// The permutation check of rsir_kernels.ops (check_index=True) for indexes in CPU memory: one
// pass per row with a byte per token, rows in parallel, instead of the five tensor ops (range
// test, scatter into a bool tensor, reductions) that the device-generic check runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

namespace rsir_ext {
namespace {

// Whether row[0 .. L) holds every token 0 .. L-1 exactly once (seen: L bytes of scratch).
template <class I>
bool is_permutation(const I* row, int64_t L, std::vector<uint8_t>& seen) {
  seen.assign((size_t)L, 0);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t x = (int64_t)row[t];
    if (x < 0 || x >= L || seen[(size_t)x]) return false;
    seen[(size_t)x] = 1;
  }
  return true;  // L distinct values in 0 .. L-1
}

// The first row b * G + g of a (B, G, L) int32 / int64 index that is not a permutation of
// 0 .. L-1, or -1 when every row is one.
int64_t first_bad_index_row(const at::Tensor& index) {
  TORCH_CHECK(index.device().is_cpu(), "rsir_ext::first_bad_index_row: index must be in CPU memory, got ",
              index.device());
  TORCH_CHECK(index.dim() == 3, "rsir_ext::first_bad_index_row: index must be (B, G, L), got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "rsir_ext::first_bad_index_row: index must be int32 or int64, got ", index.scalar_type());
  const at::Tensor idx = index.contiguous();
  const int64_t rows = idx.size(0) * idx.size(1), L = idx.size(2);
  std::atomic<int64_t> first{rows};
  auto check_rows = [&](auto* data) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> seen;
      for (int64_t r = begin; r < end && r < first.load(std::memory_order_relaxed); ++r) {
        if (is_permutation(data + r * L, L, seen)) continue;
        int64_t cur = first.load();
        while (r < cur && !first.compare_exchange_weak(cur, r)) {
        }
        return;
      }
    });
  };
  if (idx.scalar_type() == at::kLong)
    check_rows(idx.data_ptr<int64_t>());
  else
    check_rows(idx.data_ptr<int32_t>());
  const int64_t bad = first.load();
  return bad == rows ? -1 : bad;
}

}  // namespace
}  // namespace rsir_ext

TORCH_LIBRARY_FRAGMENT(rsir_ext, m) { m.def("first_bad_index_row(Tensor index) -> int"); }

TORCH_LIBRARY_IMPL(rsir_ext, CPU, m) { m.impl("first_bad_index_row", &rsir_ext::first_bad_index_row); }
