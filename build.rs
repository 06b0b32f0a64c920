//! Links the `stic` binary against the libtorch that torch-sys found, so that it runs without LD_LIBRARY_PATH
//! and sees CUDA when the libtorch build has it, and compiles the C and C++ shims: c10d behind `stic::dist`
//! (src/dist/shim.cpp: gloo; src/dist/shim_nccl.cpp: NCCL, when the CUDA and NCCL headers are there), CUDA graphs
//! behind `stic::generate::cuda_graph` (src/generate/cuda_graph.cpp, when the CUDA headers are there), and the JPEG
//! decoder's C side (src/image/jpeg.c) against the libjpeg-turbo that turbojpeg-sys builds.
use std::path::{Path, PathBuf};

/// `STIC_PROFILES`: the shipped profiles of `stic reproduce --profile`, the folders under configs/ that hold a
/// reproduce.yaml (comma-separated, sorted).
fn list_profiles() {
    println!("cargo:rerun-if-changed=configs");
    let mut names: Vec<String> = std::fs::read_dir("configs")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.path().join("reproduce.yaml").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    println!("cargo:rustc-env=STIC_PROFILES={}", names.join(","));
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NCCL_HOME");
    println!("cargo:rerun-if-env-changed=STIC_NO_NCCL");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    println!("cargo:rerun-if-changed=src/dist/shim_nccl.cpp");
    println!("cargo:rerun-if-changed=src/dist/gloo_decls");
    println!("cargo:rerun-if-changed=src/generate/cuda_graph.cpp");
    // Set when the shim is compiled: without it `stic::dist` reports that distributed runs are unavailable.
    println!("cargo::rustc-check-cfg=cfg(stic_dist_shim)");
    // Set when the CUDA graph shim is compiled: without it the generation engine runs every step eagerly.
    println!("cargo::rustc-check-cfg=cfg(stic_cuda_graphs)");
    list_profiles();
    build_jpeg_decoder();
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run `make setup` or point LIBTORCH at a libtorch 2.11 folder");
        return;
    };
    let libtorch = PathBuf::from(&libtorch);
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib_dir = libtorch.join("lib");
    // Every binary and test gets the rpath: the pip wheel's libtorch finds its CUDA runtime through its own RPATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    let has_cuda = lib_dir.join("libtorch_cuda.so").exists();
    if has_cuda {
        // Nothing references libtorch_cuda directly; without --no-as-needed the linker drops it and
        // tch::Cuda::is_available() is false even on a CUDA machine.
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_dist_shim(&libtorch, has_cuda);
    if has_cuda {
        build_cuda_graph_shim(&libtorch);
    }
}

/// The compiler settings both shims share: C++17, libtorch's headers and ABI.
fn libtorch_build(include: &Path) -> cc::Build {
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-interference-size")
        .warnings(false);
    build
}

/// Compiles src/generate/cuda_graph.cpp (at::cuda::CUDAGraph and the allocator's memory figures behind a C ABI)
/// when the CUDA runtime headers are there; it calls only libtorch_cuda and libc10_cuda.
fn build_cuda_graph_shim(libtorch: &Path) {
    let include = libtorch.join("include");
    if !include.join("ATen/cuda/CUDAGraph.h").exists() {
        return;
    }
    let dirs = match cuda_include_dirs(
        libtorch,
        &["cuda_runtime_api.h", "crt/host_config.h", "nv/target", "cublas_v2.h", "cusparse.h", "cusolverDn.h"],
    ) {
        Ok(dirs) => dirs,
        Err(why) => {
            println!(
                "cargo:warning=CUDA graphs are not built ({why}): the generation engine runs its decode steps eagerly"
            );
            return;
        }
    };
    let mut build = libtorch_build(&include);
    build.file("src/generate/cuda_graph.cpp");
    for dir in &dirs {
        build.include(dir);
    }
    build.compile("stic_cuda_graph_shim");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=stic_cuda_graphs");
}

