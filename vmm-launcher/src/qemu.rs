//! The QEMU command line of a pod VM, built from a [`VmSpec`] as a pure function
//! so it is unit-tested without QEMU.
//!
//! Paths are the ones QEMU sees inside its jail (see [`crate::jail`]): the kernel
//! and initrd at `/boot/`, the sandbox's `vm/` directory at `/vm/`.

use kata_proto::launcher::Accelerator;

/// Paths inside the jail.
pub(crate) mod jailed {
    /// The guest kernel.
    pub(crate) const KERNEL: &str = "/boot/vmlinuz";
    /// The guest initramfs.
    pub(crate) const INITRD: &str = "/boot/initrd.img";
    /// QMP socket (QEMU listens).
    pub(crate) const QMP: &str = "/vm/qmp.sock";
    /// vhost-user vsock socket (our backend listens, QEMU connects).
    pub(crate) const VHOST_VSOCK: &str = "/vm/vhost-vsock.sock";
    /// vhost-user-fs socket (kata-virtiofsd listens, QEMU connects).
    pub(crate) const VIRTIOFS: &str = "/vm/virtiofsd.sock";
}

/// Everything that decides the command line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QemuArgs {
    /// The sandbox id (VM name).
    pub(crate) sandbox_id: String,
    /// vCPUs.
    pub(crate) vcpus: u32,
    /// Most vCPUs (CPU hot-plug); equal to `vcpus`: none.
    pub(crate) max_vcpus: u32,
    /// Guest RAM in MiB.
    pub(crate) memory_mib: u64,
    /// Most guest RAM in MiB (memory hot-plug), with `memory_slots` DIMM
    /// slots; no slots: no memory hot-plug.
    pub(crate) max_memory_mib: u64,
    /// DIMM slots.
    pub(crate) memory_slots: u32,
    /// `q35`, `pc` or `microvm`.
    pub(crate) machine_type: String,
    /// KVM or TCG (never Auto here: resolved before).
    pub(crate) accelerator: Accelerator,
    /// Extra kernel parameters.
    pub(crate) kernel_params: String,
    /// `Some(cid)`: vhost-vsock with that CID; `None`: vhost-user vsock (hybrid).
    pub(crate) vhost_vsock_cid: Option<u32>,
    /// Host CPU kHz, for `tsc_early_khz` on microvm under TCG.
    pub(crate) tsc_khz: Option<u64>,
    /// The virtio-fs tag, when a vhost-user-fs backend serves the pod.
    pub(crate) virtiofs_tag: Option<String>,
    /// The NICs: an open tap's fd (inherited) and the guest's MAC.
    pub(crate) nics: Vec<(i32, String)>,
    /// PCIe root ports for NICs hot-plugged later (`rp0`, `rp1`...).
    pub(crate) hotplug_slots: u32,
    /// QEMU's `-bios`; `None`: QEMU's default for the machine.
    pub(crate) firmware: Option<String>,
}

