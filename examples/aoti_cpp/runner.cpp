// Runs an AOTInductor package of an RSIR model from C++, no Python: loads the ops library (the
// package calls its rsir_ext ops through AOTInductor's proxy executor, which finds them in the
// dispatcher), then the package, and prints the logits.
//
//   runner <librsir_ops.so> <model.pt2> <images.pt> [repeats]
//
// images.pt: one tensor saved by Python's torch.save. Prints the output's shape, then one row of
// logits per line ("%.9g": float32 values round-trip exactly); with repeats > 0, then the mean
// time per call in ms over that many calls after one warm-up call.
//
// Exit status, with one line on stderr for each failure:
//   0  the logits printed
//   1  the ops library, the images or the package could not be loaded
//   2  usage
//   3  the package refused the images or failed on them: a package of rsir_kernels.deploy
//      refuses a shape it was not built for ("this package takes (B, 3, 64, 64) with B >= 1;
//      got (1, 3, 96, 96)"), as from Python
#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace {

// The first line of an exception's message (c10::Error's what() appends a backtrace).
std::string first_line(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  const std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
  return what.substr(0, what.find('\n'));
}

// loader.run with std::cerr held back: on a failure the package's runtime prints
// "Error: <message>" there besides throwing it, and the runner prints one line of its own.
std::vector<at::Tensor> run(torch::inductor::AOTIModelPackageLoader& loader, const at::Tensor& images) {
  std::ostringstream held;
  std::streambuf* const stderr_buffer = std::cerr.rdbuf(held.rdbuf());
  try {
    std::vector<at::Tensor> outputs = loader.run({images});
    std::cerr.rdbuf(stderr_buffer);
    return outputs;
  } catch (...) {
    std::cerr.rdbuf(stderr_buffer);
    throw;
  }
}

}  // namespace

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
  const int repeats = argc > 4 ? std::stoi(argv[4]) : 0;
  at::Tensor images;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    std::ifstream file(argv[3], std::ios::binary);
    if (!file) throw std::runtime_error(std::string("can't open ") + argv[3]);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    images = torch::jit::pickle_load(bytes).toTensor();
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "can't load the images or the package: %s\n", first_line(e).c_str());
    return 1;
  }

  c10::InferenceMode no_autograd;
  at::Tensor logits;
  try {
    logits = run(*loader, images)[0].contiguous().to(at::kFloat);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "the package failed: %s\n", first_line(e).c_str());
    return 3;
  }

  std::printf("shape %lld %lld\n", static_cast<long long>(logits.size(0)), static_cast<long long>(logits.size(1)));
  const float* row = logits.data_ptr<float>();
  for (int64_t i = 0; i < logits.size(0); ++i, row += logits.size(1)) {
    for (int64_t j = 0; j < logits.size(1); ++j) std::printf(j ? " %.9g" : "%.9g", row[j]);
    std::printf("\n");
  }
  if (repeats > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) loader->run({images});
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    std::printf("ms_per_call %.4f\n", took.count() / repeats);
  }
  return 0;
}
