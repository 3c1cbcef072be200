//! The runtime options containerd passes (Kata's `runtimeoptions.v1.Options`):
//! only `config_path` matters here.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

/// `ConfigPath` of the runtime options, if `any` carries one.
pub fn config_path(any: &Any) -> Option<PathBuf> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    decode_config_path(&any.value)
}

/// Field 2 (string) of a `runtimeoptions.v1.Options` message.
pub fn decode_config_path(bytes: &[u8]) -> Option<PathBuf> {
    let mut is = CodedInputStream::from_bytes(bytes);
    let mut found = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            found = is.read_string().ok();
        } else {
            let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire)?;
            is.skip_field(wt).ok()?;
        }
    }
    found.filter(|s| !s.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_config_path() {
        // field 1 "x", field 2 "/etc/k.toml"
        let mut b = vec![0x0a, 1, b'x', 0x12, 11];
        b.extend_from_slice(b"/etc/k.toml");
        assert_eq!(decode_config_path(&b), Some(PathBuf::from("/etc/k.toml")));
        assert_eq!(decode_config_path(&[0x0a, 1, b'x']), None);
        assert_eq!(decode_config_path(&[0x12, 200]), None);
    }
}
