//! virtio-fs end to end: kata-virtiofsd serves a host directory, the launcher
//! gives QEMU a vhost-user-fs device, the agent mounts it (`virtiofs`) as a
//! sandbox storage, and a container runs from a rootfs on it. Needs root and
//! the test image (`make test`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use kata_tests::agent::*;
use kata_tests::TestVm;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_rootfs_over_virtio_fs() {
    let host = tempfile::tempdir().unwrap();
    let shared = host.path().join("shared");
    std::fs::create_dir_all(shared.join("data")).unwrap();
    let rootfs_local = busybox_rootfs(&shared);
    std::fs::write(shared.join("data/hello.txt"), "from the host\n").unwrap();
    // something outside the shared directory that must stay unreachable
    let outside = host.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host secret\n").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), shared.join("data/abs-link")).unwrap();
    std::os::unix::fs::symlink("../../outside/secret", shared.join("data/rel-link")).unwrap();

    let vm = TestVm::boot_with("e2e-vfs", None, Some(&shared)).await;
    let addr = vm.addr(kata_proto::paths::ports::AGENT);
    let mut c = connect(&addr).await;
    let mnt = SHARE_MOUNT;
    create_sandbox_with_share(&mut c, "e2e-vfs")
        .await
        .expect("the guest mounts the virtio-fs share");

    // the rootfs on virtio-fs, the data directory bound in as a volume
    let rootfs = std::path::Path::new(mnt).join(rootfs_local.strip_prefix(&shared).unwrap());
    let mut s = spec(&rootfs, &[]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/data", "type": "bind", "source": format!("{mnt}/data"), "options": ["rbind", "rw"]
    }));
    let script = "cat /data/hello.txt; echo written in the guest > /data/out.txt; \
                  cat /data/abs-link 2>&1; cat /data/rel-link 2>&1; \
                  mknod /data/dev c 1 3 2>&1 || echo mknod refused; \
                  touch /data/suid && chmod 4755 /data/suid; echo done";
    s["process"]["args"] = json!(["sh", "-c", script]);
    // mknod needs CAP_MKNOD (in the default set)
    let o = run(&mut c, &addr, "vfs", &s, None)
        .await
        .expect("container from virtio-fs");
    assert_eq!(o.status, 0, "{o:?}");
    assert!(o.stdout.starts_with("from the host\n"), "{o:?}");
    assert!(
        !o.stdout.contains("host secret"),
        "a symlink never reaches outside the share: {o:?}"
    );
    assert!(o.stdout.ends_with("done\n"), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(shared.join("data/out.txt")).unwrap(),
        "written in the guest\n",
        "the guest's write reaches the host directory"
    );
    if let Ok(m) = std::fs::symlink_metadata(shared.join("data/dev")) {
        use std::os::unix::fs::FileTypeExt;
        assert!(
            !m.file_type().is_char_device(),
            "a device node made by the guest is not a device on the host"
        );
    }
    let suid = std::fs::metadata(shared.join("data/suid")).unwrap();
    assert_eq!(
        suid.permissions().mode() & 0o6000,
        0,
        "no setuid file on the host from the guest (mode {:o})",
        suid.mode()
    );
    vm.destroy_through_agent(&mut c).await;
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "host secret\n"
    );
}
