// Paged GQA decode attention for one KV head and a range of requests: q/k RMSNorm (Qwen3),
// neox RoPE from cos_sin_cache, the new k/v written into vLLM's packed K|V cache at the request's
// slot, then an online-softmax pass over the request's cached positions.
//
// Split KV (SPLITS > 1): the task is split `split` of SPLITS over each request's positions
// [L * split / SPLITS, L * (split + 1) / SPLITS); it writes a partial (the unnormalised sum, the
// maximum and the sum of weights per query head) and counts itself in the request's arrivals word
// for its KV head. The split that brings the count to SPLITS merges the SPLITS partials into the
// output and sets the count back to 0 (merge_if_last). Only the last split, whose range ends at
// the new token, writes the new k/v.
//
// Rounds stage up to 32 positions per warp in shared memory: a lane scores one position for every
// query head of the group, then each lane accumulates HD/32 dims of the weighted values. Warp
// partials merge in shared memory. The first round is copied before the task's q/k/v inputs are
// ready, the later ones asked of L2; the new position's row comes from the task's own k/v.
#pragma once
#include "common.cuh"

namespace mpk {

struct AttentionArgs {
  enum {
    kQkv, kCache, kRope, kPositions, kSeqLens, kBlockTables, kSlots, kQNorm, kKNorm, kOutput,
    kHead, kRowStart, kRowEnd, kBlockStride, kHeadStride, kSlotStride, kTableStride, kEps, kScale, kSplit, kPartial,
    kArrivals
  };
};

// Bytes before the round's row offsets: q, k, v, then per warp the partials [GROUP][HD + 2] and
// the weights [GROUP][32], rounded up to 16 bytes.
template <int HD, int GROUP, int NT>
constexpr int attention_float_bytes() {
  return (((GROUP + 2) * HD + (NT / kWarp) * GROUP * (HD + 2 + kWarp)) * 4 + 15) / 16 * 16;
}

// A round stages the K|V rows of up to 32 positions per warp in shared memory (one bulk copy per
// row, all in flight at once), each row padded by 16 bytes so that lanes reading different rows at
// the same column hit different banks. A round has as many warps' positions as fit in 200 KiB with
// the rest.
constexpr int kStagePad = 8;  // bf16 elements
constexpr int kStageBarrierBytes = 16;  // the copies' barrier, keeping the rows 16-byte aligned
template <int HD, int GROUP, int NT>
constexpr int attention_round() {
  constexpr int fit = (200 * 1024 - attention_float_bytes<HD, GROUP, NT>() - kStageBarrierBytes) /
                      (kWarp * (2 * HD + kStagePad) * 2);
  static_assert(fit >= 1, "head_dim and group size leave no shared memory for staging K|V rows");
  return (NT / kWarp < fit ? NT / kWarp : fit) * kWarp;
}

template <int HD, int GROUP, int NT>
constexpr int attention_smem_bytes() {  // then the copies' barrier and the staged rows (bf16)
  return attention_float_bytes<HD, GROUP, NT>() + kStageBarrierBytes +
         attention_round<HD, GROUP, NT>() * (2 * HD + kStagePad) * 2;
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
// and `den` are relative to it. L2: the partials are global memory other SMs wrote, read through
// L2 (L1 is not coherent across SMs).
template <int HD, int COUNT, bool L2 = false>
__device__ __forceinline__ float merge_partials(const float* p, int stride, int d, float& num, float& den) {
  const auto load = [](const float* x) {
    if constexpr (L2) return __ldcg(x);
    else return *x;
  };
  float m_all = -INFINITY;
#pragma unroll
  for (int j = 0; j < COUNT; ++j) m_all = fmaxf(m_all, load(p + j * stride + HD));
  num = den = 0.f;
#pragma unroll
  for (int j = 0; j < COUNT; ++j) {
    const float* pj = p + j * stride;
    const float m = load(pj + HD);
    if (m == -INFINITY) continue;
    const float f = __expf(m - m_all);
    num += load(pj + d) * f;
    den += load(pj + HD + 1) * f;
  }
  return m_all;
}

// Split KV, once this split's partial of a request is stored (through L2, by all threads): count
// the split in `count`, the request's arrivals word for this KV head. The last of the SPLITS to
// arrive sets the count back to 0 for the next step (all have counted by then), merges the SPLITS
// partials of the group's query heads (`partial`: [GROUP][SPLITS][HD + 2]) in split order, so the
// output does not depend on which split came last, and writes the output (`out`: [GROUP][HD]).
// The other splits ran on other SMs: each releases its partial (fence, then the count) and the
// last acquires them all (the count, then a fence) before reading them through L2.
template <int HD, int GROUP, int SPLITS, int NT>
__device__ __forceinline__ void merge_if_last(const float* partial, int* count, __nv_bfloat16* out) {
  __shared__ bool last_s;
  __syncthreads();  // every thread's share of the partial is stored
  if (threadIdx.x == 0) {
    __threadfence();
    const bool last = atomicAdd(count, 1) == SPLITS - 1;
    if (last) {
      atomicExch(count, 0);  // every split of this step has counted; the next step's count from 0
      __threadfence();
    }
    last_s = last;
  }
  __syncthreads();
  if (!last_s) return;  // block-uniform
  for (int i = threadIdx.x; i < GROUP * HD; i += NT) {
    const int g = i / HD, d = i % HD;
    float num, den;
    merge_partials<HD, SPLITS, true>(partial + g * SPLITS * (HD + 2), HD + 2, d, num, den);
    out[i] = __float2bfloat16_rn(num / den);
  }
}

// Where split `s` of SPLITS starts in a history of `len` positions (s = SPLITS: where the last ends).
template <int SPLITS>
__device__ __forceinline__ int split_bound(int len, int s) { return (int)((int64_t)len * s / SPLITS); }

template <int HD, int GROUP, int NQ, int NKV, int PAGE, bool QK_NORM, int NT, typename RopeT, int SPLITS,
          bool EARLY_STAGE>
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
  int* arrivals = c.ptr<int>(AttentionArgs::kArrivals);     // [batch][NKV] when split
  const int split = c.arg(AttentionArgs::kSplit);
  const bool writes_kv = split == SPLITS - 1;
  const int64_t block_stride = c.arg(AttentionArgs::kBlockStride), head_stride = c.arg(AttentionArgs::kHeadStride);
  const int64_t slot_stride = c.arg(AttentionArgs::kSlotStride);
  const int table_stride = c.arg(AttentionArgs::kTableStride);
  __nv_bfloat16* head_cache = cache + head * head_stride;
  float* vec = reinterpret_cast<float*>(worker_smem());  // [GROUP + 2][HD]: q heads, k, v
  float* part = vec + (GROUP + 2) * HD;                  // [NW][GROUP][HD + 2]: acc, then max and sum
  float* weights = part + NW * GROUP * (HD + 2) + warp * GROUP * kWarp;  // this warp's [GROUP][32]
  constexpr int ROUND = attention_round<HD, GROUP, NT>(), STAGE_ROW = 2 * HD + kStagePad, ROW_BYTES = 2 * HD * 2;
  uint64_t* copied = reinterpret_cast<uint64_t*>(worker_smem() + attention_float_bytes<HD, GROUP, NT>());
  __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(worker_smem() + attention_float_bytes<HD, GROUP, NT>() +
                                                          kStageBarrierBytes);  // [ROUND][STAGE_ROW]
  uint32_t phase = 0;  // parity of the barrier's current phase: one per round

  const int row_start = c.arg(AttentionArgs::kRowStart), row_end = c.arg(AttentionArgs::kRowEnd);
  // Starts the copies of the K|V rows of positions [r0, r0 + count) of request b into the stage
  // (common.cuh's barrier protocol; wait_round waits for them), except the new position's, which
  // the task writes from its own k/v. Callers order earlier accesses of the stage first.
  // `page0`: this thread's page of position r0 + threadIdx.x if already loaded, else -1.
  auto stage_round = [&](int b, int seq_len, int r0, int count, int page0) {
    const int* table = tables + (size_t)b * table_stride;
    const int fresh = seq_len - 1 - r0;  // the new position's row in this round, if any
    fence_async_smem();
    // A multi-step plan's earlier steps in this launch wrote rows of the history with ordinary
    // stores; where the host writes the step inputs every row is from an earlier launch.
    if constexpr (!EARLY_STAGE) fence_async_global();
    for (int i = threadIdx.x; i < count; i += NT) {
      if (i == fresh) continue;
      const int p = r0 + i;
      const int page = i == threadIdx.x && page0 >= 0 ? page0 : table[p / PAGE];
      expect_bytes(copied, ROW_BYTES);
      bulk_copy_to_smem(stage + i * STAGE_ROW, head_cache + (int64_t)page * block_stride + (p % PAGE) * slot_stride,
                        ROW_BYTES, copied);
    }
  };
  auto wait_round = [&] {  // after a __syncthreads that follows every stage_round issue
    if (threadIdx.x == 0) barrier_arrive(copied);
    barrier_wait(copied, phase);
    phase ^= 1;
  };
  if (threadIdx.x == 0) barrier_init(copied);
  __syncthreads();
  // The history needs none of this step's inputs (EARLY_STAGE: the host wrote the step inputs
  // before the launch; a multi-step plan's begin_step writes them in the kernel), so the first
  // round of the first request streams in while the q/k/v tiles run, as a linear tile's first
  // weights do. This work delays the gate where the worker arrives late, so it is kept short: the
  // first split's range starts at position 0, so its pages load beside the sequence length rather
  // than after it (one round trip before the copies start, not two). So do the pages after the
  // first round, which the L2 hint below asks for: `later_page`, page ROUND / PAGE + threadIdx.x
  // of the first request (read whatever the length; used only where it is in range).
  const bool early = EARLY_STAGE && row_start < row_end && row_start < c.num_tokens;
  const int* first_table = tables + (size_t)row_start * table_stride;
  const bool early_pages = early && split == 0;
  const int page0 = early_pages && threadIdx.x < ROUND && threadIdx.x / PAGE < table_stride
                        ? first_table[threadIdx.x / PAGE]
                        : -1;
  const int later_page = early_pages && ROUND / PAGE + (int)threadIdx.x < table_stride
                             ? first_table[ROUND / PAGE + threadIdx.x]
                             : -1;
  const int first_len = early ? seq_lens[row_start] : 0;
  const int first_lo = split_bound<SPLITS>(first_len, split), first_hi = split_bound<SPLITS>(first_len, split + 1);
  const bool staged_early = first_lo < first_hi;
  if (staged_early) stage_round(row_start, first_len, first_lo, min(ROUND, first_hi - first_lo), page0);
  // Also before the inputs are ready: ask L2 for the positions of the later rounds and requests
  // (only a hint: in a multi-step plan they may be the previous step's). The copy engine takes
  // bulk requests one at a time, so ask for few: one range of PAGE slots per page where the head's
  // slots are adjacent (head-major pages), or where a page holds all heads' slots contiguously
  // (slot-major: each of the NKV head tasks then asks for one NKV-th of the page, together the
  // whole page); otherwise one request per position.
  constexpr int64_t kPageRange = (int64_t)PAGE * 2 * HD;  // elements
  const int64_t page_offset = slot_stride == 2 * HD ? head * head_stride
                              : slot_stride == NKV * head_stride && head_stride == 2 * HD &&
                                        block_stride == PAGE * slot_stride
                                    ? head * kPageRange
                                    : -1;
  for (int b = row_start; b < row_end && b < c.num_tokens; ++b) {
    const int* table = tables + (size_t)b * table_stride;
    const int len = b == row_start && early ? first_len : seq_lens[b];
    const int lo = split_bound<SPLITS>(len, split) + (b == row_start && staged_early ? ROUND : 0);
    const int hi = min(split_bound<SPLITS>(len, split + 1), len - 1);  // the last one is new
    auto page_at = [&](int page) {
      return b == row_start && early_pages && page == ROUND / PAGE + (int)threadIdx.x ? later_page : table[page];
    };
    if (page_offset >= 0) {
      for (int page = lo / PAGE + threadIdx.x; page * PAGE < hi; page += NT)
        prefetch_l2(cache + (int64_t)page_at(page) * block_stride + page_offset, kPageRange * 2);
    } else {
      for (int pos = lo + threadIdx.x; pos < hi; pos += NT)
        prefetch_l2(head_cache + (int64_t)page_at(pos / PAGE) * block_stride + (pos % PAGE) * slot_stride, 2 * HD * 2);
    }
  }
  if (!c.inputs_ready()) {  // the watchdog stopped the kernel: no copy into shared memory outlives the task
    if (staged_early) wait_round();
    __syncthreads();  // every thread's wait is done before the barrier is invalidated
    if (threadIdx.x == 0) barrier_inval(copied);
    return;
  }

  for (int b = row_start; b < row_end; ++b) {
    // The first request's length as its early round was staged for (read before the gate).
    const int seq_len = b == row_start && early ? first_len : b < c.num_tokens ? seq_lens[b] : 0;
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

    // Rounds of up to 32 positions per warp, staged in shared memory. Scores with lanes over
    // positions (a lane's dot products read its staged K row and the q heads), so no reduction per
    // position; then the weighted V rows with lanes over dims, the weights passed through shared
    // memory. Only the running maximum needs a warp reduction, once per round and head.
    float acc[GROUP][D], m[GROUP], l[GROUP];  // l: this lane's share of the sum of weights
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    }
    const int lo = split_bound<SPLITS>(seq_len, split), hi = split_bound<SPLITS>(seq_len, split + 1);
    for (int r0 = lo; r0 < hi; r0 += ROUND) {
      const int count = min(ROUND, hi - r0);
      if (!(staged_early && b == row_start && r0 == lo)) {
        __syncthreads();  // the previous round is done with the rows and the stage
        stage_round(b, seq_len, r0, count, -1);
      }
      const int fresh = seq_len - 1 - r0;
      if (fresh < count)  // the new position is this task's k/v, as written to the cache above
        for (int i = threadIdx.x; i < 2 * HD; i += NT)
          stage[fresh * STAGE_ROW + i] = __float2bfloat16_rn(vec[GROUP * HD + i]);
      __syncthreads();  // every copy of the round is issued and the new row written
      wait_round();
      const int first = warp * kWarp;
      if (first >= count) continue;  // warp-uniform
      const bool valid = first + lane < count;
      const __nv_bfloat16* k = stage + (valid ? first + lane : first) * STAGE_ROW;
      float s[GROUP] = {};
#pragma unroll
      for (int ch = 0; ch < HD / 8; ++ch) {
        float kf[8];
        unpack(*reinterpret_cast<const Bf16x8*>(k + ch * 8), kf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float4* qg = reinterpret_cast<const float4*>(vec + g * HD + ch * 8);
          const float4 a = qg[0], c = qg[1];
          s[g] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + c.x * kf[4] + c.y * kf[5] + c.z * kf[6] +
                  c.w * kf[7];
        }
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float sg = valid ? s[g] * scale : -INFINITY;
        const float m_new = fmaxf(m[g], warp_max(sg));  // finite: lane 0's position is in range
        const float corr = __expf(m[g] - m_new), e = __expf(sg - m_new);
        l[g] = l[g] * corr + e;
        weights[g * kWarp + lane] = e;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[g][d] *= corr;
        m[g] = m_new;
      }
      __syncwarp();
      const int n = min(kWarp, count - first);
      for (int j = 0; j < n; ++j) {
        float v[D];
        load_bf16<D>(stage + (first + j) * STAGE_ROW + HD + lane * D, v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float e = weights[g * kWarp + j];
#pragma unroll
          for (int d = 0; d < D; ++d) acc[g][d] += e * v[d];
        }
      }
      __syncwarp();  // the next round rewrites the weights
    }
    float* mine = part + warp * GROUP * (HD + 2);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float sum = warp_sum(l[g]);
#pragma unroll
      for (int d = 0; d < D; ++d) mine[g * (HD + 2) + lane * D + d] = acc[g][d];
      if (lane == 0) {
        mine[g * (HD + 2) + HD] = m[g];
        mine[g * (HD + 2) + HD + 1] = sum;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GROUP * HD; i += NT) {
      const int g = i / HD, d = i % HD;
      float num, den;  // over the warps' partials
      const float m_all = merge_partials<HD, NW>(part + g * (HD + 2), GROUP * (HD + 2), d, num, den);
      if constexpr (SPLITS == 1) {
        out[(size_t)b * NQ * HD + (head * GROUP + g) * HD + d] = __float2bfloat16_rn(num / den);
      } else {  // m_all is -inf and den 0 where this split had no position; the last split reads it from L2
        float* mine = partial + (((size_t)b * NQ + head * GROUP + g) * SPLITS + split) * (HD + 2);
        __stcg(mine + d, num);
        if (d == 0) {
          __stcg(mine + HD, m_all);
          __stcg(mine + HD + 1, den);
        }
      }
    }
    if constexpr (SPLITS > 1)
      merge_if_last<HD, GROUP, SPLITS, NT>(partial + ((size_t)b * NQ + head * GROUP) * SPLITS * (HD + 2),
                                           arrivals + (size_t)b * NKV + head,
                                           out + (size_t)b * NQ * HD + head * GROUP * HD);
  }
  if (threadIdx.x == 0) barrier_inval(copied);  // every thread passed its last wait before the merge's barrier
}

}  // namespace mpk
