// Event counters and the input gate of a task.
//
// Counters only grow, modulo 2^32: after E launches event e holds triggers[e] * E, and launch E waits
// for triggers[e] * (E + 1). Comparisons take the signed difference, so the wrap after ~2^32
// signals is harmless (a counter is never more than one launch's signals away from its target).
//
// A task's gate waits for its input events. The worker opens it before a task body runs, except
// for bodies that open it themselves (linear, attention): those first issue the loads that do not
// depend on their inputs (weights, KV history, step inputs), so the loads stream while the gate
// waits. Every wait is bounded by the plan's timeout, these and the bulk-copy waits of task bodies
// (tasks/common.cuh: barrier_wait) alike: on timeout the gate records the error, the worker and
// task and what was waited for in the control block, raises the error flag (and its mirror in
// host memory, which the host reads without a CUDA call), and the worker leaves.
#pragma once
#include <cstdint>

namespace mpk {

// Control block words (mirrored in vllm_mpk/runtime/control.py).
enum Control : int {
  kEpoch = 0, kDone = 1, kError = 2, kErrWorker = 3, kErrTask = 4, kErrEvent = 5, kErrSeen = 6, kErrWanted = 7,
  kControlWords = 8
};
// kPeerTimeout: a collective tile waited too long for the other ranks (kErrEvent holds its signal index).
// kCopyTimeout: a bulk copy into shared memory did not land (kErrEvent -1, kErrWanted the phase's parity).
// Mirrored in vllm_mpk/runtime/control.py.
enum ErrorCode : int { kOk = 0, kTimeout = 1, kPeerTimeout = 2, kCopyTimeout = 3 };

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

// A word that other GPUs write (NVSHMEM signals): acquire at system scope.
__device__ __forceinline__ int32_t load_acquire_sys(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void add_release(int32_t* p, int32_t v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ bool reached(int32_t seen, uint32_t wanted) {
  return static_cast<int32_t>(static_cast<uint32_t>(seen) - wanted) >= 0;
}

struct InputGate {
  const int32_t* waits;  // the record's events, -1 padded
  int max_waits;
  const int32_t* counters;
  const int32_t* triggers;
  int32_t* control;
  int32_t* error_host;  // null, or a host-mapped word that mirrors control[kError]
  uint32_t epoch;
  int task;
  int64_t timeout_ns;
  int64_t* profile_start;  // null, or where the task's start time goes
  bool* ok;                // shared: false once a wait failed
  bool* opened;            // shared: the gate has been opened for this task

  // Thread 0 spins until load() reaches wanted; false after a timeout or another worker's error,
  // which it records as `code` with `what` (an event, or a collective's signal index).
  // The clock and the error flag are read only every 256 polls, off the fast path.
  template <typename Load>
  __device__ bool spin(Load load, int what, uint32_t wanted, int code) const {
    int64_t start = -1;
    int32_t seen;
    for (unsigned spins = 1; !reached(seen = load(), wanted); ++spins) {
      if (spins % 256) continue;
      if (load_acquire(control + kError) != kOk) return false;
      const int64_t now = global_ns();
      if (start < 0) start = now;
      if (now - start > timeout_ns) {
        report(code, what, seen, wanted);
        return false;
      }
    }
    return true;
  }

  // The one error path of every bounded wait: the launch's first error (later ones, e.g. the
  // workers that stop because of it, leave its words alone) with this worker, this task, `what`
  // was waited for and the count seen and wanted; then the host's word.
  __device__ void report(int code, int what, int32_t seen, uint32_t wanted) const {
    if (atomicCAS(control + kError, kOk, code) != kOk) return;
    control[kErrWorker] = blockIdx.x;
    control[kErrTask] = task;
    control[kErrEvent] = what;
    control[kErrSeen] = seen;
    control[kErrWanted] = static_cast<int32_t>(wanted);
    if (error_host != nullptr) {
      __threadfence_system();  // the control words above before the host's word
      *reinterpret_cast<volatile int32_t*>(error_host) = code;
    }
  }

  __device__ bool wait_event(int event, uint32_t wanted) const {
    return spin([&] { return load_acquire(counters + event); }, event, wanted, kTimeout);
  }

  // Every thread calls this: thread 0 waits until a collective's 64-bit signal word of this
  // launch's parity, to which each of `world` ranks adds 2 in every launch of that parity
  // (runtime/peers.cuh), reached 2 * world * ((epoch >> 1) + 1), compared modulo 2^32 like the
  // events (adding 2 keeps that exact across the epoch's wrap for any world size). Returns false
  // when the kernel is stopping.
  __device__ bool wait_peers(const uint64_t* signal, int index, uint32_t world) const {
    if (threadIdx.x == 0 && *ok) {
      const int32_t* low = reinterpret_cast<const int32_t*>(signal);  // little-endian: the low half
      const uint32_t wanted = 2u * world * ((epoch >> 1) + 1u);
      *ok = spin([&] { return load_acquire_sys(low); }, index, wanted, kPeerTimeout);
    }
    __syncthreads();
    return *ok;
  }

  // Every thread of the block calls this once per task; it returns when the task's inputs are
  // ready (true) or the kernel is stopping (false).
  // A wait word -(e + 2) is for event e's signals of the previous step (a multi-step plan's
  // carried tokens): trigger * epoch.
  __device__ bool open() const {
    if (threadIdx.x == 0) {
      for (int w = 0; w < max_waits && waits[w] != -1 && *ok; ++w) {
        const bool previous = waits[w] < -1;
        const int event = previous ? -waits[w] - 2 : waits[w];
        *ok = wait_event(event, static_cast<uint32_t>(triggers[event]) * (epoch + (previous ? 0u : 1u)));
      }
      if (profile_start) *profile_start = global_ns();
      *opened = true;
    }
    __syncthreads();
    return *ok;
  }
};

}  // namespace mpk
