//! Live resource updates (`static_sandbox_resource_mgmt = false`, the
//! default): the pod's VM follows its containers' limits.
//!
//! The shim keeps each container's CPU and memory limits. When a container
//! is added to the pod, updated (containerd's Update) or removed, it
//! recomputes the VM: `default_vcpus` + Σ quota/period (each rounded up),
//! `default_memory` + Σ memory limits rounded up to the guest's memory block
//! size (GetGuestDetails). A VM that would exceed `default_maxvcpus` or
//! `default_maxmemory` is refused with an error naming the bound, and the pod
//! stays as it was. Otherwise the launcher hot-plugs (or unplugs) vCPUs and
//! adds a DIMM (ResizeVm), the agent onlines what arrived (OnlineCPUMem, a
//! target count of online CPUs; before an unplug it offlines the vCPUs that
//! go, which the guest then ejects at once), the new vCPU threads join the sandbox
//! cgroup, and its limits follow. Memory is never given back (as in Kata):
//! lowering a memory limit leaves the VM's memory as it is.
//!
//! With `static_sandbox_resource_mgmt = true` the VM keeps its boot size;
//! only the host cgroup's limits follow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent::{GuestDetailsRequest, OnlineCpuMemRequest};
use kata_proto::config::{Config, Workload};
use kata_proto::launcher::ResizeVmRequest;
use tracing::{info, warn};

use crate::cgroups::{CgroupError, HostCgroups, Overhead};
use crate::pod::{Plan, Pod, PodError};

/// How long the agent may take to online what was plugged.
const ONLINE_DEADLINE: Duration = Duration::from_secs(10);

/// The containers' limits and the VM's size now.
#[derive(Debug)]
pub struct Resources {
    workloads: HashMap<String, Workload>,
    dynamic: bool,
    vcpus: u32,
    memory_mib: u64,
    max_memory_mib: u64,
    /// The guest's memory block, MiB (0: not asked yet).
    block_mib: u64,
}

impl Resources {
    /// A pod made by `plan`: its sandbox container `id` holds the boot
    /// workload. The VM resizes when the plan left it room to grow (not with
    /// `static_sandbox_resource_mgmt`, not on microvm).
    pub fn new(id: &str, plan: &Plan) -> Resources {
        Resources {
            workloads: HashMap::from([(id.to_string(), plan.workload)]),
            dynamic: plan.size.max_vcpus > plan.size.vcpus
                || plan.size.max_memory_mib > plan.size.memory_mib,
            vcpus: plan.size.vcpus,
            memory_mib: plan.size.memory_mib,
            max_memory_mib: plan.size.max_memory_mib,
            block_mib: 0,
        }
    }

    /// A pod whose VM is not the shim's (a host agent): nothing resizes.
    pub fn fixed(id: &str) -> Resources {
        Resources {
            workloads: HashMap::from([(id.to_string(), Workload::default())]),
            dynamic: false,
            vcpus: 0,
            memory_mib: 0,
            max_memory_mib: 0,
            block_mib: 0,
        }
    }

    fn total(&self) -> Workload {
        self.workloads
            .values()
            .fold(Workload::default(), |a, w| a + *w)
    }
}

/// The configured headroom of the sandbox cgroup.
pub fn overhead(cfg: &Config) -> Overhead {
    Overhead {
        millicpus: cfg.runtime.sandbox_cgroup_overhead_millicpus,
        memory_mib: cfg.runtime.sandbox_cgroup_overhead_mib,
    }
}

