//! Driving a kata-agent from tests: a host-mode agent process, a busybox
//! rootfs, runc-like OCI specs, and client helpers (create, start, stdio,
//! wait) that work the same against a host-mode agent and a guest's agent.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use kata_proto::agent::agent_service_client::AgentServiceClient;
use kata_proto::agent::*;
use kata_proto::dialer::{Address, Stream};
use kata_proto::stdio::{attach, Which};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// A client of one agent.
pub type Client = AgentServiceClient<Channel>;

/// The busybox applets a test rootfs gets.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "stty", "dd", "head", "ls", "id", "mkdir", "true", "false",
    "grep", "wc", "tr", "touch", "ps", "kill", "hostname", "env", "pwd", "umask", "yes", "test",
    "readlink", "rm", "mount", "nproc", "tail", "printf", "seq", "cut",
];

/// Makes a busybox root filesystem under `dir` and returns its path.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install busybox-static (`make deps` does)"
    );
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/secret"), "top secret\n").unwrap();
    root
}

/// The capabilities runc gives a container by default.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A runc-like OCI spec for `args` in `rootfs`.
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "kata-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/scsi", "/etc/secret"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A spec's process section alone, for ExecProcess.
pub fn process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {
            "bounding": DEFAULT_CAPS,
            "effective": DEFAULT_CAPS,
            "permitted": DEFAULT_CAPS,
        },
        "noNewPrivileges": true
    })
}

/// A kata-agent on the host (host mode), in a temporary directory.
pub struct HostAgent {
    /// The agent process.
    pub child: Child,
    /// Its API address.
    pub addr: Address,
    /// A connected client.
    pub client: Client,
    /// Temporary directory (socket, state, rootfs).
    pub dir: tempfile::TempDir,
    /// A busybox rootfs in `dir`.
    pub rootfs: PathBuf,
}

impl HostAgent {
    /// Starts `kata-agent --listen unix://... --root ...` and connects.
    pub async fn start() -> HostAgent {
        HostAgent::start_bin("kata-agent", None).await
    }

    /// Starts the agent built with policy support (`kata-agent-policy`) on
    /// the policy `text` (`policy.rego` in the directory), with its policy
    /// debug log; its stderr goes to [`HostAgent::log`].
    pub async fn start_with_policy(text: &str) -> HostAgent {
        HostAgent::start_bin("kata-agent-policy", Some((text, true))).await
    }

    /// [`HostAgent::start_with_policy`] without the debug log (benchmarks).
    pub async fn start_with_quiet_policy(text: &str) -> HostAgent {
        HostAgent::start_bin("kata-agent-policy", Some((text, false))).await
    }

