//! End to end, as a hostile guest: root in the VM (the agent's debug console,
//! which is what a container escape gives) and root in a container try to
//! reach the host through the shared directory. Real containerd 1.6, ctr, the
//! shim, QEMU (TCG) and the test guest image; needs root (`make test`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use kata_proto::paths::SandboxPaths;
use kata_tests::containerd::Containerd;
use kata_tests::shim::{
    assert_pod_gone, guest_shell, kill_and_delete, mount_options_under, wait_task_status,
    write_config, RUNTIME,
};

const GUEST_SHARE: &str = "/run/kata-containers/shared/containers";

fn annotations(kind: &str, pod: &str) -> Vec<String> {
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

/// One pod, every door the shim's side opens: the share's directories, the
/// mount flags, setuid files written from the guest, the pod directory's
/// mode, and the agent binary.
#[test]
fn a_hostile_guest_gains_nothing_through_the_share() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "",
        "debug_console_enabled = true",
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let pod = "hostile1";
    let member = "hostile1-app";
    let paths = SandboxPaths::new(pod);

    let mut a: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--runtime".into(),
        RUNTIME.into(),
    ];
    a.extend(annotations("sandbox", pod));
    a.extend([image.clone(), pod.into(), "sleep".into(), "1000".into()]);
    c.ctr_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    wait_task_status(&c, pod, "RUNNING", Duration::from_secs(90));

    // the pod directory is root-only
    let mode = std::fs::metadata(&paths.dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{} mode {mode:o}", paths.dir.display());

    // an operator's shell in the guest: kata-ctl exec through the debug console
    let mut exec = std::process::Command::new(kata_tests::bin("kata-ctl"));
    exec.args(["exec", pod]);
    let o = kata_tests::containerd::run_bounded(
        exec,
        Some(b"echo exec-$((20+22)) $(cat /proc/1/comm); exit\n"),
        Duration::from_secs(60),
    )
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("exec-42 init"), "{out}");
    let mut exec = std::process::Command::new(kata_tests::bin("kata-ctl"));
    exec.args(["exec", "no-such-pod"]);
    let o = kata_tests::containerd::run_bounded(exec, None, Duration::from_secs(30)).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no pod no-such-pod on this host"),
        "{err}"
    );

    // guest root plants symlinks where the shim is about to mount the next
    // container, and a directory in the running container's tree
    let target = tmp.path().join("host-target");
    std::fs::create_dir(&target).unwrap();
    let out = guest_shell(
        pod,
        &format!(
            "ln -s {t} {GUEST_SHARE}/{member}; mkdir {GUEST_SHARE}/{pod}/mounts; \
             ln -s {t} {GUEST_SHARE}/{pod}/evil; touch /kata-test; \
             echo x >> /proc/1/exe || echo agent-binary-refused",
            t = target.display()
        ),
    );
    assert_eq!(
        out.matches("Read-only file system").count(),
        4,
        "the share's directories and the guest's root (the agent binary) are read-only: {out}"
    );
    // the running agent is also protected by ETXTBSY; an exited set-up
    // helper's binary only by the read-only root (EROFS, counted above)
    assert!(out.contains("agent-binary-refused"), "{out}");

    // the member container is created next, with a read-write volume
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let mut b: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--runtime".into(),
        RUNTIME.into(),
    ];
    b.extend(annotations("container", pod));
    b.extend([
        "--mount".into(),
        format!("type=bind,src={},dst=/vol,options=rbind:rw", vol.display()),
        image.clone(),
        member.into(),
        "sleep".into(),
        "1000".into(),
    ]);
    c.ctr_ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    wait_task_status(&c, member, "RUNNING", Duration::from_secs(60));
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing was created through the planted symlink"
    );
    assert!(
        mount_options_under(&target).is_empty(),
        "nothing was mounted through the planted symlink"
    );

    // every mount the guest reaches is nosuid,nodev on the host; the share's
    // own directories are read-only
    let mounts = mount_options_under(&paths.dir);
    assert!(
        mounts.iter().any(|(p, _, _)| p.ends_with("rootfs")),
        "{mounts:?}"
    );
    for (p, opts, _) in &mounts {
        if p.starts_with(paths.host_mounts_dir()) || p.starts_with(paths.shared_dir()) {
            let o: Vec<&str> = opts.split(',').collect();
            assert!(
                o.contains(&"nosuid") && o.contains(&"nodev"),
                "{}: {opts}",
                p.display()
            );
        }
        if p == &paths.shared_dir() {
            assert!(
                opts.split(',').any(|o| o == "ro"),
                "{}: {opts}",
                p.display()
            );
        }
    }

    // root in the container writes setuid/setgid programs to its rootfs and
    // to the volume: on the host, neither carries the bits
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "suid",
        member,
        "sh",
        "-c",
        "cp /bin/busybox /suid && chmod 6755 /suid && cp /bin/busybox /vol/suid && \
         chmod 6755 /vol/suid && echo > /vol/suid2 && chmod 6755 /vol/suid2; ls -ln /suid /vol",
    ]);
    for host in [
        paths.host_mounts_dir().join(member).join("rootfs/suid"),
        vol.join("suid"),
        vol.join("suid2"),
    ] {
        let m = std::fs::metadata(&host)
            .unwrap_or_else(|e| panic!("{}: {e} ({out})", host.display()))
            .mode();
        assert_eq!(
            m & 0o6000,
            0,
            "{} is {m:o} on the host: the guest made it setuid/setgid ({out})",
            host.display()
        );
    }

    // an unprivileged host user cannot run anything under the pod directory
    let busybox = paths.shared_dir().join(member).join("rootfs/bin/busybox");
    assert!(busybox.exists(), "{}", busybox.display());
    // (through sh: setpriv itself may resolve its program before it drops
    // privileges)
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/bin/sh", "-c", "exec \"$0\" true"])
        .arg(&busybox)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(!o.status.success(), "nobody ran {}", busybox.display());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{o:?}"
    );

    kill_and_delete(&c, member);
    kill_and_delete(&c, pod);
    assert_pod_gone(pod, Duration::from_secs(20));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}
