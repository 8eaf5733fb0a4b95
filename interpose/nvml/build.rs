//! The interposer's SONAME is libnvidia-ml.so.1: preloaded (LD_PRELOAD), it is what
//! a monitor's dlopen("libnvidia-ml.so.1") returns.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvidia-ml.so.1");
}
