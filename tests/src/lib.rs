//! Helpers of the kata-rs integration and end-to-end tests: where the built
//! binaries and guest images are, and booting a VM under a real launcher.
//!
//! The tests need root and QEMU (CI runs `make test` as root, which builds the
//! binaries and the test guest image first). A missing prerequisite is a test
//! failure that says what to do, never a silent skip.

pub mod agent;
pub mod containerd;
pub mod cri;
pub mod monitor;
pub mod net;
pub mod otlp;
pub mod resources;
pub mod shim;
pub mod soak;
pub mod systemd;
pub mod tasks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_proto::launcher::{
    Accelerator, CreateVmRequest, CreateVmResponse, StartVmRequest, VmSpec,
};
use kata_vmm_launcher::client::LauncherProcess;

/// A directory from the environment, or a panic naming what to run.
fn env_dir(var: &str, hint: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => panic!("{var} is not set: run the tests with `make test` ({hint})"),
    }
}

/// A kata-rs binary built by `make build`.
pub fn bin(name: &str) -> PathBuf {
    let p = env_dir("KATA_TEST_BIN_DIR", "it builds the binaries").join(name);
    assert!(p.exists(), "{} is missing: run `make build`", p.display());
    p
}

/// The test guest image (agent + test peer), built by `make test-image`.
pub fn guest_dir() -> PathBuf {
    image_dir(env_dir(
        "KATA_TEST_GUEST_DIR",
        "it builds the test guest image",
    ))
}

/// The test guest image whose agent has policy support and the allow-all
/// default policy, built by `make test-image`.
pub fn policy_guest_dir() -> PathBuf {
    image_dir(env_dir(
        "KATA_TEST_POLICY_GUEST_DIR",
        "it builds the policy test guest image",
    ))
}

fn image_dir(d: PathBuf) -> PathBuf {
    for f in ["vmlinuz", "initrd.img", "manifest.json"] {
        assert!(
            d.join(f).exists(),
            "{} is missing: run `make test-image`",
            d.join(f).display()
        );
    }
    d
}

/// Fails unless the test runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (namespaces, cgroups, QEMU jail): run `make test` as root, as CI does"
    );
}

/// A booted VM for a test; its sandbox directory is a temporary directory.
pub struct TestVm {
    /// The launcher.
    pub launcher: LauncherProcess,
    /// What CreateVm answered.
    pub created: CreateVmResponse,
    /// The sandbox id.
    pub id: String,
    /// The cgroup path given to CreateVm.
    pub cgroup: String,
    /// Keeps the sandbox directory's parent alive.
    pub tmp: tempfile::TempDir,
    /// kata-virtiofsd serving the shared directory, if asked for.
    pub virtiofsd: Option<tokio::process::Child>,
}

/// A test that failed half-way leaves nothing either: the launcher (if it
/// still runs), its hypervisor, cgroups and files are removed the way the
/// shim removes a dead launcher's (a leftover cgroup would be taken for the
/// next run's own and kept).
impl Drop for TestVm {
    fn drop(&mut self) {
        if self.launcher.paths.dir.exists() {
            use kata_vmm_launcher::client::{cleanup, LiveLauncher};
            if let Err(e) = cleanup(&self.launcher.paths, LiveLauncher::Kill) {
                eprintln!("cleaning up the test VM {}: {e}", self.id);
            }
        }
    }
}

impl TestVm {
    /// Boots the test image under TCG; `rdinit` picks the guest's init
    /// (`None`: the agent). Waits for the readiness announcement.
    pub async fn boot(id: &str, rdinit: Option<&str>) -> TestVm {
        Self::boot_with(id, rdinit, None).await
    }

    /// Like [`TestVm::boot`], and with `shared` served to the guest by
    /// kata-virtiofsd (tag `kataShared`).
    pub async fn boot_with(id: &str, rdinit: Option<&str>, shared: Option<&Path>) -> TestVm {
        let fs = shared.map(|d| FsDaemon {
            binary: bin("kata-virtiofsd"),
            upstream: false,
            shared: d.to_path_buf(),
            cache: "auto".into(),
        });
        Self::boot_with_fs(id, rdinit, fs).await
    }

    /// Like [`TestVm::boot`], with a virtio-fs daemon (ours or upstream's).
    pub async fn boot_with_fs(id: &str, rdinit: Option<&str>, fs: Option<FsDaemon>) -> TestVm {
        Self::boot_in(&guest_dir(), id, rdinit, fs).await
    }

    /// Like [`TestVm::boot`], from the guest image in `guest` (its
    /// `vmlinuz` and `initrd.img`).
    pub async fn boot_image(guest: &Path, id: &str, rdinit: Option<&str>) -> TestVm {
        Self::boot_in(guest, id, rdinit, None).await
    }

