//! The hybrid vsock backend's decoding of what the guest puts in the rings
//! (packet headers and their validation) and of the host's `CONNECT` lines.
//! None may panic.
#![no_main]

use kata_vmm_launcher::vsock::packet::{parse_connect_line, parse_packet, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    if let Ok((h, _op, payload)) = parse_packet(data, 3) {
        assert!(payload.len() <= data.len());
        let again = Header::decode(&h.encode()).expect("an encoded header decodes");
        assert_eq!(again.encode(), h.encode());
    }
    let _ = parse_connect_line(data);
});
