// All-reduce of a column block [rows, c0:c1) of a [batch, width] bf16 activation.
//
// allreduce_task: one rank (world size 1, no NVSHMEM): a copy.
// allreduce_nvshmem_task (MPK_WITH_NVSHMEM): rank r pushes its part of the block into slot r of
// every PE's receive buffer recv[2, world, batch, width] (this launch's parity half; signal words
// [2, tiles] likewise), signals each PE's word for this tile, waits
// until all ranks signalled its own word this launch, then sums slots 0..world-1 in rank order in
// float (the same order on every rank: identical, deterministic results) into out. At world size
// 1 the sum is the part itself, bit for bit. See runtime/peers.cuh for the ordering argument.
#pragma once
#include "common.cuh"
#ifdef MPK_WITH_NVSHMEM
#include "../runtime/peers.cuh"
#endif

namespace mpk {

// AllReduceArgs::k* name the argument words; the generated source declares them from the one layout in
// vllm_mpk/codegen/ops/allreduce.py.

template <int NT>
__device__ void allreduce_task(const TaskContext& c) {
  const __nv_bfloat16* x = c.ptr<const __nv_bfloat16>(AllReduceArgs::kInput);
  __nv_bfloat16* out = c.ptr<__nv_bfloat16>(AllReduceArgs::kOutput);
  const int c0 = c.arg(AllReduceArgs::kColStart), width = c.arg(AllReduceArgs::kColEnd) - c0;
  const int stride = c.arg(AllReduceArgs::kWidth);
  for (int i = threadIdx.x; i < c.num_tokens * width; i += NT) {
    const size_t at = (size_t)(i / width) * stride + c0 + i % width;
    out[at] = x[at];
  }
}

#ifdef MPK_WITH_NVSHMEM
template <int NT>
__device__ __noinline__ void allreduce_nvshmem_task(const TaskContext& c) {
  using bf16 = __nv_bfloat16;
  const bf16* part = c.ptr<const bf16>(AllReduceArgs::kInput);
  bf16* out = c.ptr<bf16>(AllReduceArgs::kOutput);
  const int c0 = c.arg(AllReduceArgs::kColStart), width = c.arg(AllReduceArgs::kColEnd) - c0;
  const int stride = c.arg(AllReduceArgs::kWidth), world = c.arg(AllReduceArgs::kWorld);
  const int rank = c.arg(AllReduceArgs::kRank), rows = c.num_tokens;
  const size_t slot = (size_t)c.arg(AllReduceArgs::kBatch) * stride;  // elements per rank's slot
  bf16* recv = launch_half(c.ptr<bf16>(AllReduceArgs::kRecv), world * slot, c.gate);
  uint64_t* signal = launch_half(c.ptr<uint64_t>(AllReduceArgs::kSignal), c.arg(AllReduceArgs::kTiles), c.gate) +
                     c.arg(AllReduceArgs::kTile);
  const int64_t row_bytes = (int64_t)stride * sizeof(bf16);
  char* mine = reinterpret_cast<char*>(recv + rank * slot + c0);
  for (int k = 0; k < world; ++k)
    push_rows(mine, reinterpret_cast<const char*>(part + c0), rows, width * (int)sizeof(bf16), row_bytes,
              row_bytes, (rank + k) % world);
  signal_peers(signal, world, rank);
  if (!c.gate->wait_peers(signal, c.arg(AllReduceArgs::kTile), static_cast<uint32_t>(world))) return;
  if (width % 8 == 0 && stride % 8 == 0 && c0 % 8 == 0) {
    const int per_row = width / 8;
    for (int i = threadIdx.x; i < rows * per_row; i += NT) {
      const size_t at = (size_t)(i / per_row) * stride + c0 + (i % per_row) * 8;
      float acc[8], f[8];
      const uint4 first = load_peer_written(recv + at);
      unpack(*reinterpret_cast<const Bf16x8*>(&first), acc);  // slot 0 as is: -0 and NaN survive at world 1
      for (int w = 1; w < world; ++w) {
        const uint4 v = load_peer_written(recv + w * slot + at);
        unpack(*reinterpret_cast<const Bf16x8*>(&v), f);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += f[j];
      }
      *reinterpret_cast<Bf16x8*>(out + at) = pack(acc);
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * width; i += NT) {
    const size_t at = (size_t)(i / width) * stride + c0 + i % width;
    float acc = __bfloat162float(__ldcg(recv + at));
    for (int w = 1; w < world; ++w) acc += __bfloat162float(__ldcg(recv + w * slot + at));
    out[at] = __float2bfloat16_rn(acc);
  }
}
#endif

}  // namespace mpk
