// Mixture-of-experts routing (graph/ops/moe_topk.py): per row, softmax over E router logits, the
// top K experts in descending weight order (equal weights: the lower id first) and their weights,
// renormalised to sum to 1 when the normalize word is set. A warp owns a row: lane l holds experts
// l, l + 32, ..., and each of the K rounds picks the best expert not yet taken with one warp
// reduction, so the result does not depend on timing.
#pragma once
#include "common.cuh"

namespace mpk {

// MoETopKArgs::k* name the argument words; the generated source declares them from the one layout
// in vllm_mpk/codegen/ops/moe.py.

constexpr int kMaxRouterExperts = 1024;  // 32 per lane: one bit each in a lane's taken mask

// (value, index) of the better of two candidates: the larger value, on a tie the lower index.
__device__ __forceinline__ void better_of(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename InT, int E, int K, int NT>
__device__ void moe_topk_task(const TaskContext& c) {
  static_assert(E <= kMaxRouterExperts && K <= E, "experts per router");
  constexpr int NW = NT / kWarp, PER_LANE = (E + kWarp - 1) / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const InT* logits = c.ptr<const InT>(MoETopKArgs::kInput);
  int32_t* ids = c.ptr<int32_t>(MoETopKArgs::kExpertIds);
  float* weights = c.ptr<float>(MoETopKArgs::kExpertWeights);
  const bool normalize = c.arg(MoETopKArgs::kNormalize) != 0;
  const int end = min(c.arg(MoETopKArgs::kRowEnd), c.num_tokens);
  for (int b = c.arg(MoETopKArgs::kRowStart) + warp; b < end; b += NW) {
    float v[PER_LANE];
    float top = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + i * kWarp;
      v[i] = e < E ? to_float(logits[(size_t)b * E + e]) : -INFINITY;
      top = fmaxf(top, v[i]);
    }
    top = warp_max(top);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      v[i] = lane + i * kWarp < E ? __expf(v[i] - top) : -1.f;  // probabilities up to 1/sum; -1: no expert
      sum += fmaxf(v[i], 0.f);
    }
    sum = warp_sum(sum);
    uint32_t taken = 0;
    float chosen_w[K];
    int chosen_id[K];
    float picked = 0.f;
#pragma unroll
    for (int r = 0; r < K; ++r) {
      float best = -2.f;
      int idx = E;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i)
        if (!(taken >> i & 1u)) better_of(best, idx, v[i], lane + i * kWarp);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        better_of(best, idx, ob, oi);
      }
      if (idx % kWarp == lane) taken |= 1u << (idx / kWarp);
      chosen_w[r] = best / sum;
      chosen_id[r] = idx;
      picked += chosen_w[r];
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < K; ++r) {
        ids[(size_t)b * K + r] = chosen_id[r];
        weights[(size_t)b * K + r] = normalize ? chosen_w[r] / picked : chosen_w[r];
      }
    }
  }
}

}  // namespace mpk
