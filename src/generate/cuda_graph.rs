//! CUDA graphs, through a small C++ shim (src/generate/cuda_graph.cpp) over c10's `at::cuda::CUDAGraph`: tch has
//! no API for them. The engine captures a decode step once per shape and replays it, so that the step's many
//! small kernels are launched by one call instead of one host call each. `build.rs` compiles the shim when it
//! finds the CUDA headers; without it, or off CUDA, [`available`] is false and the engine runs its steps eagerly.
//!
//! Also the device's memory as the caching allocator sees it, which sizes the engine's cache.
use tch::Device;

use crate::error::{Error, Result};

/// Whether graphs can be captured on `device`.
pub fn available(device: Device) -> bool {
    cfg!(stic_cuda_graphs) && device.is_cuda()
}

fn unavailable() -> Error {
    Error::Input("this stic was built without the CUDA shim (build.rs found no CUDA headers)".into())
}

/// Bytes of GPU memory: the device's total, what libtorch's caching allocator holds now, and what the driver
/// reports free (after the CUDA contexts and the other processes on the device).
pub fn memory(device: Device) -> Result<(u64, u64, u64)> {
    let Device::Cuda(index) = device else { return Err(Error::Input("not a CUDA device".into())) };
    imp::memory(index as i32)
}

/// A memory pool shared by the graphs of one engine: they never run at the same time and keep their outputs, so
/// one pool serves them all.
pub struct GraphPool(u64, u64);

impl GraphPool {
    pub fn new() -> Result<Self> {
        imp::pool().map(|(hi, lo)| GraphPool(hi, lo))
    }
}

/// A captured CUDA graph: replaying it reruns the captured kernels on the same tensors.
pub struct CudaGraph {
    raw: *mut std::ffi::c_void,
    device: i32,
}

impl CudaGraph {
    /// Runs `body` on a side stream once (warm-up), then captures a second run. `body` must only launch work on
    /// tensors that stay alive as long as the graph (no host synchronisation, no copies from the host).
    pub fn capture(device: Device, pool: &GraphPool, body: &mut dyn FnMut()) -> Result<CudaGraph> {
        let Device::Cuda(index) = device else { return Err(unavailable()) };
        imp::capture(index as i32, pool, body).map(|raw| CudaGraph { raw, device: index as i32 })
    }

    pub fn replay(&self) -> Result<()> {
        imp::replay(self.device, self.raw)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        imp::free(self.raw);
    }
}

#[cfg(stic_cuda_graphs)]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CStr};

    use super::GraphPool;
    use crate::error::{Error, Result};

    extern "C" {
        fn stic_graph_pool(hi: *mut u64, lo: *mut u64, err: *mut c_char, err_len: usize) -> c_int;
        fn stic_graph_capture(
            device: c_int,
            body: extern "C" fn(*mut c_void) -> c_int,
            ctx: *mut c_void,
            pool_hi: u64,
            pool_lo: u64,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        fn stic_graph_replay(device: c_int, graph: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
        fn stic_graph_free(graph: *mut c_void);
        fn stic_cuda_memory(
            device: c_int,
            total: *mut u64,
            reserved: *mut u64,
            free: *mut u64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    /// Calls a C function that reports failure with a message in a buffer.
    fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> bool) -> Result<()> {
        let mut buffer = vec![0 as c_char; 1024];
        if call(buffer.as_mut_ptr(), buffer.len()) {
            return Ok(());
        }
        let message = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned();
        Err(Error::Torch(tch::TchError::Torch(format!("CUDA graph {what}: {message}"))))
    }

    pub fn pool() -> Result<(u64, u64)> {
        let (mut hi, mut lo) = (0, 0);
        checked("pool", |err, len| unsafe { stic_graph_pool(&mut hi, &mut lo, err, len) } == 0)?;
        Ok((hi, lo))
    }

    extern "C" fn run_body(ctx: *mut c_void) -> c_int {
        // SAFETY: `capture` passes a pointer to its `&mut dyn FnMut()`, alive for the whole call.
        let body = unsafe { &mut *(ctx as *mut &mut dyn FnMut()) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    }

    pub fn capture(device: i32, pool: &GraphPool, mut body: &mut dyn FnMut()) -> Result<*mut c_void> {
        let ctx = &mut body as *mut &mut dyn FnMut() as *mut c_void;
        let mut graph = std::ptr::null_mut();
        checked("capture", |err, len| {
            graph = unsafe { stic_graph_capture(device, run_body, ctx, pool.0, pool.1, err, len) };
            !graph.is_null()
        })?;
        Ok(graph)
    }

    pub fn replay(device: i32, graph: *mut c_void) -> Result<()> {
        checked("replay", |err, len| unsafe { stic_graph_replay(device, graph, err, len) } == 0)
    }

    pub fn free(graph: *mut c_void) {
        unsafe { stic_graph_free(graph) }
    }

    pub fn memory(device: i32) -> Result<(u64, u64, u64)> {
        let (mut total, mut reserved, mut free) = (0, 0, 0);
        checked("memory", |err, len| unsafe {
            stic_cuda_memory(device, &mut total, &mut reserved, &mut free, err, len) == 0
        })?;
        Ok((total, reserved, free))
    }
}

#[cfg(not(stic_cuda_graphs))]
mod imp {
    use super::{unavailable, GraphPool};
    use crate::error::Result;

    pub fn pool() -> Result<(u64, u64)> {
        Err(unavailable())
    }

    pub fn capture(_device: i32, _pool: &GraphPool, _body: &mut dyn FnMut()) -> Result<*mut std::ffi::c_void> {
        Err(unavailable())
    }

    pub fn replay(_device: i32, _graph: *mut std::ffi::c_void) -> Result<()> {
        Err(unavailable())
    }

    pub fn free(_graph: *mut std::ffi::c_void) {}

    pub fn memory(_device: i32) -> Result<(u64, u64, u64)> {
        Err(unavailable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_cuda_there_are_no_graphs_and_capture_says_why() {
        assert!(!available(Device::Cpu));
        let mut ran = false;
        let pool = GraphPool(0, 0);
        assert!(CudaGraph::capture(Device::Cpu, &pool, &mut || ran = true).is_err());
        assert!(!ran, "nothing runs when no graph can be captured");
        assert!(memory(Device::Cpu).is_err());
    }
}
