//! The checks of a [`VmSpec`] before anything is created: every field the
//! launcher acts on is in range or refused with [`LauncherError::InvalidSpec`]
//! naming the field; empty fields get their defaults.

use std::path::Path;

use kata_proto::config::is_under_usr;
use kata_proto::launcher::{Accelerator, NetDevice, VmSpec};
use kata_proto::paths::SandboxPaths;

use crate::{cgroup, LauncherError};

/// The most NICs a VM gets.
pub(crate) const MAX_NICS: usize = 8;
/// The most PCIe root ports kept free for hot-plugged NICs.
pub(crate) const MAX_HOTPLUG_SLOTS: u32 = 16;
/// Most DIMM slots for memory hot-plug (the vhost-user backends map each
/// DIMM as one more memory region).
pub(crate) const MAX_MEMORY_SLOTS: u32 = 32;

/// A unicast MAC address `aa:bb:cc:dd:ee:ff` (not all zero).
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    kata_proto::net::parse_mac(s).filter(|m| m[0] & 1 == 0 && *m != [0; 6])
}

pub(crate) fn validate(mut spec: VmSpec, paths: &SandboxPaths) -> Result<VmSpec, LauncherError> {
    let bad = |m: String| Err(LauncherError::InvalidSpec(m));
    if spec.vcpus == 0 {
        spec.vcpus = 1;
    }
    if spec.vcpus > 255 {
        return bad(format!("vcpus = {}: at most 255", spec.vcpus));
    }
    if spec.memory_mib == 0 {
        spec.memory_mib = 512;
    }
    if spec.memory_mib < 64 || spec.memory_mib > 1 << 20 {
        return bad(format!(
            "memory_mib = {}: must be between 64 and 1048576",
            spec.memory_mib
        ));
    }
    if spec.max_vcpus < spec.vcpus {
        spec.max_vcpus = spec.vcpus;
    }
    if spec.max_vcpus > 255 {
        return bad(format!("max_vcpus = {}: at most 255", spec.max_vcpus));
    }
    if spec.max_memory_mib == 0 || spec.memory_slots == 0 {
        spec.max_memory_mib = spec.memory_mib;
    }
    if spec.max_memory_mib < spec.memory_mib || spec.max_memory_mib > 1 << 22 {
        return bad(format!(
            "max_memory_mib = {}: must be between memory_mib ({}) and 4194304",
            spec.max_memory_mib, spec.memory_mib
        ));
    }
    if spec.max_memory_mib == spec.memory_mib {
        spec.memory_slots = 0;
    }
    if spec.memory_slots > MAX_MEMORY_SLOTS {
        return bad(format!(
            "memory_slots = {}: at most {MAX_MEMORY_SLOTS}",
            spec.memory_slots
        ));
    }
    for (name, p) in [
        ("kernel_path", &spec.kernel_path),
        ("initrd_path", &spec.initrd_path),
    ] {
        if p.is_empty() || !p.starts_with('/') {
            return bad(format!("{name} = {p:?}: an absolute path is required (build one with `kata-ctl image build`)"));
        }
    }
    if spec.machine_type.is_empty() {
        spec.machine_type = "q35".into();
    }
    if !matches!(spec.machine_type.as_str(), "q35" | "pc" | "microvm") {
        return bad(format!(
            "machine_type = {:?}: must be q35, pc or microvm",
            spec.machine_type
        ));
    }
    if spec.hypervisor_path.is_empty() {
        spec.hypervisor_path = kata_proto::config::Qemu::default()
            .path
            .display()
            .to_string();
    }
    if !is_under_usr(Path::new(&spec.hypervisor_path)) {
        return bad(format!(
            "hypervisor_path = {:?}: must be under /usr (the jail exposes /usr read-only)",
            spec.hypervisor_path
        ));
    }
    if !spec.firmware_path.is_empty() && !is_under_usr(Path::new(&spec.firmware_path)) {
        return bad(format!(
            "firmware_path = {:?}: must be an absolute path under /usr (the jail exposes /usr read-only), e.g. /usr/share/qemu/qboot.rom",
            spec.firmware_path
        ));
    }
    if !spec.cgroup_path.is_empty() {
        cgroup::validate(&spec.cgroup_path)?;
    }
    if !spec.virtiofs_socket.is_empty() {
        use std::os::unix::fs::FileTypeExt;
        let want = paths.virtiofsd_socket();
        if Path::new(&spec.virtiofs_socket) != want {
            return bad(format!(
                "virtiofs_socket = {:?}: kata-virtiofsd must listen on {} (the one place the jailed hypervisor reaches)",
                spec.virtiofs_socket,
                want.display()
            ));
        }
        if !std::fs::metadata(&want).is_ok_and(|m| m.file_type().is_socket()) {
            return bad(format!(
                "virtiofs_socket = {:?}: nothing listens there; start kata-virtiofsd --socket-path {} first",
                spec.virtiofs_socket,
                want.display()
            ));
        }
        if spec.virtiofs_tag.is_empty() {
            spec.virtiofs_tag = "kataShared".into();
        }
        if spec.virtiofs_tag.len() > 36
            || !spec
                .virtiofs_tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "virtiofs_tag = {:?}: 1-36 characters from [A-Za-z0-9_-]",
                spec.virtiofs_tag
            ));
        }
    }
    if spec.net_devices.len() > MAX_NICS {
        return bad(format!(
            "net_devices: {} NICs, at most {MAX_NICS}",
            spec.net_devices.len()
        ));
    }
    if !spec.net_devices.is_empty() && spec.netns_path.is_empty() {
        return bad(
            "net_devices need netns_path (the taps live in the pod's network namespace)".into(),
        );
    }
    let mut macs = std::collections::HashSet::new();
    for (i, d) in spec.net_devices.iter().enumerate() {
        if let Err(e) = check_net_device(d) {
            return bad(format!("net_devices[{i}].{e}"));
        }
        let mac = parse_mac(&d.mac).unwrap_or_default();
        if !macs.insert(mac) {
            return bad(format!(
                "net_devices[{i}].mac = {:?}: two NICs with one MAC",
                d.mac
            ));
        }
    }
    if spec.hotplug_slots > MAX_HOTPLUG_SLOTS {
        return bad(format!(
            "hotplug_slots = {}: at most {MAX_HOTPLUG_SLOTS}",
            spec.hotplug_slots
        ));
    }
    if (spec.max_vcpus > spec.vcpus || spec.memory_slots > 0) && spec.machine_type == "microvm" {
        return bad(format!(
            "max_vcpus = {}, memory_slots = {}: CPU and memory hot-plug need ACPI (machine_type q35 or pc), not microvm",
            spec.max_vcpus, spec.memory_slots
        ));
    }
    if spec.hotplug_slots > 0 && !matches!(spec.machine_type.as_str(), "" | "q35") {
        return bad(format!(
            "hotplug_slots = {}: NIC hot-plug needs machine_type \"q35\" (PCIe root ports), not {:?}",
            spec.hotplug_slots, spec.machine_type
        ));
    }
    if !spec.netns_path.is_empty() && !Path::new(&spec.netns_path).exists() {
        return bad(format!("netns_path = {:?} does not exist", spec.netns_path));
    }
    Ok(spec)
}

