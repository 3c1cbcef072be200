//! Generates the tonic/prost code of kata-rs's internal APIs. protox compiles the
//! .proto files in pure Rust, so no protoc is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "protos/agent.proto",
        "protos/launcher.proto",
        "protos/virtiofsd.proto",
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
    Ok(())
}
