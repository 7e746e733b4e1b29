// Mixture-of-experts expert tiles over vLLM's fused-MoE weights (graph/ops/moe_experts.py).
//
// Both read the router's expert ids after the gate and list the step's chosen experts ascending,
// with the (token, choice) pairs of each in token order (ExpertPairs), so every tile sees the
// same experts in the same order. Only chosen experts' weights are read, each weight row once per
// tile for all the tokens that chose its expert: a warp owns a weight row, each lane 16 bytes of
// it per 256 columns, and keeps one partial sum per token in registers; the partials are reduced
// across the warp in lane order. No floating-point atomics: reruns are bit-identical.
//
// - moe_gate_up_task: tile (column block [c0, c1), slot s of S): experts s, s + S, ... of the
//   list; act[b, j, c] = silu(n_b . w13[e, c]) * (n_b . w13[e, I + c]) with n = RMSNorm(x), staged
//   in shared memory as bf16 like the dense gate/up projection's input.
// - moe_down_task: tile (output columns [c0, c1)): every chosen expert in list order;
//   out[b, h] = residual[b, h] + sum over the token's pairs of weight[b, j] * act[b, j] . w2[e, h],
//   summed per warp in shared memory in list order (no residual: a tensor-parallel rank's part).
#pragma once
#include "common.cuh"

namespace mpk {

// MoEGateUpArgs::k* and MoEDownArgs::k* name the argument words; the generated source declares
// them from the one layout in vllm_mpk/codegen/ops/moe.py.

constexpr int kMoESliceK = kWarp * 8;  // columns one pass of a warp covers: 16 bytes per lane

// The chosen experts of a step and their (token, choice) pairs, in shared memory: experts
// ascending, pairs grouped by expert in list order, tokens ascending within an expert.
template <int B, int K, int E>
struct ExpertPairs {
  int count;              // distinct chosen experts
  int ids[B * K];         // the step's expert ids, [token][choice]
  int rank[E];            // expert -> its place in the list, or -1
  int list[E];            // the chosen experts, ascending
  int offset[E + 1];      // pairs of list[d]: [offset[d], offset[d + 1])
  int token[B * K], choice[B * K];

  static constexpr int bytes() { return (sizeof(ExpertPairs) + 15) / 16 * 16; }

  // Every thread of the block calls it (it synchronises); afterwards every field is set.
  __device__ void gather(const int32_t* expert_ids, int n_tok) {
    const int pairs = n_tok * K;
    for (int i = threadIdx.x; i < E; i += blockDim.x) rank[i] = -1;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) ids[i] = expert_ids[i];
    __syncthreads();
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) rank[ids[i]] = 0;  // chosen: the same value from all
    __syncthreads();
    if (threadIdx.x == 0) {
      int n = 0;
      for (int e = 0; e < E; ++e)
        if (rank[e] == 0) {
          list[n] = e;
          rank[e] = n++;
        }
      count = n;
      for (int d = 0; d <= n; ++d) offset[d] = 0;
      for (int i = 0; i < pairs; ++i) ++offset[rank[ids[i]] + 1];
      for (int d = 0; d < n; ++d) offset[d + 1] += offset[d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
      int before = 0;  // earlier pairs of the same expert: the pair's place within its expert
      for (int p = 0; p < i; ++p) before += ids[p] == ids[i];
      const int at = offset[rank[ids[i]]] + before;
      token[at] = i / K;
      choice[at] = i % K;
    }
    __syncthreads();
  }
};

template <int H, int B, int K, int E>
constexpr int moe_gate_up_smem_bytes() {
  return ExpertPairs<B, K, E>::bytes() + B * H * 2 + B * 4;
}