/// Checks one NIC: its device's name, its MAC (unicast), the macvtap
/// device number if it has one. The error starts with the field's name.
pub(crate) fn check_net_device(d: &NetDevice) -> Result<(), String> {
    if let Err(e) = kata_proto::tap::check_ifname(&d.tap) {
        return Err(format!("tap: {e}"));
    }
    if parse_mac(&d.mac).is_none() {
        return Err(format!(
            "mac = {:?}: six hex bytes like 02:00:00:00:00:01, unicast",
            d.mac
        ));
    }
    if !d.macvtap_dev.is_empty() && kata_proto::tap::parse_dev(&d.macvtap_dev).is_none() {
        return Err(format!(
            "macvtap_dev = {:?}: a device number major:minor",
            d.macvtap_dev
        ));
    }
    Ok(())
}

pub(crate) fn resolve_accel(a: Accelerator) -> Result<Accelerator, LauncherError> {
    match a {
        Accelerator::Tcg => Ok(Accelerator::Tcg),
        Accelerator::Kvm => kata_proto::host::kvm_usable()
            .map(|_| Accelerator::Kvm)
            .map_err(|why| LauncherError::InvalidSpec(format!("accelerator kvm: {why}"))),
        Accelerator::Auto | Accelerator::Unspecified => {
            Ok(if kata_proto::host::kvm_usable().is_ok() {
                Accelerator::Kvm
            } else {
                Accelerator::Tcg
            })
        }
    }
}

