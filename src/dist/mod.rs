//! Data-parallel runs on PyTorch's own distributed engine (c10d), as launched by `torchrun`.
//!
//! tch has no distributed API, so `build.rs` compiles a small C++ shim (src/dist/shim.cpp) against
//! libtorch's c10d: a `TCPStore` for the rendezvous, `ProcessGroupGloo` for CPU tensors and, when
//! the CUDA and NCCL headers were found at build time, `ProcessGroupNCCL` for CUDA tensors (otherwise
//! CUDA tensors go through gloo too).
//!
//! The group comes from the standard environment that `torchrun` sets: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (and `TORCHELASTIC_USE_AGENT_STORE` when torchrun's
//! agent hosts the store). Without `WORLD_SIZE`, or with `WORLD_SIZE=1`, there is no group.
//!
//! Settings, in seconds, from the environment:
//! - `STIC_DIST_TIMEOUT` (default 1800): how long one collective may wait for the others.
//! - `STIC_DIST_JOIN_TIMEOUT` (default 300): how long to wait for every rank to join.
//! - `STIC_DIST_PEER_TIMEOUT` (default 30): each rank beats a heartbeat in the store every second;
//!   a rank whose heartbeat stays still this long is taken as lost, and the others stop with a
//!   message naming it. A rank that dies outright is noticed at once by the collective it leaves
//!   hanging, and named from the heartbeats within about 3 s.
//!
//! `GLOO_SOCKET_IFNAME` picks gloo's network interfaces as in PyTorch; without it gloo binds to
//! the loopback address when `MASTER_ADDR` is a loopback address, and to this host's name otherwise.
use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::{Device, Tensor};

use crate::{Error, Result};

/// Gradients are all-reduced in flat buckets of about this many bytes.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Where and how to join the group, read from torchrun's environment.
#[derive(Debug, Clone)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// This process runs the TCPStore server (rank 0, unless torchrun's agent hosts the store).
    pub store_host: bool,
    /// Prefix of this run's keys in the store (torchrun's agent store outlives restarts).
    pub key_prefix: String,
    pub timeout_s: f64,
    pub join_timeout_s: f64,
    pub peer_timeout_s: f64,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_var<T: std::str::FromStr>(name: &str, what: &str) -> Result<Option<T>> {
    match var(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| Error::Distributed(format!("{name}={v} is not {what}"))),
    }
}

fn seconds(name: &str, default: f64) -> Result<f64> {
    let value = parse_var::<f64>(name, "a number of seconds")?.unwrap_or(default);
    if !(value > 0.0 && value.is_finite()) {
        return Err(Error::Distributed(format!("{name} must be a positive number of seconds")));
    }
    Ok(value)
}

impl DistEnv {
    /// None when `WORLD_SIZE` is unset or 1 (a single-process run).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_env_with(false)
    }

    /// As `from_env`; with `alone`, a group of one is made too (diagnostics of the backend on one device).
    pub fn from_env_with(alone: bool) -> Result<Option<DistEnv>> {
        let Some(world_size) = parse_var::<usize>("WORLD_SIZE", "a whole number")? else {
            return Ok(None);
        };
        if world_size == 0 {
            return Err(Error::Distributed("WORLD_SIZE must be at least 1".into()));
        }
        if world_size == 1 && !alone {
            return Ok(None);
        }
        let need = |name: &str| {
            var(name).ok_or_else(|| Error::Distributed(format!("WORLD_SIZE={world_size} but {name} is not set (launch with torchrun, or set RANK, MASTER_ADDR and MASTER_PORT)")))
        };
        let rank: usize =
            need("RANK")?.trim().parse().map_err(|_| Error::Distributed("RANK is not a whole number".into()))?;
        if rank >= world_size {
            return Err(Error::Distributed(format!("RANK={rank} is not below WORLD_SIZE={world_size}")));
        }
        let master_addr = need("MASTER_ADDR")?;
        let master_port: u16 = need("MASTER_PORT")?
            .trim()
            .parse()
            .map_err(|_| Error::Distributed("MASTER_PORT is not a port number".into()))?;
        let local_rank = parse_var::<usize>("LOCAL_RANK", "a whole number")?.unwrap_or(0);
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let run_id = var("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
        let restart = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            store_host: rank == 0 && !agent_store,
            key_prefix: format!("stic/{run_id}/{restart}"),
            timeout_s: seconds("STIC_DIST_TIMEOUT", 1800.0)?,
            join_timeout_s: seconds("STIC_DIST_JOIN_TIMEOUT", 300.0)?,
            peer_timeout_s: seconds("STIC_DIST_PEER_TIMEOUT", 30.0)?,
        }))
    }

    /// The address gloo binds to when `GLOO_SOCKET_IFNAME` is unset: loopback for a loopback master.
    fn bind_host(&self) -> String {
        let addr = self.master_addr.trim_start_matches('[').trim_end_matches(']');
        let loopback = addr == "localhost" || addr.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            if addr == "::1" {
                "::1".into()
            } else {
                "127.0.0.1".into()
            }
        } else {
            String::new()
        }
    }
}

