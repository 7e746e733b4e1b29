// Helpers shared by task bodies: bf16 vectors, warp and block reductions, task context.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include "../runtime/events.cuh"

namespace mpk {

constexpr int kWarp = 32;

// The worker's dynamic shared memory, which every task body may use from offset 0. Named here
// rather than passed as a pointer: a body that is not inlined would reach it through generic loads.
__device__ __forceinline__ char* worker_smem() {
  extern __shared__ __align__(16) char dynamic_smem[];
  return dynamic_smem;
}

// Asks L2 for `bytes` (a multiple of 16) from a 16-byte aligned address; nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// A later task's weights to ask of L2 once this task's own have landed (the prefetch policy's
// `landed` timing); the worker asks at the body's end where the body did not.
struct LandedPrefetch {
  const char* base;  // null: nothing to ask (the policy asks when tasks start, or no later task)
  uint32_t bytes;
  bool* asked;       // shared: whether it was asked during this task
  __device__ void ask() const {
    if (threadIdx.x == 0 && base != nullptr && !*asked) {
      prefetch_l2(base, bytes);
      *asked = true;
    }
  }
};

// What every task body receives: its argument words and the plan's tensor pointers.
struct TaskContext {
  const int32_t* args;      // the record's argument words
  void* const* tensors;     // device pointers, indexed by the plan's tensor ids
  int num_tokens;           // rows of this step (<= max batch)
  const InputGate* gate;    // open() once per task, by every thread, before reading inputs
  LandedPrefetch landed;    // weights_landed(): the body's own weights are in; a later task's may stream
  __device__ bool inputs_ready() const { return gate->open(); }
  __device__ void weights_landed() const { landed.ask(); }
  template <typename T>
  __device__ T* ptr(int slot) const { return args[slot] < 0 ? nullptr : static_cast<T*>(tensors[args[slot]]); }
  __device__ int arg(int slot) const { return args[slot]; }
  __device__ float farg(int slot) const { return __int_as_float(args[slot]); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; `scratch` holds one float per warp. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Eight bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
  __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack(const Bf16x8& v, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(v.h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ Bf16x8 pack(const float (&f)[8]) {
  Bf16x8 v;
#pragma unroll
  for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// N consecutive bf16 values (N = 2, 4 or 8) in one 4-, 8- or 16-byte load.
template <int N>
__device__ __forceinline__ void load_bf16(const __nv_bfloat16* p, float (&f)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "vector width");
  using Vec = std::conditional_t<N == 2, uint32_t, std::conditional_t<N == 4, uint2, uint4>>;
  const Vec raw = *reinterpret_cast<const Vec*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// Asks L1 for the 128-byte line holding `p`; nothing waits for it.
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// Bulk copies from global to shared memory (the copy engine, no registers, no thread waits for
// them to issue) completing on a shared-memory transaction barrier. Protocol, one phase per
// batch of copies: one thread inits the barrier (then __syncthreads); each issuing thread runs
// fence_async_smem() (its and, after a __syncthreads, everyone's earlier accesses of the
// destination come before the copy), expect_bytes() and bulk_copy_to_smem(); after a
// __syncthreads that follows every issue, one thread arrives and every thread waits for the
// phase's parity. The barrier is invalidated before its bytes serve anything else.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void barrier_inval(uint64_t* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(smem_address(bar)) : "memory");
}

__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The same for global memory: a bulk copy that reads what ordinary stores wrote in the same launch
// (seen through an event's acquire) issues this first, so the copy engine reads the stored bytes.
__device__ __forceinline__ void fence_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

__device__ __forceinline__ void expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

// `bytes` (a multiple of 16) from a 16-byte aligned global address to a 16-byte aligned one in
// shared memory; completes `bytes` of the barrier's expected transactions.
__device__ __forceinline__ void bulk_copy_to_smem(void* smem, const void* global, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_address(smem)), "l"(global), "r"(bytes), "r"(smem_address(bar)) : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(smem_address(bar))
               : "memory");
}

// A bulk copy of valid addresses lands within microseconds, so a phase still pending after the
// plan's timeout (the gate's, which bounds the event waits too) is an error: kCopyTimeout, recorded
// like an event's timeout (control block, host word) and stopping this worker after its task.
// The waiting threads do not leave at once, though: a copy still in flight writes this block's
// shared memory and completes on its barrier asynchronously, and once the block has exited (or
// the worker's next task reuses the bytes) that memory may belong to someone else, which a late
// copy would corrupt. So the wait goes on, for the same bound again, before it gives up: a copy
// that was issued lands within that, and a phase still pending then waits for bytes that no copy
// brings (an expect without its copy), so nothing is in flight when the block goes on or exits.
// One wait gives up after at most twice the timeout; a caller that then drains its other buffer
// (attention) waits up to that long again. The CUDA context stays usable.
//
// Every lane of the calling warp calls it. Returns, alike in every lane, true once the barrier's
// phase of this parity has completed (acquire: the copies' bytes are visible), late or not; false
// when it never did for some lane: then the barrier is stuck in that phase and must not take more
// copies or arrivals. The clock is read only every 1024 tries, off the fast path.
__device__ __forceinline__ bool barrier_wait(uint64_t* bar, uint32_t parity, const InputGate& gate) {
  int64_t start = -1;
  bool late = false, landed = false;
  for (unsigned tries = 1;; ++tries) {
    uint32_t done;
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(smem_address(bar)), "r"(parity) : "memory");
    if (done) {
      landed = true;
      break;
    }
    if (tries % 1024) continue;
    const int64_t now = global_ns();
    if (start < 0) start = now;
    if (now - start <= gate.timeout_ns) continue;
    if (late) break;
    gate.report(kCopyTimeout, -1, 0, parity);
    *gate.ok = false;
    late = true;
    start = now;
  }
  return __all_sync(0xffffffffu, landed);  // lanes that gave up near a late landing agree with the rest
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace mpk

namespace mpk {

constexpr int max_of(std::initializer_list<int> values) {
  int m = 0;
  for (int v : values) m = v > m ? v : m;
  return m;
}

}  // namespace mpk
