//! kata-bench: the figures of `make bench`, printed as a markdown report.
//!
//! Boots the test guest image under the real launcher (TCG here) and measures:
//! StartVm to the agent's readiness announcement, 64-byte round trips and bulk
//! echo through the hybrid vsock backend, and the launcher's memory (PSS).
//! Then the agent's containers, on a host-mode agent and in the VM: start
//! latency to the first output byte, stdout throughput, the agent's memory.
//! Needs root and the test image (`make bench` builds it).

use std::time::{Duration, Instant};

use kata_proto::agent::{CreateSandboxRequest, DestroySandboxRequest};
use kata_proto::dialer::{self, Address};
use kata_proto::launcher::StopVmRequest;
use kata_proto::stdio::Which;
use kata_tests::agent::{self as ka, Client};
use kata_tests::TestVm;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "bench/cri.rs"]
mod cri;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/metrics.rs"]
mod metrics;
#[path = "bench/net.rs"]
mod net;
#[path = "bench/pod.rs"]
mod pod;
#[path = "bench/policy.rs"]
mod policy;
#[path = "bench/resize.rs"]
mod resize;
#[path = "bench/trace.rs"]
mod trace;
#[path = "bench/virtiofs.rs"]
mod virtiofs;

const BOOTS: usize = 5;

pub(crate) fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds the whole machine has spent busy since boot (/proc/stat:
/// every state but idle and iowait; guest time is inside user time).
pub(crate) fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<u64> = cpu
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
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
    // KATA_BENCH_ONLY=<section>: that section alone (for iterating)
    if let Ok(only) = std::env::var("KATA_BENCH_ONLY") {
        return only_section(&only).await;
    }
    spine_section().await;
    policy::policy_section().await;
    floor::floor_section().await;

    pod_section().await;
    // the sections that drive containerd block: each on a thread of its own
    let blocking: [(fn(), &str); 5] = [
        (metrics::metrics_section, "metrics"),
        (trace::trace_section, "tracing"),
        (resize::resize_section, "resize"),
        (net::net_section, "network"),
        (cri::cri_section, "CRI"),
    ];
    for (section, name) in blocking {
        tokio::task::spawn_blocking(section)
            .await
            .unwrap_or_else(|e| panic!("the {name} section: {e}"));
    }
    virtiofs_section().await;
}

/// The VM spine (boots, vsock round trips and bulk echo, the launcher's
/// memory) and the agent's containers in host mode and in a VM.
async fn spine_section() {
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

    let (host, guest) = agent_section().await;
    println!("\n## Agent: containers (kata-bench)\n");
    println!("Host mode: `kata-agent --listen unix://...` on this machine. VM: the agent as PID 1 of the guest above (TCG), reached over hybrid vsock; rootfs copied in with CopyFile.\n");
    println!("| figure | value |\n|---|---|");
    print_agent("host mode", &host);
    print_agent("VM", &guest);
    println!(
        "| VM stdout throughput vs the raw vsock bulk echo above | {:.2}x |",
        guest.mib_s / (64.0 / bulk)
    );
}

/// One section of the report, by its `KATA_BENCH_ONLY` name.
async fn only_section(name: &str) {
    // the sections that drive containerd block: on a thread of their own
    let blocking: Option<fn()> = match name {
        "net" => Some(net::net_section),
        "metrics" => Some(metrics::metrics_section),
        "trace" => Some(trace::trace_section),
        "resize" => Some(resize::resize_section),
        "cri" => Some(cri::cri_section),
        "pod" => Some(pod::pod_section),
        _ => None,
    };
    if let Some(section) = blocking {
        return tokio::task::spawn_blocking(section)
            .await
            .expect("the section");
    }
    match name {
        "virtiofs" => virtiofs_section().await,
        "policy" => policy::policy_section().await,
        "floor" => floor::floor_section().await,
        "spine" => spine_section().await,
        other => panic!(
            "KATA_BENCH_ONLY={other}: one of spine, virtiofs, net, metrics, policy, trace, resize, floor, cri, pod"
        ),
    }
}

async fn pod_section() {
    tokio::task::spawn_blocking(pod::pod_section)
        .await
        .expect("the pod section");
}

async fn virtiofs_section() {
    // alternated, best of two per daemon: this machine's speed drifts between
    // runs more than the daemons differ
    let up = std::env::var_os("KATA_UPSTREAM_VIRTIOFSD");
    if up.is_none() {
        eprintln!(
            "KATA_UPSTREAM_VIRTIOFSD is not set: no upstream comparison (make bench sets it)"
        );
    }
    let mut ours = vec![];
    let mut theirs = vec![];
    for round in 0..2 {
        ours.push(
            virtiofs::vm_run("kata-virtiofsd (VM)", &format!("bench-vfs-{round}"), None).await,
        );
        if let Some(up) = &up {
            theirs.push(
                virtiofs::vm_run(
                    "upstream virtiofsd (VM)",
                    &format!("bench-vfs-up-{round}"),
                    Some(std::path::Path::new(up)),
                )
                .await,
            );
        }
    }
    let mut runs = vec![virtiofs::best(ours)];
    if !theirs.is_empty() {
        runs.push(virtiofs::best(theirs));
    }
    let (fuse, kernel) = virtiofs::host_runs().await;
    runs.push(fuse);
    runs.push(kernel);
    virtiofs::print(&runs);
}

