//! A pod whose cgroupsPath is systemd's (`slice:prefix:name`), through a
//! real systemd (Debian's, PID 1 of private namespaces: see
//! `kata_tests::systemd`) reached over D-Bus by the shim: its scope holds
//! QEMU, the overhead scope the shim and its helpers, the limits follow an
//! Update, and the scopes are gone after delete and after a SIGKILLed
//! shim's cleanup.

use std::time::Duration;

use kata_tests::containerd::Containerd;
use kata_tests::resources::{
    assert_pod_processes_in, cgroup_dir, cgroup_of, limits, qemu_of, resources, shim_pid, tids,
    wait_cpus,
};
use kata_tests::shim::{
    assert_pod_gone, kill_and_delete, limit_flags, pod_processes, run_detached_with,
    wait_task_ended, write_config,
};
use kata_tests::systemd::PrivateSystemd;

const GONE: Duration = Duration::from_secs(30);

fn unit_state(sd: &PrivateSystemd, unit: &str) -> String {
    let o = sd.run("systemctl", &["is-active", unit]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn a_systemd_pod_lives_in_its_scope_and_everything_goes_at_delete_and_after_a_crash() {
    let sd = PrivateSystemd::start();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "default_maxvcpus = 4\n",
        "[runtime]\nsandbox_cgroup_only = false\n",
    );
    let c = Containerd::builder()
        .kata_config(&cfg)
        .namespaces_of(sd.pid())
        .start();
    let image = c.import_busybox();
    let root = format!("/{}", sd.cgroup());
    let scope =
        |id: &str| format!("{root}/kata.slice/kata-rs.slice/kata-rs-test.slice/kata-{id}.scope");
    let overhead = |id: &str| format!("{root}/kata_overhead.slice/kata-rs-{id}.scope");
    // no process, no unit, no cgroup of pod `id`
    let all_gone = |id: &str| {
        assert_pod_gone(id, GONE);
        assert!(qemu_of(id).is_none(), "QEMU left");
        for unit in [format!("kata-{id}.scope"), format!("kata-rs-{id}.scope")] {
            assert_ne!(unit_state(&sd, &unit), "active", "{unit}");
        }
        for d in [
            cgroup_dir("cpu", &scope(id)),
            cgroup_dir("cpu", &overhead(id)),
        ] {
            assert!(!d.exists(), "{} left", d.display());
        }
    };

    let id = "sd1";
    let flags = limit_flags("kata-rs-test.slice:kata:sd1", 1, 256);
    run_detached_with(&c, &flags, &image, id, &["sleep", "1000"]);
    assert_eq!(unit_state(&sd, "kata-sd1.scope"), "active");
    assert_eq!(
        unit_state(&sd, "kata-rs-sd1.scope"),
        "active",
        "the overhead scope"
    );
    // systemd places processes: all of QEMU is in the pod's scope
    let qemu = qemu_of(id).expect("QEMU of sd1");
    for (tid, comm) in tids(qemu) {
        assert_eq!(cgroup_of(qemu, tid, "cpu"), scope(id), "QEMU thread {comm}");
    }
    let shim = shim_pid(id);
    assert_pod_processes_in(id, "cpu", &overhead(id), qemu);
    assert!(pod_processes(id).iter().any(|(p, _)| *p == shim));
    // systemd set the limits: 1 CPU + 0.25; the VM's 512 MiB + 256
    assert_eq!(limits(&scope(id)), (125_000, Some(768 << 20)));

    // an Update through containerd: vCPUs hot-plugged, the scope's quota
    // raised by systemd
    kata_tests::tasks::update(c.address(), c.namespace(), id, &resources(3, 256)).unwrap();
    let mut n = 0;
    wait_cpus(&c, id, &mut n, (4, "0-3"));
    assert_eq!(limits(&scope(id)).0, 325_000);
    for (tid, comm) in tids(qemu) {
        assert_eq!(cgroup_of(qemu, tid, "cpu"), scope(id), "QEMU thread {comm}");
    }

    kill_and_delete(&c, id);
    all_gone(id);

    // a SIGKILLed shim: containerd's cleanup (`shim delete`) stops the scopes
    let id = "sd2";
    let flags = ["--cgroup", "kata-rs-test.slice:kata:sd2"];
    run_detached_with(&c, &flags, &image, id, &["sleep", "1000"]);
    assert_eq!(unit_state(&sd, "kata-sd2.scope"), "active");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid(id) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_task_ended(&c, id, Duration::from_secs(30));
    let _ = c.ctr(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
    all_gone(id);
}
