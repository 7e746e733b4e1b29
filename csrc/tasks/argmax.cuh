// Greedy sampling in two stages: partial tiles reduce a vocabulary chunk per row to (value, index);
// the reduce tile picks the best partial per row. Ties go to the lowest index, like torch.argmax.
#pragma once
#include "common.cuh"

namespace mpk {

struct ArgmaxArgs {
  enum { kLogits, kPartialValue, kPartialIndex, kOutput, kStage, kVocabBegin, kVocabEnd, kSlot, kPartials,
         kVocabOffset, kLogitsStride };
};

__device__ __forceinline__ bool better(float v, int64_t i, float bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

template <int NT, typename InT>
__device__ void argmax_task(const TaskContext& c) {
  float* pv = c.ptr<float>(ArgmaxArgs::kPartialValue);
  int64_t* pi = c.ptr<int64_t>(ArgmaxArgs::kPartialIndex);
  const int partials = c.arg(ArgmaxArgs::kPartials);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* sv = reinterpret_cast<float*>(c.smem);
  int64_t* si = reinterpret_cast<int64_t*>(c.smem + 64 * sizeof(float));
  const bool reduce = c.arg(ArgmaxArgs::kStage) == 1;
  const InT* logits = c.ptr<const InT>(ArgmaxArgs::kLogits);
  for (int b = 0; b < c.num_tokens; ++b) {
    float best = -INFINITY;
    int64_t idx = INT64_MAX;
    if (reduce) {
      for (int g = threadIdx.x; g < partials; g += NT)
        if (better(pv[b * partials + g], pi[b * partials + g], best, idx)) best = pv[b * partials + g], idx = pi[b * partials + g];
    } else {
      const int64_t offset = c.arg(ArgmaxArgs::kVocabOffset);
      for (int v = c.arg(ArgmaxArgs::kVocabBegin) + threadIdx.x; v < c.arg(ArgmaxArgs::kVocabEnd); v += NT) {
        const float x = to_float(logits[(size_t)b * c.arg(ArgmaxArgs::kLogitsStride) + v]);
        if (better(x, v + offset, best, idx)) best = x, idx = v + offset;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (better(ov, oi, best, idx)) best = ov, idx = oi;
    }
    __syncthreads();
    if (lane == 0) sv[warp] = best, si[warp] = idx;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < NT / kWarp; ++w)
        if (better(sv[w], si[w], best, idx)) best = sv[w], idx = si[w];
      if (reduce) {
        c.ptr<int64_t>(ArgmaxArgs::kOutput)[b] = idx;
      } else {
        pv[b * partials + c.arg(ArgmaxArgs::kSlot)] = best;
        pi[b * partials + c.arg(ArgmaxArgs::kSlot)] = idx;
      }
    }
  }
}

}  // namespace mpk
