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

// The cold path, for a PE that loads and stores cannot reach (another node): NVSHMEM puts. Kept
// out of line, like every NVSHMEM call, so that the megakernel's hot loops do not pay for the
// call ABI (inlined, these calls made the whole kernel spill registers).
static __device__ __noinline__ void put_rows(char* dst, const char* src, int rows, int bytes_per_row, int64_t dst_stride,
                                             int64_t src_stride, int pe) {
  for (int b = 0; b < rows; ++b)
    nvshmemx_putmem_nbi_block(dst + b * dst_stride, src + b * src_stride, bytes_per_row, pe);
}

static __device__ __noinline__ void put_signal(uint64_t* signal, uint64_t value, int pe) {
  nvshmem_fence();  // this PE's earlier puts land before the signal
  nvshmemx_signal_op(signal, value, NVSHMEM_SIGNAL_ADD, pe);
}

// Block-wide: rows x `bytes_per_row` from `src` (row stride `src_stride` bytes) to `dst` (a
// symmetric address; row stride `dst_stride` bytes) on PE `pe`: plain stores through the address
// nvshmem_ptr maps (NVLink or PCIe peer, or this PE), else NVSHMEM puts.
__device__ inline void push_rows(char* dst, const char* src, int rows, int bytes_per_row, int64_t dst_stride,
                                 int64_t src_stride, int pe) {
  char* peer = static_cast<char*>(nvshmem_ptr(dst, pe));
  if (peer == nullptr) {
    put_rows(dst, src, rows, bytes_per_row, dst_stride, src_stride, pe);
    return;
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
}

__device__ __forceinline__ void add_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Block-wide, after every push of the tile: make the pushes visible, then add 2 to `signal` on
// every PE. Thread 0 signals once the whole block's stores are done: a system-scope fence (its
// cumulativity covers the block's stores, ordered before it by the barrier), then a release add
// through the mapped address, or NVSHMEM's fence and signal for an unmapped PE.
__device__ inline void signal_peers(uint64_t* signal, int world, int rank) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    for (int k = 0; k < world; ++k) {
      const int pe = (rank + k) % world;
      uint64_t* peer = static_cast<uint64_t*>(nvshmem_ptr(signal, pe));
      if (peer != nullptr) {
        add_release_sys(peer, 2);
      } else {
        put_signal(signal, 2, pe);
      }
    }
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
