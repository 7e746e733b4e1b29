// Host side of a megakernel built with NVSHMEM: register this module's copy of NVSHMEM's device
// state (it links libnvshmem_device.a, so it has its own) with the host library, which
// vllm_mpk.runtime.nvshmem initialised. Until then nvshmem_ptr and the signals in this module see
// an empty state. Safe to call again; it never bootstraps NVSHMEM itself.
#pragma once
#include <nvshmem.h>
#include <nvshmemx.h>

namespace mpk {

// 0 on success; -1 when NVSHMEM was not initialised in this process; else NVSHMEM's status.
inline int nvshmem_attach() {
  if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_BOOTSTRAPPED) return -1;
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  return nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, 0, nullptr, version);
}

}  // namespace mpk