template <int H, int B, int K, int E, int NT>
__device__ void moe_gate_up_task(const TaskContext& c) {
  static_assert(H % kMoESliceK == 0, "the hidden size must be a multiple of 256");
  constexpr int NW = NT / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_tok = c.num_tokens;
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(MoEGateUpArgs::kInput);
  const __nv_bfloat16* norm_w = c.ptr<const __nv_bfloat16>(MoEGateUpArgs::kNormWeight);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(MoEGateUpArgs::kWeight);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(MoEGateUpArgs::kOutput);
  const int c0 = c.arg(MoEGateUpArgs::kColStart), c1 = c.arg(MoEGateUpArgs::kColEnd);
  const int slot = c.arg(MoEGateUpArgs::kSlot), slots = c.arg(MoEGateUpArgs::kSlots);
  const int inter = c.arg(MoEGateUpArgs::kInter);
  auto* pairs = reinterpret_cast<ExpertPairs<B, K, E>*>(worker_smem());
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(worker_smem() + ExpertPairs<B, K, E>::bytes());  // [B][H]
  float* inv_rms = reinterpret_cast<float*>(xs + B * H);                                               // [B]

  pairs->gather(c.ptr<const int32_t>(MoEGateUpArgs::kExpertIds), n_tok);
  const float eps = c.farg(MoEGateUpArgs::kEps);
  for (int b = warp; b < n_tok; b += NW) {
    float ss = 0.f;
    for (int k = lane * 8; k < H; k += kMoESliceK) {
      float f[8];
      load_bf16<8>(x + (size_t)b * H + k, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
    }
    ss = warp_sum(ss);
    if (lane == 0) inv_rms[b] = rsqrtf(ss / H + eps);
  }
  __syncthreads();
  for (int i = threadIdx.x * 8; i < n_tok * H; i += NT * 8) {
    const int b = i / H, k = i % H;
    float f[8], g[8];
    load_bf16<8>(x + i, f);
    load_bf16<8>(norm_w + k, g);
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] *= inv_rms[b] * g[j];
    *reinterpret_cast<Bf16x8*>(xs + i) = pack(f);
  }
  __syncthreads();

  for (int d = slot; d < pairs->count; d += slots) {
    const int e = pairs->list[d], p0 = pairs->offset[d], np = pairs->offset[d + 1] - p0;
    for (int col = c0 + warp; col < c1; col += NW) {
      const __nv_bfloat16* gate_row = w + ((size_t)e * 2 * inter + col) * H;
      const __nv_bfloat16* up_row = gate_row + (size_t)inter * H;
      float gs[B] = {}, us[B] = {};
      for (int k = lane * 8; k < H; k += kMoESliceK) {
        float gw[8], uw[8];
        const uint4 graw = load_weights(gate_row + k), uraw = load_weights(up_row + k);
        unpack(*reinterpret_cast<const Bf16x8*>(&graw), gw);
        unpack(*reinterpret_cast<const Bf16x8*>(&uraw), uw);
#pragma unroll
        for (int t = 0; t < B; ++t) {
          if (t >= np) break;
          float xv[8];
          unpack(*reinterpret_cast<const Bf16x8*>(xs + pairs->token[p0 + t] * H + k), xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            gs[t] += gw[j] * xv[j];
            us[t] += uw[j] * xv[j];
          }
        }
      }
#pragma unroll
      for (int t = 0; t < B; ++t) {
        if (t >= np) break;
        const float g = warp_sum(gs[t]), u = warp_sum(us[t]);
        const int b = pairs->token[p0 + t], j = pairs->choice[p0 + t];
        if (lane == 0) out[((size_t)b * K + j) * inter + col] = __float2bfloat16_rn(silu(g) * u);
      }
    }
  }
}

template <int NT, int B, int K, int E>
constexpr int moe_down_smem_bytes() {
  return ExpertPairs<B, K, E>::bytes() + NT / kWarp * B * 4;
}

template <int I, int B, int K, int E, int NT>
__device__ void moe_down_task(const TaskContext& c) {
  static_assert(I % kMoESliceK == 0, "the expert width must be a multiple of 256");
  constexpr int NW = NT / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_tok = c.num_tokens;
  const __nv_bfloat16* act = c.ptr<const __nv_bfloat16>(MoEDownArgs::kInput);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(MoEDownArgs::kWeight);
  const float* weights = c.ptr<const float>(MoEDownArgs::kExpertWeights);
  const __nv_bfloat16* residual = c.ptr<const __nv_bfloat16>(MoEDownArgs::kResidual);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(MoEDownArgs::kOutput);
  const int c0 = c.arg(MoEDownArgs::kColStart), c1 = c.arg(MoEDownArgs::kColEnd);
  const int hidden = c.arg(MoEDownArgs::kHidden);
  auto* pairs = reinterpret_cast<ExpertPairs<B, K, E>*>(worker_smem());
  float* sums = reinterpret_cast<float*>(worker_smem() + ExpertPairs<B, K, E>::bytes()) + warp * B;  // this warp's [B]

  pairs->gather(c.ptr<const int32_t>(MoEDownArgs::kExpertIds), n_tok);
  for (int h = c0 + warp; h < c1; h += NW) {
    for (int b = lane; b < B; b += kWarp) sums[b] = 0.f;
    __syncwarp();
    for (int d = 0; d < pairs->count; ++d) {
      const int e = pairs->list[d], p0 = pairs->offset[d], np = pairs->offset[d + 1] - p0;
      const __nv_bfloat16* row = w + ((size_t)e * hidden + h) * I;
      float part[B] = {};
      for (int k = lane * 8; k < I; k += kMoESliceK) {
        float wv[8];
        const uint4 raw = load_weights(row + k);
        unpack(*reinterpret_cast<const Bf16x8*>(&raw), wv);
#pragma unroll
        for (int t = 0; t < B; ++t) {
          if (t >= np) break;
          float av[8];
          const int b = pairs->token[p0 + t], j = pairs->choice[p0 + t];
          load_bf16<8>(act + ((size_t)b * K + j) * I + k, av);
#pragma unroll
          for (int i = 0; i < 8; ++i) part[t] += wv[i] * av[i];
        }
      }
#pragma unroll
      for (int t = 0; t < B; ++t) {
        if (t >= np) break;
        const float s = warp_sum(part[t]);
        const int b = pairs->token[p0 + t], j = pairs->choice[p0 + t];
        if (lane == 0) sums[b] += weights[b * K + j] * s;
      }
      __syncwarp();
    }
    for (int b = lane; b < n_tok; b += kWarp)  // no residual: a tensor-parallel rank's part
      out[(size_t)b * hidden + h] =
          __float2bfloat16_rn(sums[b] + (residual ? __bfloat162float(residual[(size_t)b * hidden + h]) : 0.f));
    __syncwarp();
  }
}

}  // namespace mpk
