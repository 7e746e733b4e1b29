// Linear tiles: out[b, c0:c1] = f(x[b]) . W[c0:c1]^T (+ bias) (+ residual), with f one of
// identity, RMSNorm (rmsnorm_linear) or SiLU-mul over [gate | up] (silu_mul_linear_with_residual).
//
// The input rows are staged in shared memory in chunks of KC columns (as bf16, after f); each warp
// owns R output rows per pass and streams their weights with 16-byte loads, accumulating all B
// batch rows in registers. Rows past num_tokens are staged as zeros and never written.
#pragma once
#include "common.cuh"

namespace mpk {

enum class LinearMode : int { kPlain = 0, kResidual = 1, kNorm = 2, kSiluResidual = 3 };

// Argument words of a linear record (order fixed by vllm_mpk/codegen/tables.py).
struct LinearArgs {
  enum { kInput, kWeight, kOutput, kBias, kResidual, kNormWeight, kColStart, kColEnd, kEps, kOutStride };
};

constexpr int kLinearStageBytes = 64 * 1024;

template <int K, int B>
constexpr int linear_chunk() {
  constexpr int fit = (kLinearStageBytes / (B * 2)) / 256 * 256;
  return K < fit ? K : (fit < 256 ? 256 : fit);
}

template <int K, int B>
constexpr int linear_smem_bytes() { return B * linear_chunk<K, B>() * 2 + B * 4; }

template <LinearMode MODE, int K, int B, int NT, typename OutT>
__device__ void linear_task(const TaskContext& c) {
  static_assert(K % 256 == 0, "the reduction dim must be a multiple of 256");
  constexpr int KC = linear_chunk<K, B>();
  constexpr int R = 4;
  constexpr int NW = NT / kWarp;
  constexpr int XW = MODE == LinearMode::kSiluResidual ? 2 * K : K;  // input row width
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n_tok = c.num_tokens;
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(LinearArgs::kInput);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(LinearArgs::kWeight);
  const __nv_bfloat16* bias = c.ptr<const __nv_bfloat16>(LinearArgs::kBias);
  const __nv_bfloat16* residual = c.ptr<const __nv_bfloat16>(LinearArgs::kResidual);
  const __nv_bfloat16* norm_w = c.ptr<const __nv_bfloat16>(LinearArgs::kNormWeight);
  OutT* out = c.ptr<OutT>(LinearArgs::kOutput);
  const int c0 = c.arg(LinearArgs::kColStart), c1 = c.arg(LinearArgs::kColEnd);
  const int out_stride = c.arg(LinearArgs::kOutStride);
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(c.smem);  // [B][KC]
  float* inv_rms = reinterpret_cast<float*>(c.smem + B * KC * 2);  // [B]

  if constexpr (MODE == LinearMode::kNorm) {
    const float eps = c.farg(LinearArgs::kEps);
    for (int b = warp; b < B; b += NW) {
      float ss = 0.f;
      if (b < n_tok) {
        for (int k = lane * 8; k < K; k += kWarp * 8) {
          float f[8];
          unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)b * XW + k), f);
#pragma unroll
          for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
        }
      }
      ss = warp_sum(ss);
      if (lane == 0) inv_rms[b] = rsqrtf(ss / K + eps);
    }
  }

  // Stage x[:, k0:k0 + kc] (kc = KC except for a shorter last chunk) into xs[b][0:kc].
  auto stage = [&](int k0, int kc) {
    __syncthreads();
    for (int idx = threadIdx.x * 8; idx < B * KC; idx += NT * 8) {
      const int b = idx / KC, kk = idx % KC, k = k0 + kk;
      float f[8];
      if (kk >= kc) continue;
      if (b >= n_tok) {
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = 0.f;
      } else if constexpr (MODE == LinearMode::kSiluResidual) {
        float g[8], u[8];
        unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)b * XW + k), g);
        unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)b * XW + K + k), u);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
      } else {
        unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)b * XW + k), f);
        if constexpr (MODE == LinearMode::kNorm) {
          float nw[8];
          unpack(*reinterpret_cast<const Bf16x8*>(norm_w + k), nw);
#pragma unroll
          for (int i = 0; i < 8; ++i) f[i] *= inv_rms[b] * nw[i];
        }
      }
      *reinterpret_cast<Bf16x8*>(xs + b * KC + kk) = pack(f);
    }
    __syncthreads();
  };

  for (int rb = c0; rb < c1; rb += NW * R) {
    float acc[R][B];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
    const int row0 = rb + warp * R;
    for (int k0 = 0; k0 < K; k0 += KC) {
      const int kc = K - k0 < KC ? K - k0 : KC;
      if (KC < K || rb == c0) stage(k0, kc);
      // U independent 16-byte weight loads per row in flight before the first multiply.
      constexpr int U = 4;
      for (int kk0 = lane * 8; kk0 < kc; kk0 += U * kWarp * 8) {
        Bf16x8 raw[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int r = 0; r < R; ++r)
            raw[u][r] = (row0 + r < c1 && kk0 + u * kWarp * 8 < kc)
                            ? load_stream(w + (size_t)(row0 + r) * K + k0 + kk0 + u * kWarp * 8)
                            : Bf16x8{};
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int kk = kk0 + u * kWarp * 8;
          if (kk >= kc) break;
          float wf[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r) unpack(raw[u][r], wf[r]);
#pragma unroll
          for (int b = 0; b < B; ++b) {
            float xf[8];
            unpack(*reinterpret_cast<const Bf16x8*>(xs + b * KC + kk), xf);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[r][b] += wf[r][i] * xf[i];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = row0 + r;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float v = warp_sum(acc[r][b]);
        if (lane == 0 && row < c1 && b < n_tok) {
          if (bias) v += __bfloat162float(bias[row]);
          if constexpr (MODE == LinearMode::kResidual || MODE == LinearMode::kSiluResidual)
            v += __bfloat162float(residual[(size_t)b * out_stride + row]);
          out[(size_t)b * out_stride + row] = from_float<OutT>(v);
        }
      }
    }
  }
}

}  // namespace mpk
