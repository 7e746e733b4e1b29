// The persistent worker loop: one block per worker runs its queue of task records in order, once
// per decode step of the launch (`steps`: 1, or more for a multi-step plan, whose first task moves
// the decoding state on). Before a task's body reads its inputs, the task's gate waits until each
// of its events reached trigger * (epoch + 1) (acquire; events.cuh). After the task: signal each of
// its events (release). The epoch counts completed steps: workers read it on entry, step s of the
// launch runs at epoch + s, and the last worker to finish advances it by `steps`, so a CUDA graph
// can replay the launch without any host write.
#pragma once
#include <cstdint>
#include "../tasks/common.cuh"

namespace mpk {

struct KernelParams {
  const int32_t* tasks;       // [num_workers][max_tasks][record words]
  const int32_t* queue_lens;  // [num_workers]
  void* const* tensors;       // tensor pointers by plan tensor id
  int32_t* counters;          // [num_events], monotonic
  const int32_t* triggers;    // [num_events]
  int32_t* control;           // [kControlWords]
  int32_t* error_host;        // null, or a host-mapped word: the error code, for the host to poll
  int64_t* profile;           // null, or [num_workers][max_tasks][2] start/end (globaltimer ns)
  int32_t num_tokens;
  int32_t steps;              // decode steps in this launch
  int32_t max_tasks;
  int32_t prefetch_ahead;     // a task's weights are asked of L2 when the task this many places before it starts
  int32_t prefetch_landed;    // 1: instead, once that task's own weights have landed (TaskContext::weights_landed)
  int64_t timeout_ns;
};

// A task's first weight bytes to ask of L2, so that they stream while the task still waits for its
// inputs (weights never wait for activations): {null, 0} where the record names none.
template <typename Record>
__device__ __forceinline__ LandedPrefetch weight_region(const KernelParams& p, const Record& r, bool* asked) {
  if (r.prefetch_tensor < 0 || r.prefetch_len16 == 0) return {nullptr, 0, asked};
  return {static_cast<const char*>(p.tensors[r.prefetch_tensor]) + (int64_t)r.prefetch_offset16 * 16,
          static_cast<uint32_t>(r.prefetch_len16) * 16, asked};
}

// Ask L2 for a task's weight region now (one thread issues it; the copy engine does the rest).
template <typename Record>
__device__ __forceinline__ void prefetch_weights(const KernelParams& p, const Record& r) {
  const LandedPrefetch w = weight_region(p, r, nullptr);
  if (w.base != nullptr) prefetch_l2(w.base, w.bytes);
}

// Record: {opcode, variant, task id, prefetch tensor, offset/16, bytes/16, waits[MAX_WAITS],
// signals[MAX_SIGNALS], args[...]}, -1 padded.
template <typename Record, typename Dispatch, int NT>
__device__ void worker_loop(const KernelParams& p) {
  __shared__ int32_t epoch_s;
  __shared__ bool ok_s, opened_s, asked_s;
  if (threadIdx.x == 0) {
    epoch_s = load_acquire(p.control + kEpoch);
    ok_s = true;
  }
  __syncthreads();
  const uint32_t first_epoch = static_cast<uint32_t>(epoch_s);
  const int n = p.queue_lens[blockIdx.x];
  const Record* queue = reinterpret_cast<const Record*>(p.tasks) + (size_t)blockIdx.x * p.max_tasks;
  for (int step = 0; step < p.steps; ++step) {
    const uint32_t epoch = first_epoch + static_cast<uint32_t>(step);
    for (int i = 0; i < n; ++i) {
      const Record& r = queue[i];
      const bool ahead = p.prefetch_ahead > 0 && i + p.prefetch_ahead < n;
      if (threadIdx.x == 0) {
        if (i == 0)
          for (int d = 0; d < p.prefetch_ahead && d < n; ++d) prefetch_weights(p, queue[d]);
        if (ahead && !p.prefetch_landed) prefetch_weights(p, queue[i + p.prefetch_ahead]);
        asked_s = false;
        opened_s = false;
      }
      __syncthreads();  // the previous task is done with shared memory and the gate flags
      int64_t* profile_start = p.profile ? p.profile + ((size_t)blockIdx.x * p.max_tasks + i) * 2 : nullptr;
      const InputGate gate{r.waits, Record::kMaxWaits, p.counters, p.triggers, p.control, p.error_host, epoch, r.task,
                           p.timeout_ns, profile_start, &ok_s, &opened_s};
      const LandedPrefetch landed = ahead && p.prefetch_landed ? weight_region(p, queue[i + p.prefetch_ahead], &asked_s)
                                                               : LandedPrefetch{nullptr, 0, &asked_s};
      TaskContext c{r.args, p.tensors, p.num_tokens, &gate, landed};
      Dispatch::run(r.variant, c);
      landed.ask();  // a body with no weights of its own, or that did not say when they landed
      __syncthreads();
      if (!opened_s) gate.open();  // a body that skipped its gate must not signal before its inputs
      if (!ok_s) return;
      if (threadIdx.x == 0) {  // the barrier above and the release order every thread's writes before the signal
        for (int s = 0; s < Record::kMaxSignals && r.signals[s] >= 0; ++s) add_release(p.counters + r.signals[s], 1);
        if (profile_start) profile_start[1] = global_ns();  // the task's end
      }
    }
  }
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.control + kDone, 1) == static_cast<int32_t>(gridDim.x) - 1) {
      p.control[kDone] = 0;  // every worker has counted; the next launch starts after this one ends
      atomicExch(p.control + kEpoch, static_cast<int32_t>(first_epoch + static_cast<uint32_t>(p.steps)));
    }
  }
}

}  // namespace mpk
