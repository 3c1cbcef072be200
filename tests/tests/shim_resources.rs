//! The pod's host cgroups and live resource updates, end to end: real
//! containerd, `ctr run --cgroup`, containerd's Tasks.Update, QEMU under TCG
//! hot-plugging vCPUs and memory, the guest agent onlining them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_proto::paths::SandboxPaths;
use kata_tests::containerd::Containerd;
use kata_tests::shim::{assert_pod_gone, kill_and_delete, pod_processes, write_config, RUNTIME};
use serde_json::json;

const GONE: Duration = Duration::from_secs(30);

fn setup(qemu_extra: &str, runtime: &str) -> (Containerd, String, tempfile::TempDir) {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        qemu_extra,
        &format!("[runtime]\n{runtime}\n"),
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    (c, image, tmp)
}

/// The cgroup of `pid`'s thread `tid` in the hierarchy holding `controller`
/// (v1), or the unified one.
fn cgroup_of(pid: u32, tid: u32, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))
        .unwrap_or_else(|e| panic!("cgroup of {pid}/{tid}: {e}"));
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == controller) {
            return path.to_string();
        }
        if ctrls.is_empty() {
            unified = Some(path.to_string());
        }
    }
    unified.unwrap_or_default()
}

/// The directory of cgroup `rel` for `controller`: v1's hierarchy of it if
/// the host has one, else the v2 tree.
fn cgroup_dir(controller: &str, rel: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    let root = if v1.is_dir() {
        v1
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    root.join(rel.trim_start_matches('/'))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The sandbox cgroup's CPU quota (µs per 100 ms; -1: none) and memory
/// limit (bytes; None: none).
fn limits(rel: &str) -> (i64, Option<u64>) {
    let cpu = cgroup_dir("cpu", rel);
    let quota = if cpu.join("cpu.cfs_quota_us").exists() {
        read(&cpu.join("cpu.cfs_quota_us")).parse().unwrap()
    } else {
        match read(&cpu.join("cpu.max")).split_whitespace().next() {
            Some("max") => -1,
            Some(q) => q.parse().unwrap(),
            None => panic!("cpu.max"),
        }
    };
    let mem = cgroup_dir("memory", rel);
    let limit = if mem.join("memory.limit_in_bytes").exists() {
        let v: u64 = read(&mem.join("memory.limit_in_bytes")).parse().unwrap();
        (v < 1 << 62).then_some(v)
    } else {
        read(&mem.join("memory.max")).parse().ok()
    };
    (quota, limit)
}

fn tids(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("QEMU's threads")
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .collect()
}

fn vcpu_tids(pid: u32) -> Vec<u32> {
    tids(pid)
        .into_iter()
        .filter(|(_, c)| c.starts_with("CPU "))
        .map(|(t, _)| t)
        .collect()
}

fn shim_pid(id: &str) -> u32 {
    pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .unwrap_or_else(|| panic!("no shim for {id}: {:?}", pod_processes(id)))
        .0
}

fn exec(c: &Containerd, id: &str, n: &mut u32, script: &str) -> String {
    *n += 1;
    c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        &format!("e{n}"),
        id,
        "sh",
        "-c",
        script,
    ])
}

/// The guest's CPUs as a container sees them: `nproc` and the online list.
fn cpus(c: &Containerd, id: &str, n: &mut u32) -> (u32, String) {
    let out = exec(c, id, n, "nproc; cat /sys/devices/system/cpu/online");
    let mut l = out.lines();
    (
        l.next().unwrap_or("").trim().parse().unwrap_or(0),
        l.next().unwrap_or("").trim().to_string(),
    )
}

