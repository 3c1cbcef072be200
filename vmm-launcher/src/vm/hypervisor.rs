//! Bringing the hypervisor up: its uid, its directories and cgroups, the
//! readiness listener and the vsock backend, the jail, QEMU itself and its
//! QMP socket. Run by the VM's owner task ([`super::Actor`]) on CreateVm.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::launcher::{Accelerator, VmSpec};
use kata_proto::paths::{self, ports};
use kata_proto::process::start_time;
use tracing::Instrument;
use tracing::{debug, info, warn};

use super::nic::{open_devices, Nics};
use super::watch::{watch_exit, watch_ready, CONSOLE_DRAIN_WAIT};
use super::{Actor, Hypervisor};
use crate::console::{self, BoundedLog, CONSOLE_CAP};
use crate::files::{self, DIR_MODE, FILE_MODE};
use crate::jail::{Jail, JailSpec};
use crate::qemu::{self, QemuArgs};
use crate::qmp::Qmp;
use crate::spec::host_tsc_khz;
use crate::uids::UidAllocator;
use crate::vsock::{VsockBackend, VsockConfig};
use crate::{cgroup, LauncherError};

/// Deadline of one QMP command.
pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to create its QMP socket.
const QMP_SOCKET_WAIT: Duration = Duration::from_secs(10);

impl Actor {
    /// The uid the hypervisor gets: the spec's, or a free one of the range.
    pub(super) async fn hypervisor_uid(&mut self, spec: &VmSpec) -> Result<u32, LauncherError> {
        if spec.jail_uid != 0 {
            return Ok(spec.jail_uid);
        }
        if self.uids.is_none() {
            self.uids = Some(UidAllocator::host()?);
        }
        let Some(uids) = &self.uids else {
            return Err(LauncherError::State("no uid allocator".into()));
        };
        let lease = uids.allocate(&self.sandbox_id)?;
        let uid = lease.uid();
        self.record.uid_lock = Some(lease.path().to_path_buf());
        let _ = self.record.save(&self.paths);
        self.uid_lease = Some(lease);
        info!(uid, "hypervisor uid allocated");
        Ok(uid)
    }

    /// Jails and starts the hypervisor, paused before the guest's first
    /// instruction, with the readiness listener and the vsock backend
    /// listening; records what it made in the state file.
    pub(super) async fn spawn(
        &mut self,
        spec: &VmSpec,
        accel: Accelerator,
        vm_dir: &Path,
        uid: u32,
        cgroups: &mut Vec<PathBuf>,
    ) -> Result<Hypervisor, LauncherError> {
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e: std::io::Error| LauncherError::Io(what, e)
        };
        // (no await until QEMU is spawned: the span is left before one)
        let prepare = tracing::info_span!("jail_prepare").entered();
        // vm/ is the one host directory the jailed hypervisor reaches (its
        // QMP socket, the vhost-user sockets): its own, 0700
        files::private_dir(vm_dir, DIR_MODE, Some((uid, uid))).map_err(io("creating", vm_dir))?;
        files::private_dir(&self.paths.jail_root(), DIR_MODE, None)
            .map_err(io("creating", &self.paths.jail_root()))?;

        let cgroup_procs = if spec.cgroup_path.is_empty() {
            vec![]
        } else {
            *cgroups = cgroup::create(&spec.cgroup_path)?;
            self.record.cgroups = cgroups.clone();
            self.record
                .save(&self.paths)
                .map_err(io("writing", &self.paths.launcher_state()))?;
            cgroup::procs_files(&spec.cgroup_path)
        };

        // the readiness listener and the vsock backend listen before QEMU runs
        let vsock_uds = self.paths.vsock_uds();
        let ready_path = paths::hybrid_listener_path(&vsock_uds, ports::READY);
        let _ = std::fs::remove_file(&ready_path);
        let ready_listener =
            tokio::net::UnixListener::bind(&ready_path).map_err(io("binding", &ready_path))?;
        files::chmod_nofollow(&ready_path, FILE_MODE).map_err(io("chmod", &ready_path))?;
        let vhost_vsock = kata_proto::host::vhost_vsock_available();
        let vsock = if vhost_vsock {
            None
        } else {
            let vhost_socket = vm_dir.join("vhost-vsock.sock");
            let b = VsockBackend::start(VsockConfig {
                vhost_socket: vhost_socket.clone(),
                uds_path: vsock_uds.clone(),
                guest_cid: u64::from(paths::HYBRID_GUEST_CID),
            })?;
            files::chown_nofollow(&vhost_socket, uid, uid).map_err(io("chown", &vhost_socket))?;
            Some(b)
        };

