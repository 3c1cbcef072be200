//! The Kubernetes path end to end: containerd 1.6's CRI plugin, configured
//! as docs/install.md tells a user (runtime handler `kata`, its
//! `ConfigPath`, `io.katacontainers.*` annotations passed through), driven
//! over CRI as the kubelet drives it. Real containerd, real CNI plugins
//! (run by containerd inside a network namespace the test made: the node's
//! stand-in), real QEMU and guest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_tests::containerd::{Containerd, KATA_HANDLER, RUNC_RUNTIME};
use kata_tests::cri::{api, container_config, pod_config, Cri};
use kata_tests::net::Netns;
use kata_tests::shim::{assert_pod_gone, guest_kernel, pod_processes, write_config};

const GONE: Duration = Duration::from_secs(30);

/// A containerd with CRI in a namespace of its own, its images imported.
/// (Fields drop in this order: containerd stops before its namespace and
/// the volumes go.)
struct Node {
    cri: Cri,
    c: Containerd,
    _netns: Netns,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    _one: std::sync::MutexGuard<'static, ()>,
}

/// One CRI test at a time: they count the machine's kata-rs shims and
/// sandbox directories (and two pods' boots at once would only be slower).
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Node {
    fn new(tag: &str, config_extra: &str) -> Node {
        kata_tests::require_root();
        let one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let cfg = write_config(&dir.join("configuration.toml"), config_extra, "");
        let netns = Netns::new(&format!("kr-{tag}-{}", std::process::id() % 100_000));
        let c = Containerd::builder().cri(&cfg).netns(netns.path()).start();
        c.import_cri_images();
        let cri = Cri::connect(c.address());
        Node {
            _one: one,
            _tmp: tmp,
            dir,
            c,
            cri,
            _netns: netns,
        }
    }

    /// A pod's log directory (made, as the kubelet makes it).
    fn log_dir(&self, pod: &str) -> PathBuf {
        let d = self.dir.join("logs").join(pod);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn exec(&mut self, id: &str, cmd: &[&str]) -> api::ExecSyncResponse {
        self.cri
            .exec_sync(api::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            })
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
    }

    /// `sh -c script` in container `id`: its stdout, or a panic with its
    /// stderr and exit code.
    fn sh(&mut self, id: &str, script: &str) -> String {
        let r = self.exec(id, &["sh", "-c", script]);
        assert_eq!(
            r.exit_code,
            0,
            "{script} in {id}: exit {} stderr {}",
            r.exit_code,
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    /// Polls `script` in `id` until `ok(stdout)`, for up to `timeout`.
    fn wait_sh(
        &mut self,
        id: &str,
        script: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let t0 = Instant::now();
        loop {
            let r = self.exec(id, &["sh", "-c", script]);
            let out = String::from_utf8_lossy(&r.stdout).into_owned();
            if ok(&out) {
                return out;
            }
            assert!(
                t0.elapsed() < timeout,
                "{script} in {id}: after {timeout:?} still {out:?} (stderr {})",
                String::from_utf8_lossy(&r.stderr)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn create(
        &mut self,
        pod: &str,
        pod_cfg: &api::PodSandboxConfig,
        cfg: api::ContainerConfig,
    ) -> String {
        let name = cfg
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        self.cri
            .create_and_start(pod, pod_cfg, cfg)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.c.log_tail(30)))
    }

    fn status(&mut self, id: &str) -> api::ContainerStatus {
        self.cri
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .status
            .expect("a status")
    }

    /// Stops and removes the pod's containers and the pod, as the kubelet does.
    fn remove_pod(&mut self, pod: &str, containers: &[&str]) {
        for id in containers {
            self.cri
                .stop_container(api::StopContainerRequest {
                    container_id: id.to_string(),
                    timeout: 2,
                })
                .unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
            self.cri
                .remove_container(api::RemoveContainerRequest {
                    container_id: id.to_string(),
                })
                .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
        }
        self.cri
            .stop_and_remove_pod(pod)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn pods(&mut self) -> Vec<api::PodSandbox> {
        self.cri
            .list_pod_sandbox(api::ListPodSandboxRequest::default())
            .expect("ListPodSandbox")
            .items
    }

    /// The pod network namespaces CRI holds (bind mounts in its state dir).
    fn netns_left(&self) -> Vec<PathBuf> {
        let d = self.c.state().join("io.containerd.grpc.v1.cri/netns");
        std::fs::read_dir(d)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// CRI has no pod left, no pod network namespace and no address out.
    fn assert_no_pod_left(&mut self) {
        let pods = self.pods();
        assert!(pods.is_empty(), "pods left: {pods:?}");
        let netns = self.netns_left();
        assert!(netns.is_empty(), "netns left: {netns:?}");
        let leases = self.leases();
        assert!(leases.is_empty(), "addresses not given back: {leases:?}");
    }

    /// Addresses host-local has handed out and not got back.
    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.c.dir().join("ipam/kata-rs-cri"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The shims (kata-rs's) of this containerd that run.
fn kata_shims() -> usize {
    pod_processes_all()
        .iter()
        .filter(|c| c.contains("containerd-shim-kata-v2"))
        .count()
}

/// Command lines of every process.
fn pod_processes_all() -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

/// Removes the cgroup parents a pod's cgroup parent made (`<name>` and
/// below, in every hierarchy) when dropped: containerd and kata-rs leave a
/// pod's parents, as the kubelet owns them.
struct CgroupParents(&'static str);

impl Drop for CgroupParents {
    fn drop(&mut self) {
        for h in kata_vmm_launcher::client::cgroup_hierarchies() {
            let top = h.join(self.0);
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&top)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            dirs.push(top);
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Writes `files` into `dir` the way the kubelet's AtomicWriter does: a new
/// timestamped directory, `..data` swapped to it by one rename, the
/// user-visible names symlinks through `..data`, the old payload removed.
fn atomic_write(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    let payload = format!("..2026_12_04_00_00_0{generation}.{generation}");
    std::fs::create_dir(dir.join(&payload)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&payload).join(name), text).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&payload, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

fn mount(container: &str, host: &Path, readonly: bool) -> api::Mount {
    api::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// `<RFC 3339 time> <stream> <F|P> <text>` lines of a CRI log file.
fn log_lines(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let ts = p.next().unwrap_or_default();
            assert!(
                ts.len() >= 20
                    && ts.as_bytes()[4] == b'-'
                    && ts.as_bytes()[10] == b'T'
                    && ts.ends_with('Z'),
                "not an RFC 3339 UTC time in the CRI log line {l:?}"
            );
            (
                p.next().unwrap_or_default().to_string(),
                p.next().unwrap_or_default().to_string(),
                p.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn wait_log(
    path: &Path,
    want: &(&str, &str, &str),
    timeout: Duration,
) -> Vec<(String, String, String)> {
    let t0 = Instant::now();
    loop {
        let lines = log_lines(path);
        if lines
            .iter()
            .any(|(s, t, m)| (s.as_str(), t.as_str(), m.as_str()) == *want)
        {
            return lines;
        }
        assert!(
            t0.elapsed() < timeout,
            "{} has no line {want:?}: {lines:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One kata pod through CRI: one VM for the sandbox and its containers,
/// the CRI request's hostname, DNS and annotations, logs, ExecSync, stats,
/// a live resource update, Kubernetes volumes, an exit code, and nothing
/// left after StopPodSandbox and RemovePodSandbox.
#[test]
fn a_kata_pod_through_cri() {
    // (dropped last: after containerd removed a failed test's pods)
    let _parents = CgroupParents("kata-rs-cri");
    let mut n = Node::new(
        "cri1",
        "enable_annotations = [\"default_memory\"]\ndefault_maxvcpus = 4",
    );
    let uid = "0e6f7a52-4c2b-4a8e-9a53-0a1b2c3d4e5f";
    let logs = n.log_dir(uid);
    let mut pod_cfg = pod_config("web", uid, &logs);
    pod_cfg.hostname = "cri-web".into();
    pod_cfg.dns_config = Some(api::DnsConfig {
        servers: vec!["10.203.0.53".into()],
        searches: vec!["default.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    // the kubelet's cgroupfs layout: the pod's cgroup under its QoS parent
    let parent = format!("/kata-rs-cri/pod{uid}");
    if let Some(l) = pod_cfg.linux.as_mut() {
        l.cgroup_parent = parent.clone();
    }
    pod_cfg.annotations = HashMap::from([
        (
            "io.katacontainers.config.hypervisor.default_memory".into(),
            "384".into(),
        ),
        ("example.com/not-passed".into(), "x".into()),
    ]);
    let pod = n
        .cri
        .run_pod(pod_cfg.clone(), KATA_HANDLER)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", n.c.log_tail(40)));
    let paths = kata_proto::paths::SandboxPaths::new(&pod);
    let qemu = kata_vmm_launcher::client::hypervisor_pid(&paths).expect("the pod's QEMU");
    // the VM's vCPUs are in the pod's cgroup under the CRI cgroup parent
    let vcpus = kata_tests::resources::vcpu_tids(qemu);
    assert!(!vcpus.is_empty(), "QEMU {qemu} has no vCPU threads");
    for tid in vcpus {
        assert_eq!(
            kata_tests::resources::cgroup_of(qemu, tid, "cpu"),
            format!("{parent}/{pod}"),
            "vCPU thread {tid}"
        );
    }
    let status = n
        .cri
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .expect("PodSandboxStatus")
        .status
        .expect("a pod status");
    assert_eq!(status.state, api::PodSandboxState::SandboxReady as i32);
    let pod_ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        pod_ip.starts_with("10.203.0."),
        "the pod's IP from CNI: {pod_ip:?}"
    );

    // volumes, laid out as the kubelet lays them out
    let vols = n.dir.join("pods").join(uid).join("volumes");
    let config_map = vols.join("kubernetes.io~configmap/settings");
    atomic_write(&config_map, 1, &[("mode", "blue\n"), ("size", "3\n")]);
    let empty_dir = vols.join("kubernetes.io~empty-dir/scratch");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let read_only = n.dir.join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    std::fs::write(read_only.join("motd"), "read me\n").unwrap();

    let mut app = container_config(
        "app",
        &[
            "sh",
            "-c",
            "echo hello from app; echo warning from app >&2; exec sleep inf",
        ],
    );
    app.log_path = "app/0.log".into();
    app.mounts = vec![
        mount("/etc/settings", &config_map, true),
        mount("/scratch", &empty_dir, false),
        mount("/ro", &read_only, true),
    ];
    let app = n.create(&pod, &pod_cfg, app);
    let mut side = container_config("side", &["sleep", "inf"]);
    side.log_path = "side/0.log".into();
    side.mounts = vec![mount("/scratch", &empty_dir, false)];
    side.linux = Some(api::LinuxContainerConfig {
        resources: Some(api::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let side = n.create(&pod, &pod_cfg, side);

    // one VM: the containers have no VM, shim or sandbox of their own
    assert_eq!(
        kata_vmm_launcher::client::hypervisor_pid(&paths),
        Some(qemu),
        "the pod's QEMU changed"
    );
    for id in [&app, &side] {
        assert!(
            !kata_proto::paths::SandboxPaths::new(id).dir.exists(),
            "{id} got a sandbox"
        );
    }
    assert_eq!(kata_shims(), 1, "one shim for the pod and its containers");
    assert_eq!(n.sh(&app, "uname -r").trim(), guest_kernel());

    // what the CRI request said: hostname, DNS, /etc/hosts, the annotation
    assert_eq!(n.sh(&app, "hostname").trim(), "cri-web");
    let resolv = n.sh(&app, "cat /etc/resolv.conf");
    assert!(
        resolv.contains("nameserver 10.203.0.53")
            && resolv.contains("search default.svc.cluster.local")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let hosts_file =
        n.c.root()
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(&pod)
            .join("hosts");
    let hosts = std::fs::read_to_string(&hosts_file).unwrap();
    assert_eq!(n.sh(&app, "cat /etc/hosts"), hosts);
    let mem_kib: u64 = n
        .sh(
            &app,
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        )
        .trim()
        .parse()
        .unwrap();
    assert!(
        mem_kib > 290 * 1024,
        "default_memory = 384 from the pod annotation: MemTotal {mem_kib} kB"
    );
    let ip = n.sh(&app, "ip -4 addr show");
    assert!(ip.contains(&format!("inet {pod_ip}/")), "{ip}");

    // logs in the CRI format, both streams
    let app_log = logs.join("app/0.log");
    wait_log(
        &app_log,
        &("stdout", "F", "hello from app"),
        Duration::from_secs(20),
    );
    wait_log(
        &app_log,
        &("stderr", "F", "warning from app"),
        Duration::from_secs(20),
    );

    // ExecSync: stdout, stderr, exit code
    let r = n.exec(&side, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );

    // volumes: the config map follows the kubelet's swap; emptyDir is shared
    // by the pod's containers and the host; the read-only one refuses writes
    assert_eq!(
        n.sh(&app, "cat /etc/settings/mode /etc/settings/size"),
        "blue\n3\n"
    );
    atomic_write(&config_map, 2, &[("mode", "green\n"), ("size", "4\n")]);
    let t0 = Instant::now();
    n.wait_sh(
        &app,
        "cat /etc/settings/mode /etc/settings/size",
        Duration::from_secs(10),
        |o| o == "green\n4\n",
    );
    eprintln!(
        "the config map update was seen in the container after {:?}",
        t0.elapsed()
    );
    n.sh(&app, "echo from-app > /scratch/note");
    assert_eq!(n.sh(&side, "cat /scratch/note"), "from-app\n");
    assert_eq!(
        std::fs::read_to_string(empty_dir.join("note")).unwrap(),
        "from-app\n"
    );
    assert_eq!(n.sh(&app, "cat /ro/motd"), "read me\n");
    let r = n.exec(&app, &["sh", "-c", "echo x > /ro/new"]);
    assert_ne!(r.exit_code, 0);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("Read-only"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!read_only.join("new").exists());

    // stats of a running container
    let stats = n
        .cri
        .container_stats(api::ContainerStatsRequest {
            container_id: app.clone(),
        })
        .expect("ContainerStats")
        .stats
        .expect("stats");
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value);
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(cpu.is_some_and(|v| v > 0), "CPU usage {cpu:?}");
    assert!(mem.is_some_and(|v| v > 0), "memory working set {mem:?}");
    let all = n
        .cri
        .list_container_stats(api::ListContainerStatsRequest::default())
        .expect("ListContainerStats")
        .stats;
    assert_eq!(all.len(), 2, "stats of both containers: {all:?}");

    // UpdateContainerResources reaches the guest: 1 CPU more than the default
    // for `side`'s quota of 1, then 3
    let before: u32 = n.sh(&side, "nproc").trim().parse().unwrap();
    n.cri
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: side.clone(),
            linux: Some(api::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 300_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}"));
    let want = (before + 2).to_string();
    n.wait_sh(&side, "nproc", Duration::from_secs(20), |o| {
        o.trim() == want
    });

    // an exit code reaches ContainerStatus, its output the log
    let mut job = container_config("job", &["sh", "-c", "echo done; exit 7"]);
    job.log_path = "job/0.log".into();
    let job = n.create(&pod, &pod_cfg, job);
    let t0 = Instant::now();
    let st = loop {
        let st = n.status(&job);
        if st.state == api::ContainerState::ContainerExited as i32 {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "job still {st:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st.exit_code, 7, "{st:?}");
    wait_log(
        &logs.join("job/0.log"),
        &("stdout", "F", "done"),
        Duration::from_secs(10),
    );
    let listed = n
        .cri
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .expect("ListContainers")
        .containers;
    assert_eq!(listed.len(), 3, "{listed:?}");

    // teardown as the kubelet does it; nothing left
    n.remove_pod(&pod, &[&app, &side, &job]);
    assert_pod_gone(&pod, GONE);
    n.assert_no_pod_left();
    let mounts: Vec<_> = kata_tests::containerd::mounts_under(n.c.dir())
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&pod))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    assert_eq!(kata_shims(), 0);
}

/// A runc pod and a kata pod on one containerd, and the CRI errors of bad
/// requests: an unknown handler, an annotation the configuration does not
/// allow. A failed pod leaves nothing.
#[test]
fn runc_and_kata_side_by_side_and_bad_requests() {
    let mut n = Node::new("cri2", "");
    let host_kernel = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();

    let mut pods = vec![];
    for (handler, uid) in [
        ("runc", "11111111-2222-4333-8444-555555555555"),
        (KATA_HANDLER, "66666666-7777-4888-9999-000000000000"),
    ] {
        let logs = n.log_dir(uid);
        let cfg = pod_config(&format!("{handler}-pod"), uid, &logs);
        let pod = n
            .cri
            .run_pod(cfg.clone(), handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox {handler}: {e}\n{}", n.c.log_tail(40)));
        let mut c = container_config("main", &["sh", "-c", "echo ready; exec sleep inf"]);
        c.log_path = "main.log".into();
        let id = n.create(&pod, &cfg, c);
        wait_log(
            &logs.join("main.log"),
            &("stdout", "F", "ready"),
            Duration::from_secs(20),
        );
        pods.push((handler, pod, id));
    }
    let (_, runc_pod, runc_c) = pods[0].clone();
    let (_, kata_pod, kata_c) = pods[1].clone();
    assert_eq!(
        n.sh(&runc_c, "uname -r").trim(),
        host_kernel,
        "runc runs on the host kernel"
    );
    assert_eq!(
        n.sh(&kata_c, "uname -r").trim(),
        guest_kernel(),
        "kata runs in the guest"
    );
    assert!(
        pod_processes(&runc_pod).is_empty(),
        "the runc pod has no kata-rs process"
    );
    let info = n.status(&runc_c);
    assert_eq!(info.state, api::ContainerState::ContainerRunning as i32);
    let shim_runc = pod_processes_all()
        .iter()
        .any(|c| c.contains("containerd-shim-runc-v2") && c.contains(&runc_pod));
    assert!(shim_runc, "runc's shim ({RUNC_RUNTIME}) runs the runc pod");

    // bad requests: the error says why, and nothing is left
    let e = n
        .cri
        .run_pod(
            pod_config(
                "bad1",
                "aaaaaaaa-0000-4000-8000-000000000001",
                &n.log_dir("bad1"),
            ),
            "nosuch",
        )
        .expect_err("an unknown handler");
    assert!(e.message().contains("nosuch"), "{e}");
    let mut cfg = pod_config(
        "bad2",
        "aaaaaaaa-0000-4000-8000-000000000002",
        &n.log_dir("bad2"),
    );
    cfg.annotations.insert(
        "io.katacontainers.config.hypervisor.default_memory".into(),
        "512".into(),
    );
    let e = n
        .cri
        .run_pod(cfg, KATA_HANDLER)
        .expect_err("an annotation the configuration does not allow");
    assert!(
        e.message().contains("default_memory") && e.message().contains("enable_annotations"),
        "{e}"
    );
    let left: Vec<_> = n
        .pods()
        .into_iter()
        .filter(|p| p.id != runc_pod && p.id != kata_pod)
        .collect();
    assert!(left.is_empty(), "failed pods left in CRI: {left:?}");
    assert_eq!(kata_shims(), 1, "only the good kata pod's shim runs");
    // CRI's sandbox ids are 64 hex digits: any other one is a failed pod's
    let failed: Vec<_> = std::fs::read_dir(kata_proto::paths::run_dir())
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()) && *d != kata_pod)
        .collect();
    assert!(
        failed.is_empty(),
        "sandbox directories of failed pods: {failed:?}"
    );

    for (_, pod, id) in pods {
        n.remove_pod(&pod, &[&id]);
    }
    assert_pod_gone(&kata_pod, GONE);
    n.assert_no_pod_left();
}
