//! virtio-fs figures: kata-virtiofsd against upstream virtiofsd with the same
//! QEMU, guest kernel and workload (kata-fsbench in a container whose rootfs
//! and /data are on the share), and the host FUSE mount against the kernel's
//! own view of the directory (the floor).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_tests::agent as ka;
use kata_tests::{FsDaemon, TestVm};
use serde_json::{json, Value};

/// What one run measured.
pub struct Run {
    pub label: String,
    pub figures: Value,
    /// daemon PSS in KiB: idle, peak under the workload
    pub pss: Option<(u64, u64)>,
}

/// PSS of a process and all its descendants (both daemons fork a sandboxed
/// server under a supervisor).
fn pss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        total += super::pss_kib(p);
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                todo.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    total
}

/// Sizes: the (256 MiB, 10,000 files) unless the environment asks
/// for less (`KATA_BENCH_FS_MIB`, `KATA_BENCH_FS_FILES`).
pub fn sizes() -> (usize, usize) {
    let get = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (
        get("KATA_BENCH_FS_MIB", 256),
        get("KATA_BENCH_FS_FILES", 10_000),
    )
}

/// A share with a busybox rootfs, kata-fsbench in it, and a data directory.
fn prepare_share(root: &Path) -> (PathBuf, PathBuf) {
    let shared = root.join("shared");
    std::fs::create_dir_all(shared.join("data")).unwrap();
    let rootfs = ka::busybox_rootfs(&shared);
    std::fs::copy(
        kata_tests::bin("kata-fsbench"),
        rootfs.join("bin/kata-fsbench"),
    )
    .unwrap();
    (shared, rootfs)
}

/// One VM run with `daemon` serving the share.
pub async fn vm_run(label: &str, id: &str, upstream: Option<&Path>) -> Run {
    let (mib, files) = sizes();
    let tmp = tempfile::tempdir().unwrap();
    let (shared, rootfs) = prepare_share(tmp.path());
    let daemon = FsDaemon {
        binary: upstream
            .map(Path::to_path_buf)
            .unwrap_or_else(|| kata_tests::bin("kata-virtiofsd")),
        upstream: upstream.is_some(),
        shared: shared.clone(),
        cache: "auto".into(),
    };
    let vm = TestVm::boot_with_fs(id, None, Some(daemon)).await;
    let pid = vm.virtiofsd.as_ref().and_then(|c| c.id()).unwrap_or(0);
    let idle = pss_kib(pid);
    let addr = vm.addr(kata_proto::paths::ports::AGENT);
    let mut c = ka::connect(&addr).await;
    let mnt = ka::SHARE_MOUNT;
    ka::create_sandbox_with_share(&mut c, id)
        .await
        .expect("mount the share");
    let guest_rootfs = Path::new(mnt).join(rootfs.strip_prefix(&shared).unwrap());
    let mut s = ka::spec(&guest_rootfs, &[]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/data", "type": "bind", "source": format!("{mnt}/data"), "options": ["rbind", "rw"]
    }));
    // drop_caches between phases: a writable /proc/sys and CAP_SYS_ADMIN
    s["linux"]["readonlyPaths"] = json!([]);
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_SYS_ADMIN"));
    }
    s["process"]["args"] = json!(["kata-fsbench", "/data", mib.to_string(), files.to_string()]);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let p = pss_kib(pid);
                peak.fetch_max(p, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // the workload `repeats()` times in this VM (each run starts from an
    // empty directory and drops the guest's caches between phases): more
    // samples per boot against this machine's drift; the best of each kind
    let mut samples = Vec::new();
    for r in 0..repeats() {
        let o = ka::run(&mut c, &addr, &format!("fsbench{r}"), &s, None)
            .await
            .expect("kata-fsbench in the guest");
        assert_eq!(o.status, 0, "{label}: kata-fsbench failed: {o:?}");
        let figures: Value = serde_json::from_str(o.stdout.trim())
            .unwrap_or_else(|e| panic!("{label}: kata-fsbench output {:?}: {e}", o.stdout));
        // every sample on stderr: the table keeps only the best of each daemon
        eprintln!("virtio-fs sample {label} ({id}, {r}): {figures}");
        samples.push(Run {
            label: label.into(),
            figures,
            pss: None,
        });
    }
    sampler.abort();
    vm.destroy_through_agent(&mut c).await;
    let mut run = best(samples);
    run.label = label.into();
    run.pss = Some((idle, peak.load(std::sync::atomic::Ordering::Relaxed)));
    run
}

