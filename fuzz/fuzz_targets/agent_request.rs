//! The agent's decoding of what the host sends: protobuf requests, the OCI
//! spec and process JSON, seccomp profiles, mount options and paths, the
//! stdio port header and the set-up helper's messages. None may panic.
#![no_main]

use std::path::Path;

use kata_agent::{childinit, container, mounts, seccomp};
use kata_proto::agent::{CreateContainerRequest, ExecProcessRequest, UpdateContainerRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(r) = CreateContainerRequest::decode(rest) {
                let _ = container::check_id("container_id", &r.container_id);
                if let Ok(spec) = container::parse_spec(&r.oci_spec_json) {
                    if let Some(mut p) = spec.process().clone() {
                        let _ = container::apply_string_user(&mut p, r.string_user.as_ref());
                        let _ = container::check_process(&p);
                    }
                }
            }
        }
        1 => {
            if let Ok(r) = ExecProcessRequest::decode(rest) {
                let json = r.process.map(|p| p.oci_process_json).unwrap_or_default();
                if let Ok(mut p) = serde_json::from_str::<oci_process::Process>(&json) {
                    let _ = container::apply_string_user(&mut p, r.string_user.as_ref());
                    let _ = container::check_process(&p);
                }
            }
        }
        2 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = container::parse_spec(s);
            }
        }
        3 => {
            let _ = seccomp::decode_and_compile(rest);
        }
        4 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = kata_proto::stdio::parse_header(s);
            }
        }
        5 => {
            let mut c = std::io::Cursor::new(rest);
            let _ = childinit::recv::<childinit::ChildMsg>(&mut c);
            let mut c = std::io::Cursor::new(rest);
            let _ = childinit::recv::<childinit::ChildRequest>(&mut c);
        }
        6 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let opts: Vec<&str> = s.split(',').collect();
                let _ = mounts::parse_options(&opts);
                let _ = mounts::check_container_path(s);
                let _ = mounts::resolve_in_root(Path::new("/nonexistent-fuzz-root"), Path::new(s));
            }
        }
        _ => {
            if let Ok(r) = UpdateContainerRequest::decode(rest) {
                let json = r
                    .resources
                    .map(|r| r.oci_resources_json)
                    .unwrap_or_default();
                let _ = serde_json::from_str::<oci_process::LinuxResources>(&json);
            }
        }
    }
});

mod oci_process {
    pub use kata_agent::oci::{LinuxResources, Process};
}
