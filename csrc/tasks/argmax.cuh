// Greedy sampling in two stages: partial tiles reduce a vocabulary chunk per row to (value, index);
// the reduce tile picks the best partial per row. Ties go to the lowest index, like torch.argmax.
// With several tensor-parallel ranks (kCollective, MPK_WITH_NVSHMEM) every rank's reduce tile first
// pushes its partials into slot `rank` of every PE's gather buffers and signals them (peers.cuh),
// waits for all ranks, then reduces world x partials in rank order: every rank picks the same token.
#pragma once
#include "common.cuh"
#ifdef MPK_WITH_NVSHMEM
#include "../runtime/peers.cuh"
#endif

namespace mpk {

// ArgmaxArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/argmax.py.

__device__ __forceinline__ bool better(float v, int64_t i, float bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

#ifdef MPK_WITH_NVSHMEM
// The reduce tile of a collective argmax: gather every rank's partials (world x partials per row,
// rank-major) into this PE's gather buffers. False when the kernel is stopping.
static __device__ __noinline__ bool gather_partials(const TaskContext& c, const float* pv, const int64_t* pi, int partials) {
  const int world = c.arg(ArgmaxArgs::kWorld), rank = c.arg(ArgmaxArgs::kRank);
  const size_t slot = (size_t)c.arg(ArgmaxArgs::kBatch) * partials;
  char* gv = reinterpret_cast<char*>(launch_half(c.ptr<float>(ArgmaxArgs::kGatherValue), world * slot, c.gate) +
                                     rank * slot);
  char* gi = reinterpret_cast<char*>(launch_half(c.ptr<int64_t>(ArgmaxArgs::kGatherIndex), world * slot, c.gate) +
                                     rank * slot);
  for (int k = 0; k < world; ++k) {
    const int pe = (rank + k) % world;
    push_rows(gv, reinterpret_cast<const char*>(pv), c.num_tokens, partials * 4, partials * 4, partials * 4, pe);
    push_rows(gi, reinterpret_cast<const char*>(pi), c.num_tokens, partials * 8, partials * 8, partials * 8, pe);
  }
  uint64_t* signal = launch_half(c.ptr<uint64_t>(ArgmaxArgs::kSignal), 1, c.gate);
  signal_peers(signal, world, rank);
  return c.gate->wait_peers(signal, 0, static_cast<uint32_t>(world));
}
#endif

template <int NT, typename InT, bool kCollective = false>
__device__ void argmax_task(const TaskContext& c) {
  float* pv = c.ptr<float>(ArgmaxArgs::kPartialValue);
  int64_t* pi = c.ptr<int64_t>(ArgmaxArgs::kPartialIndex);
  const int partials = c.arg(ArgmaxArgs::kPartials);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* sv = reinterpret_cast<float*>(worker_smem());
  int64_t* si = reinterpret_cast<int64_t*>(worker_smem() + 64 * sizeof(float));
  const bool reduce = c.arg(ArgmaxArgs::kStage) == 1;
  const InT* logits = c.ptr<const InT>(ArgmaxArgs::kLogits);
  // The reduce reads `count` partials per row: partial g at (g / per_rank) * slot + row * per_rank + g % per_rank.
  int count = partials, per_rank = partials;
  size_t slot = 0;
  if constexpr (kCollective) {
#ifdef MPK_WITH_NVSHMEM
    if (reduce) {
      if (!gather_partials(c, pv, pi, partials)) return;
      const int world = c.arg(ArgmaxArgs::kWorld);
      count = partials * world;
      slot = (size_t)c.arg(ArgmaxArgs::kBatch) * partials;
      pv = launch_half(c.ptr<float>(ArgmaxArgs::kGatherValue), world * slot, c.gate);  // rank-major
      pi = launch_half(c.ptr<int64_t>(ArgmaxArgs::kGatherIndex), world * slot, c.gate);
    }
#else
    static_assert(!kCollective, "a collective argmax needs a build with MPK_WITH_NVSHMEM");
#endif
  }
  for (int b = 0; b < c.num_tokens; ++b) {
    float best = -INFINITY;
    int64_t idx = INT64_MAX;
    if (reduce) {
      for (int g = threadIdx.x; g < count; g += NT) {
        const size_t at = (g / per_rank) * slot + (size_t)b * per_rank + g % per_rank;
        const float v = __ldcg(pv + at);  // L2: another worker (or GPU) wrote it in this launch
        const int64_t i = __ldcg(reinterpret_cast<const long long*>(pi) + at);
        if (better(v, i, best, idx)) best = v, idx = i;
      }
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
