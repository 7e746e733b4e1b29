// All-reduce of a column block. With one rank it is a copy; the NVSHMEM path for several ranks
// is not built yet, and codegen refuses plans with world_size > 1.
#pragma once
#include "common.cuh"

namespace mpk {

struct AllReduceArgs {
  enum { kInput, kOutput, kColStart, kColEnd, kWidth };
};

template <int NT>
__device__ void allreduce_task(const TaskContext& c) {
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(AllReduceArgs::kInput);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(AllReduceArgs::kOutput);
  const int c0 = c.arg(AllReduceArgs::kColStart), width = c.arg(AllReduceArgs::kColEnd) - c0;
  const int stride = c.arg(AllReduceArgs::kWidth);
  for (int i = threadIdx.x; i < c.num_tokens * width; i += NT) {
    const size_t at = (size_t)(i / width) * stride + c0 + i % width;
    out[at] = x[at];
  }
}

}  // namespace mpk
