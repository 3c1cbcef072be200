//! Helpers of the shim's end-to-end tests: a kata-rs configuration for the
//! test guest, and the checks that a pod left nothing on the host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The runtime name of the shim.
pub const RUNTIME: &str = "io.containerd.kata.v2";

/// Writes a kata-rs configuration for the test guest image (TCG, the
/// binaries of this build) to `path`, with `extra` TOML appended to the
/// `[hypervisor.qemu]` section (`extra_sections` after everything).
pub fn write_config(path: &Path, qemu_extra: &str, extra_sections: &str) -> PathBuf {
    write_config_for(&crate::guest_dir(), path, qemu_extra, extra_sections)
}

/// [`write_config`] for the guest image in `guest`.
pub fn write_config_for(
    guest: &Path,
    path: &Path,
    qemu_extra: &str,
    extra_sections: &str,
) -> PathBuf {
    let text = format!(
        "[hypervisor.qemu]\n\
         kernel = \"{}\"\n\
         initrd = \"{}\"\n\
         accelerator = \"tcg\"\n\
         default_memory = 256\n\
         launcher = \"{}\"\n\
         virtio_fs_daemon = \"{}\"\n\
         {qemu_extra}\n\
         [agent.kata]\n\
         dial_timeout = 90\n\
         {extra_sections}\n",
        guest.join("vmlinuz").display(),
        guest.join("initrd.img").display(),
        crate::bin("kata-vmm-launcher").display(),
        crate::bin("kata-virtiofsd").display(),
    );
    std::fs::write(path, text).expect("write the kata-rs configuration");
    path.to_path_buf()
}

/// The guest kernel release of the test image (`kver` of its manifest).
pub fn guest_kernel() -> String {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(crate::guest_dir().join("manifest.json")).expect("read the manifest"),
    )
    .expect("parse the manifest");
    m["kver"].as_str().expect("kver").to_string()
}

/// The host processes that belong to pod `id`: its launcher and
/// kata-virtiofsd (by their `--sandbox-id`), its shim and hypervisor (by the
/// sandbox directory in their command line or the launcher's state file).
pub fn pod_processes(id: &str) -> Vec<(u32, String)> {
    let dir = kata_proto::paths::SandboxPaths::new(id);
    let needle_id = format!("--sandbox-id\0{id}\0");
    let needle_dir = format!("{}/", dir.dir.display());
    let needle_shim = format!("-id\0{id}\0");
    let hv = kata_vmm_launcher::client::hypervisor_pid(&dir);
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        let shim = cmd.starts_with("containerd-shim-kata-v2\0")
            || cmd.contains("/containerd-shim-kata-v2\0");
        if (cmd.contains(&needle_id)
            || cmd.contains(&needle_dir)
            || hv == Some(pid)
            || (shim && cmd.contains(&needle_shim)))
            && crate::alive(pid)
        {
            found.push((pid, cmd.replace('\0', " ")));
        }
    }
    found
}

/// Waits (up to `timeout`) until nothing of pod `id` is left on the host: no
/// process, no sandbox directory, no mount below it, no cgroup; panics
/// naming what is left.
pub fn assert_pod_gone(id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = pod_leftovers(id);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let left: Vec<String> = left.iter().map(|(k, d)| format!("{k} {d}")).collect();
            panic!("pod {id} left behind:\n  {}", left.join("\n  "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What pod `id` has on the host now, as (kind, detail): its processes,
/// its directory under /run/kata, mounts under it, its host cgroups.
pub fn pod_leftovers(id: &str) -> Vec<(String, String)> {
    let dir = kata_proto::paths::SandboxPaths::new(id).dir;
    let mut left = Vec::new();
    for (pid, cmd) in pod_processes(id) {
        left.push(("process".to_string(), format!("{pid}: {cmd}")));
    }
    if dir.exists() {
        left.push(("directory".to_string(), dir.display().to_string()));
    }
    for m in crate::containerd::mounts_under(&dir) {
        left.push(("mount".to_string(), m.display().to_string()));
    }
    for p in pod_cgroups(id) {
        left.push(("cgroup".to_string(), p.display().to_string()));
    }
    left
}

/// The pid of pod `id`'s process whose program's name ends with `name`
/// (`containerd-shim-kata-v2`, `kata-virtiofsd`, `kata-vmm-launcher`...).
pub fn pod_process(id: &str, name: &str) -> Option<u32> {
    pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.split(' ').next().is_some_and(|a| a.ends_with(name)))
        .map(|(p, _)| p)
}

/// The host cgroups of pod `id` in every hierarchy: directories named `id`
/// (the sandbox's cgroupsPath, `/<namespace>/<id>` from ctr) or `kata_<id>`
/// up to three levels down, and its overhead cgroup `kata_overhead/<id>`.
pub fn pod_cgroups(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, names: &[String], found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            if names.iter().any(|n| e.file_name() == n.as_str()) {
                found.push(p.clone());
            }
            if depth > 1 {
                walk(&p, depth - 1, names, found);
            }
        }
    }
    let names = [id.to_string(), format!("kata_{id}")];
    let mut found = Vec::new();
    for h in kata_vmm_launcher::client::cgroup_hierarchies() {
        walk(&h, 3, &names, &mut found);
    }
    found
}

