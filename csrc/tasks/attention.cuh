// Paged GQA decode attention for one KV head and a range of requests: q/k RMSNorm (Qwen3),
// neox RoPE from cos_sin_cache, the new k/v written into vLLM's packed K|V cache at the request's
// slot, then a softmax pass over the request's cached positions, NT positions per chunk.
//
// In a chunk every thread scores one position (its whole K row against each query head of the
// group, q read from shared memory), so no reduction sits between a K load and its score; the
// block agrees on one running maximum per head, and each warp then accumulates P·V over its 32
// positions with each lane owning HD/32 dims. One shared maximum makes the warps' partial sums
// add up without rescaling. The cached positions are requested into L2 before the task's q/k/v
// inputs are ready.
#pragma once
#include "common.cuh"

namespace mpk {

struct AttentionArgs {
  enum {
    kQkv, kCache, kRope, kPositions, kSeqLens, kBlockTables, kSlots, kQNorm, kKNorm, kOutput,
    kHead, kRowStart, kRowEnd, kBlockStride, kHeadStride, kSlotStride, kTableStride, kEps, kScale
  };
};

// Shared memory of attention_task, in floats: the group's q heads, k and v; one chunk's
// probabilities [GROUP][NT]; per-warp maxima and sums [2][NW][GROUP]; per-warp P·V [NW][GROUP][HD].
template <int HD, int GROUP, int NT>
struct AttentionSmem {
  static constexpr int kWarps = NT / kWarp;
  static constexpr int kVec = 0, kProbs = kVec + (GROUP + 2) * HD, kWarpMax = kProbs + GROUP * NT,
                       kWarpSum = kWarpMax + kWarps * GROUP, kPartial = kWarpSum + kWarps * GROUP,
                       kFloats = kPartial + kWarps * GROUP * HD;
};

template <int HD, int GROUP, int NT>
constexpr int attention_smem_bytes() {
  return AttentionSmem<HD, GROUP, NT>::kFloats * 4;
}

template <int HD>
__device__ __forceinline__ void rms_normalize_vec(float* v, const __nv_bfloat16* weight, float eps, int lane) {
  float ss = 0.f;
  for (int i = lane; i < HD; i += kWarp) ss += v[i] * v[i];
  const float inv = rsqrtf(warp_sum(ss) / HD + eps);
  for (int i = lane; i < HD; i += kWarp) v[i] = v[i] * inv * __bfloat162float(weight[i]);
  __syncwarp();
}

template <int HD, typename RopeT>
__device__ __forceinline__ void rotate(float* v, const RopeT* cos_sin, int lane) {
  for (int i = lane; i < HD / 2; i += kWarp) {
    const float cs = to_float(cos_sin[i]), sn = to_float(cos_sin[HD / 2 + i]);
    const float x1 = v[i], x2 = v[HD / 2 + i];
    v[i] = x1 * cs - x2 * sn;
    v[HD / 2 + i] = x2 * cs + x1 * sn;
  }
  __syncwarp();
}

// Position p's packed K|V row of one KV head, through the request's block table.
template <int PAGE>
__device__ __forceinline__ const __nv_bfloat16* cached_row(const __nv_bfloat16* head_cache, const int* table, int p,
                                                            int64_t block_stride, int64_t slot_stride) {
  return head_cache + (int64_t)table[p / PAGE] * block_stride + (p % PAGE) * slot_stride;
}

template <int HD, int GROUP, int NQ, int NKV, int PAGE, bool QK_NORM, int NT, typename RopeT>
__device__ __noinline__ void attention_task(const TaskContext& c) {
  static_assert(HD % kWarp == 0, "head_dim must be a multiple of 32");
  static_assert(NT % kWarp == 0, "whole warps");
  constexpr int NW = NT / kWarp, D = HD / kWarp, QKV_W = (NQ + 2 * NKV) * HD;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int head = c.arg(AttentionArgs::kHead);
  const float eps = c.farg(AttentionArgs::kEps), scale = c.farg(AttentionArgs::kScale);
  const __nv_bfloat16* qkv = c.ptr<const __nv_bfloat16>(AttentionArgs::kQkv);
  __nv_bfloat16* cache = c.ptr<__nv_bfloat16>(AttentionArgs::kCache);
  const RopeT* rope = c.ptr<const RopeT>(AttentionArgs::kRope);
  const int64_t* positions = c.ptr<const int64_t>(AttentionArgs::kPositions);
  const int* seq_lens = c.ptr<const int>(AttentionArgs::kSeqLens);
  const int* tables = c.ptr<const int>(AttentionArgs::kBlockTables);
  const int64_t* slots = c.ptr<const int64_t>(AttentionArgs::kSlots);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(AttentionArgs::kOutput);
  const int64_t block_stride = c.arg(AttentionArgs::kBlockStride), head_stride = c.arg(AttentionArgs::kHeadStride);
  const int64_t slot_stride = c.arg(AttentionArgs::kSlotStride);
  const int table_stride = c.arg(AttentionArgs::kTableStride);
  __nv_bfloat16* head_cache = cache + head * head_stride;
  using Smem = AttentionSmem<HD, GROUP, NT>;
  float* smem = reinterpret_cast<float*>(c.smem);
  float* vec = smem + Smem::kVec;  // [GROUP + 2][HD]: q heads, k, v
  float* probs = smem + Smem::kProbs;
  float* warp_max_of = smem + Smem::kWarpMax;
  float* warp_sum_of = smem + Smem::kWarpSum;
  float* partial = smem + Smem::kPartial;

  const int row_start = c.arg(AttentionArgs::kRowStart), row_end = c.arg(AttentionArgs::kRowEnd);
  // Before the inputs are ready: the KV history was written by earlier steps and the block tables
  // are step inputs, so ask L2 for every cached position of this head while the q/k/v tiles run.
  for (int b = row_start; b < row_end && b < c.num_tokens; ++b) {
    const int* table = tables + (size_t)b * table_stride;
    for (int pos = threadIdx.x; pos < seq_lens[b] - 1; pos += NT) {
      const __nv_bfloat16* kv = cached_row<PAGE>(head_cache, table, pos, block_stride, slot_stride);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(kv), "r"(2 * HD * 2) : "memory");
    }
  }
  if (!c.inputs_ready()) return;