#[cfg(stic_dist_shim)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn stic_dist_has_nccl() -> c_int;
        pub fn stic_dist_free_string(s: *mut c_char);
        #[allow(clippy::too_many_arguments)]
        pub fn stic_dist_init(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            store_host: c_int,
            key_prefix: *const c_char,
            ifnames: *const c_char,
            bind_host: *const c_char,
            timeout_ms: i64,
            join_timeout_ms: i64,
            peer_timeout_ms: i64,
            error: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn stic_dist_all_reduce_sum(pg: *mut c_void, tensor: *const c_void) -> *mut c_char;
        pub fn stic_dist_broadcast(pg: *mut c_void, tensor: *const c_void, root: c_int) -> *mut c_char;
        pub fn stic_dist_barrier(pg: *mut c_void) -> *mut c_char;
        pub fn stic_dist_finish(pg: *mut c_void) -> *mut c_char;
        pub fn stic_dist_destroy(pg: *mut c_void, failed: c_int);
    }
}

/// Stand-ins for a build without the shim (LIBTORCH unset at build time): joining a group fails.
#[cfg(not(stic_dist_shim))]
#[allow(clippy::too_many_arguments)]
mod ffi {
    use super::*;
    const UNAVAILABLE: &CStr = c"this stic was built without the c10d shim (LIBTORCH was not set when it was compiled)";
    pub unsafe fn stic_dist_has_nccl() -> c_int {
        0
    }
    pub unsafe fn stic_dist_free_string(_: *mut c_char) {}
    pub unsafe fn stic_dist_init(
        _: *const c_char,
        _: c_int,
        _: c_int,
        _: c_int,
        _: c_int,
        _: *const c_char,
        _: *const c_char,
        _: *const c_char,
        _: i64,
        _: i64,
        _: i64,
        error: *mut *mut c_char,
    ) -> *mut c_void {
        *error = UNAVAILABLE.as_ptr() as *mut c_char;
        std::ptr::null_mut()
    }
    pub unsafe fn stic_dist_all_reduce_sum(_: *mut c_void, _: *const c_void) -> *mut c_char {
        UNAVAILABLE.as_ptr() as *mut c_char
    }
    pub unsafe fn stic_dist_broadcast(_: *mut c_void, _: *const c_void, _: c_int) -> *mut c_char {
        UNAVAILABLE.as_ptr() as *mut c_char
    }
    pub unsafe fn stic_dist_barrier(_: *mut c_void) -> *mut c_char {
        UNAVAILABLE.as_ptr() as *mut c_char
    }
    pub unsafe fn stic_dist_finish(_: *mut c_void) -> *mut c_char {
        UNAVAILABLE.as_ptr() as *mut c_char
    }
    pub unsafe fn stic_dist_destroy(_: *mut c_void, _: c_int) {}
}

/// Takes ownership of an error string from the shim.
unsafe fn take_message(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    let message = CStr::from_ptr(s).to_string_lossy().into_owned();
    ffi::stic_dist_free_string(s);
    Some(message)
}

/// True when this build can run NCCL collectives on CUDA tensors.
pub fn has_nccl() -> bool {
    unsafe { ffi::stic_dist_has_nccl() != 0 }
}

/// The name of the backend that reduces tensors on `device`.
pub fn backend_for(device: Device) -> &'static str {
    if device.is_cuda() && has_nccl() {
        "nccl"
    } else {
        "gloo"
    }
}

/// This process's membership in the group. Collectives must be called by every rank in the same
/// order. End a successful run with [`ProcessGroup::finish`]; dropping the group without it tells
/// the other ranks that this one stopped on an error.
pub struct ProcessGroup {
    handle: *mut c_void,
    rank: usize,
    world_size: usize,
    local_rank: usize,
}

