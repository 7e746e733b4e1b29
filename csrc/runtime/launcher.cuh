// Host side: launch the megakernel on a stream. No torch headers: pointers arrive as integers.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include "worker.cuh"

namespace mpk {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// The address through which a kernel writes pinned host memory (cudaHostAlloc'd or registered).
inline uintptr_t mapped_device_pointer(uintptr_t host) {
  void* device = nullptr;
  check_cuda(cudaHostGetDevicePointer(&device, reinterpret_cast<void*>(host), 0), "mapping pinned host memory");
  return reinterpret_cast<uintptr_t>(device);
}

template <typename Kernel>
void launch_persistent(Kernel kernel, const KernelParams& params, int num_workers, int threads, int smem_bytes,
                       cudaStream_t stream) {
  static bool configured = false;
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
               "raising the megakernel's shared-memory limit");
    configured = true;
  }
  kernel<<<num_workers, threads, smem_bytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "launching the megakernel");
}

}  // namespace mpk
