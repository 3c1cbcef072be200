//! The boot floor: the same launcher, QEMU, machine and kernel as a pod's
//! VM, with an init that only writes a line to the console (busybox's sh,
//! `rdinit=/bin/sh -- -c "echo ...; poweroff -f"`), against the agent's
//! readiness; for kata-rs's kernel and for Debian's cloud kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kata_proto::launcher::{Accelerator, CreateVmRequest, StartVmRequest, StopVmRequest, VmSpec};
use kata_tests::{bin, TestVm};
use kata_vmm_launcher::client::{cleanup, LauncherProcess, LiveLauncher};

use super::pct;

const RUNS: usize = 5;
const MARKER: &str = "kata-rs-floor";

/// A guest image of the test agent with kernel `kernel` (`kata-rs` or
/// `debian`) in `dir`; `None` if it cannot be built (kata-rs's kernel not
/// built on this machine).
fn image(kernel: &str, dir: &Path) -> Option<PathBuf> {
    let out = dir.join(kernel);
    let o = Command::new(bin("kata-ctl"))
        .args(["image", "build", "--kernel", kernel, "--output"])
        .arg(&out)
        .arg("--agent")
        .arg(bin("kata-agent"))
        .output()
        .expect("run kata-ctl image build");
    if !o.status.success() {
        eprintln!(
            "no {kernel} image: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return None;
    }
    Some(out)
}

/// From starting the launcher to the floor init's line on the console.
async fn floor_once(guest: &Path, id: &str) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(id);
    let t0 = Instant::now();
    let mut l =
        LauncherProcess::spawn(&bin("kata-vmm-launcher"), id, &dir, Duration::from_secs(10))
            .await
            .expect("launcher starts");
    let spec = VmSpec {
        vcpus: 1,
        memory_mib: 256,
        kernel_path: guest.join("vmlinuz").display().to_string(),
        initrd_path: guest.join("initrd.img").display().to_string(),
        kernel_params: format!("rdinit=/bin/sh -- -c \"echo {MARKER}; poweroff -f\""),
        accelerator: Accelerator::Tcg as i32,
        cgroup_path: format!("kata-rs-bench-{id}"),
        firmware_path: kata_proto::config::QBOOT.into(),
        ..Default::default()
    };
    l.client
        .create_vm(CreateVmRequest { spec: Some(spec) })
        .await
        .expect("CreateVm");
    // StartVm waits for an agent that never comes: the console tells
    let mut c = l.client.clone();
    let start = tokio::spawn(async move {
        let _ = c
            .start_vm(StartVmRequest {
                agent_ready_timeout_seconds: 60,
            })
            .await;
    });
    let console = l.paths.console_log();
    let took = loop {
        let text = std::fs::read(&console).unwrap_or_default();
        if String::from_utf8_lossy(&text)
            .lines()
            .any(|line| line.trim() == MARKER)
        {
            break t0.elapsed().as_secs_f64();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the floor init wrote nothing to {}",
            console.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    start.abort();
    let _ = l.client.stop_vm(StopVmRequest { timeout_seconds: 5 }).await;
    let _ = l.client.shutdown(()).await;
    let _ = l.child.wait().await;
    if l.paths.dir.exists() {
        let _ = cleanup(&l.paths, LiveLauncher::Kill);
    }
    took
}

/// From starting the launcher to the agent's readiness (StartVm returns);
/// then, the guest idle for a second, its MemAvailable (the agent's guest
/// details) and QEMU's PSS, both in MiB.
async fn ready_once(guest: &Path, id: &str) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let vm = TestVm::boot_image(guest, id, None).await;
    let took = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let details = kata_tests::agent::connect(&vm.addr(kata_proto::paths::ports::AGENT))
        .await
        .get_guest_details(kata_proto::agent::GuestDetailsRequest::default())
        .await
        .expect("GetGuestDetails")
        .into_inner();
    let available = (details.mem_available_bytes >> 20) as f64;
    let qemu = super::pss_kib(vm.created.hypervisor_pid) as f64 / 1024.0;
    super::stop(vm).await;
    (took, available, qemu)
}

pub async fn floor_section() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = vec![];
    for (kernel, name) in [
        ("kata-rs", "kata-rs kernel"),
        ("debian", "Debian cloud kernel"),
    ] {
        let Some(guest) = image(kernel, tmp.path()) else {
            rows.push(format!(
                "| {name} | not built on this machine | — | — | — | — |"
            ));
            continue;
        };
        let (mut floor, mut ready, mut available, mut qemu) = (vec![], vec![], vec![], vec![]);
        for i in 0..RUNS {
            floor.push(floor_once(&guest, &format!("bench-floor-{kernel}-{i}")).await);
            let (r, a, q) = ready_once(&guest, &format!("bench-ready-{kernel}-{i}")).await;
            ready.push(r);
            available.push(a);
            qemu.push(q);
        }
        for v in [&mut floor, &mut ready, &mut available, &mut qemu] {
            v.sort_by(f64::total_cmp);
        }
        rows.push(format!(
            "| {name} | {:.2} s (min {:.2}) | {:.2} s (min {:.2}) | {:.2}x | {:.0} MiB | {:.1} MiB |",
            pct(&floor, 0.5),
            floor[0],
            pct(&ready, 0.5),
            ready[0],
            pct(&ready, 0.5) / pct(&floor, 0.5),
            pct(&available, 0.5),
            pct(&qemu, 0.5)
        ));
    }
    println!("\n## Boot floor (kata-bench)\n");
    println!("From starting the launcher to: the console line of an init that only writes it (busybox sh as `rdinit`, the floor), and the agent's readiness announcement (StartVm returns); the same launcher, QEMU (q35, TCG, 1 vCPU, 256 MiB) and kernel; n={RUNS} each, alternated. Then, the guest idle for a second: its MemAvailable and QEMU's PSS (medians).\n");
    println!("| kernel | floor, p50 | agent ready, p50 | agent ready / floor | guest MemAvailable | QEMU PSS |\n|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
