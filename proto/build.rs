//! Generates the tonic/prost code of kata-rs's internal APIs. protox compiles the
//! .proto files in pure Rust, so no protoc is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "protos/agent.proto",
        "protos/launcher.proto",
        "protos/virtiofsd.proto",
        "protos/trace.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // JSON forms of the agent API's messages, for `kata-ctl agent` (any RPC
        // from the command line) and for test fixtures.
        .message_attribute(
            ".kata.agent.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .enum_attribute(
            ".kata.agent.v1",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .compile_fds(fds)?;
    // netmon's API reuses the agent's messages: generated on its own, with
    // the agent's types taken from `crate::agent`
    let netmon = "protos/netmon.proto";
    println!("cargo:rerun-if-changed={netmon}");
    let fds = protox::compile([netmon], ["protos"])?;
    // (its own directory: this run's agent file, without the agent's
    // messages, must not replace the one above)
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("netmon");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(true)
        .build_server(true)
        .extern_path(".kata.agent.v1", "crate::agent")
        .compile_fds(fds)?;
    Ok(())
}
