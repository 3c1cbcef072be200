//! End to end: the codes containerd gets when a helper refuses or the guest
//! stops answering. Real containerd 1.6, ctr, the shim, the launcher, QEMU
//! (TCG) and the test guest image; needs root (`make test`).

use std::time::{Duration, Instant};

use kata_proto::paths::SandboxPaths;
use kata_tests::containerd::Containerd;
use kata_tests::shim::{assert_pod_gone, kill_and_delete, wait_task_status, write_config, RUNTIME};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The launcher's InvalidArgument (a VM size it refuses, asked for through
/// an allowed annotation) reaches ctr as InvalidArgument with its message.
#[test]
fn a_launcher_rejection_reaches_ctr_with_its_code() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "enable_annotations = [\"default_memory\"]",
        "",
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.katacontainers.config.hypervisor.default_memory=4000000",
        &image,
        "huge",
        "true",
    ]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{o:?}");
    assert!(e.contains("launcher:") && e.contains("memory_mib"), "{e}");
    assert!(e.trim_end().ends_with("invalid argument"), "{e}");
    assert_pod_gone("huge", Duration::from_secs(20));
}

/// A guest that stops answering (QEMU stopped with SIGSTOP): Kill, an exec
/// and a new container of the pod fail with DeadlineExceeded within
/// `request_timeout_ms` (twice for a create: its rollback is bounded too),
/// and once the guest runs again the pod is deleted leaving nothing.
#[test]
fn a_frozen_guest_gives_deadline_exceeded_through_ctr() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "",
        "request_timeout_ms = 2000",
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let pod = "frozen1";
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=frozen1",
        &image,
        pod,
        "sleep",
        "1000",
    ]);
    wait_task_status(&c, pod, "RUNNING", Duration::from_secs(90));
    let qemu = kata_vmm_launcher::client::hypervisor_pid(&SandboxPaths::new(pod))
        .expect("the launcher's state names QEMU");
    let qemu = nix::unistd::Pid::from_raw(qemu as i32);
    nix::sys::signal::kill(qemu, nix::sys::signal::Signal::SIGSTOP).unwrap();

    let timed = |args: &[&str]| {
        let t = Instant::now();
        let o = c.ctr(args);
        (o, t.elapsed())
    };
    let (kill, kill_took) = timed(&["task", "kill", "-s", "SIGTERM", pod]);
    let (exec, exec_took) = timed(&["task", "exec", "--exec-id", "e1", pod, "true"]);
    let (create, create_took) = timed(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=frozen1",
        &image,
        "frozen1-app",
        "true",
    ]);
    nix::sys::signal::kill(qemu, nix::sys::signal::Signal::SIGCONT).unwrap();

    for (what, o, took, bound) in [
        ("kill", &kill, kill_took, 8),
        ("exec", &exec, exec_took, 8),
        ("create", &create, create_took, 12),
    ] {
        let e = stderr(o);
        assert!(!o.status.success(), "{what} succeeded on a frozen guest");
        assert!(e.contains("deadline exceeded"), "{what}: {e}");
        assert!(
            took < Duration::from_secs(bound),
            "{what} took {took:?} with request_timeout_ms = 2000"
        );
    }
    let _ = c.ctr(&["container", "delete", "frozen1-app"]);
    kill_and_delete(&c, pod);
    assert_pod_gone(pod, Duration::from_secs(20));
    assert!(!SandboxPaths::new(pod).dir.exists());
}