// The handle is used by one thread at a time (`&self` methods are called in program order); the shim's own
// heartbeat thread has a store connection of its own.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group described by torchrun's environment; None for a single-process run.
    pub fn from_env() -> Result<Option<ProcessGroup>> {
        Self::from_env_with(false)
    }

    /// As `from_env`; with `alone`, a torchrun world of one joins a group of one (`dist-check`).
    pub fn from_env_with(alone: bool) -> Result<Option<ProcessGroup>> {
        match DistEnv::from_env_with(alone)? {
            None => Ok(None),
            Some(env) => ProcessGroup::init(&env).map(Some),
        }
    }

    pub fn init(env: &DistEnv) -> Result<ProcessGroup> {
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| Error::Distributed(format!("{what} contains a NUL byte")))
        };
        let host = cstr(&env.master_addr, "MASTER_ADDR")?;
        let prefix = cstr(&env.key_prefix, "the store key prefix")?;
        let ifnames = cstr(&var("GLOO_SOCKET_IFNAME").unwrap_or_default(), "GLOO_SOCKET_IFNAME")?;
        let bind = cstr(&env.bind_host(), "MASTER_ADDR")?;
        let ms = |s: f64| (s * 1000.0).round() as i64;
        let mut error: *mut c_char = std::ptr::null_mut();
        let handle = unsafe {
            ffi::stic_dist_init(
                host.as_ptr(),
                env.master_port as c_int,
                env.rank as c_int,
                env.world_size as c_int,
                env.store_host as c_int,
                prefix.as_ptr(),
                ifnames.as_ptr(),
                bind.as_ptr(),
                ms(env.timeout_s),
                ms(env.join_timeout_s),
                ms(env.peer_timeout_s),
                &mut error,
            )
        };
        if handle.is_null() {
            let why = unsafe { take_message(error) }.unwrap_or_else(|| "unknown error".into());
            return Err(Error::Distributed(format!(
                "rank {} of {}: joining the group failed: {why}",
                env.rank, env.world_size
            )));
        }
        Ok(ProcessGroup { handle, rank: env.rank, world_size: env.world_size, local_rank: env.local_rank })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The rank within this host (torchrun's `LOCAL_RANK`): the GPU this rank should use.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0 writes logs and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// `cuda`/`cuda:N` becomes this rank's own GPU (`cuda:LOCAL_RANK`); other devices stay.
    pub fn device_for(&self, device: Device) -> Device {
        if device.is_cuda() {
            Device::Cuda(self.local_rank)
        } else {
            device
        }
    }

    fn check(&self, message: *mut c_char) -> Result<()> {
        match unsafe { take_message(message) } {
            None => Ok(()),
            Some(why) => Err(Error::Distributed(format!("rank {} of {}: {why}", self.rank, self.world_size))),
        }
    }

    /// Replaces `tensor` (in place, on every rank) by the sum of all ranks' tensors.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        self.check(unsafe { ffi::stic_dist_all_reduce_sum(self.handle, tensor.as_ptr() as *const c_void) })
    }

    /// Replaces a floating-point `tensor` (in place, on every rank) by the mean of all ranks' tensors.
    pub fn all_reduce_mean(&self, tensor: &Tensor) -> Result<()> {
        if !tensor.is_floating_point() {
            return Err(Error::Distributed(format!(
                "all_reduce_mean needs a floating-point tensor, not {:?}",
                tensor.kind()
            )));
        }
        self.all_reduce_sum(tensor)?;
        let _ = tensor.shallow_clone().f_div_scalar_(self.world_size as f64)?;
        Ok(())
    }

    /// Sums plain numbers (metrics) across ranks in f64.
    pub fn all_reduce_sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let t = Tensor::from_slice(values);
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t).expect("a CPU f64 tensor"))
    }

    /// Replaces `tensor` (in place) on every rank by rank `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::Distributed(format!("broadcast from rank {root} in a group of {}", self.world_size)));
        }
        self.check(unsafe { ffi::stic_dist_broadcast(self.handle, tensor.as_ptr() as *const c_void, root as c_int) })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.check(unsafe { ffi::stic_dist_barrier(self.handle) })
    }

    /// Averages `tensors` (gradients, usually) across ranks in place: flattened into buckets of about
    /// [`BUCKET_BYTES`] per device and dtype, each all-reduced as one tensor, copied back and divided by
    /// the world size. Every rank must pass tensors of the same shapes in the same order.
    pub fn all_reduce_mean_bucketed(&self, tensors: &[Tensor]) -> Result<()> {
        if let Some(i) = tensors.iter().position(|t| !t.defined()) {
            return Err(Error::Distributed(format!(
                "tensor {i} of the gradient all-reduce is undefined (a parameter got no gradient)"
            )));
        }
        for bucket in buckets(tensors, BUCKET_BYTES) {
            let bucket = &tensors[bucket];
            if let [single] = bucket {
                if single.is_contiguous() {
                    self.all_reduce_mean(single)?;
                    continue;
                }
            }
            let flat = Tensor::f_cat(&bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)?;
            self.all_reduce_mean(&flat)?;
            let mut offset = 0;
            for t in bucket {
                let n = t.numel() as i64;
                t.shallow_clone().f_copy_(&flat.narrow(0, offset, n).view_as(t))?;
                offset += n;
            }
        }
        Ok(())
    }

    /// The orderly end of a run: waits until every rank got here, then leaves the group.
    pub fn finish(mut self) -> Result<()> {
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        let result = self.check(unsafe { ffi::stic_dist_finish(handle) });
        unsafe { ffi::stic_dist_destroy(handle, result.is_err() as c_int) };
        result
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // Not finished: this rank is stopping early, which the others should report as such.
            unsafe { ffi::stic_dist_destroy(self.handle, 1) };
        }
    }
}

