// Paged GQA decode attention for one KV head and a range of requests: q/k RMSNorm (Qwen3),
// neox RoPE from cos_sin_cache, the new k/v written into vLLM's packed K|V cache at the request's
// slot, then an online-softmax pass over the request's cached positions.
//
// Split KV (SPLITS > 1): the task is split `split` of SPLITS over each request's positions
// [L * split / SPLITS, L * (split + 1) / SPLITS); it writes a partial (the unnormalised sum, the
// maximum and the sum of weights per query head) that attention_merge_task combines. Only the last
// split, whose range ends at the new token, writes the new k/v.
//
// Warps split the positions; each lane owns HD/32 dims of every query head of the group, so one
// warp reduction per head and position gives the score. Warp partials merge in shared memory.
// The cached positions are requested into L2 before the task's q/k/v inputs are ready.
#pragma once
#include "common.cuh"

namespace mpk {

struct AttentionArgs {
  enum {
    kQkv, kCache, kRope, kPositions, kSeqLens, kBlockTables, kSlots, kQNorm, kKNorm, kOutput,
    kHead, kRowStart, kRowEnd, kBlockStride, kHeadStride, kSlotStride, kTableStride, kEps, kScale, kSplit, kPartial
  };
};

template <int HD, int GROUP, int NT>
constexpr int attention_smem_bytes() {
  return ((GROUP + 2) * HD + (NT / kWarp) * GROUP * (HD + 2)) * 4;
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

// Combines COUNT online-softmax partials at p, p + stride, ...: each holds its unnormalised sum
// of weighted values at [0, HD), then its maximum score at [HD] and its sum of weights at [HD + 1];
// one that saw no position (maximum -inf) adds nothing. Returns the overall maximum; `num` (dim d)
// and `den` are relative to it.
template <int HD, int COUNT>
__device__ __forceinline__ float merge_partials(const float* p, int stride, int d, float& num, float& den) {
  float m_all = -INFINITY;
#pragma unroll
  for (int j = 0; j < COUNT; ++j) m_all = fmaxf(m_all, p[j * stride + HD]);
  num = den = 0.f;
#pragma unroll
  for (int j = 0; j < COUNT; ++j) {
    const float* pj = p + j * stride;
    if (pj[HD] == -INFINITY) continue;
    const float f = __expf(pj[HD] - m_all);
    num += pj[d] * f;
    den += pj[HD + 1] * f;
  }
  return m_all;
}

template <int HD, int GROUP, int NQ, int NKV, int PAGE, bool QK_NORM, int NT, typename RopeT, int SPLITS>
__device__ void attention_task(const TaskContext& c) {
  static_assert(HD % kWarp == 0, "head_dim must be a multiple of 32");
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
  float* partial = c.ptr<float>(AttentionArgs::kPartial);  // [batch][NQ][SPLITS][HD + 2] when split
  const int split = c.arg(AttentionArgs::kSplit);
  const bool writes_kv = split == SPLITS - 1;
  const int64_t block_stride = c.arg(AttentionArgs::kBlockStride), head_stride = c.arg(AttentionArgs::kHeadStride);
  const int64_t slot_stride = c.arg(AttentionArgs::kSlotStride);
  const int table_stride = c.arg(AttentionArgs::kTableStride);
  __nv_bfloat16* head_cache = cache + head * head_stride;
  float* vec = reinterpret_cast<float*>(worker_smem());  // [GROUP + 2][HD]: q heads, k, v
  float* part = vec + (GROUP + 2) * HD;                  // [NW][GROUP][HD + 2]: acc, then max and sum

  const int row_start = c.arg(AttentionArgs::kRowStart), row_end = c.arg(AttentionArgs::kRowEnd);
  // Before the inputs are ready: the KV history was written by earlier steps and the block tables
  // are step inputs, so ask L2 for every cached position of this head while the q/k/v tiles run.
  for (int b = row_start; b < row_end && b < c.num_tokens; ++b) {
    const int* table = tables + (size_t)b * table_stride;
    const int len = seq_lens[b], hi = (int)((int64_t)len * (split + 1) / SPLITS);
    for (int pos = (int)((int64_t)len * split / SPLITS) + threadIdx.x; pos < min(hi, len - 1); pos += NT) {
      const __nv_bfloat16* kv = head_cache + (int64_t)table[pos / PAGE] * block_stride + (pos % PAGE) * slot_stride;
      prefetch_l2(kv, 2 * HD * 2);
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
    if (writes_kv && slot >= 0) {
      __nv_bfloat16* dst = head_cache + (slot / PAGE) * block_stride + (slot % PAGE) * slot_stride;
      for (int i = threadIdx.x; i < 2 * HD; i += NT) dst[i] = __float2bfloat16_rn(vec[GROUP * HD + i]);
    }
    __syncthreads();  // the new k/v are read back below like every other position

    float q[GROUP][D], acc[GROUP][D], m[GROUP], l[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        q[g][d] = vec[g * HD + lane * D + d] * scale;
        acc[g][d] = 0.f;
      }
    }
    const int* table = tables + (size_t)b * table_stride;
    const int lo = (int)((int64_t)seq_len * split / SPLITS), hi = (int)((int64_t)seq_len * (split + 1) / SPLITS);
    // P positions per warp per round, their K/V loads issued together before any is used.
    constexpr int P = 4;
    for (int p0 = lo + warp * P; p0 < hi; p0 += NW * P) {
      float k[P][D], v[P][D];
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const int p = p0 + j < hi ? p0 + j : p0;
        const __nv_bfloat16* kv = head_cache + (int64_t)table[p / PAGE] * block_stride + (p % PAGE) * slot_stride;
        load_bf16<D>(kv + lane * D, k[j]);
        load_bf16<D>(kv + HD + lane * D, v[j]);
      }
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (p0 + j >= hi) break;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          float s = 0.f;
#pragma unroll
          for (int d = 0; d < D; ++d) s += q[g][d] * k[j][d];
          s = warp_sum(s);
          const float m_new = fmaxf(m[g], s), corr = __expf(m[g] - m_new), e = __expf(s - m_new);
          l[g] = l[g] * corr + e;
#pragma unroll
          for (int d = 0; d < D; ++d) acc[g][d] = acc[g][d] * corr + e * v[j][d];
          m[g] = m_new;
        }
      }
    }
    float* mine = part + warp * GROUP * (HD + 2);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int d = 0; d < D; ++d) mine[g * (HD + 2) + lane * D + d] = acc[g][d];
      if (lane == 0) {
        mine[g * (HD + 2) + HD] = m[g];
        mine[g * (HD + 2) + HD + 1] = l[g];
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GROUP * HD; i += NT) {
      const int g = i / HD, d = i % HD;
      float num, den;  // over the warps' partials
      const float m_all = merge_partials<HD, NW>(part + g * (HD + 2), GROUP * (HD + 2), d, num, den);
      if constexpr (SPLITS == 1) {
        out[(size_t)b * NQ * HD + (head * GROUP + g) * HD + d] = __float2bfloat16_rn(num / den);
      } else {  // m_all is -inf and den 0 where this split had no position
        float* mine = partial + (((size_t)b * NQ + head * GROUP + g) * SPLITS + split) * (HD + 2);
        mine[d] = num;
        if (d == 0) {
          mine[HD] = m_all;
          mine[HD + 1] = den;
        }
      }
    }
  }
}