    async fn boot_in(guest: &Path, id: &str, rdinit: Option<&str>, fs: Option<FsDaemon>) -> TestVm {
        require_root();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join(id);
        let launcher =
            LauncherProcess::spawn(&bin("kata-vmm-launcher"), id, &dir, Duration::from_secs(10))
                .await
                .expect("launcher starts");
        // flat, no shared parent: concurrent tests never leave an empty parent behind
        let cgroup = format!("kata-rs-test-{id}");
        let mut params = String::from("agent.log=debug");
        if let Some(init) = rdinit {
            params.push_str(&format!(" rdinit={init}"));
        }
        let mut virtiofsd = None;
        let mut virtiofs_socket = String::new();
        if let Some(fs) = fs {
            let sock = launcher.paths.virtiofsd_socket();
            virtiofsd = Some(fs.spawn(id, &sock).await);
            virtiofs_socket = sock.display().to_string();
        }
        let spec = VmSpec {
            virtiofs_socket,
            vcpus: 1,
            memory_mib: 256,
            kernel_path: guest.join("vmlinuz").display().to_string(),
            initrd_path: guest.join("initrd.img").display().to_string(),
            kernel_params: params,
            accelerator: Accelerator::Tcg as i32,
            cgroup_path: cgroup.clone(),
            // a pod's firmware
            firmware_path: kata_proto::config::QBOOT.into(),
            ..Default::default()
        };
        let mut l = launcher;
        let created = l
            .client
            .create_vm(CreateVmRequest { spec: Some(spec) })
            .await
            .expect("CreateVm")
            .into_inner();
        l.client
            .start_vm(StartVmRequest {
                agent_ready_timeout_seconds: 90,
            })
            .await
            .expect("StartVm with the guest ready");
        TestVm {
            launcher: l,
            created,
            id: id.into(),
            cgroup,
            tmp,
            virtiofsd,
        }
    }

    /// The hybrid vsock address of guest port `port`.
    pub fn addr(&self, port: u32) -> kata_proto::dialer::Address {
        kata_proto::dialer::Address::Hybrid {
            path: self.created.vsock_uds_path.clone().into(),
            port,
        }
    }

    /// The sandbox directory.
    pub fn dir(&self) -> PathBuf {
        self.launcher.paths.dir.clone()
    }

    /// Ends the VM the way the shim does: DestroySandbox to the agent; the
    /// guest powers off, the launcher shuts down, and nothing is left.
    pub async fn destroy_through_agent(
        mut self,
        agent: &mut kata_proto::agent::agent_service_client::AgentServiceClient<
            tonic::transport::Channel,
        >,
    ) {
        agent
            .destroy_sandbox(kata_proto::agent::DestroySandboxRequest {})
            .await
            .expect("DestroySandbox");
        let exit = tokio::time::timeout(Duration::from_secs(60), self.launcher.client.wait_vm(()))
            .await
            .expect("the VM exits after DestroySandbox")
            .expect("WaitVm")
            .into_inner();
        assert_eq!(
            (exit.reason.as_str(), exit.exit_code),
            ("poweroff", 0),
            "{exit:?}"
        );
        let dir = self.dir();
        self.launcher.client.shutdown(()).await.expect("Shutdown");
        let st = self.launcher.child.wait().await.expect("launcher exit");
        assert!(st.success(), "launcher exit: {st}");
        if let Some(mut fs) = self.virtiofsd.take() {
            // it ends by itself once QEMU disconnected
            let st = tokio::time::timeout(Duration::from_secs(10), fs.wait())
                .await
                .expect("kata-virtiofsd exits when the VM is gone")
                .expect("wait kata-virtiofsd");
            assert!(st.success(), "kata-virtiofsd exit: {st}");
        }
        assert_nothing_left(&dir, &self.cgroup, self.created.hypervisor_pid);
    }
}

/// A virtio-fs daemon for a test VM: kata-virtiofsd, or upstream virtiofsd
/// (for the benchmarks' comparison).
#[derive(Debug, Clone)]
pub struct FsDaemon {
    /// The binary.
    pub binary: PathBuf,
    /// Upstream virtiofsd's command line instead of ours.
    pub upstream: bool,
    /// The directory to serve.
    pub shared: PathBuf,
    /// `--cache` (none, auto, always).
    pub cache: String,
}

impl FsDaemon {
    /// Starts the daemon on the vhost-user socket `sock` (the sandbox's
    /// `vm/virtiofsd.sock`) and waits until it listens.
    pub async fn spawn(&self, id: &str, sock: &Path) -> tokio::process::Child {
        let dir = sock.parent().expect("socket directory");
        std::fs::create_dir_all(dir).expect("create the vm directory");
        let mut cmd = tokio::process::Command::new(&self.binary);
        if self.upstream {
            cmd.arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", self.shared.display()))
                .arg(format!("--cache={}", self.cache))
                .arg("--sandbox=namespace");
        } else {
            cmd.arg("--socket-path")
                .arg(sock)
                .arg("--shared-dir")
                .arg(&self.shared)
                .arg("--cache")
                .arg(&self.cache)
                .arg("--sandbox-id")
                .arg(id)
                .arg("--control-socket")
                .arg(dir.join("virtiofsd-ctl.sock"));
        }
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.binary.display()));
        if self.upstream {
            // upstream says nothing: wait for its socket
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "virtiofsd did not listen within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            let out = child.stdout.take().expect("stdout");
            if let Err(e) = kata_proto::wait_ready_line(out, Duration::from_secs(10)).await {
                panic!("kata-virtiofsd was not ready: {e}");
            }
        }
        child
    }
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Asserts that nothing of the sandbox is left on the host: the hypervisor, the
/// sandbox directory, the cgroups.
pub fn assert_nothing_left(dir: &Path, cgroup: &str, hypervisor_pid: u32) {
    assert!(
        !alive(hypervisor_pid),
        "the hypervisor (pid {hypervisor_pid}) still runs"
    );
    assert!(
        !dir.exists(),
        "the sandbox directory {} is still there",
        dir.display()
    );
    for h in kata_vmm_launcher::client::cgroup_hierarchies() {
        let p = h.join(cgroup);
        assert!(!p.exists(), "the cgroup {} is still there", p.display());
    }
}
