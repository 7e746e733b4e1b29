// Linear tiles: out[b, c0:c1] = f(x[b]) . W[c0:c1]^T (+ bias) (+ residual), with f one of
// identity, RMSNorm (rmsnorm_linear) or SiLU-mul over [gate | up] (silu_mul_linear[_with_residual]);
// or, for rmsnorm_linear_silu_mul, out[b, c0:c1] = silu(n . Wg^T) * (n . Wu^T) with n = RMSNorm(x[b]):
// the tile streams gate rows [c0, c1) and up rows [I + c0, I + c1) as its local rows, gate first.
//
// Tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate) with the weight tile as A (16 output
// columns per fragment) and the batch as B (8 rows per fragment). Each thread loads 16 contiguous
// bytes of a weight row and 16 of an input row; since a dot product does not care in which order
// its k terms are summed, those 8 consecutive k values are used as the thread's fragment elements
// of two consecutive mma k-steps (the same k permutation on A and B), so no shuffles or shared
// memory round trips are needed for the weights: they go from DRAM to registers to tensor cores.
//
// The input is staged in shared memory in chunks of KC columns (after f, as bf16). Work items are
// (16-row group, 256-column slice) pairs in group-major order; each warp takes one contiguous run of
// them and keeps its sums in registers while consecutive items share a group, so a warp stores one
// partial per group it touches. Warp w's partial for group g goes to slot w + g: the runs are
// contiguous and ordered, so no two (warp, group) pairs share a slot, and the partials need
// NW + groups slots. At the end of a chunk they are added in warp order, so the result is
// bit-identical from run to run (no floating-point atomics) and shared memory stays small.
#pragma once
#include "common.cuh"