/// Container start: CreateContainer + stdio attach + StartContainer until the
/// first byte of output, in ms.
async fn start_latency(c: &mut Client, addr: &Address, base: &Value, n: usize) -> Vec<f64> {
    let mut out = vec![];
    for i in 0..n {
        let id = format!("lat{i}");
        let mut s = base.clone();
        s["process"]["args"] = json!(["echo", "x"]);
        let t = Instant::now();
        ka::create(c, &id, &s).await.unwrap();
        let mut o = ka::stream(addr, Which::Stdout, &id, "").await;
        ka::start(c, &id).await.unwrap();
        let mut b = [0u8; 1];
        o.read_exact(&mut b).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e3);
        ka::wait(c, &id, "").await;
        ka::remove(c, &id).await.unwrap();
    }
    out.sort_by(f64::total_cmp);
    out
}

/// `dd if=/dev/zero bs=1M count=N` in a container, read by this client:
/// MiB/s from StartContainer to end of output.
async fn stdout_throughput(c: &mut Client, addr: &Address, base: &Value, mib: usize) -> f64 {
    let mut s = base.clone();
    let count = format!("count={mib}");
    s["process"]["args"] = json!(["dd", "if=/dev/zero", "bs=1M", count]);
    ka::create(c, "dd", &s).await.unwrap();
    let mut o = ka::stream(addr, Which::Stdout, "dd", "").await;
    let _e = ka::collect(ka::stream(addr, Which::Stderr, "dd", "").await);
    let t = Instant::now();
    ka::start(c, "dd").await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = o.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, mib << 20, "all of dd's output arrived");
    ka::wait(c, "dd", "").await;
    ka::remove(c, "dd").await.unwrap();
    mib as f64 / secs
}

/// The agent's resident memory in KiB, read by a container that shares the
/// guest's pid namespace (the agent is its PID 1), or from the host.
async fn agent_rss_kib(c: &mut Client, addr: &Address, base: &Value, host_pid: Option<u32>) -> u64 {
    if let Some(pid) = host_pid {
        return status_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap());
    }
    let mut s = base.clone();
    s["process"]["args"] = json!(["cat", "/proc/1/status"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}]);
    let o = ka::run(c, addr, "rss", &s, None).await.unwrap();
    status_kib(&o.stdout)
}

fn status_kib(status: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Starts ten `sleep` containers, measures, removes them.
async fn rss_with_ten(c: &mut Client, addr: &Address, base: &Value, host_pid: Option<u32>) -> u64 {
    for i in 0..10 {
        let mut s = base.clone();
        s["process"]["args"] = json!(["sleep", "1000"]);
        let id = format!("ten{i}");
        ka::create(c, &id, &s).await.unwrap();
        ka::start(c, &id).await.unwrap();
    }
    let rss = agent_rss_kib(c, addr, base, host_pid).await;
    for i in 0..10 {
        let id = format!("ten{i}");
        ka::signal(c, &id, "", libc::SIGKILL, false).await.unwrap();
        ka::wait(c, &id, "").await;
        ka::remove(c, &id).await.unwrap();
    }
    rss
}

struct AgentFigures {
    latency: Vec<f64>,
    mib_s: f64,
    mib: usize,
    rss_idle: u64,
    rss_ten: u64,
}

async fn agent_figures(
    c: &mut Client,
    addr: &Address,
    base: &Value,
    host_pid: Option<u32>,
    n: usize,
    mib: usize,
) -> AgentFigures {
    let rss_idle = agent_rss_kib(c, addr, base, host_pid).await;
    let latency = start_latency(c, addr, base, n).await;
    let mib_s = stdout_throughput(c, addr, base, mib).await;
    let rss_ten = rss_with_ten(c, addr, base, host_pid).await;
    AgentFigures {
        latency,
        mib_s,
        mib,
        rss_idle,
        rss_ten,
    }
}

fn print_agent(label: &str, f: &AgentFigures) {
    println!(
        "| {label}: CreateContainer + attach + StartContainer to the first output byte (n={}) | min {:.1} ms, median {:.1} ms, p90 {:.1} ms |",
        f.latency.len(),
        f.latency[0],
        pct(&f.latency, 0.5),
        pct(&f.latency, 0.9)
    );
    println!(
        "| {label}: stdout of `dd if=/dev/zero bs=1M count={}` read by the client | {:.0} MiB/s |",
        f.mib, f.mib_s
    );
    println!(
        "| {label}: agent RSS, idle / with 10 containers running | {} KiB / {} KiB |",
        f.rss_idle, f.rss_ten
    );
}

async fn agent_section() -> (AgentFigures, AgentFigures) {
    // host mode
    let a = ka::HostAgent::start().await;
    let mut c = a.client.clone();
    let base = ka::spec(&a.rootfs, &["true"]);
    let host = agent_figures(&mut c, &a.addr, &base, Some(a.child.id()), 20, 1024).await;
    drop(a);

    // in the VM: the rootfs arrives by CopyFile
    let mut vm = TestVm::boot("bench-agent", None).await;
    let addr = vm.addr(kata_proto::paths::ports::AGENT);
    let mut c = ka::connect(&addr).await;
    let local = tempfile::tempdir().unwrap();
    let rootfs = std::path::Path::new("/run/kata-agent/shared/busybox");
    ka::copy_tree(&mut c, &ka::busybox_rootfs(local.path()), rootfs)
        .await
        .unwrap();
    c.create_sandbox(CreateSandboxRequest {
        sandbox_id: "bench-agent".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let base = ka::spec(rootfs, &["true"]);
    let guest = agent_figures(&mut c, &addr, &base, None, 10, 256).await;
    let _ = c.destroy_sandbox(DestroySandboxRequest {}).await;
    let _ = vm.launcher.client.wait_vm(()).await;
    stop(vm).await;
    (host, guest)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
