// Runs an AOTInductor package of an RSIR model from C++, no Python: loads the ops library (the
// package calls its rsir_ext ops through AOTInductor's proxy executor, which finds them in the
// dispatcher), then the package, and prints the logits.
//
//   runner <librsir_ops.so> <model.pt2> <images.pt> [repeats]
//
// images.pt: one tensor saved by Python's torch.save. Prints the output's shape, then one row of
// logits per line ("%.9g": float32 values round-trip exactly); with repeats > 0, then the mean
// time per call in ms over that many calls after one warm-up call.
#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s <librsir_ops.so> <model.pt2> <images.pt> [repeats]\n", argv[0]);
    return 2;
  }
  // RTLD_GLOBAL is not needed: its static initializers register the ops with the dispatcher
  if (!dlopen(argv[1], RTLD_NOW)) {
    std::fprintf(stderr, "can't load the ops library: %s\n", dlerror());
    return 1;
  }
  std::ifstream file(argv[3], std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const at::Tensor images = torch::jit::pickle_load(bytes).toTensor();
  const int repeats = argc > 4 ? std::stoi(argv[4]) : 0;

  c10::InferenceMode no_autograd;
  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  const at::Tensor logits = loader.run({images})[0].contiguous().to(at::kFloat);

  std::printf("shape %lld %lld\n", static_cast<long long>(logits.size(0)), static_cast<long long>(logits.size(1)));
  const float* row = logits.data_ptr<float>();
  for (int64_t i = 0; i < logits.size(0); ++i, row += logits.size(1)) {
    for (int64_t j = 0; j < logits.size(1); ++j) std::printf(j ? " %.9g" : "%.9g", row[j]);
    std::printf("\n");
  }
  if (repeats > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) loader.run({images});
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    std::printf("ms_per_call %.4f\n", took.count() / repeats);
  }
  return 0;
}
