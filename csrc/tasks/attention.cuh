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
// Each warp stages its own chunks of 16 positions in shared memory, in two buffers: it computes
// from one while the next chunk streams into the other (bulk copies on a barrier per buffer, no
// block-wide barrier between chunks). Chunk k of warp w holds positions start + 16 (w + SW k),
// SW the warps with buffers. A half-warp scores the chunk's 16 positions for every query head of
// the group (each half over half the dims), then each lane accumulates HD/32 dims of the weighted
// values. Warp partials merge in shared memory. The first two chunks of every warp (ROUND
// positions) are copied before the task's q/k/v inputs are ready, the later ones asked of L2; the
// new position's row comes from the task's own k/v.
#pragma once
#include "common.cuh"

namespace mpk {

// AttentionArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/attention.py.

// Bytes before the barriers and the staged rows: q, k, v, then per warp the partials
// [GROUP][HD + 2] and the weights [GROUP][32], rounded up to 16 bytes.
template <int HD, int GROUP, int NT>
constexpr int attention_float_bytes() {
  return (((GROUP + 2) * HD + (NT / kWarp) * GROUP * (HD + 2 + kWarp)) * 4 + 15) / 16 * 16;
}

// A warp's chunk: the K|V rows of kChunk positions, one bulk copy per row, each row padded by 16
// bytes so that lanes reading different rows at the same column hit different banks. Every warp
// with buffers has two chunks' rows and a barrier for each; as many warps get buffers as fit in
// 200 KiB with the rest.
constexpr int kChunk = 16;  // a half-warp: lane l and lane l + 16 score the same position
constexpr int kStagePad = 8;  // bf16 elements
template <int NT>
constexpr int attention_barrier_bytes() { return NT / kWarp * 2 * 8; }  // [warp][buffer], 16-byte multiple
template <int HD, int GROUP, int NT>
constexpr int attention_stage_warps() {
  constexpr int fit = (200 * 1024 - attention_float_bytes<HD, GROUP, NT>() - attention_barrier_bytes<NT>()) /
                      (2 * kChunk * (2 * HD + kStagePad) * 2);
  static_assert(fit >= 1, "head_dim and group size leave no shared memory for staging K|V rows");
  return NT / kWarp < fit ? NT / kWarp : fit;
}

template <int HD, int GROUP, int NT>
constexpr int attention_smem_bytes() {  // then the barriers and the warps' staged rows (bf16)
  return attention_float_bytes<HD, GROUP, NT>() + attention_barrier_bytes<NT>() +
         attention_stage_warps<HD, GROUP, NT>() * 2 * kChunk * (2 * HD + kStagePad) * 2;
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
  constexpr int SW = attention_stage_warps<HD, GROUP, NT>(), ROUND = SW * 2 * kChunk;  // ROUND: staged early
  constexpr int STAGE_ROW = 2 * HD + kStagePad, ROW_BYTES = 2 * HD * 2;
  uint64_t* bars = reinterpret_cast<uint64_t*>(worker_smem() + attention_float_bytes<HD, GROUP, NT>());  // [NW][2]
  uint64_t* my_bars = bars + warp * 2;
  __nv_bfloat16* my_stage = reinterpret_cast<__nv_bfloat16*>(worker_smem() + attention_float_bytes<HD, GROUP, NT>() +
                                                             attention_barrier_bytes<NT>()) +
                            warp * 2 * kChunk * STAGE_ROW;  // this warp's [2][kChunk][STAGE_ROW]
  uint32_t phases = 0;  // bit j: the parity of buffer j's current phase

  const int row_start = c.arg(AttentionArgs::kRowStart), row_end = c.arg(AttentionArgs::kRowEnd);
  // Chunk k of this warp in a history range starting at `lo`: its first position.
  auto chunk_start = [&](int lo, int k) { return lo + kChunk * (warp + SW * k); };
  // This lane starts the copy of row `sub` of chunk k (of a request with table `table` and
  // history [lo, hi)) into buffer k % 2, unless the position is past hi or is the new one (the
  // task writes that row from its own k/v). `page`: the position's page if already loaded, else -1.
  // Callers order earlier accesses first (order_copies).
  auto copy_row = [&](const int* table, int seq_len, int lo, int hi, int k, int sub, int page) {
    const int p = chunk_start(lo, k) + sub;
    if (p >= hi || p == seq_len - 1) return;
    uint64_t* bar = my_bars + (k & 1);
    expect_bytes(bar, ROW_BYTES);
    bulk_copy_to_smem(my_stage + ((k & 1) * kChunk + sub) * STAGE_ROW,
                      head_cache + (int64_t)(page >= 0 ? page : table[p / PAGE]) * block_stride + (p % PAGE) * slot_stride,
                      ROW_BYTES, bar);
  };
  // Before a lane's copies into a buffer (after a __syncwarp or __syncthreads that follows the
  // buffer's last reads). In a multi-step plan, this launch's earlier steps stored rows of the
  // history with ordinary stores; where the host writes the step inputs every row is from an
  // earlier launch.
  auto order_copies = [] {
    fence_async_smem();
    if constexpr (!EARLY_STAGE) fence_async_global();
  };
  // After a __syncwarp that follows the lanes' copies of chunk k: the chunk's phase may complete.
  auto arrive = [&](int lo, int hi, int k) {
    if (lane == 0 && chunk_start(lo, k) < hi) barrier_arrive(my_bars + (k & 1));
  };
  // Chunks 0 and 1 of a request: lanes 0-15 copy chunk 0, lanes 16-31 chunk 1.
  auto copy_first_chunks = [&](const int* table, int seq_len, int lo, int hi, int page) {
    order_copies();
    copy_row(table, seq_len, lo, hi, lane / kChunk, lane % kChunk, page);
    __syncwarp();
    arrive(lo, hi, 0);
    arrive(lo, hi, 1);
  };
  if (threadIdx.x == 0)
    for (int i = 0; i < 2 * NW; ++i) barrier_init(bars + i);
  __syncthreads();
  // The history needs none of this step's inputs (EARLY_STAGE: the host wrote the step inputs
  // before the launch; a multi-step plan's begin_step writes them in the kernel), so the first two
  // chunks of every warp, for the first request, stream in while the q/k/v tiles run, as a linear
  // tile's first weights do. This work delays the gate where the worker arrives late, so it is kept
  // short: the first split's range starts at position 0, so its pages load beside the sequence
  // length rather than after it (one round trip before the copies start, not two). So do the pages
  // after the first ROUND positions, which the L2 hint below asks for: `later_page`, page
  // ROUND / PAGE + threadIdx.x of the first request (read whatever the length; used only where it
  // is in range).
  const bool early = EARLY_STAGE && row_start < row_end && row_start < c.num_tokens;
  const int* first_table = tables + (size_t)row_start * table_stride;
  const bool early_pages = early && split == 0;
  const int early_pos = kChunk * (warp + SW * (lane / kChunk)) + lane % kChunk;  // this lane's early copy
  const int page0 = early_pages && warp < SW && early_pos / PAGE < table_stride ? first_table[early_pos / PAGE] : -1;
  const int later_page = early_pages && ROUND / PAGE + (int)threadIdx.x < table_stride
                             ? first_table[ROUND / PAGE + threadIdx.x]
                             : -1;
  const int first_len = early ? seq_lens[row_start] : 0;
  const int first_lo = split_bound<SPLITS>(first_len, split), first_hi = split_bound<SPLITS>(first_len, split + 1);
  const bool staged_early = first_lo < first_hi;
  if (staged_early && warp < SW) copy_first_chunks(first_table, first_len, first_lo, first_hi, page0);
  // Also before the inputs are ready: ask L2 for the positions of the later chunks and requests
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
    if (staged_early && warp < SW)
      for (int k = 0; k < 2; ++k)
        if (chunk_start(first_lo, k) < first_hi) barrier_wait(my_bars + k, 0, *c.gate);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = 0; i < 2 * NW; ++i) barrier_inval(bars + i);
    return;
  }

  for (int b = row_start; b < row_end; ++b) {
    // The first request's length as its early chunks were issued for, so their waits match them.
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

    // Chunk by chunk from this warp's two buffers: scores with half-warp lanes over positions (a
    // lane's dot products read half of its staged K row and of the q heads; the halves add with
    // one shuffle), so no reduction per position; then the weighted V rows with lanes over dims,
    // the weights passed through shared memory. Only the running maximum needs a warp reduction,
    // once per chunk and head. Right after a chunk is computed, chunk k + 2 streams into its buffer.
    float acc[GROUP][D], m[GROUP], l[GROUP];  // l: this lane's share of the sum of weights
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    }
    const int lo = split_bound<SPLITS>(seq_len, split), hi = split_bound<SPLITS>(seq_len, split + 1);
    const int* table = tables + (size_t)b * table_stride;
    if (warp < SW && !(staged_early && b == row_start)) copy_first_chunks(table, seq_len, lo, hi, -1);
    const int sub = lane % kChunk, side = lane / kChunk;  // side: which half of the dims
    for (int k = 0; warp < SW && chunk_start(lo, k) < hi; ++k) {  // warp-uniform
      const int j = k & 1, p0 = chunk_start(lo, k), n = min(kChunk, hi - p0), fresh = seq_len - 1 - p0;
      const __nv_bfloat16* buf = my_stage + j * kChunk * STAGE_ROW;
      if (fresh < n)  // the new position is this task's k/v, as written to the cache above
        for (int i = lane; i < 2 * HD; i += kWarp)
          my_stage[(j * kChunk + fresh) * STAGE_ROW + i] = __float2bfloat16_rn(vec[GROUP * HD + i]);
      if (!barrier_wait(my_bars + j, (phases >> j) & 1, *c.gate)) {  // kCopyTimeout: the worker stops after this task
        // Bytes no copy brings left this phase stuck. Once the other buffer's copies are in too,
        // nothing is in flight: fresh barriers for the task's next request; this one is garbage.
        if (chunk_start(lo, k + 1) < hi) barrier_wait(my_bars + (j ^ 1), (phases >> (j ^ 1)) & 1, *c.gate);
        __syncwarp();
        if (lane == 0)
          for (int i = 0; i < 2; ++i) {
            barrier_inval(my_bars + i);
            barrier_init(my_bars + i);
          }
        __syncwarp();
        phases = 0;
        break;
      }
      phases ^= 1u << j;
      __syncwarp();  // the new row's stores are visible to the warp
      const bool valid = sub < n;
      const __nv_bfloat16* k_half = buf + (valid ? sub : 0) * STAGE_ROW + side * (HD / 2);
      float s[GROUP] = {};
#pragma unroll
      for (int ch = 0; ch < HD / 16; ++ch) {
        float kf[8];
        unpack(*reinterpret_cast<const Bf16x8*>(k_half + ch * 8), kf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float4* qg = reinterpret_cast<const float4*>(vec + g * HD + side * (HD / 2) + ch * 8);
          const float4 a = qg[0], c = qg[1];
          s[g] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + c.x * kf[4] + c.y * kf[5] + c.z * kf[6] +
                  c.w * kf[7];
        }
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float both = s[g] + __shfl_xor_sync(0xffffffffu, s[g], kChunk);  // every lane shuffles
        const float sg = valid ? both * scale : -INFINITY;
        const float m_new = fmaxf(m[g], warp_max(sg));  // finite: lane 0's position is in range
        const float corr = __expf(m[g] - m_new), e = side == 0 ? __expf(sg - m_new) : 0.f;
        l[g] = l[g] * corr + e;
        if (side == 0) weights[g * kWarp + sub] = e;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[g][d] *= corr;
        m[g] = m_new;
      }
      __syncwarp();
      for (int i = 0; i < n; ++i) {
        float v[D];
        load_bf16<D>(buf + i * STAGE_ROW + HD + lane * D, v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float e = weights[g * kWarp + i];
#pragma unroll
          for (int d = 0; d < D; ++d) acc[g][d] += e * v[d];
        }
      }
      __syncwarp();  // done with the buffer and the weights
      if (chunk_start(lo, k + 2) < hi) {
        order_copies();
        if (side == 0) copy_row(table, seq_len, lo, hi, k + 2, sub, -1);
        __syncwarp();
        arrive(lo, hi, k + 2);
      }
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
  if (threadIdx.x == 0)  // every warp passed its last wait before the merge's barrier
    for (int i = 0; i < 2 * NW; ++i) barrier_inval(bars + i);
}

}  // namespace mpk
