// CUDA graphs for `stic::generate::cuda_graph`: c10's at::cuda::CUDAGraph behind a C ABI (tch has none).
// Compiled by build.rs when the CUDA headers are found; every function catches C++ exceptions and reports
// them as text, so that nothing unwinds into Rust.
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

namespace {

void write_error(char* err, size_t len, const std::string& what) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, what.c_str(), len - 1);
  err[len - 1] = '\0';
}

// Makes a device the current CUDA device while it lives, and restores the previous one after. c10's CUDAGuard
// would do, but it is header-only and calls the CUDA runtime directly, which the binary does not link.
class CurrentDevice {
 public:
  // Never throws (the callers are C functions): when the device cannot be set, the work on it reports the error.
  explicit CurrentDevice(c10::DeviceIndex index) {
    try {
      previous_ = c10::cuda::ExchangeDevice(index);
    } catch (const std::exception&) {
    }
  }
  ~CurrentDevice() {
    if (previous_ >= 0) c10::cuda::MaybeSetDevice(previous_);
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  c10::DeviceIndex previous_ = -1;
};

}  // namespace

extern "C" {

// A fresh memory-pool id for graphs that share their pool.
int stic_graph_pool(uint64_t* hi, uint64_t* lo, char* err, size_t err_len) {
  try {
    auto id = at::cuda::graph_pool_handle();
    *hi = id.first;
    *lo = id.second;
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Runs body(ctx) once on a side stream (warm-up: cuBLAS handles and workspaces of that stream, the allocator),
// then captures a second run into a graph in pool (hi, lo). Returns the graph, or null with the error in err.
// body returns 0 on success.
void* stic_graph_capture(int device, int (*body)(void*), void* ctx, uint64_t pool_hi, uint64_t pool_lo, char* err,
                         size_t err_len) {
  const auto index = static_cast<c10::DeviceIndex>(device);
  at::cuda::CUDAGraph* graph = nullptr;
  bool capturing = false;
  // The capture, its streams and the synchronisations act on the current device: make it the model's
  // (cuda:LOCAL_RANK under torchrun), and restore the caller's on return.
  const CurrentDevice on_device(index);
  const auto previous = c10::cuda::getCurrentCUDAStream(index);
  try {
    auto side = c10::cuda::getStreamFromPool(false, index);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(side);
    if (body(ctx) != 0) throw std::runtime_error("the warm-up run before the capture failed");
    c10::cuda::device_synchronize();
    graph = new at::cuda::CUDAGraph();
    graph->capture_begin({pool_hi, pool_lo});
    capturing = true;
    const int status = body(ctx);
    capturing = false;
    graph->capture_end();
    if (status != 0) throw std::runtime_error("the captured run failed");
    c10::cuda::setCurrentCUDAStream(previous);
    c10::cuda::device_synchronize();
    return graph;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  }
  try {
    if (capturing) graph->capture_end();
  } catch (const std::exception&) {
  }
  try {
    delete graph;
    c10::cuda::setCurrentCUDAStream(previous);
    c10::cuda::device_synchronize();
  } catch (const std::exception&) {
  }
  return nullptr;
}

// Replays a graph on the current stream of its device.
int stic_graph_replay(int device, void* graph, char* err, size_t err_len) {
  try {
    const CurrentDevice on_device(static_cast<c10::DeviceIndex>(device));
    static_cast<at::cuda::CUDAGraph*>(graph)->replay();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

void stic_graph_free(void* graph) {
  try {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
  } catch (const std::exception&) {
  }
}

// The device's memory, what libtorch's caching allocator holds of it, and what the driver reports free (what
// the CUDA contexts and other processes leave), in bytes.
int stic_cuda_memory(int device, uint64_t* total, uint64_t* reserved, uint64_t* free, char* err, size_t err_len) {
  try {
    const auto index = static_cast<c10::DeviceIndex>(device);
    *total = at::cuda::getDeviceProperties(index)->totalGlobalMem;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    *reserved = stats.reserved_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
    // cudaMemGetInfo of the CUDA runtime that libtorch loaded (the binary does not link it directly).
    using MemGetInfo = int (*)(size_t*, size_t*);
    static const auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
    if (mem_get_info == nullptr) throw std::runtime_error("cudaMemGetInfo not found in the loaded CUDA runtime");
    const CurrentDevice on_device(index);
    size_t free_bytes = 0, total_bytes = 0;
    if (mem_get_info(&free_bytes, &total_bytes) != 0) throw std::runtime_error("cudaMemGetInfo failed");
    *free = free_bytes;
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

}  // extern "C"
