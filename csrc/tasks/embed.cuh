// Embedding lookup for a block of columns; ids outside this rank's vocabulary shard give zeros.
#pragma once
#include "common.cuh"

namespace mpk {

// EmbedArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/embed.py.

template <int NT>
__device__ void embed_task(const TaskContext& c) {
  const int* ids = c.ptr<const int>(EmbedArgs::kIds);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(EmbedArgs::kWeight);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(EmbedArgs::kOutput);
  const int c0 = c.arg(EmbedArgs::kColStart), width = c.arg(EmbedArgs::kColEnd) - c0;
  const int hidden = c.arg(EmbedArgs::kHidden), rows = c.arg(EmbedArgs::kVocabRows);
  for (int i = threadIdx.x * 8; i < c.num_tokens * width; i += NT * 8) {
    const int b = i / width, col = c0 + i % width;
    const int local = ids[b] - c.arg(EmbedArgs::kVocabStart);
    Bf16x8 v{};
    if (local >= 0 && local < rows) v = *reinterpret_cast<const Bf16x8*>(w + (size_t)local * hidden + col);
    *reinterpret_cast<Bf16x8*>(out + (size_t)b * hidden + col) = v;
  }
}

}  // namespace mpk
