// Facts about this build of the ops library, as ops: Python and C++ callers read them from
// the loaded library itself, with no Python module.
#include <string>

#include <torch/library.h>

#include "kernels/cpu/window_attention_cpu.h"

TORCH_LIBRARY_FRAGMENT(rsir_ext, m) {
  // the CPU kernel build the dispatcher picked on this machine (RSIR_CPU_ISA caps it)
  m.def("cpu_isa() -> str", [] { return std::string(rsir::cpu::isa_name()); });
}
