//! Live resizes: the time from containerd's Update to the guest showing the
//! new vCPUs (hot-plug and unplug) and memory, and what the pod's overhead
//! cgroup holds (the shim and its helpers, QEMU's main thread), by PSS.

use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::resources::{cpus, mem_total_mib, resources};
use kata_tests::shim::{kill_and_delete, limit_flags, run_detached_with, write_config};

use super::pod::timed_run;
use super::{pct, pss_kib};

const RUNS: usize = 3;

/// Update to `cpus_mem`, then polls until the guest shows `want` CPUs;
/// (the Update call, until the guest showed it), seconds.
fn timed_update(
    c: &Containerd,
    id: &str,
    n: &mut u32,
    cpus_mem: (i64, i64),
    want: u32,
) -> (f64, f64) {
    let t0 = Instant::now();
    kata_tests::tasks::update(
        c.address(),
        c.namespace(),
        id,
        &resources(cpus_mem.0, cpus_mem.1),
    )
    .expect("Update");
    let call = t0.elapsed().as_secs_f64();
    while cpus(c, id, n).0 != want {
        assert!(t0.elapsed() < Duration::from_secs(30), "no {want} CPUs");
        std::thread::sleep(Duration::from_millis(50));
    }
    (call, t0.elapsed().as_secs_f64())
}

/// The pids in cgroup `rel` of the cpu hierarchy (v1) or the v2 tree.
fn procs(rel: &str) -> Vec<u32> {
    let f = kata_tests::resources::cgroup_dir("cpu", rel).join("cgroup.procs");
    std::fs::read_to_string(f)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `ctr run --rm ... grep MemTotal` `RUNS` + 1 times (the first one warms
/// the caches and is dropped) under configuration `extra` (a `[runtime]`
/// line): sorted first-byte times (s) and the guest's MemTotal (MiB).
fn start_cost(extra: &str) -> (Vec<f64>, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "",
        &format!("[runtime]\n{extra}\n"),
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let mut first = vec![];
    let mut mem = 0;
    for i in 0..=RUNS {
        let id = format!("bench-start-{i}");
        let (f, _, out) = timed_run(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                kata_tests::shim::RUNTIME,
                &image,
                &id,
                "grep",
                "MemTotal",
                "/proc/meminfo",
            ],
        );
        mem = String::from_utf8_lossy(&out)
            .split_whitespace()
            .nth(1)
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        if i > 0 {
            first.push(f);
        }
    }
    first.sort_by(f64::total_cmp);
    (first, mem)
}

pub(crate) fn resize_section() {
    let (fixed, fixed_mem) = start_cost("static_sandbox_resource_mgmt = true");
    let (room, room_mem) = start_cost("static_sandbox_resource_mgmt = false");
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "default_maxvcpus = 4\ndefault_maxmemory = 2048\n",
        "",
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let id = "bench-resize";
    let flags = limit_flags(&format!("/{}/{id}", c.namespace()), 1, 0);
    run_detached_with(&c, &flags, &image, id, &["sleep", "1000"]);
    let mut n = 0;
    // what an exec of `nproc` costs by itself (TCG), to read "seen" against
    let mut exec_alone = vec![];
    for _ in 0..RUNS {
        let t0 = Instant::now();
        cpus(&c, id, &mut n);
        exec_alone.push(t0.elapsed().as_secs_f64());
    }
    exec_alone.sort_by(f64::total_cmp);
    let (mut up_call, mut up_seen, mut down_call, mut down_seen) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let (a, b) = timed_update(&c, id, &mut n, (3, 0), 4);
        up_call.push(a);
        up_seen.push(b);
        let (a, b) = timed_update(&c, id, &mut n, (1, 0), 2);
        down_call.push(a);
        down_seen.push(b);
    }
    for v in [&mut up_call, &mut up_seen, &mut down_call, &mut down_seen] {
        v.sort_by(f64::total_cmp);
    }
    let mem0 = mem_total_mib(&c, id, &mut n);
    let t0 = Instant::now();
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(1, 512)).unwrap();
    let mem_call = t0.elapsed().as_secs_f64();
    let mem1 = mem_total_mib(&c, id, &mut n);

    let overhead: Vec<(u32, String, u64)> = procs(&format!("kata_overhead/{id}"))
        .into_iter()
        .map(|p| (p, comm(p), pss_kib(p)))
        .collect();
    let helpers: u64 = overhead
        .iter()
        .filter(|o| !o.1.starts_with("qemu"))
        .map(|o| o.2)
        .sum();
    let pod: Vec<(u32, String, u64)> = procs(&format!("/{}/{id}", c.namespace()))
        .into_iter()
        .map(|p| (p, comm(p), pss_kib(p)))
        .collect();
    kill_and_delete(&c, id);

    println!("\n## Live resizes and host cgroups (kata-bench)\n");
    println!("One pod (`ctr run --cpu-quota 100000 --cpu-period 100000`, `default_maxvcpus = 4`), TCG; containerd's Tasks.Update, n={RUNS}; \"seen\" is until `nproc` in the container shows it.\n");
    println!(
        "| resize | Update call (returns once the agent onlined them), p50 / max | until an exec shows it, p50 / max |\n|---|---|---|"
    );
    for (name, call, seen) in [
        (
            "1 → 3 CPUs (2 vCPUs hot-plugged the first time, parked ones brought back later)",
            &up_call,
            &up_seen,
        ),
        (
            "3 → 1 CPU (2 vCPUs offlined; under TCG parked, not unplugged)",
            &down_call,
            &down_seen,
        ),
    ] {
        println!(
            "| {name} | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
            pct(call, 0.5) * 1e3,
            pct(call, 1.0) * 1e3,
            pct(seen, 0.5) * 1e3,
            pct(seen, 1.0) * 1e3
        );
    }
    println!(
        "| memory limit 0 → 512 MiB (one 512 MiB DIMM, onlined) | {:.0} ms | MemTotal {mem0} → {mem1} MiB |",
        mem_call * 1e3
    );
    println!(
        "| (an exec of `nproc` alone, p50) | — | {:.0} ms |",
        pct(&exec_alone, 0.5) * 1e3
    );
    println!("\nWhat room to grow costs a pod's start (`ctr run --rm`, n={RUNS} each, TCG, the test configuration: 1 vCPU, 256 MiB; `false` adds `-smp 1,maxcpus=<host CPUs>` and `-m 256M,slots=10,maxmem=<host memory>`):\n");
    println!("| `static_sandbox_resource_mgmt` | first byte, p50 / max | guest MemTotal |\n|---|---|---|");
    for (name, v, m) in [
        ("true", &fixed, fixed_mem),
        ("false (default)", &room, room_mem),
    ] {
        println!(
            "| {name} | {:.0} / {:.0} ms | {m} MiB |",
            pct(v, 0.5) * 1e3,
            pct(v, 1.0) * 1e3
        );
    }
    println!("\n| cgroup | processes (PSS) | PSS total |\n|---|---|---|");
    let list = |v: &[(u32, String, u64)]| {
        v.iter()
            .map(|(_, c, p)| format!("{c} {p} KiB"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| overhead `kata_overhead/<pod>` | {} | {helpers} KiB without QEMU (its main thread lives here on cgroup v1; its PSS is mostly the guest's memory) |",
        list(&overhead)
    );
    println!(
        "| sandbox `/<namespace>/<pod>` (cgroup v1: QEMU's vCPU threads; the process's PSS) | {} | — |",
        list(&pod)
    );
}
