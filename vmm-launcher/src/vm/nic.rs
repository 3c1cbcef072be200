//! The VM's NICs: their host devices opened for QEMU (a tap in the pod's
//! network namespace, or a macvtap's character device) before the jail at
//! creation, and NICs hot-plugged and unplugged while the VM runs (QMP
//! `getfd` with the device's fd, `netdev_add`, `device_add` on a free PCIe
//! root port; `device_del`, waited for, `netdev_del`).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_proto::launcher::NetDevice;
use serde_json::json;
use tracing::{info, warn};

use crate::qemu::hotplug_port;
use crate::qmp::Qmp;
use crate::spec::{check_net_device, parse_mac};
use crate::LauncherError;

/// How long the guest may take to release an unplugged NIC.
const UNPLUG_WAIT: Duration = Duration::from_secs(10);

/// The NICs of a VM.
#[derive(Debug, Default)]
pub(super) struct Nics {
    /// Where the taps live (the VM's netns_path).
    netns: Option<PathBuf>,
    /// Hot-plug root port `i` holds the NIC of this device, if any.
    slots: Vec<Option<String>>,
    /// Every NIC (cold- and hot-plugged): host device → MAC.
    macs: HashMap<String, [u8; 6]>,
}

impl Nics {
    /// The NICs the VM was created with.
    pub(super) fn new(netns: Option<PathBuf>, cold: &[NetDevice], slots: u32) -> Nics {
        Nics {
            netns,
            slots: vec![None; slots as usize],
            macs: cold
                .iter()
                .filter_map(|d| Some((d.tap.clone(), parse_mac(&d.mac)?)))
                .collect(),
        }
    }

    /// Hot-plugs the NIC of `dev`.
    pub(super) async fn add(&mut self, qmp: &Qmp, dev: NetDevice) -> Result<(), LauncherError> {
        check_net_device(&dev).map_err(LauncherError::InvalidSpec)?;
        let mac = parse_mac(&dev.mac).unwrap_or_default();
        if self.macs.contains_key(&dev.tap) {
            return Err(LauncherError::State(format!(
                "{} is already a NIC of the VM",
                dev.tap
            )));
        }
        if self.macs.values().any(|m| *m == mac) {
            return Err(LauncherError::InvalidSpec(format!(
                "mac = {:?}: the VM has a NIC with that MAC",
                dev.mac
            )));
        }
        let Some(netns) = self.netns.clone() else {
            return Err(LauncherError::InvalidSpec(
                "the VM was created without netns_path: it takes no NIC".into(),
            ));
        };
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            return Err(LauncherError::State(format!(
                "no free hot-plug slot for {} (the VM was created with hotplug_slots = {})",
                dev.tap,
                self.slots.len()
            )));
        };
        let file = open_devices(&netns, std::slice::from_ref(&dev))?
            .pop()
            .ok_or_else(|| LauncherError::Hypervisor("no device opened".into()))?;
        let (fd, netdev, id) = names(slot);
        qmp.execute_with_fd("getfd", Some(json!({ "fdname": fd })), Some(file.as_fd()))
            .await?;
        drop(file);
        let added = qmp
            .execute(
                "netdev_add",
                Some(json!({ "type": "tap", "id": netdev, "fd": fd, "vhost": false })),
            )
            .await;
        if let Err(e) = added {
            let _ = qmp.execute("closefd", Some(json!({ "fdname": fd }))).await;
            return Err(e.into());
        }
        let plugged = qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "virtio-net-pci",
                    "id": id,
                    "netdev": netdev,
                    "mac": dev.mac,
                    "bus": hotplug_port(slot as u32),
                })),
            )
            .await;
        if let Err(e) = plugged {
            let _ = qmp
                .execute("netdev_del", Some(json!({ "id": netdev })))
                .await;
            return Err(e.into());
        }
        info!(tap = %dev.tap, mac = %dev.mac, slot, "NIC hot-plugged");
        self.slots[slot] = Some(dev.tap.clone());
        self.macs.insert(dev.tap, mac);
        Ok(())
    }

    /// Unplugs the hot-plugged NIC of `tap`; returns once the guest let it go.
    pub(super) async fn remove(&mut self, qmp: &Qmp, tap: &str) -> Result<(), LauncherError> {
        let Some(slot) = self.slots.iter().position(|s| s.as_deref() == Some(tap)) else {
            return Err(if self.macs.contains_key(tap) {
                LauncherError::State(format!(
                    "{tap} was plugged at creation, on the root bus: only hot-plugged NICs can be removed"
                ))
            } else {
                LauncherError::State(format!("no NIC of the VM is {tap}"))
            });
        };
        let (_, netdev, id) = names(slot);
        match qmp.device_del(&id, UNPLUG_WAIT).await {
            Ok(()) => {}
            Err(crate::qmp::QmpError::Timeout { .. }) => {
                // the slot stays taken: the device may still go later
                return Err(LauncherError::Timeout(format!(
                    "the guest did not release the NIC of {tap} within {UNPLUG_WAIT:?}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = qmp
            .execute("netdev_del", Some(json!({ "id": netdev })))
            .await
        {
            warn!(tap, "netdev_del after the unplug: {e}");
        }
        info!(tap, slot, "NIC unplugged");
        self.slots[slot] = None;
        self.macs.remove(tap);
        Ok(())
    }
}

/// QEMU's names of hot-plug slot `i`: the fd, the netdev, the device.
fn names(slot: usize) -> (String, String, String) {
    (
        format!("hfd{slot}"),
        format!("hnet{slot}"),
        format!("hnic{slot}"),
    )
}

/// Opens the host devices of `devs`, in order: a tap in `netns` (from a
/// thread that enters it, so the launcher stays where it is), or the
/// character device of a macvtap. The jailed hypervisor gets them as open
/// files and needs no CAP_NET_ADMIN.
pub(super) fn open_devices(netns: &Path, devs: &[NetDevice]) -> Result<Vec<File>, LauncherError> {
    if devs.is_empty() {
        return Ok(vec![]);
    }
    let io = |what: String| move |e: std::io::Error| LauncherError::Io(what, e);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(netns).map_err(io(format!(
                "opening the network namespace {}",
                netns.display()
            )))?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                LauncherError::Io(
                    format!("entering the network namespace {}", netns.display()),
                    e.into(),
                )
            })?;
            devs.iter()
                .map(|d| {
                    if d.macvtap_dev.is_empty() {
                        kata_proto::tap::open(&d.tap).map_err(io(format!(
                            "opening the tap {} in {} (is kata-netmon running?)",
                            d.tap,
                            netns.display()
                        )))
                    } else {
                        kata_proto::tap::open_macvtap(&d.macvtap_dev).map_err(io(format!(
                            "opening the macvtap {} (device {})",
                            d.tap, d.macvtap_dev
                        )))
                    }
                })
                .collect()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(LauncherError::Hypervisor(
                "the thread opening the NICs' devices panicked".into(),
            ))
        })
    })
}
