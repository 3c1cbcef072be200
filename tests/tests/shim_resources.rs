//! The pod's host cgroups and live resource updates, end to end: real
//! containerd, `ctr run --cgroup`, containerd's Tasks.Update, QEMU under TCG
//! hot-plugging vCPUs and memory, the guest agent onlining them.

use std::path::Path;
use std::time::{Duration, Instant};

use kata_proto::paths::SandboxPaths;
use kata_tests::containerd::Containerd;
use kata_tests::resources::{
    assert_pod_processes_in, cgroup_dir, cgroup_of, cpus, exec, limits, mem_total_mib, resources,
    shim_pid, tids, vcpu_tids, wait_cpus,
};
use kata_tests::shim::{
    assert_pod_gone, kill_and_delete, limit_flags, pod_flags, pod_processes, run_detached_with,
    write_config,
};

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

#[test]
fn a_cgroupfs_pod_holds_its_vcpus_and_follows_updates_with_hotplug() {
    let (c, image, _tmp) = setup(
        "default_maxvcpus = 4\ndefault_maxmemory = 2048\n",
        "sandbox_cgroup_only = false",
    );
    let id = "hp1";
    let rel = format!("/kata-rs-test/{id}");
    let mut flags = limit_flags(&rel, 1, 256);
    flags.extend(pod_flags(id, true));
    run_detached_with(&c, &flags, &image, id, &["sleep", "1000"]);
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
    assert_pod_processes_in(id, "cpu", &overhead, qemu);
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
        assert_eq!(
            cgroup_of(qemu, *t, "cpu"),
            rel,
            "hot-plugged vCPU thread {t}"
        );
    }
    assert_eq!(limits(&rel).0, 325_000);

    // memory limit +512 MiB: a DIMM, onlined
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 768)).unwrap();
    let mem1 = mem_total_mib(&c, id, &mut n);
    assert!(
        (mem0 + 500..=mem0 + 524).contains(&mem1),
        "MemTotal {mem0} -> {mem1} MiB; the guest's memory blocks: {}",
        exec(
            &c,
            id,
            &mut n,
            "cd /sys/devices/system/memory; for b in memory*; do echo $b $(cat $b/state); done; dmesg | tail -20"
        )
    );
    assert_eq!(limits(&rel).1, Some((256 + 768 + 256) << 20));

    // a container started in the pod now has them
    run_detached_with(
        &c,
        &pod_flags(id, false),
        &image,
        "hp1-app",
        &["sleep", "1000"],
    );
    assert_eq!(cpus(&c, "hp1-app", &mut n), (4, "0-3".into()));
    let out = exec(
        &c,
        "hp1-app",
        &mut n,
        // dd's one 600 MiB buffer, filled: more than the guest had before
        "dd if=/dev/zero of=/dev/null bs=600M count=1 2>&1",
    );
    assert!(
        out.contains("1+0 records out"),
        "600 MiB in the new memory: {out}"
    );

    // bad updates: refused with the bound named, the pod unchanged
    let e =
        kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(10, 768)).unwrap_err();
    assert!(e.contains("default_maxvcpus"), "{e}");
    let e =
        kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 4096)).unwrap_err();
    assert!(e.contains("default_maxmemory"), "{e}");
    assert_eq!(cpus(&c, id, &mut n), (4, "0-3".into()));
    assert_eq!(limits(&rel).0, 325_000);

    // 3 -> 1 CPU: the hot-plugged vCPUs are unplugged
    if let Err(e) = kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(1, 768)) {
        let console =
            std::fs::read_to_string(SandboxPaths::new(id).console_log()).unwrap_or_default();
        let guest = exec(&c, id, &mut n, "ls /sys/devices/system/cpu; cat /sys/devices/system/cpu/online; for c in /sys/devices/system/cpu/cpu*/online; do echo $c $(cat $c); done");
        panic!("{e}\nguest: {guest}\nconsole:\n{console}");
    }
    wait_cpus(&c, id, &mut n, (2, "0-1"));
    assert_eq!(limits(&rel).0, 125_000);
    // (under TCG the vCPUs stay plugged, parked offline: QEMU 7.2 aborts at
    // a vCPU plug after an unplug) and back up: the parked ones return
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 768)).unwrap();
    wait_cpus(&c, id, &mut n, (4, "0-3"));
    assert_eq!(vcpu_tids(qemu).len(), 4);
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(1, 768)).unwrap();
    wait_cpus(&c, id, &mut n, (2, "0-1"));

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
    run_detached_with(&c, &["--cgroup", &rel], &image, id, &["sleep", "1000"]);
    let procs = pod_processes(id);
    assert!(
        procs.len() >= 4,
        "shim, launcher, virtiofsd, QEMU: {procs:?}"
    );
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
