//! Generates the gRPC code from proto/agent.proto with protox (pure Rust), so no
//! system `protoc` is needed to build gpuchaos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["agent.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