/// The kernel command line the launcher always passes (before the user's).
pub(crate) fn base_kernel_params(a: &QemuArgs) -> String {
    // panic=1 + -no-reboot: a guest panic ends the VM instead of hanging it.
    // swiotlb=noforce: no 64 MiB bounce buffer. The guest kernel makes one
    // whenever memory may lie above 4 GiB, which any memory hot-plug room
    // (-m maxmem) means on q35; no device of the VM needs it (virtio without
    // an IOMMU DMAs to guest-physical addresses).
    let mut p = String::from(
        "console=ttyS0 panic=1 reboot=k quiet loglevel=4 rcupdate.rcu_expedited=1 \
         i8042.noaux i8042.nomux i8042.nopnp nomodeset cryptomgr.notests swiotlb=noforce",
    );
    // QEMU's local APIC timer counts at 1 GHz: kata-rs's kernel takes it
    // from here instead of measuring it for 100 ms (bins/kernel-patches/);
    // other kernels pass the unknown parameter on to init, which ignores it
    p.push_str(" lapic_timer_hz=1000000000");
    // the agent prints the sandbox id on every log line from its first one
    p.push_str(&format!(" agent.sandbox_id={}", a.sandbox_id));
    if a.machine_type == "microvm" && a.accelerator == Accelerator::Tcg {
        if let Some(khz) = a.tsc_khz {
            // under TCG the TSC calibration of microvm hangs without it
            p.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    p
}

/// The CPU model under TCG: everything TCG emulates, except the "fast
/// string" flags. With ERMS or FSRM the guest kernel copies and clears with
/// `rep movsb`/`rep stosb`, which TCG runs one byte per loop; without them
/// it uses `rep movsq`, eight bytes per loop. Every copy in the guest (vsock
/// packets, pipes, page clearing) got about twice as fast: raw vsock from a
/// container 267 -> 605 MiB/s, the bulk echo 117 -> 248 MiB/s
/// (docs/benchmarks.md).
pub(crate) const TCG_CPU: &str = "max,-erms,-fsrm";

/// The arguments after the binary.
pub(crate) fn command_line(a: &QemuArgs) -> Vec<String> {
    let accel = match a.accelerator {
        Accelerator::Kvm => "kvm",
        _ => "tcg",
    };
    let cpu = if a.accelerator == Accelerator::Kvm {
        "host"
    } else {
        TCG_CPU
    };
    let machine = match a.machine_type.as_str() {
        "microvm" => format!("microvm,accel={accel},pcie=on,rtc=on,memory-backend=mem"),
        "pc" => format!("pc,accel={accel},memory-backend=mem"),
        _ => format!("q35,accel={accel},memory-backend=mem"),
    };
    let mut append = base_kernel_params(a);
    if !a.kernel_params.trim().is_empty() {
        append.push(' ');
        append.push_str(a.kernel_params.trim());
    }
    let mut v: Vec<String> = vec![
        "-name".into(),
        format!("sandbox-{},debug-threads=on", a.sandbox_id),
        "-S".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        machine,
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        if a.max_vcpus > a.vcpus {
            format!("{},maxcpus={}", a.vcpus.max(1), a.max_vcpus)
        } else {
            a.vcpus.max(1).to_string()
        },
        "-m".into(),
        if a.memory_slots > 0 && a.max_memory_mib > a.memory_mib {
            format!(
                "{}M,slots={},maxmem={}M",
                a.memory_mib, a.memory_slots, a.max_memory_mib
            )
        } else {
            format!("{}M", a.memory_mib)
        },
        // shared guest RAM: the vhost-user backends map it
        "-object".into(),
        format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            a.memory_mib
        ),
        "-kernel".into(),
        jailed::KERNEL.into(),
        "-initrd".into(),
        jailed::INITRD.into(),
        "-append".into(),
        append,
        "-chardev".into(),
        "stdio,id=console,signal=off".into(),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("socket,id=qmp,path={},server=on,wait=off", jailed::QMP),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // QEMU's own seccomp filter, on top of the launcher's
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
    ];
    if let Some(f) = &a.firmware {
        v.push("-bios".into());
        v.push(f.clone());
    }
    match a.vhost_vsock_cid {
        Some(cid) => {
            v.push("-device".into());
            v.push(format!("vhost-vsock-pci,id=vsock,guest-cid={cid}"));
        }
        None => {
            v.push("-chardev".into());
            v.push(format!("socket,id=vsockchr,path={}", jailed::VHOST_VSOCK));
            v.push("-device".into());
            v.push("vhost-user-vsock-pci,id=vsock,chardev=vsockchr".into());
        }
    }
    if let Some(tag) = &a.virtiofs_tag {
        v.push("-chardev".into());
        v.push(format!("socket,id=fschr,path={}", jailed::VIRTIOFS));
        v.push("-device".into());
        v.push(format!(
            "vhost-user-fs-pci,id=fs0,chardev=fschr,tag={tag},queue-size=1024"
        ));
    }
    for i in 0..a.hotplug_slots {
        // each its own chassis: the guest's hot-plug controller tells them apart
        v.push("-device".into());
        v.push(format!(
            "pcie-root-port,id={},bus=pcie.0,chassis={}",
            hotplug_port(i),
            i + 1
        ));
    }
    for (i, (fd, mac)) in a.nics.iter().enumerate() {
        // vhost-net needs /dev/vhost-net in the jail: not yet, the tap is
        // served by QEMU's own thread
        v.push("-netdev".into());
        v.push(format!("tap,id=net{i},fd={fd},vhost=off"));
        v.push("-device".into());
        v.push(format!("virtio-net-pci,id=nic{i},netdev=net{i},mac={mac}"));
    }
    v
}

/// The QEMU id of hot-plug root port `i`.
pub(crate) fn hotplug_port(i: u32) -> String {
    format!("rp{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> QemuArgs {
        QemuArgs {
            sandbox_id: "p1".into(),
            vcpus: 2,
            max_vcpus: 2,
            memory_mib: 512,
            max_memory_mib: 512,
            memory_slots: 0,
            machine_type: "q35".into(),
            accelerator: Accelerator::Tcg,
            kernel_params: " agent.log=debug ".into(),
            vhost_vsock_cid: None,
            tsc_khz: Some(2_000_000),
            virtiofs_tag: None,
            nics: vec![],
            hotplug_slots: 0,
            firmware: None,
        }
    }

    #[test]
    fn firmware_is_bios_only_when_chosen() {
        assert!(!command_line(&args()).contains(&"-bios".to_string()));
        let a = QemuArgs {
            firmware: Some("/usr/share/qemu/qboot.rom".into()),
            ..args()
        };
        assert_eq!(
            after(&command_line(&a), "-bios", "").unwrap(),
            "/usr/share/qemu/qboot.rom"
        );
    }

    #[test]
    fn hotplug_slots_are_root_ports() {
        let a = QemuArgs {
            hotplug_slots: 2,
            ..args()
        };
        let v = command_line(&a);
        let ports: Vec<&String> = v
            .iter()
            .filter(|x| x.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(
            ports,
            [
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
                "pcie-root-port,id=rp1,bus=pcie.0,chassis=2"
            ]
        );
        assert!(!command_line(&args())
            .iter()
            .any(|x| x.starts_with("pcie-root-port")));
    }

    #[test]
    fn hotplug_room_is_maxcpus_and_maxmem() {
        let v = command_line(&args());
        assert_eq!(after(&v, "-smp", "").unwrap(), "2");
        assert_eq!(after(&v, "-m", "").unwrap(), "512M");
        let a = QemuArgs {
            max_vcpus: 4,
            max_memory_mib: 2048,
            memory_slots: 8,
            ..args()
        };
        let v = command_line(&a);
        assert_eq!(after(&v, "-smp", "").unwrap(), "2,maxcpus=4");
        assert_eq!(after(&v, "-m", "").unwrap(), "512M,slots=8,maxmem=2048M");
    }

    #[test]
    fn nics_are_inherited_taps() {
        let a = QemuArgs {
            nics: vec![
                (7, "02:00:00:00:00:01".into()),
                (9, "02:00:00:00:00:02".into()),
            ],
            ..args()
        };
        let v = command_line(&a);
        assert_eq!(
            after(&v, "-netdev", "tap,id=net1").unwrap(),
            "tap,id=net1,fd=9,vhost=off"
        );
        assert_eq!(
            after(&v, "-device", "virtio-net-pci,id=nic0").unwrap(),
            "virtio-net-pci,id=nic0,netdev=net0,mac=02:00:00:00:00:01"
        );
        assert!(after(&command_line(&args()), "-netdev", "").is_none());
    }

    fn after<'a>(v: &'a [String], flag: &str, value_prefix: &str) -> Option<&'a String> {
        v.windows(2)
            .find(|w| w[0] == flag && w[1].starts_with(value_prefix))
            .map(|w| &w[1])
    }

    #[test]
    fn tcg_q35_hybrid() {
        let v = command_line(&args());
        assert_eq!(
            after(&v, "-machine", "").unwrap(),
            "q35,accel=tcg,memory-backend=mem"
        );
        assert_eq!(after(&v, "-cpu", "").unwrap(), "max,-erms,-fsrm");
        assert_eq!(after(&v, "-smp", "").unwrap(), "2");
        assert!(after(
            &v,
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on"
        )
        .is_some());
        assert!(after(&v, "-device", "vhost-user-vsock-pci").is_some());
        let append = after(&v, "-append", "").unwrap();
        assert!(append.starts_with("console=ttyS0 panic=1"), "{append}");
        assert!(append.ends_with(" agent.log=debug"), "{append}");
        assert!(!append.contains("tsc_early_khz"), "only microvm needs it");
        assert!(append.contains(" lapic_timer_hz=1000000000 "), "{append}");
        assert!(v.contains(&"-S".to_string()) && v.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn kvm_microvm_vhost() {
        let mut a = args();
        a.accelerator = Accelerator::Kvm;
        a.machine_type = "microvm".into();
        a.vhost_vsock_cid = Some(7);
        let v = command_line(&a);
        assert!(after(&v, "-machine", "microvm,accel=kvm").is_some());
        assert_eq!(after(&v, "-cpu", "").unwrap(), "host");
        assert_eq!(
            after(&v, "-device", "vhost-vsock").unwrap(),
            "vhost-vsock-pci,id=vsock,guest-cid=7"
        );
        assert!(!after(&v, "-append", "").unwrap().contains("tsc_early_khz"));
        a.accelerator = Accelerator::Tcg;
        assert!(after(&command_line(&a), "-append", "")
            .unwrap()
            .contains("tsc_early_khz=2000000"));
    }
}