/// Splits `tensors` into runs of the same device and dtype of at most `limit` bytes (a larger tensor is a
/// bucket of its own).
fn buckets(tensors: &[Tensor], limit: usize) -> Vec<std::ops::Range<usize>> {
    let key = |t: &Tensor| (t.device(), t.kind());
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        if i > start && (key(t) != key(&tensors[start]) || size + bytes(t) > limit) {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += bytes(t);
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// What a single-process run uses as its "group": the numbers a caller needs without a group.
pub fn rank_and_world(group: Option<&ProcessGroup>) -> (usize, usize) {
    group.map_or((0, 1), |g| (g.rank(), g.world_size()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn buckets_split_by_size_and_kind() {
        let t = |n: i64, kind: Kind| Tensor::zeros([n], (kind, Device::Cpu));
        let tensors =
            vec![t(10, Kind::Float), t(10, Kind::Float), t(30, Kind::Float), t(5, Kind::Double), t(1, Kind::Double)];
        // 40-byte tensors fill an 80-byte bucket; the 120-byte one stands alone; the doubles start a new one.
        assert_eq!(buckets(&tensors, 80), vec![0..2, 2..3, 3..5]);
        assert_eq!(buckets(&tensors[..0], 80), Vec::<std::ops::Range<usize>>::new());
    }

    /// Two ranks as two threads of this process, on loopback.
    #[cfg(stic_dist_shim)]
    #[test]
    fn bucketed_mean_and_broadcast_between_two_threads() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ranks: Vec<_> = (0..2usize)
            .map(|rank| {
                std::thread::spawn(move || -> Result<Vec<Vec<f64>>> {
                    let env = DistEnv {
                        rank,
                        world_size: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        store_host: rank == 0,
                        key_prefix: "test".into(),
                        timeout_s: 60.0,
                        join_timeout_s: 60.0,
                        peer_timeout_s: 60.0,
                    };
                    let group = ProcessGroup::init(&env)?;
                    let r = rank as f64;
                    // Three buckets at 16 bytes: [a, b] (f32, 8 + 8 bytes), [c] (too big alone), [d] (f64).
                    let rf = rank as f32;
                    let a = Tensor::from_slice(&[1.0f32 + rf, 2.0]);
                    let b = Tensor::from_slice(&[10.0f32 * rf, 0.0, 3.0, 4.0])
                        .reshape([2, 2])
                        .transpose(0, 1)
                        .narrow(1, 0, 1)
                        .contiguous();
                    let c = Tensor::from_slice(&[r; 6]).to_kind(Kind::Float).reshape([2, 3]).transpose(0, 1); // not contiguous
                    let d = Tensor::from_slice(&[100.0 * r]);
                    let tensors = [a, b, c, d];
                    for range in buckets(&tensors, 16) {
                        assert!(range.len() <= 2);
                    }
                    group.all_reduce_mean_bucketed(&tensors)?;
                    let root = Tensor::from_slice(&[r + 5.0]);
                    group.broadcast(&root, 1)?;
                    group.barrier()?;
                    group.finish()?;
                    let mut out: Vec<Vec<f64>> = tensors
                        .iter()
                        .map(|t| Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap())
                        .collect();
                    out.push(Vec::<f64>::try_from(&root).unwrap());
                    Ok(out)
                })
            })
            .collect();
        let results: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], vec![vec![1.5, 2.0], vec![5.0, 0.0], vec![0.5; 6], vec![50.0], vec![6.0]]);
    }

    #[test]
    fn no_world_size_means_no_group() {
        // Reading the environment only; tests run with no torchrun variables set.
        if std::env::var_os("WORLD_SIZE").is_none() {
            assert!(DistEnv::from_env().unwrap().is_none());
        }
    }
}
