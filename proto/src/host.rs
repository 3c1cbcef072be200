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
    if let Some(why) = pvm_evidence() {
        return Err(format!(
            "KVM here is nested PVM ({why}): a stock guest kernel hangs under it, use TCG"
        ));
    }
    Ok(())
}

/// Whether the host's KVM is PVM (nested paravirtualisation), and how we know.
pub fn pvm_evidence() -> Option<String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/sys/module/kvm_pvm exists".into());
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    if modules.lines().any(|l| l.starts_with("kvm_pvm ")) {
        return Some("kvm_pvm is in /proc/modules".into());
    }
    None
}

/// Whether the host has `/dev/vhost-vsock` (else kata-rs uses hybrid vsock).
pub fn vhost_vsock_available() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}
