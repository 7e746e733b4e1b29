// Moving a tile to the other tensor-parallel ranks over NVSHMEM (built with MPK_WITH_NVSHMEM only:
// -rdc=true, linked with libnvshmem_device.a; see vllm_mpk/codegen/source.py).
//
// A collective tile on rank r writes its rows into slot r of every PE's copy of a symmetric buffer
// (plain stores through nvshmem_ptr where the PE is load/store reachable, NVSHMEM puts otherwise),
// fences, then adds 2 to that PE's signal word for the tile; it then waits until its own word
// reached 2 * world per launch (events.cuh: wait_peers) and reads the slots.
//
// Buffers and signal words are per op and per tile, and doubled by launch parity (epoch & 1):
// a rank may finish launch E and start E + 1 while a slower peer still reads E's slots, or still
// waits on E's signal; E + 1 writes the other half, so it neither overwrites data nor adds to a
// signal that E is still counting. E + 2 (the same half as E) cannot start on any rank before
// every rank finished E: E + 1's collectives need every rank's contribution to E + 1, which each
// rank sends only after its launch E ended.
#pragma once
#include <cstdint>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "events.cuh"

namespace mpk {

// Block-wide: rows x `bytes_per_row` from `src` (row stride `src_stride` bytes) to `dst` (a
// symmetric address; row stride `dst_stride` bytes) on PE `pe`. Returns whether plain stores did it
// (the caller then orders them with a system fence) or NVSHMEM puts (ordered with nvshmem_fence).
__device__ inline bool push_rows(char* dst, const char* src, int rows, int bytes_per_row, int64_t dst_stride,
                                 int64_t src_stride, int pe) {
  char* peer = static_cast<char*>(nvshmem_ptr(dst, pe));
  if (peer == nullptr) {
    for (int b = 0; b < rows; ++b)
      nvshmemx_putmem_nbi_block(dst + b * dst_stride, src + b * src_stride, bytes_per_row, pe);
    return false;
  }
  const bool vectors = ((bytes_per_row | dst_stride | src_stride) % 16) == 0 &&
                       (reinterpret_cast<uintptr_t>(peer) | reinterpret_cast<uintptr_t>(src)) % 16 == 0;
  if (vectors) {
    const int per_row = bytes_per_row / 16;
    for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
      const int b = i / per_row, v = i % per_row;
      reinterpret_cast<uint4*>(peer + b * dst_stride)[v] = reinterpret_cast<const uint4*>(src + b * src_stride)[v];
    }
  } else {
    for (int i = threadIdx.x; i < rows * bytes_per_row; i += blockDim.x) {
      const int b = i / bytes_per_row, v = i % bytes_per_row;
      peer[b * dst_stride + v] = src[b * src_stride + v];
    }
  }
  return true;
}

// Block-wide, after every push of the tile: make the pushes visible, then add 1 to `signal` on
// every PE. Thread 0 fences and signals once the whole block's stores are done.
__device__ inline void signal_peers(uint64_t* signal, int world, int rank) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // plain stores to peers (and their cumulativity over the block)
    nvshmem_fence();         // puts through NVSHMEM's transports, before the signals below
    for (int k = 0; k < world; ++k) nvshmemx_signal_op(signal, 2, NVSHMEM_SIGNAL_ADD, (rank + k) % world);
  }
}

// This launch's half of a parity-doubled exchange buffer or signal array of `half` elements.
template <typename T>
__device__ __forceinline__ T* launch_half(T* base, size_t half, const InputGate* gate) {
  return base + (gate->epoch & 1u) * half;
}

// A 16-byte load that bypasses L1: slots are written by other GPUs during the kernel.
__device__ __forceinline__ uint4 load_peer_written(const void* p) { return __ldcg(static_cast<const uint4*>(p)); }

}  // namespace mpk
