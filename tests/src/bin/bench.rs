//! kata-bench: the figures of `make bench`, printed as a markdown report.
//!
//! Boots the test guest image under the real launcher (TCG here) and measures:
//! StartVm to the agent's readiness announcement, 64-byte round trips and bulk
//! echo through the hybrid vsock backend, and the launcher's memory (PSS).
//! Needs root and the test image (`make bench` builds it).

use std::time::{Duration, Instant};

use kata_proto::dialer;
use kata_proto::launcher::StopVmRequest;
use kata_tests::TestVm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOTS: usize = 5;

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn stop(mut vm: TestVm) {
    let _ = vm
        .launcher
        .client
        .stop_vm(StopVmRequest { timeout_seconds: 5 })
        .await;
    let _ = vm.launcher.client.shutdown(()).await;
    let _ = vm.launcher.child.wait().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut ready = vec![];
    for i in 0..BOOTS {
        let t0 = Instant::now();
        let vm = TestVm::boot(&format!("bench-boot-{i}"), None).await;
        let total = t0.elapsed().as_secs_f64();
        let st = vm
            .launcher
            .client
            .clone()
            .vm_status(())
            .await
            .unwrap()
            .into_inner();
        assert!(st.agent_ready);
        ready.push(total);
        stop(vm).await;
    }
    ready.sort_by(f64::total_cmp);

    let vm = TestVm::boot("bench-vsock", Some("/usr/bin/kata-test-guest")).await;
    let launcher_pid = vm.launcher.child.id().unwrap_or(0);
    let idle_pss = pss_kib(launcher_pid);
    // 64-byte round trips
    let mut s = dialer::dial(&vm.addr(5000), Duration::from_secs(10))
        .await
        .unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut rtt = vec![];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        rtt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(s);
    rtt.sort_by(f64::total_cmp);
    // bulk echo: 64 MiB each way at once
    const SIZE: usize = 64 << 20;
    let s = dialer::dial(&vm.addr(5000), Duration::from_secs(10))
        .await
        .unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 256 * 1024];
        for _ in 0..SIZE / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < SIZE {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    let bulk = t.elapsed().as_secs_f64();
    let busy_pss = pss_kib(launcher_pid);
    drop(writer.await);
    stop(vm).await;

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!("## VM spine (kata-bench)\n");
    println!(
        "Machine: {cpu}, {} CPUs, QEMU under TCG, guest 1 vCPU / 256 MiB.\n",
        num_cpus()
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| launcher start + CreateVm + StartVm until the agent announced itself (n={BOOTS}) | min {:.2} s, median {:.2} s, max {:.2} s |",
        ready[0],
        pct(&ready, 0.5),
        ready[ready.len() - 1]
    );
    println!(
        "| 64-byte echo round trip over hybrid vsock (n=2000) | p50 {:.3} ms, p99 {:.3} ms |",
        pct(&rtt, 0.5),
        pct(&rtt, 0.99)
    );
    println!(
        "| bulk echo, 64 MiB each way at once | {:.1} MiB/s each way ({:.2} s) |",
        64.0 / bulk,
        bulk
    );
    println!("| launcher PSS (vsock backend included), VM idle / after the bulk echo | {} KiB / {} KiB |", idle_pss, busy_pss);
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
