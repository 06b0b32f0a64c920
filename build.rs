//! Links the `stic` binary against the libtorch that torch-sys found, so that it runs without LD_LIBRARY_PATH
//! and sees CUDA when the libtorch build has it.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run `make setup` or point LIBTORCH at a libtorch 2.11 folder");
        return;
    };
    let lib_dir = PathBuf::from(&libtorch).join("lib");
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    // Every binary and test gets the rpath: the pip wheel's libtorch finds its CUDA runtime through its own RPATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        // Nothing references libtorch_cuda directly; without --no-as-needed the linker drops it and
        // tch::Cuda::is_available() is false even on a CUDA machine.
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