/// Compiles src/image/jpeg.c with the headers of the libjpeg-turbo built by turbojpeg-sys (whose static library
/// holds the libjpeg API as well).
fn build_jpeg_decoder() {
    println!("cargo:rerun-if-changed=src/image/jpeg.c");
    println!("cargo:rerun-if-changed=src/image/jpeg.h");
    let include = std::env::var("DEP_TURBOJPEG_INCLUDE").expect("turbojpeg-sys reports its include folder");
    let mut build = cc::Build::new();
    for dir in include.split(',') {
        build.include(dir);
    }
    build.file("src/image/jpeg.c").warnings(true).compile("stic_jpeg");
}

/// Compiles the c10d shim into a static library linked into the `stic` library.
fn build_dist_shim(libtorch: &Path, has_cuda: bool) {
    let include = libtorch.join("include");
    if !include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp").exists() {
        println!(
            "cargo:warning={} has no c10d headers: `stic` is built without distributed support",
            include.display()
        );
        return;
    }
    let base = || libtorch_build(&include);
    let nccl_includes = if has_cuda && std::env::var_os("STIC_NO_NCCL").is_none() {
        nccl_include_dirs(libtorch)
    } else {
        Err(String::new())
    };
    let mut build = base();
    build.define("USE_C10D_GLOO", None).include("src/dist/gloo_decls").file("src/dist/shim.cpp");
    match &nccl_includes {
        Ok(dirs) => {
            build.define("STIC_WITH_NCCL", None).define("USE_C10D_NCCL", None).file("src/dist/shim_nccl.cpp");
            for dir in dirs {
                build.include(dir);
            }
        }
        Err(why) if !why.is_empty() => {
            println!("cargo:warning=the NCCL backend of `stic::dist` is not built ({why}); CUDA tensors are reduced through gloo")
        }
        Err(_) => {}
    }
    build.compile("stic_dist_shim");
    check_no_gloo_definitions();
    let lib_dir = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl_includes.is_ok() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-cfg=stic_dist_shim");
}

/// The folders holding nccl.h and a complete set of CUDA runtime headers; or what is missing.
fn nccl_include_dirs(libtorch: &Path) -> Result<Vec<PathBuf>, String> {
    // cuda_runtime_api.h: runtime; crt/host_config.h: nvidia-cuda-crt; nv/target: nvidia-cuda-cccl.
    cuda_include_dirs(libtorch, &["nccl.h", "cuda_runtime_api.h", "crt/host_config.h", "nv/target"])
}

/// The folders holding `headers`, looked for in CUDA_HOME, NCCL_HOME, /usr/local/cuda and the nvidia-* wheels
/// beside the torch wheel; or what is missing.
fn cuda_include_dirs(libtorch: &Path, headers: &[&str]) -> Result<Vec<PathBuf>, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["NCCL_HOME", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = std::env::var_os(var) {
            candidates.push(PathBuf::from(dir).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Ok(entries) = std::fs::read_dir(libtorch.join("../nvidia")) {
        let mut wheel_dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("include")).collect();
        wheel_dirs.sort();
        candidates.extend(wheel_dirs);
    }
    candidates.push(PathBuf::from("/usr/include"));
    candidates.retain(|d| d.is_dir());
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut missing = Vec::new();
    for &header in headers {
        match candidates.iter().find(|d| d.join(header).exists()) {
            Some(dir) if dirs.contains(dir) => {}
            Some(dir) => dirs.push(dir.clone()),
            None => missing.push(header),
        }
    }
    if missing.is_empty() {
        Ok(dirs)
    } else {
        Err(format!("no {} among the CUDA include folders", missing.join(", ")))
    }
}

/// src/dist/gloo_decls declares a few gloo classes only so that ProcessGroupGloo.hpp parses; the shim must not
/// define anything of gloo's (code or vtables), which could stand in for the real ones in libtorch_cpu.
fn check_no_gloo_definitions() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let archive = out_dir.join("libstic_dist_shim.a");
    let Ok(output) = std::process::Command::new("nm").arg("--defined-only").arg(&archive).output() else {
        return; // no binutils: nothing to check with
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let offending: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter(|symbol| {
            ["_ZN4gloo", "_ZNK4gloo", "_ZTVN4gloo", "_ZTIN4gloo", "_ZTSN4gloo", "GlooStore"]
                .iter()
                .any(|p| symbol.contains(p))
        })
        .collect();
    assert!(
        offending.is_empty(),
        "the c10d shim defines gloo symbols, which must come from libtorch_cpu only: {offending:?}"
    );
}
