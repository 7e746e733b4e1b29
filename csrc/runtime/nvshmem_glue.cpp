// Host-side NVSHMEM for Python (vllm_mpk/runtime/nvshmem.py): bootstrap from a unique id, query
// the PE, symmetric malloc/free, barrier, finalize. Host library only (libnvshmem_host): the
// megakernels that use NVSHMEM on the device link the device library themselves and register
// their own device state once this module has initialised the library.
#include <pybind11/pybind11.h>
#include <nvshmem_host.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

void check(int status, const char* what) {
  if (status != 0) throw std::runtime_error(std::string("NVSHMEM ") + what + " failed with status " +
                                            std::to_string(status));
}

py::bytes unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  check(nvshmemx_get_uniqueid(&id), "get_uniqueid");
  return py::bytes(reinterpret_cast<const char*>(&id), sizeof(id));
}

// Collective over the `world` processes holding the same id; the CUDA device must be set first.
void init(const std::string& raw, int rank, int world) {
  if (raw.size() != sizeof(nvshmemx_uniqueid_t))
    throw std::invalid_argument("an NVSHMEM unique id has " + std::to_string(sizeof(nvshmemx_uniqueid_t)) +
                                " bytes, got " + std::to_string(raw.size()));
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, raw.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  check(nvshmemx_set_attr_uniqueid_args(rank, world, &id, &attr), "set_attr_uniqueid_args");
  check(nvshmemx_hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr), "init with a unique id");
}

uintptr_t symmetric_malloc(size_t bytes) {
  void* p = nvshmem_malloc(bytes);
  if (p == nullptr && bytes > 0)
    throw std::runtime_error("nvshmem_malloc(" + std::to_string(bytes) + ") failed: the symmetric heap is "
                             "full (raise NVSHMEM_SYMMETRIC_SIZE) or the PEs disagree on the size");
  return reinterpret_cast<uintptr_t>(p);
}

}  // namespace

// The collective calls (init, malloc, barrier_all) release the GIL: they wait for every PE, and
// the Python side bounds that wait from another thread.
PYBIND11_MODULE(MPK_MODULE_NAME, m) {
  using released = py::call_guard<py::gil_scoped_release>;
  m.def("unique_id", &unique_id, "A fresh NVSHMEM unique id (bytes) for init on every PE.");
  m.def("init", &init, py::arg("unique_id"), py::arg("rank"), py::arg("world"), released());
  m.def("init_status", []() { return nvshmemx_init_status(); });
  m.def("my_pe", []() { return nvshmem_my_pe(); });
  m.def("n_pes", []() { return nvshmem_n_pes(); });
  m.def("malloc", &symmetric_malloc, py::arg("bytes"), "Collective: every PE allocates the same size.", released());
  m.def("free", [](uintptr_t p) { nvshmem_free(reinterpret_cast<void*>(p)); }, "Collective, like malloc.");
  m.def("ptr", [](uintptr_t p, int pe) { return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(p), pe)); },
        "The address of a peer's copy of a symmetric object, or 0 when it is not load/store reachable.");
  m.def("barrier_all", []() { nvshmem_barrier_all(); }, released());
  m.def("finalize", []() { nvshmemx_hostlib_finalize(); });
}