        if !spec.virtiofs_socket.is_empty() {
            // the jailed hypervisor runs as `uid`: it must be able to connect
            let fs = Path::new(&spec.virtiofs_socket);
            let fd = files::open_nofollow(fs).map_err(io("opening", fs))?;
            files::fchown_fd(&fd, uid, uid).map_err(io("chown", fs))?;
            files::fchmod_fd(&fd, FILE_MODE).map_err(io("chmod", fs))?;
        }
        let taps = match spec.netns_path.as_str() {
            "" => vec![],
            ns => open_devices(Path::new(ns), &spec.net_devices)?,
        };
        let nics = taps
            .iter()
            .zip(&spec.net_devices)
            .map(|(f, d)| (f.as_raw_fd(), d.mac.clone()))
            .collect();
        let mut jail = Jail::prepare(&JailSpec {
            root: self.paths.jail_root(),
            vm_dir: vm_dir.into(),
            kernel: spec.kernel_path.clone().into(),
            initrd: spec.initrd_path.clone().into(),
            netns: (!spec.netns_path.is_empty()).then(|| spec.netns_path.clone().into()),
            cgroup_procs,
            uid,
            kvm: accel == Accelerator::Kvm,
        })?;
        jail.inherit(taps);
        let args = qemu::command_line(&QemuArgs {
            sandbox_id: self.sandbox_id.clone(),
            vcpus: spec.vcpus,
            max_vcpus: spec.max_vcpus,
            memory_mib: spec.memory_mib,
            max_memory_mib: spec.max_memory_mib,
            memory_slots: spec.memory_slots,
            machine_type: spec.machine_type.clone(),
            accelerator: accel,
            kernel_params: spec.kernel_params.clone(),
            vhost_vsock_cid: vhost_vsock.then_some(paths::HYBRID_GUEST_CID),
            tsc_khz: host_tsc_khz(),
            virtiofs_tag: (!spec.virtiofs_socket.is_empty()).then(|| spec.virtiofs_tag.clone()),
            nics,
            hotplug_slots: spec.hotplug_slots,
            firmware: (!spec.firmware_path.is_empty()).then(|| spec.firmware_path.clone()),
        });
        let console = if spec.console_log_path.is_empty() {
            self.paths.console_log()
        } else {
            spec.console_log_path.clone().into()
        };
        // the console (QEMU's stdout and stderr) goes through a pipe QEMU
        // never blocks on, to a log that never exceeds its cap
        let log = BoundedLog::open(&console, CONSOLE_CAP)
            .map_err(io("opening the console log", &console))?;
        self.console = console.clone();
        let (from_qemu, to_log) = console::pipe().map_err(io("console pipe for", &console))?;
        let to_log2 = to_log
            .try_clone()
            .map_err(io("console pipe for", &console))?;
        let console_done =
            console::spawn_reader(from_qemu, log).map_err(io("console reader for", &console))?;
        let mut cmd = tokio::process::Command::new(&spec.hypervisor_path);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(to_log))
            .stderr(Stdio::from(to_log2))
            .kill_on_drop(true);
        // SAFETY: Jail::enter only makes system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || jail.enter());
        }
        debug!(?args, "starting {}", spec.hypervisor_path);
        drop(prepare);
        let t_spawn = Instant::now();
        let spawned = tracing::info_span!("qemu_spawn").entered();
        let mut child = cmd
            .spawn()
            .map_err(|e| LauncherError::Spawn(spec.hypervisor_path.clone(), e))?;
        drop(spawned);
        // our copies of the pipe's write end: the console reader sees end of
        // file when QEMU is gone
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        self.record.hypervisor_pid = pid;
        self.record.hypervisor_start = start_time(pid).unwrap_or(0);
        self.record
            .save(&self.paths)
            .map_err(io("writing", &self.paths.launcher_state()))?;
        let qmp = match connect_qmp(&vm_dir.join("qmp.sock"), &mut child)
            .instrument(tracing::info_span!("qmp_connect"))
            .await
        {
            Ok(q) => Arc::new(q),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = tokio::time::timeout(CONSOLE_DRAIN_WAIT, console_done).await;
                return Err(LauncherError::Hypervisor(format!(
                    "{e}; console log {}: {}",
                    console.display(),
                    console::tail(&console)
                )));
            }
        };
        let hypervisor_start = t_spawn.elapsed();
        // QEMU made it (under a private umask); the guest has not run yet
        let qmp_sock = vm_dir.join("qmp.sock");
        if let Err(e) = files::chmod_nofollow(&qmp_sock, FILE_MODE) {
            warn!("chmod {}: {e}", qmp_sock.display());
        }
        info!(pid, ?accel, "hypervisor created (paused)");
        tokio::spawn(watch_ready(ready_listener, self.ready.clone()));
        tokio::spawn(watch_exit(
            child,
            qmp.clone(),
            self.exit.clone(),
            self.stop_requested.clone(),
            console_done,
        ));
        Ok(Hypervisor {
            pid,
            qmp,
            vsock,
            vsock_uds,
            start: hypervisor_start,
            resources: super::resize::Resources::new(spec, accel),
            nics: Nics::new(
                (!spec.netns_path.is_empty()).then(|| spec.netns_path.clone().into()),
                &spec.net_devices,
                spec.hotplug_slots,
            ),
        })
    }
}

async fn connect_qmp(path: &Path, child: &mut tokio::process::Child) -> Result<Qmp, String> {
    let deadline = Instant::now() + QMP_SOCKET_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("QEMU exited at start ({status})"));
        }
        if path.exists() {
            match Qmp::connect(path, QMP_TIMEOUT).await {
                Ok(q) => return Ok(q),
                // bound but not listening yet (bind creates the file first):
                // refused for a moment, so try again until the deadline
                Err(_) if Instant::now() < deadline => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU did not create {} within {QMP_SOCKET_WAIT:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
