//! Facts about the host every program needs to agree on.

use std::path::Path;

/// Whether KVM can really run a kata-rs guest here, and why not.
///
/// `/dev/kvm` must exist and open, and the KVM must not be the nested
/// paravirtualised kind (`kvm_pvm`), under which a stock guest kernel hangs.
pub fn kvm_usable() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm cannot be opened: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("KVM here is nested PVM (kvm_pvm is loaded): a stock guest kernel hangs under it, use TCG".into());
    }
    Ok(())
}

/// Whether the host has `/dev/vhost-vsock` (else kata-rs uses hybrid vsock).
pub fn vhost_vsock_available() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}