/// Runs `f` on the pod's host cgroups, on the blocking pool.
pub async fn with_cgroups<T: Send + 'static>(
    cg: &Arc<std::sync::Mutex<HostCgroups>>,
    f: impl FnOnce(&mut HostCgroups) -> Result<T, CgroupError> + Send + 'static,
) -> Result<T, CgroupError> {
    let cg = cg.clone();
    tokio::task::spawn_blocking(move || f(&mut cg.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .unwrap_or_else(|e| {
            Err(CgroupError {
                path: String::new(),
                what: "a blocking task",
                why: e.to_string(),
            })
        })
}

/// The memory block size a guest reports, in MiB. The guest may lie: what
/// is not a power of two between 1 MiB and 2 GiB (x86_64 kernels use 128 MiB
/// to 2 GiB) counts as 128 MiB, so a block never makes the VM grow by more
/// than the bounds already checked allow.
fn block_mib(bytes: u64) -> u64 {
    let mib = bytes >> 20;
    if mib.is_power_of_two() && mib <= 2048 && bytes % (1 << 20) == 0 {
        mib
    } else {
        warn!(
            bytes,
            "the guest reports an unlikely memory block size: 128 MiB assumed"
        );
        128
    }
}

/// `n` rounded up to a multiple of `block` (0: `n`).
fn align_up(n: u64, block: u64) -> u64 {
    if block == 0 {
        n
    } else {
        n.div_ceil(block) * block
    }
}

/// The memory a VM of `now` MiB (room up to `max`) gets when `want` MiB
/// are wanted: grown by whole guest memory blocks, never shrunk.
fn memory_target(now: u64, want: u64, max: u64, block: u64) -> u64 {
    if want <= now {
        return now;
    }
    let grown = now + align_up(want - now, block);
    if grown <= max {
        grown
    } else {
        // the last block does not fit: as much as fits
        now + (max - now) / block.max(1) * block.max(1)
    }
}

impl Pod {
    /// Sets container `cid`'s limits (`None`: it left the pod) and brings the
    /// VM and the host cgroup to what the pod's containers now need (see the
    /// module documentation). On a refused or failed resize the recorded
    /// limits stay as they were.
    pub async fn resize(&self, cid: &str, workload: Option<Workload>) -> Result<(), PodError> {
        let mut r = self.resources.lock().await;
        let old = r.workloads.get(cid).copied();
        if old == workload {
            return Ok(());
        }
        match workload {
            Some(w) => r.workloads.insert(cid.to_string(), w),
            None => r.workloads.remove(cid),
        };
        let res = self.apply(&mut r).await;
        if res.is_err() {
            match old {
                Some(w) => r.workloads.insert(cid.to_string(), w),
                None => r.workloads.remove(cid),
            };
        }
        res
    }

    async fn apply(&self, r: &mut Resources) -> Result<(), PodError> {
        let total = r.total();
        let (Some(launcher), true) = (self.launcher.clone(), r.dynamic) else {
            return self.set_host_limits(total, r.memory_mib).await;
        };
        let size = self.config.resize_for(total).map_err(PodError::Refused)?;
        if r.block_mib == 0 {
            let d = self
                .agent
                .get_guest_details(GuestDetailsRequest {
                    mem_block_size: true,
                    ..Default::default()
                })
                .await
                .map_err(|source| PodError::Agent {
                    what: "GetGuestDetails",
                    source,
                })?;
            r.block_mib = block_mib(d.mem_block_size_bytes);
        }
        let memory = memory_target(r.memory_mib, size.memory_mib, r.max_memory_mib, r.block_mib);
        if size.vcpus == r.vcpus && memory == r.memory_mib {
            return self.set_host_limits(total, r.memory_mib).await;
        }
        let t0 = std::time::Instant::now();
        let agent = self.agent.with_deadline(ONLINE_DEADLINE);
        let online = |nb_cpus: u32, memory_blocks: u32| {
            agent.online_cpu_mem(OnlineCpuMemRequest {
                wait: true,
                nb_cpus,
                cpu_only: memory_blocks == 0,
                memory_blocks,
            })
        };
        if size.vcpus < r.vcpus {
            // the guest lets the CPUs go first: it ejects offline vCPUs at once
            online(size.vcpus, 0)
                .await
                .map_err(|source| PodError::Agent {
                    what: "OnlineCPUMem (offlining the vCPUs to unplug)",
                    source,
                })?;
        }
        let now = launcher
            .clone()
            .resize_vm(ResizeVmRequest {
                vcpus: size.vcpus,
                memory_mib: memory,
            })
            .await
            .map_err(|status| PodError::Launcher {
                what: "resizing the VM",
                status,
            })?
            .into_inner();
        let added_blocks = (now.memory_mib.saturating_sub(r.memory_mib) / r.block_mib) as u32;
        (r.vcpus, r.memory_mib) = (now.vcpus, now.memory_mib);
        online(now.vcpus, added_blocks)
            .await
            .map_err(|source| PodError::Agent {
                what: "OnlineCPUMem",
                source,
            })?;
        let cg = self.children.lock().await.cgroups.clone();
        if let Some(cg) = cg {
            let pid = self.hypervisor_pid;
            let placed = with_cgroups(&cg, move |c| c.place_hypervisor(pid)).await;
            placed.map_err(|e| PodError::Host {
                what: "placing new vCPUs in the sandbox cgroup".into(),
                why: e.to_string(),
            })?;
        }
        info!(
            vcpus = now.vcpus,
            memory_mib = now.memory_mib,
            ms = t0.elapsed().as_millis() as u64,
            "VM resized"
        );
        self.set_host_limits(total, r.memory_mib).await
    }

    async fn set_host_limits(&self, total: Workload, memory_mib: u64) -> Result<(), PodError> {
        let cg = self.children.lock().await.cgroups.clone();
        let Some(cg) = cg else {
            return Ok(());
        };
        let o = overhead(&self.config);
        let set = with_cgroups(&cg, move |c| c.set_limits(total, memory_mib, o)).await;
        if let Err(e) = set {
            // e.g. a v1 memory limit below what the cgroup already uses
            warn!("the sandbox cgroup's limits: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_block_size_is_believed_only_when_plausible() {
        assert_eq!(block_mib(128 << 20), 128);
        assert_eq!(block_mib(2 << 30), 2048);
        for lie in [0, 1, 100 << 20, (128 << 20) + 1, 4 << 30, u64::MAX] {
            assert_eq!(block_mib(lie), 128, "{lie}");
        }
    }

    #[test]
    fn memory_grows_by_whole_blocks_and_never_shrinks() {
        assert_eq!(memory_target(512, 1024, 4096, 128), 1024);
        assert_eq!(memory_target(512, 600, 4096, 128), 640);
        assert_eq!(memory_target(1024, 600, 4096, 128), 1024);
        assert_eq!(memory_target(512, 1000, 800, 128), 768, "what fits");
        assert_eq!(memory_target(512, 513, 4096, 1), 513);
    }
}
