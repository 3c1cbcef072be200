//! Generates the CRI client (tests/protos/cri.proto) the end-to-end tests
//! drive containerd with. protox compiles the .proto file in pure Rust, so no
//! protoc is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "protos/cri.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["protos"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