    /// The agent's stderr, for an agent started with a policy.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    async fn start_bin(bin: &str, policy: Option<(&str, bool)>) -> HostAgent {
        crate::require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let rootfs = busybox_rootfs(dir.path());
        let mut cmd = std::process::Command::new(crate::bin(bin));
        cmd.arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--root")
            .arg(dir.path().join("state"))
            .env("KATA_LOG", "debug,h2=info,hyper=info,tower=info,tonic=info");
        if let Some((text, debug)) = policy {
            let p = dir.path().join("policy.rego");
            std::fs::write(&p, text).unwrap();
            let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
            cmd.arg("--policy").arg(p).stderr(log);
            if debug {
                cmd.arg("--policy-debug");
            }
        }
        let child = cmd.spawn().expect("kata-agent starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        let io = kata_proto::paths::hybrid_listener_path(&sock, kata_proto::paths::ports::STDIO);
        while !(sock.exists() && io.exists()) {
            assert!(
                Instant::now() < deadline,
                "the host-mode agent did not listen within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let addr = Address::Unix(sock);
        let client = connect(&addr).await;
        HostAgent {
            child,
            addr,
            client,
            dir,
            rootfs,
        }
    }

    /// Ends the agent the way a host would: SIGTERM (which ends every
    /// container), then waits.
    pub async fn stop(&mut self) {
        // SAFETY: kill takes integers only; the pid is our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the host-mode agent did not end within 15 s of SIGTERM");
            }
            // async: the runtime keeps serving the client's connection meanwhile
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill takes integers only; the pid is our child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..500 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects a client.
pub async fn connect(addr: &Address) -> Client {
    let ch = kata_proto::dialer::channel(addr, Duration::from_secs(10))
        .await
        .expect("connect to the agent");
    AgentServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// CreateContainer with a spec.
pub async fn create(c: &mut Client, id: &str, spec: &Value) -> Result<(), tonic::Status> {
    c.create_container(CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec.to_string(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// StartContainer.
pub async fn start(c: &mut Client, id: &str) -> Result<(), tonic::Status> {
    c.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .map(|_| ())
}

/// ExecProcess.
pub async fn exec(c: &mut Client, id: &str, exec_id: &str, p: &Value) -> Result<(), tonic::Status> {
    c.exec_process(ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process: Some(Process {
            oci_process_json: p.to_string(),
            terminal: p["terminal"].as_bool().unwrap_or(false),
        }),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// WaitProcess: (status, signal).
pub async fn wait(c: &mut Client, id: &str, exec_id: &str) -> (i32, i32) {
    let r = c
        .wait_process(WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
        })
        .await
        .expect("WaitProcess")
        .into_inner();
    (r.status, r.signal)
}

/// SignalProcess.
pub async fn signal(
    c: &mut Client,
    id: &str,
    exec_id: &str,
    sig: i32,
    all: bool,
) -> Result<(), tonic::Status> {
    c.signal_process(SignalProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        signal: sig as u32,
        all,
    })
    .await
    .map(|_| ())
}

/// RemoveContainer.
pub async fn remove(c: &mut Client, id: &str) -> Result<(), tonic::Status> {
    c.remove_container(RemoveContainerRequest {
        container_id: id.into(),
        timeout: 10,
    })
    .await
    .map(|_| ())
}

/// Attaches a stdio stream.
pub async fn stream(addr: &Address, which: Which, id: &str, exec_id: &str) -> Stream {
    attach(addr, which, id, exec_id, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("attaching {which:?} of {id}/{exec_id}: {e}"))
}

/// Reads a stream to its end (in the background).
pub fn collect(mut s: Stream) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v).await;
        v
    })
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    /// Exit status (128 + signal when killed).
    pub status: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Creates, attaches, starts and waits for a container; feeds `stdin` (then
/// closes it), collects the output. The container is removed afterwards.
pub async fn run(
    c: &mut Client,
    addr: &Address,
    id: &str,
    spec: &Value,
    stdin: Option<&[u8]>,
) -> Result<Output, tonic::Status> {
    create(c, id, spec).await?;
    let out = collect(stream(addr, Which::Stdout, id, "").await);
    let err = collect(stream(addr, Which::Stderr, id, "").await);
    let mut input = stream(addr, Which::Stdin, id, "").await;
    start(c, id).await?;
    if let Some(data) = stdin {
        input.write_all(data).await.expect("stdin");
    }
    input.shutdown().await.expect("close stdin");
    let (status, signal) = wait(c, id, "").await;
    let stdout = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err.await.unwrap()).into_owned();
    remove(c, id).await?;
    Ok(Output {
        status,
        signal,
        stdout,
        stderr,
    })
}

/// Whether a cgroup of this path exists in any hierarchy.
pub fn cgroup_exists(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    kata_vmm_launcher::client::cgroup_hierarchies()
        .iter()
        .any(|h| h.join(rel).exists())
}

/// Copies a local directory tree into the agent's shared directory with
/// CopyFile (how a guest gets a rootfs without a shared filesystem).
pub async fn copy_tree(c: &mut Client, local: &Path, remote: &Path) -> Result<(), tonic::Status> {
    use std::os::unix::fs::MetadataExt;
    let mut todo = vec![(local.to_path_buf(), remote.to_path_buf())];
    while let Some((l, r)) = todo.pop() {
        let meta = std::fs::symlink_metadata(&l).expect("stat");
        let base = CopyFileRequest {
            path: r.display().to_string(),
            file_mode: meta.mode(),
            dir_mode: 0o755,
            uid: meta.uid(),
            gid: meta.gid(),
            ..Default::default()
        };
        if meta.is_dir() {
            c.copy_file(base).await?;
            for e in std::fs::read_dir(&l).expect("readdir") {
                let e = e.expect("entry");
                todo.push((e.path(), r.join(e.file_name())));
            }
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&l).expect("readlink");
            c.copy_file(CopyFileRequest {
                data: target.display().to_string().into_bytes(),
                ..base
            })
            .await?;
        } else {
            let data = std::fs::read(&l).expect("read");
            let size = data.len() as i64;
            let mut off = 0usize;
            loop {
                let end = (off + (1 << 20)).min(data.len());
                c.copy_file(CopyFileRequest {
                    file_size: size,
                    offset: off as i64,
                    data: data[off..end].to_vec(),
                    ..base.clone()
                })
                .await?;
                off = end;
                if off >= data.len() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Where [`create_sandbox_with_share`] mounts the virtio-fs share in the guest.
pub const SHARE_MOUNT: &str = "/run/kata-agent/shared/vfs";

/// CreateSandbox whose one storage is the virtio-fs share (tag
/// `kataShared`), mounted at [`SHARE_MOUNT`].
pub async fn create_sandbox_with_share(c: &mut Client, id: &str) -> Result<(), tonic::Status> {
    c.create_sandbox(CreateSandboxRequest {
        sandbox_id: id.into(),
        storages: vec![Storage {
            driver: "virtio-fs".into(),
            source: "kataShared".into(),
            fstype: "virtiofs".into(),
            mount_point: SHARE_MOUNT.into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// The number of processes in container `id`'s cgroup, as StatsContainer says.
async fn pids_current(c: &mut Client, id: &str) -> Option<u64> {
    c.stats_container(StatsContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("StatsContainer")
    .into_inner()
    .cgroup_stats
    .and_then(|s| s.pids_stats)
    .map(|p| p.current)
}

/// Runs an exec that forks ten long sleeps in container `id` (whose pids
/// limit is `limit`), checks the cgroup never holds more than `limit`
/// processes and that the forks beyond it failed, then SIGKILLs everything in
/// the container and reaps the exec. The container's own process is left for
/// the caller to wait for.
pub async fn assert_pids_limit_holds(c: &mut Client, addr: &Address, id: &str, limit: u64) {
    exec(
        c,
        id,
        "fork",
        &process(
            &[
                "sh",
                "-c",
                "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; wait",
            ],
            false,
        ),
    )
    .await
    .expect("exec the forker");
    // stderr as it comes (the forker's complaint is written in pieces: it
    // must be whole before the SIGKILL below)
    let err_text = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let err = {
        let mut s = stream(addr, Which::Stderr, id, "fork").await;
        let text = err_text.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                text.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            text.lock().unwrap().clone()
        })
    };
    let _out = collect(stream(addr, Which::Stdout, id, "fork").await);
    // the forker reaches the limit (a busy machine may take more than a
    // moment), then its next fork fails and says so
    let t0 = std::time::Instant::now();
    while pids_current(c, id).await.unwrap_or(0) < limit && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = std::time::Instant::now();
    while !String::from_utf8_lossy(&err_text.lock().unwrap()).contains("fork")
        && t0.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let current = pids_current(c, id).await.expect("pids stats");
    assert!(
        current <= limit,
        "the pids limit {limit} holds: {current} processes"
    );
    signal(c, id, "", libc::SIGKILL, true)
        .await
        .expect("SIGKILL all");
    wait(c, id, "fork").await;
    let text = String::from_utf8_lossy(&err.await.unwrap()).into_owned();
    assert!(
        text.contains("fork"),
        "forks beyond the pids limit fail: {text:?}"
    );
}
