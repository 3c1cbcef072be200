//! Resizing a running VM: vCPUs hot-plugged and unplugged, memory added.
//!
//! * vCPUs: QEMU starts with `-smp N,maxcpus=M`. A vCPU is plugged by
//!   copying the topology properties of a free entry of
//!   `query-hotpluggable-cpus` into `device_add` of its CPU type, and
//!   unplugged with `device_del` (the guest ejects it over ACPI; waited
//!   for until its slot is free: QEMU 7.2 sends no DEVICE_DELETED of a
//!   vCPU). Only the vCPUs plugged here can go: the boot vCPUs stay.
//!   Under TCG a vCPU is never unplugged: QEMU 7.2 corrupts its heap and
//!   aborts ("corrupted double-linked list") at the next `device_add` after
//!   a TCG vCPU was unplugged. There a vCPU that goes is *parked*: it stays
//!   plugged, the guest keeps it offline (its thread sleeps), and the next
//!   growth brings it back before plugging new ones.
//! * memory: QEMU starts with `-m S,slots=N,maxmem=M`. Growing adds one
//!   `pc-dimm` backed by a shared memfd (`object-add
//!   memory-backend-memfd,share=on`), so the vhost-user backends
//!   (kata-virtiofsd) can map it like the boot RAM. pc-dimm rather than
//!   virtio-mem: it needs no guest driver (the guest's virtio_mem is a
//!   module) and each DIMM is one memory region of the backends, bounded by
//!   the slots. Memory is not given back (as in Kata): a DIMM's pages are
//!   the guest's once onlined.
//!
//! The guest sees new vCPUs and memory blocks offline; the agent's
//! OnlineCPUMem brings them online.

use std::time::Duration;

use kata_proto::launcher::{Accelerator, ResizeVmRequest, ResizeVmResponse, VmSpec};
use serde_json::{json, Value};
use tracing::info;

use crate::qmp::Qmp;
use crate::LauncherError;

/// How long the guest may take to eject an unplugged vCPU.
const CPU_UNPLUG_WAIT: Duration = Duration::from_secs(10);

/// A VM's size and its room to grow.
#[derive(Debug, Default)]
pub(super) struct Resources {
    boot_vcpus: u32,
    max_vcpus: u32,
    memory_mib: u64,
    max_memory_mib: u64,
    free_slots: u32,
    /// QEMU ids of the vCPUs plugged here, in order.
    plugged: Vec<String>,
    /// Of those, the last `parked` count as gone (TCG: never unplugged).
    parked: u32,
    /// Unplugging is safe (not TCG).
    can_unplug: bool,
    /// DIMMs added so far (names the next one).
    dimms: u32,
    /// Names the next vCPU plugged.
    next_id: u32,
}

impl Resources {
    /// The room a (validated) spec leaves.
    pub(super) fn new(spec: &VmSpec, accel: Accelerator) -> Resources {
        Resources {
            boot_vcpus: spec.vcpus,
            max_vcpus: spec.max_vcpus.max(spec.vcpus),
            memory_mib: spec.memory_mib,
            max_memory_mib: spec.max_memory_mib.max(spec.memory_mib),
            free_slots: spec.memory_slots,
            plugged: vec![],
            parked: 0,
            can_unplug: accel != Accelerator::Tcg,
            dimms: 0,
            next_id: 0,
        }
    }

    fn vcpus(&self) -> u32 {
        self.boot_vcpus + self.plugged.len() as u32 - self.parked
    }

    /// What the VM has now.
    pub(super) fn now(&self) -> ResizeVmResponse {
        ResizeVmResponse {
            vcpus: self.vcpus(),
            memory_mib: self.memory_mib,
        }
    }

    /// Checks `r` against the room before anything changes.
    fn check(&self, r: &ResizeVmRequest) -> Result<(), LauncherError> {
        let bad = |m: String| Err(LauncherError::InvalidSpec(m));
        if r.vcpus < self.boot_vcpus || r.vcpus > self.max_vcpus {
            return bad(format!(
                "vcpus = {}: must be between the {} vCPUs the VM booted with and its max_vcpus ({})",
                r.vcpus, self.boot_vcpus, self.max_vcpus
            ));
        }
        if r.memory_mib > self.max_memory_mib {
            return bad(format!(
                "memory_mib = {}: more than the VM's max_memory_mib ({})",
                r.memory_mib, self.max_memory_mib
            ));
        }
        if r.memory_mib > self.memory_mib && self.free_slots == 0 {
            return bad(format!(
                "memory_mib = {}: no memory slot is left (the VM has {} MiB; raise memory_slots)",
                r.memory_mib, self.memory_mib
            ));
        }
        Ok(())
    }