fn mem_total_mib(c: &Containerd, id: &str, n: &mut u32) -> u64 {
    let out = exec(c, id, n, "grep MemTotal /proc/meminfo");
    out.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Polls (up to 5 s) until the container sees `want` CPUs.
fn wait_cpus(c: &Containerd, id: &str, n: &mut u32, want: (u32, &str)) {
    let t0 = Instant::now();
    loop {
        let got = cpus(c, id, n);
        if got.0 == want.0 && got.1 == want.1 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the guest shows {got:?}, {want:?} wanted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn resources(cpus: i64, memory_mib: i64) -> serde_json::Value {
    json!({
        "cpu": { "quota": cpus * 100_000, "period": 100_000 },
        "memory": { "limit": memory_mib << 20 }
    })
}

#[test]
fn a_cgroupfs_pod_holds_its_vcpus_and_follows_updates_with_hotplug() {
    let (c, image, _tmp) = setup(
        "default_maxvcpus = 4\ndefault_maxmemory = 2048\n",
        "sandbox_cgroup_only = false",
    );
    let id = "hp1";
    let rel = format!("/kata-rs-test/{id}");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--cgroup",
        &rel,
        "--cpu-quota",
        "100000",
        "--cpu-period",
        "100000",
        "--memory-limit",
        &(256u64 << 20).to_string(),
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-id={id}"),
        &image,
        id,
        "sleep",
        "1000",
    ]);
    let qemu = kata_vmm_launcher::client::hypervisor_pid(&SandboxPaths::new(id)).expect("QEMU");
    let overhead = format!("/kata_overhead/{id}");
    let v1 = Path::new("/sys/fs/cgroup/cpu").is_dir();

    // where everything is: the vCPUs in the pod's cgroup, the rest (QEMU's
    // other threads, the shim and its helpers) in the overhead cgroup
    let vcpus = vcpu_tids(qemu);
    assert_eq!(vcpus.len(), 2, "default_vcpus 1 + 1 CPU of limits");
    for t in &vcpus {
        assert_eq!(cgroup_of(qemu, *t, "cpu"), rel, "vCPU thread {t}");
    }
    if v1 {
        assert_eq!(cgroup_of(qemu, qemu, "cpu"), overhead, "QEMU's main thread");
    }
    let shim = shim_pid(id);
    assert_eq!(cgroup_of(shim, shim, "cpu"), overhead, "the shim");
    for (pid, cmd) in pod_processes(id) {
        if pid != qemu {
            assert_eq!(cgroup_of(pid, pid, "cpu"), overhead, "{cmd}");
        }
    }
    // limits: 1 CPU + 0.25 overhead; the VM's 256 + 256 MiB + 256 overhead
    assert_eq!(limits(&rel), (125_000, Some(768 << 20)));

    let mut n = 0;
    wait_cpus(&c, id, &mut n, (2, "0-1"));
    let mem0 = mem_total_mib(&c, id, &mut n);

    // 1 -> 3 CPUs: two vCPUs hot-plugged, online in the guest
    let t0 = Instant::now();
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 256)).unwrap();
    eprintln!("Update to 3 CPUs took {:?}", t0.elapsed());
    wait_cpus(&c, id, &mut n, (4, "0-3"));
    let vcpus = vcpu_tids(qemu);
    assert_eq!(vcpus.len(), 4);
    for t in &vcpus {
        assert_eq!(cgroup_of(qemu, *t, "cpu"), rel, "hot-plugged vCPU thread {t}");
    }
    assert_eq!(limits(&rel).0, 325_000);

    // memory limit +512 MiB: a DIMM, onlined
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 768)).unwrap();
    let mem1 = mem_total_mib(&c, id, &mut n);
    assert!(
        (mem0 + 500..=mem0 + 524).contains(&mem1),
        "MemTotal {mem0} -> {mem1} MiB"
    );
    assert_eq!(limits(&rel).1, Some((256 + 768 + 256) << 20));

    // a container started in the pod now has them
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-id={id}"),
        &image,
        "hp1-app",
        "sleep",
        "1000",
    ]);
    assert_eq!(cpus(&c, "hp1-app", &mut n), (4, "0-3".into()));
    let out = exec(
        &c,
        "hp1-app",
        &mut n,
        "dd if=/dev/zero of=/dev/shm/f bs=1M count=600 2>&1 && echo ok; rm -f /dev/shm/f",
    );
    assert!(out.contains("ok"), "600 MiB in the new memory: {out}");

    // bad updates: refused with the bound named, the pod unchanged
    let e = kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(10, 768))
        .unwrap_err();
    assert!(e.contains("default_maxvcpus"), "{e}");
    let e = kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 4096))
        .unwrap_err();
    assert!(e.contains("default_maxmemory"), "{e}");
    assert_eq!(cpus(&c, id, &mut n), (4, "0-3".into()));
    assert_eq!(limits(&rel).0, 325_000);

    // 3 -> 1 CPU: the hot-plugged vCPUs are unplugged
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(1, 768)).unwrap();
    wait_cpus(&c, id, &mut n, (2, "0-1"));
    assert_eq!(vcpu_tids(qemu).len(), 2);
    assert_eq!(limits(&rel).0, 125_000);

    kill_and_delete(&c, "hp1-app");
    kill_and_delete(&c, id);
    assert_pod_gone(id, GONE);
    for d in [cgroup_dir("cpu", &rel), cgroup_dir("cpu", &overhead)] {
        assert!(!d.exists(), "{} left", d.display());
    }
}

#[test]
fn sandbox_cgroup_only_puts_every_pod_process_in_the_pods_cgroup() {
    let (c, image, _tmp) = setup("", "sandbox_cgroup_only = true");
    let id = "cg-only";
    let rel = format!("/kata-rs-test/{id}");
    c.ctr_ok(&[
        "run", "-d", "--runtime", RUNTIME, "--cgroup", &rel, &image, id, "sleep", "1000",
    ]);
    let procs = pod_processes(id);
    assert!(procs.len() >= 4, "shim, launcher, virtiofsd, QEMU: {procs:?}");
    for (pid, cmd) in &procs {
        for (tid, comm) in tids(*pid) {
            assert_eq!(cgroup_of(*pid, tid, "cpu"), rel, "{cmd} thread {comm}");
            assert_eq!(cgroup_of(*pid, tid, "memory"), rel, "{cmd} thread {comm}");
        }
    }
    assert!(
        !cgroup_dir("cpu", &format!("kata_overhead/{id}")).exists(),
        "no overhead cgroup"
    );
    // no container limits: none on the cgroup either
    assert_eq!(limits(&rel), (-1, None));
    // a SIGKILLed shim: containerd's cleanup (shim delete) removes it all
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid(id) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    kata_tests::shim::wait_task_ended(&c, id, Duration::from_secs(30));
    let _ = c.ctr(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
    assert_pod_gone(id, GONE);
    assert!(!cgroup_dir("cpu", &rel).exists());
}
