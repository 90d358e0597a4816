// Torch-free CPU core of the window attention (forward and backward).
//
// Work item = (batch b, head group g, window w): all heads of group g share the window's
// token indices, so each item reads its slice of `index` once. Items never write the same
// row (each token sits in exactly one window per group), so any split of [0, num_items)
// over threads gives bitwise identical results: the caller drives run_forward /
// run_backward from its own thread pool (the torch binding uses at::parallel_for).
#pragma once

#include <cstdint>

#include "rsir/params.h"

namespace rsir {
namespace cpu {

// B * G * ceil(L / N): the range of work items.
int64_t num_work_items(const WindowAttentionParams& p);

// Forward: writes out and lse for the tokens of items [begin, end).
void run_forward(const WindowAttentionParams& p, int64_t begin, int64_t end);

// Backward: reads dout (lse and out are not read: P is recomputed from the scores exactly as
// the forward made it); writes dq, dk, dv for the tokens of items [begin, end).
void run_backward(const WindowAttentionParams& p, int64_t begin, int64_t end);

// The instruction set the dispatcher picked on this machine ("avx2+fma", "generic", ...).
const char* isa_name();

// Per-thread scratch of at least `bytes` bytes, 64-byte aligned, reused across calls (grown
// as needed; released when run_forward / run_backward return if above 16 MiB, else when the
// thread exits). Used by the kernel translation units.
void* thread_scratch(int64_t bytes);

// Bytes of scratch the calling thread holds now (the accounting behind the bound above).
int64_t thread_scratch_bytes();

}  // namespace cpu
}  // namespace rsir