    /// Brings the VM to `r` (see the module documentation).
    pub(super) async fn resize(
        &mut self,
        qmp: &Qmp,
        r: ResizeVmRequest,
    ) -> Result<ResizeVmResponse, LauncherError> {
        self.check(&r)?;
        while self.vcpus() < r.vcpus {
            if self.parked > 0 {
                self.parked -= 1;
                info!(vcpus = self.vcpus(), "parked vCPU back");
                continue;
            }
            self.plug_cpu(qmp).await?;
        }
        while self.vcpus() > r.vcpus && !self.can_unplug {
            self.parked += 1;
            info!(vcpus = self.vcpus(), "vCPU parked (TCG: not unplugged)");
        }
        while self.vcpus() > r.vcpus {
            let Some(id) = self.plugged.last().cloned() else {
                break;
            };
            qmp.execute("device_del", Some(json!({ "id": id }))).await?;
            // QEMU 7.2 never sends DEVICE_DELETED of a vCPU (only of its
            // lapic): the slot freed in query-hotpluggable-cpus says the
            // guest ejected it
            let path = format!("/machine/peripheral/{id}");
            let t0 = std::time::Instant::now();
            loop {
                let list = qmp.execute("query-hotpluggable-cpus", None).await?;
                if !holds(&list, &path) {
                    break;
                }
                if t0.elapsed() > CPU_UNPLUG_WAIT {
                    return Err(LauncherError::Timeout(format!(
                        "the guest did not eject vCPU {id} within {CPU_UNPLUG_WAIT:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.plugged.pop();
            info!(id, vcpus = self.vcpus(), "vCPU unplugged");
        }
        if r.memory_mib > self.memory_mib {
            self.plug_dimm(qmp, r.memory_mib - self.memory_mib).await?;
        }
        Ok(self.now())
    }

    async fn plug_cpu(&mut self, qmp: &Qmp) -> Result<(), LauncherError> {
        let list = qmp.execute("query-hotpluggable-cpus", None).await?;
        let (driver, props) = free_cpu_slot(&list).ok_or_else(|| {
            LauncherError::State(format!(
                "no free vCPU slot (the VM has {} of {} vCPUs)",
                self.vcpus(),
                self.max_vcpus
            ))
        })?;
        // never reused: an unplugged vCPU's object may outlive its slot
        let id = format!("vcpu{}", self.next_id);
        self.next_id += 1;
        let mut args = props;
        args["driver"] = json!(driver);
        args["id"] = json!(id);
        qmp.execute("device_add", Some(args)).await?;
        self.plugged.push(id.clone());
        info!(id, vcpus = self.vcpus(), "vCPU plugged");
        Ok(())
    }

    async fn plug_dimm(&mut self, qmp: &Qmp, mib: u64) -> Result<(), LauncherError> {
        let n = self.dimms;
        let (mem, dimm) = (format!("hotmem{n}"), format!("dimm{n}"));
        qmp.execute(
            "object-add",
            Some(json!({
                "qom-type": "memory-backend-memfd",
                "id": mem,
                "size": mib << 20,
                "share": true,
            })),
        )
        .await?;
        let added = qmp
            .execute(
                "device_add",
                Some(json!({ "driver": "pc-dimm", "id": dimm, "memdev": mem })),
            )
            .await;
        if let Err(e) = added {
            let _ = qmp.execute("object-del", Some(json!({ "id": mem }))).await;
            return Err(e.into());
        }
        self.dimms += 1;
        self.free_slots -= 1;
        self.memory_mib += mib;
        info!(dimm, mib, memory_mib = self.memory_mib, "memory plugged");
        Ok(())
    }
}

/// Whether a vCPU of QOM path `path` holds a slot of `query-hotpluggable-cpus`.
fn holds(list: &Value, path: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|c| c["qom-path"] == path))
}

/// The CPU type and topology properties of the first entry of
/// `query-hotpluggable-cpus` that no vCPU holds (no `qom-path`), lowest
/// topology first (QEMU lists them highest first).
fn free_cpu_slot(list: &Value) -> Option<(String, Value)> {
    let mut free: Vec<&Value> = list
        .as_array()?
        .iter()
        .filter(|c| c.get("qom-path").is_none())
        .collect();
    free.sort_by_key(|c| {
        let p = &c["props"];
        ["socket-id", "die-id", "core-id", "thread-id"].map(|k| p[k].as_i64().unwrap_or(0))
    });
    let c = free.first()?;
    Some((c["type"].as_str()?.to_string(), c["props"].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_slot_is_taken() {
        // query-hotpluggable-cpus of QEMU 7.2 with -smp 1,maxcpus=3 after
        // one vCPU was plugged
        let list = json!([
            {"props": {"core-id": 2, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 1, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/peripheral/vcpu1", "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]);
        assert!(holds(&list, "/machine/peripheral/vcpu1"));
        assert!(!holds(&list, "/machine/peripheral/vcpu2"));
        let (t, p) = free_cpu_slot(&list).unwrap();
        assert_eq!(t, "max-x86_64-cpu");
        assert_eq!(p, json!({"core-id": 2, "thread-id": 0, "socket-id": 0}));
        assert!(free_cpu_slot(&json!([])).is_none());
    }

    fn room() -> Resources {
        Resources::new(
            &VmSpec {
                vcpus: 1,
                max_vcpus: 4,
                memory_mib: 512,
                max_memory_mib: 2048,
                memory_slots: 1,
                ..Default::default()
            },
            Accelerator::Kvm,
        )
    }

    #[test]
    fn requests_outside_the_room_are_refused() {
        let r = room();
        let req = |vcpus, memory_mib| ResizeVmRequest { vcpus, memory_mib };
        assert!(r.check(&req(3, 1024)).is_ok());
        assert!(r.check(&req(1, 100)).is_ok(), "less memory: unchanged");
        for (bad, what) in [
            (req(0, 512), "booted with"),
            (req(5, 512), "max_vcpus (4)"),
            (req(2, 4096), "max_memory_mib (2048)"),
        ] {
            let e = r.check(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let full = Resources {
            free_slots: 0,
            ..room()
        };
        let e = full.check(&req(1, 1024)).unwrap_err().to_string();
        assert!(e.contains("memory_slots"), "{e}");
    }
}
