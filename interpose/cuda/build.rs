//! The interposer's SONAME is libcuda.so.1: preloaded (LD_PRELOAD), it is what a
//! workload's dlopen("libcuda.so.1") returns, so that symbols looked up from that
//! handle (dlsym, cuGetProcAddress) are the interposer's.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
