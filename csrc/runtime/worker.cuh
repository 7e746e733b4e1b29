// The persistent worker loop: one block per worker runs its queue of task records in order.
// Before a task: wait until each of its events reached trigger * (epoch + 1) (acquire). After it:
// signal each of its events (release). Every wait is bounded: on timeout the worker records the
// task and event in the control block, raises the error flag, and all workers leave.
//
// Counters only grow, modulo 2^32: after E launches event e holds triggers[e] * E, and launch E waits
// for triggers[e] * (E + 1). Comparisons take the signed difference, so the wrap after ~2^32
// signals is harmless (a counter is never more than one launch's signals away from its target).
// The epoch counts completed launches: workers read it on entry, and the last worker to finish
// advances it, so a CUDA graph can replay the launch without any host write.
#pragma once
#include <cstdint>
#include "../tasks/common.cuh"

namespace mpk {

// Control block words (mirrored in vllm_mpk/runtime/control.py).
enum Control : int {
  kEpoch = 0, kDone = 1, kError = 2, kErrWorker = 3, kErrTask = 4, kErrEvent = 5, kErrSeen = 6, kErrWanted = 7,
  kControlWords = 8
};
enum ErrorCode : int { kOk = 0, kTimeout = 1 };

struct KernelParams {
  const int32_t* tasks;       // [num_workers][max_tasks][record words]
  const int32_t* queue_lens;  // [num_workers]
  void* const* tensors;       // tensor pointers by plan tensor id
  int32_t* counters;          // [num_events], monotonic
  const int32_t* triggers;    // [num_events]
  int32_t* control;           // [kControlWords]
  int64_t* profile;           // null, or [num_workers][max_tasks][2] start/end (globaltimer ns)
  int32_t num_tokens;
  int32_t max_tasks;
  int64_t timeout_ns;
};

__device__ __forceinline__ int64_t global_ns() {
  int64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int32_t load_acquire(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void add_release(int32_t* p, int32_t v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ bool reached(int32_t seen, uint32_t wanted) {
  return static_cast<int32_t>(static_cast<uint32_t>(seen) - wanted) >= 0;
}

// Thread 0 spins until counters[e] reaches wanted; returns false after a timeout or another worker's error.
// The clock and the error flag are read only every 256 polls, off the fast path.
__device__ inline bool wait_event(const KernelParams& p, int event, uint32_t wanted, int task) {
  int64_t start = -1;
  int32_t seen;
  for (unsigned spins = 1; !reached(seen = load_acquire(p.counters + event), wanted); ++spins) {
    if (spins % 256) continue;
    if (load_acquire(p.control + kError) != kOk) return false;
    const int64_t now = global_ns();
    if (start < 0) start = now;
    if (now - start > p.timeout_ns) {
      if (atomicCAS(p.control + kError, kOk, kTimeout) == kOk) {
        p.control[kErrWorker] = blockIdx.x;
        p.control[kErrTask] = task;
        p.control[kErrEvent] = event;
        p.control[kErrSeen] = seen;
        p.control[kErrWanted] = static_cast<int32_t>(wanted);
      }
      return false;
    }
  }
  return true;
}

// Ask L2 to fetch a task's first weight bytes, so that they stream while the task still waits for
// its inputs (weights never wait for activations). One thread issues it; the copy engine does the rest.
template <typename Record>
__device__ __forceinline__ void prefetch_weights(const KernelParams& p, const Record& r) {
  if (r.prefetch_tensor < 0) return;
  const char* base = static_cast<const char*>(p.tensors[r.prefetch_tensor]) + (int64_t)r.prefetch_offset16 * 16;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base), "r"(r.prefetch_len16 * 16) : "memory");
}

// Record: {opcode, variant, task id, prefetch tensor, offset/16, bytes/16, waits[MAX_WAITS],
// signals[MAX_SIGNALS], args[...]}, -1 padded.
template <typename Record, typename Dispatch, int NT>
__device__ void worker_loop(const KernelParams& p) {
  extern __shared__ __align__(16) char smem[];
  __shared__ int32_t epoch_s;
  __shared__ bool ok_s;
  if (threadIdx.x == 0) {
    epoch_s = load_acquire(p.control + kEpoch);
    ok_s = true;
  }
  __syncthreads();
  const uint32_t epoch = static_cast<uint32_t>(epoch_s);
  const int n = p.queue_lens[blockIdx.x];
  const Record* queue = reinterpret_cast<const Record*>(p.tasks) + (size_t)blockIdx.x * p.max_tasks;
  for (int i = 0; i < n; ++i) {
    const Record& r = queue[i];
    if (threadIdx.x == 0) {
      if (i == 0) prefetch_weights(p, r);
      if (i + 1 < n) prefetch_weights(p, queue[i + 1]);
      for (int w = 0; w < Record::kMaxWaits && r.waits[w] >= 0 && ok_s; ++w)
        ok_s = wait_event(p, r.waits[w], static_cast<uint32_t>(p.triggers[r.waits[w]]) * (epoch + 1u), r.task);
      if (p.profile) p.profile[((size_t)blockIdx.x * p.max_tasks + i) * 2] = global_ns();
    }
    __syncthreads();
    if (!ok_s) return;
    TaskContext c{r.args, p.tensors, p.num_tokens, smem};
    Dispatch::run(r.variant, c);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      for (int s = 0; s < Record::kMaxSignals && r.signals[s] >= 0; ++s) add_release(p.counters + r.signals[s], 1);
      if (p.profile) p.profile[((size_t)blockIdx.x * p.max_tasks + i) * 2 + 1] = global_ns();
    }
  }
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.control + kDone, 1) == static_cast<int32_t>(gridDim.x) - 1) {
      p.control[kDone] = 0;  // every worker has counted; the next launch starts after this one ends
      atomicExch(p.control + kEpoch, static_cast<int32_t>(epoch + 1u));
    }
  }
}

}  // namespace mpk