namespace mpk {

enum class LinearMode : int { kPlain = 0, kResidual = 1, kNorm = 2, kSiluResidual = 3, kSilu = 4, kNormSiluOut = 5 };

constexpr bool gated(LinearMode m) { return m == LinearMode::kSilu || m == LinearMode::kSiluResidual; }
constexpr bool normalized(LinearMode m) { return m == LinearMode::kNorm || m == LinearMode::kNormSiluOut; }

// LinearArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/linear.py.

constexpr int kLinearStageBytes = 128 * 1024;  // staged input per chunk: down_proj of 8B models in 2 chunks at batch <= 8
constexpr int kSliceK = 256;  // columns per work item: 8 steps of 32
constexpr int kStageLoads = 4;  // input vectors in flight per thread while staging

template <int B>
constexpr int padded_batch() { return (B + 7) / 8 * 8; }

template <int K, int B>
constexpr int linear_chunk() {
  constexpr int fit = (kLinearStageBytes / (padded_batch<B>() * 2)) / kSliceK * kSliceK;
  return K < fit ? K : (fit < kSliceK ? kSliceK : fit);
}

// A warp's contiguous run of a chunk's items: [lo, hi).
struct ItemRange {
  int lo, hi;
  __device__ ItemRange(int items, int warp, int warps) : lo(warp * items / warps), hi((warp + 1) * items / warps) {}
};

template <int K, int B, int ROWS, int NT>
constexpr int linear_smem_bytes() {
  return padded_batch<B>() * (linear_chunk<K, B>() + 8) * 2 + ROWS * padded_batch<B>() * 4 + padded_batch<B>() * 4 +
         (NT / kWarp + ROWS / 16) * 16 * padded_batch<B>() * 4;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_weights(const __nv_bfloat16* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

template <LinearMode MODE, int K, int B, int ROWS, int NT, typename OutT>
__device__ void linear_task(const TaskContext& c) {
  static_assert(K % kSliceK == 0, "the reduction dim must be a multiple of 256");
  static_assert(linear_smem_bytes<K, B, ROWS, NT>() <= 227 * 1024, "batch too large for shared memory");
  constexpr int NB = padded_batch<B>(), NTILES = NB / 8;
  constexpr int KC = linear_chunk<K, B>(), XS = KC + 8;  // +16 bytes per row: no bank conflicts
  constexpr int NW = NT / kWarp;
  constexpr int XW = gated(MODE) ? 2 * K : K;  // input row width
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int n_tok = c.num_tokens;
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(LinearArgs::kInput);
  const __nv_bfloat16* w = c.ptr<const __nv_bfloat16>(LinearArgs::kWeight);
  const __nv_bfloat16* bias = c.ptr<const __nv_bfloat16>(LinearArgs::kBias);
  const __nv_bfloat16* residual = c.ptr<const __nv_bfloat16>(LinearArgs::kResidual);
  const __nv_bfloat16* norm_w = c.ptr<const __nv_bfloat16>(LinearArgs::kNormWeight);
  OutT* out = c.ptr<OutT>(LinearArgs::kOutput);
  constexpr bool kSiluOut = MODE == LinearMode::kNormSiluOut;
  const int c0 = c.arg(LinearArgs::kColStart), c1 = c.arg(LinearArgs::kColEnd), cols = c1 - c0;
  const int rows = kSiluOut ? 2 * cols : cols;  // weight rows this tile streams (its local rows)
  const int out_stride = c.arg(LinearArgs::kOutStride), up_row = c.arg(LinearArgs::kUpRow);
  auto weight_row = [&](int local) { return kSiluOut && local >= cols ? up_row + c0 + local - cols : c0 + local; };
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(worker_smem());                 // [NB][XS]
  float* acc = reinterpret_cast<float*>(worker_smem() + NB * XS * 2);                  // [ROWS][NB]
  float* inv_rms = acc + ROWS * NB;                                              // [NB]
  float* part = inv_rms + NB;                                                    // [NW + groups][16][NB]

  const int groups = (rows + 15) / 16;
  auto slices_at = [&](int k0) { return (K - k0 < KC ? K - k0 : KC) / kSliceK; };
  // A work item's 16 rows x 256 columns of weights: 16 independent 16-byte loads per thread.
  auto load_item = [&](int item, int k0, int slices, uint4 (&wa)[8], uint4 (&wb)[8]) {
    const int group = item / slices, kb = (item % slices) * kSliceK;
    const int l_lo = group * 16 + g, l_hi = l_lo + 8, r_lo = weight_row(l_lo), r_hi = weight_row(l_hi);
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int k = k0 + kb + s * 32 + t * 8;
      wa[s] = l_lo < rows ? load_weights(w + (size_t)r_lo * K + k) : make_uint4(0, 0, 0, 0);
      wb[s] = l_hi < rows ? load_weights(w + (size_t)r_hi * K + k) : make_uint4(0, 0, 0, 0);
    }
  };
  // Each warp's first item's weights are requested before the task's inputs are ready: weights
  // never wait for activations.
  uint4 wa[8], wb[8];
  bool loaded = false;
  {
    const ItemRange first(groups * slices_at(0), warp, NW);
    loaded = first.lo < first.hi;
    if (loaded) load_item(first.lo, 0, slices_at(0), wa, wb);
  }
  if constexpr (normalized(MODE)) {  // the norm weights into L1 before the gate: staging reads them
    for (int i = threadIdx.x * 64; i < K; i += NT * 64) prefetch_l1(norm_w + i);
  }
  if (!c.inputs_ready()) return;  // the first items' weights stream while this waits
  if constexpr (MODE == LinearMode::kResidual || MODE == LinearMode::kSiluResidual) {
    for (int b = threadIdx.x; b < n_tok; b += NT) prefetch_l1(residual + (size_t)b * out_stride + c0);
  }

  for (int i = threadIdx.x; i < rows * NB; i += NT) acc[i] = 0.f;
  if constexpr (normalized(MODE)) {
    const float eps = c.farg(LinearArgs::kEps);
    for (int b = warp; b < n_tok; b += NW) {
      float ss = 0.f;
#pragma unroll 8
      for (int i = 0; i < K / (kWarp * 8); ++i) {  // unrolled: several L2 loads in flight per lane
        float f[8];
        load_bf16<8>(x + (size_t)b * XW + i * kWarp * 8 + lane * 8, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
      }
      ss = warp_sum(ss);
      if (lane == 0) inv_rms[b] = rsqrtf(ss / K + eps);
    }
  }

  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = K - k0 < KC ? K - k0 : KC, slices = kc / kSliceK, items = groups * slices;
    const ItemRange mine(items, warp, NW);
    if (!loaded && mine.lo < mine.hi) load_item(mine.lo, k0, slices, wa, wb);
    loaded = false;
    __syncthreads();  // previous chunk consumed; inv_rms and acc initialised
    // Stage f(x) for this chunk. Each thread keeps kStageLoads 16-byte loads in flight: one at a
    // time would make staging a chain of L2 round trips (16 per chunk at batch 8).
    for (int base = threadIdx.x * 8; base < NB * kc; base += NT * 8 * kStageLoads) {
      uint4 a[kStageLoads], e[kStageLoads];  // x (gate), and up (SiLU-mul) or the norm weights
#pragma unroll
      for (int j = 0; j < kStageLoads; ++j) {
        const int idx = base + j * NT * 8, b = idx / kc, k = k0 + idx % kc;
        a[j] = e[j] = make_uint4(0, 0, 0, 0);
        if (idx < NB * kc && b < n_tok) {
          a[j] = *reinterpret_cast<const uint4*>(x + (size_t)b * XW + k);
          if constexpr (gated(MODE)) e[j] = *reinterpret_cast<const uint4*>(x + (size_t)b * XW + K + k);
          if constexpr (normalized(MODE)) e[j] = *reinterpret_cast<const uint4*>(norm_w + k);
        }
      }
#pragma unroll
      for (int j = 0; j < kStageLoads; ++j) {
        const int idx = base + j * NT * 8, b = idx / kc, kk = idx % kc;
        if (idx >= NB * kc) break;
        float f[8], g2[8];
        unpack(*reinterpret_cast<const Bf16x8*>(&a[j]), f);
        unpack(*reinterpret_cast<const Bf16x8*>(&e[j]), g2);
        if (b < n_tok) {  // rows past the batch stay zero (their inv_rms is not computed)
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if constexpr (gated(MODE)) f[i] = silu(f[i]) * g2[i];
            if constexpr (normalized(MODE)) f[i] *= inv_rms[b] * g2[i];
          }
        }
        *reinterpret_cast<Bf16x8*>(xs + b * XS + kk) = pack(f);
      }
    }
    __syncthreads();

    float d[NTILES][4] = {};
    for (int item = mine.lo; item < mine.hi; ++item) {
      uint4 na[8], nb[8];  // the next item's weights stream while this one multiplies
      if (item + 1 < mine.hi) {
        load_item(item + 1, k0, slices, na, nb);
      } else if (k0 + KC < K) {  // this warp's first item of the next chunk
        const int next_slices = slices_at(k0 + KC);
        const ItemRange next(groups * next_slices, warp, NW);
        loaded = next.lo < next.hi;
        if (loaded) load_item(next.lo, k0 + KC, next_slices, na, nb);
      }
      const int kb = (item % slices) * kSliceK;
#pragma unroll
      for (int s = 0; s < 8; ++s) {
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
          const uint4 xv = *reinterpret_cast<const uint4*>(xs + (nt * 8 + g) * XS + kb + s * 32 + t * 8);
          mma_bf16(d[nt], wa[s].x, wb[s].x, wa[s].y, wb[s].y, xv.x, xv.y);
          mma_bf16(d[nt], wa[s].z, wb[s].z, wa[s].w, wb[s].w, xv.z, xv.w);
        }
      }
      const int group = item / slices;
      if (item + 1 == mine.hi || (item + 1) / slices != group) {  // last item of this group: store
        float* slot = part + (warp + group) * 16 * NB;
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
          const int b = nt * 8 + t * 2;
          *reinterpret_cast<float2*>(slot + g * NB + b) = make_float2(d[nt][0], d[nt][1]);
          *reinterpret_cast<float2*>(slot + (g + 8) * NB + b) = make_float2(d[nt][2], d[nt][3]);
#pragma unroll
          for (int j = 0; j < 4; ++j) d[nt][j] = 0.f;
        }
      }
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        wa[s] = na[s];
        wb[s] = nb[s];
      }
    }
    __syncthreads();
    if (k0 + KC >= K) c.weights_landed();  // every weight byte is in: a later task's may stream now
    for (int i = threadIdx.x; i < rows * NB; i += NT) {  // warps in order: deterministic sums
      const int r = i / NB, b = i % NB, group = r / 16;
      float sum = 0.f;
      for (int v = 0; v < NW; ++v) {
        const ItemRange theirs(items, v, NW);
        if (theirs.lo < theirs.hi && theirs.lo < (group + 1) * slices && theirs.hi > group * slices)
          sum += part[((v + group) * 16 + r % 16) * NB + b];
      }
      acc[i] += sum;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < n_tok * cols; idx += NT) {
    const int b = idx / cols, r = idx % cols, col = c0 + r;
    float v = acc[r * NB + b];
    if constexpr (kSiluOut) v = silu(v) * acc[(cols + r) * NB + b];
    if (bias) v += __bfloat162float(bias[col]);
    if constexpr (MODE == LinearMode::kResidual || MODE == LinearMode::kSiluResidual)
      v += __bfloat162float(residual[(size_t)b * out_stride + col]);
    out[(size_t)b * out_stride + col] = from_float<OutT>(v);
  }
}

}  // namespace mpk