/// How many times the workload runs in each VM (`KATA_BENCH_FS_REPEAT`, 2).
pub fn repeats() -> usize {
    std::env::var("KATA_BENCH_FS_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

fn fsbench_on(dir: &Path) -> Value {
    let (mib, files) = sizes();
    let out = std::process::Command::new(kata_tests::bin("kata-fsbench"))
        .arg(dir)
        .arg(mib.to_string())
        .arg(files.to_string())
        .output()
        .expect("kata-fsbench");
    assert!(
        out.status.success(),
        "kata-fsbench on {}: {out:?}",
        dir.display()
    );
    serde_json::from_slice(&out.stdout).expect("kata-fsbench JSON")
}

/// The host FUSE mount of kata-virtiofsd against the directory itself.
pub async fn host_runs() -> (Run, Run) {
    use tokio::io::AsyncBufReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let kernel = fsbench_on(&dir);
    let mut child = tokio::process::Command::new(kata_tests::bin("kata-virtiofsd"))
        .arg("--fuse-mount")
        .arg(&mnt)
        .arg("--shared-dir")
        .arg(&dir)
        .arg("--cache")
        .arg("auto")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kata-virtiofsd --fuse-mount");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
        Ok(Ok(Some(l))) if l.trim() == "READY" => {}
        other => panic!("kata-virtiofsd --fuse-mount not ready: {other:?}"),
    }
    let pid = child.id().unwrap_or(0);
    let idle = pss_kib(pid);
    let mnt2 = mnt.clone();
    let fuse = tokio::task::spawn_blocking(move || fsbench_on(&mnt2));
    let mut peak = idle;
    while !fuse.is_finished() {
        peak = peak.max(pss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fuse = fuse.await.unwrap();
    // SAFETY: kill takes integers only; the pid is our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    (
        Run {
            label: "host FUSE mount (kata-virtiofsd --fuse-mount)".into(),
            figures: fuse,
            pss: Some((idle, peak)),
        },
        Run {
            label: "host directory (kernel, the floor)".into(),
            figures: kernel,
            pss: None,
        },
    )
}

/// The best figure of each kind over several runs of one daemon (PSS: the
/// highest idle and peak seen).
pub fn best(runs: Vec<Run>) -> Run {
    let keys = [
        "write_mib_s",
        "read_mib_s",
        "random_4k_iops",
        "meta_ops_s",
        "readdir_entries_s",
        "readdir_settled_entries_s",
    ];
    let mut figures = runs[0].figures.clone();
    for k in keys {
        let m = runs
            .iter()
            .filter_map(|r| r.figures[k].as_f64())
            .fold(f64::MIN, f64::max);
        figures[k] = json!((m * 10.0).round() / 10.0);
    }
    let pss = runs
        .iter()
        .filter_map(|r| r.pss)
        .fold(None, |acc: Option<(u64, u64)>, (i, p)| {
            Some(acc.map_or((i, p), |(a, b)| (a.max(i), b.max(p))))
        });
    Run {
        label: format!("{} best of {}", runs[0].label, runs.len()),
        figures,
        pss,
    }
}

/// Prints the table; ratios are kata-rs / upstream.
pub fn print(runs: &[Run]) {
    let (mib, files) = sizes();
    println!("\n## virtio-fs (kata-bench)\n");
    println!(
        "Same QEMU, kernel and guest (TCG, 1 vCPU / 256 MiB), cache=auto; the two daemons alternate, two VMs each, the workload {} times in each VM, best of each figure; workload: kata-fsbench ({mib} MiB sequential write/read, 4096 random 4 KiB reads, create+stat+unlink and readdir of {files} files) in a container whose rootfs and /data are on the share; readdir right after dropping the guest's caches, and again 2 s later, once the daemon has served the FORGETs that dropping them sent.\n",
        repeats()
    );
    println!("| daemon | seq write MiB/s | seq read MiB/s | random 4 KiB reads/s | create+stat+unlink ops/s | readdir entries/s | readdir, settled | daemon PSS (all its processes) idle / peak |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in runs {
        let f = &r.figures;
        let pss = r
            .pss
            .map(|(i, p)| format!("{i} KiB / {p} KiB"))
            .unwrap_or_else(|| "—".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {pss} |",
            r.label,
            f["write_mib_s"],
            f["read_mib_s"],
            f["random_4k_iops"],
            f["meta_ops_s"],
            f["readdir_entries_s"],
            f["readdir_settled_entries_s"]
        );
    }
    if let (Some(ours), Some(up)) = (
        runs.iter()
            .find(|r| r.label.starts_with("kata-virtiofsd (VM)")),
        runs.iter().find(|r| r.label.starts_with("upstream")),
    ) {
        let ratio = |k: &str| {
            ours.figures[k].as_f64().unwrap_or(0.0) / up.figures[k].as_f64().unwrap_or(f64::NAN)
        };
        println!(
            "| kata-virtiofsd / upstream | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | |",
            ratio("write_mib_s"),
            ratio("read_mib_s"),
            ratio("random_4k_iops"),
            ratio("meta_ops_s"),
            ratio("readdir_entries_s"),
            ratio("readdir_settled_entries_s")
        );
    }
}