pub(crate) fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        let ok = VmSpec {
            kernel_path: "/k".into(),
            initrd_path: "/i".into(),
            ..Default::default()
        };
        let v = validate(ok.clone(), &SandboxPaths::in_dir("/nonexistent")).unwrap();
        assert_eq!(
            (v.vcpus, v.memory_mib, v.machine_type.as_str()),
            (1, 512, "q35")
        );
        for (spec, word) in [
            (
                VmSpec {
                    kernel_path: String::new(),
                    ..ok.clone()
                },
                "kernel_path",
            ),
            (
                VmSpec {
                    memory_mib: 10,
                    ..ok.clone()
                },
                "memory_mib",
            ),
            (
                VmSpec {
                    machine_type: "virt".into(),
                    ..ok.clone()
                },
                "machine_type",
            ),
            (
                VmSpec {
                    cgroup_path: "../x".into(),
                    ..ok.clone()
                },
                "../x",
            ),
            (
                VmSpec {
                    firmware_path: "qboot.rom".into(),
                    ..ok.clone()
                },
                "firmware_path = \"qboot.rom\": must be an absolute path under /usr",
            ),
            (
                VmSpec {
                    firmware_path: "/usr/../etc/shadow".into(),
                    ..ok.clone()
                },
                "firmware_path",
            ),
            (
                VmSpec {
                    hypervisor_path: "/usr/../tmp/qemu".into(),
                    ..ok.clone()
                },
                "hypervisor_path",
            ),
            (
                VmSpec {
                    hotplug_slots: 17,
                    ..ok.clone()
                },
                "hotplug_slots = 17: at most 16",
            ),
            (
                VmSpec {
                    hotplug_slots: 2,
                    machine_type: "microvm".into(),
                    ..ok.clone()
                },
                "needs machine_type \"q35\"",
            ),
            (
                VmSpec {
                    netns_path: "/proc/self/ns/net".into(),
                    net_devices: vec![NetDevice {
                        tap: "tap0_kata".into(),
                        mac: "02:00:00:00:00:01".into(),
                        macvtap_dev: "12".into(),
                    }],
                    ..ok.clone()
                },
                "macvtap_dev = \"12\"",
            ),
            (
                VmSpec {
                    netns_path: "/nonexistent/ns".into(),
                    ..ok.clone()
                },
                "netns_path",
            ),
            (
                VmSpec {
                    net_devices: vec![NetDevice {
                        tap: "tap0_kata".into(),
                        mac: "02:00:00:00:00:01".into(),
                        ..Default::default()
                    }],
                    ..ok.clone()
                },
                "need netns_path",
            ),
            (
                VmSpec {
                    netns_path: "/proc/self/ns/net".into(),
                    net_devices: vec![NetDevice {
                        tap: "tap0/x".into(),
                        mac: "02:00:00:00:00:01".into(),
                        ..Default::default()
                    }],
                    ..ok.clone()
                },
                "net_devices[0].tap",
            ),
            (
                VmSpec {
                    netns_path: "/proc/self/ns/net".into(),
                    net_devices: vec![NetDevice {
                        tap: "tap0_kata".into(),
                        mac: "01:00:5e:00:00:01".into(),
                        ..Default::default()
                    }],
                    ..ok.clone()
                },
                "net_devices[0].mac",
            ),
            (
                VmSpec {
                    netns_path: "/proc/self/ns/net".into(),
                    net_devices: vec![
                        NetDevice {
                            tap: "tap0_kata".into(),
                            mac: "02:00:00:00:00:01".into(),
                            ..Default::default()
                        },
                        NetDevice {
                            tap: "tap1_kata".into(),
                            mac: "02:00:00:00:00:01".into(),
                            ..Default::default()
                        },
                    ],
                    ..ok.clone()
                },
                "one MAC",
            ),
            (
                VmSpec {
                    hypervisor_path: "/opt/qemu".into(),
                    ..ok.clone()
                },
                "hypervisor_path",
            ),
            (
                VmSpec {
                    virtiofs_socket: "/tmp/elsewhere.sock".into(),
                    ..ok.clone()
                },
                "/nonexistent/vm/virtiofsd.sock",
            ),
            (
                VmSpec {
                    virtiofs_socket: "/nonexistent/vm/virtiofsd.sock".into(),
                    ..ok.clone()
                },
                "nothing listens there",
            ),
        ] {
            let e = validate(spec, &SandboxPaths::in_dir("/nonexistent"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