  for (int b = row_start; b < row_end; ++b) {
    const int seq_len = b < c.num_tokens ? seq_lens[b] : 0;
    if (seq_len <= 0) continue;
    __syncthreads();
    const __nv_bfloat16* row = qkv + (size_t)b * QKV_W;
    for (int i = threadIdx.x; i < (GROUP + 2) * HD; i += NT) {
      const int v = i / HD, d = i % HD;
      const int col = v < GROUP ? (head * GROUP + v) * HD : v == GROUP ? (NQ + head) * HD : (NQ + NKV + head) * HD;
      vec[i] = __bfloat162float(row[col + d]);
    }
    __syncthreads();
    const RopeT* cos_sin = rope + positions[b] * HD;
    for (int v = warp; v <= GROUP; v += NW) {  // the group's q heads and k: norm, then rotate
      if constexpr (QK_NORM)
        rms_normalize_vec<HD>(vec + v * HD, c.ptr<const __nv_bfloat16>(
                                  v < GROUP ? AttentionArgs::kQNorm : AttentionArgs::kKNorm), eps, lane);
      rotate<HD>(vec + v * HD, cos_sin, lane);
    }
    __syncthreads();
    const int64_t slot = slots[b];
    if (slot >= 0) {
      __nv_bfloat16* dst = head_cache + (slot / PAGE) * block_stride + (slot % PAGE) * slot_stride;
      for (int i = threadIdx.x; i < 2 * HD; i += NT) dst[i] = __float2bfloat16_rn(vec[GROUP * HD + i]);
    }
    __syncthreads();  // the new k/v are read back below like every other position

    const int* table = tables + (size_t)b * table_stride;
    auto position = [&](int p) { return cached_row<PAGE>(head_cache, table, p, block_stride, slot_stride); };
    float m[GROUP], l[GROUP], acc[GROUP][D];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    }
    for (int base = 0; base < seq_len; base += NT) {
      // This thread's position: its K row, all loads in flight before the first product.
      const int p = base + threadIdx.x;
      float score[GROUP];
      if (p < seq_len) {
        const __nv_bfloat16* k = position(p);
        Bf16x8 raw[HD / 8];
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) raw[i] = reinterpret_cast<const Bf16x8*>(k)[i];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) score[g] = 0.f;
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) {
          float f[8];
          unpack(raw[i], f);
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            const float4 q0 = reinterpret_cast<const float4*>(vec + g * HD)[2 * i];
            const float4 q1 = reinterpret_cast<const float4*>(vec + g * HD)[2 * i + 1];
            score[g] += q0.x * f[0] + q0.y * f[1] + q0.z * f[2] + q0.w * f[3] +
                        q1.x * f[4] + q1.y * f[5] + q1.z * f[6] + q1.w * f[7];
          }
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) score[g] *= scale;
      } else {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) score[g] = -INFINITY;
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float wm = warp_max(score[g]);
        if (lane == 0) warp_max_of[warp * GROUP + g] = wm;
      }
      __syncthreads();
      // One running maximum for the whole block: every thread derives the same one.
      float corr[GROUP];
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float chunk_max = -INFINITY;
        for (int w = 0; w < NW; ++w) chunk_max = fmaxf(chunk_max, warp_max_of[w * GROUP + g]);
        const float m_new = fmaxf(m[g], chunk_max);
        corr[g] = __expf(m[g] - m_new);
        m[g] = m_new;
        const float e = p < seq_len ? __expf(score[g] - m_new) : 0.f;
        probs[g * NT + threadIdx.x] = e;
        const float ws = warp_sum(e);
        if (lane == 0) warp_sum_of[warp * GROUP + g] = ws;
      }
      __syncthreads();
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float chunk_sum = 0.f;
        for (int w = 0; w < NW; ++w) chunk_sum += warp_sum_of[w * GROUP + g];
        l[g] = l[g] * corr[g] + chunk_sum;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[g][d] *= corr[g];
      }
      // P·V over this warp's 32 positions of the chunk (their probabilities came from this warp).
      const int first = base + warp * kWarp, count = min(kWarp, seq_len - first);
#pragma unroll 8
      for (int j = 0; j < count; ++j) {
        float v[D];
        load_bf16<D>(position(first + j) + HD + lane * D, v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float e = probs[g * NT + warp * kWarp + j];
#pragma unroll
          for (int d = 0; d < D; ++d) acc[g][d] += e * v[d];
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int d = 0; d < D; ++d) partial[(warp * GROUP + g) * HD + lane * D + d] = acc[g][d];
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {  // g known at compile time: l stays in registers
      for (int d = threadIdx.x; d < HD; d += NT) {
        float num = 0.f;
        for (int w = 0; w < NW; ++w) num += partial[(w * GROUP + g) * HD + d];
        out[(size_t)b * NQ * HD + (head * GROUP + g) * HD + d] = __float2bfloat16_rn(num / l[g]);
      }
    }
  }
}

}  // namespace mpk
