// RMSNorm of whole rows with an optional fused residual add (h = x + residual, written out).
#pragma once
#include "common.cuh"

namespace mpk {

// RMSNormArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/rmsnorm.py.

template <int NT>
__device__ void rmsnorm_task(const TaskContext& c) {
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(RMSNormArgs::kInput);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(RMSNormArgs::kWeight);
  const __nv_bfloat16* res = c.ptr<const __nv_bfloat16>(RMSNormArgs::kResidual);
  __nv_bfloat16* res_out = c.ptr<__nv_bfloat16>(RMSNormArgs::kResidualOutput);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(RMSNormArgs::kOutput);
  const int hidden = c.arg(RMSNormArgs::kHidden);
  const float eps = c.farg(RMSNormArgs::kEps);
  float* scratch = reinterpret_cast<float*>(worker_smem());
  const int end = min(c.arg(RMSNormArgs::kRowEnd), c.num_tokens);
  for (int b = c.arg(RMSNormArgs::kRowStart); b < end; ++b) {
    float ss = 0.f;
    for (int k = threadIdx.x; k < hidden; k += NT) {
      float h = __bfloat162float(x[(size_t)b * hidden + k]);
      if (res) {
        h += __bfloat162float(res[(size_t)b * hidden + k]);
        res_out[(size_t)b * hidden + k] = __float2bfloat16_rn(h);
      }
      ss += h * h;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int k = threadIdx.x; k < hidden; k += NT) {
      float h = __bfloat162float(x[(size_t)b * hidden + k]);
      if (res) h += __bfloat162float(res[(size_t)b * hidden + k]);
      out[(size_t)b * hidden + k] = __float2bfloat16_rn(h * inv * __bfloat162float(w[k]));
    }
  }
}

}  // namespace mpk