struct AttentionMergeArgs {
  enum { kPartial, kSeqLens, kOutput, kHead, kRowStart, kRowEnd };
};

// Combines the SPLITS partials of one KV head's query heads for a range of requests (see
// vllm_mpk/graph/ops/attention_merge.py); splits without a position (maximum -inf) add nothing.
template <int HD, int GROUP, int NQ, int SPLITS, int NT>
__device__ void attention_merge_task(const TaskContext& c) {
  const float* partial = c.ptr<const float>(AttentionMergeArgs::kPartial);
  const int* seq_lens = c.ptr<const int>(AttentionMergeArgs::kSeqLens);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(AttentionMergeArgs::kOutput);
  const int head = c.arg(AttentionMergeArgs::kHead);
  const int row_end = min(c.arg(AttentionMergeArgs::kRowEnd), c.num_tokens);
  for (int b = c.arg(AttentionMergeArgs::kRowStart); b < row_end; ++b) {
    if (seq_lens[b] <= 0) continue;
    for (int i = threadIdx.x; i < GROUP * HD; i += NT) {
      const int g = i / HD, d = i % HD;
      float num, den;
      merge_partials<HD, SPLITS>(partial + ((size_t)b * NQ + head * GROUP + g) * SPLITS * (HD + 2), HD + 2, d, num,
                                 den);
      out[(size_t)b * NQ * HD + (head * GROUP + g) * HD + d] = __float2bfloat16_rn(num / den);
    }
  }
}

}  // namespace mpk