/// Polls `ctr task ls` until task `id` has `status` (e.g. "STOPPED").
pub fn wait_task_status(
    c: &crate::containerd::Containerd,
    id: &str,
    status: &str,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let ls = c.ctr_ok(&["task", "ls"]);
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
        {
            return ls;
        }
        if Instant::now() > deadline {
            panic!("task {id} did not become {status} within {timeout:?}:\n{ls}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `ctr task ls` until task `id` no longer runs: stopped, or gone (what
/// containerd does with the task of a shim that died).
pub fn wait_task_ended(c: &crate::containerd::Containerd, id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ls = c.ctr_ok(&["task", "ls"]);
        let line = ls
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_string);
        match line {
            None => return,
            Some(l) if l.contains("STOPPED") => return,
            Some(l) if Instant::now() > deadline => {
                panic!("task {id} still runs after {timeout:?}: {l}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `ctr run -d --runtime kata IMAGE ID ARGS...`, then waits until it runs.
pub fn run_detached(c: &crate::containerd::Containerd, image: &str, id: &str, args: &[&str]) {
    run_detached_with::<&str>(c, &[], image, id, args);
}

/// [`run_detached`] with more `ctr run` flags (before the image).
pub fn run_detached_with<S: AsRef<str>>(
    c: &crate::containerd::Containerd,
    flags: &[S],
    image: &str,
    id: &str,
    args: &[&str],
) {
    let mut a = vec!["run", "-d", "--runtime", RUNTIME];
    a.extend(flags.iter().map(AsRef::as_ref));
    a.extend_from_slice(&[image, id]);
    a.extend_from_slice(args);
    c.ctr_ok(&a);
    wait_task_status(c, id, "RUNNING", Duration::from_secs(60));
}

/// `ctr run` flags (CRI annotations) that make a container the sandbox of
/// pod `pod` (`sandbox`), or a member of it.
pub fn pod_flags(pod: &str, sandbox: bool) -> Vec<String> {
    let role = if sandbox { "sandbox" } else { "container" };
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={role}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

/// `ctr run` flags of a container in host cgroup `cgroup`, limited to
/// `cpus` CPUs (a 100 ms period) and, unless 0, `memory_mib` MiB.
pub fn limit_flags(cgroup: &str, cpus: u32, memory_mib: u64) -> Vec<String> {
    let mut v = vec![
        "--cgroup".into(),
        cgroup.into(),
        "--cpu-quota".into(),
        (u64::from(cpus) * 100_000).to_string(),
        "--cpu-period".into(),
        "100000".into(),
    ];
    if memory_mib > 0 {
        v.extend(["--memory-limit".into(), (memory_mib << 20).to_string()]);
    }
    v
}

/// SIGKILLs task `id`, waits until it stopped, deletes task and container.
pub fn kill_and_delete(c: &crate::containerd::Containerd, id: &str) {
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_task_status(c, id, "STOPPED", Duration::from_secs(30));
    c.ctr_ok(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
}

/// Runs `script` as root in the guest of pod `id` through the agent's debug
/// console (vsock port 1026; the pod's configuration must enable it) and
/// returns what it printed (stdout and stderr). This is the test's hostile
/// guest: root in the VM, as a container that escaped would be.
pub fn guest_shell(id: &str, script: &str) -> String {
    use kata_proto::console::{Frame, FrameReader, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = kata_proto::dialer::Address::Hybrid {
        path: kata_proto::paths::SandboxPaths::new(id).vsock_uds(),
        port: kata_proto::paths::ports::DEBUG_CONSOLE,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut s = kata_proto::dialer::dial(&addr, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("debug console of pod {id}: {e}"));
        let req = Request::Exec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("{{ {script} ; }} 2>&1"),
            ],
        };
        s.write_all(req.header().as_bytes())
            .await
            .expect("write to the console");
        s.shutdown().await.expect("end the command's stdin");
        let mut out = Vec::new();
        let read = async {
            let mut frames = FrameReader::default();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.expect("read the console");
                assert!(n > 0, "the console ended without an exit status");
                frames.feed(&buf[..n]);
                while let Some(f) = frames.next_frame().expect("console frames") {
                    match f {
                        Frame::Stdout(d) | Frame::Stderr(d) => out.extend_from_slice(&d),
                        Frame::Exit(_) => return,
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .unwrap_or_else(|_| panic!("the guest shell did not finish {script:?}"));
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// The mount points at or below `dir` with their per-mount options
/// (mountinfo's sixth field) and super options.
pub fn mount_options_under(dir: &Path) -> Vec<(PathBuf, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let p = PathBuf::from(f.get(4)?);
            let sep = f.iter().position(|x| *x == "-")?;
            let sup = f.get(sep + 3).copied().unwrap_or_default().to_string();
            p.starts_with(dir)
                .then(|| (p, f.get(5).copied().unwrap_or_default().to_string(), sup))
        })
        .collect()
}
